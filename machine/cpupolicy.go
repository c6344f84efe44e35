package machine

import (
	"fmt"
	"os"
	"strings"

	"github.com/gokvm-ft/gokvm-ft/kvm"
)

// HostKind is the kind of KVM host we run on. Some guest CPU features must
// be hidden only on the lab's nested KVM; on bare metal they stay visible.
type HostKind int

// Host kinds.
const (
	// HostBareMetal is an ordinary KVM host: only the always-hidden
	// features are masked.
	HostBareMetal HostKind = iota
	// HostLabPVM is a nested "PVM" KVM (module kvm_pvm): guest kernel-mode
	// code is run by an instruction emulator that lacks XRSTOR, CLAC/STAC,
	// POPCNT, FNCLEX and others, so the guest must not be told they exist.
	HostLabPVM
)

func (k HostKind) String() string {
	if k == HostLabPVM {
		return "lab-pvm"
	}
	return "bare-metal"
}

// DetectHostKind looks for the PVM module in sysfs.
func DetectHostKind() HostKind {
	if _, err := os.Stat("/sys/module/kvm_pvm"); err == nil {
		return HostLabPVM
	}
	return HostBareMetal
}

// ParseHostKind parses "auto", "lab" or "bare-metal" (the -host flag).
func ParseHostKind(s string) (HostKind, error) {
	switch s {
	case "", "auto":
		return DetectHostKind(), nil
	case "lab", "lab-pvm", "pvm":
		return HostLabPVM, nil
	case "bare-metal", "baremetal", "metal":
		return HostBareMetal, nil
	}
	return 0, fmt.Errorf("unknown host kind %q (want auto, lab or bare-metal)", s)
}

// CPUPolicy decides which CPUID leaves and bits the guest sees. It is the one
// place where guest-visible CPU features are chosen; each masked bit says why.
type CPUPolicy struct {
	Host HostKind
}

// Bit positions used below (Intel SDM vol. 2 CPUID, AMD APM vol. 3).
const (
	// Leaf 1 ECX.
	c1SSE3, c1PCLMUL, c1MONITOR, c1VMX, c1SMX, c1EST, c1TM2 = 0, 1, 3, 5, 6, 7, 8
	c1SSSE3, c1FMA, c1CX16, c1PDCM, c1PCID, c1DCA           = 9, 12, 13, 15, 17, 18
	c1SSE41, c1SSE42, c1X2APIC, c1MOVBE, c1POPCNT           = 19, 20, 21, 22, 23
	c1TSCDeadline, c1AES, c1XSAVE, c1OSXSAVE, c1AVX         = 24, 25, 26, 27, 28
	c1F16C, c1RDRAND, c1Hypervisor                          = 29, 30, 31
	// Leaf 1 EDX.
	d1APIC, d1HTT = 9, 28
	// Leaf 7 sub-leaf 0.
	b7RDSEED, b7TSCAdjust = 18, 1
	c7WAITPKG, c7RDPID    = 5, 22
	// Leaf 0x80000001.
	ce1LAHF, ce1SVM, ce1ABM, ce1PerfCtrCore, ce1PerfCtrNB, ce1PerfTSC, ce1PerfCtrLLC, ce1MWAITX = 0, 2, 5, 23, 24, 27, 28, 29
	de1SYSCALL, de1NX, de1RDTSCP, de1LM                                                         = 11, 20, 27, 29
	// Leaf 0x80000008 EBX.
	b88XSAVEERPTR = 2
)

func bit(n uint) uint32 { return 1 << n }

// labLeaf1ECX is what the lab keeps of leaf 1 ECX: SSE3 and SSSE3, which
// the kernel does not use, and the hypervisor bit. POPCNT (used by the
// kernel's hweight), CMPXCHG16B (SLUB's cmpxchg_double: "instruction
// emulation failed" at boot), XSAVE (XRSTOR in the FPU switch), MOVBE, AES,
// PCLMUL, SSE4.x, AVX and F16C are all dropped.
const labLeaf1ECX = 1<<c1SSE3 | 1<<c1SSSE3 | 1<<c1Hypervisor

// labExt1ECX keeps only LAHF/SAHF in long mode: ABM (LZCNT, and POPCNT on
// AMD), SSE4A, MisAlignSSE, 3DNowPrefetch, TOPOEXT and the rest are dropped.
const labExt1ECX = 1 << ce1LAHF

// Apply returns the guest's CPUID table from KVM's supported table.
func (p CPUPolicy) Apply(supported []kvm.CPUIDEntry) []kvm.CPUIDEntry {
	vendor := Vendor(supported)
	lab := p.Host == HostLabPVM
	out := make([]kvm.CPUIDEntry, 0, len(supported))
	for _, e := range supported {
		switch {
		case e.Function >= 0x40000000 && e.Function <= 0x4fffffff:
			// KVM paravirt leaves: no kvmclock (a host time source the log
			// would not see), no PV EOI, steal time or async page faults.
			continue
		case e.Function == 0xa:
			// Architectural PMU: the guest must not use the counters the
			// replay layer may need, and a counter is host-dependent input.
			continue
		case e.Function == 0xb || e.Function == 0x1f:
			// x2APIC topology: there is no (x2)APIC.
			continue
		case e.Function == 0x80000022:
			// AMD PerfMonV2: PMU, as leaf 0xa.
			continue
		case e.Function == 0xd && lab:
			// XSAVE is hidden in the lab (XRSTOR is not emulated).
			continue
		}
		switch e.Function {
		case 1:
			// Uniprocessor without APIC: APIC ID 0, one logical CPU.
			e.EBX &= 0x0000ffff
			e.EBX |= 1 << 16
			e.EDX &^= bit(d1APIC) | bit(d1HTT)
			e.ECX &^= bit(c1X2APIC) | bit(c1TSCDeadline) | // no APIC, so no x2APIC or TSC deadline timer
				bit(c1RDRAND) | // random numbers are host input the log would not see
				bit(c1MONITOR) | // MONITOR/MWAIT idle would not exit to us like HLT
				bit(c1VMX) | bit(c1SMX) | // no nested virtualization
				bit(c1PDCM) | // perf capabilities MSR: PMU
				bit(c1EST) | bit(c1TM2) | bit(c1DCA) // power/thermal/DCA: host details
			if lab {
				e.ECX &= labLeaf1ECX
			}
			if e.ECX&bit(c1XSAVE) == 0 {
				e.ECX &^= bit(c1OSXSAVE) | bit(c1AVX) | bit(c1FMA) | bit(c1F16C)
			}
		case 4:
			// One core per package.
			e.EAX &^= 0xfc000000
		case 6:
			// Thermal and power management: host details, nothing to emulate.
			e.EAX, e.EBX, e.ECX, e.EDX = 0, 0, 0, 0
		case 7:
			if e.Index == 0 {
				e.EBX &^= bit(b7RDSEED) | // random numbers: host input
					bit(b7TSCAdjust) // TSC offsets are the VMM's business
				e.ECX &^= bit(c7RDPID) | // RDPID reads TSC_AUX: host CPU number
					bit(c7WAITPKG) // TPAUSE/UMWAIT wait on the TSC
			}
			if lab {
				// SMEP, SMAP (CLAC/STAC), FSGSBASE, AVX2, BMI, ERMS, INVPCID...:
				// none is baseline and several fail in the emulator.
				e.EAX, e.EBX, e.ECX, e.EDX = 0, 0, 0, 0
			}
		case 0x80000001:
			e.ECX &^= bit(ce1SVM) | bit(ce1PerfCtrCore) | bit(ce1PerfCtrNB) | bit(ce1PerfTSC) | bit(ce1PerfCtrLLC) | bit(ce1MWAITX)
			e.EDX &^= bit(de1RDTSCP) // RDTSCP reads TSC_AUX: host CPU number
			if lab {
				e.ECX &= labExt1ECX
			}
		case 0x80000008:
			e.ECX &^= 0xff // one core per package
			if lab && vendor == VendorAMD {
				// Report XSAVEERPTR (AMD FXSAVE/XSAVE always save the error
				// pointers) so Linux skips its X86_BUG_FXSAVE_LEAK workaround,
				// whose FNCLEX/FILD the emulator cannot run in kernel mode.
				e.EBX |= bit(b88XSAVEERPTR)
			}
		}
		out = append(out, e)
	}
	return out
}

// Vendors.
const (
	VendorIntel   = "GenuineIntel"
	VendorAMD     = "AuthenticAMD"
	VendorHygon   = "HygonGenuine"
	VendorUnknown = ""
)

// Vendor returns the vendor string of CPUID leaf 0 in a table.
func Vendor(entries []kvm.CPUIDEntry) string {
	for _, e := range entries {
		if e.Function == 0 {
			var b strings.Builder
			for _, r := range []uint32{e.EBX, e.EDX, e.ECX} {
				b.WriteByte(byte(r))
				b.WriteByte(byte(r >> 8))
				b.WriteByte(byte(r >> 16))
				b.WriteByte(byte(r >> 24))
			}
			return b.String()
		}
	}
	return VendorUnknown
}

// MSR indices used by the policy.
const (
	MSRTSC            = 0x10
	MSRSysenterCS     = 0x174
	MSRSysenterESP    = 0x175
	MSRSysenterEIP    = 0x176
	MSRMiscEnable     = 0x1a0
	MSRPAT            = 0x277
	MSRMTRRDefType    = 0x2ff
	MSRSTAR           = 0xc0000081
	MSRLSTAR          = 0xc0000082
	MSRCSTAR          = 0xc0000083
	MSRSyscallMask    = 0xc0000084
	MSRKernelGSBase   = 0xc0000102
	MSRTSCAux         = 0xc0000103
	miscEnableFastStr = 1
	patPowerOnDefault = 0x0007040600070406
)

// InitialMSRs are the MSR values of a freshly reset vCPU, set explicitly so
// that nothing depends on KVM's defaults. The TSC starts at 0, except in
// the lab: there guest user mode runs natively and its RDTSC reads the
// host's TSC without KVM's offset, so the guest TSC must stay equal to the
// host's (offset 0, see Machine) or the guest's vDSO clock, which mixes the
// kernel's TSC reading with user mode's, goes wrong and Go programs in the
// guest hang on their timers.
func (p CPUPolicy) InitialMSRs() []kvm.MSR {
	msrs := []kvm.MSR{
		{Index: MSRSysenterCS}, {Index: MSRSysenterESP}, {Index: MSRSysenterEIP},
		{Index: MSRMiscEnable, Data: miscEnableFastStr},
		{Index: MSRPAT, Data: patPowerOnDefault},
		{Index: MSRSTAR}, {Index: MSRLSTAR}, {Index: MSRCSTAR}, {Index: MSRSyscallMask},
		{Index: MSRKernelGSBase},
	}
	if p.Host != HostLabPVM {
		msrs = append([]kvm.MSR{{Index: MSRTSC, Data: 0}}, msrs...)
	}
	return msrs
}

// SavedMSRs lists the MSRs that make up guest-visible vCPU state, in the
// order they are saved, filtered by what KVM reports it can save.
func (p CPUPolicy) SavedMSRs(kvmList []uint32) []uint32 {
	want := []uint32{MSRTSC, MSRSysenterCS, MSRSysenterESP, MSRSysenterEIP, MSRMiscEnable,
		MSRPAT, MSRMTRRDefType, MSRSTAR, MSRLSTAR, MSRCSTAR, MSRSyscallMask, MSRKernelGSBase, MSRTSCAux}
	have := make(map[uint32]bool, len(kvmList))
	for _, i := range kvmList {
		have[i] = true
	}
	var out []uint32
	for _, i := range want {
		if have[i] || i == MSRTSC {
			out = append(out, i)
		}
	}
	return out
}
