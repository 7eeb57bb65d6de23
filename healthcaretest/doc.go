// Package healthcaretest is an in-process emulator of the Cloud Healthcare API
// v1 surface fhirexport uses, in the spirit of net/http/httptest and pstest.
//
// An [Emulator] is an [http.Handler] that answers the REST paths the real
// google.golang.org/api/healthcare/v1 client sends: datasets (create, get,
// list), FHIR stores (create, get, list, delete), the FHIR REST interactions
// create, update, read, delete and executeBundle (batch and transaction),
// fhirStores.export to Cloud Storage (through a real cloud.google.com/go/storage
// client, e.g. on fake-gcs-server) or to an in-memory BigQuery model, and the
// dataset operations get, list and cancel.
//
// All server timestamps come from a [Clock] and are strictly increasing across
// the emulator, so an export's createTime can be used as the next export's
// _since without ever missing an update. Exports run over a snapshot taken at
// the export call and progress on the clock ([Options.ExportDuration],
// [Options.ExportSteps]); with a [FakeClock] every answer is deterministic.
//
// Knobs inject failures before a request has any effect ([Emulator.FailNext],
// [Emulator.FailRate]), force the outcome of exports ([Emulator.ForceOutcome],
// [Emulator.ForceNextOutcomes]) and limit concurrently running exports per
// project ([Emulator.SetMaxRunningOperations]).
//
// [NewServer] starts an emulator on a loopback port for a test; [Start] does
// the same without the testing package (cmd/healthcare-emulator uses it).
package healthcaretest
