// Package pmu is the PMU position source: it names an exact point in the
// guest's instruction stream by the number of conditional branches the
// guest has retired (counted by a hardware performance counter in guest
// mode only), the RIP, and RCX (which tells the iterations of one REP
// instruction apart), and it brings a replaying guest to such a point.
// This is rr's method, and VMware FT's: with it an asynchronous event (an
// interrupt, a kick's state delta) can be delivered anywhere, not only at
// the next deterministic exit.
//
// Recording reads the position where a kick stopped the guest (Current).
// Replay goes to it (Seeker.Seek): the counter's overflow interrupt stops
// the guest a little before the target (it lands imprecisely, up to a skid
// after the armed count), then a hardware breakpoint on the target's RIP
// stops it at each visit until the branch count matches, then single
// steps walk a REP instruction to the target's RCX.
//
// The counter, the breakpoints and single-stepping are reached through two
// small interfaces, Counter and Stepper, so that the algorithm is tested
// against a simulated guest; the real ones sit on kvm.PerfCounter and
// KVM_SET_GUEST_DEBUG.
//
// Everything here is off unless Probe says the host can do it: a host
// without a PMU (most VMs), one whose counter is inexact, or one where
// guest debugging is accepted but does nothing, gets exits-only positions.
// Probe checks that the counter opens, that single steps and breakpoints
// really stop the guest, and that a guest loop of known length, with VM
// exits inside, counts exactly in every one of several runs.
//
// ProbeHost is Probe on the real host: the guests are tiny long-mode
// programs (HostDebugGuest, HostLoop) on their own one-vCPU machine, run
// through KVM_RUN directly, with every run bounded by a watchdog kick.
// Guest debugging is checked at CPL3 and CPL0, since a nested host may
// honour one and not the other (this lab's PVM host single-steps CPL0 code
// but hands a CPL3 step's #DB to the guest and ignores CPL3 breakpoints).
// Building the guests needs the GNU assembler and linker.
//
// Known limits: a loop made only of unconditional jumps repeats positions
// (no conditional branch retires), so a target inside one is ambiguous;
// the seeker stops at the first match. Instructions KVM emulates in
// software retire no branch on the hardware; that is deterministic on
// both sides as long as both emulate the same. Walking a long REP
// instruction to its target costs one single step per iteration.
package pmu
