package migrate_test

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/gokvm-ft/gokvm-ft/internal/tinyguest"
	"github.com/gokvm-ft/gokvm-ft/machine"
	"github.com/gokvm-ft/gokvm-ft/migrate"
	"github.com/gokvm-ft/gokvm-ft/virtio/blk"
)

// sweeps is how many times the guest writes all its pages.
const sweeps = 4000

// writerGuest sweeps 256 pages (0x100000-0x1fffff), incrementing each;
// after each sweep it counts the sweep (0x90000), has port 0x510's device
// copy that count into page 0x250000 (a VMM write, on the vCPU thread), and
// reads port 0x510 (an "in" exit answered 1) into a sum (0x90010). When
// done, every page holds exactly `sweeps`: a page lost on the way shows.
var writerGuest = `
_start:
	mov $0x100000, %rbx
1:	incq (%rbx)
	add $0x1000, %rbx
	cmp $0x200000, %rbx
	jb 1b
	incq 0x90000
	mov $0x510, %dx
	out %al, %dx
	in %dx, %eax
	add %rax, 0x90010
	cmpq $` + itoa(sweeps) + `, 0x90000
	jb _start
	mov 0x90010, %eax
	mov $0x501, %dx
	out %eax, %dx
`

func itoa(n int) string { return strconv.Itoa(n) }

// sweepDevice is port 0x510: writes copy the sweep count into page
// 0x250000; reads answer 1.
type sweepDevice struct{ m *machine.Machine }

func (d sweepDevice) ReadPort(port uint16, data []byte) {
	clear(data)
	data[0] = 1
}
func (d sweepDevice) WritePort(port uint16, data []byte) {
	n, _ := d.m.Memory().Read64(0x90000)
	d.m.Memory().Write64(0x250000, n)
}

var prog *tinyguest.Program

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "migrate-test")
	if err == nil {
		prog, err = tinyguest.Assemble(dir, writerGuest)
		os.RemoveAll(dir)
	}
	if err != nil {
		os.Stderr.WriteString("assemble: " + err.Error() + "\n")
		os.Exit(1)
	}
	if mode := os.Getenv("MIGRATE_TEST_CHILD"); mode != "" {
		if err := child(mode); err != nil {
			fmt.Fprintln(os.Stderr, "child:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// child is the other process of the two-process tests: "restore:DIR"
// restores a snapshot and finishes the guest; "receive" listens on a port
// it prints, takes a live transfer and finishes the guest.
func child(mode string) error {
	switch {
	case strings.HasPrefix(mode, "restore:"):
		snap, err := migrate.Open(strings.TrimPrefix(mode, "restore:"))
		if err != nil {
			return err
		}
		defer snap.Close()
		m, cleanup, err := buildMachine(false, "")
		if err != nil {
			return err
		}
		defer cleanup()
		if err := snap.Load(m); err != nil {
			return err
		}
		return finishErr(m)
	case mode == "receive":
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return err
		}
		fmt.Println(ln.Addr().String())
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		defer c.Close()
		var cleanup func()
		m, _, err := migrate.Receive(c, migrate.ReceiveOptions{Build: func(migrate.Manifest) (*machine.Machine, error) {
			m, cl, err := buildMachine(false, "")
			cleanup = cl
			return m, err
		}})
		if cleanup != nil {
			defer cleanup()
		}
		if err != nil {
			return err
		}
		return finishErr(m)
	}
	return fmt.Errorf("unknown mode %q", mode)
}

// startChild runs this test binary as the other process.
func startChild(t *testing.T, mode string) (*exec.Cmd, *bufio.Reader, *bytes.Buffer) {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(self)
	cmd.Env = append(os.Environ(), "MIGRATE_TEST_CHILD="+mode)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return cmd, bufio.NewReader(out), &stderr
}

// TestSnapshotNewProcess: a guest snapshotted at an "in" exit mid-run is
// restored by another process, which finishes it with nothing lost.
func TestSnapshotNewProcess(t *testing.T) {
	src := newMachine(t, true, "")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ins := 0
	src.SetOnExit(func(ex machine.Exit) {
		if ex.Addr == 0x510 && !ex.Write {
			if ins++; ins == 1000 {
				cancel() // stop right at the 1000th "in", before it completes
			}
		}
	})
	if stop, err := src.Run(ctx); err != nil || stop.Kind != machine.StopCanceled {
		t.Fatalf("run: %v, %v", stop, err)
	}
	dir := filepath.Join(t.TempDir(), "snap")
	if err := migrate.Save(dir, src, nil); err != nil {
		t.Fatal(err)
	}
	cmd, _, stderr := startChild(t, "restore:"+dir)
	if err := cmd.Wait(); err != nil {
		t.Fatalf("the restoring process: %v: %s", err, stderr)
	}
}

// TestLiveTransferNewProcess: the fast-writing guest moves live to another
// process, which finishes it with nothing lost.
func TestLiveTransferNewProcess(t *testing.T) {
	src := newMachine(t, true, "")
	runFor(t, src, 5)
	runner, srcDone := startRunner(t, src)
	cmd, out, stderr := startChild(t, "receive")
	addr, err := out.ReadString('\n')
	if err != nil {
		t.Fatalf("the receiving process: %v: %s", err, stderr)
	}
	c, err := net.Dial("tcp", strings.TrimSpace(addr))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	res, err := migrate.Send(c, src, migrate.SendOptions{Pause: runner.Pause, MaxRounds: 5})
	if err != nil {
		t.Fatal(err)
	}
	if stop := <-srcDone; stop.Kind != machine.StopMoved {
		t.Fatalf("source stop %v", stop)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("the receiving process: %v: %s", err, stderr)
	}
	t.Logf("busy guest (4 MiB, 258 pages dirtied per sweep): %.1f MiB in %d rounds, downtime %v (%d pages at the end)",
		float64(res.Bytes)/(1<<20), res.Rounds, res.Downtime, res.FinalPages)
}

// buildMachine makes a 4 MiB machine with the sweep device, and the guest
// loaded when load is set. disk, if not empty, is attached as virtio-blk.
func buildMachine(load bool, disk string) (*machine.Machine, func(), error) {
	m, err := machine.New(machine.Config{MemorySize: 4 << 20, TestExit: true, Host: machine.DetectHostKind()})
	if err != nil {
		return nil, nil, err
	}
	closers := []func() error{m.Close}
	cleanup := func() {
		for i := len(closers) - 1; i >= 0; i-- {
			closers[i]()
		}
	}
	fail := func(err error) (*machine.Machine, func(), error) { cleanup(); return nil, nil, err }
	if err := m.RegisterPort(0x510, 1, sweepDevice{m}); err != nil {
		return fail(err)
	}
	if disk != "" {
		d, err := blk.New(disk, false)
		if err != nil {
			return fail(err)
		}
		closers = append(closers, d.Close)
		if _, err := m.AddVirtio("disk", d); err != nil {
			return fail(err)
		}
	}
	if load {
		if err := tinyguest.Load(m.Memory(), m.VCPU(), prog, tinyguest.Options{}); err != nil {
			return fail(err)
		}
	}
	return m, cleanup, nil
}

func newMachine(t *testing.T, load bool, disk string) *machine.Machine {
	t.Helper()
	if _, err := os.Stat("/dev/kvm"); err != nil {
		t.Skip("no /dev/kvm")
	}
	m, cleanup, err := buildMachine(load, disk)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cleanup)
	return m
}

// finish runs m to its end and checks the guest's invariants.
func finish(t *testing.T, m *machine.Machine) {
	t.Helper()
	if err := finishErr(m); err != nil {
		t.Fatal(err)
	}
}

func finishErr(m *machine.Machine) error {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	stop, err := m.Run(ctx)
	if err != nil || stop.Kind != machine.StopTestExit || stop.Code != sweeps {
		return fmt.Errorf("stop %v, %v; want test exit %d (every in answered)", stop, err, sweeps)
	}
	mem := m.Memory()
	for a := uint64(0x100000); a < 0x200000; a += machine.PageSize {
		if v, _ := mem.Read64(a); v != sweeps {
			return fmt.Errorf("page %#x holds %d, want %d: a guest write was lost", a, v, sweeps)
		}
	}
	if v, _ := mem.Read64(0x250000); v != sweeps {
		return fmt.Errorf("the device's page holds %d, want %d: a VMM write was lost", v, sweeps)
	}
	return nil
}

// runFor runs m until at least n sweeps are done, then stops it.
func runFor(t *testing.T, m *machine.Machine, n uint64) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	m.SetOnExit(func(ex machine.Exit) {
		if v, _ := m.Memory().Read64(0x90000); v >= n {
			cancel()
		}
	})
	defer m.SetOnExit(nil)
	if stop, err := m.Run(ctx); err != nil || stop.Kind != machine.StopCanceled {
		t.Fatalf("run: %v, %v", stop, err)
	}
}

func TestSnapshotRoundTrip(t *testing.T) {
	diskPath := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(diskPath, []byte(strings.Repeat("disk", 1024)), 0o644); err != nil {
		t.Fatal(err)
	}
	src := newMachine(t, true, diskPath)
	runFor(t, src, sweeps/2)
	dir := filepath.Join(t.TempDir(), "snap")
	if err := migrate.Save(dir, src, []migrate.DiskSource{{Name: "disk", Path: diskPath}}); err != nil {
		t.Fatal(err)
	}
	if err := migrate.Save(dir, src, nil); err == nil {
		t.Error("a second snapshot into the same directory was accepted")
	}
	snap, err := migrate.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer snap.Close()
	d, ok := snap.Disk("disk")
	if !ok {
		t.Fatal("no disk in the snapshot")
	}
	fresh := filepath.Join(t.TempDir(), "fresh.img")
	path, err := snap.PrepareDisk(d, fresh)
	if err != nil || path != fresh {
		t.Fatalf("PrepareDisk: %q, %v", path, err)
	}
	// A different image is refused.
	other := filepath.Join(t.TempDir(), "other.img")
	os.WriteFile(other, []byte(strings.Repeat("DISK", 1024)), 0o644)
	if _, err := snap.PrepareDisk(d, other); !errors.Is(err, migrate.ErrDiskMismatch) {
		t.Errorf("a different image: %v", err)
	}
	dst := newMachine(t, false, fresh)
	if err := snap.Load(dst); err != nil {
		t.Fatal(err)
	}
	finish(t, dst)
}

func TestSnapshotRefusesOtherMachine(t *testing.T) {
	src := newMachine(t, true, "")
	runFor(t, src, 10)
	dir := filepath.Join(t.TempDir(), "snap")
	if err := migrate.Save(dir, src, nil); err != nil {
		t.Fatal(err)
	}
	snap, err := migrate.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer snap.Close()
	m, err := machine.New(machine.Config{MemorySize: 8 << 20, Host: machine.DetectHostKind()})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if err := snap.Load(m); err == nil || !strings.Contains(err.Error(), "MiB") {
		t.Errorf("a machine with other memory: %v", err)
	}
	// A truncated snapshot file is refused with an error, not half-loaded.
	f := filepath.Join(dir, migrate.SnapshotFile)
	b, _ := os.ReadFile(f)
	os.WriteFile(f, b[:len(b)/2], 0o644)
	snap2, err := migrate.Open(dir)
	if err == nil {
		dst := newMachine(t, false, "")
		err = snap2.Load(dst)
		snap2.Close()
	}
	if err == nil {
		t.Error("a truncated snapshot loaded")
	}
}

// startRunner runs a machine in a machine.Runner on its own goroutine.
func startRunner(t *testing.T, m *machine.Machine) (*machine.Runner, <-chan machine.Stop) {
	r := &machine.Runner{M: m}
	done := make(chan machine.Stop, 1)
	go func() {
		stop, err := r.Run(context.Background())
		if err != nil {
			t.Error(err)
		}
		done <- stop
	}()
	return r, done
}

// TestLiveTransfer moves a guest that writes all its pages as fast as it
// can, and whose device writes memory too, over TCP while it runs; the
// destination finishes it with no write lost and no "in" dropped.
func TestLiveTransfer(t *testing.T) {
	src := newMachine(t, true, "")
	runFor(t, src, 5) // a few sweeps: the pages are in use
	runner, srcDone := startRunner(t, src)

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	type got struct {
		m   *machine.Machine
		res migrate.Result
		err error
	}
	recv := make(chan got, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			recv <- got{err: err}
			return
		}
		defer c.Close()
		m, res, err := migrate.Receive(c, migrate.ReceiveOptions{Build: func(mf migrate.Manifest) (*machine.Machine, error) {
			return newMachine(t, false, ""), nil
		}})
		recv <- got{m, res, err}
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var rounds []migrate.Progress
	released := false
	res, err := migrate.Send(c, src, migrate.SendOptions{
		Pause:     runner.Pause,
		Release:   func() error { released = true; return nil },
		Progress:  func(p migrate.Progress) { rounds = append(rounds, p) },
		MaxRounds: 5,
	})
	if err != nil {
		t.Fatal(err)
	}
	if stop := <-srcDone; stop.Kind != machine.StopMoved || !released {
		t.Fatalf("source stop %v, released %v", stop, released)
	}
	g := <-recv
	if g.err != nil {
		t.Fatal(g.err)
	}
	for _, p := range rounds {
		t.Log(p)
	}
	t.Logf("sent %.1f MiB in %d rounds, %v; downtime %v (%d pages at the end)", float64(res.Bytes)/(1<<20), res.Rounds, res.Total, res.Downtime, res.FinalPages)
	if v, _ := g.m.Memory().Read64(0x90000); v >= sweeps {
		t.Fatalf("the guest had finished before it moved (%d sweeps): make it longer", v)
	}
	finish(t, g.m)
}

// TestLiveTransferRefused: a destination that cannot take the guest (other
// memory size) refuses it, and the source goes on running it to the end.
func TestLiveTransferRefused(t *testing.T) {
	src := newMachine(t, true, "")
	runner, srcDone := startRunner(t, src)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		b, err := ln.Accept()
		if err != nil {
			return
		}
		defer b.Close()
		migrate.Receive(b, migrate.ReceiveOptions{Build: func(mf migrate.Manifest) (*machine.Machine, error) {
			return nil, errors.New("no room here")
		}})
	}()
	a, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	_, err = migrate.Send(a, src, migrate.SendOptions{Pause: runner.Pause, Timeout: 10 * time.Second})
	a.Close()
	if err == nil {
		t.Fatal("Send succeeded against a refusing destination")
	}
	t.Log(err)
	stop := <-srcDone
	if stop.Kind != machine.StopTestExit || stop.Code != sweeps {
		t.Fatalf("source stop %v, want the guest to finish here", stop)
	}
}
