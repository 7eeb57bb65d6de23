package export

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	healthcare "google.golang.org/api/healthcare/v1"
	"google.golang.org/api/iterator"

	"cloud.google.com/go/storage"
)

// DefaultCallSkew is CallSkew's default: how far our clock and the
// service's may disagree. Both are kept by NTP on Google's infrastructure;
// two minutes is far beyond what either drifts.
const DefaultCallSkew = 2 * time.Minute

// listPageSize is the page size of operations.list: one request per 100
// operations of the dataset, paid only by a run in doubt.
const listPageSize = 100

// findOperation looks for the export operation a starting run may have
// started among the ExportResources operations of the store's dataset
// (operations.list; OperationMetadata does not name the store). It returns
// the operation owned by this run (operations/{op} names it) or the only one
// nobody owns; otherwise how many unowned candidates it could not tell apart.
// Cloud Storage output ({destination}/{opID}_*) tells candidates apart once
// they have written it.
//
// operations.list takes no filter and promises no order, and a dataset holds
// every operation of the last weeks, so every page is read, and a candidate
// must have been created within the run's window on our own clock, widened
// by CallSkew on each side: from when the run took its lock to when its last
// export call returned (Called), or to now when its attempt died without
// one. Only candidates have their ownership record read, newest first (the
// run's own operation is the last it could have made), stopping at the
// run's own. renew, called between requests, keeps the resolution's lease
// while a long history is read.
func (x *Exporter) findOperation(ctx context.Context, p pendingRecord, renew func(context.Context) error) (string, int, error) {
	dataset := datasetOf(p.Store)
	if dataset == "" {
		return "", 0, fmt.Errorf("store %q has no dataset", p.Store)
	}
	from, to := x.callWindow(p)
	type cand struct {
		name  string
		ct    time.Time
		ended bool // done, having exported resources
	}
	var cands []cand
	for token := ""; ; {
		page, err := x.listOperations(ctx, dataset, token)
		if err != nil {
			return "", 0, fmt.Errorf("operations.list %s: %w", dataset, err)
		}
		for _, op := range page.Operations {
			// Most of a dataset's history is not an export: skip those
			// before decoding anything.
			if !bytes.Contains(op.Metadata, []byte("ExportResources")) {
				continue
			}
			var meta struct {
				ApiMethodName, CreateTime string
				Counter                   struct {
					Success int64 `json:"success,string"`
				}
			}
			if json.Unmarshal(op.Metadata, &meta) != nil || !strings.HasSuffix(meta.ApiMethodName, "ExportResources") {
				continue
			}
			ct, err := time.Parse(time.RFC3339Nano, meta.CreateTime)
			if err != nil || ct.Before(from) || ct.After(to) {
				continue
			}
			if !slices.ContainsFunc(cands, func(c cand) bool { return c.name == op.Name }) { // a page boundary shifted by a new operation
				cands = append(cands, cand{op.Name, ct, op.Done && meta.Counter.Success > 0})
			}
		}
		if token = page.NextPageToken; token == "" {
			break
		}
		if err := renew(ctx); err != nil {
			return "", 0, err
		}
	}
	slices.SortFunc(cands, func(a, b cand) int { return b.ct.Compare(a.ct) })
	var unowned []cand
	for _, c := range cands {
		if err := renew(ctx); err != nil {
			return "", 0, err
		}
		var own opRecord
		_, err := x.state.read(ctx, opObject(c.name), &own)
		switch {
		case err == nil && own.Run == p.Run:
			return c.name, 0, nil
		case err == nil, errors.Is(err, ErrCorrupt):
		case errors.Is(err, ErrNotFound):
			unowned = append(unowned, c)
		default:
			return "", 0, err
		}
	}
	if strings.HasPrefix(p.Destination, "gs://") && len(unowned) > 0 {
		// Output under the run's destination tells its operation; one
		// that ended having exported resources elsewhere is another's.
		var confirmed []string
		open := unowned[:0:0]
		for _, c := range unowned {
			ok, err := x.wroteOutput(ctx, p.Destination, c.name)
			if err != nil {
				return "", 0, err
			}
			switch {
			case ok:
				confirmed = append(confirmed, c.name)
			case !c.ended:
				open = append(open, c)
			}
		}
		if len(confirmed) == 1 {
			return confirmed[0], 0, nil
		}
		if len(confirmed) > 1 {
			return "", len(confirmed), nil
		}
		unowned = open
	}
	if len(unowned) != 1 {
		return "", len(unowned), nil
	}
	// A lone unowned candidate is this run's only if no other run of this
	// deployment may have started it: a fleet's stores share a dataset, and
	// a sibling starting at the same time records its operation only after
	// the call returns (operations name no store).
	sibling, err := x.startingSibling(ctx, p, dataset)
	if err != nil {
		return "", 0, err
	}
	if sibling != "" {
		Logger(ctx).Warn("run in doubt: the lone unowned export could be a sibling's still starting; waiting for it to record its operation", "candidate", unowned[0].name, "sibling", sibling)
		return "", 1, nil
	}
	return unowned[0].name, 0, nil
}

// startingSibling names another run of this deployment that holds a lock
// without an operation (starting, or in doubt itself) on a store of the
// same dataset: an unowned operation of the dataset may be that run's.
// The listing's metadata names each lock's dataset (lockMeta), so only a
// lock written without it (by an earlier version) is read: a resolution
// must not fail because some other pipeline's lock was unreadable.
func (x *Exporter) startingSibling(ctx context.Context, p pendingRecord, dataset string) (string, error) {
	locks, err := x.state.list(ctx, "pending")
	if err != nil {
		return "", err
	}
	key := datasetKey(dataset)
	for _, o := range locks {
		if o.Metadata["operation"] != "" || o.Metadata["run"] == p.Run || o.Metadata["ending"] != "" || !strings.HasSuffix(o.Name, ".json") {
			continue
		}
		switch ds := o.Metadata["dataset"]; {
		case ds == key:
			return o.Metadata["run"], nil
		case ds != "":
			continue
		}
		var s pendingRecord
		if _, err := x.state.read(ctx, "pending/"+o.Name, &s); err != nil {
			if errors.Is(err, ErrNotFound) || errors.Is(err, ErrCorrupt) {
				continue
			}
			return "", err
		}
		if s.Run != p.Run && s.Operation == "" && datasetOf(s.Store) == dataset {
			return s.Run, nil
		}
	}
	return "", nil
}

// datasetOf is the dataset of a store's name, or "" when it names none.
func datasetOf(store string) string {
	i := strings.Index(store, "/fhirStores/")
	if i < 0 {
		return ""
	}
	return store[:i]
}

// datasetKey names a dataset in object metadata: ASCII, whatever the
// dataset's id (the API allows letters of any script).
func datasetKey(dataset string) string { return digest("dataset", dataset)[:16] }

// callWindow is when, on our clock widened by CallSkew, an export call of
// run p may have created its operation.
func (x *Exporter) callWindow(p pendingRecord) (from, to time.Time) {
	from, to = p.Locked, p.Called
	if from.IsZero() { // a lock written before Locked was recorded
		from = x.now().Add(-x.InDoubtPatience - x.StartLease)
	}
	if to.IsZero() {
		to = x.now()
	}
	return from.Add(-x.CallSkew), to.Add(x.CallSkew)
}

// listAttempts bounds the tries of one operations.list page. A resolution
// reads every page, and one page that fails for good makes it start over:
// with a page failing one time in three, 4 tries fail a 10-page listing one
// time in 13, 6 tries one time in 137, for at most 2.4 s more of backoff.
const listAttempts = 6

// listOperations reads one page of a dataset's operations, retrying a
// transient failure a few times: a resolution reads every page, and one
// failed page must not make it start over.
func (x *Exporter) listOperations(ctx context.Context, dataset, token string) (*healthcare.ListOperationsResponse, error) {
	wait := 100 * time.Millisecond
	for attempt := 1; ; attempt++ {
		callCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
		page, err := x.hc.Projects.Locations.Datasets.Operations.List(dataset).PageSize(listPageSize).PageToken(token).Context(callCtx).Do()
		cancel()
		if err == nil || Permanent(err) || attempt == listAttempts {
			return page, err
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(wait):
		}
		wait *= 2
	}
}

// wroteOutput reports whether operation op wrote objects under dest
// ({dest}/{opID}_{Type}).
func (x *Exporter) wroteOutput(ctx context.Context, dest, op string) (bool, error) {
	bucket, prefix, _ := strings.Cut(strings.TrimPrefix(dest, "gs://"), "/")
	if prefix != "" && !strings.HasSuffix(prefix, "/") {
		prefix += "/"
	}
	prefix += op[strings.LastIndex(op, "/")+1:] + "_"
	it := x.state.client.Bucket(bucket).Objects(ctx, &storage.Query{Prefix: prefix})
	_, err := it.Next()
	if errors.Is(err, iterator.Done) {
		return false, nil
	}
	return err == nil, err
}
