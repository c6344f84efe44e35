package ft

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/gokvm-ft/gokvm-ft/ft/arbiter"
	"github.com/gokvm-ft/gokvm-ft/ft/channel"
	"github.com/gokvm-ft/gokvm-ft/machine"
	"github.com/gokvm-ft/gokvm-ft/migrate"
)

// Switch is the journal of a machine in an FT pair. A machine keeps the
// journal it was built with, but its role changes: a primary runs
// unprotected (live, nothing logged), then records for a backup; a backup
// replays, then goes live. Switch forwards to the journal of the moment.
type Switch struct {
	mu  sync.Mutex
	cur machine.Journal
}

// NewSwitch starts a switch on j (Unlogged if nil).
func NewSwitch(j machine.Journal) *Switch {
	if j == nil {
		j = Unlogged{}
	}
	return &Switch{cur: j}
}

// Set makes j the journal from the next call on.
func (s *Switch) Set(j machine.Journal) {
	s.mu.Lock()
	s.cur = j
	s.mu.Unlock()
}

func (s *Switch) get() machine.Journal {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cur
}

// Deliver forwards to the current journal.
func (s *Switch) Deliver(p machine.Position, halted bool, live func() []machine.Input) ([]machine.Input, error) {
	return s.get().Deliver(p, halted, live)
}

// Injected forwards to the current journal.
func (s *Switch) Injected(p machine.Position, vector uint8) error {
	return s.get().Injected(p, vector)
}

// WindowRequested forwards to the current journal.
func (s *Switch) WindowRequested(p machine.Position) error { return s.get().WindowRequested(p) }

// Live forwards to the current journal.
func (s *Switch) Live() bool { return s.get().Live() }

// Sync forwards to the current journal.
func (s *Switch) Sync(sp *machine.SyncPoint) error { return s.get().Sync(sp) }

// NextSync forwards to the current journal.
func (s *Switch) NextSync(n uint64, async bool) (*machine.SyncPoint, error) {
	return s.get().NextSync(n, async)
}

// DeviceInput forwards to the current journal, or reads live if it does
// not carry device input.
func (s *Switch) DeviceInput(p machine.Position, name string, live func() ([]byte, error)) ([]byte, error) {
	return machine.JournalDeviceInput(s.get(), p, name, live)
}

// SyncPoints forwards to the current journal (true unless it says no).
func (s *Switch) SyncPoints() bool { return machine.WantsSyncPoints(s.get()) }

// Unlogged is the journal of a VM that runs alone: the live world comes
// in at deterministic exits and nothing is written down.
type Unlogged struct{}

// Deliver returns what the world has now.
func (Unlogged) Deliver(p machine.Position, halted bool, live func() []machine.Input) ([]machine.Input, error) {
	return live(), nil
}

// Injected does nothing.
func (Unlogged) Injected(machine.Position, uint8) error { return nil }

// WindowRequested does nothing.
func (Unlogged) WindowRequested(machine.Position) error { return nil }

// Live is true.
func (Unlogged) Live() bool { return true }

// Sync drops the sync point.
func (Unlogged) Sync(*machine.SyncPoint) error { return nil }

// NextSync is nil.
func (Unlogged) NextSync(uint64, bool) (*machine.SyncPoint, error) { return nil, nil }

// SyncPoints is false: nobody would check them (machine.SyncPointer).
func (Unlogged) SyncPoints() bool { return false }

// DeviceInput reads live.
func (Unlogged) DeviceInput(p machine.Position, name string, live func() ([]byte, error)) ([]byte, error) {
	return live()
}

// Role is what a node of the pair is now.
type Role int

// Roles.
const (
	RoleAlone   Role = iota // live and unprotected: no backup
	RolePrimary             // live, recording for a backup
	RoleBackup              // replaying a primary's log
	RoleStopped             // lost the arbiter, diverged, or the guest stopped
)

func (r Role) String() string {
	return [...]string{"alone", "primary", "backup", "stopped"}[r]
}

// Node is one VMM of the pair: a machine built with a Switch for journal,
// the arbiter both VMMs share, and the role of the moment.
type Node struct {
	M       *machine.Machine
	Journal *Switch
	Arbiter arbiter.Arbiter
	// Name identifies this VMM at the arbiter and in logs.
	Name   string
	Logger *slog.Logger
	// FlushEvery: a primary sends its log at least this often (default
	// 2 ms); output forces it out at once.
	FlushEvery time.Duration
	// ClaimTimeout bounds a claim at the arbiter (default 10 s): a VMM
	// that cannot decide does not go on (fail closed).
	ClaimTimeout time.Duration
	// OnLive is called once this node's guest is live after a failover
	// (a backup that took over, on the vCPU thread): where the guest's
	// addresses are announced.
	OnLive func()
	// Observe, if set, sees every output the guest produces, whatever
	// becomes of it (on the vCPU thread; it must not keep o.Data): where
	// the guest's addresses are learnt for OnLive.
	Observe func(o machine.Output)

	mu      sync.Mutex
	role    Role
	epoch   uint64
	session *session
	stopped error // why the node stopped (RoleStopped)
	cancel  context.CancelFunc
	// backup side: the replayer ended at the primary's End (the guest
	// stopped there), so a lost channel after it is no failure.
	followEnd bool
}

// NewNode makes m (built with cfg.Journal = sw) a node of a pair, alone
// until it protects or follows.
func NewNode(m *machine.Machine, sw *Switch, arb arbiter.Arbiter, name string, log *slog.Logger) *Node {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	n := &Node{M: m, Journal: sw, Arbiter: arb, Name: name, Logger: log}
	m.SetOutputGate(n.gate)
	return n
}

// Status is a snapshot of a node's state.
type Status struct {
	Role      Role
	Epoch     uint64
	Peer      string
	Protected bool
	Lag       time.Duration
	Held      int // outputs waiting for the backup's acknowledgement
	LogBytes  int64
	Acked     int64
}

// Status reports the node's role, peer and lag.
func (n *Node) Status() Status {
	n.mu.Lock()
	defer n.mu.Unlock()
	st := Status{Role: n.role, Epoch: n.epoch}
	if s := n.session; s != nil {
		st.Peer = s.conn.RemoteAddr().String()
		st.Protected = n.role == RolePrimary
		st.Held = len(s.held)
		if n.role == RolePrimary {
			st.Lag, st.LogBytes, st.Acked = s.conn.Lag(), s.conn.Sent(), s.conn.Acked()
		} else {
			st.LogBytes = s.conn.Received()
		}
	}
	return st
}

// session is one protection: a channel to the peer and what rides on it.
type session struct {
	conn *channel.Conn
	rec  *Recorder // primary
	rep  *Replayer // backup
	// held outputs, oldest first, each with the log offset the backup
	// must acknowledge before it leaves.
	held []heldOutput
	// decided closes once a lost peer's fate is settled (primary): won
	// says whether this node goes on alone.
	decided chan struct{}
	won     bool
	// goLive closes (endFollow) when a backup's replay is to end where
	// the log does: it won the arbiter and goes live, or it stops.
	goLive     chan struct{}
	goLiveOnce sync.Once
	// tookOver closes when a primary's backup says it took over (a
	// switchover).
	tookOver     chan struct{}
	tookOverOnce sync.Once
	// recent is a backup's guest's output that the primary may not have
	// released yet (the backup drops its own output while the primary
	// lives): at go-live it leaves, since the primary may have died
	// holding it. releasedExit: the primary released every output up to
	// this exit (a primary: the latest it told the backup of).
	recent       []machine.Output
	releasedExit uint64
}

// maxRecent bounds the output a backup keeps for a failover.
const maxRecent = 1 << 16

// keepRecent keeps a backup's output for a failover unless the primary
// said it released output that far; once the backup has won the arbiter
// (alone, still replaying the log's tail) such output leaves at once.
func (n *Node) keepRecent(s *session, o machine.Output) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.session != s || (n.role != RoleBackup && n.role != RoleAlone) {
		o.Drop()
		return
	}
	s.trimRecent()
	if o.Exit <= s.releasedExit {
		o.Drop()
		return
	}
	if n.role == RoleAlone {
		o.Send() // live, draining the log's tail
		return
	}
	if len(s.recent) == maxRecent {
		s.recent[0].Drop()
		s.recent = s.recent[1:]
	}
	s.recent = append(s.recent, o)
}

// endFollow ends a backup's following: its replay stops waiting for log
// and ends where the log does (once; later calls do nothing).
func (s *session) endFollow() { s.goLiveOnce.Do(func() { close(s.goLive) }) }

// trimRecent drops the output the primary released; n.mu held.
func (s *session) trimRecent() {
	i := 0
	for i < len(s.recent) && s.recent[i].Exit <= s.releasedExit {
		s.recent[i].Drop()
		i++
	}
	s.recent = s.recent[i:]
}

// Control messages between the nodes of a pair.
const (
	// ctlReleased (primary to backup), then the exit count: every output
	// the guest produced up to that exit has left.
	ctlReleased = 'R'
	// ctlSwitchover (primary to backup): the primary stopped its guest
	// and sent all of its log; the backup is to take over.
	ctlSwitchover = 'S'
	// ctlTookOver (backup to primary): the backup won the arbiter for
	// a switchover and goes live.
	ctlTookOver = 'T'
)

func releasedMsg(exit uint64) []byte {
	return binary.BigEndian.AppendUint64([]byte{ctlReleased}, exit)
}

// readControl serves the control messages of a session.
func (n *Node) readControl(s *session) {
	for {
		select {
		case <-s.conn.Dead():
			return
		case m := <-s.conn.Control():
			switch {
			case len(m) == 9 && m[0] == ctlReleased:
				n.mu.Lock()
				s.releasedExit = max(s.releasedExit, binary.BigEndian.Uint64(m[1:]))
				n.mu.Unlock()
			case len(m) == 1 && m[0] == ctlSwitchover && s.rep != nil:
				n.Logger.Info("switchover: the primary hands over")
				go n.takeOver(s)
			case len(m) == 1 && m[0] == ctlTookOver && s.rec != nil:
				s.tookOverOnce.Do(func() { close(s.tookOver) })
			}
		}
	}
}

type heldOutput struct {
	o   machine.Output
	off int64
}

// Claim takes the arbiter for epoch (the node's current one plus one by
// default: 0). A primary claims before it runs alone; every later step
// to live claims again.
func (n *Node) Claim(ctx context.Context, epoch uint64) (arbiter.Result, error) {
	if epoch == 0 {
		h, err := n.Arbiter.Current(ctx)
		if err != nil {
			return arbiter.Result{}, err
		}
		epoch = max(h.Epoch, n.epoch) + 1
	}
	res, err := n.Arbiter.Claim(ctx, epoch, n.Name)
	if err != nil {
		return res, err
	}
	if res.Won {
		n.mu.Lock()
		n.epoch = epoch
		n.mu.Unlock()
		n.Logger.Info("arbiter won", "epoch", epoch, "arbiter", n.Arbiter)
	} else {
		n.Logger.Warn("arbiter lost", "epoch", epoch, "holder", res.Holder)
	}
	return res, nil
}

// Epoch is the epoch this node last won (or learnt from its primary).
func (n *Node) Epoch() uint64 {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.epoch
}

// Role is the node's role now.
func (n *Node) Role() Role {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.role
}

// Protect makes an alone node the primary of conn's backup: from here on
// the log goes to the backup and output waits for its acknowledgement.
// Call it with the machine stopped (before Run, or in a Runner pause) at
// the point whose state the backup holds.
func (n *Node) Protect(conn *channel.Conn) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.role != RoleAlone {
		return fmt.Errorf("ft: a %v cannot take a backup", n.role)
	}
	s := &session{conn: conn, decided: make(chan struct{})}
	rec, err := NewRecorder(&pairSink{s: s, w: conn.LogWriter()}, nil)
	if err != nil {
		return err
	}
	rec.FlushEvery = n.flushEvery()
	if err := rec.Flush(); err != nil { // the header: the backup waits for it
		return err
	}
	s.rec = rec
	n.session, n.role = s, RolePrimary
	n.Journal.Set(rec)
	s.tookOver = make(chan struct{})
	go n.release(s)
	go n.watchBackup(s)
	go n.readControl(s)
	n.Logger.Info("protected", "backup", conn.RemoteAddr(), "epoch", n.epoch)
	return nil
}

func (n *Node) flushEvery() time.Duration {
	if n.FlushEvery > 0 {
		return n.FlushEvery
	}
	return 2 * time.Millisecond
}

// Follow makes the node the backup of conn's primary, whose epoch is
// epoch: the machine replays the primary's log as it arrives, from the
// state the primary had when it protected (the caller put it there). Call
// it with the machine stopped, then Run.
func (n *Node) Follow(conn *channel.Conn, epoch uint64) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.role != RoleAlone || n.session != nil {
		return fmt.Errorf("ft: a %v cannot follow a primary", n.role)
	}
	s := &session{conn: conn, goLive: make(chan struct{})}
	rep, err := NewFollowingReplayer(conn.LogReader(), 5*time.Millisecond, s.goLive)
	if err != nil {
		return err
	}
	rep.WakeOn(conn.LogReader().Arrived())
	rep.WhileWaiting(func() { conn.SetApplied(conn.Received()) })
	s.rep = rep
	n.session, n.role, n.epoch = s, RoleBackup, epoch
	n.Journal.Set(&follower{n: n, s: s, rep: rep})
	go n.watchPrimary(s)
	go n.readControl(s)
	n.Logger.Info("following", "primary", conn.RemoteAddr(), "epoch", epoch)
	return nil
}

// gate is the machine's output gate: a primary holds output until the
// backup has the log that produced it; a backup drops its guest's output
// (the primary's went out); a node alone sends at once.
func (n *Node) gate(o machine.Output) {
	if n.Observe != nil {
		n.Observe(o)
	}
	n.mu.Lock()
	role, s := n.role, n.session
	n.mu.Unlock()
	switch role {
	case RoleAlone:
		if s != nil && s.rep != nil {
			// A backup gone live, still replaying the log's tail: the
			// primary sent what it said it released.
			n.keepRecent(s, o)
			return
		}
		o.Send()
		return
	case RoleBackup:
		n.keepRecent(s, o)
		return
	case RoleStopped:
		o.Drop()
		return
	}
	// The log up to this exit produced the output: send it out now, and
	// let the output go once the backup acknowledges that much.
	if err := s.rec.Flush(); err != nil {
		o.Drop() // the node stops: the error comes back at the next log write
		return
	}
	off := s.conn.Sent()
	n.mu.Lock()
	if n.session == s && n.role == RolePrimary && (len(s.held) > 0 || s.conn.Acked() < off) {
		s.held = append(s.held, heldOutput{o, off})
		n.mu.Unlock()
		return
	}
	role = n.role
	if role == RolePrimary || role == RoleAlone {
		o.Send() // under the lock: in order with the release goroutine's
		if n.session == s {
			s.releasedExit = max(s.releasedExit, o.Exit)
		}
	} else {
		o.Drop()
	}
	n.mu.Unlock()
}

// release lets held outputs go as acknowledgements come, in order, and
// tells the backup how far output has left.
func (n *Node) release(s *session) {
	var told uint64
	for {
		changed := s.conn.Changed()
		acked := s.conn.Acked()
		n.mu.Lock()
		i := 0
		for i < len(s.held) && s.held[i].off <= acked {
			i++
		}
		out := s.held[:i:i]
		s.held = s.held[i:]
		for _, h := range out {
			h.o.Send()
			s.releasedExit = max(s.releasedExit, h.o.Exit)
		}
		released := s.releasedExit
		n.mu.Unlock()
		if released > told {
			if s.conn.SendControl(releasedMsg(released)) == nil {
				told = released
			}
		}
		select {
		case <-changed:
		case <-s.conn.Dead():
			return // watchBackup settles the rest
		}
	}
}

// pairSink is a primary's log stream: the channel, and once the channel is
// dead, whatever the arbiter decides (discard when this node goes on alone;
// an error when it must stop).
type pairSink struct {
	s *session
	w *channel.LogWriter
}

func (p *pairSink) Write(b []byte) (int, error) {
	k, err := p.w.Write(b)
	if err == nil {
		return k, nil
	}
	<-p.s.decided
	if p.s.won {
		return len(b), nil
	}
	return k, fmt.Errorf("the backup is gone and this node lost the arbiter: %w", err)
}

// watchBackup waits for a primary's channel to die, then decides at the
// arbiter whether this node goes on alone.
func (n *Node) watchBackup(s *session) {
	<-s.conn.Dead()
	err := s.conn.Err()
	n.mu.Lock()
	stopping := n.role != RolePrimary || n.session != s
	n.mu.Unlock()
	if stopping {
		close(s.decided)
		return
	}
	n.Logger.Warn("backup lost", "backup", s.conn.RemoteAddr(), "err", err)
	won := n.claimNext()
	n.mu.Lock()
	s.won = won
	held := s.held
	s.held = nil
	if won {
		n.role, n.session = RoleAlone, nil
	} else {
		n.role, n.stopped = RoleStopped, errors.New("the backup went live (it won the arbiter): this VMM stops")
	}
	n.mu.Unlock()
	if won {
		// The backup can never go live now: what it did not
		// acknowledge may leave.
		n.Journal.Set(Unlogged{})
		for _, h := range held {
			h.o.Send()
		}
		n.Logger.Info("running alone, unprotected", "epoch", n.Epoch(), "released", len(held))
	} else {
		for _, h := range held {
			h.o.Drop()
		}
		n.stop()
	}
	close(s.decided)
}

// claimNext claims the epoch after this node's, retrying arbiter errors
// until ClaimTimeout; false when it lost or could not decide.
func (n *Node) claimNext() bool {
	timeout := n.ClaimTimeout
	if timeout <= 0 {
		timeout = 10 * time.Second
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	epoch := n.Epoch() + 1
	for {
		res, err := n.Claim(ctx, epoch)
		if err == nil {
			return res.Won
		}
		n.Logger.Error("arbiter unreachable", "err", err)
		select {
		case <-ctx.Done():
			return false
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// watchPrimary waits for a backup's channel to die, then decides at the
// arbiter whether this node goes live.
func (n *Node) watchPrimary(s *session) {
	<-s.conn.Dead()
	err := s.conn.Err()
	n.mu.Lock()
	ended := n.followEnd || n.role != RoleBackup || n.session != s
	switched := n.role == RoleAlone && n.session == s
	n.mu.Unlock()
	if switched {
		return // a switchover made this node live already
	}
	var bye *channel.ByeError
	if ended || errors.As(err, &bye) {
		// The primary said goodbye: its guest stopped (the log ends with
		// it), or it is shutting down; no failover.
		n.Logger.Info("primary closed the channel", "err", err)
		n.mu.Lock()
		n.stopped = err
		n.mu.Unlock()
		s.endFollow() // the replay runs to the log's end and stops there
		return
	}
	n.Logger.Warn("primary lost", "primary", s.conn.RemoteAddr(), "err", err)
	n.takeOver(s)
}

// takeOver claims the arbiter for a backup whose primary is gone (or
// handing over); if it wins, the replay goes live where the log ends.
func (n *Node) takeOver(s *session) {
	n.mu.Lock()
	if n.role != RoleBackup || n.session != s {
		n.mu.Unlock()
		return
	}
	n.mu.Unlock()
	won := n.claimNext()
	n.mu.Lock()
	if won {
		// The follower switches to live when the log runs out. Output
		// the primary may have held goes out again (a duplicate is
		// harmless to the guest's peers, a loss costs them a
		// retransmission); under the lock, so that newer output
		// cannot overtake it.
		n.role = RoleAlone
		s.trimRecent()
		for _, o := range s.recent {
			o.Send()
		}
		n.Logger.Info("sending the output the primary may have held", "outputs", len(s.recent))
	} else {
		n.role, n.stopped = RoleStopped, errors.New("the primary goes on (it won the arbiter): this backup stops")
		for _, o := range s.recent {
			o.Drop()
		}
	}
	s.recent = nil
	n.mu.Unlock()
	if won {
		s.conn.SendControl([]byte{ctlTookOver}) // a switchover's primary waits for it
	}
	s.endFollow()
}

// Switchover hands the primary role to the backup without loss: the guest
// stops here at a deterministic exit, the rest of the log goes out, and the
// backup takes over (it claims the arbiter; this node does not contend
// unless the backup fails to answer within timeout, when it claims for
// itself and goes on alone if it wins). On success this node's run ends
// with StopMoved.
func (n *Node) Switchover(r *machine.Runner, timeout time.Duration) error {
	n.mu.Lock()
	s, role := n.session, n.role
	n.mu.Unlock()
	if role != RolePrimary {
		return fmt.Errorf("ft: switchover: this VMM is %v, not a protected primary", role)
	}
	return r.Pause(func() (bool, error) {
		if err := s.rec.Flush(); err != nil {
			return false, err
		}
		if err := s.conn.SendControl([]byte{ctlSwitchover}); err != nil {
			return false, fmt.Errorf("switchover: %w", err)
		}
		n.Logger.Info("switchover: the log is out, waiting for the backup to take over")
		t := time.NewTimer(timeout)
		defer t.Stop()
		select {
		case <-s.tookOver:
			n.mu.Lock()
			n.role, n.session = RoleStopped, nil
			for _, h := range s.held {
				h.o.Drop() // the backup sends what it may be
			}
			s.held = nil
			n.mu.Unlock()
			s.conn.Close("switched over: the backup is the primary now")
			n.Logger.Info("switchover: done, the backup is live")
			return true, nil
		case <-s.conn.Dead():
		case <-t.C:
			s.conn.Abort() // no answer: decide at the arbiter
		}
		<-s.decided
		if !s.won {
			return true, errors.New("switchover: the backup took over but did not say so")
		}
		return false, errors.New("switchover: the backup did not take over; this VMM goes on alone")
	})
}

// Crash stops the node at once, as if its host died: no word to the peer,
// no claim at the arbiter, no more output. (Tests and demonstrations.)
func (n *Node) Crash() {
	n.mu.Lock()
	n.role, n.stopped = RoleStopped, errors.New("crashed")
	s := n.session
	n.mu.Unlock()
	if s != nil {
		s.conn.Abort()
	}
	n.stop()
}

// stop ends the node's run.
func (n *Node) stop() {
	n.mu.Lock()
	cancel := n.cancel
	n.mu.Unlock()
	if cancel != nil {
		cancel()
	}
}

// follower is a backup's journal: the replayer, until the log runs out
// after a failover, then live.
type follower struct {
	n    *Node
	s    *session
	rep  *Replayer
	live machine.Journal
}

// check turns the replayer's ErrStopped into the switch to live (or the
// node's stop). It returns the journal to use instead, or the error.
func (f *follower) check(err error) (machine.Journal, error) {
	if f.live != nil {
		return f.live, nil
	}
	if !errors.Is(err, ErrStopped) {
		if err != nil {
			f.diverged(err)
		}
		return nil, err
	}
	f.n.mu.Lock()
	role, why := f.n.role, f.n.stopped
	f.n.mu.Unlock()
	if role != RoleAlone {
		if why == nil {
			why = errors.New("stopped")
		}
		return nil, fmt.Errorf("the primary's log ended here: %w", why)
	}
	// Every entry the primary sent is applied: this is where its
	// history, as far as the world can have seen it, ends.
	f.n.M.ContinueLive()
	f.live = Unlogged{}
	f.n.Journal.Set(f.live)
	f.n.mu.Lock()
	f.n.session = nil
	f.n.mu.Unlock()
	f.n.Logger.Info("live: the backup took over", "epoch", f.n.Epoch(), "log entries", f.rep.Entries)
	if f.n.OnLive != nil {
		f.n.OnLive()
	}
	return f.live, nil
}

// diverged: the replay left the primary's execution. Such a backup must
// never go live; it tells the primary and stops.
func (f *follower) diverged(err error) {
	if !IsDivergence(err) {
		return
	}
	f.n.mu.Lock()
	f.n.role, f.n.stopped = RoleStopped, err
	f.n.mu.Unlock()
	f.s.conn.Close("the backup diverged: " + err.Error())
}

func (f *follower) progress() { f.s.conn.SetApplied(f.rep.Offset()) }

func (f *follower) Deliver(p machine.Position, halted bool, live func() []machine.Input) ([]machine.Input, error) {
	if f.live == nil {
		in, err := f.rep.Deliver(p, halted, live)
		f.progress()
		if errors.Is(err, machine.ErrLogEnd) {
			f.n.mu.Lock()
			f.n.followEnd = true
			f.n.mu.Unlock()
		}
		if err == nil || errors.Is(err, machine.ErrLogEnd) {
			return in, err
		}
		j, err := f.check(err)
		if err != nil {
			return nil, err
		}
		return j.Deliver(p, halted, live)
	}
	return f.live.Deliver(p, halted, live)
}

func (f *follower) Injected(p machine.Position, vector uint8) error {
	if f.live == nil {
		err := f.rep.Injected(p, vector)
		if err == nil {
			return nil
		}
		j, err := f.check(err)
		if err != nil {
			return err
		}
		return j.Injected(p, vector)
	}
	return f.live.Injected(p, vector)
}

func (f *follower) WindowRequested(p machine.Position) error {
	if f.live == nil {
		err := f.rep.WindowRequested(p)
		if err == nil {
			return nil
		}
		j, err := f.check(err)
		if err != nil {
			return err
		}
		return j.WindowRequested(p)
	}
	return f.live.WindowRequested(p)
}

func (f *follower) DeviceInput(p machine.Position, name string, live func() ([]byte, error)) ([]byte, error) {
	if f.live != nil {
		return live()
	}
	data, err := f.rep.DeviceInput(p, name, live)
	var dre *machine.DeviceReadError
	if err == nil || errors.As(err, &dre) {
		return data, err
	}
	if _, err := f.check(err); err != nil {
		return nil, err
	}
	return live() // live from here
}

func (f *follower) Live() bool { return f.live != nil }

// SyncPoints: a replay checks the log's; once live, nobody checks.
func (f *follower) SyncPoints() bool { return f.live == nil }

func (f *follower) Sync(sp *machine.SyncPoint) error {
	if f.live == nil {
		return f.rep.Sync(sp)
	}
	return f.live.Sync(sp)
}

func (f *follower) NextSync(n uint64, async bool) (*machine.SyncPoint, error) {
	if f.live == nil {
		sp, err := f.rep.NextSync(n, async)
		if err == nil {
			return sp, nil
		}
		if _, err := f.check(err); err != nil {
			return nil, err
		}
		return nil, nil
	}
	return f.live.NextSync(n, async)
}

// Run runs the node's machine until its guest stops, this node stops (lost
// the arbiter, diverged) or ctx ends. A primary whose guest stops ends
// the log (a digest, End) and says goodbye, so the backup stops at the same
// point instead of taking over; a backup checks that it got there.
func (n *Node) Run(ctx context.Context, r *machine.Runner) (machine.Stop, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	n.mu.Lock()
	n.cancel = cancel
	n.mu.Unlock()
	stop, err := r.Run(ctx)
	n.mu.Lock()
	role, s, why := n.role, n.session, n.stopped
	n.mu.Unlock()
	switch {
	case role == RoleStopped && why != nil:
		if s != nil {
			s.conn.Close("stopped: " + why.Error())
		}
		return stop, fmt.Errorf("ft: %w", why)
	case err != nil:
		// A VMM whose run failed (a backup that diverged, a primary
		// whose machine broke) is out: it must not contend for the
		// arbiter when its channel ends, and its peer goes on.
		n.mu.Lock()
		if n.role == RolePrimary || n.role == RoleBackup {
			n.role, n.stopped = RoleStopped, err
		}
		n.mu.Unlock()
		if s != nil {
			s.conn.Close("stopped: " + err.Error())
		}
		return stop, err
	}
	switch role {
	case RolePrimary:
		// The guest stopped (or was stopped): the backup stops here too.
		if ferr := s.rec.Finish(n.M); ferr != nil {
			return stop, ferr
		}
		wctx, wcancel := context.WithTimeout(context.Background(), 5*time.Second)
		werr := s.conn.WaitAcked(wctx, s.conn.Sent())
		wcancel()
		s.conn.Close(fmt.Sprintf("the guest stopped on the primary: %v", stop))
		if werr != nil {
			n.Logger.Warn("the backup did not acknowledge the end of the log", "err", werr)
		}
	case RoleBackup:
		// The guest stopped by itself here as on the primary, or the
		// log ended: either way the primary's final digest follows.
		if stop.Kind != machine.StopCanceled {
			if verr := s.rep.Verify(n.M); verr != nil {
				return stop, fmt.Errorf("ft: the backup's final state: %w", verr)
			}
			n.Logger.Info("the guest stopped on the primary; the backup followed it to the same state")
		}
		s.conn.Close("the backup stopped")
	}
	return stop, nil
}

// AcceptBackup makes the backup at the other end of conn (established,
// not started) a copy of this node's running guest, without stopping it
// for longer than the final copy: memory goes over while the guest runs
// (o.Disks are checked to be the same images on both sides), and in the
// pause that ends the transfer the channel starts and this node protects.
// o.Pause is r.Pause; o.Keep is set here.
func (n *Node) AcceptBackup(conn *channel.Conn, r *machine.Runner, o migrate.SendOptions) (migrate.Result, error) {
	if role := n.Role(); role != RoleAlone {
		return migrate.Result{}, fmt.Errorf("ft: a %v cannot take a backup", role)
	}
	o.Pause = r.Pause
	o.Release = nil
	o.Keep = func() error {
		conn.Start()
		return n.Protect(conn)
	}
	return migrate.Send(conn.Stream(), n.M, o)
}

// Join receives a primary's guest over conn (established, not started) and
// starts the channel: the machine it returns holds the primary's state at
// the moment the primary started recording for it. Make it a Node (its
// journal a Switch built in o.Build) and Follow.
func Join(conn *channel.Conn, o migrate.ReceiveOptions) (*machine.Machine, migrate.Result, error) {
	m, res, err := migrate.Receive(conn.Stream(), o)
	if err != nil {
		return nil, res, err
	}
	conn.Start()
	return m, res, nil
}
