// Package healthcaretest is an in-process emulator of the Cloud Healthcare API
// v1 surface fhirexport uses, in the spirit of net/http/httptest and pstest.
//
// An [Emulator] is an [http.Handler] that answers the REST paths the real
// google.golang.org/api/healthcare/v1 client sends: datasets (create, get,
// list, patch, delete), FHIR stores (create, get, list, patch, delete), the
// FHIR REST interactions create, update, patch (JSON Patch), read, vread,
// history (every version, deleted ones included), delete,
// capabilities (metadata) and executeBundle (batch and transaction),
// fhirStores.export to Cloud Storage (through a real cloud.google.com/go/storage
// client, e.g. on fake-gcs-server) or to an in-memory BigQuery model, and the
// dataset operations get, list and cancel. Other paths shaped like API methods
// answer 501 UNIMPLEMENTED.
//
// FHIR stores keep the service's rules on the REST surface: enableUpdateCreate,
// referential integrity (disableReferentialIntegrity), If-Match and
// If-None-Match, resource types of the store's FHIR version, ids, and the JSON
// types of elements, answered with an OperationOutcome. Stores with
// notificationConfigs publish a change notification per config for every
// create, update, patch and delete, through a real Pub/Sub client
// ([Options.PubSub] or PUBSUB_EMULATOR_HOST), before the write answers.
//
// All server timestamps come from a [Clock] and are strictly increasing across
// the emulator, so an export's createTime can be used as the next export's
// _since without ever missing an update. Exports run over a snapshot taken at
// the export call and progress on the clock ([Options.ExportDuration],
// [Options.ExportSteps]); with a [FakeClock] every answer is deterministic.
// Operation and server-assigned resource ids differ per emulator unless
// [Options.DeterministicIDs].
//
// Knobs inject failures ([Emulator.FailNext], [Emulator.FailRate]: before a
// request has any effect, or [AcceptedAnswerLost] after it took effect), force
// the outcome of exports ([Emulator.ForceOutcome], [Emulator.ForceNextOutcomes])
// and limit concurrently running exports per project
// ([Emulator.SetMaxRunningOperations]); [Emulator.Exports],
// [Emulator.PeakRunningOperations], [Emulator.Stats] and
// [Emulator.Notifications] report what happened. The same knobs are served as
// JSON under /emulator/v1/ ([AdminEndpoints]).
//
// [NewServer] starts an emulator on a loopback port for a test; [Start] does
// the same without the testing package (cmd/healthcare-emulator uses it).
package healthcaretest
