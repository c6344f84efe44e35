package main

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gokvm-ft/gokvm-ft/machine"
)

// The re-exec hook: `ip netns exec NS <test binary>` with GOKVM_FT_RUN set
// runs gokvm-ft itself, so the VMM (and the tap it opens) lives in the
// test's network namespace.
func TestMain(m *testing.M) {
	if args := os.Getenv("GOKVM_FT_RUN"); args != "" {
		os.Exit(run(strings.Split(args, "\x1f"), os.Stdin, os.Stdout, os.Stderr))
	}
	os.Exit(m.Run())
}

// netns is a network namespace made by a test and deleted after it.
type netns struct{ name string }

func newNetns(t *testing.T) *netns {
	t.Helper()
	n := &netns{name: fmt.Sprintf("gkft-%d-%d", os.Getpid(), time.Now().UnixNano()%100000)}
	if out, err := exec.Command("ip", "netns", "add", n.name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", n.name).Run() })
	return n
}

func (n *netns) ip(t *testing.T, args ...string) {
	t.Helper()
	full := append([]string{"-n", n.name}, args...)
	if out, err := exec.Command("ip", full...).CombinedOutput(); err != nil {
		t.Fatalf("ip %s: %v: %s", strings.Join(full, " "), err, out)
	}
}

// do runs f on an OS thread switched into the namespace: sockets f creates
// belong to it.
func (n *netns) do(f func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with its namespace
		fd, err := unix.Open("/run/netns/"+n.name, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			errc <- err
			return
		}
		defer unix.Close(fd)
		if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("setns: %w", err)
			return
		}
		errc <- f()
	}()
	return <-errc
}

// ping sends ICMP echo requests to addr from inside the namespace until one
// is answered or the timeout passes.
func (n *netns) ping(addr string, timeout time.Duration) (time.Duration, error) {
	var rtt time.Duration
	err := n.do(func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_ICMP)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		tv := unix.NsecToTimeval(int64(time.Second))
		unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
		to := &unix.SockaddrInet4{}
		copy(to.Addr[:], net.ParseIP(addr).To4())
		deadline := time.Now().Add(timeout)
		for seq := uint16(1); time.Now().Before(deadline); seq++ {
			req := []byte{8, 0, 0, 0, 0x47, 0x4b, byte(seq >> 8), byte(seq), 'g', 'o', 'k', 'v', 'm'}
			binary.BigEndian.PutUint16(req[2:], icmpChecksum(req))
			sent := time.Now()
			if err := unix.Sendto(fd, req, 0, to); err != nil {
				return err
			}
			buf := make([]byte, 1500)
			for time.Since(sent) < time.Second {
				k, _, err := unix.Recvfrom(fd, buf, 0)
				if err != nil {
					break
				}
				ihl := int(buf[0]&0xf) * 4
				if k >= ihl+8 && buf[ihl] == 0 && buf[ihl+4] == 0x47 && buf[ihl+5] == 0x4b &&
					binary.BigEndian.Uint16(buf[ihl+6:]) == seq && bytes.Equal(buf[ihl+8:k], req[8:]) {
					rtt = time.Since(sent)
					return nil
				}
			}
		}
		return fmt.Errorf("no echo reply from %s within %v", addr, timeout)
	})
	return rtt, err
}

func icmpChecksum(b []byte) uint16 {
	var s uint32
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(b[i])<<8 | uint32(b[i+1])
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	for s>>16 != 0 {
		s = s&0xffff + s>>16
	}
	return ^uint16(s)
}

// dial connects to addr from inside the namespace.
func (n *netns) dial(addr string, timeout time.Duration) (net.Conn, error) {
	var c net.Conn
	err := n.do(func() error {
		var err error
		c, err = net.DialTimeout("tcp", addr, timeout)
		return err
	})
	return c, err
}

// vmm is gokvm-ft running as a child process (inside a namespace).
type vmm struct {
	cmd     *exec.Cmd
	stdin   io.WriteCloser
	console *watchedBuffer
	stderr  *watchedBuffer
	done    chan int
	start   time.Time
}

func startVMM(t *testing.T, ns *netns, args ...string) *vmm {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	var cmd *exec.Cmd
	if ns != nil {
		cmd = exec.Command("ip", "netns", "exec", ns.name, self)
	} else {
		cmd = exec.Command(self)
	}
	cmd.Env = append(os.Environ(), "GOKVM_FT_RUN="+strings.Join(args, "\x1f"))
	v := &vmm{cmd: cmd, console: &watchedBuffer{}, stderr: &watchedBuffer{}, done: make(chan int, 1)}
	cmd.Stdout, cmd.Stderr = v.console, v.stderr
	if v.stdin, err = cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	v.start = time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		cmd.Wait()
		v.done <- cmd.ProcessState.ExitCode()
	}()
	t.Cleanup(func() {
		cmd.Process.Kill()
	})
	return v
}

func (v *vmm) waitFor(t *testing.T, s string, from int, timeout time.Duration) int {
	t.Helper()
	return v.console.waitFor(t, s, from, timeout, v.done)
}

// type_ types a shell command and waits for marker in its output.
func (v *vmm) shell(t *testing.T, cmd, marker string, pos int) int {
	t.Helper()
	if _, err := io.WriteString(v.stdin, cmd+"\n"); err != nil {
		t.Fatal(err)
	}
	pos = v.waitFor(t, marker, pos+len(cmd), 5*time.Minute)
	return v.waitFor(t, "$ ", pos, 5*time.Minute)
}

func (v *vmm) powerOff(t *testing.T, pos int) {
	t.Helper()
	io.WriteString(v.stdin, "poweroff\n")
	select {
	case code := <-v.done:
		if code != 0 {
			t.Fatalf("exit status %d after poweroff; stderr %q; console:\n%s", code, v.stderr.String(), v.console.String())
		}
	case <-time.After(5 * time.Minute):
		t.Fatalf("no exit after poweroff; console:\n%s", v.console.String())
	}
	t.Logf("powered off after %v", time.Since(v.start).Round(time.Millisecond))
}

func linuxImages(t *testing.T) (kernel, initrd string) {
	t.Helper()
	dir, err := filepath.Abs("../../images/out")
	if err != nil {
		t.Fatal(err)
	}
	if d := os.Getenv("GOKVM_IMAGES"); d != "" {
		dir = d
	}
	kernel, initrd = dir+"/vmlinux", dir+"/initramfs.cpio"
	for _, f := range []string{kernel, initrd, "/dev/kvm"} {
		if _, err := os.Stat(f); err != nil {
			if os.Getenv("CI") != "" {
				t.Fatalf("CI must have %s (make images): %v", f, err)
			}
			t.Skipf("%s missing: %v", f, err)
		}
	}
	return kernel, initrd
}

// need skips (or, in CI, fails) unless the tools the test uses are there.
func need(t *testing.T, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			if os.Getenv("CI") != "" {
				t.Fatalf("CI must install %s", tool)
			}
			t.Skipf("%s not installed", tool)
		}
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root (network namespaces, tap)")
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		t.Skipf("no /dev/net/tun: %v", err)
	}
}

// The Linux device tests share one guest configuration, so that one boot
// serves them all: the first boots it and snapshots it at the shell prompt
// into a cache outside the repo (keyed by kernel, initramfs, machine model
// and state version, host kind, flags and kernel command line); the others
// restore it.
const sharedGuestNet = "tap=gk0,mac=52:54:00:12:34:56"

var sharedGuestFlags = []string{"-mem", "256M", "-net", sharedGuestNet, "-append", "gokvm.ip=10.0.2.15/24,10.0.2.2"}

// sharedNetns makes the namespace the shared guest expects: tap gk0 with
// the host side at 10.0.2.2/24.
func sharedNetns(t *testing.T) *netns {
	ns := newNetns(t)
	ns.ip(t, "link", "set", "lo", "up")
	ns.ip(t, "tuntap", "add", "dev", "gk0", "mode", "tap")
	ns.ip(t, "addr", "add", "10.0.2.2/24", "dev", "gk0")
	ns.ip(t, "link", "set", "gk0", "up")
	return ns
}

func snapshotCacheDir(t *testing.T, kernel, initrd string) string {
	h := sha256.New()
	for _, f := range []string{kernel, initrd} {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		h.Write(b)
	}
	host := machine.DetectHostKind()
	// The command line is in the snapshot's running guest (its init's
	// environment included): a new one needs a new boot.
	fmt.Fprintf(h, "%s %d %v %q %q", machine.ModelVersion, machine.StateVersion, host, sharedGuestFlags, machine.KernelCmdline(host, 0, ""))
	base := os.Getenv("XDG_CACHE_HOME")
	if base == "" {
		home, _ := os.UserHomeDir()
		base = filepath.Join(home, ".cache")
	}
	return filepath.Join(base, "gokvm-ft", "snapshots", fmt.Sprintf("%x", h.Sum(nil)[:8]))
}

// startSharedGuest starts the shared guest in ns with a 16 MiB ext4 disk
// (returned) and a control socket (returned), at its shell prompt with eth0
// configured and the counter service running. The console position to
// continue from is returned too.
func startSharedGuest(t *testing.T, ns *netns) (v *vmm, disk, ctl string, pos int) {
	t.Helper()
	kernel, initrd := linuxImages(t)
	tmp := t.TempDir()
	disk = filepath.Join(tmp, "disk.img")
	ctl = filepath.Join(tmp, "vm.sock")
	cache := snapshotCacheDir(t, kernel, initrd)
	if _, err := os.Stat(filepath.Join(cache, "snapshot.gkft")); err == nil {
		v = startVMM(t, ns, append([]string{"-restore", cache, "-disk", disk, "-control", ctl}, sharedGuestFlags...)...)
		if _, err := io.WriteString(v.stdin, "echo restored-$((6*7))\n"); err != nil {
			t.Fatal(err)
		}
		pos = v.waitFor(t, "restored-42", len("echo restored-"), 2*time.Minute)
		pos = v.waitFor(t, "$ ", pos, 2*time.Minute)
		t.Logf("shared guest restored from %s in %v", cache, time.Since(v.start).Round(time.Millisecond))
		return v, disk, ctl, pos
	}
	newExt4Disk(t, disk)
	v = startVMM(t, ns, append([]string{"-kernel", kernel, "-initrd", initrd, "-disk", disk, "-control", ctl}, sharedGuestFlags...)...)
	pos = v.waitFor(t, "Welcome to u-root", 0, 15*time.Minute)
	pos = v.waitFor(t, "gokvm: network configured", pos, 5*time.Minute)
	pos = v.waitFor(t, "gokvm: counter service listening", pos, 5*time.Minute)
	pos = v.waitFor(t, "$ ", pos, 5*time.Minute)
	t.Logf("shared guest booted in %v", time.Since(v.start).Round(time.Millisecond))
	// Cache it for the next test: snapshot beside the cache, then rename.
	tmpSnap := cache + fmt.Sprintf(".tmp%d", os.Getpid())
	os.RemoveAll(tmpSnap)
	if err := os.MkdirAll(filepath.Dir(cache), 0o755); err == nil {
		if out, err := runSelf("snapshot", "-control", ctl, tmpSnap); err != nil {
			t.Logf("caching the booted guest failed: %v: %s", err, out)
		} else if err := os.Rename(tmpSnap, cache); err != nil {
			t.Logf("caching the booted guest: %v", err)
		}
	}
	os.RemoveAll(tmpSnap)
	return v, disk, ctl, pos
}

// newExt4Disk makes a 16 MiB raw image with an empty ext4 file system.
func newExt4Disk(t *testing.T, path string) {
	t.Helper()
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, 16<<20); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", path).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v: %s", err, out)
	}
}

// runSelf runs `gokvm-ft ARGS` (this test binary in gokvm-ft mode).
func runSelf(args ...string) ([]byte, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(self)
	cmd.Env = append(os.Environ(), "GOKVM_FT_RUN="+strings.Join(args, "\x1f"))
	return cmd.CombinedOutput()
}

// TestLinuxNetAndDisk boots Linux with a virtio-net card on a tap inside a
// network namespace made here and a virtio-blk disk: it pings the guest,
// talks to the counter service over TCP, writes a file on the disk, powers
// off, boots again and reads the file back.
func TestLinuxNetAndDisk(t *testing.T) {
	kernel, initrd := linuxImages(t)
	need(t, "ip", "mkfs.ext4", "debugfs")
	ns := sharedNetns(t)
	v, disk, _, pos := startSharedGuest(t, ns)
	rtt, err := ns.ping("10.0.2.15", time.Minute)
	if err != nil {
		t.Fatalf("ping: %v; console:\n%s", err, v.console.String())
	}
	t.Logf("ping answered in %v", rtt)

	c, err := ns.dial("10.0.2.15:7777", time.Minute)
	if err != nil {
		t.Fatalf("TCP to the counter: %v", err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Minute))
	r := bufio.NewReader(c)
	for want := 1; want <= 3; want++ {
		fmt.Fprintf(c, "next\n")
		line, err := r.ReadString('\n')
		if err != nil || strings.TrimSpace(line) != fmt.Sprint(want) {
			t.Fatalf("counter reply %d: %q, %v", want, line, err)
		}
	}
	c.Close()
	t.Logf("counter answered after %v", time.Since(v.start).Round(time.Millisecond))

	pos = v.shell(t, "mkdir -p /mnt && mount -t ext4 /dev/vda /mnt && echo hello-from-boot-1 > /mnt/f && sync && umount /mnt && echo DISK-$((1+1))", "DISK-2", pos)
	v.powerOff(t, pos)
	if out, err := exec.Command("debugfs", "-R", "cat /f", disk).Output(); err != nil || !strings.Contains(string(out), "hello-from-boot-1") {
		t.Fatalf("the host does not find the file on the image: %q, %v", out, err)
	}

	v = startVMM(t, nil, "-kernel", kernel, "-initrd", initrd, "-mem", "256M", "-disk", disk)
	pos = v.waitFor(t, "Welcome to u-root", 0, 15*time.Minute)
	pos = v.waitFor(t, "$ ", pos, 5*time.Minute)
	pos = v.shell(t, "mkdir -p /mnt && mount -t ext4 /dev/vda /mnt && cat /mnt/f", "hello-from-boot-1", pos)
	v.powerOff(t, pos)
}

// TestLinuxLiveTransfer moves a running Linux guest, busy writing memory,
// between two gokvm-ft processes on this host while a client in the
// guest's network talks to its counter service over one TCP connection:
// the source releases the
// tap, the destination takes it, and the connection goes on with no reset
// and no counter value lost or repeated.
func TestLinuxLiveTransfer(t *testing.T) {
	linuxImages(t)
	need(t, "ip", "mkfs.ext4")
	ns := sharedNetns(t)
	a, disk, ctl, _ := startSharedGuest(t, ns)
	netFlag := sharedGuestNet

	c, err := ns.dial("10.0.2.15:7777", time.Minute)
	if err != nil {
		t.Fatalf("TCP to the counter: %v", err)
	}
	defer c.Close()
	type result struct {
		n   int
		err error
	}
	stopClient := make(chan struct{})
	clientDone := make(chan result, 1)
	var replies atomic.Int64
	go func() {
		r := bufio.NewReader(c)
		last := 0
		for {
			select {
			case <-stopClient:
				clientDone <- result{last, nil}
				return
			default:
			}
			c.SetDeadline(time.Now().Add(2 * time.Minute))
			if _, err := fmt.Fprintf(c, "next\n"); err != nil {
				clientDone <- result{last, err}
				return
			}
			line, err := r.ReadString('\n')
			if err != nil {
				clientDone <- result{last, err}
				return
			}
			var v int
			if _, err := fmt.Sscan(line, &v); err != nil || v != last+1 {
				clientDone <- result{last, fmt.Errorf("reply %q after %d: a gap or a repeat", line, last)}
				return
			}
			last = v
			replies.Store(int64(v))
		}
	}()
	time.Sleep(2 * time.Second)
	// Keep the guest busy writing memory (dd's 8 MiB buffer, refilled from
	// /dev/zero over and over) while it moves.
	if _, err := io.WriteString(a.stdin, "dd if=/dev/zero of=/dev/null bs=8M count=1000000 &\n"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(3 * time.Second)

	b := startVMM(t, ns, "-incoming", "127.0.0.1:7900", "-disk", disk, "-net", netFlag, "-log", "debug")
	time.Sleep(time.Second) // B listening
	out, err := runSelf("migrate", "-control", ctl, "127.0.0.1:7900")
	t.Logf("migrate:\n%s", out)
	if err != nil {
		t.Fatalf("migrate: %v; source stderr %s; destination stderr %s", err, a.stderr.String(), b.stderr.String())
	}
	select {
	case code := <-a.done:
		if code != 0 {
			t.Fatalf("source exit %d: %s", code, a.stderr.String())
		}
	case <-time.After(time.Minute):
		t.Fatal("the source did not exit after the transfer")
	}
	before := replies.Load()
	time.Sleep(3 * time.Second) // the client keeps talking to the guest on B
	if replies.Load() == before {
		t.Errorf("no counter reply in 3 s after the transfer (%d before)", before)
	}
	close(stopClient)
	res := <-clientDone
	if res.err != nil {
		t.Fatalf("client: %v after %d replies; destination stderr %s", res.err, res.n, b.stderr.String())
	}
	t.Logf("the client got %d consecutive replies across the transfer", res.n)
	if _, err := io.WriteString(b.stdin, "echo moved-$((2*21))\n"); err != nil {
		t.Fatal(err)
	}
	bpos := b.waitFor(t, "moved-42", 0, 2*time.Minute)
	b.powerOff(t, bpos)
}

// TestLinuxSnapshotRestore snapshots a booted Linux guest through the
// control socket (the guest goes on running), then starts it again from
// the snapshot in a new process: the shell answers at once, and the disk
// comes back as it was at the snapshot.
func TestLinuxSnapshotRestore(t *testing.T) {
	kernel, initrd := linuxImages(t)
	tmp := t.TempDir()
	disk := filepath.Join(tmp, "disk.img")
	if err := os.WriteFile(disk, bytes.Repeat([]byte("at-snapshot\n"), 1<<16/12+1)[:1<<16], 0o644); err != nil {
		t.Fatal(err)
	}
	ctl := filepath.Join(tmp, "vm.sock")
	a := startVMM(t, nil, "-kernel", kernel, "-initrd", initrd, "-mem", "256M", "-disk", disk, "-control", ctl)
	pos := a.waitFor(t, "Welcome to u-root", 0, 15*time.Minute)
	pos = a.waitFor(t, "$ ", pos, 5*time.Minute)
	booted := time.Since(a.start)
	t.Logf("booted to the shell in %v", booted.Round(time.Millisecond))

	dir := filepath.Join(tmp, "snap")
	out, err := runSelf("snapshot", "-control", ctl, dir)
	t.Logf("snapshot: %s", out)
	if err != nil {
		t.Fatalf("snapshot: %v; stderr %s", err, a.stderr.String())
	}
	if st, err := os.Stat(filepath.Join(dir, "snapshot.gkft")); err == nil {
		t.Logf("snapshot file: %.1f MiB", float64(st.Size())/(1<<20))
	}
	// The source goes on, and changes its disk after the snapshot.
	pos = a.shell(t, "echo after-snapshot > /dev/vda && sync && echo SRC-$((3*3))", "SRC-9", pos)
	a.powerOff(t, pos)

	// The source's image changed: restoring onto it is refused...
	r := startVMM(t, nil, "-restore", dir, "-disk", disk)
	select {
	case code := <-r.done:
		if code == 0 || !strings.Contains(r.stderr.String(), "differs") {
			t.Fatalf("restore onto the changed image: exit %d, %s", code, r.stderr.String())
		}
	case <-time.After(time.Minute):
		t.Fatal("restore onto the changed image did not fail")
	}
	// ...and a fresh copy of the snapshot's image is made on request.
	fresh := filepath.Join(tmp, "fresh.img")
	b := startVMM(t, nil, "-restore", dir, "-disk", fresh)
	if _, err := io.WriteString(b.stdin, "echo restored-$((40+2))\n"); err != nil {
		t.Fatal(err)
	}
	bpos := b.waitFor(t, "restored-42", 0, 5*time.Minute)
	restored := time.Since(b.start)
	t.Logf("restored shell answered in %v (boot to the shell: %v)", restored.Round(time.Millisecond), booted.Round(time.Millisecond))
	bpos = b.shell(t, "head -c 11 /dev/vda; echo", "at-snapshot", bpos)
	b.powerOff(t, bpos)
}
