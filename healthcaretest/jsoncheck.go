package healthcaretest

import (
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
)

// A small model of the ESF JSON parser in front of Google APIs: unknown
// fields and values of the wrong type are rejected with its messages, and
// both lowerCamel and snake_case field names are accepted.

type kind int

const (
	kString kind = iota
	kBool
	kInt64
	kInt32
	kEnum
	kObject
	kStringMap
	kAny
	kObjectList // a repeated message
)

type field struct {
	json     string // lowerCamelCase name
	kind     kind
	enumType string // proto enum type for messages
	enum     []string
	sub      []field
}

func snake(s string) string {
	var b strings.Builder
	for i, r := range s {
		if r >= 'A' && r <= 'Z' {
			if i > 0 {
				b.WriteByte('_')
			}
			b.WriteRune(r + 'a' - 'A')
			continue
		}
		b.WriteRune(r)
	}
	return b.String()
}

func parseBody(body []byte, fields []field) (map[string]any, *apiError) {
	if len(strings.TrimSpace(string(body))) == 0 {
		return map[string]any{}, nil
	}
	m, err := decodeJSONObject(body)
	if err != nil {
		return nil, invalidArg("Invalid JSON payload received. %v", err)
	}
	if aerr := checkFields(m, fields, ""); aerr != nil {
		return nil, aerr
	}
	return m, nil
}

// checkFields validates m against fields and renames snake_case keys to
// lowerCamelCase in place. Int64 values become decimal strings.
func checkFields(m map[string]any, fields []field, at string) *apiError {
	for _, key := range sortedKeys(m) {
		v := m[key]
		var f *field
		for i := range fields {
			if fields[i].json == key || snake(fields[i].json) == key {
				f = &fields[i]
				break
			}
		}
		if f == nil {
			where := ""
			if at != "" {
				where = fmt.Sprintf(" at '%s'", at)
			}
			return invalidArg("Invalid JSON payload received. Unknown name %q%s: Cannot find field.", key, where)
		}
		if key != f.json {
			delete(m, key)
			m[f.json] = v
		}
		path := snake(f.json)
		if at != "" {
			path = at + "." + path
		}
		if v == nil {
			delete(m, f.json)
			continue
		}
		bad := func(t string) *apiError {
			b, _ := json.Marshal(v)
			return invalidArg("Invalid value at '%s' (%s), %s", path, t, b)
		}
		switch f.kind {
		case kString:
			if _, ok := v.(string); !ok {
				return bad("TYPE_STRING")
			}
		case kBool:
			if _, ok := v.(bool); !ok {
				return bad("TYPE_BOOL")
			}
		case kInt64, kInt32:
			var s string
			switch x := v.(type) {
			case json.Number:
				s = x.String()
			case string:
				s = x
			default:
				return bad("TYPE_INT64")
			}
			bits := 64
			if f.kind == kInt32 {
				bits = 32
			}
			n, err := strconv.ParseInt(s, 10, bits)
			if err != nil {
				if f.kind == kInt32 {
					return bad("TYPE_INT32")
				}
				return bad("TYPE_INT64")
			}
			m[f.json] = strconv.FormatInt(n, 10)
		case kEnum:
			s, ok := v.(string)
			valid := false
			for _, e := range f.enum {
				valid = valid || (ok && e == s)
			}
			if !valid {
				return bad("type.googleapis.com/" + f.enumType)
			}
		case kObject:
			sub, ok := v.(map[string]any)
			if !ok {
				b, _ := json.Marshal(v)
				return invalidArg("Invalid JSON payload received. Unknown name %q at '%s': Proto field is not repeating, cannot start list.", string(b), path)
			}
			if aerr := checkFields(sub, f.sub, path); aerr != nil {
				return aerr
			}
		case kObjectList:
			list, ok := v.([]any)
			if !ok {
				b, _ := json.Marshal(v)
				return invalidArg("Invalid value at '%s' (type.googleapis.com/%s), %s", path, f.enumType, b)
			}
			for i, x := range list {
				sub, ok := x.(map[string]any)
				if !ok {
					b, _ := json.Marshal(x)
					return invalidArg("Invalid value at '%s[%d]' (type.googleapis.com/%s), %s", path, i, f.enumType, b)
				}
				if aerr := checkFields(sub, f.sub, fmt.Sprintf("%s[%d]", path, i)); aerr != nil {
					return aerr
				}
			}
		case kStringMap:
			sub, ok := v.(map[string]any)
			if !ok {
				return bad("TYPE_MESSAGE")
			}
			for k, x := range sub {
				if _, ok := x.(string); !ok {
					b, _ := json.Marshal(x)
					return invalidArg("Invalid value at '%s[%s]' (TYPE_STRING), %s", path, k, b)
				}
			}
		}
	}
	return nil
}

var exportRequestFields = []field{
	{json: "_since", kind: kString},
	{json: "_type", kind: kString},
	{json: "gcsDestination", kind: kObject, sub: []field{{json: "uriPrefix", kind: kString}}},
	{json: "bigqueryDestination", kind: kObject, sub: []field{
		{json: "datasetUri", kind: kString},
		{json: "force", kind: kBool},
		{json: "writeDisposition", kind: kEnum, enumType: "google.cloud.healthcare.v1.fhir.bigquery.WriteDisposition",
			enum: []string{"WRITE_DISPOSITION_UNSPECIFIED", "WRITE_EMPTY", "WRITE_TRUNCATE", "WRITE_APPEND"}},
		{json: "schemaConfig", kind: kObject, sub: []field{
			{json: "schemaType", kind: kEnum, enumType: "google.cloud.healthcare.v1.fhir.bigquery.SchemaConfig.SchemaType",
				enum: []string{"SCHEMA_TYPE_UNSPECIFIED", "ANALYTICS", "ANALYTICS_V2"}},
			{json: "recursiveStructureDepth", kind: kInt64},
			{json: "lastUpdatedPartitionConfig", kind: kObject, sub: []field{
				{json: "type", kind: kEnum, enumType: "google.cloud.healthcare.v1.fhir.bigquery.TimePartitioning.PartitionType",
					enum: []string{"PARTITION_TYPE_UNSPECIFIED", "HOUR", "DAY", "MONTH", "YEAR"}},
				{json: "expirationMs", kind: kInt64},
			}},
		}},
	}},
}

var datasetFields = []field{
	{json: "name", kind: kString},
	{json: "timeZone", kind: kString},
	{json: "encryptionSpec", kind: kObject, sub: []field{{json: "kmsKeyName", kind: kString}}},
	{json: "satisfiesPzi", kind: kBool},
	{json: "satisfiesPzs", kind: kBool},
}

var fhirStoreFields = []field{
	{json: "name", kind: kString},
	{json: "version", kind: kEnum, enumType: "google.cloud.healthcare.v1.fhir.FhirStore.Version",
		enum: []string{"VERSION_UNSPECIFIED", "DSTU2", "STU3", "R4", "R5"}},
	{json: "complexDataTypeReferenceParsing", kind: kEnum, enumType: "google.cloud.healthcare.v1.fhir.FhirStore.ComplexDataTypeReferenceParsing",
		enum: []string{"COMPLEX_DATA_TYPE_REFERENCE_PARSING_UNSPECIFIED", "DISABLED", "ENABLED"}},
	{json: "defaultSearchHandlingStrict", kind: kBool},
	{json: "disableReferentialIntegrity", kind: kBool},
	{json: "disableResourceVersioning", kind: kBool},
	{json: "enableUpdateCreate", kind: kBool},
	{json: "labels", kind: kStringMap},
	// Nested configurations the emulator accepts without interpreting them.
	{json: "bulkExportGcsDestination", kind: kAny},
	{json: "consentConfig", kind: kAny},
	{json: "notificationConfig", kind: kObject, sub: []field{{json: "pubsubTopic", kind: kString}, {json: "sendForBulkImport", kind: kBool}}},
	{json: "notificationConfigs", kind: kObjectList, enumType: "google.cloud.healthcare.v1.fhir.FhirNotificationConfig", sub: []field{
		{json: "pubsubTopic", kind: kString},
		{json: "sendFullResource", kind: kBool},
		{json: "sendPreviousResourceOnDelete", kind: kBool},
	}},
	{json: "streamConfigs", kind: kAny},
	{json: "validationConfig", kind: kAny},
}
