package kvm

import (
	"encoding/binary"
	"fmt"
	"runtime"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// This file is the host side of PMU positions: a hardware counter of the
// conditional branches a vCPU retires in guest mode, opened with
// perf_event_open(2) on the vCPU's own thread, whose overflow knocks that
// thread out of KVM_RUN. Which raw event counts "retired conditional
// branches" depends on the CPU; CPUVendorBranchEvent chooses it the way rr
// does.

// RawEvent is a PERF_TYPE_RAW config: the event select and unit mask (and,
// on newer Intel parts, extended unit-mask bits above bit 32) as the CPU's
// event select register takes them. The kernel sets the privilege-level,
// interrupt and enable bits itself.
type RawEvent uint64

// String formats e as perf(1) writes a raw event.
func (e RawEvent) String() string { return fmt.Sprintf("r%x", uint64(e)) }

// perfAttr is struct perf_event_attr as x/sys defines it (PERF_ATTR_SIZE_VER7,
// 128 bytes); perf_test.go checks its size and offsets against the kernel's
// header. A kernel with a newer, larger struct accepts this size: the
// struct only grows at the end.
type perfAttr = unix.PerfEventAttr

// fOwnerEx is struct f_owner_ex, the argument of F_SETOWN_EX.
type fOwnerEx struct {
	Type int32
	PID  int32
}

// fOwnerTID makes F_SETOWN_EX signal one thread rather than the process.
const fOwnerTID = 0

// perfAttrBits are the attr flag bits OpenBranchCounter sets, in the word
// after read_format:
//   - disabled: the counter starts stopped, so that the overflow signal is
//     routed to this thread (F_SETOWN_EX, F_SETSIG, O_ASYNC) before the
//     first overflow can fire, and so that counting starts where the
//     caller says (Reset and Enable at a sync point) rather than at open.
//   - pinned: the counter is on the PMU whenever the thread runs, or it is
//     put in an error state (Read fails) rather than multiplexed: a
//     multiplexed count is scaled, not exact.
//   - exclude_host: count only while the CPU is in guest mode. The guest's
//     kernel and user code both count (exclude_kernel and exclude_user are
//     0; on Intel they become the OS and USR bits, which apply to the
//     guest's privilege level inside VMX non-root mode).
const perfAttrBits = unix.PerfBitDisabled | unix.PerfBitPinned | unix.PerfBitExcludeHost

// PerfCounter is a hardware event counter on the thread that opened it.
// All methods must be called on that thread, which must stay locked to its
// goroutine (runtime.LockOSThread) for the counter's lifetime: the kernel
// counts and signals the thread, not the goroutine.
type PerfCounter struct {
	fd    int
	event RawEvent
}

// OpenBranchCounter opens a counter of event (a retired conditional branch
// event, see CPUVendorBranchEvent) that counts only in guest mode, on the
// calling thread, stopped. Enable starts it.
//
// samplePeriod is the number of events after which the counter overflows;
// 0 means never (in practice 2^60: the kernel cannot turn a counting event
// into a sampling one later, so the counter always samples and SetPeriod
// re-arms it). On overflow the kernel sends KickSignal to this thread, so a
// KVM_RUN in progress returns EINTR (VCPU.Run reports ExitIntr, as for a
// Kick); the caller tells the two apart by reading the counter. The
// overflow interrupt is imprecise: the guest retires up to a
// microarchitecture-dependent number of further branches (the skid, see
// BranchEvent.Skid) before it stops.
//
// Errors name the syscall. ENOENT means the host has no PMU for raw events
// (typical inside a VM without a virtual PMU); EACCES means
// kernel.perf_event_paranoid forbids counting kernel-mode events (the
// guest's kernel) without CAP_PERFMON.
func OpenBranchCounter(event RawEvent, samplePeriod uint64) (*PerfCounter, error) {
	if samplePeriod == 0 {
		samplePeriod = NeverOverflow
	}
	attr := perfAttr{
		Type:   unix.PERF_TYPE_RAW,
		Size:   uint32(unsafe.Sizeof(perfAttr{})),
		Config: uint64(event),
		Sample: samplePeriod,
		Bits:   perfAttrBits,
		// Wake pollers at every overflow. (The signal goes out through
		// fasync at every overflow either way, with or without a buffer.)
		Wakeup: 1,
	}
	op := fmt.Sprintf("perf_event_open(raw event %#x, guest only)", uint64(event))
	fd, err := unix.PerfEventOpen(&attr, 0, -1, -1, unix.PERF_FLAG_FD_CLOEXEC)
	if err != nil {
		return nil, wrap(op, err)
	}
	p := &PerfCounter{fd: fd, event: event}
	if err := p.signalThread(unix.Gettid()); err != nil {
		unix.Close(fd)
		return nil, err
	}
	return p, nil
}

// NeverOverflow is the sample period that stands for "no overflow": 2^60
// branches, decades of guest time.
const NeverOverflow = 1 << 60

// signalThread routes overflow notifications to thread tid as KickSignal.
// The order matters: owner and signal are in place before O_ASYNC turns
// notification on.
func (p *PerfCounter) signalThread(tid int) error {
	own := fOwnerEx{Type: fOwnerTID, PID: int32(tid)}
	if _, _, errno := unix.Syscall(unix.SYS_FCNTL, uintptr(p.fd), unix.F_SETOWN_EX, uintptr(unsafe.Pointer(&own))); errno != 0 {
		return wrap("fcntl(perf event, F_SETOWN_EX)", errno)
	}
	if _, err := unix.FcntlInt(uintptr(p.fd), unix.F_SETSIG, int(KickSignal)); err != nil {
		return wrap("fcntl(perf event, F_SETSIG)", err)
	}
	if _, err := unix.FcntlInt(uintptr(p.fd), unix.F_SETFL, unix.O_ASYNC); err != nil {
		return wrap("fcntl(perf event, F_SETFL O_ASYNC)", err)
	}
	return nil
}

// Event returns the raw event the counter counts.
func (p *PerfCounter) Event() RawEvent { return p.event }

// Read returns the count since the last Reset.
func (p *PerfCounter) Read() (uint64, error) {
	var buf [8]byte
	for {
		n, err := unix.Read(p.fd, buf[:])
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return 0, wrap("read(perf event)", err)
		}
		if n == 0 {
			// A pinned event that could not be scheduled is in the error
			// state, and reads as end of file.
			return 0, &Error{Op: "read(perf event)", Err: fmt.Errorf("pinned counter lost its PMU counter (another user of the PMU?)")}
		}
		if n != len(buf) {
			return 0, &Error{Op: "read(perf event)", Err: fmt.Errorf("read %d bytes, want 8", n)}
		}
		return binary.NativeEndian.Uint64(buf[:]), nil
	}
}

// Reset sets the count to zero. It does not restart the sample period.
func (p *PerfCounter) Reset() error {
	_, err := ioctl(p.fd, unix.PERF_EVENT_IOC_RESET, 0)
	return wrap("ioctl(PERF_EVENT_IOC_RESET)", err)
}

// Enable starts counting.
func (p *PerfCounter) Enable() error {
	_, err := ioctl(p.fd, unix.PERF_EVENT_IOC_ENABLE, 0)
	return wrap("ioctl(PERF_EVENT_IOC_ENABLE)", err)
}

// Disable stops counting; the count is kept.
func (p *PerfCounter) Disable() error {
	_, err := ioctl(p.fd, unix.PERF_EVENT_IOC_DISABLE, 0)
	return wrap("ioctl(PERF_EVENT_IOC_DISABLE)", err)
}

// SetPeriod arms the overflow n events from now; NeverOverflow disarms it.
// Current kernels restart the period at once; old ones applied it only
// after the next overflow (rr's "IOC_PERIOD bug"), which the probe's
// overflow check catches. Some Intel parts refuse periods below 32
// (EINVAL, a kernel workaround for an erratum); the caller then arms that
// much earlier and counts the difference as skid.
func (p *PerfCounter) SetPeriod(n uint64) error {
	op := fmt.Sprintf("ioctl(PERF_EVENT_IOC_PERIOD, %d)", n)
	if n == 0 {
		return &Error{Op: op, Err: unix.EINVAL}
	}
	for {
		// The pointer conversion stays in the Syscall expression, where
		// the compiler keeps n alive and in place.
		_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(p.fd), unix.PERF_EVENT_IOC_PERIOD, uintptr(unsafe.Pointer(&n)))
		if errno == unix.EINTR {
			continue
		}
		if errno != 0 {
			return &Error{Op: op, Err: errno}
		}
		return nil
	}
}

// Close closes the counter.
func (p *PerfCounter) Close() error {
	if p.fd < 0 {
		return nil
	}
	err := unix.Close(p.fd)
	p.fd = -1
	return err
}

// BranchEvent is the retired-conditional-branch event of one CPU model.
type BranchEvent struct {
	// Uarch names the microarchitecture, as rr does.
	Uarch string
	// Raw is the event.
	Raw RawEvent
	// Skid bounds how many further events the guest retires after the
	// counter overflows before it stops (rr's figures: 100 for older Intel
	// cores, 125 for Alder Lake and later, 10000 for AMD Zen, where rr
	// also marks the bound as occasionally exceeded).
	Skid uint64
	// Zen: an AMD Zen core, whose count is exact only with the SpecLockMap
	// optimization disabled (see ZenSpecLockMapDisabled).
	Zen bool
	// Hybrid: an Intel part with performance and efficiency cores. The raw
	// event exists only on the performance cores' PMU (cpu_core, which
	// takes PERF_TYPE_RAW), so the vCPU thread must be pinned to them; on
	// an efficiency core the counter does not count.
	Hybrid bool
}

// Intel event encodings (event select 0xc4, BR_INST_RETIRED; the 0x51 in
// bits 16-23 is rr's "generic" USR|INT|EN, which the kernel replaces):
const (
	// BR_INST_RETIRED.CONDITIONAL, umask 0x01: Nehalem to Comet Lake.
	intelRCB RawEvent = 0x5101c4
	// BR_INST_RETIRED.COND, umask 0x11: Ice Lake (Sunny Cove) and later
	// cores, where umask 0x01 became COND_TAKEN (taken branches only).
	intelRCBCond RawEvent = 0x5111c4
	// The same with bit 40 (umask2) set, as rr uses on Lunar Lake and
	// Arrow Lake.
	intelRCBCondUmask2 RawEvent = 0x100005111c4
	// BR_INST_RETIRED.JCC, umask 0x7e: the Atom cores (Silvermont,
	// Goldmont, Tremont).
	intelAtomRCB RawEvent = 0x517ec4
	// AMD event 0xd1, retired conditional branch instructions, on every Zen
	// family so far (17h, 19h, 1Ah).
	amdZenRCB RawEvent = 0x5100d1
)

// intelModels maps CPUID.1:EAX & 0xf0ff0 (extended model, family and model;
// no stepping, no extended family) to the event, after rr's
// PerfCounters_x86.h. Models missing here are refused rather than guessed:
// a wrong event counts something else, exactly and deterministically
// enough to pass a short probe.
var intelModels = map[uint32]BranchEvent{}

func init() {
	add := func(uarch string, ev RawEvent, skid uint64, hybrid bool, types ...uint32) {
		for _, t := range types {
			intelModels[t] = BranchEvent{Uarch: uarch, Raw: ev, Skid: skid, Hybrid: hybrid}
		}
	}
	add("Intel Nehalem", intelRCB, 100, false, 0x106a0, 0x106e0, 0x206e0)
	add("Intel Westmere", intelRCB, 100, false, 0x20650, 0x206c0, 0x206f0)
	add("Intel Sandy Bridge", intelRCB, 100, false, 0x206a0, 0x206d0, 0x306e0)
	add("Intel Ivy Bridge", intelRCB, 100, false, 0x306a0)
	add("Intel Haswell", intelRCB, 100, false, 0x306c0, 0x306f0, 0x40650, 0x40660)
	add("Intel Broadwell", intelRCB, 100, false, 0x306d0, 0x40670, 0x406f0, 0x50660)
	add("Intel Skylake", intelRCB, 100, false, 0x406e0, 0x50650, 0x506e0)
	add("Intel Kabylake", intelRCB, 100, false, 0x806e0, 0x906e0)
	add("Intel Cometlake", intelRCB, 100, false, 0xa0650, 0xa0660)
	add("Intel Silvermont", intelAtomRCB, 100, false, 0x30670, 0x406c0, 0x50670)
	add("Intel Goldmont", intelAtomRCB, 100, false, 0x506f0, 0x706a0, 0x506c0)
	add("Intel Tremont", intelAtomRCB, 100, false, 0x906c0)
	add("Intel Icelake", intelRCBCond, 100, false, 0x706e0, 0x606a0, 0x80660)
	add("Intel Tigerlake", intelRCBCond, 100, false, 0x806c0, 0x806d0)
	add("Intel Rocketlake", intelRCBCond, 100, false, 0xa0670)
	add("Intel Sapphire Rapids", intelRCBCond, 125, false, 0x806f0)
	add("Intel Emerald Rapids", intelRCBCond, 125, false, 0xc06f0)
	add("Intel Alderlake", intelRCBCond, 125, true, 0x90670, 0x906a0)
	add("Intel Raptorlake", intelRCBCond, 125, true, 0xb0670, 0xb06a0, 0xb06f0)
	add("Intel Meteorlake", intelRCBCond, 125, true, 0xa06a0)
	add("Intel Lunarlake", intelRCBCondUmask2, 125, true, 0xb06d0)
	add("Intel Arrowlake", intelRCBCondUmask2, 125, true, 0xc0660)
}

// CPUVendorBranchEvent chooses the retired-conditional-branch event from the
// host's CPUID leaves, as System.SupportedCPUID returns them (KVM passes
// leaf 0's vendor and leaf 1's EAX through from the host unchanged). It
// refuses CPUs without such an event (Intel Core 2, AMD before Zen: rr
// counts taken branches there, a different position) and Intel models it
// does not know.
func CPUVendorBranchEvent(cpuid []CPUIDEntry) (BranchEvent, error) {
	leaf := func(fn uint32) (CPUIDEntry, bool) {
		for _, e := range cpuid {
			if e.Function == fn && e.Index == 0 {
				return e, true
			}
		}
		return CPUIDEntry{}, false
	}
	l0, ok0 := leaf(0)
	l1, ok1 := leaf(1)
	if !ok0 || !ok1 {
		return BranchEvent{}, fmt.Errorf("kvm: CPUID leaves 0 and 1 missing")
	}
	var v [12]byte
	for i, r := range []uint32{l0.EBX, l0.EDX, l0.ECX} {
		v[4*i], v[4*i+1], v[4*i+2], v[4*i+3] = byte(r), byte(r>>8), byte(r>>16), byte(r>>24)
	}
	vendor := string(v[:])
	cpuType := l1.EAX & 0xf0ff0
	family := (l1.EAX >> 8) & 0xf
	if family == 0xf {
		family += (l1.EAX >> 20) & 0xff
	}
	model := (l1.EAX>>4)&0xf | (l1.EAX>>12)&0xf0
	switch vendor {
	case "GenuineIntel":
		ev, ok := intelModels[cpuType]
		if !ok {
			return BranchEvent{}, fmt.Errorf("kvm: Intel family %#x model %#x: no known retired-conditional-branch event", family, model)
		}
		if l7, ok := leaf(7); ok && l7.EDX&(1<<15) != 0 {
			ev.Hybrid = true
		}
		return ev, nil
	case "AuthenticAMD":
		switch family {
		case 0x17:
			return BranchEvent{Uarch: "AMD Zen/Zen 2 (family 17h)", Raw: amdZenRCB, Skid: 10000, Zen: true}, nil
		case 0x19:
			return BranchEvent{Uarch: "AMD Zen 3/Zen 4 (family 19h)", Raw: amdZenRCB, Skid: 10000, Zen: true}, nil
		case 0x1a:
			return BranchEvent{Uarch: "AMD Zen 5 (family 1Ah)", Raw: amdZenRCB, Skid: 10000, Zen: true}, nil
		}
		return BranchEvent{}, fmt.Errorf("kvm: AMD family %#x model %#x: no retired-conditional-branch event (Zen and later only)", family, model)
	}
	return BranchEvent{}, fmt.Errorf("kvm: CPU vendor %q: no known retired-conditional-branch event", vendor)
}

// zenSpecLockMapCommit is AMD event 0x25 (retired lock instructions) with
// unit mask 0x08, SpecLockMapCommit.
const zenSpecLockMapCommit RawEvent = 0x510825

// ZenSpecLockMapDisabled reports whether the SpecLockMap optimization is
// off on this Zen core. With it on, the branch counter occasionally counts
// wrong around locked instructions (rr issue #2034); rr's workaround sets
// bit 54 of MSR 0xc0011020 (LS_CFG) on every CPU, which disables it until
// the next reset. The check is rr's: count host user-mode SpecLockMapCommit
// events across one locked add; with the optimization off the count does
// not move. Only meaningful on Zen (BranchEvent.Zen).
func ZenSpecLockMapDisabled() (bool, error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	attr := perfAttr{
		Type:   unix.PERF_TYPE_RAW,
		Size:   uint32(unsafe.Sizeof(perfAttr{})),
		Config: uint64(zenSpecLockMapCommit),
		Bits:   unix.PerfBitExcludeKernel | unix.PerfBitExcludeHv | unix.PerfBitExcludeGuest,
	}
	fd, err := unix.PerfEventOpen(&attr, 0, -1, -1, unix.PERF_FLAG_FD_CLOEXEC)
	if err != nil {
		return false, wrap(fmt.Sprintf("perf_event_open(raw event %#x, host user)", uint64(zenSpecLockMapCommit)), err)
	}
	p := &PerfCounter{fd: fd, event: zenSpecLockMapCommit}
	defer p.Close()
	before, err := p.Read()
	if err != nil {
		return false, err
	}
	var x int32
	atomic.AddInt32(&x, 1) // LOCK XADD
	after, err := p.Read()
	if err != nil {
		return false, err
	}
	return after == before, nil
}
