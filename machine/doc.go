// Package machine is one virtual machine on top of package kvm: guest memory,
// the single vCPU and its run loop, exit dispatch to the port and MMIO buses,
// the legacy PC devices (8259A PIC pair, 8254 PIT, port 0x61, 16550A UART,
// CMOS RTC, i8042 reset and stub ports), the CPUID/MSR policy and the clock.
//
// The machine is deterministic by construction: devices never read the host
// directly. Every time-dependent value comes from a Clock, every byte from the
// outside world enters through Machine.DeliverInput and is handed to a device
// on the vCPU thread at an exit, and interrupts are injected only by the vCPU
// loop. A later layer (package ft) records and replays exactly those points.
package machine
