package pmu

import (
	"errors"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gokvm-ft/gokvm-ft/internal/tinyguest"
	"github.com/gokvm-ft/gokvm-ft/kvm"
)

// needKVM skips a test of the real guests where there is no /dev/kvm (and
// fails it in CI, which must have one).
func needKVM(t *testing.T) {
	t.Helper()
	if _, err := os.Stat("/dev/kvm"); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("CI needs /dev/kvm: %v", err)
		}
		t.Skip("no /dev/kvm")
	}
}

// TestProbeHostGuests probes this host with the real guests. It must
// finish quickly whatever the host; where the counter does not open for
// want of a PMU, the verdict is "not usable" and says so first, then what
// the guest-debug check found.
func TestProbeHostGuests(t *testing.T) {
	needKVM(t)
	start := time.Now()
	r := ProbeHost(2)
	took := time.Since(start)
	t.Logf("%v (in %v)", r, took)
	if r.Reason == "" {
		t.Fatalf("%v: no reason", r)
	}
	if took > 30*time.Second {
		t.Errorf("ProbeHost took %v", took)
	}
	if err := HostCounter(); err != nil {
		if r.Usable {
			t.Fatalf("%v, but the counter does not open: %v", r, err)
		}
		if errors.Is(err, unix.ENOENT) && !strings.HasPrefix(r.Reason, "no PMU: ") {
			t.Errorf("reason %q for ENOENT does not say there is no PMU", r.Reason)
		}
		if !strings.Contains(r.Reason, "guest debugging") {
			t.Errorf("reason %q does not say what the guest-debug check found", r.Reason)
		}
	}
}

// TestHostDebugGuest runs CheckDebug on the real debug guest at CPL3 and
// at CPL0: where guest debugging works it passes; where KVM accepts
// KVM_SET_GUEST_DEBUG but a step or breakpoint does not stop the guest
// (this lab's nested host, at CPL3), that must be caught, not hang or pass.
// Either way the guest then still runs, and Run moves on from a breakpoint
// it stopped at.
func TestHostDebugGuest(t *testing.T) {
	needKVM(t)
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	for _, user := range []bool{true, false} {
		g, err := NewHostDebugGuest(user)
		if err != nil {
			t.Fatal(err)
		}
		defer g.Close()
		err = CheckDebug(g)
		if err == nil {
			t.Logf("%s: guest debugging works: a single step and a breakpoint stop the guest", g.level)
		} else {
			t.Logf("%s: guest debugging inert: %v", g.level, err)
			if !errors.Is(err, errDidNotStop) {
				t.Fatalf("%s: CheckDebug: %v, want a step or breakpoint that did not stop the guest", g.level, err)
			}
		}
		if _, _, err := g.Rewind(); err != nil {
			t.Fatal(err)
		}
		// Rewind restores the level, whatever handler the guest ran.
		sr, serr := g.g.cpu.GetSregs()
		if want := map[bool]uint16{true: tinyguest.UserCS, false: tinyguest.KernelCS}[user]; serr != nil || sr.CS.Selector != want {
			t.Fatalf("%s: rewound to CS %#x (%v), want %#x", g.level, sr.CS.Selector, serr, want)
		}
		if err == nil {
			// Stop at the breakpoint, then run on past it.
			_, bp, _ := g.Rewind()
			if err := g.SetBreakpoint(bp); err != nil {
				t.Fatal(err)
			}
			if why, err := g.Run(); why != StopBreakpoint || err != nil {
				t.Fatalf("%s: run to the breakpoint: %v, %v", g.level, why, err)
			}
			if _, err := g.Run(); !errors.Is(err, errGuestEnd) {
				t.Fatalf("%s: run on from the breakpoint: %v, want the guest's end", g.level, err)
			}
			if _, _, err := g.Rewind(); err != nil {
				t.Fatal(err)
			}
		}
		// Without a breakpoint the guest runs to its end, with the value
		// its code computes.
		if err := g.ClearBreakpoint(); err != nil {
			t.Fatal(err)
		}
		if _, err := g.Run(); !errors.Is(err, errGuestEnd) {
			t.Fatalf("%s: run without a breakpoint: %v, want the guest's end", g.level, err)
		}
		if port, v, err := g.g.out(); err != nil || port != guestEndPort || v != 10 {
			t.Fatalf("%s: guest ended writing %d to port %#x (%v), want 10 to %#x", g.level, v, port, err, guestEndPort)
		}
	}
}

// TestHostLoopArithmetic runs the loop guest without a counter: each pass
// makes the port writes and the iterations its branch count assumes, and
// Want is two branches an iteration.
func TestHostLoopArithmetic(t *testing.T) {
	needKVM(t)
	for _, c := range []struct{ iters, every uint64 }{{1000, 100}, {1000, 7}, {loopIterations, loopEvery}} {
		l := newHostLoop(0, c.iters, c.every)
		if l.Want() != 2*c.iters {
			t.Errorf("%d iterations: Want %d", c.iters, l.Want())
		}
		for pass := range 2 {
			s, err := l.pass(nil, 0)
			if err != nil {
				t.Fatalf("%d iterations, pass %d: %v", c.iters, pass, err)
			}
			if !s.end {
				t.Fatalf("%d iterations, pass %d: did not end", c.iters, pass)
			}
			if err := l.checkEnd(s); err != nil {
				t.Errorf("%d iterations, pass %d: %v", c.iters, pass, err)
			}
			if s.exits != c.iters/c.every {
				t.Errorf("%d iterations every %d: %d port writes", c.iters, c.every, s.exits)
			}
		}
		t.Logf("%d iterations, a port write every %d: %d branches, %d exits a pass", c.iters, c.every, l.Want(), l.exits())
		l.Close()
	}
}

// TestHostLoopCounter counts the loop guest with the host's counter where
// it opens (CheckLoop with the host's skid), and otherwise checks that the
// pass fails with the counter's error rather than counting anything.
func TestHostLoopCounter(t *testing.T) {
	needKVM(t)
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	ev, evErr := HostEvent()
	l := NewHostLoop(ev.Raw)
	defer l.Close()
	if err := HostCounter(); err != nil || evErr != nil {
		n, cerr := l.Count()
		t.Logf("no host counter (%v): Count: %d, %v", err, n, cerr)
		if cerr == nil {
			t.Fatalf("Count %d without a counter", n)
		}
		if _, oerr := l.Overflow(100); oerr == nil {
			t.Fatal("Overflow without a counter")
		}
		return
	}
	worst, err := CheckLoop(l, 3, ev.Skid)
	t.Logf("%s: CheckLoop: worst skid %d of %d, %v", ev.Uarch, worst, ev.Skid, err)
}

// TestProbeGuestWatchdog: a guest that never leaves the guest is kicked
// out at the deadline, not waited for.
func TestProbeGuestWatchdog(t *testing.T) {
	needKVM(t)
	g, err := newTinyGuest("_start:\n\tjmp _start\n", tinyguest.Options{Kernel: true})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	start := time.Now()
	why, err := g.enter(start.Add(200 * time.Millisecond))
	t.Logf("exit %v, %v after %v", why, err, time.Since(start))
	if !errors.Is(err, errGuestTimeout) || why != kvm.ExitIntr {
		t.Fatalf("exit %v, %v: want the watchdog's kick", why, err)
	}
	// The kick is spent: the next run starts normally (and is kicked
	// again).
	if why, err := g.enter(time.Now().Add(50 * time.Millisecond)); !errors.Is(err, errGuestTimeout) {
		t.Fatalf("second run: exit %v, %v", why, err)
	}
	if err := g.rewind(); err != nil {
		t.Fatal(err)
	}
}
