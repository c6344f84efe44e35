package pmu

import (
	"fmt"
	"runtime"
	"strings"

	"github.com/gokvm-ft/gokvm-ft/kvm"
)

// HostEvent picks this host's retired-conditional-branch event from its
// CPUID, as KVM reports it.
func HostEvent() (kvm.BranchEvent, error) {
	sys, err := kvm.Open()
	if err != nil {
		return kvm.BranchEvent{}, err
	}
	defer sys.Close()
	ids, err := sys.SupportedCPUID()
	if err != nil {
		return kvm.BranchEvent{}, err
	}
	return kvm.CPUVendorBranchEvent(ids)
}

// HostCounter is Probes.Open for this host: it opens the host's branch
// counter on the calling thread and closes it again, and on AMD Zen
// refuses a core with SpecLockMap on (rr's check).
func HostCounter() error {
	ev, err := HostEvent()
	if err != nil {
		return err
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	c, err := kvm.OpenBranchCounter(ev.Raw, 0)
	if err != nil {
		return fmt.Errorf("%s: %w", ev.Uarch, err)
	}
	if err := c.Close(); err != nil {
		return err
	}
	if ev.Zen {
		off, err := kvm.ZenSpecLockMapDisabled()
		if err != nil {
			return fmt.Errorf("%s: checking SpecLockMap: %w", ev.Uarch, err)
		}
		if !off {
			return fmt.Errorf("%s: SpecLockMap is on, so the branch count is not exact; set bit 54 of MSR 0xc0011020 on every CPU (rr's zen_workaround)", ev.Uarch)
		}
	}
	return nil
}

// PerfCounter is a Counter on a kvm.PerfCounter opened on the vCPU's
// thread (and used only there). ArmOverflow relies on
// PERF_EVENT_IOC_PERIOD restarting the period at once, which Probe's
// overflow check confirms.
type PerfCounter struct {
	C *kvm.PerfCounter
}

// Branches reads the count.
func (p PerfCounter) Branches() (uint64, error) { return p.C.Read() }

// ArmOverflow arms the overflow n branches from now.
func (p PerfCounter) ArmOverflow(n uint64) error { return p.C.SetPeriod(n) }

// Disarm pushes the overflow out of reach.
func (p PerfCounter) Disarm() error { return p.C.SetPeriod(kvm.NeverOverflow) }

// ProbeHost is Probe on this host, on the calling goroutine (locked to its
// thread for the duration): HostCounter, a HostDebugGuest at CPL3 and a
// HostLoop counting HostEvent's event, with HostEvent's skid; runs as
// Probes.Runs. Guest debugging is checked at CPL0 too, as part of the same
// step: where the CPL3 check passes, a CPL0 failure is the verdict. Where
// the counter does not open, Probe stops there, and ProbeHost still checks
// guest debugging at both levels (a few KVM_RUNs) and adds what it found to
// the reason, so that a host without a PMU also says whether single steps
// and breakpoints would work.
func ProbeHost(runs int) Result {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var skid uint64
	var event kvm.RawEvent
	if ev, err := HostEvent(); err == nil {
		skid, event = ev.Skid, ev.Raw
	}
	var openErr error
	p := Probes{
		Open: func() error { openErr = HostCounter(); return openErr },
		Runs: runs,
		Skid: skid,
	}
	user, userErr := NewHostDebugGuest(true)
	if userErr == nil {
		defer user.Close()
		p.Debug = user
	}
	loop := NewHostLoop(event)
	defer loop.Close()
	p.Loop = loop

	r := Probe(p)
	// checkCPL0 checks guest debugging at CPL0.
	checkCPL0 := func() error {
		g, err := NewHostDebugGuest(false)
		if err != nil {
			return fmt.Errorf("no probe guest: %w", err)
		}
		defer g.Close()
		return CheckDebug(g)
	}
	switch {
	case openErr != nil:
		// Probe stopped at the counter; say what guest debugging does.
		if userErr != nil {
			r.Reason += "; guest debugging not checked either: " + userErr.Error()
			break
		}
		for _, c := range []struct {
			level string
			err   error
		}{{"CPL3", CheckDebug(user)}, {"CPL0", checkCPL0()}} {
			if c.err != nil {
				r.Reason += "; guest debugging at " + c.level + " does not work: " + c.err.Error()
			} else {
				r.Reason += "; guest debugging at " + c.level + " works"
			}
		}
	case userErr != nil:
		r = Result{Reason: "guest debugging not checked: " + userErr.Error()}
	case strings.HasPrefix(r.Reason, "guest debugging does not work: "):
		// The CPL3 check failed: that is the verdict.
	default:
		// Probe passed guest debugging at CPL3, and then the counter's
		// checks passed or failed; a CPL0 failure comes first.
		if err := checkCPL0(); err != nil {
			r = Result{Reason: "guest debugging does not work: " + err.Error()}
		} else if loop.setupErr != nil && !r.Usable && strings.HasPrefix(r.Reason, "counter not exact: ") {
			// The loop guest never ran: say so rather than blame the
			// counter.
			r = Result{Reason: "counter exactness not checked: " + loop.setupErr.Error()}
		}
	}
	return r
}
