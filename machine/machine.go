package machine

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"runtime"
	"slices"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gokvm-ft/gokvm-ft/kvm"
	"github.com/gokvm-ft/gokvm-ft/machine/pic"
	"github.com/gokvm-ft/gokvm-ft/machine/pit"
	"github.com/gokvm-ft/gokvm-ft/machine/rtc"
	"github.com/gokvm-ft/gokvm-ft/machine/uart"
)

// Guest physical layout. RAM starts at 0; the 1 GiB below 4 GiB is kept for
// MMIO devices and the few pages Intel VMX needs for itself.
const (
	MaxMemory    = 3 << 30
	MMIOBase     = 0xd0000000
	vmxTSSAddr   = 0xfffbd000
	vmxIdentAddr = 0xfffbc000
	COM1Base     = 0x3f8
	COM1IRQ      = 4
	PITIRQ       = 0
)

// Config describes a machine.
type Config struct {
	MemorySize uint64   // bytes of RAM, a multiple of 4 KiB, at most MaxMemory
	Host       HostKind // which CPU feature masks apply
	// Clock is the source of guest time; nil means a HostClock from 0.
	Clock Clock
	// WallTime is what the RTC shows at guest time 0; zero means now.
	WallTime time.Time
	// Console receives the UART's output; nil discards it.
	Console io.Writer
	// TestExit enables PortTestExit, through which test guests stop the
	// machine with a status code.
	TestExit bool
	// DirtyLog turns on KVM's dirty page log for RAM.
	DirtyLog bool
	// OnExit, if set, is called on the vCPU thread after every deterministic
	// exit (PIO, MMIO, HLT, interrupt window) has been handled.
	OnExit func(Exit)
	// OnHostExit, if set, is called on the vCPU thread with the guest RIP
	// at every exit the guest did not cause (a kick or a host signal): a
	// sampling profiler kicks the vCPU periodically and reads it here.
	OnHostExit func(rip uint64)
	// Journal, if set, records or replays the machine's non-determinism:
	// inputs and interrupts then reach the guest only at deterministic
	// exits, and devices see a clock that moves only there (Clock is then
	// the host time a recording samples).
	Journal Journal
	// SyncPoints turns on sync points under a journal (see SyncPoint):
	// dirty tracking and an incremental memory hash from the start of the
	// first run. A replay must have it if the recording had.
	SyncPoints bool
	// DeltaAfter (recording with SyncPoints) bounds how long a due
	// interrupt waits for a deterministic exit before the guest is kicked
	// out and given it with a state delta; 0 means it waits for the exit.
	DeltaAfter time.Duration
	// DigestEvery (recording with SyncPoints) is how often a digest check
	// goes into the log at a deterministic exit; 0 means never.
	DigestEvery time.Duration
	// Positions, if set, makes the machine's position source (see
	// PositionSource) for its vCPU: a recording with sync points and
	// deltas takes branch points instead of state deltas, and a replay
	// reaches them. A recording and its replay must both have one or both
	// not.
	Positions func(*kvm.VCPU) (PositionSource, error)
	// HostCPU, when Pinned, is the host CPU the vCPU thread runs on. Where
	// CPUID answers depend on the host CPU (the lab host reports its APIC
	// ID in leaves 1, 0xb and 0x8000001e whatever the CPUID table says,
	// TestProbeCPUIDAcrossHostCPUs), a recording and its replay must run
	// on the same one: the guest reads CPUID without an exit we could log.
	HostCPU HostCPU
	Logger  *slog.Logger
}

// HostCPU names a host CPU to pin a vCPU thread to.
type HostCPU struct {
	Pinned bool
	CPU    int
}

// Exit describes one deterministic exit, for tracing and positions.
type Exit struct {
	Count  uint64         // deterministic exits so far, this one included
	Reason kvm.ExitReason // IO, MMIO, HLT or IRQ_WINDOW_OPEN
	RIP    uint64         // guest RIP at the exit (only filled in for OnExit)
	Addr   uint64         // port or MMIO address
	Size   uint8          // access size in bytes
	Write  bool
	Vector int // vector injected right after this exit, -1 if none
}

// StopKind says why a machine stopped running.
type StopKind int

// Stop kinds.
const (
	StopCanceled    StopKind = iota // the context was cancelled
	StopTestExit                    // a write to PortTestExit
	StopReset                       // the guest asked for a reset
	StopTripleFault                 // KVM_EXIT_SHUTDOWN: a triple fault
	StopPowerOff                    // the guest powered off
	StopHalted                      // HLT with interrupts disabled: nothing can wake it
	StopMoved                       // the guest moved to another VMM (Runner)
	StopLogEnd                      // a replay reached the end of its log
)

var stopNames = [...]string{"canceled", "test exit", "reset", "triple fault", "power off", "halted", "moved", "end of log"}

func (k StopKind) String() string {
	if int(k) < len(stopNames) {
		return stopNames[k]
	}
	return fmt.Sprintf("stop(%d)", int(k))
}

// Stop is how a run ended.
type Stop struct {
	Kind   StopKind
	Code   uint32 // for StopTestExit
	Detail string
}

func (s Stop) String() string {
	switch {
	case s.Kind == StopTestExit:
		return fmt.Sprintf("test exit with code %d", s.Code)
	case s.Detail != "":
		return s.Kind.String() + ": " + s.Detail
	}
	return s.Kind.String()
}

// ExitError is an exit the machine cannot handle: the guest is stuck or KVM
// failed. It carries the guest registers for the report.
type ExitError struct {
	Reason kvm.ExitReason
	Detail string
	Regs   kvm.Regs
}

func (e *ExitError) Error() string {
	return fmt.Sprintf("vCPU exit %v: %s (rip=%#x rsp=%#x rflags=%#x)", e.Reason, e.Detail, e.Regs.RIP, e.Regs.RSP, e.Regs.RFLAGS)
}

// Machine is one VM with one vCPU.
type Machine struct {
	cfg    Config
	log    *slog.Logger
	sys    *kvm.System
	vm     *kvm.VM
	cpu    *kvm.VCPU
	mem    *Memory
	clock  Clock
	policy CPUPolicy

	pio  bus[PortDevice]
	mmio bus[MMIODevice]

	PIC  *pic.PIC
	PIT  *pit.PIT
	UART *uart.UART
	RTC  *rtc.RTC
	kbc  *i8042
	sysc *sysCtrl

	cpuidOverridden []uint32 // CPUID leaves the host changed after KVM_SET_CPUID2
	cpuidDigest     string   // of the table the vCPU has (State.CPUID)
	restoreFailed   bool     // a Restore failed part-way: never run

	exits    uint64 // deterministic exits
	stats    ExitStats
	stop     *Stop
	armed    time.Duration
	hasArmed bool
	unknown  map[uint64]bool // unclaimed ports/addresses already logged

	inputs    inputQueue
	journal   Journal
	stepped   *steppedClock // the devices' clock under a journal
	hostClock Clock         // the host's time under a journal
	sync      *syncState    // sync points under a journal (Config.SyncPoints)

	// Interrupt wait accounting under a journal (ExitStats.IRQWait*).
	irqPending, hasNextDue bool
	irqDue, nextDue        time.Duration
	inputPorts             []*InputPort
	gate                   OutputGate
	// restoredReady: ReadyForInterrupt of the restored state, for the
	// first injection decision (hasRestoredReady).
	restoredReady, hasRestoredReady bool

	// positions, if set, places asynchronous events exactly (see
	// PositionSource); branchBase is its count at the last deterministic
	// exit.
	positions  PositionSource
	branchBase uint64
	// journalErr: a journal failed inside an exit (DeviceInput); the run
	// ends with it after the exit.
	journalErr error
	virtio     []*VirtioSlot

	kickMu sync.Mutex
	closed bool

	// Requests to run on the vCPU thread (Do), and the dirty-set owner.
	runMu     sync.Mutex // held by Run for its whole length
	reqMu     sync.Mutex
	running   bool
	reqs      []request
	dirtySets []*DirtySet
	dirtyLog  bool // KVM's dirty log is on for RAM
}

// New creates the VM, its memory, vCPU and legacy devices.
func New(cfg Config) (*Machine, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Console == nil {
		cfg.Console = io.Discard
	}
	if cfg.Clock == nil {
		cfg.Clock = NewHostClock(0)
	}
	if cfg.WallTime.IsZero() {
		cfg.WallTime = time.Now().UTC().Truncate(time.Second)
	}
	m := &Machine{cfg: cfg, log: cfg.Logger, clock: cfg.Clock, policy: CPUPolicy{Host: cfg.Host}, unknown: map[uint64]bool{}, stats: newExitStats(), gate: SendNow}
	m.inputs.init()
	if cfg.Journal != nil {
		m.journal, m.hostClock, m.stepped = cfg.Journal, cfg.Clock, &steppedClock{}
		m.clock = m.stepped
		if cfg.SyncPoints {
			m.sync = &syncState{}
		}
	}
	if err := m.create(); err != nil {
		m.Close()
		return nil, err
	}
	if cfg.Positions != nil {
		p, err := cfg.Positions(m.cpu)
		if err != nil {
			m.Close()
			return nil, fmt.Errorf("position source: %w", err)
		}
		m.positions = p
	}
	return m, nil
}

func (m *Machine) create() error {
	var err error
	if m.mem, err = NewMemory(m.cfg.MemorySize); err != nil {
		return err
	}
	if m.sys, err = kvm.Open(); err != nil {
		return err
	}
	if err := m.sys.RequireExtensions(kvm.CapUserMemory, kvm.CapImmediateExit, kvm.CapExtCPUID, kvm.CapVCPUEvents); err != nil {
		return err
	}
	if m.vm, err = m.sys.CreateVM(); err != nil {
		return err
	}
	if m.vm.CheckExtension(kvm.CapSetTSSAddr) != 0 {
		// Needed by Intel VMX for real-mode emulation; harmless elsewhere.
		if err := m.vm.SetTSSAddr(vmxTSSAddr); err != nil {
			return err
		}
	}
	var flags uint32
	if m.cfg.DirtyLog {
		flags |= kvm.MemLogDirtyPages
		m.dirtyLog = true
	}
	if err := m.vm.SetUserMemoryRegion(kvm.UserMemoryRegion{Slot: 0, Flags: flags, MemorySize: m.mem.Size(), UserspaceAddr: kvm.HostAddr(m.mem.host())}); err != nil {
		return err
	}
	if m.cpu, err = m.vm.CreateVCPU(0); err != nil {
		return err
	}
	supported, err := m.sys.SupportedCPUID()
	if err != nil {
		return err
	}
	table := m.policy.Apply(supported)
	if err := m.cpu.SetCPUID2(table); err != nil {
		return err
	}
	back, err := m.cpu.GetCPUID2()
	if err != nil {
		return err
	}
	m.cpuidDigest = cpuidDigest(back)
	if m.cpuidOverridden = overriddenLeaves(table, back); len(m.cpuidOverridden) > 0 {
		m.log.Warn("the host overrides CPUID leaves after KVM_SET_CPUID2: the guest sees the host's bits there",
			"leaves", fmt.Sprintf("%#x", m.cpuidOverridden), "host", m.policy.Host)
	}
	if err := m.cpu.SetMSRs(m.policy.InitialMSRs()); err != nil {
		return err
	}
	if m.policy.Host == HostLabPVM && m.cpu.HasTSCOffset() {
		// Guest TSC = host TSC, as native user-mode RDTSC sees it.
		if err := m.cpu.SetTSCOffset(0); err != nil {
			return err
		}
	}
	return m.createDevices()
}

func (m *Machine) createDevices() error {
	m.PIC = pic.New()
	m.PIT = pit.New(m.clock, func(level bool) { m.PIC.SetIRQ(PITIRQ, level) })
	m.UART = uart.New(COM1Base, func(level bool) { m.PIC.SetIRQ(COM1IRQ, level) }, m.cfg.Console)
	m.RTC = rtc.New(m.clock, m.cfg.WallTime)
	m.setCMOSMemorySize()
	m.kbc = &i8042{reset: m.requestReset}
	m.sysc = &sysCtrl{reset: m.requestReset}
	regs := []struct {
		base, size uint64
		dev        PortDevice
	}{
		{0x20, 2, m.PIC}, {0xa0, 2, m.PIC}, {0x4d0, 2, m.PIC},
		{0x40, 4, m.PIT}, {0x61, 1, m.PIT},
		{COM1Base, 8, m.UART},
		{0x70, 2, m.RTC},
		{portI8042Data, 1, m.kbc}, {portI8042Cmd, 1, m.kbc},
		{portSysCtrlA, 1, m.sysc}, {portResetCtrl, 1, m.sysc},
		{portPOST, 1, sinkPort{}}, {portDelay, 1, sinkPort{}},
	}
	if m.cfg.TestExit {
		regs = append(regs, struct {
			base, size uint64
			dev        PortDevice
		}{PortTestExit, 4, testExit{exit: func(code uint32) {
			m.requestStop(Stop{Kind: StopTestExit, Code: code})
		}}})
	}
	for _, r := range regs {
		if err := m.pio.register(r.base, r.size, r.dev); err != nil {
			return fmt.Errorf("port bus: %w", err)
		}
	}
	return nil
}

// setCMOSMemorySize fills the CMOS bytes where firmware reports RAM size.
func (m *Machine) setCMOSMemorySize() {
	kb := m.mem.Size() >> 10
	ext := min(max(kb, 1024)-1024, 0xffff) // KiB above 1 MiB, capped
	m.RTC.SetRAM(0x15, 0x80)               // 640 KiB base memory
	m.RTC.SetRAM(0x16, 0x02)
	m.RTC.SetRAM(0x17, byte(ext))
	m.RTC.SetRAM(0x18, byte(ext>>8))
	m.RTC.SetRAM(0x30, byte(ext))
	m.RTC.SetRAM(0x31, byte(ext>>8))
	above16 := uint64(0)
	if m.mem.Size() > 16<<20 {
		above16 = min((m.mem.Size()-16<<20)>>16, 0xffff) // 64 KiB units
	}
	m.RTC.SetRAM(0x34, byte(above16))
	m.RTC.SetRAM(0x35, byte(above16>>8))
}

// RegisterPort adds a device to the port bus.
func (m *Machine) RegisterPort(base uint16, size uint16, dev PortDevice) error {
	return m.pio.register(uint64(base), uint64(size), dev)
}

// RegisterMMIO adds a device to the MMIO bus; the range must lie outside RAM.
func (m *Machine) RegisterMMIO(base, size uint64, dev MMIODevice) error {
	if base < m.mem.Size() {
		return fmt.Errorf("MMIO range at %#x overlaps RAM (%#x bytes)", base, m.mem.Size())
	}
	return m.mmio.register(base, size, dev)
}

// Memory is guest RAM.
func (m *Machine) Memory() *Memory { return m.mem }

// VCPU is the machine's vCPU, for loaders that set its initial state. Use it
// only while the machine is not running.
func (m *Machine) VCPU() *kvm.VCPU { return m.cpu }

// Clock is the machine's clock.
func (m *Machine) Clock() Clock { return m.clock }

// CPUIDOverridden lists the CPUID leaves (functions) whose values KVM
// changed from the CPU policy's table: on the lab host, leaves 1, 7 and 0xd
// come from the host whatever we set. Empty where the policy holds.
func (m *Machine) CPUIDOverridden() []uint32 { return m.cpuidOverridden }

// overriddenLeaves compares the table we set with what KVM reports back and
// returns the functions that differ, were dropped or were added.
func overriddenLeaves(set, got []kvm.CPUIDEntry) []uint32 {
	type key struct{ fn, idx uint32 }
	want := make(map[key]kvm.CPUIDEntry, len(set))
	for _, e := range set {
		want[key{e.Function, e.Index}] = e
	}
	diff := map[uint32]bool{}
	for _, e := range got {
		k := key{e.Function, e.Index}
		w, ok := want[k]
		if !ok || w.EAX != e.EAX || w.EBX != e.EBX || w.ECX != e.ECX || w.EDX != e.EDX {
			diff[e.Function] = true
		}
		delete(want, k)
	}
	for k := range want {
		diff[k.fn] = true
	}
	out := make([]uint32, 0, len(diff))
	for fn := range diff {
		out = append(out, fn)
	}
	slices.Sort(out)
	return out
}

// Policy is the CPU policy in force.
func (m *Machine) Policy() CPUPolicy { return m.policy }

// SetOnExit replaces Config.OnExit; call it only while the machine is not
// running.
func (m *Machine) SetOnExit(f func(Exit)) { m.cfg.OnExit = f }

// Exits is the number of deterministic exits so far.
func (m *Machine) Exits() uint64 { return m.exits }

// Close releases the vCPU, VM and memory.
func (m *Machine) Close() error {
	m.kickMu.Lock()
	m.closed = true
	m.kickMu.Unlock()
	var errs []error
	if m.cpu != nil {
		errs = append(errs, m.cpu.Close())
	}
	if m.vm != nil {
		errs = append(errs, m.vm.Close())
	}
	if m.sys != nil {
		errs = append(errs, m.sys.Close())
	}
	if m.mem != nil {
		errs = append(errs, m.mem.Close())
	}
	return errors.Join(errs...)
}

// Kick makes the vCPU leave the guest and come round its loop soon. Safe
// from any goroutine, also after Close.
func (m *Machine) Kick() { m.kick() }

// kick makes the vCPU loop come round soon; safe from any goroutine.
func (m *Machine) kick() {
	m.kickMu.Lock()
	defer m.kickMu.Unlock()
	if !m.closed {
		m.cpu.Kick()
	}
}

func (m *Machine) requestStop(s Stop) {
	if m.stop == nil {
		m.stop = &s
	}
}

func (m *Machine) requestReset(why string) { m.requestStop(Stop{Kind: StopReset, Detail: why}) }

// Run runs the guest until it stops, the context ends or an error occurs.
// It must not be called concurrently with itself or with state accessors.
func (m *Machine) Run(ctx context.Context) (Stop, error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if m.cfg.HostCPU.Pinned {
		unpin, err := pinThread(m.cfg.HostCPU.CPU)
		if err != nil {
			return Stop{}, err
		}
		defer unpin()
	}
	m.cpu.BindThread()
	defer m.cpu.UnbindThread()
	if m.restoreFailed {
		return Stop{}, ErrRestoreFailed
	}
	m.runMu.Lock()
	defer m.runMu.Unlock()
	m.setRunning(true)
	defer m.setRunning(false)
	unwatch := context.AfterFunc(ctx, m.kick)
	defer unwatch()
	if m.stats.Started.IsZero() {
		m.stats.Started = time.Now()
	}
	j := m.journal
	var cancelSeen time.Time
	deliver := true // journal: this iteration follows a deterministic exit (or the start)
	stray := false  // the last exit was a signal that was not a kick
	var pos Position
	if j != nil {
		regs, err := m.cpu.GetRegs()
		if err != nil {
			return Stop{}, err
		}
		pos = Position{Exits: m.exits, RIP: regs.RIP}
	}
	if m.sync != nil {
		if err := m.syncInit(); err != nil {
			return Stop{}, err
		}
		defer m.disarmDelta()
	}
	stopPositions, err := m.startPositions()
	if err != nil {
		return Stop{}, err
	}
	defer stopPositions()
	recordDeltas := m.sync != nil && j.Live() && m.cfg.DeltaAfter > 0 && m.journalSyncs()
	for {
		if m.stop != nil {
			return *m.stop, nil
		}
		// Under a journal a run ends only at a deterministic exit, where
		// recorder and replayer can both stop; a guest that makes none
		// for a second is stopped where it is.
		if ctx.Err() != nil {
			if j == nil || deliver {
				return Stop{Kind: StopCanceled}, nil
			}
			if cancelSeen.IsZero() {
				cancelSeen = time.Now()
			} else if time.Since(cancelSeen) > time.Second {
				return Stop{Kind: StopCanceled, Detail: "not at a deterministic exit: the log cannot end here"}, nil
			}
			time.AfterFunc(10*time.Millisecond, m.kick)
		}
		vector := -1
		if j == nil && !stray {
			m.service()
			v, err := m.inject()
			if err != nil {
				return Stop{}, err
			}
			vector = v
		} else if j != nil {
			m.runRequests()
			if deliver {
				v, err := m.injectJournal(pos)
				if err != nil {
					return Stop{}, err
				}
				vector = v
				if m.sync != nil && !j.Live() && m.stop == nil {
					// A replay takes a state delta logged here instead of
					// running the guest to where the recording took it,
					// or runs it to a branch point logged here.
					sp, err := j.NextSync(pos.Exits, true)
					if err != nil {
						return Stop{}, fmt.Errorf("at %v: %w", pos, err)
					}
					if sp != nil {
						// A branch point is reached by running the guest
						// there; a delta replaces the run.
						apply := m.applyDelta
						if sp.Branch {
							apply = m.seekBranchPoint
						}
						if err := apply(sp); err != nil {
							return Stop{}, err
						}
						if vector >= 0 {
							m.stats.Injections++
						}
						pos = sp.Pos
						if err := m.journalPointAt(ctx, pos, false); err != nil {
							return Stop{}, err
						}
						continue // deliver stays true: inject here next
					}
				}
			}
		}
		deliver, stray = false, false
		if recordDeltas {
			m.armDelta()
		}
		entered := time.Now()
		if err := m.cpu.Run(); err != nil {
			return Stop{}, err
		}
		m.stats.InGuest += time.Since(entered)
		if recordDeltas {
			m.disarmDelta()
		}
		if vector >= 0 {
			m.stats.Injections++
		}
		ex := Exit{Reason: m.cpu.ExitReason(), Vector: -1}
		halt := false
		switch ex.Reason {
		case kvm.ExitIntr:
			// A kick or a host signal: not a guest event. A signal that
			// is not our kick (the Go runtime preempts threads with the
			// same SIGURG) changes nothing: re-enter the guest without
			// servicing devices or injecting, so that where the guest
			// stands then cannot matter.
			m.stats.HostExits++
			stray = !m.cpu.ClearImmediateExit()
			if m.cfg.OnHostExit != nil {
				if regs, err := m.cpu.GetRegs(); err == nil {
					m.cfg.OnHostExit(regs.RIP)
				}
			}
			if recordDeltas && m.sync.kicked.Swap(false) && m.stop == nil && ctx.Err() == nil && m.deltaDue() {
				took, p, err := m.recordDelta(ctx)
				if err != nil {
					return Stop{}, err
				}
				if took {
					pos, deliver = p, true
				}
			}
			continue
		case kvm.ExitIO:
			if err := m.handleIO(&ex); err != nil {
				return Stop{}, err
			}
		case kvm.ExitMMIO:
			m.handleMMIO(&ex)
		case kvm.ExitHLT:
			if !m.cpu.IFFlag() {
				m.requestStop(Stop{Kind: StopHalted, Detail: "HLT with interrupts disabled"})
			} else if j == nil {
				halted := time.Now()
				m.waitForInterrupt(ctx)
				m.stats.Halted += time.Since(halted)
			} else {
				halt = true
			}
		case kvm.ExitIRQWindowOpen:
			if recordDeltas && m.sync.window {
				// Asked for by recordDelta: where it lands does not
				// repeat, so it is a delta point, not a counted exit.
				took, p, err := m.recordDelta(ctx)
				if err != nil {
					return Stop{}, err
				}
				if took {
					pos, deliver = p, true
				}
				continue
			}
			if j != nil {
				// A journal never asks for a window at a deterministic
				// point, and where one lands does not repeat: one that
				// comes late for a request since withdrawn is not an exit
				// the replay would count.
				m.stats.HostExits++
				continue
			}
			// Injection happens at the top of the loop.
		case kvm.ExitShutdown:
			m.requestStop(Stop{Kind: StopTripleFault, Detail: "the guest triple-faulted (KVM_EXIT_SHUTDOWN)"})
			continue
		case kvm.ExitSystemEvent:
			ev := m.cpu.SystemEvent()
			switch ev.Type {
			case kvm.SystemEventReset:
				m.requestReset("KVM system event")
			case kvm.SystemEventShutdown:
				m.requestStop(Stop{Kind: StopPowerOff, Detail: "KVM system event"})
			default:
				return Stop{}, m.exitError(ex.Reason, fmt.Sprintf("system event type %d", ev.Type))
			}
			continue
		case kvm.ExitDebug:
			continue
		case kvm.ExitFailEntry:
			fe := m.cpu.FailEntry()
			return Stop{}, m.exitError(ex.Reason, fmt.Sprintf("hardware entry failure reason %#x", fe.HardwareEntryFailureReason))
		case kvm.ExitInternalError:
			ie := m.cpu.InternalError()
			n := min(int(ie.NData), len(ie.Data))
			return Stop{}, m.exitError(ex.Reason, fmt.Sprintf("suberror %d (1: instruction emulation failed) data %#x", ie.Suberror, ie.Data[:n]))
		default:
			return Stop{}, m.exitError(ex.Reason, "unexpected exit")
		}
		if m.journalErr != nil {
			err := m.journalErr
			m.journalErr = nil
			return Stop{}, err
		}
		m.exits++
		m.stats.count(&ex)
		if j != nil || m.cfg.OnExit != nil {
			regs, err := m.cpu.GetRegs()
			if err != nil {
				return Stop{}, err
			}
			ex.RIP = regs.RIP
		}
		if j != nil && m.stop == nil {
			pos = Position{Exits: m.exits, RIP: ex.RIP}
			if err := m.markExit(); err != nil {
				return Stop{}, err
			}
			if m.sync != nil && m.sync.window {
				// A delta waiting for a window: this exit delivers instead.
				m.sync.window = false
				m.cpu.SetRequestInterruptWindow(false)
			}
			halted := time.Now()
			err := m.journalPointAt(ctx, pos, halt)
			if halt {
				m.stats.Halted += time.Since(halted)
			}
			if err != nil {
				return Stop{}, err
			}
			if err := m.syncCheck(pos); err != nil {
				return Stop{}, err // a SyncMismatchError names the position
			}
			deliver = true
		}
		if m.cfg.OnExit != nil {
			ex.Count = m.exits
			if vector >= 0 {
				ex.Vector = vector
			}
			m.cfg.OnExit(ex)
		}
	}
}

// journalPointAt is journalPoint with the log's end and a halted guest's
// cancellation turned into stops.
func (m *Machine) journalPointAt(ctx context.Context, pos Position, halt bool) error {
	err := m.journalPoint(ctx, pos, halt)
	switch {
	case errors.Is(err, ErrLogEnd):
		m.requestStop(Stop{Kind: StopLogEnd, Detail: pos.String()})
	case errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded):
		// Halted and cancelled: stop here, at the HLT exit.
	case err != nil:
		return fmt.Errorf("at %v: %w", pos, err)
	}
	return nil
}

// SyncPointer is what a live Journal may also be: one that says whether
// sync points are wanted now. A journal that writes nothing down (an FT
// primary with no backup) says no, and the machine then takes no state
// deltas or digests: it runs as fast as without sync points. Read at the
// start of each Run (deltas) and at each check (digests).
type SyncPointer interface {
	SyncPoints() bool
}

// WantsSyncPoints reports whether journal j wants sync points now: one
// that is not a SyncPointer always does.
func WantsSyncPoints(j Journal) bool {
	sp, ok := j.(SyncPointer)
	return !ok || sp.SyncPoints()
}

// journalSyncs reports whether the machine's journal wants sync points now.
func (m *Machine) journalSyncs() bool { return WantsSyncPoints(m.journal) }

// syncCheck is the digest check at a deterministic exit: a recorder logs
// one every DigestEvery, a replayer checks the one logged here.
func (m *Machine) syncCheck(pos Position) error {
	if m.sync == nil || m.stop != nil {
		return nil
	}
	if m.journal.Live() {
		if m.cfg.DigestEvery <= 0 || time.Since(m.sync.lastCheck) < m.cfg.DigestEvery || !m.journalSyncs() {
			return nil
		}
		m.sync.lastCheck = time.Now()
		sp, err := m.takeSyncPoint(pos, false)
		if err != nil {
			return err
		}
		m.sync.checks++
		return m.journal.Sync(sp)
	}
	sp, err := m.journal.NextSync(pos.Exits, false)
	if err != nil || sp == nil {
		return err
	}
	if sp.Pos != pos {
		return &SyncMismatchError{Pos: pos, Detail: fmt.Sprintf("the log's check is at %v", sp.Pos)}
	}
	return m.checkSyncPoint(sp)
}

// recordDelta is a recorder's delta point, after a delta kick or the
// interrupt window it asked for: if the guest can take an interrupt here,
// the state delta (with a position source: a branch point) goes into the
// log and the inputs due are delivered at its position (returned, for the
// injection); if not, it asks for an interrupt window and reports none.
func (m *Machine) recordDelta(ctx context.Context) (bool, Position, error) {
	s := m.sync
	ready, err := m.deltaReady()
	if err != nil {
		return false, Position{}, err
	}
	if !ready {
		s.window = true
		m.cpu.SetRequestInterruptWindow(true)
		return false, Position{}, nil
	}
	s.window = false
	m.cpu.SetRequestInterruptWindow(false)
	regs, err := m.cpu.GetRegs()
	if err != nil {
		return false, Position{}, err
	}
	p := Position{Exits: m.exits, RIP: regs.RIP}
	var sp *SyncPoint
	if m.positions != nil {
		sp, err = m.takeBranchPoint(p)
	} else {
		sp, err = m.takeSyncPoint(p, true)
	}
	if err != nil {
		return false, Position{}, err
	}
	if err := m.journal.Sync(sp); err != nil {
		return false, Position{}, err
	}
	if sp.Branch {
		s.branchPoints++
	} else {
		s.deltas++
		s.deltaBytes += uint64(len(sp.Data))
	}
	s.atDelta = true
	if err := m.journalPointAt(ctx, p, false); err != nil {
		return false, Position{}, err
	}
	return true, p, nil
}

// injectJournal is inject at a deterministic exit under a journal, which
// is told of the injection. It never asks for an interrupt-window exit:
// where such an exit lands is not repeatable on every host (see
// BENCHMARKS.md), so an interrupt the guest cannot take now waits for the
// next deterministic exit where it can.
func (m *Machine) injectJournal(p Position) (int, error) {
	m.cpu.SetRequestInterruptWindow(false)
	ready := m.readyForInterrupt()
	if m.sync != nil {
		m.sync.window = false
		if m.sync.atDelta {
			// A delta point: the recorder took it where the guest could
			// take an interrupt (KVM's exit flags are stale after a
			// replay loads the delta's vCPU state).
			ready, m.sync.atDelta = true, false
		}
	}
	if !m.PIC.Pending() || !ready {
		return -1, nil
	}
	v := m.PIC.Acknowledge()
	if err := m.cpu.Interrupt(v); err != nil {
		return -1, err
	}
	if m.irqPending {
		w := m.stepped.Now() - m.irqDue
		m.stats.IRQWaits++
		m.stats.IRQWaitTotal += w
		m.stats.IRQWaitMax = max(m.stats.IRQWaitMax, w)
		m.irqPending = m.PIC.Pending()
		m.irqDue = m.stepped.Now()
	}
	return int(v), m.journal.Injected(p, v)
}

// readyForInterrupt is whether the vCPU can take an interrupt now, as KVM
// said at the last exit; right after a restore, as the snapshot says.
func (m *Machine) readyForInterrupt() bool {
	if m.hasRestoredReady {
		m.hasRestoredReady = false
		return m.restoredReady
	}
	return m.cpu.ReadyForInterruptInjection() && m.cpu.IFFlag()
}

func (m *Machine) exitError(r kvm.ExitReason, detail string) error {
	regs, _ := m.cpu.GetRegs()
	return &ExitError{Reason: r, Detail: detail, Regs: regs}
}

// service brings time-driven devices up to date and hands queued input to
// devices. It runs on the vCPU thread between exits: the only place where the
// outside world enters the machine.
func (m *Machine) service() {
	m.runRequests()
	next, ok := m.PIT.Advance(m.clock.Now())
	if ok && (!m.hasArmed || next != m.armed) {
		m.armed, m.hasArmed = next, true
		m.clock.WakeAt(next, m.kick)
	}
	m.drainInputs()
}

// inject delivers the PIC's pending interrupt if the guest can take it now,
// else asks KVM for an interrupt-window exit. The PIC acknowledge (IRR to
// ISR) happens only at the moment of KVM_INTERRUPT, as INTA would. It returns
// the vector injected, or -1.
func (m *Machine) inject() (int, error) {
	if !m.PIC.Pending() {
		m.cpu.SetRequestInterruptWindow(false)
		return -1, nil
	}
	if m.readyForInterrupt() {
		v := m.PIC.Acknowledge()
		if err := m.cpu.Interrupt(v); err != nil {
			return -1, err
		}
		m.cpu.SetRequestInterruptWindow(false)
		return int(v), nil
	}
	m.cpu.SetRequestInterruptWindow(true)
	return -1, nil
}

// waitForInterrupt is the halted state: sleep on the clock until a device
// raises an interrupt, input arrives, or the run ends.
func (m *Machine) waitForInterrupt(ctx context.Context) {
	for m.stop == nil && ctx.Err() == nil {
		m.service()
		if m.PIC.Pending() {
			return
		}
		next, ok := m.PIT.Advance(m.clock.Now())
		if ok {
			m.clock.SleepUntil(ctx, next, m.inputs.wake)
			continue
		}
		select {
		case <-m.inputs.wake:
		case <-ctx.Done():
		}
	}
}

func (m *Machine) handleIO(ex *Exit) error {
	io := m.cpu.IO()
	data, err := m.cpu.IOData()
	if err != nil {
		return m.exitError(kvm.ExitIO, err.Error())
	}
	size := int(io.Size)
	ex.Addr, ex.Size, ex.Write = uint64(io.Port), io.Size, io.Direction == kvm.IOOut
	if size != 1 && size != 2 && size != 4 {
		return m.exitError(kvm.ExitIO, fmt.Sprintf("port %#x access of %d bytes", io.Port, size))
	}
	dev, _, ok := m.pio.find(uint64(io.Port))
	for i := 0; i < int(io.Count); i++ {
		d := data[i*size : (i+1)*size]
		switch {
		case !ok:
			m.unclaimed("port", uint64(io.Port), ex.Write)
			if !ex.Write {
				fillOnes(d)
			}
		case ex.Write:
			dev.WritePort(io.Port, d)
		default:
			dev.ReadPort(io.Port, d)
		}
	}
	return nil
}

func (m *Machine) handleMMIO(ex *Exit) {
	mm := m.cpu.MMIO()
	n := min(int(mm.Len), len(mm.Data))
	d := mm.Data[:n]
	ex.Addr, ex.Size, ex.Write = mm.PhysAddr, uint8(n), mm.IsWrite != 0
	dev, base, ok := m.mmio.find(mm.PhysAddr)
	switch {
	case !ok:
		m.unclaimed("mmio", mm.PhysAddr, ex.Write)
		if !ex.Write {
			fillOnes(d)
		}
	case ex.Write:
		dev.WriteMMIO(mm.PhysAddr-base, d)
	default:
		dev.ReadMMIO(mm.PhysAddr-base, d)
	}
}

// unclaimed logs the first access to each unclaimed address: useful when
// bringing up a guest, quiet afterwards.
func (m *Machine) unclaimed(space string, addr uint64, write bool) {
	key := addr
	if space == "mmio" {
		key |= 1 << 63
	}
	if m.unknown[key] {
		return
	}
	m.unknown[key] = true
	m.log.Debug("unclaimed access", "space", space, "addr", fmt.Sprintf("%#x", addr), "write", write)
}

// pinThread keeps the calling (locked) thread on host CPU cpu until the
// returned function puts its old affinity back.
func pinThread(cpu int) (func(), error) {
	var old, set unix.CPUSet
	if err := unix.SchedGetaffinity(0, &old); err != nil {
		return nil, fmt.Errorf("sched_getaffinity: %w", err)
	}
	if cpu < 0 || cpu >= len(set)*64 {
		return nil, fmt.Errorf("host CPU %d: out of range", cpu)
	}
	set.Set(cpu)
	if err := unix.SchedSetaffinity(0, &set); err != nil {
		return nil, fmt.Errorf("pinning the vCPU thread to host CPU %d: %w", cpu, err)
	}
	return func() { unix.SchedSetaffinity(0, &old) }, nil
}
