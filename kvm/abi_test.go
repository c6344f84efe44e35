package kvm

import (
	"bufio"
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"unsafe"
)

// kernelABI compiles testdata/abi.c against the installed kernel headers and
// returns what it prints. Without a C compiler or headers the test cannot
// check anything: it fails in CI (which installs them) and skips elsewhere.
func kernelABI(t *testing.T) map[string]uint64 {
	t.Helper()
	cc, err := exec.LookPath("cc")
	if err == nil {
		_, err = os.Stat("/usr/include/linux/kvm.h")
	}
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("CI must provide a C compiler and linux-libc-dev: %v", err)
		}
		t.Skipf("no C compiler or kernel headers: %v", err)
	}
	bin := filepath.Join(t.TempDir(), "abi")
	if out, err := exec.Command(cc, "-o", bin, "testdata/abi.c").CombinedOutput(); err != nil {
		t.Fatalf("compile abi.c: %v\n%s", err, out)
	}
	out, err := exec.Command(bin).Output()
	if err != nil {
		t.Fatalf("run abi: %v", err)
	}
	facts := map[string]uint64{}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		name, val, ok := strings.Cut(sc.Text(), " ")
		if !ok {
			t.Fatalf("bad line %q", sc.Text())
		}
		v, err := strconv.ParseUint(val, 10, 64)
		if err != nil {
			t.Fatalf("bad line %q", sc.Text())
		}
		facts[name] = v
	}
	return facts
}

func TestABI(t *testing.T) {
	facts := kernelABI(t)
	var run runHeader
	var io IOExit
	var mmio MMIOExit
	var fe FailEntryExit
	var ie InternalErrorExit
	var se SystemEventExit
	var sregs Sregs
	var fpu FPU
	var ev VCPUEvents
	var xcrs XCRs
	var dr DebugRegs
	var gd GuestDebug
	x := runExitOffset
	ours := map[string]uintptr{
		"sizeof.kvm_regs":                    unsafe.Sizeof(Regs{}),
		"sizeof.kvm_segment":                 unsafe.Sizeof(Segment{}),
		"sizeof.kvm_dtable":                  unsafe.Sizeof(DTable{}),
		"sizeof.kvm_sregs":                   unsafe.Sizeof(Sregs{}),
		"sizeof.kvm_fpu":                     unsafe.Sizeof(FPU{}),
		"sizeof.kvm_xsave":                   unsafe.Sizeof(XSAVE{}),
		"sizeof.kvm_xcr":                     unsafe.Sizeof(XCR{}),
		"sizeof.kvm_xcrs":                    unsafe.Sizeof(XCRs{}),
		"sizeof.kvm_msr_entry":               unsafe.Sizeof(MSR{}),
		"sizeof.kvm_msrs":                    unsafe.Sizeof(msrsHeader{}),
		"sizeof.kvm_msr_list":                unsafe.Sizeof(msrList{}),
		"sizeof.kvm_cpuid_entry2":            unsafe.Sizeof(CPUIDEntry{}),
		"sizeof.kvm_cpuid2":                  unsafe.Sizeof(cpuidHeader{}),
		"sizeof.kvm_vcpu_events":             unsafe.Sizeof(VCPUEvents{}),
		"sizeof.kvm_debugregs":               unsafe.Sizeof(DebugRegs{}),
		"sizeof.kvm_mp_state":                unsafe.Sizeof(MPState{}),
		"sizeof.kvm_guest_debug":             unsafe.Sizeof(GuestDebug{}),
		"sizeof.kvm_userspace_memory_region": unsafe.Sizeof(UserMemoryRegion{}),
		"sizeof.kvm_dirty_log":               unsafe.Sizeof(dirtyLog{}),
		"sizeof.kvm_translation":             unsafe.Sizeof(Translation{}),
		"sizeof.kvm_interrupt":               unsafe.Sizeof(interrupt{}),
		"sizeof.kvm_device_attr":             unsafe.Sizeof(deviceAttr{}),

		"offsetof.kvm_run.request_interrupt_window":                 unsafe.Offsetof(run.RequestInterruptWindow),
		"offsetof.kvm_run.immediate_exit":                           unsafe.Offsetof(run.ImmediateExit),
		"offsetof.kvm_run.exit_reason":                              unsafe.Offsetof(run.ExitReason),
		"offsetof.kvm_run.ready_for_interrupt_injection":            unsafe.Offsetof(run.ReadyForInterruptInjection),
		"offsetof.kvm_run.if_flag":                                  unsafe.Offsetof(run.IFFlag),
		"offsetof.kvm_run.flags":                                    unsafe.Offsetof(run.Flags),
		"offsetof.kvm_run.cr8":                                      unsafe.Offsetof(run.CR8),
		"offsetof.kvm_run.apic_base":                                unsafe.Offsetof(run.APICBase),
		"offsetof.kvm_run.io":                                       uintptr(x),
		"offsetof.kvm_run.io.direction":                             uintptr(x) + unsafe.Offsetof(io.Direction),
		"offsetof.kvm_run.io.size":                                  uintptr(x) + unsafe.Offsetof(io.Size),
		"offsetof.kvm_run.io.port":                                  uintptr(x) + unsafe.Offsetof(io.Port),
		"offsetof.kvm_run.io.count":                                 uintptr(x) + unsafe.Offsetof(io.Count),
		"offsetof.kvm_run.io.data_offset":                           uintptr(x) + unsafe.Offsetof(io.DataOffset),
		"offsetof.kvm_run.mmio.phys_addr":                           uintptr(x) + unsafe.Offsetof(mmio.PhysAddr),
		"offsetof.kvm_run.mmio.data":                                uintptr(x) + unsafe.Offsetof(mmio.Data),
		"offsetof.kvm_run.mmio.len":                                 uintptr(x) + unsafe.Offsetof(mmio.Len),
		"offsetof.kvm_run.mmio.is_write":                            uintptr(x) + unsafe.Offsetof(mmio.IsWrite),
		"offsetof.kvm_run.fail_entry.hardware_entry_failure_reason": uintptr(x) + unsafe.Offsetof(fe.HardwareEntryFailureReason),
		"offsetof.kvm_run.fail_entry.cpu":                           uintptr(x) + unsafe.Offsetof(fe.CPU),
		"offsetof.kvm_run.internal.suberror":                        uintptr(x) + unsafe.Offsetof(ie.Suberror),
		"offsetof.kvm_run.internal.ndata":                           uintptr(x) + unsafe.Offsetof(ie.NData),
		"offsetof.kvm_run.internal.data":                            uintptr(x) + unsafe.Offsetof(ie.Data),
		"offsetof.kvm_run.system_event.type":                        uintptr(x) + unsafe.Offsetof(se.Type),
		"offsetof.kvm_run.system_event.ndata":                       uintptr(x) + unsafe.Offsetof(se.NData),
		"offsetof.kvm_sregs.efer":                                   unsafe.Offsetof(sregs.EFER),
		"offsetof.kvm_sregs.interrupt_bitmap":                       unsafe.Offsetof(sregs.InterruptBitmap),
		"offsetof.kvm_fpu.xmm":                                      unsafe.Offsetof(fpu.XMM),
		"offsetof.kvm_fpu.mxcsr":                                    unsafe.Offsetof(fpu.MXCSR),
		"offsetof.kvm_vcpu_events.interrupt":                        unsafe.Offsetof(ev.Interrupt),
		"offsetof.kvm_vcpu_events.nmi":                              unsafe.Offsetof(ev.NMI),
		"offsetof.kvm_vcpu_events.sipi_vector":                      unsafe.Offsetof(ev.SIPIVector),
		"offsetof.kvm_vcpu_events.flags":                            unsafe.Offsetof(ev.Flags),
		"offsetof.kvm_vcpu_events.smi":                              unsafe.Offsetof(ev.SMI),
		"offsetof.kvm_vcpu_events.triple_fault":                     unsafe.Offsetof(ev.TripleFault),
		"offsetof.kvm_vcpu_events.exception_has_payload":            unsafe.Offsetof(ev.ExceptionHasPayload),
		"offsetof.kvm_vcpu_events.exception_payload":                unsafe.Offsetof(ev.ExceptionPayload),
		"offsetof.kvm_xcrs.xcrs":                                    unsafe.Offsetof(xcrs.XCRs),
		"offsetof.kvm_debugregs.dr7":                                unsafe.Offsetof(dr.DR7),
		"offsetof.kvm_guest_debug.arch":                             unsafe.Offsetof(gd.DebugReg),

		"ioctl.KVM_GET_API_VERSION":        ioGetAPIVersion,
		"ioctl.KVM_CREATE_VM":              ioCreateVM,
		"ioctl.KVM_GET_MSR_INDEX_LIST":     ioGetMSRIndexList,
		"ioctl.KVM_CHECK_EXTENSION":        ioCheckExtension,
		"ioctl.KVM_GET_VCPU_MMAP_SIZE":     ioGetVCPUMmapSize,
		"ioctl.KVM_GET_SUPPORTED_CPUID":    ioGetSupportedCPUID,
		"ioctl.KVM_CREATE_VCPU":            ioCreateVCPU,
		"ioctl.KVM_GET_DIRTY_LOG":          ioGetDirtyLog,
		"ioctl.KVM_SET_USER_MEMORY_REGION": ioSetUserMemRegion,
		"ioctl.KVM_SET_TSS_ADDR":           ioSetTSSAddr,
		"ioctl.KVM_SET_IDENTITY_MAP_ADDR":  ioSetIdentityMapAddr,
		"ioctl.KVM_RUN":                    ioRun,
		"ioctl.KVM_GET_REGS":               ioGetRegs,
		"ioctl.KVM_SET_REGS":               ioSetRegs,
		"ioctl.KVM_GET_SREGS":              ioGetSregs,
		"ioctl.KVM_SET_SREGS":              ioSetSregs,
		"ioctl.KVM_TRANSLATE":              ioTranslate,
		"ioctl.KVM_INTERRUPT":              ioInterrupt,
		"ioctl.KVM_GET_MSRS":               ioGetMSRs,
		"ioctl.KVM_SET_MSRS":               ioSetMSRs,
		"ioctl.KVM_GET_FPU":                ioGetFPU,
		"ioctl.KVM_SET_FPU":                ioSetFPU,
		"ioctl.KVM_SET_CPUID2":             ioSetCPUID2,
		"ioctl.KVM_GET_CPUID2":             ioGetCPUID2,
		"ioctl.KVM_GET_MP_STATE":           ioGetMPState,
		"ioctl.KVM_SET_MP_STATE":           ioSetMPState,
		"ioctl.KVM_SET_GUEST_DEBUG":        ioSetGuestDebug,
		"ioctl.KVM_GET_VCPU_EVENTS":        ioGetVCPUEvents,
		"ioctl.KVM_SET_VCPU_EVENTS":        ioSetVCPUEvents,
		"ioctl.KVM_GET_DEBUGREGS":          ioGetDebugRegs,
		"ioctl.KVM_SET_DEBUGREGS":          ioSetDebugRegs,
		"ioctl.KVM_SET_TSC_KHZ":            ioSetTSCKHz,
		"ioctl.KVM_GET_TSC_KHZ":            ioGetTSCKHz,
		"ioctl.KVM_GET_XSAVE":              ioGetXSAVE,
		"ioctl.KVM_SET_XSAVE":              ioSetXSAVE,
		"ioctl.KVM_GET_XCRS":               ioGetXCRs,
		"ioctl.KVM_SET_XCRS":               ioSetXCRs,
		"ioctl.KVM_SET_DEVICE_ATTR":        ioSetDeviceAttr,
		"ioctl.KVM_GET_DEVICE_ATTR":        ioGetDeviceAttr,
		"ioctl.KVM_HAS_DEVICE_ATTR":        ioHasDeviceAttr,
	}
	for name, want := range facts {
		got, ok := ours[name]
		if !ok {
			t.Errorf("%s: printed by abi.c but not checked here", name)
			continue
		}
		if uint64(got) != want {
			t.Errorf("%s = %d (%#x), kernel says %d (%#x)", name, got, got, want, want)
		}
	}
	for name := range ours {
		if _, ok := facts[name]; !ok {
			t.Errorf("%s: not printed by abi.c", name)
		}
	}
	t.Logf("checked %d ABI facts", len(facts))
}
