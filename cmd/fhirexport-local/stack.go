package main

import (
	"context"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"time"

	"cloud.google.com/go/pubsub/v2"
	pb "cloud.google.com/go/pubsub/v2/apiv1/pubsubpb"
	"cloud.google.com/go/storage"
	healthcare "google.golang.org/api/healthcare/v1"

	// Registers StartExport, PollExport and RecordChange with the functions
	// framework.
	_ "github.com/fhirexport/fhirexport"
	"github.com/fhirexport/fhirexport/healthcaretest"
	"github.com/fhirexport/fhirexport/healthcaretest/stacktest"
)

// The local project's names. The functions read their configuration once per
// process, so these must not depend on flags that may differ between runs in
// one process (tests): only the ports do, and tests keep them stable.
const (
	project       = "local-project"
	location      = "projects/" + project + "/locations/us-central1"
	datasetName   = location + "/datasets/demo"
	storeName     = datasetName + "/fhirStores/ehr"
	requestsTopic = "projects/" + project + "/topics/fhirexport-requests"
	pollTopic     = "projects/" + project + "/topics/fhirexport-poll"
	eventsTopic   = "projects/" + project + "/topics/fhirexport-events"
	changesTopic  = "projects/" + project + "/topics/fhir-changes" // the demo store's notificationConfigs
	exportBucket  = "local-exports"
	stateBucket   = "local-state"
	exportPrefix  = "gs://" + exportBucket + "/fhir"

	// The allow-lists the local functions run with; --serve prints them.
	allowedStores       = location + "/datasets/*/fhirStores/*"
	allowedDestinations = exportPrefix + "," + bqDataset
	bqDataset           = "bq://" + project + ".analytics"
	// maxRunning is the functions' FHIREXPORT_MAX_RUNNING: small, so the
	// fleet step shows runs waiting for a slot.
	maxRunning = 2
)

// stack is the local environment: emulators, functions, delivery and ticks.
type stack struct {
	o       options
	con     *console
	gcsRoot string // fake-gcs-server's folder: DIR/gcs/BUCKET/OBJECT

	emuLog *os.File
	s      *stacktest.Stack // the emulators
	// Shorthands for s's parts.
	emu      *healthcaretest.Server
	hc       *healthcare.Service
	storage  *storage.Client
	psClient *pubsub.Client
	requests *pubsub.Publisher
	baseURL  string // functions framework
	seeded   int    // resources in the store after seeding
	events   *eventLog
	sched    scheduler

	stop context.CancelFunc // stops the background goroutines
	wg   sync.WaitGroup
}

// startStack starts everything; on error, what was started is stopped.
func startStack(ctx context.Context, o options, con *console) (_ *stack, err error) {
	st := &stack{o: o, con: con, gcsRoot: filepath.Join(o.dir, "gcs"), events: newEventLog()}
	defer func() {
		if err != nil {
			st.close()
		}
	}()
	if st.emuLog, err = os.Create(filepath.Join(o.dir, "emulators.log")); err != nil {
		return nil, err
	}

	// pstest panics when it cannot listen: check the address first.
	if o.pubsubPort != 0 {
		ln, err := net.Listen("tcp", hostPort(o.pubsubPort))
		if err != nil {
			return nil, fmt.Errorf("pub/sub emulator: %w (choose another --pubsub-port)", err)
		}
		ln.Close()
	}
	emuLogger := log.New(st.emuLog, "", log.LstdFlags|log.Lmicroseconds)
	st.s, err = stacktest.Start(ctx, stacktest.Options{
		Project:     project,
		Buckets:     []string{exportBucket, stateBucket},
		StorageRoot: st.gcsRoot, GCSPort: o.gcsPort, GCSLog: st.emuLog,
		PubSubPort: o.pubsubPort,
		Topics:     []string{requestsTopic, pollTopic, eventsTopic, changesTopic},
		Subscriptions: []*pb.Subscription{
			{Name: subName("fhirexport-requests-eventarc"), Topic: requestsTopic, AckDeadlineSeconds: 60},
			{Name: subName("fhirexport-poll-eventarc"), Topic: pollTopic, AckDeadlineSeconds: 60},
			{Name: subName("fhirexport-local-events"), Topic: eventsTopic, AckDeadlineSeconds: 60},
			{Name: subName("fhir-changes-eventarc"), Topic: changesTopic, AckDeadlineSeconds: 60},
		},
		HealthcarePort: o.healthcarePort,
		Healthcare:     healthcaretest.Options{ExportDuration: o.exportDuration, ExportSteps: o.exportSteps, Logf: emuLogger.Printf},
	})
	if err != nil {
		return nil, err
	}
	st.emu, st.hc, st.storage, st.psClient = st.s.Healthcare, st.s.HealthcareService, st.s.Storage, st.s.PubSub
	st.requests = st.psClient.Publisher(requestsTopic)

	if err := st.emu.CreateDataset(datasetName); err != nil {
		return nil, err
	}
	if err := st.emu.CreateFHIRStore(storeName, "R4"); err != nil {
		return nil, err
	}
	if st.seeded, err = st.emu.Seed(storeName, o.seed, o.patients); err != nil {
		return nil, fmt.Errorf("seed the store: %w", err)
	}

	// Every write to the demo store publishes a change notification on
	// fhir-changes, delivered to RecordChange like the other topics.
	if err := st.emu.SetNotificationConfigs(storeName, healthcaretest.NotificationConfig{PubsubTopic: changesTopic}); err != nil {
		return nil, fmt.Errorf("notificationConfigs of %s: %w", storeName, err)
	}

	// The functions read these at their first event, as on the platform.
	env := map[string]string{
		"FHIREXPORT_EVENTS_TOPIC":         eventsTopic,
		"FHIREXPORT_STATE":                "gs://" + stateBucket + "/state",
		"FHIREXPORT_ALLOWED_STORES":       allowedStores,
		"FHIREXPORT_ALLOWED_DESTINATIONS": allowedDestinations,
		"FHIREXPORT_HEALTHCARE_ENDPOINT":  st.emu.URL,
		"FHIREXPORT_MAX_RUNNING":          strconv.Itoa(maxRunning),
		"PUBSUB_EMULATOR_HOST":            st.s.PubSubAddr,
		"STORAGE_EMULATOR_HOST":           st.s.GCSURL,
	}
	for k, v := range env {
		if err := os.Setenv(k, v); err != nil {
			return nil, err
		}
	}
	// With FUNCTION_TARGET set the framework would serve one function at "/".
	os.Unsetenv("FUNCTION_TARGET")
	if err := st.startFunctions(ctx); err != nil {
		return nil, err
	}

	bg, stop := context.WithCancel(ctx)
	st.stop = stop
	httpClient := &http.Client{Timeout: 540 * time.Second} // a function's maximum run time
	for _, p := range []*pusher{
		newPusher(st.psClient, subName("fhirexport-requests-eventarc"), requestsTopic, st.baseURL+"/StartExport", httpClient, con, st.events),
		newPusher(st.psClient, subName("fhirexport-poll-eventarc"), pollTopic, st.baseURL+"/PollExport", httpClient, con, st.events),
		newPusher(st.psClient, subName("fhir-changes-eventarc"), changesTopic, st.baseURL+"/RecordChange", httpClient, con, st.events),
	} {
		st.wg.Go(func() { st.background(bg, "push "+p.sub, p.run) })
	}
	st.wg.Go(func() { st.background(bg, "outcome events", st.receiveEvents) })
	st.wg.Go(func() { st.background(bg, "scheduler", st.tick) })
	return st, nil
}

// background runs f until ctx is done and reports an early failure.
func (st *stack) background(ctx context.Context, what string, f func(context.Context) error) {
	if err := f(ctx); err != nil && ctx.Err() == nil {
		st.con.Printf("  ! %s stopped: %v\n", what, err)
	}
}

// startFunctions serves the registered functions; they live until the
// process exits.
func (st *stack) startFunctions(ctx context.Context) error {
	ln, err := net.Listen("tcp", hostPort(st.o.port))
	if err != nil {
		return fmt.Errorf("functions framework: %w (choose another --port N; --port 0 picks a free one)", err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	st.baseURL, err = stacktest.ServeFunctions(ctx, port)
	return err
}

// tick publishes to the poll topic every --tick, as Cloud Scheduler does every
// minute in production, unless paused.
func (st *stack) tick(ctx context.Context) error {
	pub := st.psClient.Publisher(pollTopic)
	defer pub.Stop()
	t := time.NewTicker(st.o.tick)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		st.sched.mu.Lock()
		if !st.sched.paused {
			id, err := pub.Publish(ctx, &pubsub.Message{Data: []byte(`{"scheduler":"fhirexport-local"}`)}).Get(ctx)
			switch {
			case err == nil:
				st.sched.inFlight = append(slices.DeleteFunc(st.sched.inFlight, st.delivered), id)
			case ctx.Err() == nil:
				st.con.Printf("  ! scheduler tick not published: %v\n", err)
			}
		}
		st.sched.mu.Unlock()
	}
}

// scheduler is the state of the local scheduler's ticks.
type scheduler struct {
	mu       sync.Mutex
	paused   bool
	inFlight []string // ticks published and maybe not yet handled by PollExport
}

// delivered reports whether a function is done with message id.
func (st *stack) delivered(id string) bool {
	acked, gaveUp, _ := st.events.delivery(id)
	return acked || gaveUp != ""
}

// pauseTicks stops the scheduler and waits until PollExport has handled
// every tick published: no sweep runs until resumeTicks.
func (st *stack) pauseTicks(ctx context.Context) error {
	st.sched.mu.Lock()
	st.sched.paused = true
	ids := st.sched.inFlight
	st.sched.inFlight = nil
	st.sched.mu.Unlock()
	timeout := 30*time.Second + 10*st.o.tick
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for _, id := range ids {
		for {
			acked, gaveUp, changed := st.events.delivery(id)
			if acked || gaveUp != "" {
				break
			}
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-deadline.C:
				return fmt.Errorf("PollExport did not handle scheduler tick %s within %s; see %s", id, timeout, st.o.logs)
			case <-changed:
			}
		}
	}
	return nil
}

// resumeTicks restarts the scheduler.
func (st *stack) resumeTicks() {
	st.sched.mu.Lock()
	defer st.sched.mu.Unlock()
	st.sched.paused = false
}

// close stops everything started, in reverse order.
func (st *stack) close() {
	if st.stop != nil {
		st.stop()
	}
	st.wg.Wait()
	if st.requests != nil {
		st.requests.Stop()
	}
	if st.s != nil {
		st.s.Close()
	}
	if st.emuLog != nil {
		st.emuLog.Close()
	}
}

// describe prints what runs where.
func (st *stack) describe() {
	c := st.con
	c.Printf("fhirexport-local: everything is under %s/ (function logs: %s, emulator logs: %s)\n",
		st.o.dir, st.o.logs, filepath.Join(st.o.dir, "emulators.log"))
	c.Printf("  Healthcare API emulator  %s  store %s (%d patients, %d resources)\n", st.emu.URL, storeName, st.o.patients, st.seeded)
	c.Printf("  Cloud Storage emulator   %s  buckets %s, %s in %s/\n", st.s.GCSURL, exportBucket, stateBucket, st.gcsRoot)
	c.Printf("  Pub/Sub emulator         %s  %s → StartExport, %s → PollExport (every %s), %s,\n",
		st.s.PubSubAddr, short(requestsTopic), short(pollTopic), st.o.tick, short(eventsTopic))
	c.Printf("                           %s (%s's notificationConfigs) → RecordChange\n", short(changesTopic), short(storeName))
	c.Printf("  functions                %s/StartExport  %s/PollExport  %s/RecordChange\n", st.baseURL, st.baseURL, st.baseURL)
	if st.o.serve {
		c.Printf("                           (--port N serves them on another port, --port 0 on a free one)\n")
	}
	c.Printf("  exports run %s in %d steps (emulated); FHIREXPORT_MAX_RUNNING=%d\n", st.o.exportDuration, st.o.exportSteps, maxRunning)
}

// console serializes output lines from concurrent goroutines.
type console struct {
	mu sync.Mutex
	w  io.Writer
}

// Printf writes one formatted message.
func (c *console) Printf(format string, args ...any) {
	c.mu.Lock()
	defer c.mu.Unlock()
	fmt.Fprintf(c.w, format, args...)
}

func hostPort(port int) string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(port)) }

func subName(id string) string { return "projects/" + project + "/subscriptions/" + id }

// short returns the last segment of a resource name.
func short(name string) string {
	for i := len(name) - 1; i >= 0; i-- {
		if name[i] == '/' {
			return name[i+1:]
		}
	}
	return name
}
