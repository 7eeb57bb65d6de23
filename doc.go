// Package fhirexport holds the Cloud Run functions StartExport and PollExport,
// which export Cloud Healthcare API FHIR stores on request and report what became
// of each export as a CloudEvent.
package fhirexport
