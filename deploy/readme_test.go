package deploy

import (
	"os"
	"os/exec"
	"path/filepath"
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

// shBlock matches the README's shell examples.
var shBlock = regexp.MustCompile("(?s)```sh\n(.*?)```")

// TestReadmeGcloudCommands runs every gcloud command the README shows against
// the real CLI, offline, to prove its flags exist and are spelled right.
func TestReadmeGcloudCommands(t *testing.T) {
	t.Parallel()
	gcloud, err := exec.LookPath("gcloud")
	if err != nil {
		t.Skip("gcloud is not installed; skipping the check of the README's gcloud commands")
	}
	if testing.Short() {
		t.Skip("-short")
	}
	readme, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	var n int
	for _, b := range shBlock.FindAllStringSubmatch(string(readme), -1) {
		// Join continued lines, then take each gcloud command.
		text := strings.ReplaceAll(b[1], "\\\n", " ")
		for _, line := range strings.Split(text, "\n") {
			line = strings.TrimSpace(line)
			if !strings.HasPrefix(line, "gcloud ") {
				continue
			}
			n++
			t.Run(strings.Join(strings.Fields(line)[1:4], " "), func(t *testing.T) {
				t.Parallel()
				checkGcloudParses(t, gcloud, root, line)
			})
		}
	}
	if n == 0 {
		t.Error("the README shows no gcloud command; this test has nothing to check")
	}
}
