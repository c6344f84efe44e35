package machine

import "strings"

// baseCmdline is what Linux must be told about this machine: the console
// is the 16550A at 0x3f8; there is no local APIC or IO-APIC (the 8259A pair
// is the interrupt controller), the PIT timer check would
// only waste time. Each word is documented in images/README.md.
const baseCmdline = "console=ttyS0 earlyprintk=serial,ttyS0,115200 nolapic noapic no_timer_check reboot=k panic=-1"

// labCmdline switches on the guest-kernel workarounds of images/patches
// that this lab's nested KVM needs; bare metal gets none of them.
const labCmdline = "gokvm.lab=1"

// KernelCmdline is the kernel command line for this machine on a host of
// the given kind, followed by the user's extra arguments.
func KernelCmdline(host HostKind, extra string) string {
	parts := []string{baseCmdline}
	if host == HostLabPVM {
		parts = append(parts, labCmdline)
	}
	if extra = strings.TrimSpace(extra); extra != "" {
		parts = append(parts, extra)
	}
	return strings.Join(parts, " ")
}
