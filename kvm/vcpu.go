package kvm

import (
	"fmt"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// VCPU is a KVM virtual CPU. Run and the state accessors belong to the one
// goroutine that runs it (locked to its OS thread); Kick may be called from
// any goroutine.
type VCPU struct {
	fd  int
	run []byte
	hdr *runHeader

	tid atomic.Int32 // OS thread running KVM_RUN, for kicks; 0 when none
}

// Close unmaps kvm_run and closes the vCPU.
func (c *VCPU) Close() error {
	if c.fd < 0 {
		return nil
	}
	unix.Munmap(c.run)
	err := unix.Close(c.fd)
	c.fd = -1
	return err
}

// Run enters the guest until the next exit. A kick or a host signal makes
// it return with ExitIntr and a nil error; read the exit with ExitReason.
func (c *VCPU) Run() error {
	_, err := ioctl(c.fd, ioRun, 0)
	if err == unix.EINTR {
		c.hdr.ExitReason = uint32(ExitIntr)
		return nil
	}
	return wrap("KVM_RUN", err)
}

// BindThread records the calling OS thread as the one that runs this vCPU,
// so Kick can signal it. The caller must have called runtime.LockOSThread.
func (c *VCPU) BindThread() { c.tid.Store(int32(unix.Gettid())) }

// UnbindThread forgets the running thread.
func (c *VCPU) UnbindThread() { c.tid.Store(0) }

// KickSignal is the signal used to knock a vCPU thread out of KVM_RUN.
// SIGURG is the Go runtime's own preemption signal: it always has a handler
// installed (so it interrupts the ioctl) and an unexpected one is harmless.
const KickSignal = unix.SIGURG

// Kick makes the vCPU leave the guest soon: KVM_RUN returns now if it is
// running, and the next KVM_RUN returns at once if not (immediate_exit),
// until the run loop calls ClearImmediateExit.
func (c *VCPU) Kick() {
	// A byte store is atomic on x86; the kernel reads it on entry to KVM_RUN.
	(*atomic.Uint32)(unsafe.Pointer(&c.run[0])).Or(1 << 8)
	if tid := c.tid.Load(); tid != 0 {
		unix.Tgkill(unix.Getpid(), int(tid), KickSignal)
	}
}

// ClearImmediateExit re-arms the vCPU after a kick has been seen. It
// reports whether a kick was pending.
func (c *VCPU) ClearImmediateExit() bool {
	old := (*atomic.Uint32)(unsafe.Pointer(&c.run[0])).And(^uint32(0xff << 8))
	return old&(0xff<<8) != 0
}

// SetImmediateExit arms or clears immediate_exit directly: with it set,
// KVM_RUN completes a pending PIO/MMIO "in" and returns without running the
// guest, which is how a consistent state is taken after such an exit.
func (c *VCPU) SetImmediateExit(on bool) {
	if on {
		(*atomic.Uint32)(unsafe.Pointer(&c.run[0])).Or(1 << 8)
	} else {
		c.ClearImmediateExit()
	}
}

// SetRequestInterruptWindow asks for ExitIRQWindowOpen as soon as the guest
// can take an external interrupt.
func (c *VCPU) SetRequestInterruptWindow(on bool) {
	var v uint32
	if on {
		v = 1
	}
	p := (*atomic.Uint32)(unsafe.Pointer(&c.run[0]))
	for {
		old := p.Load()
		if p.CompareAndSwap(old, old&^0xff|v) {
			return
		}
	}
}

// ExitReason is the reason of the last exit.
func (c *VCPU) ExitReason() ExitReason { return ExitReason(c.hdr.ExitReason) }

// ReadyForInterruptInjection reports kvm_run.ready_for_interrupt_injection.
func (c *VCPU) ReadyForInterruptInjection() bool { return c.hdr.ReadyForInterruptInjection != 0 }

// IFFlag reports kvm_run.if_flag: the guest's RFLAGS.IF at the exit.
func (c *VCPU) IFFlag() bool { return c.hdr.IFFlag != 0 }

// IO returns the io exit description (valid when ExitReason is ExitIO).
func (c *VCPU) IO() *IOExit { return (*IOExit)(unsafe.Pointer(&c.run[runExitOffset])) }

// IOData returns the data area of the current io exit: Size*Count bytes
// inside the kvm_run mapping, or an error if KVM's offset is out of range.
func (c *VCPU) IOData() ([]byte, error) {
	io := c.IO()
	n := uint64(io.Size) * uint64(io.Count)
	if io.DataOffset > uint64(len(c.run)) || n > uint64(len(c.run))-io.DataOffset {
		return nil, fmt.Errorf("kvm: io exit data [%#x, +%d) outside kvm_run (%d bytes)", io.DataOffset, n, len(c.run))
	}
	return c.run[io.DataOffset : io.DataOffset+n], nil
}

// MMIO returns the mmio exit description (valid when ExitReason is ExitMMIO).
func (c *VCPU) MMIO() *MMIOExit { return (*MMIOExit)(unsafe.Pointer(&c.run[runExitOffset])) }

// FailEntry returns the fail_entry exit description.
func (c *VCPU) FailEntry() FailEntryExit {
	return *(*FailEntryExit)(unsafe.Pointer(&c.run[runExitOffset]))
}

// InternalError returns the internal error exit description.
func (c *VCPU) InternalError() InternalErrorExit {
	return *(*InternalErrorExit)(unsafe.Pointer(&c.run[runExitOffset]))
}

// SystemEvent returns the system_event exit description.
func (c *VCPU) SystemEvent() SystemEventExit {
	return *(*SystemEventExit)(unsafe.Pointer(&c.run[runExitOffset]))
}

// Interrupt queues an external interrupt vector (no in-kernel irqchip). KVM
// delivers it at the next entry; until then it is vCPU state visible in
// GetVCPUEvents as Interrupt.Injected.
func (c *VCPU) Interrupt(vector uint8) error {
	irq := interrupt{IRQ: uint32(vector)}
	return wrap("KVM_INTERRUPT", ioctlPtr(c.fd, ioInterrupt, &irq))
}

// GetRegs reads the general-purpose registers.
//
// RFLAGS bit 1 is 1 in every x86 state (KVM sets it on every write), so an
// answer without it is not the vCPU's: see readState.
func (c *VCPU) GetRegs() (Regs, error) {
	return readState("KVM_GET_REGS", func(r *Regs) error { return ioctlPtr(c.fd, ioGetRegs, r) },
		func(r *Regs) bool { return r.RFLAGS&rflagsFixed == 0 })
}

// rflagsFixed is RFLAGS bit 1, always set.
const rflagsFixed = 1 << 1

// readStateTries bounds the reads of readState.
const readStateTries = 4

// readState reads vCPU state with get, reading again an answer that
// cannot be a vCPU's (bogus): this lab's nested host (PVM) now and then
// answers KVM_GET_REGS and KVM_GET_SREGS with all zeros, and right when
// asked again (BENCHMARKS.md, lab host). After readStateTries bogus
// answers it reports an error. On a host without the fault, bogus never
// holds and this is one read.
func readState[T any](op string, get func(*T) error, bogus func(*T) bool) (T, error) {
	for try := 1; ; try++ {
		var v T
		if err := get(&v); err != nil {
			return v, wrap(op, err)
		}
		if !bogus(&v) {
			return v, nil
		}
		if try == readStateTries {
			return v, &Error{Op: op, Err: fmt.Errorf("%d answers in a row that cannot be the vCPU's state (all zeros)", try)}
		}
	}
}

// SetRegs writes the general-purpose registers.
func (c *VCPU) SetRegs(r Regs) error { return wrap("KVM_SET_REGS", ioctlPtr(c.fd, ioSetRegs, &r)) }

// GetSregs reads the special registers.
//
// Every vCPU has a code segment with a limit (0xffff at reset), so an
// all-zero answer is not the vCPU's: see readState.
func (c *VCPU) GetSregs() (Sregs, error) {
	return readState("KVM_GET_SREGS", func(s *Sregs) error { return ioctlPtr(c.fd, ioGetSregs, s) },
		func(s *Sregs) bool { return *s == Sregs{} })
}

// SetSregs writes the special registers.
func (c *VCPU) SetSregs(s Sregs) error { return wrap("KVM_SET_SREGS", ioctlPtr(c.fd, ioSetSregs, &s)) }

// GetFPU reads the legacy FPU/SSE state.
func (c *VCPU) GetFPU() (FPU, error) {
	var f FPU
	return f, wrap("KVM_GET_FPU", ioctlPtr(c.fd, ioGetFPU, &f))
}

// SetFPU writes the legacy FPU/SSE state.
func (c *VCPU) SetFPU(f FPU) error { return wrap("KVM_SET_FPU", ioctlPtr(c.fd, ioSetFPU, &f)) }

// GetXSAVE reads the XSAVE area (needs CapXSAVE).
func (c *VCPU) GetXSAVE() (*XSAVE, error) {
	x := new(XSAVE)
	return x, wrap("KVM_GET_XSAVE", ioctlPtr(c.fd, ioGetXSAVE, x))
}

// SetXSAVE writes the XSAVE area.
func (c *VCPU) SetXSAVE(x *XSAVE) error { return wrap("KVM_SET_XSAVE", ioctlPtr(c.fd, ioSetXSAVE, x)) }

// GetXCRs reads the extended control registers (needs CapXCRs).
func (c *VCPU) GetXCRs() (XCRs, error) {
	var x XCRs
	return x, wrap("KVM_GET_XCRS", ioctlPtr(c.fd, ioGetXCRs, &x))
}

// SetXCRs writes the extended control registers.
func (c *VCPU) SetXCRs(x XCRs) error { return wrap("KVM_SET_XCRS", ioctlPtr(c.fd, ioSetXCRs, &x)) }

// GetVCPUEvents reads pending/injected events.
func (c *VCPU) GetVCPUEvents() (VCPUEvents, error) {
	var e VCPUEvents
	return e, wrap("KVM_GET_VCPU_EVENTS", ioctlPtr(c.fd, ioGetVCPUEvents, &e))
}

// SetVCPUEvents writes pending/injected events.
func (c *VCPU) SetVCPUEvents(e VCPUEvents) error {
	return wrap("KVM_SET_VCPU_EVENTS", ioctlPtr(c.fd, ioSetVCPUEvents, &e))
}

// GetDebugRegs reads DR0-3, DR6, DR7.
func (c *VCPU) GetDebugRegs() (DebugRegs, error) {
	var d DebugRegs
	return d, wrap("KVM_GET_DEBUGREGS", ioctlPtr(c.fd, ioGetDebugRegs, &d))
}

// SetDebugRegs writes DR0-3, DR6, DR7.
func (c *VCPU) SetDebugRegs(d DebugRegs) error {
	return wrap("KVM_SET_DEBUGREGS", ioctlPtr(c.fd, ioSetDebugRegs, &d))
}

// GetMPState reads the multiprocessing state (runnable, halted, ...).
func (c *VCPU) GetMPState() (MPState, error) {
	var m MPState
	return m, wrap("KVM_GET_MP_STATE", ioctlPtr(c.fd, ioGetMPState, &m))
}

// SetMPState writes the multiprocessing state.
func (c *VCPU) SetMPState(m MPState) error {
	return wrap("KVM_SET_MP_STATE", ioctlPtr(c.fd, ioSetMPState, &m))
}

// SetGuestDebug sets single-step / breakpoint control.
func (c *VCPU) SetGuestDebug(d GuestDebug) error {
	return wrap("KVM_SET_GUEST_DEBUG", ioctlPtr(c.fd, ioSetGuestDebug, &d))
}

// Translate walks the guest page tables for a linear address.
func (c *VCPU) Translate(linear uint64) (Translation, error) {
	t := Translation{LinearAddress: linear}
	return t, wrap("KVM_TRANSLATE", ioctlPtr(c.fd, ioTranslate, &t))
}

// SetCPUID2 sets the CPUID leaves the guest sees.
func (c *VCPU) SetCPUID2(entries []CPUIDEntry) error {
	hs, es := unsafe.Sizeof(cpuidHeader{}), unsafe.Sizeof(CPUIDEntry{})
	buf := make([]byte, hs+uintptr(len(entries))*es)
	(*cpuidHeader)(unsafe.Pointer(&buf[0])).Nent = uint32(len(entries))
	if len(entries) > 0 {
		copy(unsafe.Slice((*CPUIDEntry)(unsafe.Pointer(&buf[hs])), len(entries)), entries)
	}
	_, err := ioctl(c.fd, ioSetCPUID2, uintptr(unsafe.Pointer(&buf[0])))
	return wrap("KVM_SET_CPUID2", err)
}

// GetCPUID2 reads back the CPUID leaves set on this vCPU.
func (c *VCPU) GetCPUID2() ([]CPUIDEntry, error) {
	for n := 128; n <= 4096; n *= 2 {
		e, err := getCPUID(c.fd, ioGetCPUID2, n)
		if err == unix.E2BIG {
			continue
		}
		return e, wrap("KVM_GET_CPUID2", err)
	}
	return nil, &Error{Op: "KVM_GET_CPUID2", Err: unix.E2BIG}
}

// GetMSRs reads the MSRs named by the Index fields of msrs, in place. It
// returns an error unless all of them were read.
func (c *VCPU) GetMSRs(msrs []MSR) error {
	n, err := c.msrIoctl(ioGetMSRs, msrs, true)
	if err != nil {
		return wrap("KVM_GET_MSRS", err)
	}
	if n != len(msrs) {
		return fmt.Errorf("kvm: KVM_GET_MSRS read %d of %d MSRs; MSR %#x refused", n, len(msrs), msrs[n].Index)
	}
	return nil
}

// SetMSRs writes msrs. It returns an error unless all of them were written.
func (c *VCPU) SetMSRs(msrs []MSR) error {
	n, err := c.msrIoctl(ioSetMSRs, msrs, false)
	if err != nil {
		return wrap("KVM_SET_MSRS", err)
	}
	if n != len(msrs) {
		return fmt.Errorf("kvm: KVM_SET_MSRS wrote %d of %d MSRs; MSR %#x refused", n, len(msrs), msrs[n].Index)
	}
	return nil
}

func (c *VCPU) msrIoctl(req uintptr, msrs []MSR, readBack bool) (int, error) {
	if len(msrs) == 0 {
		return 0, nil
	}
	hs, es := unsafe.Sizeof(msrsHeader{}), unsafe.Sizeof(MSR{})
	buf := make([]byte, hs+uintptr(len(msrs))*es)
	(*msrsHeader)(unsafe.Pointer(&buf[0])).NMSRs = uint32(len(msrs))
	area := unsafe.Slice((*MSR)(unsafe.Pointer(&buf[hs])), len(msrs))
	copy(area, msrs)
	n, err := ioctl(c.fd, req, uintptr(unsafe.Pointer(&buf[0])))
	if err != nil {
		return 0, err
	}
	if readBack {
		copy(msrs, area)
	}
	return int(n), nil
}

// GetTSCKHz returns the guest TSC frequency (needs CapGetTSCKHz).
func (c *VCPU) GetTSCKHz() (uint32, error) {
	r, err := ioctl(c.fd, ioGetTSCKHz, 0)
	return uint32(r), wrap("KVM_GET_TSC_KHZ", err)
}

// SetTSCKHz sets the guest TSC frequency (needs CapTSCControl).
func (c *VCPU) SetTSCKHz(khz uint32) error {
	_, err := ioctl(c.fd, ioSetTSCKHz, uintptr(khz))
	return wrap("KVM_SET_TSC_KHZ", err)
}
