package machine

import (
	"fmt"

	"github.com/gokvm-ft/gokvm-ft/kvm"
)

// VCPUState is the complete guest-visible state of the vCPU: registers,
// FPU/SSE (XSAVE area where KVM has it), XCRs, the MSRs of the CPU policy,
// pending and injected events (an interrupt accepted by KVM_INTERRUPT but
// not yet delivered lives in Events.Interrupt), debug registers and the MP
// state.
type VCPUState struct {
	Regs      kvm.Regs
	Sregs     kvm.Sregs
	FPU       kvm.FPU
	XSAVE     *kvm.XSAVE `json:",omitempty"`
	XCRs      *kvm.XCRs  `json:",omitempty"`
	MSRs      []kvm.MSR
	Events    kvm.VCPUEvents
	DebugRegs kvm.DebugRegs
	MPState   kvm.MPState
}

// completeExit finishes a pending PIO/MMIO "in" exit without running guest
// code: KVM copies the data we supplied into the guest's registers only on
// the next KVM_RUN, so state read before that would miss it.
func (m *Machine) completeExit() error {
	m.cpu.SetImmediateExit(true)
	err := m.cpu.Run()
	m.cpu.SetImmediateExit(false)
	if err != nil {
		return err
	}
	if r := m.cpu.ExitReason(); r != kvm.ExitIntr {
		regs, _ := m.cpu.GetRegs()
		detail := ""
		if r == kvm.ExitMMIO {
			mm := m.cpu.MMIO()
			detail = fmt.Sprintf(" (address %#x, %d bytes, write %v)", mm.PhysAddr, mm.Len, mm.IsWrite != 0)
		}
		return fmt.Errorf("completing the last exit: unexpected exit %v%s at rip %#x", r, detail, regs.RIP)
	}
	return nil
}

// completePendingIO is completeExit if the last exit was a port or MMIO
// access (a kick's needs nothing).
func (m *Machine) completePendingIO() error {
	if r := m.cpu.ExitReason(); r == kvm.ExitIO || r == kvm.ExitMMIO {
		return m.completeExit()
	}
	return nil
}

// SaveVCPU returns the vCPU state at a consistent point. Call it only while
// the machine is not running.
func (m *Machine) SaveVCPU() (*VCPUState, error) {
	if err := m.completeExit(); err != nil {
		return nil, err
	}
	c := m.cpu
	s := &VCPUState{}
	var err error
	if s.Regs, err = c.GetRegs(); err != nil {
		return nil, err
	}
	if s.Sregs, err = c.GetSregs(); err != nil {
		return nil, err
	}
	if s.FPU, err = c.GetFPU(); err != nil {
		return nil, err
	}
	if m.sys.CheckExtension(kvm.CapXSAVE) != 0 {
		if s.XSAVE, err = c.GetXSAVE(); err != nil {
			return nil, err
		}
	}
	if m.sys.CheckExtension(kvm.CapXCRs) != 0 {
		x, err := c.GetXCRs()
		if err != nil {
			return nil, err
		}
		s.XCRs = &x
	}
	list, err := m.sys.MSRIndexList()
	if err != nil {
		return nil, err
	}
	for _, i := range m.policy.SavedMSRs(list) {
		s.MSRs = append(s.MSRs, kvm.MSR{Index: i})
	}
	if err := c.GetMSRs(s.MSRs); err != nil {
		return nil, err
	}
	if s.Events, err = c.GetVCPUEvents(); err != nil {
		return nil, err
	}
	if s.DebugRegs, err = c.GetDebugRegs(); err != nil {
		return nil, err
	}
	if s.MPState, err = c.GetMPState(); err != nil {
		return nil, err
	}
	return s, nil
}

// RestoreVCPU loads a saved vCPU state. Call it only while the machine is
// not running.
func (m *Machine) RestoreVCPU(s *VCPUState) error {
	c := m.cpu
	if err := c.SetSregs(s.Sregs); err != nil {
		return err
	}
	if err := c.SetRegs(s.Regs); err != nil {
		return err
	}
	if s.XCRs != nil {
		if err := c.SetXCRs(*s.XCRs); err != nil {
			return err
		}
	}
	if s.XSAVE != nil {
		if err := c.SetXSAVE(s.XSAVE); err != nil {
			return err
		}
	} else if err := c.SetFPU(s.FPU); err != nil {
		return err
	}
	msrs := s.MSRs
	if m.policy.Host == HostLabPVM {
		// Guest user mode reads the host TSC natively here, so the guest
		// TSC stays the host's (offset 0) rather than the saved value:
		// to the guest the time between save and restore passed as if
		// it had been paused.
		msrs = nil
		for _, r := range s.MSRs {
			if r.Index != MSRTSC {
				msrs = append(msrs, r)
			}
		}
	}
	if err := c.SetMSRs(msrs); err != nil {
		return err
	}
	if m.policy.Host == HostLabPVM && c.HasTSCOffset() {
		if err := c.SetTSCOffset(0); err != nil {
			return err
		}
	}
	ev := s.Events
	ev.Flags |= kvm.VCPUEventValidNMIPending | kvm.VCPUEventValidShadow
	if err := c.SetVCPUEvents(ev); err != nil {
		return err
	}
	if err := c.SetDebugRegs(s.DebugRegs); err != nil {
		return err
	}
	return c.SetMPState(s.MPState)
}
