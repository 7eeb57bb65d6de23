package export

import (
	"strings"
	"testing"
)

func TestPolicy(t *testing.T) {
	t.Parallel()
	p, err := ParsePolicy(
		"projects/p-1234/locations/us/datasets/clinical/fhirStores/*, projects/p-1234/locations/us/datasets/*/fhirStores/shared",
		"gs://exports-ok/fhir/, gs://whole-bucket, bq://p-1234.analytics")
	if err != nil {
		t.Fatal(err)
	}
	stores := []struct {
		store string
		want  bool
	}{
		{"projects/p-1234/locations/us/datasets/clinical/fhirStores/ehr", true},
		{"projects/p-1234/locations/us/datasets/other/fhirStores/shared", true},
		{"projects/p-1234/locations/us/datasets/other/fhirStores/ehr", false},
		{"projects/p-1234/locations/us/datasets/Clinical/fhirStores/ehr", false},
		{"projects/p-1234/locations/us/datasets/clinical/fhirStores/", false},
		{"projects/p-1234/locations/us/datasets/clinical/fhirStores/ehr/x", false},
		{"projects/p-12345/locations/us/datasets/clinical/fhirStores/ehr", false},
		{"projects/p-1234/locations/us/datasets/clinical/fhirStores/ehr/", false},
	}
	for _, tc := range stores {
		if got := p.AllowStore(tc.store); got != tc.want {
			t.Errorf("AllowStore(%q) = %v, want %v", tc.store, got, tc.want)
		}
	}
	dests := []struct {
		dest string
		want bool
	}{
		{"gs://exports-ok/fhir", true},
		{"gs://exports-ok/fhir/", true},
		{"gs://exports-ok/fhir/ehr/2026-01-01", true},
		{"gs://exports-ok/fhir2/ehr", false},
		{"gs://exports-ok/FHIR/ehr", false},
		{"gs://exports-ok", false},
		{"gs://exports-ok-evil/fhir", false},
		{"gs://exports-o/fhir", false},
		{"gs://whole-bucket", true},
		{"gs://whole-bucket/any/path", true},
		{"gs://whole-bucket-2/any", false},
		{"bq://p-1234.analytics", true},
		{"bq://p-1234.analytics2", false},
		{"bq://p-1234.Analytics", false},
		{"bq://p-12345.analytics", false},
	}
	for _, tc := range dests {
		if got := p.AllowDestination(tc.dest); got != tc.want {
			t.Errorf("AllowDestination(%q) = %v, want %v", tc.dest, got, tc.want)
		}
	}
}

func TestPolicyDeniesByDefault(t *testing.T) {
	t.Parallel()
	var p Policy
	if p.AllowStore("projects/p-1234/locations/us/datasets/d/fhirStores/s") || p.AllowDestination("gs://b-1/x") {
		t.Error("the empty policy allowed something")
	}
}

func TestParsePolicyErrors(t *testing.T) {
	t.Parallel()
	tests := []struct{ stores, dests, want string }{
		{"projects/p/fhirStores/s", "", "FHIREXPORT_ALLOWED_STORES"},
		{"projects/p/locations/l/datasets/d*/fhirStores/s", "", "FHIREXPORT_ALLOWED_STORES"},
		{"projects/p/locations/l/datasets/../fhirStores/s", "", "FHIREXPORT_ALLOWED_STORES"},
		{"", "s3://bucket", "FHIREXPORT_ALLOWED_DESTINATIONS"},
		{"", "gs://Bad_Bucket", "FHIREXPORT_ALLOWED_DESTINATIONS"},
		{"", "gs://b-1/a/../b", "FHIREXPORT_ALLOWED_DESTINATIONS"},
		{"", "bq://project", "FHIREXPORT_ALLOWED_DESTINATIONS"},
	}
	for _, tc := range tests {
		_, err := ParsePolicy(tc.stores, tc.dests)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("ParsePolicy(%q, %q) = %v, want an error naming %s", tc.stores, tc.dests, err, tc.want)
		}
	}
}

func TestLoadConfig(t *testing.T) {
	t.Parallel()
	env := func(m map[string]string) func(string) (string, bool) {
		return func(k string) (string, bool) { v, ok := m[k]; return v, ok }
	}
	good := map[string]string{"FHIREXPORT_EVENTS_TOPIC": "projects/p-1234/topics/events", "FHIREXPORT_STATE": "gs://state-b/fx/"}
	c, err := LoadConfig(env(good))
	if err != nil {
		t.Fatal(err)
	}
	if c.StateBucket != "state-b" || c.StatePrefix != "fx" || c.EventsTopic != "projects/p-1234/topics/events" {
		t.Errorf("LoadConfig = %+v", c)
	}
	tests := []struct {
		name string
		set  map[string]string
		want string
	}{
		{"no topic", map[string]string{"FHIREXPORT_EVENTS_TOPIC": ""}, "FHIREXPORT_EVENTS_TOPIC is required"},
		{"bad topic", map[string]string{"FHIREXPORT_EVENTS_TOPIC": "events"}, "FHIREXPORT_EVENTS_TOPIC"},
		{"no state", map[string]string{"FHIREXPORT_STATE": ""}, "FHIREXPORT_STATE is required"},
		{"bad state", map[string]string{"FHIREXPORT_STATE": "/tmp/state"}, "FHIREXPORT_STATE"},
		{"bad endpoint", map[string]string{"FHIREXPORT_HEALTHCARE_ENDPOINT": "localhost:1"}, "FHIREXPORT_HEALTHCARE_ENDPOINT"},
		{"bad stores", map[string]string{"FHIREXPORT_ALLOWED_STORES": "*"}, "FHIREXPORT_ALLOWED_STORES"},
	}
	for _, tc := range tests {
		m := map[string]string{}
		for k, v := range good {
			m[k] = v
		}
		for k, v := range tc.set {
			m[k] = v
		}
		if _, err := LoadConfig(env(m)); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: LoadConfig error = %v, want it to contain %q", tc.name, err, tc.want)
		}
	}
}

// TestPolicyFleets checks that a fleet name is never allowed as a store, and
// that AllowFleet answers whether any store of a dataset could be.
func TestPolicyFleets(t *testing.T) {
	t.Parallel()
	p, err := ParsePolicy(
		"projects/p-1234/locations/us/datasets/clinical/fhirStores/*, projects/p-1234/locations/us/datasets/*/fhirStores/shared, projects/*/locations/*/datasets/*/fhirStores/*",
		"gs://exports-ok")
	if err != nil {
		t.Fatal(err)
	}
	narrow, err := ParsePolicy("projects/p-1234/locations/us/datasets/clinical/fhirStores/ehr", "gs://exports-ok")
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name   string
		policy Policy
		check  func(Policy, string) bool
		arg    string
		want   bool
	}{
		{"fleet name as a store, wide policy", p, Policy.AllowStore, "projects/p-1234/locations/us/datasets/clinical/fhirStores/*", false},
		{"fleet name as a store, any-store policy", p, Policy.AllowStore, "projects/x/locations/y/datasets/z/fhirStores/*", false},
		{"wildcard dataset as a store", p, Policy.AllowStore, "projects/x/locations/y/datasets/*/fhirStores/s", false},
		{"concrete store of the fleet", p, Policy.AllowStore, "projects/p-1234/locations/us/datasets/clinical/fhirStores/ehr", true},
		{"fleet of a listed dataset", p, Policy.AllowFleet, "projects/p-1234/locations/us/datasets/clinical", true},
		{"fleet of a dataset with one listed store", narrow, Policy.AllowFleet, "projects/p-1234/locations/us/datasets/clinical", true},
		{"fleet of another dataset", narrow, Policy.AllowFleet, "projects/p-1234/locations/us/datasets/other", false},
		{"fleet of a wildcard dataset", p, Policy.AllowFleet, "projects/p-1234/locations/us/datasets/*", false},
		{"fleet of a store name", p, Policy.AllowFleet, "projects/p-1234/locations/us/datasets/clinical/fhirStores/ehr", false},
		{"fleet of an empty dataset ID", p, Policy.AllowFleet, "projects/p-1234/locations/us/datasets/", false},
		{"fleet under the empty policy", Policy{}, Policy.AllowFleet, "projects/p-1234/locations/us/datasets/clinical", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if got := tc.check(tc.policy, tc.arg); got != tc.want {
				t.Errorf("%s: got %v, want %v", tc.arg, got, tc.want)
			}
		})
	}
}

// TestStartNeverAdmitsAFleetName drives Exporter.Start with fleet specs under
// a policy of "*" patterns: the fleet name must not reach fhirStores.export as
// if it were a store. (When Start expands fleets, each concrete store is
// admitted on its own; the fleet name itself still never is.)
func TestStartNeverAdmitsAFleetName(t *testing.T) {
	t.Parallel()
	g := newGate(t, "projects/*/locations/*/datasets/*/fhirStores/*", secDests)
	tests := []struct {
		name, spec string
	}{
		{"gcs", `{"fhirStore":"projects/p-1234/locations/us/datasets/clinical/fhirStores/*","gcsDestination":{"uriPrefix":"gs://allowed-bucket/exports/{store}"}}`},
		{"bigquery", `{"fhirStore":"projects/p-1234/locations/us/datasets/clinical/fhirStores/*","bigqueryDestination":{"datasetUri":"bq://p-1234.ds",` +
			`"schemaConfig":{"schemaType":"ANALYTICS_V2"},"writeDisposition":"WRITE_APPEND"}}`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if _, err := ParseSpec([]byte(tc.spec)); err != nil {
				t.Fatalf("the fleet spec itself must be valid: %v", err)
			}
			if g.admits(t, []byte(tc.spec)) {
				t.Errorf("Start admitted the fleet name as a store: %s", tc.spec)
			}
		})
	}
	// The same gate admits a concrete store, so the test can tell the two apart.
	if !g.admits(t, []byte(`{"fhirStore":"projects/p-1234/locations/us/datasets/clinical/fhirStores/ehr","gcsDestination":{"uriPrefix":"gs://allowed-bucket/exports/{store}"}}`)) {
		t.Error("the gate refused a concrete store its policy allows")
	}
}
