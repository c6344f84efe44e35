package pmu

import (
	"errors"
	"fmt"

	"github.com/gokvm-ft/gokvm-ft/kvm"
	"github.com/gokvm-ft/gokvm-ft/machine"
)

// Source is the PMU position source of one machine (a
// machine.PositionSource): a branch Counter opened on the vCPU thread for
// each Run, a Seeker over it, and the vCPU's own debug facilities as the
// Stepper (VCPUStepper). HostSource builds the real one; a test may give
// Open a simulated counter.
type Source struct {
	// CPU is the machine's vCPU.
	CPU *kvm.VCPU
	// Open opens the counter on the calling thread (the vCPU's) and
	// returns it with the function that closes it.
	Open func() (Counter, func() error, error)
	// Skid, MinPeriod and MaxStops are the Seeker's.
	Skid, MinPeriod uint64
	MaxStops        int

	counter Counter
	close   func() error
}

var _ machine.PositionSource = (*Source)(nil)

// HostSource is the position source on this host's counter (ev, from
// HostEvent: its event and skid) for the vCPU cpu. Use it only where
// ProbeHost says the host's counter and guest debugging are usable.
func HostSource(cpu *kvm.VCPU, ev kvm.BranchEvent) *Source {
	return &Source{
		CPU:  cpu,
		Skid: ev.Skid,
		Open: func() (Counter, func() error, error) {
			c, err := kvm.OpenBranchCounter(ev.Raw, 0)
			if err != nil {
				return nil, nil, fmt.Errorf("%s: %w", ev.Uarch, err)
			}
			if err := c.Enable(); err != nil {
				c.Close()
				return nil, nil, err
			}
			return PerfCounter{C: c}, c.Close, nil
		},
	}
}

// Start opens the counter on the calling thread.
func (s *Source) Start() error {
	if s.counter != nil {
		return errors.New("pmu: position source started twice")
	}
	c, closeFn, err := s.Open()
	if err != nil {
		return err
	}
	s.counter, s.close = c, closeFn
	return nil
}

// Branches reads the counter.
func (s *Source) Branches() (uint64, error) {
	if s.counter == nil {
		return 0, errors.New("pmu: position source not started")
	}
	return s.counter.Branches()
}

// Seek brings the guest to the position: n branches, rip, rcx.
func (s *Source) Seek(n, rip, rcx uint64) error {
	if s.counter == nil {
		return errors.New("pmu: position source not started")
	}
	st := &VCPUStepper{CPU: s.CPU}
	sk := Seeker{Counter: s.counter, Stepper: st, Skid: s.Skid, MinPeriod: s.MinPeriod, MaxStops: s.MaxStops}
	err := sk.Seek(Target{Branches: n, RIP: rip, RCX: rcx})
	// Nothing of the seek may stay armed for the machine's next KVM_RUN.
	if derr := s.CPU.SetGuestDebug(kvm.GuestDebug{}); derr != nil && err == nil {
		err = derr
	}
	return err
}

// Stop closes the counter.
func (s *Source) Stop() error {
	if s.counter == nil {
		return nil
	}
	err := s.close()
	s.counter, s.close = nil, nil
	return err
}

// VCPUStepper is the Stepper on a machine's vCPU, on its thread: KVM_RUN
// with KVM_SET_GUEST_DEBUG (an execution breakpoint in DR0, single
// steps). A deterministic exit (port or MMIO access, HLT, shutdown) while
// seeking is an error: the recording made none before the target, so the
// replay has diverged.
type VCPUStepper struct {
	CPU   *kvm.VCPU
	bp    uint64
	bpSet bool
}

// ErrExitWhileSeeking: the guest made a deterministic exit before the
// target.
var ErrExitWhileSeeking = errors.New("pmu: the guest made an exit before the target")

// guestDebug sets KVM_SET_GUEST_DEBUG: a single step if step, the
// breakpoint if set and bp.
func (s *VCPUStepper) guestDebug(step, bp bool) error {
	var gd kvm.GuestDebug
	if step {
		gd.Control |= kvm.GuestDebugEnable | kvm.GuestDebugSingleStep
	}
	if bp && s.bpSet {
		gd.Control |= kvm.GuestDebugEnable | kvm.GuestDebugUseHWBP
		gd.DebugReg[0] = s.bp
		gd.DebugReg[7] = dr7ExecDR0
	}
	return s.CPU.SetGuestDebug(gd)
}

// enter runs the guest once and classifies the exit: a debug exit at the
// breakpoint, a completed step (step), or anything that is not the
// guest's business (a kick, a host signal, the counter's overflow signal,
// a stale interrupt window).
func (s *VCPUStepper) enter(step bool) (Stop, error) {
	if err := s.CPU.Run(); err != nil {
		return StopOther, err
	}
	switch r := s.CPU.ExitReason(); r {
	case kvm.ExitIntr:
		s.CPU.ClearImmediateExit()
		return StopOther, nil
	case kvm.ExitIRQWindowOpen:
		s.CPU.SetRequestInterruptWindow(false)
		return StopOther, nil
	case kvm.ExitDebug:
		if step {
			return StopStep, nil
		}
		regs, err := s.CPU.GetRegs()
		if err != nil {
			return StopOther, err
		}
		if s.bpSet && regs.RIP == s.bp {
			return StopBreakpoint, nil
		}
		return StopOther, nil
	default:
		regs, _ := s.CPU.GetRegs()
		return StopOther, fmt.Errorf("%w: %v at rip %#x", ErrExitWhileSeeking, r, regs.RIP)
	}
}

// Run runs the guest until the breakpoint or anything else stops it.
// Standing on the breakpoint, it first steps over it with the breakpoint
// off: RFLAGS.RF is not honoured by every host (this lab's stops again at
// once).
func (s *VCPUStepper) Run() (Stop, error) {
	if s.bpSet {
		r, err := s.CPU.GetRegs()
		if err != nil {
			return StopOther, err
		}
		if r.RIP == s.bp {
			if _, err := s.Step(); err != nil {
				return StopOther, fmt.Errorf("step over the breakpoint: %w", err)
			}
		}
	}
	if err := s.guestDebug(false, true); err != nil {
		return StopOther, err
	}
	return s.enter(false)
}

// Step executes one instruction (one iteration of a REP instruction) with
// the breakpoint off, so that it cannot stop the guest before it moves.
// A step that a host signal cut short stops the guest where it stands.
func (s *VCPUStepper) Step() (Stop, error) {
	if err := s.guestDebug(true, false); err != nil {
		return StopOther, err
	}
	why, err := s.enter(true)
	if derr := s.guestDebug(false, true); derr != nil && err == nil {
		err = derr
	}
	return why, err
}

// Regs reads RIP and RCX.
func (s *VCPUStepper) Regs() (Regs, error) {
	r, err := s.CPU.GetRegs()
	return Regs{RIP: r.RIP, RCX: r.RCX}, err
}

// SetBreakpoint sets the execution breakpoint (DR0).
func (s *VCPUStepper) SetBreakpoint(rip uint64) error {
	s.bp, s.bpSet = rip, true
	return s.guestDebug(false, true)
}

// ClearBreakpoint removes it.
func (s *VCPUStepper) ClearBreakpoint() error {
	s.bpSet = false
	return s.guestDebug(false, false)
}
