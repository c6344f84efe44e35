/* Prints the KVM ABI facts that package kvm mirrors, one "name value" per
 * line, from the installed kernel headers. abi_test.go compiles and runs it. */
#include <stddef.h>
#include <stdio.h>
#include <linux/kvm.h>

#define S(t) printf("sizeof.%s %zu\n", #t, sizeof(struct t))
#define O(t, f) printf("offsetof.%s.%s %zu\n", #t, #f, offsetof(struct t, f))
#define I(n) printf("ioctl.%s %lu\n", #n, (unsigned long)(n))

int main(void) {
	S(kvm_regs); S(kvm_segment); S(kvm_dtable); S(kvm_sregs); S(kvm_fpu);
	S(kvm_xsave); S(kvm_xcr); S(kvm_xcrs); S(kvm_msr_entry); S(kvm_msrs);
	S(kvm_msr_list); S(kvm_cpuid_entry2); S(kvm_cpuid2); S(kvm_vcpu_events);
	S(kvm_debugregs); S(kvm_mp_state); S(kvm_guest_debug);
	S(kvm_userspace_memory_region); S(kvm_dirty_log); S(kvm_translation);
	S(kvm_interrupt); S(kvm_device_attr);
	O(kvm_run, request_interrupt_window); O(kvm_run, immediate_exit);
	O(kvm_run, exit_reason); O(kvm_run, ready_for_interrupt_injection);
	O(kvm_run, if_flag); O(kvm_run, flags); O(kvm_run, cr8); O(kvm_run, apic_base);
	O(kvm_run, io); O(kvm_run, io.direction); O(kvm_run, io.size); O(kvm_run, io.port);
	O(kvm_run, io.count); O(kvm_run, io.data_offset);
	O(kvm_run, mmio.phys_addr); O(kvm_run, mmio.data); O(kvm_run, mmio.len);
	O(kvm_run, mmio.is_write);
	O(kvm_run, fail_entry.hardware_entry_failure_reason); O(kvm_run, fail_entry.cpu);
	O(kvm_run, internal.suberror); O(kvm_run, internal.ndata); O(kvm_run, internal.data);
	O(kvm_run, system_event.type); O(kvm_run, system_event.ndata);
	O(kvm_sregs, efer); O(kvm_sregs, interrupt_bitmap); O(kvm_fpu, xmm); O(kvm_fpu, mxcsr);
	O(kvm_vcpu_events, interrupt); O(kvm_vcpu_events, nmi); O(kvm_vcpu_events, sipi_vector);
	O(kvm_vcpu_events, flags); O(kvm_vcpu_events, smi); O(kvm_vcpu_events, triple_fault);
	O(kvm_vcpu_events, exception_has_payload); O(kvm_vcpu_events, exception_payload);
	O(kvm_xcrs, xcrs); O(kvm_debugregs, dr7); O(kvm_guest_debug, arch);
	I(KVM_GET_API_VERSION); I(KVM_CREATE_VM); I(KVM_GET_MSR_INDEX_LIST);
	I(KVM_CHECK_EXTENSION); I(KVM_GET_VCPU_MMAP_SIZE); I(KVM_GET_SUPPORTED_CPUID);
	I(KVM_CREATE_VCPU); I(KVM_GET_DIRTY_LOG); I(KVM_SET_USER_MEMORY_REGION);
	I(KVM_SET_TSS_ADDR); I(KVM_SET_IDENTITY_MAP_ADDR); I(KVM_RUN);
	I(KVM_GET_REGS); I(KVM_SET_REGS); I(KVM_GET_SREGS); I(KVM_SET_SREGS);
	I(KVM_TRANSLATE); I(KVM_INTERRUPT); I(KVM_GET_MSRS); I(KVM_SET_MSRS);
	I(KVM_GET_FPU); I(KVM_SET_FPU); I(KVM_SET_CPUID2); I(KVM_GET_CPUID2);
	I(KVM_GET_MP_STATE); I(KVM_SET_MP_STATE); I(KVM_SET_GUEST_DEBUG);
	I(KVM_GET_VCPU_EVENTS); I(KVM_SET_VCPU_EVENTS); I(KVM_GET_DEBUGREGS);
	I(KVM_SET_DEBUGREGS); I(KVM_SET_TSC_KHZ); I(KVM_GET_TSC_KHZ);
	I(KVM_GET_XSAVE); I(KVM_SET_XSAVE); I(KVM_GET_XCRS); I(KVM_SET_XCRS);
	I(KVM_SET_DEVICE_ATTR); I(KVM_GET_DEVICE_ATTR); I(KVM_HAS_DEVICE_ATTR);
	return 0;
}
