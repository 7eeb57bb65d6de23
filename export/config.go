package export

import (
	"fmt"
	"net/url"
	"strconv"
	"strings"
)

// Config is the function's configuration, loaded and validated once per
// instance from the environment.
type Config struct {
	EventsTopic        string // projects/P/topics/T
	StateBucket        string
	StatePrefix        string // "" or a path without leading or trailing slash
	Policy             Policy
	HealthcareEndpoint string // "" for the real service
	PubSubEmulatorHost string
	StorageEmulator    string
	MaxRunning         int // FHIREXPORT_MAX_RUNNING: exports running at once (default 5)
	PollWorkers        int // FHIREXPORT_POLL_WORKERS: concurrent operations.get in a sweep (default 16)
}

// validTopic reports whether s is projects/PROJECT/topics/TOPIC, the topic ID
// [A-Za-z][A-Za-z0-9._~%+-]{2,254}. Checked by hand, like the spec's names,
// to keep regular expressions out of the cold start.
func validTopic(s string) bool {
	segs := strings.Split(s, "/")
	if len(segs) != 4 || segs[0] != "projects" || segs[2] != "topics" || !validProjectID(segs[1]) {
		return false
	}
	t := segs[3]
	return len(t) >= 3 && len(t) <= 255 && isLetter(t[0]) &&
		every(t, func(c byte) bool { return isLetter(c) || isDigit(c) || strings.IndexByte("._~%+-", c) >= 0 })
}

// LoadConfig reads the FHIREXPORT_* variables (and the client libraries'
// emulator switches) through lookup, so tests need not touch the process
// environment. Every error names the variable.
func LoadConfig(lookup func(string) (string, bool)) (Config, error) {
	get := func(k string) string { v, _ := lookup(k); return strings.TrimSpace(v) }
	var c Config
	c.EventsTopic = get("FHIREXPORT_EVENTS_TOPIC")
	switch {
	case c.EventsTopic == "":
		return Config{}, fmt.Errorf("FHIREXPORT_EVENTS_TOPIC is required: the Pub/Sub topic for outcome events, as projects/PROJECT/topics/TOPIC")
	case !validTopic(c.EventsTopic):
		return Config{}, fmt.Errorf("FHIREXPORT_EVENTS_TOPIC: %q is not a topic name; accepted: projects/PROJECT/topics/TOPIC", c.EventsTopic)
	}
	state := get("FHIREXPORT_STATE")
	if state == "" {
		return Config{}, fmt.Errorf("FHIREXPORT_STATE is required: where run state is kept, as gs://BUCKET/PREFIX")
	}
	var err error
	if c.StateBucket, c.StatePrefix, err = ParseStateLocation(state); err != nil {
		return Config{}, fmt.Errorf("FHIREXPORT_STATE: %w", err)
	}
	if c.Policy, err = ParsePolicy(get("FHIREXPORT_ALLOWED_STORES"), get("FHIREXPORT_ALLOWED_DESTINATIONS")); err != nil {
		return Config{}, err
	}
	if ep := get("FHIREXPORT_HEALTHCARE_ENDPOINT"); ep != "" {
		u, err := url.Parse(ep)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return Config{}, fmt.Errorf("FHIREXPORT_HEALTHCARE_ENDPOINT: %q is not a base URL; accepted: http://HOST:PORT of an emulator or https://… ", ep)
		}
		c.HealthcareEndpoint = ep
	}
	if c.MaxRunning, err = positiveInt(get("FHIREXPORT_MAX_RUNNING"), "FHIREXPORT_MAX_RUNNING", DefaultMaxRunning, 1000,
		"the number of exports that may run at once for this deployment"); err != nil {
		return Config{}, err
	}
	if c.PollWorkers, err = positiveInt(get("FHIREXPORT_POLL_WORKERS"), "FHIREXPORT_POLL_WORKERS", 16, 256,
		"the number of operations.get calls a sweep makes at once"); err != nil {
		return Config{}, err
	}
	c.PubSubEmulatorHost = get("PUBSUB_EMULATOR_HOST")
	c.StorageEmulator = get("STORAGE_EMULATOR_HOST")
	return c, nil
}

// ParseStateLocation splits a state location gs://BUCKET[/PREFIX] into the
// bucket and a prefix without leading or trailing slashes.
func ParseStateLocation(v string) (bucket, prefix string, err error) {
	rest, ok := strings.CutPrefix(v, "gs://")
	bucket, prefix, _ = strings.Cut(rest, "/")
	prefix = strings.Trim(prefix, "/")
	if !ok || !validBucket(bucket) || strings.Contains(prefix, "//") {
		return "", "", fmt.Errorf("%q is not a Cloud Storage location; accepted: gs://BUCKET or gs://BUCKET/PREFIX", v)
	}
	return bucket, prefix, nil
}

// positiveInt reads a whole number in [1, most], def when v is empty.
func positiveInt(v, variable string, def, most int, meaning string) (int, error) {
	if v == "" {
		return def, nil
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 1 || n > most {
		return 0, fmt.Errorf("%s: %q is not accepted; it is %s: a whole number from 1 to %d (default %d)", variable, v, meaning, most, def)
	}
	return n, nil
}
