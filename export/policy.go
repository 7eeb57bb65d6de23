package export

import (
	"fmt"
	"strings"
)

// Policy is the allow-list of stores and destinations. The zero Policy allows
// nothing: an export to a bucket nobody listed is a PHI breach.
type Policy struct {
	stores       [][]string // patterns split on "/"; "*" matches one segment
	destinations []string   // "gs://bucket[/prefix]" without a trailing slash, or "bq://project.dataset"
}

// ParsePolicy parses the comma-separated FHIREXPORT_ALLOWED_STORES and
// FHIREXPORT_ALLOWED_DESTINATIONS values.
func ParsePolicy(stores, destinations string) (Policy, error) {
	var p Policy
	for _, s := range splitList(stores) {
		segs := strings.Split(s, "/")
		if len(segs) != 8 || segs[0] != "projects" || segs[2] != "locations" || segs[4] != "datasets" || segs[6] != "fhirStores" {
			return Policy{}, fmt.Errorf("FHIREXPORT_ALLOWED_STORES: %q is not a store pattern; accepted: projects/P/locations/L/datasets/D/fhirStores/S, where * matches one segment", s)
		}
		for _, seg := range segs {
			if seg == "" || seg == "." || seg == ".." || (strings.Contains(seg, "*") && seg != "*") {
				return Policy{}, fmt.Errorf("FHIREXPORT_ALLOWED_STORES: %q has an invalid segment %q; * must stand alone", s, seg)
			}
		}
		p.stores = append(p.stores, segs)
	}
	for _, d := range splitList(destinations) {
		switch {
		case strings.HasPrefix(d, "gs://"):
			d = strings.TrimRight(d, "/")
			bucket, path, _ := strings.Cut(strings.TrimPrefix(d, "gs://"), "/")
			if !validBucket(bucket) {
				return Policy{}, fmt.Errorf("FHIREXPORT_ALLOWED_DESTINATIONS: %q has an invalid bucket name", d)
			}
			if path != "" {
				for _, seg := range strings.Split(path, "/") {
					if seg == "" || seg == "." || seg == ".." || strings.ContainsAny(seg, "*{}") {
						return Policy{}, fmt.Errorf("FHIREXPORT_ALLOWED_DESTINATIONS: %q has an invalid path segment %q", d, seg)
					}
				}
			}
		case strings.HasPrefix(d, "bq://"):
			if !validDatasetURI(d) {
				return Policy{}, fmt.Errorf("FHIREXPORT_ALLOWED_DESTINATIONS: %q is not bq://PROJECT_ID.DATASET_ID", d)
			}
		default:
			return Policy{}, fmt.Errorf("FHIREXPORT_ALLOWED_DESTINATIONS: %q must start with gs:// or bq://", d)
		}
		p.destinations = append(p.destinations, d)
	}
	return p, nil
}

func splitList(v string) []string {
	var out []string
	for _, s := range strings.Split(v, ",") {
		if s = strings.TrimSpace(s); s != "" {
			out = append(out, s)
		}
	}
	return out
}

// AllowStore reports whether store, a concrete store name, matches an allowed
// pattern, segment by segment and case-sensitively. A fleet name
// (…/fhirStores/*) is never allowed as such: a "*" in the name is not a
// store ID, and a pattern's "*" would otherwise match it. The caller checks
// each store of a fleet on its own.
func (p Policy) AllowStore(store string) bool {
	segs := strings.Split(store, "/")
	for _, pat := range p.stores {
		if len(pat) == len(segs) && matchSegments(pat, segs) {
			return true
		}
	}
	return false
}

// AllowFleet reports whether some pattern could allow a store of dataset
// (projects/P/locations/L/datasets/D). It lets a fleet spec whose dataset no
// pattern reaches be rejected before the dataset's stores are listed; each
// store listed must still pass AllowStore.
func (p Policy) AllowFleet(dataset string) bool {
	segs := strings.Split(dataset, "/")
	for _, pat := range p.stores {
		if len(pat) == len(segs)+2 && matchSegments(pat[:len(segs)], segs) {
			return true
		}
	}
	return false
}

// matchSegments matches a name's segments against a pattern's of the same
// length. An empty or "*" segment in the name matches nothing.
func matchSegments(pat, segs []string) bool {
	for i := range pat {
		if segs[i] == "" || segs[i] == "*" || (pat[i] != "*" && pat[i] != segs[i]) {
			return false
		}
	}
	return true
}

// AllowDestination reports whether an expanded destination lies inside an
// allowed one: the same bucket and a path that starts with the allowed path
// at a segment boundary, or the very same BigQuery dataset.
func (p Policy) AllowDestination(dest string) bool {
	for _, allowed := range p.destinations {
		if strings.HasPrefix(allowed, "bq://") {
			if dest == allowed {
				return true
			}
			continue
		}
		d := strings.TrimRight(dest, "/")
		if d == allowed || strings.HasPrefix(d, allowed+"/") {
			return true
		}
	}
	return false
}
