package ft

import (
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/gokvm-ft/gokvm-ft/ft/ftlog"
	"github.com/gokvm-ft/gokvm-ft/machine"
)

func logPos(p machine.Position) ftlog.Position { return ftlog.Position{Exits: p.Exits, RIP: p.RIP} }

// Recorder is a machine.Journal that lets the live world in and writes
// every input, injection and window request to a log.
type Recorder struct {
	enc       *ftlog.Encoder
	lastFlush time.Time
	// FlushEvery bounds how long entries sit in the buffer (a backup's
	// lag, later); 0 means 100 ms.
	FlushEvery time.Duration
}

// NewRecorder starts a log on w; meta is JSON describing the recording
// (or nil).
func NewRecorder(w io.Writer, meta []byte) (*Recorder, error) {
	enc, err := ftlog.NewEncoder(w, ftlog.Header{Created: time.Now(), Meta: meta})
	if err != nil {
		return nil, err
	}
	return &Recorder{enc: enc, lastFlush: time.Now()}, nil
}

// Deliver logs what the world has for the guest now and returns it. Now
// and then (FlushEvery) it flushes the log, first marking everything
// before p as written (a Progress entry), so that a replayer following the
// log may run up to p without waiting for an entry at every exit.
func (r *Recorder) Deliver(p machine.Position, halted bool, live func() []machine.Input) ([]machine.Input, error) {
	every := r.FlushEvery
	if every == 0 {
		every = 100 * time.Millisecond
	}
	flush := time.Since(r.lastFlush) > every
	if flush && p.Exits > 0 {
		// Entries at p may follow (these inputs, injections); none
		// before it can any more.
		if err := r.enc.Progress(p.Exits - 1); err != nil && !errors.Is(err, ftlog.ErrOrder) {
			return nil, fmt.Errorf("record: %w", err)
		}
	}
	in := live()
	for _, x := range in {
		var err error
		switch x.Kind {
		case machine.InputTime:
			err = r.enc.ClockRead(logPos(p), 0, int64(x.Time))
		case machine.InputSerial:
			err = r.enc.SerialInput(logPos(p), 0, x.Data)
		case machine.InputDevice:
			err = r.enc.Packet(logPos(p), uint16(x.Port), x.Data)
		default:
			err = fmt.Errorf("input kind %d", x.Kind)
		}
		if err != nil {
			return nil, fmt.Errorf("record: %w", err)
		}
	}
	if flush {
		r.lastFlush = time.Now()
		if err := r.enc.Flush(); err != nil {
			return nil, fmt.Errorf("record: %w", err)
		}
	}
	return in, nil
}

// deviceInputFailed marks a device input entry whose live read failed: the
// data is the error's text.
const deviceInputFailed = "!"

// DeviceInput logs what a device read from outside the guest during the
// exit at p (machine.DeviceInputJournal), or that the read failed.
func (r *Recorder) DeviceInput(p machine.Position, name string, live func() ([]byte, error)) ([]byte, error) {
	data, err := live()
	if err != nil {
		if lerr := r.enc.Opaque(logPos(p), 0, name+deviceInputFailed, []byte(err.Error())); lerr != nil {
			return nil, fmt.Errorf("record: %w", lerr)
		}
		return nil, err
	}
	if err := r.enc.Opaque(logPos(p), 0, name, data); err != nil {
		return nil, fmt.Errorf("record: %w", err)
	}
	return data, nil
}

// Injected logs an interrupt injection.
func (r *Recorder) Injected(p machine.Position, vector uint8) error {
	return r.enc.Interrupt(logPos(p), vector)
}

// Sync logs a sync point: a state delta or a digest check.
func (r *Recorder) Sync(sp *machine.SyncPoint) error {
	b, err := sp.MarshalBinary()
	if err != nil {
		return err
	}
	return r.enc.StateDelta(logPos(sp.Pos), b)
}

// NextSync is nil for a recorder: it makes the sync points.
func (r *Recorder) NextSync(uint64, bool) (*machine.SyncPoint, error) { return nil, nil }

// Live is true: a recorder's inputs come from the outside world.
func (r *Recorder) Live() bool { return true }

// WindowRequested logs an interrupt-window request.
func (r *Recorder) WindowRequested(p machine.Position) error {
	return r.enc.WindowRequest(logPos(p))
}

// Finish ends the log where m stopped: a digest of its state and the End
// entry, then a flush. m must have stopped at a deterministic exit (as a
// machine with a journal does).
func (r *Recorder) Finish(m *machine.Machine) error {
	p, err := finalPosition(m)
	if err != nil {
		return err
	}
	d, err := m.Digest()
	if err != nil {
		return err
	}
	if err := r.enc.Digest(logPos(p), d); err != nil {
		return err
	}
	// Where a replay that ends with another digest differs.
	sum, err := m.Summary()
	if err != nil {
		return err
	}
	b, _ := sum.MarshalBinary()
	if err := r.enc.Opaque(logPos(p), 0, summaryName, b); err != nil {
		return err
	}
	return r.enc.End(logPos(p))
}

// Flush writes what the recorder buffers to its writer (it also does so
// every FlushEvery, and at Finish).
func (r *Recorder) Flush() error { return r.enc.Flush() }

// Entries is the number of entries written so far; Bytes the log's size.
func (r *Recorder) Entries() int64 { return r.enc.Entries() }

// Bytes is the number of log bytes written so far.
func (r *Recorder) Bytes() int64 { return r.enc.Offset() }

func finalPosition(m *machine.Machine) (machine.Position, error) {
	regs, err := m.VCPU().GetRegs()
	if err != nil {
		return machine.Position{}, err
	}
	return machine.Position{Exits: m.Exits(), RIP: regs.RIP}, nil
}

// DivergenceError says the replay left the recorded execution.
type DivergenceError struct {
	At     machine.Position // where the replay is
	Want   string           // what the log has next
	Detail string
}

func (e *DivergenceError) Error() string {
	return fmt.Sprintf("replay diverged at %v: %s (the log has %s next)", e.At, e.Detail, e.Want)
}

// IsDivergence reports whether err says a replay left the recorded
// execution: an entry that does not match (DivergenceError) or a sync
// point whose state differs (machine.SyncMismatchError).
func IsDivergence(err error) bool {
	var de *DivergenceError
	var se *machine.SyncMismatchError
	return errors.As(err, &de) || errors.As(err, &se)
}

// Replayer is a machine.Journal that feeds a machine what a Recorder
// logged, at the same positions, and reports the first divergence.
type Replayer struct {
	dec  *ftlog.Decoder
	next *ftlog.Entry // peeked
	err  error
	// follow: wait at the end of the log for more instead of failing.
	follow bool
	poll   time.Duration
	stop   <-chan struct{}
	wake   <-chan struct{}
	// stopSeen: stop closed; the reader had one more look for log.
	stopSeen bool
	// waiting, if set, is called each time the replay waits for more log
	// (it has applied everything that came).
	waiting func()
	// covered: the recorder wrote every entry at or before this exit
	// (its latest Progress entry).
	covered uint64
	// Entries counts the log entries consumed.
	Entries int64
}

// NewReplayer reads a log from r.
func NewReplayer(r io.Reader) (*Replayer, error) {
	dec := ftlog.NewDecoder(r)
	if _, err := dec.Header(); err != nil {
		return nil, err
	}
	return &Replayer{dec: dec}, nil
}

// NewFollowingReplayer reads a log that is still being written (a file the
// recorder appends to): at the end of what is there it waits, polling r
// every poll, instead of failing, so the replay never runs past what the
// log covers and goes on as the recording does. Closing stop ends the wait
// with an error.
func NewFollowingReplayer(r io.Reader, poll time.Duration, stop <-chan struct{}) (*Replayer, error) {
	rep := &Replayer{dec: ftlog.NewDecoder(r), follow: true, poll: poll, stop: stop}
	for {
		_, err := rep.dec.Header()
		if err == nil {
			return rep, nil
		}
		if err := rep.wait(err); err != nil {
			return nil, err
		}
	}
}

// ErrStopped is a following replayer's error once its stop channel closed
// while it waited at the end of the log.
var ErrStopped = errors.New("stopped waiting for more log")

// WakeOn makes a following replayer look for more log as soon as ch
// receives (a channel that says log arrived), not only every poll.
func (r *Replayer) WakeOn(ch <-chan struct{}) { r.wake = ch }

// WhileWaiting makes a following replayer call f each time it waits for
// more log, having used all that came (an FT backup tells its primary so:
// a replica that waits for log is not behind).
func (r *Replayer) WhileWaiting(f func()) { r.waiting = f }

// Offset is how much of the log the replayer has read and decoded, in
// bytes from its start.
func (r *Replayer) Offset() int64 { return r.dec.Offset() }

// wait decides, after err from the decoder, whether to wait for more log.
func (r *Replayer) wait(err error) error {
	if !r.follow || !errors.Is(err, ftlog.ErrTruncated) {
		return err
	}
	select {
	case <-r.stop:
		// Log that came before stop closed is read first: one more look.
		if r.stopSeen {
			return fmt.Errorf("%w (%v)", ErrStopped, err)
		}
		r.stopSeen = true
		return nil
	default:
	}
	if r.waiting != nil {
		r.waiting()
	}
	t := time.NewTimer(r.poll)
	defer t.Stop()
	select {
	case <-r.stop:
		return nil // the first case above answers next time
	case <-r.wake:
		return nil
	case <-t.C:
		return nil
	}
}

// peek returns the next entry that matters to delivery (progress markers
// are noted and skipped), waiting for it when following a growing log.
func (r *Replayer) peek() (*ftlog.Entry, error) { return r.peekAt(^uint64(0)) }

// peekAt is peek for a replay at exit n: when following a growing log
// whose progress markers say nothing more is due at or before n, it
// returns nil at once instead of waiting for the next entry. The replay
// thus runs as far as the log covers, and blocks at the first exit
// beyond.
func (r *Replayer) peekAt(n uint64) (*ftlog.Entry, error) {
	for r.next == nil {
		e, err := r.dec.Next()
		if err != nil {
			if r.follow && n <= r.covered && errors.Is(err, ftlog.ErrTruncated) {
				return nil, nil
			}
			if werr := r.wait(err); werr != nil {
				return nil, fmt.Errorf("replay log: %w", werr)
			}
			continue
		}
		if e.Kind == ftlog.Progress {
			r.covered = max(r.covered, e.Pos.Exits)
			continue
		}
		r.next = &e
	}
	return r.next, nil
}

func (r *Replayer) take() ftlog.Entry {
	e := *r.next
	r.next = nil
	r.Entries++
	return e
}

func describe(e *ftlog.Entry) string { return fmt.Sprintf("%v at %v", e.Kind, e.Pos) }

// at checks that the next entry is of kind k at position p.
func (r *Replayer) at(p machine.Position, k ftlog.Kind, what string) (*ftlog.Entry, error) {
	e, err := r.peek()
	if err != nil {
		return nil, err
	}
	if e.Kind != k || e.Pos.Exits != p.Exits || e.Pos.RIP != p.RIP {
		return nil, &DivergenceError{At: p, Want: describe(e), Detail: what}
	}
	return e, nil
}

func isInput(k ftlog.Kind) bool {
	return k == ftlog.ClockRead || k == ftlog.SerialInput || k == ftlog.Packet
}

// Deliver returns the inputs logged at p: one delivery (a clock reading,
// then any console bytes and frames), or none.
func (r *Replayer) Deliver(p machine.Position, halted bool, live func() []machine.Input) ([]machine.Input, error) {
	e, err := r.peekAt(p.Exits)
	if err != nil {
		return nil, err
	}
	switch {
	case e == nil || e.Pos.Exits > p.Exits:
		return nil, nil
	case e.Pos.Exits < p.Exits:
		return nil, &DivergenceError{At: p, Want: describe(e), Detail: "the replay passed the log's next entry"}
	case e.Kind == ftlog.Digest || e.Kind == ftlog.End:
		return nil, machine.ErrLogEnd
	case !isInput(e.Kind):
		return nil, nil // an injection at p comes after the delivery
	case e.Kind != ftlog.ClockRead:
		return nil, &DivergenceError{At: p, Want: describe(e), Detail: "expected a delivery, which starts with a clock reading"}
	}
	var in []machine.Input
	for e != nil && e.Pos.Exits == p.Exits && isInput(e.Kind) && !(len(in) > 0 && e.Kind == ftlog.ClockRead) {
		if e.Pos.RIP != p.RIP {
			return nil, &DivergenceError{At: p, Want: describe(e), Detail: fmt.Sprintf("the replay is at rip %#x", p.RIP)}
		}
		x := r.take()
		switch x.Kind {
		case ftlog.ClockRead:
			in = append(in, machine.Input{Kind: machine.InputTime, Time: time.Duration(x.Value)})
		case ftlog.SerialInput:
			in = append(in, machine.Input{Kind: machine.InputSerial, Data: x.Data})
		default:
			in = append(in, machine.Input{Kind: machine.InputDevice, Port: int(x.Device), Data: x.Data})
		}
		if e, err = r.peekAt(p.Exits); err != nil {
			return nil, err
		}
	}
	// A recording that ended right after this delivery point.
	if e != nil && (e.Kind == ftlog.Digest || e.Kind == ftlog.End) && e.Pos.Exits == p.Exits {
		return in, machine.ErrLogEnd
	}
	return in, nil
}

// DeviceInput returns what the recording's device read at p (its RIP is
// not known inside an exit: the exit count places it).
func (r *Replayer) DeviceInput(p machine.Position, name string, live func() ([]byte, error)) ([]byte, error) {
	e, err := r.peekAt(p.Exits)
	if err != nil {
		return nil, err
	}
	if e == nil || e.Kind != ftlog.Opaque || e.Pos.Exits != p.Exits || (e.Name != name && e.Name != name+deviceInputFailed) {
		want := "nothing"
		if e != nil {
			want = describe(e)
		}
		return nil, &DivergenceError{At: p, Want: want, Detail: "the replay's device read " + name}
	}
	x := r.take()
	if x.Name != name {
		return nil, &machine.DeviceReadError{Msg: string(x.Data)}
	}
	return x.Data, nil
}

// Injected checks an injection against the log.
func (r *Replayer) Injected(p machine.Position, vector uint8) error {
	e, err := r.at(p, ftlog.Interrupt, fmt.Sprintf("the replay injected vector %#x", vector))
	if err != nil {
		return err
	}
	if e.Vector != vector {
		return &DivergenceError{At: p, Want: fmt.Sprintf("vector %#x", e.Vector), Detail: fmt.Sprintf("the replay injected vector %#x", vector)}
	}
	r.take()
	return nil
}

// Sync is an error for a replayer: sync points come from the log.
func (r *Replayer) Sync(*machine.SyncPoint) error {
	return errors.New("replay: the machine made a sync point")
}

// NextSync returns the sync point logged next if it is of the kind asked
// for (async: a state delta or a branch point; else a digest check) and
// after exit n, and consumes it.
func (r *Replayer) NextSync(n uint64, async bool) (*machine.SyncPoint, error) {
	e, err := r.peekAt(n)
	if err != nil || e == nil || e.Kind != ftlog.StateDelta || e.Pos.Exits != n {
		return nil, err
	}
	sp := &machine.SyncPoint{}
	if err := sp.UnmarshalBinary(e.Data); err != nil {
		return nil, fmt.Errorf("replay log: %s: %w", describe(e), err)
	}
	if (sp.Delta || sp.Branch) != async {
		return nil, nil
	}
	r.take()
	sp.Pos = machine.Position{Exits: e.Pos.Exits, RIP: e.Pos.RIP}
	return sp, nil
}

// Live is false: a replayer's inputs come from the log, without waiting
// (beyond waiting for a growing log to cover the position).
func (r *Replayer) Live() bool { return false }

// WindowRequested checks an interrupt-window request against the log.
func (r *Replayer) WindowRequested(p machine.Position) error {
	if _, err := r.at(p, ftlog.WindowRequest, "the replay requested an interrupt window"); err != nil {
		return err
	}
	r.take()
	return nil
}

// Verify checks, once the machine stopped, that the log ends here and that
// the machine's state digest is the recorded one.
func (r *Replayer) Verify(m *machine.Machine) error {
	p, err := finalPosition(m)
	if err != nil {
		return err
	}
	e, err := r.peek()
	if err != nil {
		return err
	}
	if e.Kind != ftlog.Digest || e.Pos.Exits != p.Exits {
		return &DivergenceError{At: p, Want: describe(e), Detail: "the replay stopped here"}
	}
	d, err := m.Digest()
	if err != nil {
		return err
	}
	if d != e.Digest {
		err := &DivergenceError{At: p, Want: fmt.Sprintf("state digest %x", e.Digest[:8]), Detail: fmt.Sprintf("the replay's state digest is %x", d[:8])}
		r.take()
		if s, serr := r.peek(); serr == nil && s.Kind == ftlog.Opaque && s.Name == summaryName {
			var want machine.StateSummary
			if uerr := want.UnmarshalBinary(s.Data); uerr != nil {
				err.Detail += fmt.Sprintf(" (the log's state summary is bad: %v)", uerr)
			} else if got, gerr := m.Summary(); gerr == nil {
				err.Detail += ": " + got.Diff(&want)
			}
		}
		return err
	}
	r.take()
	if e, err := r.peek(); err == nil && e.Kind == ftlog.Opaque && e.Name == summaryName {
		r.take()
	}
	if e, err := r.peek(); err != nil || e.Kind != ftlog.End {
		return fmt.Errorf("replay log: no End after the final digest (%v)", err)
	}
	r.take()
	return nil
}

// summaryName names the Opaque entry after the final digest that holds
// the recording's machine.StateSummary.
const summaryName = "state-summary"

// configName names the Opaque entry that carries the recorded machine's
// configuration, first in the log.
const configName = "vm-config"

// WriteConfig records the machine's configuration (JSON), before any other
// entry: what a replayer needs to build the same machine.
func (r *Recorder) WriteConfig(config []byte) error {
	return r.enc.Opaque(ftlog.Position{}, 0, configName, config)
}

// Config returns the configuration the recorder wrote first in the log.
func (r *Replayer) Config() ([]byte, error) {
	e, err := r.peek()
	if err != nil {
		return nil, err
	}
	if e.Kind != ftlog.Opaque || e.Name != configName {
		return nil, fmt.Errorf("replay log: it does not start with the machine configuration (%s)", describe(e))
	}
	r.take()
	return e.Data, nil
}
