// Package fhirexport holds the Cloud Run functions StartExport and PollExport,
// which export Cloud Healthcare API FHIR stores on request and report what became
// of each export as a CloudEvent.
//
// StartExport is triggered by Pub/Sub (or any CloudEvent carrying an export
// spec) and starts at most one fhirStores.export per trigger. PollExport is
// triggered every minute by Cloud Scheduler through Pub/Sub and follows every
// pending export with operations.get. RecordChange, triggered by a FHIR
// store's change notifications, keeps deletions for the incremental feed.
// Configuration comes from the FHIREXPORT_* environment variables; see the
// README.
package fhirexport

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"
	"time"

	"cloud.google.com/go/pubsub/v2"
	"cloud.google.com/go/storage"
	"github.com/GoogleCloudPlatform/functions-framework-go/functions"
	cloudevents "github.com/cloudevents/sdk-go/v2"
	"google.golang.org/api/healthcare/v1"
	"google.golang.org/api/option"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/fhirexport/fhirexport/events"
	"github.com/fhirexport/fhirexport/export"
)

func init() {
	functions.CloudEvent("StartExport", instance.StartExport)
	functions.CloudEvent("PollExport", instance.PollExport)
	functions.CloudEvent("RecordChange", instance.RecordChange)
}

// instance is this process's function instance: configuration and clients
// are built once, at the first event (no network I/O at init: cold starts
// stay fast), and reused.
var instance = &app{lookup: os.LookupEnv, log: export.NewLogger(stdout{}, slog.LevelInfo)}

// stdout writes to os.Stdout as it is at each write, so a main program that
// embeds the functions (cmd/fhirexport-local) can send their logs elsewhere.
type stdout struct{}

func (stdout) Write(p []byte) (int, error) { return os.Stdout.Write(p) }

type app struct {
	lookup func(string) (string, bool)
	log    *slog.Logger
	now    func() time.Time // nil: real time; tests share their emulator's clock

	once sync.Once
	x    *export.Exporter
	err  error // cached with the clients: configuration errors do not heal
}

// StartExport handles one export request. It returns an error only when
// Pub/Sub should redeliver the event.
func (a *app) StartExport(ctx context.Context, e cloudevents.Event) error {
	x, err := a.exporter(ctx)
	if err != nil {
		a.log.Error("fhirexport is misconfigured; the trigger will be redelivered", "error", err.Error(), "trigger", e.ID())
		return err
	}
	trig, decodeErr := events.DecodeTrigger(e)
	return x.Start(export.WithLogger(ctx, a.log), trig, decodeErr)
}

// PollExport sweeps every pending export once. A failed sweep is logged and
// acknowledged: the next scheduler tick is the retry, and redelivering old
// ticks would only add load while a service is down.
func (a *app) PollExport(ctx context.Context, e cloudevents.Event) error {
	x, err := a.exporter(ctx)
	if err != nil {
		a.log.Error("fhirexport is misconfigured", "error", err.Error(), "trigger", e.ID())
		return err
	}
	if _, err := x.Poll(export.WithLogger(ctx, a.log)); err != nil {
		a.log.Error("poll sweep incomplete; the next tick retries", "error", err.Error(), "trigger", e.ID())
	}
	return nil
}

// RecordChange handles one FHIR store change notification: deletions become
// tombstones for the feed. A malformed notification is logged and
// acknowledged (redelivery cannot mend it); only a failed write is retried.
func (a *app) RecordChange(ctx context.Context, e cloudevents.Event) error {
	n, err := events.DecodeNotification(e)
	if err != nil {
		a.log.Error("malformed change notification; acknowledged", "error", err.Error(), "trigger", e.ID(), "source", e.Source())
		return nil
	}
	x, err := a.exporter(ctx)
	if err != nil {
		a.log.Error("fhirexport is misconfigured; the notification will be redelivered", "error", err.Error(), "trigger", e.ID())
		return err
	}
	return x.RecordChange(export.WithLogger(ctx, a.log), n)
}

func (a *app) exporter(ctx context.Context) (*export.Exporter, error) {
	a.once.Do(func() { a.x, a.err = newExporter(context.WithoutCancel(ctx), a.lookup, a.now) })
	return a.x, a.err
}

// newExporter loads the configuration and builds the clients.
func newExporter(ctx context.Context, lookup func(string) (string, bool), now func() time.Time) (*export.Exporter, error) {
	cfg, err := export.LoadConfig(lookup)
	if err != nil {
		return nil, err
	}
	var hcOpts []option.ClientOption
	if ep := cfg.HealthcareEndpoint; ep != "" {
		hcOpts = append(hcOpts, option.WithEndpoint(ep))
		if strings.HasPrefix(ep, "http://") {
			hcOpts = append(hcOpts, option.WithoutAuthentication())
		}
	}
	hc, err := healthcare.NewService(ctx, hcOpts...)
	if err != nil {
		return nil, fmt.Errorf("healthcare client: %w", err)
	}
	stOpts := []option.ClientOption{storage.WithJSONReads()}
	if h := cfg.StorageEmulator; h != "" {
		if !strings.Contains(h, "://") {
			h = "http://" + h
		}
		stOpts = append(stOpts, option.WithEndpoint(strings.TrimRight(h, "/")+"/storage/v1/"), option.WithoutAuthentication())
	}
	st, err := storage.NewClient(ctx, stOpts...)
	if err != nil {
		return nil, fmt.Errorf("storage client: %w", err)
	}
	var psOpts []option.ClientOption
	if h := cfg.PubSubEmulatorHost; h != "" {
		psOpts = append(psOpts, option.WithEndpoint(h), option.WithoutAuthentication(),
			option.WithGRPCDialOption(grpc.WithTransportCredentials(insecure.NewCredentials())))
	}
	project := strings.Split(cfg.EventsTopic, "/")[1]
	ps, err := pubsub.NewClient(ctx, project, psOpts...)
	if err != nil {
		return nil, fmt.Errorf("pubsub client: %w", err)
	}
	state := export.NewState(st, cfg.StateBucket, cfg.StatePrefix)
	x := export.New(hc, state, events.NewPublisher(ps, cfg.EventsTopic), cfg.Policy, now)
	x.MaxRunning, x.PollWorkers = cfg.MaxRunning, cfg.PollWorkers
	if h := cfg.StorageEmulator; h != "" {
		x.FileURL = export.EmulatorFileURL(h) // manifests name files a client here can fetch
	}
	return x, nil
}
