package pmu

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"runtime"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gokvm-ft/gokvm-ft/internal/tinyguest"
	"github.com/gokvm-ft/gokvm-ft/kvm"
	"github.com/gokvm-ft/gokvm-ft/machine"
)

// This file holds Probe's real guests: tiny long-mode programs on their own
// one-vCPU machine, driven through KVM_RUN directly (machine.Run has no use
// for KVM_EXIT_DEBUG). Each ends in a port write that loops, so a single
// step or breakpoint that does nothing shows as that I/O exit (and the
// debug guest catches a debug exception passed to it), and every KVM_RUN
// is bounded by a watchdog kick, so a guest that stops for nothing at all
// cannot hang the probe.

// Ports the probe guests write.
const (
	// guestEndPort ends a guest: tinyguest.ExitWithEAX's test-exit port.
	guestEndPort = 0x501
	// loopPort is the loop guest's exit inside the counted region.
	loopPort = 0x510
)

// Watchdog bounds: one KVM_RUN of the debug guest, one pass of the loop.
const (
	debugTimeout = 2 * time.Second
	passTimeout  = 5 * time.Second
)

// Debug register bits for one execution breakpoint in DR0: G0 (bit 1),
// with the GE and reserved-one bits QEMU's gdbstub sets; R/W0 and LEN0 are
// zero (instruction execution, one byte).
const dr7ExecDR0 = 0x602

// errGuestTimeout: the watchdog kicked the guest out of KVM_RUN.
var errGuestTimeout = errors.New("the probe guest did not stop")

// errDidNotStop: a single step or breakpoint did not stop the guest: KVM
// accepted KVM_SET_GUEST_DEBUG but ignored it, or passed the debug
// exception to the guest.
var errDidNotStop = errors.New("did not stop the guest")

// errGuestEnd: the debug guest ran to its end with nothing armed.
var errGuestEnd = errors.New("the guest reached its end")

// tinyGuest is a tiny program loaded on its own machine, started in the
// state start.
type tinyGuest struct {
	m     *machine.Machine
	cpu   *kvm.VCPU
	prog  *tinyguest.Program
	start struct {
		regs   kvm.Regs
		sregs  kvm.Sregs
		events kvm.VCPUEvents
	}
}

// newTinyGuest assembles src (AT&T syntax, entry _start; this needs the
// GNU assembler and linker on the host) and loads it on a new 2 MiB
// machine.
func newTinyGuest(src string, opt tinyguest.Options) (*tinyGuest, error) {
	dir, err := os.MkdirTemp("", "pmu-probe-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	prog, err := tinyguest.Assemble(dir, src)
	if err != nil {
		return nil, fmt.Errorf("assemble probe guest: %w", err)
	}
	m, err := machine.New(machine.Config{MemorySize: 2 << 20, TestExit: true, Host: machine.DetectHostKind()})
	if err != nil {
		return nil, fmt.Errorf("probe guest machine: %w", err)
	}
	g := &tinyGuest{m: m, cpu: m.VCPU(), prog: prog}
	if err := tinyguest.Load(m.Memory(), g.cpu, prog, opt); err != nil {
		m.Close()
		return nil, fmt.Errorf("load probe guest: %w", err)
	}
	if g.start.regs, err = g.cpu.GetRegs(); err == nil {
		if g.start.sregs, err = g.cpu.GetSregs(); err == nil {
			g.start.events, err = g.cpu.GetVCPUEvents()
			g.start.events.Flags |= kvm.VCPUEventValidNMIPending | kvm.VCPUEventValidShadow
		}
	}
	if err != nil {
		m.Close()
		return nil, err
	}
	return g, nil
}

// sym returns a label's address.
func (g *tinyGuest) sym(name string) uint64 { return g.prog.Symbols[name] }

// rewind completes any pending port access (KVM finishes one at the next
// KVM_RUN, which immediate_exit makes return at once) and puts the guest
// back at _start, at its privilege level (a trap handler runs at CPL0),
// with no exception or interrupt pending.
func (g *tinyGuest) rewind() error {
	g.cpu.SetImmediateExit(true)
	err := g.cpu.Run()
	g.cpu.SetImmediateExit(false)
	if err != nil {
		return err
	}
	if err := g.cpu.SetSregs(g.start.sregs); err != nil {
		return err
	}
	if err := g.cpu.SetRegs(g.start.regs); err != nil {
		return err
	}
	return g.cpu.SetVCPUEvents(g.start.events)
}

// enter runs the guest once (one KVM_RUN) and returns the exit. A kick
// at deadline bounds it: then it returns errGuestTimeout. ExitIntr with a
// nil error is a signal to this thread (a PMU overflow, or any other).
func (g *tinyGuest) enter(deadline time.Time) (kvm.ExitReason, error) {
	d := time.Until(deadline)
	if d <= 0 {
		return 0, errGuestTimeout
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	g.cpu.BindThread()
	defer g.cpu.UnbindThread()
	fired := make(chan struct{})
	t := time.AfterFunc(d, func() {
		g.cpu.Kick()
		close(fired)
	})
	err := g.cpu.Run()
	if !t.Stop() {
		<-fired // the kick is done, so it cannot outlive this run
	}
	g.cpu.ClearImmediateExit()
	if err != nil {
		return 0, err
	}
	r := g.cpu.ExitReason()
	if r == kvm.ExitIntr {
		select {
		case <-fired:
			return r, errGuestTimeout
		default:
		}
	}
	return r, nil
}

// out returns the port and value of an ExitIO that is a 4-byte OUT.
func (g *tinyGuest) out() (port uint16, val uint32, err error) {
	io := g.cpu.IO()
	if io.Direction != kvm.IOOut || io.Size != 4 || io.Count != 1 {
		return io.Port, 0, fmt.Errorf("unexpected port access: port %#x direction %d size %d count %d", io.Port, io.Direction, io.Size, io.Count)
	}
	b, err := g.cpu.IOData()
	if err != nil {
		return io.Port, 0, err
	}
	return io.Port, binary.LittleEndian.Uint32(b), nil
}

// Close frees the machine.
func (g *tinyGuest) Close() error { return g.m.Close() }

// debugGuestSrc is the debug probe guest: straight-line code with the
// single step's target (step) and the breakpoint (bp), then a port write
// that repeats, so whatever the vCPU does it comes back. A #DB or #BP that
// KVM lets through to the guest, rather than stopping it, lands in a
// handler (from vec_1 on) that says so on debugTrapPort, unless KVM stops
// the guest in there.
const debugGuestSrc = `
_start:
	mov $1, %eax
step:
	add $2, %eax
	add $3, %eax
bp:
	add $4, %eax
	mov $0x501, %dx
end:
	out %eax, %dx
	jmp end
vec_1:
	mov $1, %eax
	jmp trap
vec_3:
	mov $3, %eax
trap:
	mov $0x502, %dx
	out %eax, %dx
	jmp trap
`

// debugTrapPort is where the debug guest's #DB and #BP handlers write the
// vector.
const debugTrapPort = 0x502

// HostDebugGuest is the real DebugGuest: a Stepper on a tiny guest whose
// code runs at CPL3 or CPL0, with single steps and the breakpoint through
// KVM_SET_GUEST_DEBUG. A step or breakpoint that does not stop the guest
// shows as an error wrapping errDidNotStop: the guest ran on to its end,
// or the debug exception went to the guest. Use it from one goroutine.
//
// Both levels matter: a guest's kernel and its programs are replayed
// alike, and a nested host may stop one and not the other (this lab's PVM
// host single-steps CPL0 code but hands a CPL3 single step's #DB to the
// guest, and ignores CPL3 breakpoints).
type HostDebugGuest struct {
	g     *tinyGuest
	level string // "CPL3" or "CPL0"
	// st holds the breakpoint and sets KVM_SET_GUEST_DEBUG; Run and Step
	// are the probe's own (a watchdog, and diagnostics of what the host
	// did instead of stopping).
	st VCPUStepper
}

// NewHostDebugGuest builds the debug probe guest, at CPL3 if user, else at
// CPL0 (it needs /dev/kvm and the GNU assembler and linker).
func NewHostDebugGuest(user bool) (*HostDebugGuest, error) {
	g, err := newTinyGuest(debugGuestSrc, tinyguest.Options{Kernel: !user})
	if err != nil {
		return nil, err
	}
	d := &HostDebugGuest{g: g, level: "CPL0", st: VCPUStepper{CPU: g.cpu}}
	if user {
		d.level = "CPL3"
	}
	return d, nil
}

// Rewind puts the guest at _start; one step must stop at step, the
// breakpoint at bp.
func (d *HostDebugGuest) Rewind() (next, bp uint64, err error) {
	if err := d.g.rewind(); err != nil {
		return 0, 0, err
	}
	return d.g.sym("step"), d.g.sym("bp"), nil
}

// enter runs the guest until it stops for anything but a stray signal.
func (d *HostDebugGuest) enter() (kvm.ExitReason, error) {
	deadline := time.Now().Add(debugTimeout)
	for {
		why, err := d.g.enter(deadline)
		if err != nil {
			return why, fmt.Errorf("%w within %v (guest at %s)", err, debugTimeout, d.level)
		}
		if why != kvm.ExitIntr {
			return why, nil
		}
	}
}

// exitErr describes an exit other than KVM_EXIT_DEBUG from what (a step or
// a run, armed: with a step or breakpoint ahead of the guest).
func (d *HostDebugGuest) exitErr(why kvm.ExitReason, what string, armed bool) error {
	rip := uint64(0)
	if r, err := d.g.cpu.GetRegs(); err == nil {
		rip = r.RIP
	}
	if why == kvm.ExitIO {
		port, v, _ := d.g.out()
		switch {
		case port == debugTrapPort:
			return fmt.Errorf("at %s it %w: the guest took the debug exception (vector %d)", d.level, errDidNotStop, v)
		case port == guestEndPort && armed:
			return fmt.Errorf("at %s it %w, which ran on to its end (rip %#x): KVM_SET_GUEST_DEBUG is accepted but inert", d.level, errDidNotStop, rip)
		case port == guestEndPort:
			return fmt.Errorf("%s: %w (rip %#x)", what, errGuestEnd, rip)
		}
	}
	return fmt.Errorf("%s at %s: unexpected exit %v at rip %#x", what, d.level, why, rip)
}

// debugStop checks a KVM_EXIT_DEBUG and returns its RIP: one inside the
// guest's trap handlers means the debug exception went to the guest first.
func (d *HostDebugGuest) debugStop() (uint64, error) {
	r, err := d.g.cpu.GetRegs()
	if err != nil {
		return 0, err
	}
	if r.RIP >= d.g.sym("vec_1") {
		return r.RIP, fmt.Errorf("at %s it %w: the guest took the debug exception, and stopped in its handler (rip %#x)", d.level, errDidNotStop, r.RIP)
	}
	return r.RIP, nil
}

// Run runs the guest until the breakpoint stops it. Standing on the
// breakpoint, it first steps over it with the breakpoint off: RFLAGS.RF,
// the CPU's way, is not honoured by every host (this lab's stops again at
// once). A REP instruction there is thus left one iteration at a time.
func (d *HostDebugGuest) Run() (Stop, error) {
	r, err := d.g.cpu.GetRegs()
	if err != nil {
		return StopOther, err
	}
	if d.st.bpSet && r.RIP == d.st.bp {
		if _, err := d.Step(); err != nil {
			return StopOther, fmt.Errorf("step over the breakpoint: %w", err)
		}
		if r, err = d.g.cpu.GetRegs(); err != nil {
			return StopOther, err
		}
	}
	// The code is straight: the breakpoint is ahead if it is further on.
	ahead := d.st.bpSet && r.RIP < d.st.bp
	if err := d.st.guestDebug(false, true); err != nil {
		return StopOther, err
	}
	why, err := d.enter()
	if err != nil {
		return StopOther, err
	}
	if why != kvm.ExitDebug {
		return StopOther, d.exitErr(why, "run", ahead)
	}
	rip, err := d.debugStop()
	if err != nil {
		return StopOther, err
	}
	if d.st.bpSet && rip == d.st.bp {
		return StopBreakpoint, nil
	}
	return StopOther, nil
}

// Step executes one instruction (one iteration of a REP instruction), with
// the breakpoint off so that it cannot stop the guest before it moves.
func (d *HostDebugGuest) Step() (_ Stop, err error) {
	if err := d.st.guestDebug(true, false); err != nil {
		return StopOther, err
	}
	defer func() {
		if derr := d.st.guestDebug(false, true); derr != nil && err == nil {
			err = derr
		}
	}()
	why, err := d.enter()
	if err != nil {
		return StopOther, err
	}
	if why != kvm.ExitDebug {
		return StopOther, d.exitErr(why, "single step", true)
	}
	if _, err := d.debugStop(); err != nil {
		return StopOther, err
	}
	return StopStep, nil
}

// Regs reads RIP and RCX.
func (d *HostDebugGuest) Regs() (Regs, error) { return d.st.Regs() }

// SetBreakpoint sets the execution breakpoint (DR0).
func (d *HostDebugGuest) SetBreakpoint(rip uint64) error { return d.st.SetBreakpoint(rip) }

// ClearBreakpoint removes it.
func (d *HostDebugGuest) ClearBreakpoint() error { return d.st.ClearBreakpoint() }

// Close frees the guest.
func (d *HostDebugGuest) Close() error { return d.g.Close() }

// The loop probe guest's size: HostLoop.Want is 2*loopIterations, enough
// for a skid of up to loopIterations-1 (CheckLoop needs Want >= 2*(skid+1);
// Zen's is 10000), and it leaves the guest loopIterations/loopEvery times.
const (
	loopIterations = 1 << 16
	loopEvery      = 1 << 10
)

// loopGuestSrc is the loop probe guest, formatted with the iterations and
// the iterations between port writes. Each iteration retires two
// conditional branches (jnz 1f, jnz again) and one locked instruction;
// nothing else in it is a conditional branch. It ends by writing the
// locked counter (the iterations run) to the end port.
const loopGuestSrc = `
_start:
	movl $0, 0x90000
	mov $%[1]d, %%ecx
	mov $%[2]d, %%ebx
	mov $0x510, %%dx
again:
	lock incl 0x90000
	dec %%ebx
	jnz 1f
	mov $%[2]d, %%ebx
	out %%eax, %%dx
1:
	dec %%ecx
	jnz again
	mov 0x90000, %%eax
	mov $0x501, %%dx
end:
	out %%eax, %%dx
	jmp end
`

// HostLoop is the real Loop: a tiny guest loop of known length, counted by
// a kvm.PerfCounter of event opened on the calling thread. The guest is
// built and the counter opened at the first pass, so a HostLoop costs
// nothing until used. All passes must run on one thread, locked to its
// goroutine (runtime.LockOSThread), the counter's.
type HostLoop struct {
	event        kvm.RawEvent
	iters, every uint64

	g   *tinyGuest
	c   *kvm.PerfCounter
	tid int // the counter's thread
	// setupErr is the last failure to build the guest or open the
	// counter: no count was taken.
	setupErr error
}

// NewHostLoop returns the loop probe guest, counting event (the host's
// retired-conditional-branch event, HostEvent).
func NewHostLoop(event kvm.RawEvent) *HostLoop {
	return newHostLoop(event, loopIterations, loopEvery)
}

func newHostLoop(event kvm.RawEvent, iters, every uint64) *HostLoop {
	return &HostLoop{event: event, iters: iters, every: every}
}

// Want is the conditional branches of one pass: two an iteration.
func (l *HostLoop) Want() uint64 { return 2 * l.iters }

// exits is the port writes inside one pass.
func (l *HostLoop) exits() uint64 { return l.iters / l.every }

// guest builds the guest at first use.
func (l *HostLoop) guest() (*tinyGuest, error) {
	if l.g == nil {
		g, err := newTinyGuest(fmt.Sprintf(loopGuestSrc, l.iters, l.every), tinyguest.Options{Kernel: true})
		if err != nil {
			l.setupErr = err
			return nil, err
		}
		l.g = g
	}
	return l.g, nil
}

// counter opens the counter at first use, and checks the thread after.
func (l *HostLoop) counter() (*kvm.PerfCounter, error) {
	tid := unix.Gettid()
	if l.c == nil {
		c, err := kvm.OpenBranchCounter(l.event, 0)
		if err != nil {
			l.setupErr = err
			return nil, err
		}
		l.c, l.tid = c, tid
	}
	if tid != l.tid {
		return nil, fmt.Errorf("pass on thread %d, counter opened on thread %d: lock the probing goroutine to its thread", tid, l.tid)
	}
	return l.c, nil
}

// loopStop says where a pass stopped.
type loopStop struct {
	exits uint64 // port writes to loopPort seen
	end   bool   // the guest reached its end; result is valid
	// result is what the guest wrote at its end: the iterations its
	// locked increment counted.
	result uint32
	// atOrPast: some exit found the counter at or past the armed count.
	atOrPast bool
}

// pass runs the guest from _start until its end or, with c and arm set,
// until an exit finds the counter at or past arm when a signal (the
// overflow's) stopped the guest. Other signals are ignored.
func (l *HostLoop) pass(c *kvm.PerfCounter, arm uint64) (s loopStop, err error) {
	g, err := l.guest()
	if err != nil {
		return s, err
	}
	if err := g.rewind(); err != nil {
		return s, err
	}
	deadline := time.Now().Add(passTimeout)
	for {
		why, err := g.enter(deadline)
		if err != nil {
			return s, fmt.Errorf("%w within %v, after %d of %d port writes", err, passTimeout, s.exits, l.exits())
		}
		switch why {
		case kvm.ExitIntr:
			if c == nil || arm == 0 {
				continue
			}
			n, err := c.Read()
			if err != nil {
				return s, err
			}
			if n >= arm {
				s.atOrPast = true
				return s, nil
			}
			// A stray signal (a stale overflow, the runtime's): go on.
		case kvm.ExitIO:
			port, v, err := g.out()
			if err != nil {
				return s, err
			}
			switch port {
			case loopPort:
				s.exits++
				if s.exits > l.exits() {
					return s, fmt.Errorf("%d port writes, the loop makes %d", s.exits, l.exits())
				}
				if c != nil && arm != 0 {
					n, err := c.Read()
					if err != nil {
						return s, err
					}
					s.atOrPast = s.atOrPast || n >= arm
				}
			case guestEndPort:
				s.end, s.result = true, v
				return s, nil
			default:
				return s, fmt.Errorf("write to unexpected port %#x", port)
			}
		default:
			r, _ := g.cpu.GetRegs()
			return s, fmt.Errorf("unexpected exit %v at rip %#x", why, r.RIP)
		}
	}
}

// restart zeroes the counter and arms its overflow period (NeverOverflow
// for none). The period is set while counting, where the kernel restarts
// it at once; the counter counts only in guest mode, so nothing is
// counted between.
func restart(c *kvm.PerfCounter, period uint64) error {
	if err := c.Disable(); err != nil {
		return err
	}
	if err := c.Reset(); err != nil {
		return err
	}
	if err := c.Enable(); err != nil {
		return err
	}
	return c.SetPeriod(period)
}

// stopped stops the counter and reads it.
func stopped(c *kvm.PerfCounter) (uint64, error) {
	if err := c.Disable(); err != nil {
		return 0, err
	}
	return c.Read()
}

// Count runs one pass, counted from zero, and returns the count at its
// end. A pass whose guest misbehaves (wrong port writes, wrong result)
// is an error, not a count.
func (l *HostLoop) Count() (uint64, error) {
	c, err := l.counter()
	if err != nil {
		return 0, err
	}
	if err := restart(c, kvm.NeverOverflow); err != nil {
		return 0, err
	}
	s, err := l.pass(c, 0)
	n, cerr := stopped(c)
	if err != nil {
		return 0, err
	}
	if cerr != nil {
		return 0, cerr
	}
	if err := l.checkEnd(s); err != nil {
		return 0, err
	}
	return n, nil
}

// checkEnd checks a pass that reached the end.
func (l *HostLoop) checkEnd(s loopStop) error {
	if s.exits != l.exits() || uint64(s.result) != l.iters {
		return fmt.Errorf("the loop guest made %d port writes and %d iterations, want %d and %d", s.exits, s.result, l.exits(), l.iters)
	}
	return nil
}

// overflowTries bounds the passes of one Overflow. The overflow's signal
// reaches KVM_RUN only while the guest runs; if the overflow fires while
// the vCPU thread is out of the guest for a port write, the signal goes to
// the Go runtime instead and the pass runs on to its end. That is rare and
// random, so a pass that saw the counter past the armed count at an exit
// and then ended is retried; a counter whose overflow never comes (an old
// kernel's PERF_EVENT_IOC_PERIOD) fails every try.
const overflowTries = 3

// Overflow runs one pass counted from zero with the overflow armed n
// branches in, and returns the count where the overflow's signal stopped
// the guest.
func (l *HostLoop) Overflow(n uint64) (uint64, error) {
	if n == 0 {
		return 0, fmt.Errorf("overflow armed at 0 branches")
	}
	c, err := l.counter()
	if err != nil {
		return 0, err
	}
	for try := 1; ; try++ {
		if err := restart(c, n); err != nil {
			return 0, err
		}
		s, err := l.pass(c, n)
		got, cerr := stopped(c)
		if serr := c.SetPeriod(kvm.NeverOverflow); cerr == nil {
			cerr = serr
		}
		if err != nil {
			return 0, err
		}
		if cerr != nil {
			return 0, cerr
		}
		if !s.end {
			return got, nil
		}
		if err := l.checkEnd(s); err != nil {
			return 0, err
		}
		if !s.atOrPast || try == overflowTries {
			return 0, fmt.Errorf("the pass ended at %d branches without an overflow (armed at %d; %d tries)", got, n, try)
		}
	}
}

// Close closes the counter and frees the guest.
func (l *HostLoop) Close() error {
	var errs []error
	if l.c != nil {
		errs = append(errs, l.c.Close())
		l.c = nil
	}
	if l.g != nil {
		errs = append(errs, l.g.Close())
		l.g = nil
	}
	return errors.Join(errs...)
}
