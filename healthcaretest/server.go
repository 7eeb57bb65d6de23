package healthcaretest

import "testing"

// NewServer starts an Emulator on a random loopback port for a test and
// closes it when the test ends.
func NewServer(t testing.TB, opts Options) *Server {
	t.Helper()
	if opts.Logf == nil {
		opts.Logf = t.Logf
	}
	s, err := Start("127.0.0.1:0", opts)
	if err != nil {
		t.Fatalf("healthcaretest: starting the emulator: %v", err)
	}
	t.Cleanup(s.Close)
	return s
}
