package machine

import (
	"context"
	"sync"
	"sync/atomic"
	"time"
)

// Clock is the machine's only source of time. Every time-dependent value the
// guest can read (PIT counters and status, port 0x61 OUT2 and refresh bit,
// RTC time and update-in-progress) is computed from Now, so a recorder can
// log the readings and a replayer can return them.
//
// Now is guest time: the time elapsed since the machine's epoch, monotonic,
// never running backwards.
type Clock interface {
	Now() time.Duration
	// SleepUntil blocks until Now() >= t, wake is signalled or ctx ends.
	// The vCPU loop uses it while the guest is halted.
	SleepUntil(ctx context.Context, t time.Duration, wake <-chan struct{})
	// WakeAt arranges for f to be called (on any goroutine) once guest time
	// reaches t, replacing any earlier arrangement. The vCPU loop uses it to
	// kick a guest that runs without exiting when a timer falls due. A clock
	// that only moves when told to may never call f.
	WakeAt(t time.Duration, f func())
}

// HostClock is guest time driven by the host's monotonic clock.
type HostClock struct {
	start  time.Time
	offset atomic.Int64 // guest time at start, in ns

	mu    sync.Mutex
	timer *time.Timer
}

// NewHostClock starts a clock at guest time offset (0 for a new machine,
// the saved time for a restored one).
func NewHostClock(offset time.Duration) *HostClock {
	c := &HostClock{start: time.Now()}
	c.offset.Store(int64(offset))
	return c
}

// Now returns the guest time.
func (c *HostClock) Now() time.Duration { return time.Duration(c.offset.Load()) + time.Since(c.start) }

// Set makes guest time t now; it continues from there. A restore uses it
// before the machine runs (guest time must not jump back while it runs).
func (c *HostClock) Set(t time.Duration) { c.offset.Store(int64(t - time.Since(c.start))) }

// SleepUntil sleeps on a host timer.
func (c *HostClock) SleepUntil(ctx context.Context, t time.Duration, wake <-chan struct{}) {
	d := t - c.Now()
	if d <= 0 {
		return
	}
	tm := time.NewTimer(d)
	defer tm.Stop()
	select {
	case <-tm.C:
	case <-wake:
	case <-ctx.Done():
	}
}

// WakeAt arms a host timer.
func (c *HostClock) WakeAt(t time.Duration, f func()) {
	d := max(t-c.Now(), 0)
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.timer != nil {
		c.timer.Stop()
	}
	c.timer = time.AfterFunc(d, f)
}

// ManualClock is a clock that moves only when told to, for tests and for
// scripted, reproducible runs. SleepUntil jumps straight to its deadline, so a
// halted guest never waits on the host.
type ManualClock struct {
	mu  sync.Mutex
	now time.Duration
}

// Now returns the current manual time.
func (c *ManualClock) Now() time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

// Advance moves the clock forward by d (negative d is ignored).
func (c *ManualClock) Advance(d time.Duration) {
	if d <= 0 {
		return
	}
	c.mu.Lock()
	c.now += d
	c.mu.Unlock()
}

// Set moves the clock to t if t is later than now.
func (c *ManualClock) Set(t time.Duration) {
	c.mu.Lock()
	if t > c.now {
		c.now = t
	}
	c.mu.Unlock()
}

// SleepUntil advances the clock to t at once.
func (c *ManualClock) SleepUntil(ctx context.Context, t time.Duration, wake <-chan struct{}) {
	c.Set(t)
}

// WakeAt does nothing: manual time moves only at the run loop's request.
func (c *ManualClock) WakeAt(t time.Duration, f func()) {}
