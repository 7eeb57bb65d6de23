package healthcaretest

import (
	"sync"
	"time"
)

// Clock tells the emulator the time. Every server timestamp is derived from it.
type Clock interface{ Now() time.Time }

type realClock struct{}

func (realClock) Now() time.Time { return time.Now() }

// FakeClock is a Clock that only moves when told to. It is safe for concurrent
// use.
type FakeClock struct {
	mu  sync.Mutex
	now time.Time
}

// NewFakeClock returns a FakeClock that reads t until moved.
func NewFakeClock(t time.Time) *FakeClock { return &FakeClock{now: t} }

// Now returns the clock's current time.
func (c *FakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

// Advance moves the clock forward by d (backward if d is negative).
func (c *FakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// Set sets the clock to t.
func (c *FakeClock) Set(t time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = t
}

// stamp issues the next server timestamp: max(clock, last+1µs) truncated to
// microseconds, in UTC. The caller holds e.mu.
func (e *Emulator) stamp() time.Time {
	t := e.clock.Now().UTC().Truncate(time.Microsecond)
	if min := e.lastStamp.Add(time.Microsecond); !e.lastStamp.IsZero() && t.Before(min) {
		t = min
	}
	e.lastStamp = t
	return t
}

// formatTime renders t like protobuf JSON renders a Timestamp: RFC 3339 in UTC
// with 0, 3, 6 or 9 fractional digits.
func formatTime(t time.Time) string {
	t = t.UTC()
	switch {
	case t.Nanosecond() == 0:
		return t.Format("2006-01-02T15:04:05Z")
	case t.Nanosecond()%1e6 == 0:
		return t.Format("2006-01-02T15:04:05.000Z")
	case t.Nanosecond()%1e3 == 0:
		return t.Format("2006-01-02T15:04:05.000000Z")
	}
	return t.Format("2006-01-02T15:04:05.000000000Z")
}

// now is the emulator's present for deciding progress: the clock, but never
// before the last issued timestamp. The caller holds e.mu.
func (e *Emulator) now() time.Time {
	t := e.clock.Now().UTC().Truncate(time.Microsecond)
	if t.Before(e.lastStamp) {
		return e.lastStamp
	}
	return t
}

// RunningClock is real time shifted by an offset that Advance moves: time
// passes as it does for every other process (leases expire, timeouts fire),
// and a test can still jump ahead to finish long exports. Give the code under
// test the same clock, so that its times and the emulator's agree as its and
// the service's do. It is safe for concurrent use.
type RunningClock struct {
	mu     sync.Mutex
	offset time.Duration
}

// NewRunningClock returns a RunningClock that reads start now.
func NewRunningClock(start time.Time) *RunningClock {
	return &RunningClock{offset: time.Until(start)}
}

// Now returns the clock's current time.
func (c *RunningClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return time.Now().Add(c.offset)
}

// Advance moves the clock forward by d (backward if d is negative).
func (c *RunningClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.offset += d
}
