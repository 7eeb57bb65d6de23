package main

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"time"
)

// serve prints how to trigger an export and serves until ctx is done,
// printing outcome events and the progress of every started export.
func (st *stack) serve(ctx context.Context) error {
	spec, _ := json.Marshal(map[string]any{
		"fhirStore":      storeName,
		"gcsDestination": map[string]any{"uriPrefix": exportPrefix + "/{store}/{date}/{run}"},
	})
	// Spec JSON never holds a single quote, so single-quoting it is safe.
	c := st.con
	c.Printf("serving; Ctrl-C stops.\n\n")
	c.Printf("Trigger an export here with a binary CloudEvent whose data is the spec (ce-id is the\n"+
		"idempotency key: a repeated id is a duplicate and starts nothing):\n\n"+
		"  curl -i %s/StartExport \\\n"+
		"    -H 'ce-specversion: 1.0' -H 'ce-type: com.example.export.requested' \\\n"+
		"    -H 'ce-source: //local/curl' -H \"ce-id: curl-$(date +%%s)\" \\\n"+
		"    -H 'Content-Type: application/json' \\\n"+
		"    -d '%s'\n\n", st.baseURL, spec)
	real := strings.NewReplacer(
		project, "YOUR_PROJECT",
		"datasets/demo/fhirStores/ehr", "datasets/YOUR_DATASET/fhirStores/YOUR_STORE",
		"gs://"+exportBucket+"/", "gs://YOUR_BUCKET/",
	).Replace(string(spec))
	c.Printf("Allow-lists in force (a spec outside them is rejected with code 7, PERMISSION_DENIED):\n"+
		"  FHIREXPORT_ALLOWED_STORES=%s\n  FHIREXPORT_ALLOWED_DESTINATIONS=%s\n\n", allowedStores, allowedDestinations)
	c.Printf("In the real deployment, publish the same spec on the requests topic (an export is\n"+
		"allowed only into FHIREXPORT_ALLOWED_DESTINATIONS):\n\n"+
		"  gcloud pubsub topics publish projects/YOUR_PROJECT/topics/%s \\\n"+
		"    --message='%s'\n\n", short(requestsTopic), real)
	env := fmt.Sprintf("PUBSUB_EMULATOR_HOST=%s STORAGE_EMULATOR_HOST=%s FHIREXPORT_HEALTHCARE_ENDPOINT=%s",
		st.s.PubSubAddr, st.s.GCSURL, st.emu.URL)
	c.Printf("Operate it (status, runs, show, cancel, rerun, watermark) from another terminal:\n\n"+
		"  %s \\\n    FHIREXPORT_STATE=gs://%s/state FHIREXPORT_REQUESTS_TOPIC=%s \\\n    go run ./cmd/fhirexport status\n\n",
		env, stateBucket, requestsTopic)
	c.Printf("Outcome events appear below; PollExport runs every %s. Files land in %s/.\n"+
		"Environment for other local clients:\n  %s\n\n", st.o.tick, st.gcsRoot, env)

	followed := map[string]bool{}
	for {
		evs, _, changed := st.events.snapshot("")
		for _, e := range evs {
			if op := e.Data.Operation; e.Type == "started" && op != "" && !followed[op] {
				followed[op] = true
				st.wg.Go(func() { st.follow(ctx, op) })
			}
		}
		select {
		case <-ctx.Done():
			c.Printf("\nshutting down\n")
			return nil
		case <-changed:
		}
	}
}

// follow shows an operation's progress until it is done.
func (st *stack) follow(ctx context.Context, op string) {
	var p progress
	t := time.NewTicker(500 * time.Millisecond)
	defer t.Stop()
	for !p.done {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			st.showProgress(ctx, op, &p)
		}
	}
}
