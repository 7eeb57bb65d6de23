package healthcaretest

import (
	"encoding/json"
	"fmt"
	"net/http"
)

// gRPC canonical codes used in operation errors and error bodies.
const (
	codeOK                 = 0
	codeCancelled          = 1
	codeUnknown            = 2
	codeInvalidArgument    = 3
	codeDeadlineExceeded   = 4
	codeNotFound           = 5
	codeAlreadyExists      = 6
	codePermissionDenied   = 7
	codeResourceExhausted  = 8
	codeFailedPrecondition = 9
	codeAborted            = 10
	codeOutOfRange         = 11
	codeUnimplemented      = 12
	codeInternal           = 13
	codeUnavailable        = 14
	codeDataLoss           = 15
	codeUnauthenticated    = 16
)

var codeNames = map[int32]string{
	0: "OK", 1: "CANCELLED", 2: "UNKNOWN", 3: "INVALID_ARGUMENT", 4: "DEADLINE_EXCEEDED",
	5: "NOT_FOUND", 6: "ALREADY_EXISTS", 7: "PERMISSION_DENIED", 8: "RESOURCE_EXHAUSTED",
	9: "FAILED_PRECONDITION", 10: "ABORTED", 11: "OUT_OF_RANGE", 12: "UNIMPLEMENTED",
	13: "INTERNAL", 14: "UNAVAILABLE", 15: "DATA_LOSS", 16: "UNAUTHENTICATED",
}

var codeHTTP = map[int32]int{
	0: 200, 1: 499, 2: 500, 3: 400, 4: 504, 5: 404, 6: 409, 7: 403, 8: 429,
	9: 400, 10: 409, 11: 400, 12: 501, 13: 500, 14: 503, 15: 500, 16: 401,
}

// httpToCode maps the HTTP status of an injected failure to a gRPC code.
func httpToCode(status int) int32 {
	switch status {
	case 400:
		return codeInvalidArgument
	case 401:
		return codeUnauthenticated
	case 403:
		return codePermissionDenied
	case 404:
		return codeNotFound
	case 409:
		return codeAborted
	case 429:
		return codeResourceExhausted
	case 501:
		return codeUnimplemented
	case 503:
		return codeUnavailable
	case 504:
		return codeDeadlineExceeded
	}
	return codeInternal
}

// apiError is a synchronous error in the Google API error model.
type apiError struct {
	code    int32 // gRPC code
	message string
}

func (e *apiError) Error() string { return fmt.Sprintf("%s: %s", codeNames[e.code], e.message) }

func errorf(code int32, format string, args ...any) *apiError {
	return &apiError{code: code, message: fmt.Sprintf(format, args...)}
}

func invalidArg(format string, args ...any) *apiError {
	return errorf(codeInvalidArgument, format, args...)
}

func notFound(format string, args ...any) *apiError {
	return errorf(codeNotFound, format, args...)
}

// writeAPIError writes {"error":{"code","message","status"}} with the HTTP
// status that corresponds to the gRPC code.
func writeAPIError(w http.ResponseWriter, err *apiError) {
	status := codeHTTP[err.code]
	if status == 0 {
		status = 500
	}
	writeJSON(w, status, map[string]any{"error": map[string]any{
		"code":    status,
		"message": err.message,
		"status":  codeNames[err.code],
	}})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		status = 500
		b = []byte(`{"error":{"code":500,"message":"internal error encoding response","status":"INTERNAL"}}`)
	}
	w.Header().Set("Content-Type", "application/json; charset=UTF-8")
	w.WriteHeader(status)
	w.Write(b)
}

// operationOutcome builds a FHIR OperationOutcome with one issue.
func operationOutcome(severity, code, diagnostics string) map[string]any {
	return map[string]any{
		"resourceType": "OperationOutcome",
		"issue": []any{map[string]any{
			"severity":    severity,
			"code":        code,
			"diagnostics": diagnostics,
		}},
	}
}

func writeFHIR(w http.ResponseWriter, status int, body []byte) {
	w.Header().Set("Content-Type", "application/fhir+json; charset=utf-8")
	w.WriteHeader(status)
	w.Write(body)
}

func writeOutcome(w http.ResponseWriter, status int, code, diagnostics string) {
	b, _ := json.Marshal(operationOutcome("error", code, diagnostics))
	writeFHIR(w, status, b)
}

// fhirError is an error of a FHIR interaction, answered as an OperationOutcome.
type fhirError struct {
	status int    // HTTP status
	code   string // OperationOutcome issue code
	msg    string
}

func (e *fhirError) Error() string { return e.msg }

func fhirErr(status int, code, format string, args ...any) *fhirError {
	return &fhirError{status: status, code: code, msg: fmt.Sprintf(format, args...)}
}
