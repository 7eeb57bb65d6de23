package healthcaretest

import (
	"encoding/json"
	"sort"
	"strings"
)

// The rules a FHIR store keeps on every write: resource validation,
// preconditions and referential integrity.

// elementKind is the JSON type of a FHIR element.
type elementKind byte

const (
	elString elementKind = 's'
	elBool   elementKind = 'b'
	elNumber elementKind = 'n'
	elObject elementKind = 'o'
	elArray  elementKind = 'a'
)

// parseElements reads "name:kind name:kind ...".
func parseElements(spec string) map[string]elementKind {
	out := map[string]elementKind{}
	for _, f := range strings.Fields(spec) {
		name, kind, _ := strings.Cut(f, ":")
		out[name] = elementKind(kind[0])
	}
	return out
}

// resourceElements are the elements every resource may carry (Resource and
// DomainResource).
var resourceElements = parseElements(`resourceType:s id:s meta:o implicitRules:s language:s text:o contained:a
extension:a modifierExtension:a`)

// r4Elements are the top-level elements of the R4 resources the synthetic
// generator writes (hl7.org/fhir/R4/{patient,encounter,observation,condition}.html).
// Other resource types are checked only for the common elements' types.
var r4Elements = map[string]map[string]elementKind{
	"Patient": parseElements(`identifier:a active:b name:a telecom:a gender:s birthDate:s deceasedBoolean:b
deceasedDateTime:s address:a maritalStatus:o multipleBirthBoolean:b multipleBirthInteger:n photo:a contact:a
communication:a generalPractitioner:a managingOrganization:o link:a`),
	"Encounter": parseElements(`identifier:a status:s statusHistory:a class:o classHistory:a type:a serviceType:o
priority:o subject:o episodeOfCare:a basedOn:a participant:a appointment:a period:o length:o reasonCode:a
reasonReference:a diagnosis:a account:a hospitalization:o location:a serviceProvider:o partOf:o`),
	"Observation": parseElements(`identifier:a basedOn:a partOf:a status:s category:a code:o subject:o focus:a
encounter:o effectiveDateTime:s effectivePeriod:o effectiveTiming:o effectiveInstant:s issued:s performer:a
valueQuantity:o valueCodeableConcept:o valueString:s valueBoolean:b valueInteger:n valueRange:o valueRatio:o
valueSampledData:o valueTime:s valueDateTime:s valuePeriod:o dataAbsentReason:o interpretation:a note:a bodySite:o
method:o specimen:o device:o referenceRange:a hasMember:a derivedFrom:a component:a`),
	"Condition": parseElements(`identifier:a clinicalStatus:o verificationStatus:o category:a severity:o code:o
bodySite:a subject:o encounter:o onsetDateTime:s onsetAge:o onsetPeriod:o onsetRange:o onsetString:s
abatementDateTime:s abatementAge:o abatementPeriod:o abatementRange:o abatementString:s recordedDate:s recorder:o
asserter:o stage:a evidence:a note:a`),
}

func jsonKind(v any) elementKind {
	switch v.(type) {
	case string:
		return elString
	case bool:
		return elBool
	case json.Number, float64:
		return elNumber
	case map[string]any:
		return elObject
	case []any:
		return elArray
	}
	return 0
}

var kindNames = map[elementKind]string{elString: "a string", elBool: "a boolean", elNumber: "a number", elObject: "an object", elArray: "an array"}

// validateResource checks m as the resource typ/id of the store's FHIR
// version: type and id, the JSON types of the elements it knows, and, for the
// resource types with a schema, unknown top-level elements.
func validateResource(st *fhirStore, typ, id string, m map[string]any) *fhirError {
	got, ok := m["resourceType"].(string)
	if !ok || got == "" {
		return fhirErr(400, "required", "resourceType: required field missing")
	}
	if !resourceTypes[st.version][got] {
		return fhirErr(400, "value", "resourceType: unknown resource type %q for FHIR version %s", got, st.version)
	}
	if typ != got {
		return fhirErr(400, "value", "resourceType: %q does not match the resource type %q of the request", got, typ)
	}
	if !fhirIDRE.MatchString(id) {
		return fhirErr(400, "value", "id: invalid resource id %q: want 1-64 letters, digits, '-' or '.'", id)
	}
	if rid, ok := m["id"].(string); ok && rid != id {
		return fhirErr(400, "value", "id: resource id %q does not match the id %q of the request", rid, id)
	}
	var schema map[string]elementKind
	if st.version == "R4" {
		schema = r4Elements[typ]
	}
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		v := m[k]
		base, primitiveExt := strings.CutPrefix(k, "_")
		want, known := resourceElements[base]
		if !known && schema != nil {
			want, known = schema[base]
		}
		if !known {
			if schema != nil {
				return fhirErr(400, "structure", "%s: unknown field %q", typ, k)
			}
			continue
		}
		if primitiveExt {
			// The extensions of a primitive element: an object, or an array
			// of them for a repeating element.
			if got := jsonKind(v); got != elObject && got != elArray {
				return fhirErr(400, "structure", "%s.%s: want an object", typ, k)
			}
			continue
		}
		if got := jsonKind(v); got != want {
			return fhirErr(400, "structure", "%s.%s: want %s, got %s", typ, k, kindNames[want], jsonText(v))
		}
	}
	return nil
}

func jsonText(v any) string {
	b, _ := json.Marshal(v)
	if len(b) > 40 {
		return string(b[:40]) + "..."
	}
	return string(b)
}

// etagVersion extracts the version of an ETag such as W/"v" or "v".
func etagVersion(tag string) string {
	tag = strings.TrimSpace(tag)
	tag = strings.TrimPrefix(tag, "W/")
	return strings.Trim(tag, `"`)
}

// checkPreconditions applies If-Match (the current version must be the one
// given) and If-None-Match ("*": the resource must not exist; a version: the
// current version must differ), answering 412 Precondition Failed as the
// HTTP and FHIR specifications say.
func checkPreconditions(r *resource, live bool, ifMatch, ifNoneMatch string) *fhirError {
	if ifMatch != "" {
		if !live {
			return fhirErr(412, "conflict", "If-Match %s: the resource does not exist", ifMatch)
		}
		if v := etagVersion(ifMatch); v != r.versionID {
			return fhirErr(412, "conflict", "If-Match %s: the current version is %q", ifMatch, r.versionID)
		}
	}
	if ifNoneMatch != "" && live {
		if strings.TrimSpace(ifNoneMatch) == "*" || etagVersion(ifNoneMatch) == r.versionID {
			return fhirErr(412, "conflict", "If-None-Match %s: the resource exists with version %q", ifNoneMatch, r.versionID)
		}
	}
	return nil
}

// references returns the relative references (Type/id, Type/id/_history/v)
// in v as Type/id, skipping extensions unless withExtensions. Contained
// (#id), urn: and absolute references are not checked, as on the service.
func references(version string, v any, withExtensions bool) []string {
	var out []string
	var walk func(v any)
	walk = func(v any) {
		switch x := v.(type) {
		case map[string]any:
			for k, c := range x {
				if !withExtensions && (k == "extension" || k == "modifierExtension") {
					continue
				}
				if s, ok := c.(string); ok && k == "reference" {
					parts := strings.Split(s, "/")
					if (len(parts) == 2 || (len(parts) == 4 && parts[2] == "_history")) && resourceTypes[version][parts[0]] {
						out = append(out, parts[0]+"/"+parts[1])
					}
					continue
				}
				walk(c)
			}
		case []any:
			for _, c := range x {
				walk(c)
			}
		}
	}
	walk(v)
	sort.Strings(out)
	return out
}

// checkReferences rejects m when it references a resource of the store that
// does not exist; pending holds the keys a transaction creates (true) or
// deletes (false). "When creating, updating, or patching a resource, the
// operation will fail if the resulting content of the resource contains a
// reference to a resource or resource version that does not exist."
// https://cloud.google.com/healthcare-api/docs/concepts/fhir-referential-integrity
func checkReferences(st *fhirStore, m map[string]any, pending map[string]bool) *fhirError {
	self := ""
	if t, ok := m["resourceType"].(string); ok {
		id, _ := m["id"].(string)
		self = t + "/" + id
	}
	for _, ref := range references(st.version, m, st.extensionRefs) {
		if ref == self {
			continue
		}
		if exists, ok := pending[ref]; ok {
			if exists {
				continue
			}
		} else if r := st.res[ref]; r != nil && !r.deleted {
			continue
		}
		return fhirErr(400, "invalid", "%s: referential integrity: the reference %q points to a resource that does not exist in the FHIR store", self, ref)
	}
	return nil
}

// referrer returns a live resource of the store (other than key itself and
// the keys in ignore) that references key, or "".
func referrer(st *fhirStore, key string, ignore map[string]bool) string {
	for _, r := range st.order {
		k := r.typ + "/" + r.id
		if r.deleted || k == key || ignore[k] {
			continue
		}
		for _, ref := range r.refs(st) {
			if ref == key {
				return k
			}
		}
	}
	return ""
}

// refs returns the references of the resource's current version, parsed
// once per version.
func (r *resource) refs(st *fhirStore) []string {
	if r.refsOf != r.versionID {
		var m map[string]any
		json.Unmarshal(r.data, &m)
		r.refList, r.refsOf = references(st.version, m, st.extensionRefs), r.versionID
	}
	return r.refList
}
