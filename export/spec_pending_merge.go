package export

import (
	"strings"
	"time"
)

// Stand-ins until the spec branch lands (fleet specs and timeouts).

func (s *Spec) isFleetSpec() bool { return strings.HasSuffix(s.FHIRStore, "/fhirStores/*") }

func (s *Spec) forStore(store string) *Spec {
	c := *s
	c.FHIRStore = store
	return &c
}

func (s *Spec) timeoutString() string { return "" }

func parseTimeout(v string) time.Duration {
	d, err := time.ParseDuration(v)
	if err != nil || d <= 0 {
		return 24 * time.Hour
	}
	return d
}
