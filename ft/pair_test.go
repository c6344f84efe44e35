package ft_test

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/buffer"

	"github.com/gokvm-ft/gokvm-ft/ft"
	"github.com/gokvm-ft/gokvm-ft/ft/arbiter"
	"github.com/gokvm-ft/gokvm-ft/ft/channel"
	"github.com/gokvm-ft/gokvm-ft/internal/benchutil"
	"github.com/gokvm-ft/gokvm-ft/internal/netproxy"
	"github.com/gokvm-ft/gokvm-ft/internal/tinyguest"
	"github.com/gokvm-ft/gokvm-ft/kvm"
	"github.com/gokvm-ft/gokvm-ft/machine"
	"github.com/gokvm-ft/gokvm-ft/migrate"
)

// seqOutputs is how many numbered outputs seqGuest sends.
const seqOutputs = 1500

// seqGuest counts in user mode with the PIT ticking at 1 kHz; every 2^18
// counts it sends the next sequence number (1, 2, ...) as output through
// port 0x600, and after seqOutputs of them it exits with 1. Its output
// shows what a failover loses or repeats.
var seqGuest = `
_start:
` + tinyguest.PICInit(0xfe) + tinyguest.PIT1kHz + tinyguest.ToUser + `
user:
	incq 0x90000
	mov 0x90000, %rax
	test $0x3ffff, %rax
	jnz user
	incq 0x90030
	mov 0x90030, %rax
	mov $0x600, %dx
	out %eax, %dx
	cmpq $` + fmt.Sprint(seqOutputs) + `, 0x90030
	jb user
	mov $1, %eax
` + tinyguest.ExitWithEAX + tinyguest.CountTicks

var (
	seqOnce sync.Once
	seqProg *tinyguest.Program
	seqErr  error
)

func seqProgram(t *testing.T) *tinyguest.Program {
	seqOnce.Do(func() {
		dir, err := os.MkdirTemp("", "ft-pair")
		if err != nil {
			seqErr = err
			return
		}
		defer os.RemoveAll(dir)
		seqProg, seqErr = tinyguest.Assemble(dir, seqGuest)
	})
	if seqErr != nil {
		t.Fatal(seqErr)
	}
	return seqProg
}

// wire collects the outputs that left a pair's VMMs, as the network would.
type wire struct {
	mu   sync.Mutex
	got  []sent
	emit map[string]map[uint32]time.Time // per VMM: when the guest produced each
}

type sent struct {
	vmm      string
	seq      uint32
	produced time.Time
	left     time.Time
}

func newWire() *wire { return &wire{emit: map[string]map[uint32]time.Time{}} }

// seqDevice is port 0x600: each 4-byte write is one output.
type seqDevice struct {
	w    *wire
	vmm  string
	port *machine.OutputPort
}

func (d *seqDevice) ReadPort(uint16, []byte) {}

func (d *seqDevice) WritePort(_ uint16, data []byte) {
	if len(data) != 4 {
		return
	}
	v := binary.LittleEndian.Uint32(data)
	d.w.mu.Lock()
	if _, ok := d.w.emit[d.vmm][v]; !ok {
		d.w.emit[d.vmm][v] = time.Now()
	}
	d.w.mu.Unlock()
	d.port.Emit(buffer.MakeWithData(append([]byte(nil), data...)))
}

// pairNode builds a VMM of a pair running seqGuest.
func pairNode(t *testing.T, w *wire, name string, arb arbiter.Arbiter) (*ft.Node, *machine.Runner) {
	t.Helper()
	return pairNodeFor(t, w, name, arb, seqProgram(t), nil)
}

// pairNodeFor builds a VMM of a pair running prog, with the position
// source positions makes, if set.
func pairNodeFor(t *testing.T, w *wire, name string, arb arbiter.Arbiter, prog *tinyguest.Program, positions func(*kvm.VCPU) (machine.PositionSource, error)) (*ft.Node, *machine.Runner) {
	t.Helper()
	if _, err := os.Stat("/dev/kvm"); err != nil {
		t.Skip("no /dev/kvm")
	}
	sw := ft.NewSwitch(nil)
	cfg := deltaConfig(sw, true)
	cfg.Positions = positions
	m := newDeltaMachine(t, prog, cfg, true)
	w.mu.Lock()
	w.emit[name] = map[uint32]time.Time{}
	w.mu.Unlock()
	dev := &seqDevice{w: w, vmm: name}
	dev.port = m.NewOutputPort("seq", func(b buffer.Buffer) {
		v := binary.LittleEndian.Uint32(b.Flatten())
		b.Release()
		w.mu.Lock()
		w.got = append(w.got, sent{vmm: name, seq: v, produced: w.emit[name][v], left: time.Now()})
		w.mu.Unlock()
	})
	if err := m.RegisterPort(0x600, 4, dev); err != nil {
		t.Fatal(err)
	}
	// The nodes' logs show in a failing test's report.
	n := ft.NewNode(m, sw, arb, name, slog.New(slog.NewTextHandler(newTestLog(t), nil)).With("node", name))
	n.ClaimTimeout = 2 * time.Second
	return n, &machine.Runner{M: m}
}

// testLog writes to t's output until t ends, and drops what the nodes'
// goroutines log after that (testing panics on a late write).
type testLog struct {
	mu sync.Mutex
	w  io.Writer
}

func newTestLog(t *testing.T) *testLog {
	l := &testLog{w: t.Output()}
	t.Cleanup(func() {
		l.mu.Lock()
		l.w = nil
		l.mu.Unlock()
	})
	return l
}

func (l *testLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.w == nil {
		return len(p), nil
	}
	return l.w.Write(p)
}

type pairRig struct {
	w                *wire
	primary, backup  *ft.Node
	pRunner, bRunner *machine.Runner
	pConn, bConn     *channel.Conn
	proxy            *netproxy.Proxy
	arb              arbiter.Arbiter
}

var pairKey = []byte("pair-test-key-0123456789")

// pairTimeout is the tests' failure detection timeout: generous, since the
// test host runs other tests' VMs beside these (a false failover is safe,
// but not what these tests look at).
const pairTimeout = 500 * time.Millisecond

// newPair starts a protected pair running seqGuest on loopback, through a
// proxy; tune, if set, adjusts the channel's configuration.
func newPair(t *testing.T, tune ...func(*channel.Config)) *pairRig {
	t.Helper()
	return newPairFor(t, seqProgram(t), tune...)
}

// newPairFor is newPair for prog.
func newPairFor(t *testing.T, prog *tinyguest.Program, tune ...func(*channel.Config)) *pairRig {
	t.Helper()
	return newPairWith(t, prog, nil, tune...)
}

// newPairWith is newPairFor with VMMs whose position source, if any,
// positions makes.
func newPairWith(t *testing.T, prog *tinyguest.Program, positions func(*kvm.VCPU) (machine.PositionSource, error), tune ...func(*channel.Config)) *pairRig {
	t.Helper()
	arb, err := arbiter.Open("file:" + t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	r := &pairRig{w: newWire(), arb: arb}
	r.primary, r.pRunner = pairNodeFor(t, r.w, "A", arb, prog, positions)
	r.backup, r.bRunner = pairNodeFor(t, r.w, "B", arb, prog, positions)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if res, err := r.primary.Claim(ctx, 0); err != nil || !res.Won {
		t.Fatalf("the primary's first claim: %+v, %v", res, err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if r.proxy, err = netproxy.New(ln.Addr().String()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.proxy.Close)
	cfg := channel.Config{Key: pairKey, Timeout: pairTimeout}
	for _, f := range tune {
		f(&cfg)
	}
	errc := make(chan error, 1)
	go func() {
		nc, err := ln.Accept()
		if err == nil {
			c := cfg
			c.Role = channel.Primary
			r.pConn, err = channel.Handshake(nc, c)
		}
		errc <- err
	}()
	bcfg := cfg
	bcfg.Role = channel.Backup
	if r.bConn, err = channel.Dial(ctx, r.proxy.Addr(), bcfg); err != nil {
		t.Fatal(err)
	}
	r.bConn.Start()
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.pConn.Abort(); r.bConn.Abort() })
	if err := r.primary.Protect(r.pConn); err != nil {
		t.Fatal(err)
	}
	if err := r.backup.Follow(r.bConn, r.primary.Epoch()); err != nil {
		t.Fatal(err)
	}
	return r
}

type runResult struct {
	stop machine.Stop
	err  error
}

// runNode runs n in the background until it stops; the test's cleanup
// stops it and waits for it before the machine is closed.
func runNode(t *testing.T, n *ft.Node, rn *machine.Runner) chan runResult {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	c := make(chan runResult, 1)
	done := make(chan struct{})
	go func() {
		defer close(done)
		stop, err := n.Run(ctx, rn)
		c <- runResult{stop, err}
	}()
	t.Cleanup(func() { cancel(); <-done })
	return c
}

func (r *pairRig) start(t *testing.T) (p, b chan runResult) {
	return runNode(t, r.primary, r.pRunner), runNode(t, r.backup, r.bRunner)
}

// waitOutputs waits until n outputs left the pair.
func (r *pairRig) waitOutputs(t *testing.T, n int) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		r.w.mu.Lock()
		k := len(r.w.got)
		r.w.mu.Unlock()
		if k >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("only %d outputs after a minute", k)
		}
		time.Sleep(time.Millisecond)
	}
}

// check verifies that the world saw every sequence number, in order, each
// once except a re-sent tail at a failover, and returns the largest gap
// between two new numbers leaving and how many outputs were repeats.
func (r *pairRig) check(t *testing.T) (gap time.Duration, repeated int) {
	t.Helper()
	r.w.mu.Lock()
	defer r.w.mu.Unlock()
	var next uint32 = 1
	var last time.Time // when the previous new number left
	for i, s := range r.w.got {
		switch {
		case s.seq == next:
			next++
			if !last.IsZero() {
				gap = max(gap, s.left.Sub(last))
			}
			last = s.left
		case s.seq < next:
			repeated++
		default:
			t.Fatalf("output %d: %s sent %d after %d: %d lost", i, s.vmm, s.seq, next-1, s.seq-next)
		}
	}
	if next != seqOutputs+1 {
		t.Fatalf("the world saw outputs up to %d of %d", next-1, seqOutputs)
	}
	return gap, repeated
}

func wantExit(t *testing.T, who string, res runResult) {
	t.Helper()
	if res.err != nil || res.stop.Kind != machine.StopTestExit || res.stop.Code != 1 {
		t.Fatalf("%s: %v, %v", who, res.stop, res.err)
	}
}

// A protected pair: the backup follows the primary to the guest's exit and
// ends in the same state; every output left once, from the primary.
func TestPairFollowsToTheEnd(t *testing.T) {
	r := newPair(t)
	p, b := r.start(t)
	wantExit(t, "primary", <-p)
	// The backup reaches the guest's exit too (or the log's end just
	// before it) and checks the primary's final digest.
	res := <-b
	if res.err != nil || (res.stop.Kind != machine.StopLogEnd && res.stop.Kind != machine.StopTestExit) {
		t.Fatalf("backup: %v, %v", res.stop, res.err)
	}
	if _, rep := r.check(t); rep != 0 {
		t.Fatalf("%d outputs repeated without a failover", rep)
	}
	for _, s := range r.w.got {
		if s.vmm != "A" {
			t.Fatalf("the backup's guest output left: %+v", s)
		}
	}
	st := r.backup.M.Stats()
	t.Logf("backup: %d state deltas applied, %d digest checks passed; primary: %d deltas, %d log bytes", st.Deltas, st.SyncChecks, r.primary.M.Stats().Deltas, r.pConn.Sent())
	if st.SyncChecks == 0 {
		t.Fatal("no digest checks")
	}
}

// Output waits for the backup's acknowledgement: acknowledgements that
// come late make output late, by as much.
func TestPairOutputWaitsForAck(t *testing.T) {
	// No lag bound: the late acknowledgements would also make the
	// backup look behind, and slow the guest.
	r := newPair(t, func(c *channel.Config) { c.MaxLag = -1 })
	const delay = 100 * time.Millisecond
	r.proxy.Delay(netproxy.Back, delay) // the backup's acks
	p, b := r.start(t)
	wantExit(t, "primary", <-p)
	<-b
	r.check(t)
	r.w.mu.Lock()
	defer r.w.mu.Unlock()
	// An output waits for the acknowledgement of the log up to it, which
	// went out with the last entry before it: usually a ms or so before
	// the output (the PIT logs an interrupt every ms), but on a busy host
	// the vCPU thread may lose the CPU in between (11 ms seen here), so
	// each output only has to show that it waited for an acknowledgement
	// (an output let go at once leaves within microseconds), and the
	// mean the whole delay.
	var sum time.Duration
	for _, s := range r.w.got {
		held := s.left.Sub(s.produced)
		if held < delay/2 {
			t.Fatalf("output %d left %v after the guest produced it, before its log could be acknowledged (acks take %v)", s.seq, held, delay)
		}
		sum += held
	}
	mean := sum / time.Duration(len(r.w.got))
	t.Logf("mean hold %v with acks delayed %v", mean, delay)
	if mean < delay {
		t.Fatalf("mean hold %v, under the acknowledgement delay %v", mean, delay)
	}
}

// The primary dies mid-stream: the backup notices, wins the arbiter, goes
// live where the log ends and finishes the guest's work; the world sees
// every output, none lost.
func TestPairFailover(t *testing.T) {
	r := newPair(t)
	var live time.Time
	r.backup.OnLive = func() { live = time.Now() }
	p, b := r.start(t)
	r.waitOutputs(t, seqOutputs/3)
	killed := time.Now()
	r.primary.Crash()
	<-p
	wantExit(t, "backup", <-b)
	gap, rep := r.check(t)
	if r.backup.Role() != ft.RoleAlone {
		t.Fatalf("backup's role after the failover: %v", r.backup.Role())
	}
	h, err := r.arb.Current(context.Background())
	if err != nil || h.Owner != "B" || h.Epoch != 2 {
		t.Fatalf("arbiter: %v, %v", h, err)
	}
	st := r.backup.M.Stats()
	t.Logf("failover: live %v after the kill; largest output gap %v; %d outputs sent again; backup passed %d digest checks, applied %d deltas",
		live.Sub(killed), gap, rep, st.SyncChecks, st.Deltas)
}

// The backup dies: the primary wins the arbiter and goes on alone; nothing
// it held is lost.
func TestPairBackupLost(t *testing.T) {
	r := newPair(t)
	p, b := r.start(t)
	r.waitOutputs(t, seqOutputs/3)
	r.backup.Crash()
	<-b
	wantExit(t, "primary", <-p)
	if _, rep := r.check(t); rep != 0 {
		t.Fatalf("%d repeated", rep)
	}
	if r.primary.Role() != ft.RoleAlone {
		t.Fatalf("primary's role: %v", r.primary.Role())
	}
}

// The logging channel alone is cut: both VMMs live, both claim; exactly
// one goes on, the other stops, and the guest's work completes.
func TestPairChannelCut(t *testing.T) {
	r := newPair(t)
	p, b := r.start(t)
	r.waitOutputs(t, seqOutputs/3)
	r.proxy.Freeze(netproxy.Forward, true)
	r.proxy.Freeze(netproxy.Back, true)
	pr, br := <-p, <-b
	var winner string
	for _, x := range []struct {
		who string
		res runResult
	}{{"A", pr}, {"B", br}} {
		if x.res.err == nil {
			if winner != "" {
				t.Fatal("both VMMs finished the guest: split brain")
			}
			winner = x.who
			wantExit(t, x.who, x.res)
		} else if !errors.Is(x.res.err, context.Canceled) {
			t.Logf("%s stopped: %v", x.who, x.res.err)
		}
	}
	if winner == "" {
		t.Fatalf("no VMM went on: %v / %v", pr.err, br.err)
	}
	h, _ := r.arb.Current(context.Background())
	if h.Owner != winner {
		t.Fatalf("arbiter holder %v, winner %s", h, winner)
	}
	gap, rep := r.check(t)
	t.Logf("%s went on; gap %v, %d repeated", winner, gap, rep)
}

// joinRig is a primary running alone and the means to give it a backup
// while it runs.
type joinRig struct {
	w       *wire
	arb     arbiter.Arbiter
	primary *ft.Node
	pRunner *machine.Runner
	pDone   chan runResult
}

func startAlone(t *testing.T) *joinRig {
	arb, err := arbiter.Open("file:" + t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	j := &joinRig{w: newWire(), arb: arb}
	j.primary, j.pRunner = pairNode(t, j.w, "A", arb)
	if res, err := j.primary.Claim(context.Background(), 0); err != nil || !res.Won {
		t.Fatalf("claim: %+v %v", res, err)
	}
	j.pDone = runNode(t, j.primary, j.pRunner)
	return j
}

// join gives the running primary a backup named name through a live
// transfer, and starts the backup.
func (j *joinRig) join(t *testing.T, name string, setup ...func(*ft.Node)) (*ft.Node, *machine.Runner, chan runResult) {
	t.Helper()
	b, bRunner := pairNode(t, j.w, name, j.arb)
	for _, f := range setup {
		f(b)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	cfg := channel.Config{Key: pairKey, Timeout: pairTimeout}
	type sendResult struct {
		res migrate.Result
		err error
	}
	sent := make(chan sendResult, 1)
	go func() {
		nc, err := ln.Accept()
		if err != nil {
			sent <- sendResult{err: err}
			return
		}
		c := cfg
		c.Role = channel.Primary
		conn, err := channel.Establish(nc, c)
		if err != nil {
			sent <- sendResult{err: err}
			return
		}
		res, err := j.primary.AcceptBackup(conn, j.pRunner, migrate.SendOptions{})
		sent <- sendResult{res, err}
	}()
	bcfg := cfg
	bcfg.Role = channel.Backup
	conn, err := channel.Dial(context.Background(), ln.Addr().String(), bcfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(conn.Abort)
	if _, _, err := ft.Join(conn, migrate.ReceiveOptions{Build: func(migrate.Manifest) (*machine.Machine, error) { return b.M, nil }}); err != nil {
		t.Fatal(err)
	}
	s := <-sent
	if s.err != nil {
		t.Fatal(s.err)
	}
	t.Logf("%s joined: %d rounds, %d bytes, guest paused %v", name, s.res.Rounds, s.res.Bytes, s.res.Downtime)
	if err := b.Follow(conn, j.primary.Epoch()); err != nil {
		t.Fatal(err)
	}
	return b, bRunner, runNode(t, b, bRunner)
}

func (j *joinRig) rig() *pairRig { return &pairRig{w: j.w} }

// A backup joins a primary whose guest is running, without a restart, and
// follows it to the end in the same state.
func TestPairJoinRunningGuest(t *testing.T) {
	j := startAlone(t)
	j.rig().waitOutputs(t, seqOutputs/4)
	if j.primary.Role() != ft.RoleAlone {
		t.Fatalf("role before the join: %v", j.primary.Role())
	}
	b, _, bDone := j.join(t, "B")
	if st := j.primary.Status(); st.Role != ft.RolePrimary || !st.Protected {
		t.Fatalf("status after the join: %+v", st)
	}
	wantExit(t, "primary", <-j.pDone)
	res := <-bDone
	if res.err != nil || (res.stop.Kind != machine.StopLogEnd && res.stop.Kind != machine.StopTestExit) {
		t.Fatalf("backup: %v, %v", res.stop, res.err)
	}
	if _, rep := j.rig().check(t); rep != 0 {
		t.Fatalf("%d repeated", rep)
	}
	t.Logf("backup: %d digest checks passed", b.M.Stats().SyncChecks)
}

// Re-protection: after a failover the new primary takes a new backup
// without a guest restart, and survives a second failover.
func TestPairReprotectAndFailAgain(t *testing.T) {
	j := startAlone(t)
	j.rig().waitOutputs(t, seqOutputs/5)
	b, bRunner, bDone := j.join(t, "B")
	j.rig().waitOutputs(t, 2*seqOutputs/5)
	j.primary.Crash()
	<-j.pDone
	// B is alone now: it takes C as its backup, then dies too.
	deadline := time.Now().Add(10 * time.Second)
	for b.Role() != ft.RoleAlone {
		if time.Now().After(deadline) {
			t.Fatalf("B never went live: %v", b.Role())
		}
		time.Sleep(time.Millisecond)
	}
	j2 := &joinRig{w: j.w, arb: j.arb, primary: b, pRunner: bRunner, pDone: bDone}
	c, _, cDone := j2.join(t, "C")
	j.rig().waitOutputs(t, 3*seqOutputs/5)
	b.Crash()
	<-bDone
	wantExit(t, "C", <-cDone)
	gap, rep := j.rig().check(t)
	h, _ := j.arb.Current(context.Background())
	if h.Owner != "C" || h.Epoch != 3 {
		t.Fatalf("arbiter after two failovers: %v", h)
	}
	t.Logf("two failovers: largest gap %v, %d repeated; C passed %d digest checks", gap, rep, c.M.Stats().SyncChecks)
}

// A planned switchover moves the primary role to the backup without loss.
func TestPairSwitchover(t *testing.T) {
	r := newPair(t)
	p, b := r.start(t)
	r.waitOutputs(t, seqOutputs/3)
	if err := r.primary.Switchover(r.pRunner, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	res := <-p
	if res.err != nil || res.stop.Kind != machine.StopMoved {
		t.Fatalf("old primary: %v, %v", res.stop, res.err)
	}
	wantExit(t, "new primary", <-b)
	gap, rep := r.check(t)
	h, _ := r.arb.Current(context.Background())
	if h.Owner != "B" || h.Epoch != 2 {
		t.Fatalf("arbiter after the switchover: %v", h)
	}
	t.Logf("switchover: largest gap %v, %d repeated", gap, rep)
}

// A backup whose state diverges (a corrupted byte) is caught at the next
// digest check: it stops and never goes live, the primary goes on alone
// without losing output, and a new backup resynchronizes by state
// transfer and follows to the end.
func TestPairDivergedBackupResyncs(t *testing.T) {
	j := startAlone(t)
	j.rig().waitOutputs(t, seqOutputs/5)
	_, _, bDone := j.join(t, "B", func(b *ft.Node) {
		m := b.M
		m.SetOnExit(func(ex machine.Exit) {
			if ex.Count%50 == 0 {
				// Far from the guest's code, stack and data.
				m.Memory().WriteAt([]byte{0x42}, 0x1c0123)
			}
		})
	})
	res := <-bDone
	var mis *machine.SyncMismatchError
	if !errors.As(res.err, &mis) {
		t.Fatalf("the corrupted backup: %v, %v; want a digest mismatch", res.stop, res.err)
	}
	t.Logf("backup stopped: %v", res.err)
	deadline := time.Now().Add(10 * time.Second)
	for j.primary.Role() != ft.RoleAlone {
		if time.Now().After(deadline) {
			t.Fatalf("the primary's role after its backup diverged: %v", j.primary.Role())
		}
		time.Sleep(time.Millisecond)
	}
	_, _, cDone := j.join(t, "C")
	wantExit(t, "primary", <-j.pDone)
	res = <-cDone
	if res.err != nil || (res.stop.Kind != machine.StopLogEnd && res.stop.Kind != machine.StopTestExit) {
		t.Fatalf("the resynchronized backup: %v, %v", res.stop, res.err)
	}
	if _, rep := j.rig().check(t); rep != 0 {
		t.Fatalf("%d outputs repeated", rep)
	}
}

// cpuWorkGuest does a fixed amount of user-mode work with the PIT ticking
// at 1 kHz and no exits of its own until it is done: a protected pair
// keeps up with it only through state deltas.
var cpuWorkGuest = `
_start:
` + tinyguest.PICInit(0xfe) + tinyguest.PIT1kHz + tinyguest.ToUser + `
user:
	incq 0x90000
	cmpq $0x8000000, 0x90000
	jb user
	mov $1, %eax
` + tinyguest.ExitWithEAX + tinyguest.CountTicks

// TestPairOverhead measures, side by side, a fixed amount of guest work
// run plain (no journal) and as a protected primary whose backup follows
// it, for a CPU-bound guest, the output-heavy sequence guest and an idle
// one, with the logging bandwidth of each. It reports; timings on a
// shared test host are too noisy to judge.
func TestPairOverhead(t *testing.T) {
	cpu, err := tinyguest.Assemble(t.TempDir(), cpuWorkGuest)
	if err != nil {
		t.Fatal(err)
	}
	idle, err := tinyguest.Assemble(t.TempDir(), idleGuest)
	if err != nil {
		t.Fatal(err)
	}
	plain := func(p *tinyguest.Program) time.Duration {
		m := newMachineFor(t, p, nil, nil)
		dev := &seqDevice{w: newWire(), vmm: "plain"}
		dev.w.emit["plain"] = map[uint32]time.Time{}
		dev.port = m.NewOutputPort("seq", func(b buffer.Buffer) { b.Release() })
		if err := m.RegisterPort(0x600, 4, dev); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		stop, err := m.Run(context.Background())
		if err != nil || stop.Kind != machine.StopTestExit {
			t.Fatalf("plain: %v, %v", stop, err)
		}
		return time.Since(start)
	}
	alone := func(p *tinyguest.Program) time.Duration {
		arb, err := arbiter.Open("file:" + t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		n, rn := pairNodeFor(t, newWire(), "A", arb, p, nil)
		start := time.Now()
		wantExit(t, "alone", <-runNode(t, n, rn))
		return time.Since(start)
	}
	protected := func(p *tinyguest.Program) (time.Duration, int64, machine.ExitStats) {
		r := newPairFor(t, p)
		start := time.Now()
		pc, bc := r.start(t)
		wantExit(t, "primary", <-pc)
		took := time.Since(start)
		if res := <-bc; res.err != nil {
			t.Fatalf("backup: %v", res.err)
		}
		return took, r.pConn.Sent(), r.primary.M.Stats()
	}
	for _, g := range []struct {
		name string
		p    *tinyguest.Program
	}{{"CPU-bound (2^27 user-mode counts, no exits of its own)", cpu}, {"output (1500 numbered outputs through a port)", seqProgram(t)}, {"idle (HLT, 200 PIT ticks)", idle}} {
		var tp, ta, tf []time.Duration
		var logBytes int64
		var st machine.ExitStats
		for i := 0; i < 3; i++ {
			tp = append(tp, plain(g.p))
			ta = append(ta, alone(g.p))
			d, b, s := protected(g.p)
			tf = append(tf, d)
			logBytes, st = b, s
		}
		mp, ma, mf := benchutil.Median(tp), benchutil.Median(ta), benchutil.Median(tf)
		t.Logf("%s, median of 3: plain %v, unprotected primary %v, protected %v: FT/plain time %.2f (throughput %.2f); log %.1f KiB/s; %d state deltas, %d digest checks",
			g.name, mp.Round(time.Millisecond), ma.Round(time.Millisecond), mf.Round(time.Millisecond), mf.Seconds()/mp.Seconds(), mp.Seconds()/mf.Seconds(),
			float64(logBytes)/1024/mf.Seconds(), st.Deltas, st.SyncChecks)
	}
}
