package pmu

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// Result is Probe's verdict. The zero Result is "not usable".
type Result struct {
	// Usable: PMU positions may be used on this host.
	Usable bool
	// Reason says why not, or what passed.
	Reason string
}

func (r Result) String() string {
	if r.Usable {
		return "PMU positions usable: " + r.Reason
	}
	return "PMU positions not usable: " + r.Reason
}

// DebugGuest is the probe guest of the guest-debug check: a Stepper over a
// short straight-line program that ends in a VM exit, so that a single
// step or breakpoint that does nothing shows as a stop by that exit rather
// than a hang.
type DebugGuest interface {
	Stepper
	// Rewind puts the guest back at its first instruction and returns
	// the RIP of the second (where one single step must stop) and of a
	// later one before the exit (where a breakpoint must stop the guest).
	Rewind() (next, bp uint64, err error)
}

// Loop is the probe guest of the exactness check: a loop that retires a
// known number of conditional branches, with VM exits inside (an exit, an
// interrupt injection or a PMI must not add to the count, as rr's
// "Xen PMI bug" and Zen's SpecLockMap do), and locked instructions (which
// Zen miscounts with SpecLockMap on).
type Loop interface {
	// Want is the number of conditional branches one pass retires.
	Want() uint64
	// Count runs one pass from the start with the counter at zero and
	// returns the count at its end.
	Count() (uint64, error)
	// Overflow runs one pass from the start with the counter at zero and
	// the overflow armed n branches in, and returns the count where the
	// overflow stopped the guest; an error if the pass ended first.
	Overflow(n uint64) (uint64, error)
}

// Probes is what Probe checks, in this order. A nil field fails the probe:
// nothing is assumed.
type Probes struct {
	// Open opens the vendor's guest branch counter on the calling thread
	// and closes it again; HostCounter is this host's.
	Open func() error
	// Debug checks that single steps and breakpoints stop the guest.
	Debug DebugGuest
	// Loop checks that the counter is exact and the overflow lands
	// within Skid.
	Loop Loop
	// Runs is how many passes of Loop must all count exactly; 0 means
	// DefaultProbeRuns.
	Runs int
	// Skid is the overflow skid to check; 0 means DefaultSkid.
	Skid uint64
}

// DefaultProbeRuns is Probes.Runs's default.
const DefaultProbeRuns = 5

// Probe decides whether PMU positions are usable here: the counter opens,
// guest debugging works, and the counter is exact. It stops at the first
// failure and says which. Call it on the thread that will run the vCPU.
func Probe(p Probes) Result {
	if p.Open == nil {
		return Result{Reason: "no branch counter given to probe"}
	}
	if err := p.Open(); err != nil {
		return Result{Reason: openReason(err)}
	}
	if p.Debug == nil {
		return Result{Reason: "guest debugging not checked: no probe guest"}
	}
	if err := CheckDebug(p.Debug); err != nil {
		return Result{Reason: "guest debugging does not work: " + err.Error()}
	}
	if p.Loop == nil {
		return Result{Reason: "counter exactness not checked: no probe guest"}
	}
	runs := p.Runs
	if runs <= 0 {
		runs = DefaultProbeRuns
	}
	skid := p.Skid
	if skid == 0 {
		skid = DefaultSkid
	}
	worst, err := CheckLoop(p.Loop, runs, skid)
	if errors.Is(err, errShortLoop) {
		return Result{Reason: "counter exactness not checked: " + err.Error()}
	}
	if err != nil {
		return Result{Reason: "counter not exact: " + err.Error()}
	}
	return Result{Usable: true, Reason: fmt.Sprintf("%d passes of %d branches counted exactly, overflow skid at most %d of %d", runs, p.Loop.Want(), worst, skid)}
}

// openReason explains a failure to open the counter.
func openReason(err error) string {
	switch {
	case errors.Is(err, unix.ENOENT), errors.Is(err, unix.ENODEV), errors.Is(err, unix.EOPNOTSUPP):
		return "no PMU: " + err.Error()
	case errors.Is(err, unix.EACCES), errors.Is(err, unix.EPERM):
		return "PMU not permitted (kernel.perf_event_paranoid > 1 without CAP_PERFMON?): " + err.Error()
	}
	return "no branch counter: " + err.Error()
}

// CheckDebug checks that one single step stops the guest after one
// instruction, and that a breakpoint stops it at its RIP. KVM accepts
// KVM_SET_GUEST_DEBUG on hosts where neither does anything (some nested
// setups), so only running the guest tells.
func CheckDebug(g DebugGuest) error {
	next, bp, err := g.Rewind()
	if err != nil {
		return fmt.Errorf("rewind: %w", err)
	}
	why, err := g.Step()
	if err != nil {
		return fmt.Errorf("single step: %w", err)
	}
	r, err := g.Regs()
	if err != nil {
		return fmt.Errorf("read registers: %w", err)
	}
	if why != StopStep || r.RIP != next {
		return fmt.Errorf("single step stopped by %v at %#x, want a step to %#x", why, r.RIP, next)
	}
	if _, _, err = g.Rewind(); err != nil {
		return fmt.Errorf("rewind: %w", err)
	}
	if err := g.SetBreakpoint(bp); err != nil {
		return fmt.Errorf("set breakpoint: %w", err)
	}
	why, err = g.Run()
	cerr := g.ClearBreakpoint()
	if err != nil {
		return fmt.Errorf("run to breakpoint: %w", err)
	}
	if cerr != nil {
		return fmt.Errorf("clear breakpoint: %w", cerr)
	}
	if r, err = g.Regs(); err != nil {
		return fmt.Errorf("read registers: %w", err)
	}
	if why != StopBreakpoint || r.RIP != bp {
		return fmt.Errorf("breakpoint at %#x: stopped by %v at %#x", bp, why, r.RIP)
	}
	return nil
}

// errShortLoop: the probe loop cannot show a landing within the skid.
var errShortLoop = errors.New("probe loop too short for the skid")

// CheckLoop runs l runs times and refuses any count but l.Want(), then
// arms an overflow in each run and refuses a landing before the armed
// count or more than skid after it. It returns the largest skid seen.
func CheckLoop(l Loop, runs int, skid uint64) (worst uint64, err error) {
	want := l.Want()
	if want < 2*(skid+1) {
		return 0, fmt.Errorf("%w: %d branches, skid %d", errShortLoop, want, skid)
	}
	for i := range runs {
		got, err := l.Count()
		if err != nil {
			return 0, fmt.Errorf("pass %d: %w", i+1, err)
		}
		if got != want {
			return 0, fmt.Errorf("pass %d of %d counted %d branches, the loop retires %d", i+1, runs, got, want)
		}
	}
	for i := range runs {
		// Spread the armed counts so that different landings are seen.
		n := want/2 - uint64(i)*(want/2-skid)/uint64(runs)
		got, err := l.Overflow(n)
		if err != nil {
			return 0, fmt.Errorf("overflow at %d: %w", n, err)
		}
		if got < n {
			return 0, fmt.Errorf("overflow armed at %d stopped the guest early, at %d", n, got)
		}
		if got-n > skid {
			return 0, fmt.Errorf("overflow armed at %d stopped the guest at %d: skid %d beyond %d", n, got, got-n, skid)
		}
		worst = max(worst, got-n)
	}
	return worst, nil
}
