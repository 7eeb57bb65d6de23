package stacktest

import (
	"context"
	"testing"
)

// New starts a Stack for a test and closes it when the test ends.
func New(t testing.TB, opts Options) *Stack {
	t.Helper()
	s, err := Start(context.Background(), opts)
	if err != nil {
		t.Fatalf("stacktest: %v", err)
	}
	t.Cleanup(s.Close)
	return s
}
