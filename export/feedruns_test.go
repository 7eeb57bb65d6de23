package export

import "testing"

// TestManifestURL: a consumer finds a run's manifest where writeFeed puts it.
func TestManifestURL(t *testing.T) {
	t.Parallel()
	const op = "projects/p/locations/l/datasets/d/operations/123"
	for dest, want := range map[string]string{
		"gs://b":            "gs://b/123.manifest.json",
		"gs://b/":           "gs://b/123.manifest.json",
		"gs://b/out/2026":   "gs://b/out/2026/123.manifest.json",
		"gs://b/out/2026//": "gs://b/out/2026/123.manifest.json",
	} {
		if got := manifestURL(dest, op); got != want {
			t.Errorf("manifestURL(%q) = %q; want %q", dest, got, want)
		}
	}
}
