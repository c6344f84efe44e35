// Command netbench measures TCP throughput between the host and the guest,
// in both directions, for gokvm-ft and for QEMU with virtio-net on the same
// kernel, initramfs and command line, alternating the two in one run, and
// prints the ratios (make bench-net).
//
// Each VMM runs in a network namespace of its own, made for the run and
// deleted after it, with a tap device gk0 (10.0.2.2/24 on the host side)
// that the VMM opens; the guest configures eth0 as 10.0.2.15/24 and starts
// the bulk-transfer service of images/uroot/cmds/gokvm-counter
// (gokvm.bulk=PORT). The host side of every transfer is a socket made
// inside that namespace by this process. Host->guest: "sink\n" and N
// bytes, half-close, until the guest's byte count comes back. Guest->host:
// "source N\n", until EOF after N bytes. One boot per VMM per round (a
// boot takes about a minute on the lab host) and several transfers per
// boot.
package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gokvm-ft/gokvm-ft/internal/benchutil"
	"github.com/gokvm-ft/gokvm-ft/machine"
)

const (
	hostAddr  = "10.0.2.2"
	guestAddr = "10.0.2.15"
	guestMAC  = "52:54:00:12:34:56"
	tapName   = "gk0"
	bulkPort  = 7778
	warmup    = 1 << 20 // bytes of the untimed first transfer each way
	// readyMarker is what gokvm-uinit prints once the bulk service listens.
	readyMarker = "gokvm: bulk service listening on tcp port"
)

// qemuNoOffloads switches off every offload and mergeable receive buffers
// on QEMU's virtio-net, as gokvm-ft's virtio-net offers none of them.
const qemuNoOffloads = "csum=off,guest_csum=off,gso=off,guest_tso4=off,guest_tso6=off,guest_ecn=off,guest_ufo=off," +
	"host_tso4=off,host_tso6=off,host_ecn=off,host_ufo=off,mrg_rxbuf=off"

func main() {
	rounds := flag.Int("rounds", 3, "alternating rounds (one boot of each VMM per round)")
	transfers := flag.Int("transfers", 3, "transfers per direction per boot")
	mib := flag.Int("mib", 2, "MiB per transfer (2 takes about 13 s on the lab host; use hundreds on bare metal)")
	images := flag.String("images", "images/out", "directory with vmlinux and initramfs.cpio")
	mem := flag.String("mem", "256M", "guest memory for both")
	qemu := flag.String("qemu", "qemu-system-x86_64", "QEMU binary")
	offloads := flag.Bool("qemu-offloads", false, "give QEMU's virtio-net its default offloads (checksum, TSO, mergeable buffers) instead of none")
	appendArgs := flag.String("append", "", "more kernel parameters, for both guests")
	timeout := flag.Duration("timeout", 5*time.Minute, "limit on every wait: one boot until the guest service listens, one transfer")
	hostFlag := flag.String("host", "auto", "host kind for the command line: auto, lab or bare-metal")
	only := flag.String("only", "", "run only this VMM (gokvm-ft or qemu): no ratios")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	b := &bench{rounds: *rounds, transfers: *transfers, bytes: int64(*mib) << 20, images: *images, mem: *mem,
		qemu: *qemu, offloads: *offloads, appendArgs: *appendArgs, timeout: *timeout, only: *only}
	if err := b.run(ctx, *hostFlag); err != nil {
		fmt.Fprintln(os.Stderr, "netbench:", err)
		os.Exit(1)
	}
}

type bench struct {
	rounds, transfers int
	bytes             int64
	images, mem, qemu string
	offloads          bool
	appendArgs        string
	timeout           time.Duration
	only              string
	seq               int // namespaces made so far
}

type contender struct {
	name string
	args []string
}

// result is one boot's transfers, in MiB/s.
type result struct {
	boot     time.Duration // VMM start until the guest's bulk service listens
	h2g, g2h []float64
}

func (b *bench) run(ctx context.Context, hostFlag string) error {
	host, err := machine.ParseHostKind(hostFlag)
	if err != nil {
		return err
	}
	if b.rounds < 1 || b.transfers < 1 || b.bytes < 1 {
		return errors.New("-rounds, -transfers and -mib must be at least 1")
	}
	if os.Geteuid() != 0 {
		return errors.New("needs root (network namespaces, tap devices)")
	}
	for _, f := range []string{"/dev/kvm", "/dev/net/tun"} {
		if _, err := os.Stat(f); err != nil {
			return err
		}
	}
	vmlinux, initrd := filepath.Join(b.images, "vmlinux"), filepath.Join(b.images, "initramfs.cpio")
	for _, f := range []string{vmlinux, initrd} {
		if _, err := os.Stat(f); err != nil {
			return fmt.Errorf("%v (run make images)", err)
		}
	}
	tmp, err := os.MkdirTemp("", "netbench")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	bin := filepath.Join(tmp, "gokvm-ft")
	if out, err := exec.CommandContext(ctx, "go", "build", "-o", bin, "./cmd/gokvm-ft").CombinedOutput(); err != nil {
		return fmt.Errorf("go build: %v\n%s", err, out)
	}
	// The command line gokvm-ft itself would use on this host (as
	// cmd/bootbench), without its virtio_mmio.device= part: each VMM adds
	// that for its own NIC.
	m, err := machine.New(machine.Config{MemorySize: 16 << 20, Host: host})
	if err != nil {
		return err
	}
	base := m.KernelCmdline("")
	m.Close()
	extra := strings.TrimSpace(b.appendArgs + fmt.Sprintf(" gokvm.ip=%s/24,%s gokvm.counter=off gokvm.bulk=%d", guestAddr, hostAddr, bulkPort))
	cmdline := base + " " + extra
	// The guest runs with nolapic, and QEMU leaves the local APIC's LINT0
	// masked after reset (firmware such as SeaBIOS would set it to ExtINT;
	// microvm's direct boot has none): the 8259's interrupts would never
	// reach the CPU, and the guest hangs at its first sleep. Without a
	// local APIC (-apic, which needs QEMU's userspace PIC and PIT, like
	// gokvm-ft's, and no async-PF interrupt) the 8259 drives the CPU
	// directly.
	qemuCPU := "host,-apic,-x2apic,-kvm-asyncpf-int"
	if host == machine.HostLabPVM {
		// The lab host refuses QEMU's write of IA32_ARCH_CAPABILITIES.
		qemuCPU += ",-arch-capabilities"
	}
	nic := "virtio-net-device,netdev=n0,mac=" + guestMAC
	if !b.offloads {
		nic += "," + qemuNoOffloads
	}
	cs := []contender{
		{"gokvm-ft", []string{bin, "-kernel", vmlinux, "-initrd", initrd, "-mem", b.mem, "-host", host.String(),
			"-append", extra, "-net", "tap=" + tapName + ",mac=" + guestMAC}},
		{"qemu", []string{b.qemu, "-M", "microvm,x-option-roms=off,pit=on,pic=on,rtc=on,isa-serial=on,acpi=off",
			"-accel", "kvm,kernel-irqchip=off", "-cpu", qemuCPU, "-smp", "1", "-m", b.mem, "-nodefaults", "-no-user-config",
			"-nographic", "-no-reboot", "-serial", "stdio",
			"-kernel", vmlinux, "-initrd", initrd, "-append", cmdline,
			"-netdev", "tap,id=n0,ifname=" + tapName + ",script=no,downscript=no", "-device", nic}},
	}
	if b.only != "" {
		cs = slices.DeleteFunc(cs, func(c contender) bool { return c.name != b.only })
		if len(cs) == 0 {
			return fmt.Errorf("-only %q: want gokvm-ft or qemu", b.only)
		}
	}
	fmt.Printf("host: %s, %s, %d CPUs; kind %v\n", benchutil.Uname(), benchutil.CPUModel(), runtime.NumCPU(), host)
	fmt.Printf("kernel command line (each VMM adds virtio_mmio.device= for its NIC): %s\n", cmdline)
	fmt.Printf("per VMM run: ip netns add NS; ip -n NS tuntap add dev %s mode tap; ip -n NS addr add %s/24 dev %s; ip -n NS link set %s up; ip -n NS link set lo up\n",
		tapName, hostAddr, tapName, tapName)
	for _, c := range cs {
		fmt.Printf("%s: ip netns exec NS %s\n", c.name, strings.Join(benchutil.Quote(c.args), " "))
	}
	fmt.Printf("transfers: %d MiB each, %d per direction per boot after an untimed %d KiB one each way; host side in NS, guest %s:%d; MiB/s = 2^20 bytes/s\n\n",
		b.bytes>>20, b.transfers, min(b.bytes, warmup)>>10, guestAddr, bulkPort)

	res := map[string][]result{}
	for r := 0; r < b.rounds; r++ {
		order := []int{0, 1}
		if r%2 == 1 {
			order = []int{1, 0}
		}
		for _, i := range order {
			if i >= len(cs) {
				continue
			}
			c := cs[i]
			fmt.Printf("round %d, %s:", r+1, c.name)
			got, err := b.runVM(ctx, c)
			if err != nil {
				fmt.Println()
				return fmt.Errorf("round %d, %s: %w", r+1, c.name, err)
			}
			fmt.Printf(" ready after %.1fs; host->guest %s; guest->host %s MiB/s\n", got.boot.Seconds(), list(got.h2g), list(got.g2h))
			res[c.name] = append(res[c.name], got)
		}
	}
	b.report(cs, res)
	return nil
}

// report prints one row per round (each boot's median transfer) and the
// medians over rounds, with the ratios gokvm-ft / QEMU.
func (b *bench) report(cs []contender, res map[string][]result) {
	fmt.Printf("\nMiB/s, median of each boot's %d transfers; ratio = gokvm-ft / QEMU (higher is better for gokvm-ft)\n", b.transfers)
	two := len(cs) == 2
	if two {
		fmt.Printf("%-6s | %12s %12s %8s | %12s %12s %8s\n", "", "host->guest", "", "", "guest->host", "", "")
		fmt.Printf("%-6s | %12s %12s %8s | %12s %12s %8s\n", "round", "gokvm-ft", "qemu", "ratio", "gokvm-ft", "qemu", "ratio")
	} else {
		fmt.Printf("%-6s | %12s | %12s   (%s)\n", "round", "host->guest", "guest->host", cs[0].name)
	}
	var rh, rg, gh, gg, qh, qg []float64
	for r := 0; r < b.rounds; r++ {
		if !two {
			x := res[cs[0].name][r]
			fmt.Printf("%-6d | %12.3f | %12.3f\n", r+1, median(x.h2g), median(x.g2h))
			gh, gg = append(gh, median(x.h2g)), append(gg, median(x.g2h))
			continue
		}
		g, q := res["gokvm-ft"][r], res["qemu"][r]
		gh, gg = append(gh, median(g.h2g)), append(gg, median(g.g2h))
		qh, qg = append(qh, median(q.h2g)), append(qg, median(q.g2h))
		rh, rg = append(rh, gh[r]/qh[r]), append(rg, gg[r]/qg[r])
		fmt.Printf("%-6d | %12.3f %12.3f %8.3f | %12.3f %12.3f %8.3f\n", r+1, gh[r], qh[r], rh[r], gg[r], qg[r], rg[r])
	}
	if !two {
		fmt.Printf("%-6s | %12.3f | %12.3f\n", "median", median(gh), median(gg))
		return
	}
	fmt.Printf("%-6s | %12.3f %12.3f %8.3f | %12.3f %12.3f %8.3f\n", "median", median(gh), median(qh), median(rh), median(gg), median(qg), median(rg))
	fmt.Printf("\nratio gokvm-ft / QEMU (median of per-round ratios): host->guest %.3f, guest->host %.3f\n", median(rh), median(rg))
}

// runVM boots one VMM in a fresh namespace, waits for the guest's bulk
// service and runs the transfers; the VMM is killed and the namespace
// deleted before it returns.
func (b *bench) runVM(ctx context.Context, c contender) (res result, err error) {
	b.seq++
	ns := &netns{name: fmt.Sprintf("netbench-%d-%d", os.Getpid(), b.seq)}
	if err := ns.create(); err != nil {
		return res, err
	}
	defer func() {
		if derr := ns.delete(); derr != nil && err == nil {
			err = derr
		}
	}()
	vm, err := startVM(ns, c.args)
	if err != nil {
		return res, err
	}
	defer vm.stop()

	// Boot: wait for the marker on the console.
	timer := time.NewTimer(b.timeout)
	defer timer.Stop()
	select {
	case <-vm.ready:
		res.boot = time.Since(vm.start)
	case <-vm.exited:
		return res, vm.failure("exited before the guest's bulk service listened")
	case <-timer.C:
		return res, vm.failure(fmt.Sprintf("the guest's bulk service did not listen within %v", b.timeout))
	case <-ctx.Done():
		return res, ctx.Err()
	}
	if vm.serviceErr != "" {
		return res, vm.failure("guest: " + vm.serviceErr)
	}
	addr := net.JoinHostPort(guestAddr, strconv.Itoa(bulkPort))
	// Untimed warm-up, one each way: the first transfer after boot is
	// slower (the guest program's buffers are faulted in, TCP windows grow).
	for _, dir := range []string{"h2g", "g2h"} {
		if _, err := b.transfer(ctx, vm, ns, addr, dir, min(b.bytes, warmup)); err != nil {
			return res, fmt.Errorf("warm-up: %w", err)
		}
	}
	for i := 0; i < b.transfers; i++ {
		for _, dir := range []string{"h2g", "g2h"} {
			rate, err := b.transfer(ctx, vm, ns, addr, dir, b.bytes)
			if err != nil {
				return res, err
			}
			if dir == "h2g" {
				res.h2g = append(res.h2g, rate)
			} else {
				res.g2h = append(res.g2h, rate)
			}
		}
	}
	return res, nil
}

// transfer runs one transfer of n bytes in direction dir ("h2g": to the
// guest's sink, "g2h": from its source) and returns its rate in MiB/s. It
// gives up after the timeout, when the VMM exits or when ctx is cancelled.
func (b *bench) transfer(ctx context.Context, vm *vmm, ns *netns, addr, dir string, n int64) (float64, error) {
	conn, err := ns.dial(addr, b.timeout)
	if err != nil {
		return 0, vm.failure(fmt.Sprintf("connecting to %s: %v", addr, err))
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(b.timeout))
	type outcome struct {
		d   time.Duration
		err error
	}
	done := make(chan outcome, 1)
	go func() {
		var o outcome
		if dir == "h2g" {
			o.d, o.err = sinkTo(conn, n)
		} else {
			o.d, o.err = sourceFrom(conn, n)
		}
		done <- o
	}()
	name := map[string]string{"h2g": "host->guest", "g2h": "guest->host"}[dir]
	select {
	case o := <-done:
		if o.err != nil {
			if errors.Is(o.err, os.ErrDeadlineExceeded) {
				o.err = fmt.Errorf("not done within %v", b.timeout)
			}
			return 0, vm.failure(fmt.Sprintf("%s transfer of %d bytes: %v", name, n, o.err))
		}
		return float64(n) / (1 << 20) / o.d.Seconds(), nil
	case <-vm.exited:
		conn.Close()
		<-done
		return 0, vm.failure(fmt.Sprintf("exited during a %s transfer", name))
	case <-ctx.Done():
		conn.Close()
		<-done
		return 0, ctx.Err()
	}
}

// sinkTo sends "sink\n" and n bytes, shuts down its side and waits for the
// guest's byte count, which must be n. The time runs from the first byte
// sent to the count received.
func sinkTo(conn net.Conn, n int64) (time.Duration, error) {
	buf := make([]byte, 1<<20)
	start := time.Now()
	if _, err := io.WriteString(conn, "sink\n"); err != nil {
		return 0, err
	}
	for left := n; left > 0; {
		k := min(left, int64(len(buf)))
		if _, err := conn.Write(buf[:k]); err != nil {
			return 0, err
		}
		left -= k
	}
	if err := conn.(*net.TCPConn).CloseWrite(); err != nil {
		return 0, err
	}
	line, err := bufio.NewReader(conn).ReadString('\n')
	d := time.Since(start)
	if err != nil {
		return 0, fmt.Errorf("reading the guest's count: %w (got %q)", err, line)
	}
	if got := strings.TrimSuffix(line, "\n"); got != strconv.FormatInt(n, 10) {
		return 0, fmt.Errorf("the guest counted %q, sent %d", got, n)
	}
	return d, nil
}

// sourceFrom asks for n bytes and reads until EOF, which must come after
// exactly n. The time runs from the request sent to EOF.
func sourceFrom(conn net.Conn, n int64) (time.Duration, error) {
	buf := make([]byte, 1<<20)
	start := time.Now()
	if _, err := fmt.Fprintf(conn, "source %d\n", n); err != nil {
		return 0, err
	}
	var got int64
	for {
		k, err := conn.Read(buf)
		got += int64(k)
		if err == io.EOF {
			break
		}
		if err != nil {
			return 0, fmt.Errorf("after %d bytes: %w", got, err)
		}
	}
	d := time.Since(start)
	if got != n {
		return 0, fmt.Errorf("got %d bytes, asked for %d", got, n)
	}
	return d, nil
}

// netns is a network namespace made by this program, with a tap device
// for the VMM.
type netns struct{ name string }

func (n *netns) create() error {
	if err := ipCmd("netns", "add", n.name); err != nil {
		return err
	}
	for _, args := range [][]string{
		{"tuntap", "add", "dev", tapName, "mode", "tap"},
		{"addr", "add", hostAddr + "/24", "dev", tapName},
		{"link", "set", tapName, "up"},
		{"link", "set", "lo", "up"},
	} {
		if err := ipCmd(append([]string{"-n", n.name}, args...)...); err != nil {
			n.delete()
			return err
		}
	}
	return nil
}

func (n *netns) delete() error { return ipCmd("netns", "del", n.name) }

func ipCmd(args ...string) error {
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return nil
}

// dial connects to addr from a socket made inside the namespace: on an OS
// thread that has switched into it and is never given back (it exits with
// its goroutine).
func (n *netns) dial(addr string, timeout time.Duration) (net.Conn, error) {
	type dialed struct {
		c   net.Conn
		err error
	}
	ch := make(chan dialed, 1)
	go func() {
		runtime.LockOSThread() // never unlocked
		fd, err := unix.Open("/run/netns/"+n.name, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			ch <- dialed{nil, err}
			return
		}
		defer unix.Close(fd)
		if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
			ch <- dialed{nil, fmt.Errorf("setns %s: %w", n.name, err)}
			return
		}
		c, err := net.DialTimeout("tcp", addr, timeout)
		ch <- dialed{c, err}
	}()
	d := <-ch
	return d.c, d.err
}

// vmm is a VMM started with `ip netns exec NS ...` (which execs it: the
// process is the VMM itself).
type vmm struct {
	cmd    *exec.Cmd
	start  time.Time
	ready  chan struct{} // closed when the console shows readyMarker
	exited chan struct{} // closed when the process has exited
	err    error         // its exit status, once exited is closed

	mu         sync.Mutex
	console    tail
	stderr     tail
	serviceErr string // a "not started" line from gokvm-uinit
}

func startVM(ns *netns, args []string) (*vmm, error) {
	v := &vmm{ready: make(chan struct{}), exited: make(chan struct{}), console: tail{max: 4 << 10}, stderr: tail{max: 4 << 10}}
	v.cmd = exec.Command("ip", append([]string{"netns", "exec", ns.name}, args...)...)
	// If this program dies, so does the VMM. The parent-death signal comes
	// when the thread that started the VMM exits, and Go ends threads (those
	// of the namespace goroutines, for one), so the VMM is started from a
	// locked thread that lives until the VMM has exited.
	v.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out, err := v.cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	v.cmd.Stderr = writerFunc(func(p []byte) {
		v.mu.Lock()
		v.stderr.write(p)
		v.mu.Unlock()
	})
	consoleDone := make(chan struct{})
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: this thread ends after the VMM
		v.start = time.Now()
		if err := v.cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		<-consoleDone
		v.err = v.cmd.Wait()
		close(v.exited)
	}()
	if err := <-started; err != nil {
		return nil, err
	}
	go func() {
		defer close(consoleDone)
		r := bufio.NewReader(out)
		readySeen := false
		for {
			line, err := r.ReadString('\n')
			v.mu.Lock()
			v.console.write([]byte(line))
			if !readySeen && (strings.Contains(line, readyMarker) || strings.Contains(line, "bulk service not started") ||
				strings.Contains(line, "bulk services not started")) {
				readySeen = true
				if !strings.Contains(line, readyMarker) {
					v.serviceErr = strings.TrimSpace(line)
				}
				close(v.ready)
			}
			v.mu.Unlock()
			if err != nil {
				return
			}
		}
	}()
	return v, nil
}

// stop kills the VMM (if it still runs) and waits for it.
func (v *vmm) stop() {
	select {
	case <-v.exited:
		return
	default:
	}
	v.cmd.Process.Kill()
	select {
	case <-v.exited:
	case <-time.After(30 * time.Second):
		fmt.Fprintf(os.Stderr, "netbench: VMM pid %d not gone 30s after SIGKILL\n", v.cmd.Process.Pid)
	}
}

// failure is an error about this VMM with its exit status (if it exited)
// and the tails of its stderr and console.
func (v *vmm) failure(what string) error {
	status := "still running"
	select {
	case <-v.exited:
		status = fmt.Sprintf("exit: %v", v.err)
		if v.err == nil {
			status = "exit status 0"
		}
	default:
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	return fmt.Errorf("%s after %.1fs (%s)\n--- stderr (tail) ---\n%s\n--- console (tail) ---\n%s",
		what, time.Since(v.start).Seconds(), status, v.stderr.String(), v.console.String())
}

// tail keeps the last max bytes written to it.
type tail struct {
	max int
	b   []byte
}

func (t *tail) write(p []byte) {
	t.b = append(t.b, p...)
	if len(t.b) > t.max {
		t.b = append(t.b[:0], t.b[len(t.b)-t.max:]...)
	}
}

func (t *tail) String() string { return strings.TrimRight(string(t.b), "\n") }

type writerFunc func([]byte)

func (f writerFunc) Write(p []byte) (int, error) { f(p); return len(p), nil }

func list(v []float64) string {
	s := make([]string, len(v))
	for i, x := range v {
		s[i] = fmt.Sprintf("%.3f", x)
	}
	return strings.Join(s, " ")
}

func median(f []float64) float64 {
	if len(f) == 0 {
		return 0
	}
	s := slices.Clone(f)
	slices.Sort(s)
	if len(s)%2 == 0 {
		return (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	return s[len(s)/2]
}
