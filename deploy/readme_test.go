package deploy

import (
	"os"
	"regexp"
	"strings"
	"testing"

	"github.com/santhosh-tekuri/jsonschema/v6"

	"github.com/fhirexport/fhirexport/export"
)

// readmeBlock matches the README's tagged JSON examples: ```json spec and
// ```json event:TYPE.
var readmeBlock = regexp.MustCompile("(?s)```json (spec|event:[a-z]+)\n(.*?)```")

// TestReadmeExamples validates every spec and event example in the README
// against its JSON Schema, and every spec against the function's own parser.
func TestReadmeExamples(t *testing.T) {
	t.Parallel()
	readme, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	schemas := compileSchemas(t)
	blocks := readmeBlock.FindAllStringSubmatch(string(readme), -1)
	kinds := map[string]int{}
	for _, b := range blocks {
		kind, body := b[1], b[2]
		kinds[kind]++
		schema := "spec.schema.json"
		if typ, ok := strings.CutPrefix(kind, "event:"); ok {
			schema = typ + ".schema.json"
		}
		s := schemas[schema]
		if s == nil {
			t.Errorf("README example %q: no schema %s", kind, schema)
			continue
		}
		v, err := jsonschema.UnmarshalJSON(strings.NewReader(body))
		if err != nil {
			t.Errorf("README %s example is not JSON: %v\n%s", kind, err, body)
			continue
		}
		if err := s.Validate(v); err != nil {
			t.Errorf("README %s example does not match %s: %v\n%s", kind, schema, err, body)
		}
		if kind == "spec" {
			if _, err := export.ParseSpec([]byte(body)); err != nil {
				t.Errorf("README spec example is refused by the function: %v\n%s", err, body)
			}
		}
	}
	for _, want := range []string{"spec", "event:started", "event:succeeded", "event:partial", "event:failed", "event:rejected"} {
		if kinds[want] == 0 {
			t.Errorf("README has no %s example", want)
		}
	}
}
