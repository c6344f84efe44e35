package main

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gokvm-ft/gokvm-ft/internal/netproxy"
	"github.com/gokvm-ft/gokvm-ft/migrate"
)

// lab is the FT lab network of DESIGN.md: a namespace with a bridge and a
// tap for each VMM on it (both VMMs run there, and talk over its
// loopback), and a client namespace on the bridge through a veth.
type lab struct {
	net, client *netns
}

const labMAC = "52:54:00:12:34:56" // the shared guest's

func newLab(t *testing.T) *lab {
	t.Helper()
	l := &lab{net: newNetns(t), client: newNetns(t)}
	l.net.ip(t, "link", "set", "lo", "up")
	l.net.ip(t, "link", "add", "br0", "type", "bridge")
	l.net.ip(t, "link", "set", "br0", "up")
	for _, tap := range []string{"gkA", "gkB", "gkC", "gkD"} {
		l.net.ip(t, "tuntap", "add", "dev", tap, "mode", "tap")
		l.net.ip(t, "link", "set", tap, "master", "br0")
		l.net.ip(t, "link", "set", tap, "up")
	}
	l.net.ip(t, "link", "add", "vc", "type", "veth", "peer", "name", "vcc", "netns", l.client.name)
	l.net.ip(t, "link", "set", "vc", "master", "br0")
	l.net.ip(t, "link", "set", "vc", "up")
	l.client.ip(t, "link", "set", "lo", "up")
	l.client.ip(t, "addr", "add", "10.0.2.2/24", "dev", "vcc")
	l.client.ip(t, "link", "set", "vcc", "up")
	return l
}

// pairLab is a protected guest in the lab: the journal guest's snapshot,
// restored as primary A, and what its backups need.
type pairLab struct {
	*lab
	snap, key, arb, dir string
	extra               []string // more flags for every VMM
}

func newPairLab(t *testing.T) *pairLab {
	t.Helper()
	linuxImages(t)
	need(t, "ip", "mkfs.ext4")
	p := &pairLab{lab: newLab(t), dir: t.TempDir()}
	p.snap = journalGuestSnapshot(t, sharedNetns(t))
	p.key = filepath.Join(p.dir, "pair.key")
	if err := os.WriteFile(p.key, []byte("lab-pair-secret-0123456789abcdef\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	// The arbiter's directory must exist: a VMM does not create it (a
	// shared mount that is missing must not become a local directory).
	p.arb = "file:" + filepath.Join(p.dir, "arbiter")
	if err := os.Mkdir(filepath.Join(p.dir, "arbiter"), 0o700); err != nil {
		t.Fatal(err)
	}
	return p
}

// disk makes a copy of the snapshot's disk for a VMM.
func (p *pairLab) disk(t *testing.T, name string) string {
	t.Helper()
	snap, err := migrate.Open(p.snap)
	if err != nil {
		t.Fatal(err)
	}
	defer snap.Close()
	d, ok := snap.Disk("disk")
	if !ok {
		t.Fatal("the journal guest's snapshot has no disk")
	}
	path, err := snap.PrepareDisk(d, filepath.Join(p.dir, name+".img"))
	if err != nil {
		t.Fatal(err)
	}
	return path
}

func (p *pairLab) pairFlags(name, tap string) []string {
	return append([]string{"-key", p.key, "-arbiter", p.arb, "-name", name, "-mem", "256M", "-net", "tap=" + tap + ",mac=" + labMAC, "-log", "debug"}, p.extra...)
}

// startPrimary restores the guest as the pair's primary on tap gkA.
func (p *pairLab) startPrimary(t *testing.T, addr string, extra ...string) (*vmm, int) {
	t.Helper()
	return p.startPrimaryDisk(t, addr, p.disk(t, "A"), extra...)
}

// startPrimaryDisk is startPrimary with the primary's -disk path.
func (p *pairLab) startPrimaryDisk(t *testing.T, addr, disk string, extra ...string) (*vmm, int) {
	t.Helper()
	args := append([]string{"-restore", p.snap, "-disk", disk, "-primary", addr}, extra...)
	v := startVMM(t, p.net, append(args, p.pairFlags("A", "gkA")...)...)
	v.waitLog(t, "running unprotected", 2*time.Minute)
	if _, err := fmt.Fprintf(v.stdin, "echo restored-$((6*7))\n"); err != nil {
		t.Fatal(err)
	}
	pos := v.waitFor(t, "restored-42", len("echo restored-"), 2*time.Minute)
	return v, v.waitFor(t, "$ ", pos, 2*time.Minute)
}

// startBackup joins the primary at addr as name, on tap, and waits until
// it follows.
func (p *pairLab) startBackup(t *testing.T, addr, name, tap string, extra ...string) *vmm {
	t.Helper()
	return p.startBackupDisk(t, addr, name, tap, p.disk(t, name), extra...)
}

// startBackupDisk is startBackup with the backup's -disk path: one that
// does not exist yet gets a copy of the primary's image at the join.
func (p *pairLab) startBackupDisk(t *testing.T, addr, name, tap, disk string, extra ...string) *vmm {
	t.Helper()
	args := append([]string{"-backup", addr, "-disk", disk}, extra...)
	v := startVMM(t, p.net, append(args, p.pairFlags(name, tap)...)...)
	v.waitLog(t, "joined: following the primary", 3*time.Minute)
	return v
}

// waitLog waits for s in the VMM's log (stderr).
func (v *vmm) waitLog(t *testing.T, s string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !strings.Contains(v.stderr.String(), s) {
		select {
		case code := <-v.done:
			v.done <- code
			time.Sleep(100 * time.Millisecond) // the last of its output
			t.Fatalf("gokvm-ft exited with %d while waiting for %q in its log:\n%s\nconsole:\n%s", code, s, v.stderr.String(), v.console.String())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %q in the log within %v:\n%s", s, timeout, v.stderr.String())
		}
	}
}

// counterClient talks to the guest's counter service on one TCP connection
// from the client namespace, checking that each reply is the previous one
// plus one, and notes when each came.
type counterClient struct {
	mu    sync.Mutex
	times []time.Time
	err   error
	stop  chan struct{}
	done  chan struct{}
}

func startCounterClient(t *testing.T, ns *netns) *counterClient {
	t.Helper()
	c, err := ns.dial("10.0.2.15:7777", time.Minute)
	if err != nil {
		t.Fatalf("TCP to the counter: %v", err)
	}
	cc := &counterClient{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(cc.done)
		defer c.Close()
		r := bufio.NewReader(c)
		last := 0
		for {
			select {
			case <-cc.stop:
				return
			default:
			}
			c.SetDeadline(time.Now().Add(time.Minute))
			_, err := fmt.Fprintf(c, "next\n")
			var line string
			if err == nil {
				line, err = r.ReadString('\n')
			}
			var v int
			if err == nil {
				if _, serr := fmt.Sscan(line, &v); serr != nil || v != last+1 {
					err = fmt.Errorf("reply %q after %d: a gap or a repeat", line, last)
				}
			}
			cc.mu.Lock()
			if err != nil {
				cc.err = err
				cc.mu.Unlock()
				return
			}
			last = v
			cc.times = append(cc.times, time.Now())
			cc.mu.Unlock()
		}
	}()
	return cc
}

func (cc *counterClient) replies() int {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	return len(cc.times)
}

// waitReplies waits until n more replies came, or fails.
func (cc *counterClient) waitReplies(t *testing.T, n int, timeout time.Duration) {
	t.Helper()
	want := cc.replies() + n
	deadline := time.Now().Add(timeout)
	for cc.replies() < want {
		cc.mu.Lock()
		err := cc.err
		cc.mu.Unlock()
		if err != nil {
			t.Fatalf("counter client: %v", err)
		}
		if time.Now().After(deadline) {
			t.Fatalf("only %d of %d replies after %v", cc.replies(), want, timeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// gapAround is the longest wait between two replies after t0, and the
// number of replies before t0.
func (cc *counterClient) gapAround(t0 time.Time) (gap time.Duration, before int) {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	for i, at := range cc.times {
		if at.Before(t0) {
			before = i + 1
			continue
		}
		prev := t0
		if i > 0 {
			prev = cc.times[i-1]
		}
		gap = max(gap, at.Sub(prev))
	}
	return gap, before
}

func (cc *counterClient) finish(t *testing.T) int {
	t.Helper()
	close(cc.stop)
	<-cc.done
	cc.mu.Lock()
	defer cc.mu.Unlock()
	if cc.err != nil {
		t.Fatalf("counter client: %v after %d replies", cc.err, len(cc.times))
	}
	return len(cc.times)
}

// TestLinuxPairFailover is the lab test: a Linux guest protected by a
// backup that joined it while it ran, a client talking to its counter
// service on one TCP connection, and `kill -9` of the primary mid-stream:
// the backup goes live, the connection survives, no reply is lost or
// repeated, and the longest wait for a reply is measured. Then the new
// primary takes a new backup (re-protection) and hands over to it in a
// planned switchover, the client still on the same connection.
func TestLinuxPairFailover(t *testing.T) {
	tl := newTimeline(t)
	tl.print("preparing the guest: a snapshot at its shell prompt (cached; the first run boots Linux once)")
	p := newPairLab(t)
	tl.event("lab ready: bridge, taps gkA gkB gkC, client namespace (10.0.2.2)")
	const addrA, addrB = "127.0.0.1:7910", "127.0.0.1:7911"
	a, _ := p.startPrimary(t, addrA)
	tl.event("A: guest up (restored at its shell prompt), primary, unprotected")
	cc := startCounterClient(t, p.client)
	cc.waitReplies(t, 20, 2*time.Minute)
	tl.event("client: one TCP connection to the counter service, 20 replies")
	b := p.startBackup(t, addrA, "B", "gkB", "-serve", addrB, "-control", filepath.Join(p.dir, "B.sock"))
	tl.event("B joined A without a guest restart: protected")
	cc.waitReplies(t, 50, 2*time.Minute)

	killed := time.Now()
	a.cmd.Process.Kill()
	<-a.done
	tl.event("A killed (kill -9)")
	b.waitLog(t, "live: the backup took over", time.Minute)
	live := time.Now()
	tl.event("B live: won the arbiter, replayed A's log, announced the guest")
	cc.waitReplies(t, 1, 2*time.Minute)
	tl.event("client resumed on the same connection")
	cc.waitReplies(t, 50, 2*time.Minute)
	gap, before := cc.gapAround(killed)
	t.Logf("failover: %d replies before the kill; B live %v after it; longest wait for a reply after the kill %v",
		before, live.Sub(killed).Round(time.Millisecond), gap.Round(time.Millisecond))
	tl.note("failover gap seen by the client: %v (B live %v after the kill; the rest is the client's TCP retransmission)",
		gap.Round(time.Millisecond), live.Sub(killed).Round(time.Millisecond))

	// Re-protection: C joins B (which serves backups on addrB once
	// live), then B hands over to C in a planned switchover; the client
	// stays on its connection throughout.
	c := p.startBackup(t, addrB, "C", "gkC")
	tl.event("C joined B: protected again")
	cc.waitReplies(t, 20, 2*time.Minute)
	switched := time.Now()
	out, err := runSelf("switchover", "-control", filepath.Join(p.dir, "B.sock"))
	if err != nil {
		t.Fatalf("switchover: %v: %s; B: %s; C: %s", err, out, b.stderr.String(), c.stderr.String())
	}
	select {
	case code := <-b.done:
		if code != 0 {
			t.Fatalf("B's exit status after the switchover: %d; stderr %s", code, b.stderr.String())
		}
	case <-time.After(time.Minute):
		t.Fatal("B did not stop after the switchover")
	}
	tl.event("planned switchover: B handed the guest to C and stopped")
	cc.waitReplies(t, 20, 2*time.Minute)
	sgap, _ := cc.gapAround(switched)
	n := cc.finish(t)
	t.Logf("switchover to C: longest wait for a reply %v; the client got %d consecutive replies on one connection", sgap.Round(time.Millisecond), n)
	tl.note("switchover gap seen by the client: %v; %d consecutive replies on one connection, none lost or repeated", sgap.Round(time.Millisecond), n)
	if _, err := fmt.Fprintf(c.stdin, "echo alive-$((2*21))\n"); err != nil {
		t.Fatal(err)
	}
	pos := c.waitFor(t, "alive-42", 0, 2*time.Minute)
	c.powerOff(t, pos)
	tl.event("C: guest powered off")
}

// timeline narrates a lab run: each event with the time since the start.
// With GOKVM_FT_DEMO set (`make demo`) it is printed as it happens.
type timeline struct {
	t     *testing.T
	start time.Time
	demo  bool
}

func newTimeline(t *testing.T) *timeline {
	tl := &timeline{t: t, start: time.Now(), demo: os.Getenv("GOKVM_FT_DEMO") != ""}
	return tl
}

func (tl *timeline) event(what string) {
	tl.print(fmt.Sprintf("%8.3fs  %s", time.Since(tl.start).Seconds(), what))
}

func (tl *timeline) note(format string, args ...any) {
	tl.print("           " + fmt.Sprintf(format, args...))
}

func (tl *timeline) print(line string) {
	if tl.demo {
		fmt.Println(line)
	} else {
		tl.t.Log(line)
	}
}

// exited reports whether the VMM has exited, and with what status.
func (v *vmm) exited() (int, bool) {
	select {
	case code := <-v.done:
		v.done <- code
		return code, true
	default:
		return 0, false
	}
}

// TestLinuxPairLosses is the rest of the lab: the backup is killed (the
// primary wins the arbiter and keeps serving), a new backup joins through
// a logging channel the test then cuts (exactly one VMM goes on), and
// after re-protection the survivor is killed too (a second failover). One
// client connection lives through all of it.
func TestLinuxPairLosses(t *testing.T) {
	p := newPairLab(t)
	p.extra = []string{"-peer-timeout", "500ms"}
	const addrA, addrC = "127.0.0.1:7920", "127.0.0.1:7921"
	a, _ := p.startPrimary(t, addrA)
	cc := startCounterClient(t, p.client)
	cc.waitReplies(t, 20, 2*time.Minute)

	b := p.startBackup(t, addrA, "B", "gkB")
	cc.waitReplies(t, 30, 2*time.Minute)
	b.cmd.Process.Kill()
	<-b.done
	a.waitLog(t, "running alone, unprotected", time.Minute)
	cc.waitReplies(t, 30, 2*time.Minute)
	t.Log("backup killed: the primary won the arbiter and goes on")

	// C joins A through a proxy in the lab's namespace: the logging
	// channel alone can be cut there.
	var px *netproxy.Proxy
	if err := p.net.do(func() error {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return err
		}
		px = netproxy.Serve(ln, addrA, func(addr string) (net.Conn, error) {
			var c net.Conn
			err := p.net.do(func() (err error) { c, err = net.Dial("tcp", addr); return })
			return c, err
		})
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	defer px.Close()
	c := p.startBackup(t, px.Addr(), "C", "gkC", "-serve", addrC)
	cc.waitReplies(t, 30, 2*time.Minute)
	cut := time.Now()
	px.Freeze(netproxy.Forward, true)
	px.Freeze(netproxy.Back, true)
	var winner, loser *vmm
	winnerAddr := ""
	deadline := time.Now().Add(time.Minute)
	for winner == nil {
		if code, ok := a.exited(); ok {
			winner, loser, winnerAddr = c, a, addrC
			t.Logf("channel cut: A stopped (status %d), C went on", code)
		} else if code, ok := c.exited(); ok {
			winner, loser, winnerAddr = a, c, addrA
			t.Logf("channel cut: C stopped (status %d), A went on", code)
		}
		if time.Now().After(deadline) {
			t.Fatalf("a minute after the cut both VMMs run: A %s\nC %s", a.stderr.String(), c.stderr.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	if !strings.Contains(loser.stderr.String(), "arbiter lost") {
		t.Fatalf("the stopped VMM did not lose the arbiter:\n%s", loser.stderr.String())
	}
	cc.waitReplies(t, 30, 2*time.Minute)
	gap, _ := cc.gapAround(cut)
	t.Logf("after the cut: longest wait for a reply %v", gap.Round(time.Millisecond))

	// Re-protection, then a second failover. D has no disk image: the join
	// copies the survivor's while its guest keeps writing the disk (16 MiB
	// from the guest's urandom, slow in an emulated guest kernel).
	if _, err := fmt.Fprintf(winner.stdin, "dd if=/dev/urandom of=/dev/vda bs=64k count=256 &\n"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * time.Second)
	dDisk := filepath.Join(p.dir, "D-copied.img")
	d := p.startBackupDisk(t, winnerAddr, "D", "gkD", dDisk)
	d.waitLog(t, "the primary's disk image was copied", time.Minute)
	cc.waitReplies(t, 30, 2*time.Minute)
	killed := time.Now()
	winner.cmd.Process.Kill()
	<-winner.done
	d.waitLog(t, "live: the backup took over", time.Minute)
	cc.waitReplies(t, 30, 2*time.Minute)
	gap, _ = cc.gapAround(killed)
	n := cc.finish(t)
	t.Logf("second failover: longest wait for a reply %v; %d consecutive replies on one connection in all", gap.Round(time.Millisecond), n)
	if _, err := fmt.Fprintf(d.stdin, "echo alive-$((2*21))\n"); err != nil {
		t.Fatal(err)
	}
	pos := d.waitFor(t, "alive-42", 0, 2*time.Minute)
	d.powerOff(t, pos)
}

// logBytes reads the primary's log size from `gokvm-ft status`.
func logBytes(t *testing.T, ctl string) int64 {
	t.Helper()
	out, err := runSelf("status", "-control", ctl)
	if err != nil {
		t.Fatalf("status: %v: %s", err, out)
	}
	var n int64
	i := strings.Index(string(out), ", log ")
	if i < 0 {
		t.Fatalf("status without the log size: %s", out)
	}
	if _, err := fmt.Sscanf(string(out[i:]), ", log %d bytes", &n); err != nil {
		t.Fatalf("status %q: %v", out, err)
	}
	return n
}

// TestLinuxPairThroughput measures, side by side on the lab network, the
// counter service's request rate from one client connection for the guest
// run plain and run protected (primary with a backup following), and the
// logging channel's bandwidth busy (serving the client) and idle. It
// reports; timings on a shared test host are too noisy to judge. Then the
// guest powers off on the primary, and the backup follows it there.
func TestLinuxPairThroughput(t *testing.T) {
	p := newPairLab(t)
	const window = 5 * time.Second
	rate := func(cc *counterClient) float64 {
		n0 := cc.replies()
		time.Sleep(window)
		return float64(cc.replies()-n0) / window.Seconds()
	}

	// Plain: the same snapshot, no pair, no journal.
	v := startVMM(t, p.net, "-restore", p.snap, "-disk", p.disk(t, "plain"), "-mem", "256M", "-net", "tap=gkA,mac="+labMAC)
	if _, err := fmt.Fprintf(v.stdin, "echo restored-$((6*7))\n"); err != nil {
		t.Fatal(err)
	}
	v.waitFor(t, "restored-42", len("echo restored-"), 2*time.Minute)
	cc := startCounterClient(t, p.client)
	cc.waitReplies(t, 20, 2*time.Minute)
	plain := rate(cc)
	cc.finish(t)
	v.cmd.Process.Kill()
	<-v.done

	ctl := filepath.Join(p.dir, "A.sock")
	a, _ := p.startPrimary(t, "127.0.0.1:7930", "-control", ctl)
	b := p.startBackup(t, "127.0.0.1:7930", "B", "gkB")
	time.Sleep(2 * time.Second)
	l0 := logBytes(t, ctl)
	time.Sleep(window)
	l1 := logBytes(t, ctl)
	cc = startCounterClient(t, p.client)
	cc.waitReplies(t, 20, 2*time.Minute)
	l2 := logBytes(t, ctl)
	protected := rate(cc)
	l3 := logBytes(t, ctl)
	n := cc.finish(t)
	t.Logf("counter service, one connection: plain %.0f requests/s, protected %.0f requests/s: FT/plain %.2f", plain, protected, protected/plain)
	t.Logf("logging channel: idle %.1f KiB/s, serving the client %.1f KiB/s (%d replies in all)",
		float64(l1-l0)/1024/window.Seconds(), float64(l3-l2)/1024/window.Seconds(), n)

	// A guest that powers off on the primary does so on the backup: a
	// replicated event, not a failure. The backup ends at the same exit
	// with the primary's final state digest.
	if _, err := fmt.Fprintf(a.stdin, "poweroff\n"); err != nil {
		t.Fatal(err)
	}
	for _, v := range []*vmm{a, b} {
		select {
		case code := <-v.done:
			if code != 0 {
				t.Fatalf("exit status %d after the guest's poweroff: %s", code, v.stderr.String())
			}
		case <-time.After(3 * time.Minute):
			t.Fatalf("no exit after the guest's poweroff: %s", v.stderr.String())
		}
	}
	if !strings.Contains(b.stderr.String(), "the backup followed it to the same state") || strings.Contains(b.stderr.String(), "took over") {
		t.Fatalf("the backup did not follow the poweroff:\n%s", b.stderr.String())
	}
	t.Log("poweroff on the primary: the backup stopped at the same exit with the same state digest")
}

// TestLinuxPairSharedDisk runs the pair on one disk image (-disk-shared):
// the primary's guest writes a file to it and the primary is killed; the
// backup, which never touched the image while following, goes live and
// reads the file back, and the image holds it.
func TestLinuxPairSharedDisk(t *testing.T) {
	p := newPairLab(t)
	const addr = "127.0.0.1:7940"
	shared := p.disk(t, "shared")
	a, pos := p.startPrimaryDisk(t, addr, shared, "-disk-shared")
	b := p.startBackupDisk(t, addr, "B", "gkB", shared, "-disk-shared")
	a.shell(t, "mkdir -p /mnt && mount -t ext4 /dev/vda /mnt && echo shared-$((6*7)) > /mnt/f && sync && umount /mnt && echo WROTE-$((0+1))", "WROTE-1", pos)
	a.cmd.Process.Kill()
	<-a.done
	b.waitLog(t, "live: the backup took over", time.Minute)
	bpos := b.shell(t, "mkdir -p /mnt && mount -t ext4 /dev/vda /mnt && cat /mnt/f && umount /mnt", "shared-42", 0)
	b.powerOff(t, bpos)
	img, err := os.ReadFile(shared)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(img), "shared-42") {
		t.Fatal("the shared image does not hold the file the guest wrote")
	}
	t.Log("the backup read the primary's write back from the shared image after the failover")
}
