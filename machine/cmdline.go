package machine

import (
	"fmt"
	"strings"
)

// baseCmdline is what Linux must be told about this machine: the console
// is the 16550A at 0x3f8; there is no local APIC or IO-APIC (the 8259A pair
// is the interrupt controller), the PIT timer check would
// only waste time. Each word is documented in images/README.md.
const baseCmdline = "console=ttyS0 earlyprintk=serial,ttyS0,115200 nolapic noapic no_timer_check reboot=k panic=-1"

// labCmdline switches on the guest-kernel workarounds of images/patches
// that this lab's nested KVM needs; bare metal gets none of them. The PVM
// host overrides CPUID leaves 1, 7 and 0xd with its own bits whatever
// KVM_SET_CPUID2 says (see Machine.CPUIDOverridden), so the CPU features
// its instruction emulator cannot run in guest kernel mode are taken away
// on the command line: XSAVE (XRSTOR), CMPXCHG16B, POPCNT, SMAP
// (CLAC/STAC), SMEP, FSGSBASE, PCID/INVPCID, AVX; and the ones the CPU policy
// hides on every host for determinism: RDRAND, RDSEED, RDPID, RDTSCP,
// x2APIC, TSC deadline. ERMS and FSRM go too, for speed: the emulator runs
// REP MOVSB one byte per step, so with them Linux's memcpy (REP MOVSB) costs
// about 2 us per byte here; without them it uses REP MOVSQ, eight bytes a
// step, which halved the time to unpack the initramfs.
//
// User mode needs one more: with noxsave the kernel saves only the x87 and
// SSE state of a task, but user-mode CPUID here shows the host's OSXSAVE
// and AVX bits and XGETBV answers with the host's XCR0
// (TestProbeUserAVXWithoutOSXSAVE), so programs use YMM and ZMM registers
// whose upper parts a context switch then hands from one task to the
// next. GODEBUG=cpu.all=off, which Linux passes to init's environment,
// keeps Go programs (all of u-root) to the baseline instruction set.
const labCmdline = "gokvm.lab=1 noxsave clearcpuid=cx16,popcnt,smep,smap,fsgsbase,pcid,invpcid,avx,avx2,rdrand,rdseed,rdpid,rdtscp,x2apic,tsc_deadline_timer,erms,fsrm GODEBUG=cpu.all=off"

// KernelCmdline is the kernel command line for this machine on a host of
// the given kind, followed by the user's extra arguments. tscKHz, when not
// 0, is the guest TSC frequency: Linux is told it (tsc_early_khz, and lpj
// for HZ=100) instead of calibrating the TSC against the PIT, thousands of
// port exits that on AMD (no CPUID frequency leaf) it cannot avoid.
func KernelCmdline(host HostKind, tscKHz uint32, extra string) string {
	parts := []string{baseCmdline}
	if tscKHz != 0 {
		parts = append(parts, fmt.Sprintf("tsc_early_khz=%d lpj=%d tsc=reliable", tscKHz, uint64(tscKHz)*10))
	}
	if host == HostLabPVM {
		parts = append(parts, labCmdline)
	}
	if extra = strings.TrimSpace(extra); extra != "" {
		parts = append(parts, extra)
	}
	return strings.Join(parts, " ")
}

// journalCmdline keeps a recorded or replayed guest off the host: no TSC
// (clearcpuid=tsc: no TSC clocksource and a jiffies sched_clock, so the
// kernel reads time only through the PIT and the log), no address-space
// randomization. The kernel's entropy pool stays off the TSC too, with
// images/patches/0005; see images/README.md.
const journalCmdline = "clocksource=jiffies nokaslr norandmaps random.trust_cpu=off random.trust_bootloader=off"

// KernelCmdline is the command line for Linux on this machine. Under a
// journal (record or replay) it keeps the guest off the host's TSC.
func (m *Machine) KernelCmdline(extra string) string {
	khz, err := m.cpu.GetTSCKHz()
	if err != nil {
		khz = 0
	}
	if v := m.VirtioCmdline(); v != "" {
		extra = v + " " + extra
	}
	if m.journal == nil {
		return KernelCmdline(m.policy.Host, khz, extra)
	}
	line := KernelCmdline(m.policy.Host, 0, "")
	if strings.Contains(line, "clearcpuid=") {
		line = strings.Replace(line, "clearcpuid=", "clearcpuid=tsc,", 1)
	} else {
		line += " clearcpuid=tsc"
	}
	parts := []string{line, journalCmdline}
	if khz != 0 {
		// No delay-loop calibration: it spins waiting for jiffies, and a
		// guest that spins without exits gets no timer tick under a
		// journal.
		parts = append(parts, fmt.Sprintf("lpj=%d", uint64(khz)*10))
	}
	if extra = strings.TrimSpace(extra); extra != "" {
		parts = append(parts, extra)
	}
	return strings.Join(parts, " ")
}
