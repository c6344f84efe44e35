package machine

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"gvisor.dev/gvisor/pkg/buffer"
)

// Position is where the guest is in its execution. Without a PMU it is the
// number of deterministic exits (PIO, MMIO, HLT, interrupt window) so far,
// this one included, and the RIP at that exit.
type Position struct {
	Exits uint64
	RIP   uint64
}

func (p Position) String() string { return fmt.Sprintf("exit %d rip %#x", p.Exits, p.RIP) }

// InputKind is the kind of an Input.
type InputKind uint8

// Input kinds.
const (
	InputTime   InputKind = iota + 1 // guest time: the clock reading devices see from here on
	InputSerial                      // console bytes for the UART (all of them fit)
	InputDevice                      // data for an InputPort (a received frame)
)

// Input is one piece of the outside world, delivered at a position.
type Input struct {
	Kind InputKind
	Time time.Duration // InputTime
	Port int           // InputDevice: index of the input port, in registration order
	Data []byte        // InputSerial, InputDevice
}

// A Journal is where a machine's non-determinism goes when recording, or
// comes from when replaying. With a journal, the machine delivers inputs
// and injects interrupts only at deterministic exits: an input that falls
// due while the guest runs waits for the next one, and a kick (signal) is
// never a delivery point. Every method runs on the vCPU thread.
type Journal interface {
	// Deliver returns the inputs to apply at p, in order, often none;
	// when there are any, the first is the guest time, which moves only
	// when it matters (see liveInputs). live gathers what the outside
	// world has queued (a recorder logs and returns it; a replayer
	// ignores it and returns what was logged at p). halted says the guest
	// is in HLT: the machine calls Deliver again at the same position
	// until an interrupt is pending (a replayer must then have a delivery
	// logged there). A replayer returns an error when the log says
	// otherwise (a divergence), and ErrLogEnd once p is the log's last
	// position.
	Deliver(p Position, halted bool, live func() []Input) ([]Input, error)
	// Injected is told of each interrupt injected at p.
	Injected(p Position, vector uint8) error
	// WindowRequested is told of each interrupt-window request at p.
	WindowRequested(p Position) error
	// Live reports whether the inputs come from the outside world (a
	// recorder): a halted guest then waits for them in host time. A
	// replayer's come from the log, so the machine asks at once again.
	Live() bool
	// Sync logs a sync point (a recorder; see SyncPoint).
	Sync(sp *SyncPoint) error
	// NextSync returns the sync point the log has next, if it is
	// asynchronous (async: a delta or a branch point) or a check (!async)
	// after exit n, and consumes it; else nil. A recorder returns nil.
	NextSync(n uint64, async bool) (*SyncPoint, error)
}

// ErrLogEnd is a replay journal's answer at the log's last position: the
// machine stops there (StopLogEnd).
var ErrLogEnd = errors.New("end of the replay log")

// steppedClock is the clock devices read under a journal: it moves only
// when the machine applies an InputTime, at deterministic exits.
type steppedClock struct {
	mu  sync.Mutex
	now time.Duration
}

func (c *steppedClock) Now() time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *steppedClock) set(t time.Duration) {
	c.mu.Lock()
	if t > c.now {
		c.now = t
	}
	c.mu.Unlock()
}

// Set makes t the guest time (a restore).
func (c *steppedClock) Set(t time.Duration) {
	c.mu.Lock()
	c.now = t
	c.mu.Unlock()
}

func (c *steppedClock) SleepUntil(ctx context.Context, t time.Duration, wake <-chan struct{}) {}
func (c *steppedClock) WakeAt(t time.Duration, f func())                                      {}

// TimeQuantum is how far the host's time may run ahead of the guest's,
// under a journal, before a deterministic exit brings the guest's up: a
// guest that polls a device clock sees it move in steps this large at
// most. Guest time also moves at once when a PIT edge falls due, when
// input arrives and in HLT, so no interrupt waits for the quantum. Each
// step is a log entry, so this bounds the log's clock traffic to about
// 1000 entries a second.
const TimeQuantum = time.Millisecond

// liveInputs gathers what the outside world has for the guest now: the
// host clock's time if the guest's should move (see TimeQuantum), console
// bytes the UART has room for, queued device input. Called by a recording
// journal.
func (m *Machine) liveInputs(halted bool) []Input {
	now := m.hostClock.Now()
	guest := m.stepped.Now()
	if now < guest {
		now = guest
	}
	var in []Input
	if now-guest >= TimeQuantum || (m.hasNextDue && now >= m.nextDue) {
		in = append(in, Input{Kind: InputTime, Time: now})
	}
	q := &m.inputs
	q.mu.Lock()
	if n := min(len(q.serial), m.UART.RxSpace()); n > 0 {
		in = append(in, Input{Kind: InputSerial, Data: append([]byte(nil), q.serial[:n]...)})
		q.serial = append(q.serial[:0], q.serial[n:]...)
		q.space.Broadcast()
	}
	devs := q.devices
	q.devices = nil
	q.mu.Unlock()
	for _, d := range devs {
		in = append(in, Input{Kind: InputDevice, Port: d.port.index, Data: d.data.Flatten()})
		d.data.Release()
	}
	if len(in) > 0 && in[0].Kind != InputTime {
		// Every delivery with inputs starts with the time: it marks
		// where one ends in a log, and input is seen at the host's time
		// (IRQ wait accounting).
		in = append([]Input{{Kind: InputTime, Time: now}}, in...)
	}
	return in
}

// apply delivers inputs to the devices.
func (m *Machine) apply(in []Input) error {
	for _, x := range in {
		switch x.Kind {
		case InputTime:
			m.stepped.set(x.Time) // journalPoint brings the PIT up to it
		case InputSerial:
			if n := m.UART.Receive(x.Data); n != len(x.Data) {
				return fmt.Errorf("journal: the UART took %d of %d input bytes", n, len(x.Data))
			}
		case InputDevice:
			if x.Port < 0 || x.Port >= len(m.inputPorts) {
				return fmt.Errorf("journal: input for port %d, the machine has %d", x.Port, len(m.inputPorts))
			}
			m.inputPorts[x.Port].deliver(buffer.MakeWithData(x.Data))
		default:
			return fmt.Errorf("journal: unknown input kind %d", x.Kind)
		}
	}
	return nil
}

// journalPoint is a delivery point: inputs at p, and for HLT, until an
// interrupt is pending (sleeping on the host clock while recording).
func (m *Machine) journalPoint(ctx context.Context, p Position, halted bool) error {
	for {
		in, err := m.journal.Deliver(p, halted, func() []Input { return m.liveInputs(halted) })
		if err != nil && !errors.Is(err, ErrLogEnd) {
			return err
		}
		if aerr := m.apply(in); aerr != nil {
			return aerr
		}
		now := m.stepped.Now()
		prevDue, hadDue := m.nextDue, m.hasNextDue
		m.nextDue, m.hasNextDue = m.PIT.Advance(now)
		if m.PIC.Pending() && !m.irqPending {
			// Due since the PIT edge if one fell due, else since now
			// (input): what the wait statistics measure from.
			m.irqPending, m.irqDue = true, now
			if hadDue && prevDue < now {
				m.irqDue = prevDue
			}
		}
		if err != nil {
			return err // the log ends here, after these inputs
		}
		if !halted || m.PIC.Pending() || m.stop != nil {
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if !m.journal.Live() {
			if len(in) == 0 {
				// The recording did not halt here with nothing pending:
				// it would have logged what woke it.
				return fmt.Errorf("replay diverged at %v: the guest halted with no interrupt pending, and the log has nothing more for it here", p)
			}
			continue // the log has the next delivery here
		}
		// Halted with nothing pending: wait for the PIT or for input.
		if m.hasNextDue {
			m.hostClock.SleepUntil(ctx, m.nextDue, m.inputs.wake)
		} else {
			select {
			case <-m.inputs.wake:
			case <-ctx.Done():
			}
		}
	}
}

// ContinueLive makes the host's clock continue from the guest's time. A
// backup that replayed a log calls it when it goes live, so that guest time
// goes on from where the log left it (its own host clock has meant nothing
// until then). Call it from a journal method (the vCPU thread) or while the
// machine is stopped.
func (m *Machine) ContinueLive() {
	if m.stepped == nil {
		return
	}
	if c, ok := m.hostClock.(interface{ Set(time.Duration) }); ok {
		c.Set(m.stepped.Now())
	}
}

// DeviceInputJournal is a Journal that also carries data a device reads
// from outside the guest inside an exit (a disk image that another VMM
// writes): a recorder logs what live returns, a replayer returns what was
// logged at the same position instead of calling live.
type DeviceInputJournal interface {
	DeviceInput(p Position, name string, live func() ([]byte, error)) ([]byte, error)
}

// JournalDeviceInput is device input at p through journal j when it
// carries device input (a DeviceInputJournal), else live.
func JournalDeviceInput(j Journal, p Position, name string, live func() ([]byte, error)) ([]byte, error) {
	if d, ok := j.(DeviceInputJournal); ok {
		return d.DeviceInput(p, name, live)
	}
	return live()
}

// DeviceReadError is a device input that failed in the recording: the
// replay fails the same read the same way.
type DeviceReadError struct{ Msg string }

func (e *DeviceReadError) Error() string { return e.Msg + " (as in the recording)" }

// DeviceInput is how a device reads outside data during the exit it
// serves (the vCPU thread): through the journal when there is one that
// carries device input, else directly. An error is the device's to report
// to the guest; a journal's own failure (a divergence, a broken log) also
// stops the machine after this exit.
func (m *Machine) DeviceInput(name string, live func() ([]byte, error)) ([]byte, error) {
	var liveErr error
	data, err := JournalDeviceInput(m.journal, Position{Exits: m.exits + 1}, name, func() ([]byte, error) {
		d, err := live()
		liveErr = err
		return d, err
	})
	var dre *DeviceReadError
	if err != nil && err != liveErr && !errors.As(err, &dre) && m.journalErr == nil {
		m.journalErr = fmt.Errorf("device input %s: %w", name, err)
	}
	return data, err
}
