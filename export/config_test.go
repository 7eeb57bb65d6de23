package export

import (
	"strings"
	"testing"
)

// TestLoadConfigTopic covers the events topic name, checked by hand since
// issue 13 (TestNameChecksMatchRegexps compares it with the old pattern).
func TestLoadConfigTopic(t *testing.T) {
	t.Parallel()
	tests := []struct {
		topic string
		ok    bool
	}{
		{"projects/p-1234/topics/events", true},
		{"projects/example.com:p-1/topics/fx.events_~%+-", true},
		{"projects/p-1234/topics/abc", true},
		{"projects/p-1234/topics/ab", false},
		{"projects/p-1234/topics/1events", false},
		{"projects/p-1234/topics/events/x", false},
		{"projects/P/topics/events", false},
		{"projects/p-1234/subscriptions/events", false},
		{"projects/p-1234/topics/" + strings.Repeat("e", 256), false},
		{"projects/p-1234/topics/ev\u202eents", false},
	}
	for _, tc := range tests {
		t.Run(tc.topic, func(t *testing.T) {
			t.Parallel()
			env := map[string]string{"FHIREXPORT_EVENTS_TOPIC": tc.topic, "FHIREXPORT_STATE": "gs://state-b/fx"}
			_, err := LoadConfig(func(k string) (string, bool) { v, ok := env[k]; return v, ok })
			if tc.ok && err != nil {
				t.Fatalf("LoadConfig rejected topic %q: %v", tc.topic, err)
			}
			if !tc.ok && (err == nil || !strings.Contains(err.Error(), "FHIREXPORT_EVENTS_TOPIC")) {
				t.Fatalf("LoadConfig(topic %q) error = %v, want one naming FHIREXPORT_EVENTS_TOPIC", tc.topic, err)
			}
		})
	}
}
