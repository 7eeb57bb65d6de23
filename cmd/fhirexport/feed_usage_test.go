package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestFeedPullUsage: help at every level, usage mistakes exit 2, and a folder
// that is not this pipeline's mirror is refused (exit 1) before anything is
// fetched.
func TestFeedPullUsage(t *testing.T) {
	t.Parallel()
	s := newStack(t)
	key := "n-5149d4faf91a195fe9f9587b01f84c" // store s, name hourly
	other := t.TempDir()
	os.WriteFile(filepath.Join(other, "notes.txt"), []byte("mine"), 0o644)
	theirs := t.TempDir()
	os.WriteFile(filepath.Join(theirs, "feed-cursor.json"), []byte(`{"pipeline":"n-other","run":"r","transactionTime":"2026-11-26T00:00:00Z"}`), 0o644)
	ours := t.TempDir()
	os.WriteFile(filepath.Join(ours, "feed-cursor.json"), []byte(`{"pipeline":"`+key+`","run":"r","transactionTime":"2026-11-26T00:00:00Z"}`), 0o644)

	for _, tc := range []struct {
		args []string
		code int
		out  string // on stdout for 0, stderr otherwise
	}{
		{[]string{"feed", "--help"}, 0, "fhirexport feed pull PIPELINE --dir DIR"},
		{[]string{"help", "feed"}, 0, "fhirexport feed pull PIPELINE --dir DIR"},
		{[]string{"feed", "pull", "--help"}, 0, "-changes"},
		{[]string{"--help"}, 0, "feed        a pipeline's change feed"},
		{[]string{"feed"}, 2, "feed needs a subcommand: pull"},
		{[]string{"feed", "push"}, 2, "feed push: want pull"},
		{[]string{"feed", "pull", "--dir", t.TempDir()}, 2, "name one pipeline"},
		{[]string{"feed", "pull", key}, 2, "needs --dir DIR"},
		{[]string{"feed", "pull", key, "--dir", t.TempDir(), "--bogus"}, 2, "unknown flag: --bogus"},
		{[]string{"feed", "pull", "--store", store, "--name", "hourly", "--dir", t.TempDir()}, 1, "unknown pipeline"},
		{[]string{"feed", "pull", key, "--dir", other}, 1, "not a mirror"},
		{[]string{"feed", "pull", key, "--dir", theirs}, 1, "mirrors pipeline n-other, not " + key},
		{[]string{"feed", "pull", key, "--dir", ours, "--since", "2026-01-01T00:00:00Z"}, 2, "--since starts a new mirror"},
	} {
		out, errOut, code := s.fhirexport(tc.args...)
		got := errOut
		if tc.code == 0 {
			got = out
		}
		if code != tc.code || !strings.Contains(got, tc.out) {
			t.Errorf("fhirexport %s: exit %d, stdout %q, stderr %q; want exit %d saying %q", strings.Join(tc.args, " "), code, out, errOut, tc.code, tc.out)
		}
	}
}
