package pmu

import (
	"errors"
	"fmt"
)

// Target is an exact position in the guest's instruction stream: the guest
// stands before the instruction at RIP with Branches conditional branches
// retired (since the counter's zero) and RCX in RCX. Branches orders
// positions; RIP and RCX tell apart the instructions between two branches
// and the iterations of a REP instruction (RCX counts down).
type Target struct {
	Branches uint64
	RIP      uint64
	RCX      uint64
}

func (t Target) String() string {
	return fmt.Sprintf("branches %d rip %#x rcx %#x", t.Branches, t.RIP, t.RCX)
}

// Regs are the registers a position needs.
type Regs struct {
	RIP uint64
	RCX uint64
}

// Stop says why the guest stopped.
type Stop int

// Why a Stepper's Run or Step returned.
const (
	// StopOther: anything but the three below, e.g. a host signal or a
	// kick. The seeker reads the position and goes on.
	StopOther Stop = iota
	// StopOverflow: the counter's overflow interrupt.
	StopOverflow
	// StopBreakpoint: the hardware execution breakpoint.
	StopBreakpoint
	// StopStep: a single step completed.
	StopStep
)

func (s Stop) String() string {
	switch s {
	case StopOther:
		return "other"
	case StopOverflow:
		return "overflow"
	case StopBreakpoint:
		return "breakpoint"
	case StopStep:
		return "single step"
	}
	return fmt.Sprintf("Stop(%d)", int(s))
}

// Counter is the guest's retired-conditional-branch counter.
type Counter interface {
	// Branches returns the count.
	Branches() (uint64, error)
	// ArmOverflow arms the overflow interrupt n >= 1 branches from now,
	// replacing any armed one. The guest stops up to a skid after it.
	ArmOverflow(n uint64) error
	// Disarm cancels the overflow interrupt.
	Disarm() error
}

// Registers reads the registers of a position.
type Registers interface {
	// Regs reads RIP and RCX.
	Regs() (Regs, error)
}

// Stepper runs the guest for the seeker. The guest's other business (a
// deterministic exit) does not happen between the guest's current position
// and a target of the same exit interval; an implementation may report one
// as an error.
type Stepper interface {
	// Run runs the guest until something stops it. A breakpoint at the
	// instruction the guest stands on does not fire before that
	// instruction executes (x86's RFLAGS.RF), so Run after a breakpoint
	// stop moves on.
	Run() (Stop, error)
	// Step executes one instruction, or one iteration of a REP
	// instruction, and returns StopStep.
	Step() (Stop, error)
	Registers
	// SetBreakpoint sets the hardware execution breakpoint on the
	// instruction at rip (in the current code segment), replacing any.
	SetBreakpoint(rip uint64) error
	// ClearBreakpoint removes it.
	ClearBreakpoint() error
}

// Errors of Seek; match them with errors.Is.
var (
	// ErrBehind: the target's branch count is behind the guest's.
	ErrBehind = errors.New("pmu: target is behind the guest")
	// ErrOvershoot: the guest went past the target, or may have (an
	// overflow landed beyond its skid). The position is lost.
	ErrOvershoot = errors.New("pmu: guest ran past the target")
	// ErrBackwards: the counter read less than before.
	ErrBackwards = errors.New("pmu: branch counter went backwards")
	// ErrStuck: the target was not reached within MaxStops stops, e.g.
	// because the stepper stops without the guest making progress.
	ErrStuck = errors.New("pmu: target not reached within the stop bound")
)

// Defaults of Seeker's zero fields.
const (
	// DefaultSkid is rr's skid for most Intel cores, in branches.
	DefaultSkid = 100
	// DefaultMaxStops bounds the stops (runs and single steps) of one
	// Seek: a REP instruction costs one stop per iteration walked.
	DefaultMaxStops = 1 << 22
)

// Seeker brings the guest to a Target. Its fields are set once; a Seeker
// is used by the vCPU's goroutine only.
type Seeker struct {
	Counter Counter
	Stepper Stepper
	// Skid bounds how many branches the guest retires after an overflow
	// before it stops (kvm.BranchEvent.Skid plus any minimum period the
	// counter imposes); 0 means DefaultSkid.
	Skid uint64
	// MinPeriod is the smallest n the Counter's ArmOverflow takes; 0
	// means 1.
	MinPeriod uint64
	// MaxStops bounds the stops of one Seek; 0 means DefaultMaxStops.
	MaxStops int
}

// seek is the state of one Seek.
type seek struct {
	*Seeker
	t     Target
	last  uint64 // the last count read
	stops int
	max   int
}

// branches reads the counter and checks it against the last reading and
// the target.
func (s *seek) branches() (uint64, error) {
	n, err := s.Counter.Branches()
	if err != nil {
		return 0, fmt.Errorf("pmu: read counter: %w", err)
	}
	if n < s.last {
		return 0, fmt.Errorf("%w: read %d after %d", ErrBackwards, n, s.last)
	}
	s.last = n
	if n > s.t.Branches {
		return 0, fmt.Errorf("%w: at branch %d, target %v", ErrOvershoot, n, s.t)
	}
	return n, nil
}

// stop counts one stop against the bound.
func (s *seek) stop() error {
	s.stops++
	if s.stops > s.max {
		return fmt.Errorf("%w: %d stops, at branch %d, target %v", ErrStuck, s.max, s.last, s.t)
	}
	return nil
}

// Seek runs the guest from where it stands to exactly t and leaves it
// there, with no overflow armed (if Seek armed one) and no breakpoint set.
// On an error the guest is somewhere before or past t.
func (sk *Seeker) Seek(t Target) (err error) {
	s := &seek{Seeker: sk, t: t, max: sk.MaxStops}
	if s.max <= 0 {
		s.max = DefaultMaxStops
	}
	skid := sk.Skid
	if skid == 0 {
		skid = DefaultSkid
	}
	minPeriod := max(sk.MinPeriod, 1)

	cur, err := sk.Counter.Branches()
	if err != nil {
		return fmt.Errorf("pmu: read counter: %w", err)
	}
	if cur > t.Branches {
		return fmt.Errorf("%w: guest at branch %d, target %v", ErrBehind, cur, t)
	}
	s.last = cur

	// Far away: let the overflow bring the guest near. Armed so that even
	// the latest landing, armed count + skid, is below the target's count:
	// a landing at the target's own count might already be past its RIP.
	armed := false
	for t.Branches-cur >= skid+1+minPeriod {
		if err := sk.Counter.ArmOverflow(t.Branches - cur - skid - 1); err != nil {
			return fmt.Errorf("pmu: arm overflow: %w", err)
		}
		armed = true
		if err := s.stop(); err != nil {
			return err
		}
		why, err := sk.Stepper.Run()
		if err != nil {
			return fmt.Errorf("pmu: run to overflow: %w", err)
		}
		if why == StopBreakpoint || why == StopStep {
			return fmt.Errorf("pmu: run to overflow stopped by %v, which was not armed", why)
		}
		if cur, err = s.branches(); err != nil {
			return err
		}
		if cur == t.Branches {
			return fmt.Errorf("%w: stopped at the target's branch count, beyond the skid of %d; it may have passed %v", ErrOvershoot, skid, t)
		}
	}
	if armed {
		if err := sk.Counter.Disarm(); err != nil {
			return fmt.Errorf("pmu: disarm overflow: %w", err)
		}
	}

	// Near: stop at every visit of the target's RIP until the count
	// matches, then walk RCX (a REP instruction) by single steps.
	bp := false
	defer func() {
		if bp {
			if cerr := sk.Stepper.ClearBreakpoint(); cerr != nil && err == nil {
				err = fmt.Errorf("pmu: clear breakpoint: %w", cerr)
			}
		}
	}()
	for {
		r, err := sk.Stepper.Regs()
		if err != nil {
			return fmt.Errorf("pmu: read registers: %w", err)
		}
		if cur == t.Branches && r.RIP == t.RIP {
			if r.RCX == t.RCX {
				return nil
			}
			// The right instruction with another RCX: inside a REP
			// instruction (or in a loop without conditional branches).
			// Step; the REP stays at RIP, anything else moves on to the
			// next visit.
			if err := s.stop(); err != nil {
				return err
			}
			if _, err := sk.Stepper.Step(); err != nil {
				return fmt.Errorf("pmu: single step: %w", err)
			}
		} else {
			if !bp {
				if err := sk.Stepper.SetBreakpoint(t.RIP); err != nil {
					return fmt.Errorf("pmu: set breakpoint: %w", err)
				}
				bp = true
			}
			if err := s.stop(); err != nil {
				return err
			}
			if _, err := sk.Stepper.Run(); err != nil {
				return fmt.Errorf("pmu: run to breakpoint: %w", err)
			}
		}
		// Whatever stopped the guest (the breakpoint, a step that did
		// not stop where asked, a late overflow signal, a kick), the
		// position decides.
		if cur, err = s.branches(); err != nil {
			return err
		}
	}
}

// Current returns where the guest stands, for the recorder: the guest has
// left KVM_RUN (a kick) and its registers are final.
func Current(c Counter, s Registers) (Target, error) {
	n, err := c.Branches()
	if err != nil {
		return Target{}, fmt.Errorf("pmu: read counter: %w", err)
	}
	r, err := s.Regs()
	if err != nil {
		return Target{}, fmt.Errorf("pmu: read registers: %w", err)
	}
	return Target{Branches: n, RIP: r.RIP, RCX: r.RCX}, nil
}
