package healthcaretest

import (
	"bytes"
	"encoding/json"
	"net/http"
	"strconv"
	"strings"
)

// Mutable fields per resource for the patch methods. The discovery document
// marks FhirStore.version, disableReferentialIntegrity and
// disableResourceVersioning "Immutable"; Dataset.name and encryptionSpec
// cannot change either (satisfiesPz* are output only).
var (
	storeMutable = map[string]bool{
		"labels": true, "notificationConfigs": true, "notificationConfig": true, "enableUpdateCreate": true,
		"defaultSearchHandlingStrict": true, "complexDataTypeReferenceParsing": true, "streamConfigs": true,
		"validationConfig": true, "consentConfig": true, "bulkExportGcsDestination": true,
	}
	datasetMutable = map[string]bool{"timeZone": true}
)

// updateMask parses a FieldMask of top-level fields (lowerCamel or
// snake_case) against fields, answering the error itself.
func updateMask(w http.ResponseWriter, c *call, fields []field, mutable map[string]bool) ([]string, bool) {
	raw := c.query.Get("updateMask")
	if raw == "" {
		writeAPIError(w, invalidArg("updateMask is required"))
		return nil, false
	}
	var out []string
	for _, p := range strings.Split(raw, ",") {
		p = strings.TrimSpace(p)
		top, sub, nested := strings.Cut(p, ".")
		var name string
		for _, f := range fields {
			if f.json == top || snake(f.json) == top {
				name = f.json
				if nested {
					name += "." + sub
				}
			}
		}
		switch {
		case name == "":
			writeAPIError(w, invalidArg("invalid updateMask %q: unknown field %q", raw, p))
			return nil, false
		case !mutable[strings.Split(name, ".")[0]]:
			writeAPIError(w, invalidArg("invalid updateMask %q: field %q cannot be updated", raw, p))
			return nil, false
		}
		out = append(out, name)
	}
	return out, true
}

func handleStoresPatch(e *Emulator, w http.ResponseWriter, r *http.Request, c *call) {
	m, aerr := parseBody(c.body, fhirStoreFields)
	if aerr != nil {
		writeAPIError(w, aerr)
		return
	}
	mask, ok := updateMask(w, c, fhirStoreFields, storeMutable)
	if !ok {
		return
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	st := e.stores[c.names.store]
	if st == nil {
		writeAPIError(w, notFound("FHIR store %q not found", c.names.store))
		return
	}
	next := map[string]any{}
	for k, v := range st.config {
		next[k] = v
	}
	// FieldMask semantics: a masked field absent from the body is cleared.
	// gcloud masks nested fields, e.g. notificationConfig.pubsubTopic.
	for _, f := range mask {
		applyMaskPath(next, m, strings.Split(f, "."))
	}
	old := st.config
	st.config = next
	if aerr := st.applyConfig(); aerr != nil {
		st.config = old
		st.applyConfig()
		writeAPIError(w, aerr)
		return
	}
	writeJSON(w, 200, st.config)
}

func handleDatasetsPatch(e *Emulator, w http.ResponseWriter, r *http.Request, c *call) {
	m, aerr := parseBody(c.body, datasetFields)
	if aerr != nil {
		writeAPIError(w, aerr)
		return
	}
	if _, ok := updateMask(w, c, datasetFields, datasetMutable); !ok {
		return
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	d := e.datasetOrNotFound(w, c.names.dataset)
	if d == nil {
		return
	}
	d.timeZone, _ = m["timeZone"].(string)
	writeJSON(w, 200, datasetJSON(d))
}

// applyJSONPatch applies an RFC 6902 JSON Patch (add, remove, replace, test,
// move, copy) to a stored resource and returns the result.
func applyJSONPatch(doc, patch []byte) (map[string]any, *fhirError) {
	var ops []struct {
		Op    string          `json:"op"`
		Path  string          `json:"path"`
		From  string          `json:"from"`
		Value json.RawMessage `json:"value"`
	}
	if err := json.Unmarshal(patch, &ops); err != nil {
		return nil, fhirErr(400, "structure", "invalid JSON Patch: %v", err)
	}
	// json.Number throughout, so numbers keep their text (1.50 stays 1.50).
	var root any
	if err := decodeNumbers(doc, &root); err != nil {
		return nil, fhirErr(500, "exception", "stored resource: %v", err)
	}
	for i, op := range ops {
		var val any
		if len(op.Value) > 0 {
			if err := decodeNumbers(op.Value, &val); err != nil {
				return nil, fhirErr(400, "structure", "JSON Patch operation %d: invalid value: %v", i, err)
			}
		}
		var err string
		switch op.Op {
		case "add":
			root, err = pointerSet(root, op.Path, val, true)
		case "replace":
			if _, err = pointerGet(root, op.Path); err == "" {
				root, err = pointerSet(root, op.Path, val, false)
			}
		case "remove":
			root, err = pointerRemove(root, op.Path)
		case "test":
			var got any
			if got, err = pointerGet(root, op.Path); err == "" {
				a, _ := json.Marshal(got)
				b, _ := json.Marshal(val)
				if string(a) != string(b) {
					return nil, fhirErr(422, "processing", "JSON Patch operation %d: test failed at %q", i, op.Path)
				}
			}
		case "move", "copy":
			var v any
			if v, err = pointerGet(root, op.From); err == "" {
				if op.Op == "move" {
					root, err = pointerRemove(root, op.From)
				} else {
					v = deepCopy(v) // the copy must not share maps or slices with its source
				}
				if err == "" {
					root, err = pointerSet(root, op.Path, v, true)
				}
			}
		default:
			err = "unknown op " + strconv.Quote(op.Op)
		}
		if err != "" {
			return nil, fhirErr(400, "processing", "JSON Patch operation %d (%s %s): %s", i, op.Op, op.Path, err)
		}
	}
	m, ok := root.(map[string]any)
	if !ok {
		return nil, fhirErr(400, "processing", "JSON Patch: the result is not a resource")
	}
	return m, nil
}

// decodeNumbers unmarshals JSON keeping numbers as json.Number.
func decodeNumbers(b []byte, v any) error {
	d := json.NewDecoder(bytes.NewReader(b))
	d.UseNumber()
	return d.Decode(v)
}

// deepCopy copies decoded JSON (maps, slices and scalars).
func deepCopy(v any) any {
	switch t := v.(type) {
	case map[string]any:
		c := make(map[string]any, len(t))
		for k, e := range t {
			c[k] = deepCopy(e)
		}
		return c
	case []any:
		c := make([]any, len(t))
		for i, e := range t {
			c[i] = deepCopy(e)
		}
		return c
	}
	return v
}

func pointerTokens(p string) ([]string, string) {
	if p == "" {
		return nil, ""
	}
	if !strings.HasPrefix(p, "/") {
		return nil, "invalid JSON pointer " + strconv.Quote(p)
	}
	toks := strings.Split(p[1:], "/")
	for i, t := range toks {
		toks[i] = strings.ReplaceAll(strings.ReplaceAll(t, "~1", "/"), "~0", "~")
	}
	return toks, ""
}

func pointerGet(root any, p string) (any, string) {
	toks, err := pointerTokens(p)
	if err != "" {
		return nil, err
	}
	cur := root
	for _, t := range toks {
		switch x := cur.(type) {
		case map[string]any:
			v, ok := x[t]
			if !ok {
				return nil, "no element at " + strconv.Quote(p)
			}
			cur = v
		case []any:
			i, aerr := strconv.Atoi(t)
			if aerr != nil || i < 0 || i >= len(x) {
				return nil, "no element at " + strconv.Quote(p)
			}
			cur = x[i]
		default:
			return nil, "no element at " + strconv.Quote(p)
		}
	}
	return cur, ""
}

// pointerSet sets (insert: adds, inserting into arrays) the value at p and
// returns the new root.
func pointerSet(root any, p string, val any, insert bool) (any, string) {
	toks, err := pointerTokens(p)
	if err != "" {
		return root, err
	}
	if len(toks) == 0 {
		return val, ""
	}
	parent, err := pointerGet(root, "/"+strings.Join(escape(toks[:len(toks)-1]), "/"))
	if len(toks) == 1 {
		parent, err = root, ""
	}
	if err != "" {
		return root, err
	}
	last := toks[len(toks)-1]
	switch x := parent.(type) {
	case map[string]any:
		x[last] = val
	case []any:
		i := len(x)
		if last != "-" {
			var aerr error
			if i, aerr = strconv.Atoi(last); aerr != nil || i < 0 || i > len(x) || (!insert && i == len(x)) {
				return root, "invalid array index in " + strconv.Quote(p)
			}
		}
		if !insert {
			x[i] = val
			return root, ""
		}
		grown := append(x[:i:i], append([]any{val}, x[i:]...)...)
		return pointerSet(root, "/"+strings.Join(escape(toks[:len(toks)-1]), "/"), grown, false)
	default:
		return root, "no container at " + strconv.Quote(p)
	}
	return root, ""
}

func pointerRemove(root any, p string) (any, string) {
	toks, err := pointerTokens(p)
	if err != "" || len(toks) == 0 {
		return root, "cannot remove " + strconv.Quote(p)
	}
	if _, err := pointerGet(root, p); err != "" {
		return root, err
	}
	parentPath := "/" + strings.Join(escape(toks[:len(toks)-1]), "/")
	parent := root
	if len(toks) > 1 {
		parent, _ = pointerGet(root, parentPath)
	}
	last := toks[len(toks)-1]
	switch x := parent.(type) {
	case map[string]any:
		delete(x, last)
	case []any:
		i, _ := strconv.Atoi(last)
		shrunk := append(x[:i:i], x[i+1:]...)
		if len(toks) == 1 {
			return shrunk, ""
		}
		return pointerSet(root, parentPath, shrunk, false)
	}
	return root, ""
}

func escape(toks []string) []string {
	out := make([]string, len(toks))
	for i, t := range toks {
		out[i] = strings.ReplaceAll(strings.ReplaceAll(t, "~", "~0"), "/", "~1")
	}
	return out
}

// applyMaskPath copies the field at path from src into dst, or clears it in
// dst when src lacks it, copying the objects on the way so dst shares nothing
// with the stored configuration it was cloned from.
func applyMaskPath(dst, src map[string]any, path []string) {
	k := path[0]
	if len(path) == 1 {
		if v, ok := src[k]; ok {
			dst[k] = v
		} else {
			delete(dst, k)
		}
		return
	}
	subSrc, _ := src[k].(map[string]any)
	if subSrc == nil {
		subSrc = map[string]any{}
	}
	subDst := map[string]any{}
	if old, ok := dst[k].(map[string]any); ok {
		for kk, v := range old {
			subDst[kk] = v
		}
	}
	applyMaskPath(subDst, subSrc, path[1:])
	if len(subDst) == 0 {
		delete(dst, k)
	} else {
		dst[k] = subDst
	}
}
