package pmu

import (
	"fmt"
	"runtime"

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
