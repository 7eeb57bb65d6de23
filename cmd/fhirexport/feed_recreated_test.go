package main

import (
	"context"
	"encoding/json"
	"path/filepath"
	"testing"
)

// TestFeedPullRecreated: a resource deleted and re-created with the same id
// is in the mirror at its new version, whether its deletion is recorded
// before the run that exports the new version or only after it (the feed
// must not hand a consumer a deletion beside, or after, a newer version).
func TestFeedPullRecreated(t *testing.T) {
	t.Parallel()
	s := newFeedStack(t)
	dir := filepath.Join(t.TempDir(), "mirror")
	s.exportRun(t, "full")
	recreate := func(typ string, n int) {
		t.Helper()
		var rs []map[string]any
		for _, raw := range s.emu.Resources(store) {
			var r map[string]any
			json.Unmarshal(raw, &r)
			if r["resourceType"] == typ {
				rs = append(rs, r)
			}
		}
		r := rs[n]
		s.del(t, typ, r["id"].(string))
		delete(r, "meta")
		r["status"] = "cancelled"
		data, _ := json.Marshal(r)
		s.put(t, string(data))
	}

	recreate("Encounter", 0)
	s.exportRun(t, "recorded-first")
	if _, errOut, code := s.pull(t, context.Background(), dir); code != 0 {
		t.Fatalf("pull: exit %d: %s", code, errOut)
	}
	s.matchesStore(t, dir)

	recreate("Encounter", 1)
	s.exportRunLate(t, "recorded-late")
	s.exportRun(t, "after-the-late-deletion")
	if _, errOut, code := s.pull(t, context.Background(), dir); code != 0 {
		t.Fatalf("pull: exit %d: %s", code, errOut)
	}
	s.matchesStore(t, dir)
}
