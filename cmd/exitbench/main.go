// Command exitbench measures the VM-exit round trip of gokvm-ft against a
// minimal C VMM doing the same KVM_RUN loop (bench/exitloop.c), and against
// a raw Go loop on kvm.VCPU without the machine layer. See BENCHMARKS.md.
//
// All three run the same guest bytes with the same long-mode CPL3 set-up
// (internal/tinyguest): a user-mode loop of N "out %al, $0x80" followed by a
// write to the test-exit port 0x501. Each variant times only its KVM_RUN
// loop, from the first entry to the 0x501 exit, and divides by the number of
// exits (N+1). The variants run alternately, R rounds, in a rotating order,
// so that the host's drift affects all of them alike; the figure of merit is
// the per-round ratio to C, not the absolute time.
//
// Usage: go run ./cmd/exitbench [-n 200000] [-rounds 5]
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gokvm-ft/gokvm-ft/internal/tinyguest"
	"github.com/gokvm-ft/gokvm-ft/kvm"
	"github.com/gokvm-ft/gokvm-ft/machine"
)

const (
	memSize  = 2 << 20 // guest RAM, as the machine tests use
	portSink = 0x80    // POST port: a sink device in the machine
	// vmxTSSAddr is where machine.New puts the Intel real-mode TSS; the C
	// program and the raw loop do the same so that the VMs are alike.
	vmxTSSAddr = 0xfffbd000
)

// guestSrc is the guest: N exits on port 0x80, then one on 0x501 (code 0).
// bench/exitloop.c carries the same bytes as its built-in default.
const guestSrc = `
_start:
	mov $%d, %%ecx
1:	out %%al, $0x80
	dec %%ecx
	jnz 1b
	xor %%eax, %%eax
	mov $0x501, %%dx
	out %%eax, %%dx
	hlt
`

// result is one timed run.
type result struct {
	exits uint64
	ns    uint64
}

func (r result) perExit() float64 { return float64(r.ns) / float64(r.exits) }

type variant struct {
	name string
	run  func(n int) (result, error)
}

func main() {
	n := flag.Int("n", 200000, "port-0x80 exits per run (the guest's loop count)")
	rounds := flag.Int("rounds", 5, "rounds; each runs every variant once, alternating")
	src := flag.String("src", "", "path of exitloop.c (default: bench/exitloop.c in the module)")
	cc := flag.String("cc", "cc", "C compiler")
	flag.Parse()
	if *n <= 0 || *n > 0xffffffff || *rounds <= 0 {
		fatalf("-n must be in [1, 2^32) and -rounds positive")
	}
	if err := run(*n, *rounds, *src, *cc); err != nil {
		fatalf("%v", err)
	}
}

func fatalf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "exitbench: "+format+"\n", args...)
	os.Exit(1)
}

func run(n, rounds int, src, cc string) error {
	if src == "" {
		var err error
		if src, err = findSource(); err != nil {
			return err
		}
	}
	dir, err := os.MkdirTemp("", "exitbench")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)

	printHost()

	bin := filepath.Join(dir, "exitloop")
	ccArgs := []string{"-O2", "-o", bin, src}
	fmt.Printf("build:   %s %s\n", cc, strings.Join(ccArgs, " "))
	if out, err := exec.Command(cc, ccArgs...).CombinedOutput(); err != nil {
		return fmt.Errorf("%s: %v\n%s", cc, err, out)
	}

	// The guest is assembled per N (the loop count is an immediate); the
	// warm-up runs a shorter one.
	warmN := max(n/20, 1000)
	if warmN > n {
		warmN = n
	}
	progs := map[int]*tinyguest.Program{}
	for _, k := range []int{n, warmN} {
		if progs[k] != nil {
			continue
		}
		p, err := tinyguest.Assemble(dir, fmt.Sprintf(guestSrc, k))
		if err != nil {
			return err
		}
		if p.Symbols["_start"] != tinyguest.CodeBase {
			return fmt.Errorf("guest _start at %#x, want %#x", p.Symbols["_start"], tinyguest.CodeBase)
		}
		progs[k] = p
	}
	code := hex.EncodeToString(progs[n].Code)
	fmt.Printf("guest:   %d x \"out %%al, $0x80\" in a CPL3 loop, then \"out %%eax, $0x501\"; %d bytes at %#x: %s\n",
		n, len(progs[n].Code), tinyguest.CodeBase, code)
	fmt.Printf("(a) C:        %s %d %s\n", bin, n, code)
	fmt.Printf("(b) gokvm-ft: machine.New(Config{MemorySize: %d, TestExit: true}) + tinyguest.Load + m.Run, in this process\n", memSize)
	fmt.Printf("(c) raw Go:   kvm.VM/kvm.VCPU + tinyguest.Load, loop on VCPU.Run/ExitReason/IO, in this process\n")
	fmt.Printf("timing:  each variant times its own KVM_RUN loop (first entry to the 0x501 exit) / exits (N+1)\n\n")

	variants := []variant{
		{"C", func(k int) (result, error) { return runC(bin, k, progs[k]) }},
		{"gokvm-ft", func(k int) (result, error) { return runMachine(k, progs[k]) }},
		{"raw Go", func(k int) (result, error) { return runRaw(k, progs[k]) }},
	}

	// Warm-up: page in the binaries, the guest memory paths, the CPU caches.
	for _, v := range variants {
		if _, err := v.run(warmN); err != nil {
			return fmt.Errorf("warm-up %s: %w", v.name, err)
		}
	}

	// per[v][r] is variant v's ns/exit in round r.
	per := make([][]float64, len(variants))
	fmt.Printf("%-6s %14s %14s %14s %12s %12s %12s\n", "round", "C ns/exit", "gokvm-ft", "raw Go", "gokvm-ft/C", "raw Go/C", "gokvm-ft/raw")
	var ratioM, ratioR, ratioMR []float64
	for r := 0; r < rounds; r++ {
		var order []string
		for i := range variants {
			vi := (i + r) % len(variants)
			v := variants[vi]
			res, err := v.run(n)
			if err != nil {
				return fmt.Errorf("round %d, %s: %w", r+1, v.name, err)
			}
			if res.exits != uint64(n)+1 {
				return fmt.Errorf("round %d, %s: %d exits, want %d", r+1, v.name, res.exits, n+1)
			}
			per[vi] = append(per[vi], res.perExit())
			order = append(order, v.name)
		}
		c, m, raw := per[0][r], per[1][r], per[2][r]
		ratioM = append(ratioM, m/c)
		ratioR = append(ratioR, raw/c)
		ratioMR = append(ratioMR, m/raw)
		fmt.Printf("%-6d %14.0f %14.0f %14.0f %12.3f %12.3f %12.3f   (order: %s)\n", r+1, c, m, raw, m/c, raw/c, m/raw, strings.Join(order, ", "))
	}
	fmt.Printf("%-6s %14.0f %14.0f %14.0f %12.3f %12.3f %12.3f\n", "median",
		median(per[0]), median(per[1]), median(per[2]), median(ratioM), median(ratioR), median(ratioMR))
	// The minimum is the least disturbed run of each variant: with the noise
	// of a shared nested host mostly additive, the ratio of minima is the
	// second estimate, robust to a round that one busy spell spoiled.
	fmt.Printf("%-6s %14.0f %14.0f %14.0f %12.3f %12.3f %12.3f   (ratios of the minima)\n", "min",
		slices.Min(per[0]), slices.Min(per[1]), slices.Min(per[2]),
		slices.Min(per[1])/slices.Min(per[0]), slices.Min(per[2])/slices.Min(per[0]), slices.Min(per[1])/slices.Min(per[2]))
	fmt.Printf("\nratio gokvm-ft / C (median of per-round ratios): %.3f  [min %.3f, max %.3f]\n",
		median(ratioM), slices.Min(ratioM), slices.Max(ratioM))
	fmt.Printf("ratio raw Go / C:                                 %.3f  [min %.3f, max %.3f]\n",
		median(ratioR), slices.Min(ratioR), slices.Max(ratioR))
	fmt.Printf("machine-loop overhead, median of per-round differences: %.0f ns/exit over raw Go, raw Go %.0f ns/exit over C\n",
		medianDiff(per[1], per[2]), medianDiff(per[2], per[0]))
	return nil
}

// findSource looks for bench/exitloop.c from the working directory upwards
// to the module root.
func findSource() (string, error) {
	d, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		p := filepath.Join(d, "bench", "exitloop.c")
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			break
		}
		up := filepath.Dir(d)
		if up == d {
			break
		}
		d = up
	}
	return "", errors.New("bench/exitloop.c not found; run from the repository or pass -src")
}

func printHost() {
	var u unix.Utsname
	kernel := "?"
	if err := unix.Uname(&u); err == nil {
		kernel = unix.ByteSliceToString(u.Release[:])
	}
	model := "?"
	if f, err := os.Open("/proc/cpuinfo"); err == nil {
		s := bufio.NewScanner(f)
		for s.Scan() {
			if k, v, ok := strings.Cut(s.Text(), ":"); ok && strings.TrimSpace(k) == "model name" {
				model = strings.TrimSpace(v)
				break
			}
		}
		f.Close()
	}
	fmt.Printf("date:    %s\n", time.Now().UTC().Format("2006-01-02 15:04 MST"))
	fmt.Printf("host:    kernel %s, CPU %q, %d CPUs, %s\n", kernel, model, runtime.NumCPU(), runtime.Version())
}

// runC runs the C VMM on the same code bytes and parses its report.
func runC(bin string, n int, p *tinyguest.Program) (result, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	var stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, bin, strconv.Itoa(n), hex.EncodeToString(p.Code))
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return result{}, fmt.Errorf("%v: %s", err, strings.TrimSpace(stderr.String()))
	}
	kv := map[string]string{}
	for _, f := range strings.Fields(string(out)) {
		if k, v, ok := strings.Cut(f, "="); ok {
			kv[k] = v
		}
	}
	var r result
	if r.exits, err = strconv.ParseUint(kv["exits"], 10, 64); err != nil {
		return result{}, fmt.Errorf("exitloop output %q: %v", out, err)
	}
	if r.ns, err = strconv.ParseUint(kv["ns"], 10, 64); err != nil {
		return result{}, fmt.Errorf("exitloop output %q: %v", out, err)
	}
	if kv["code"] != "0" {
		return result{}, fmt.Errorf("exitloop: guest exit code %s", kv["code"])
	}
	return r, nil
}

// runMachine runs the guest on a full gokvm-ft machine.
func runMachine(n int, p *tinyguest.Program) (result, error) {
	m, err := machine.New(machine.Config{MemorySize: memSize, TestExit: true, Host: machine.DetectHostKind()})
	if err != nil {
		return result{}, err
	}
	defer m.Close()
	if err := tinyguest.Load(m.Memory(), m.VCPU(), p, tinyguest.Options{}); err != nil {
		return result{}, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	t0 := time.Now()
	stop, err := m.Run(ctx)
	ns := time.Since(t0).Nanoseconds()
	if err != nil {
		return result{}, err
	}
	if stop.Kind != machine.StopTestExit || stop.Code != 0 {
		return result{}, fmt.Errorf("machine stopped with %v, want test exit 0", stop)
	}
	return result{exits: m.Exits(), ns: uint64(ns)}, nil
}

// rawMem is guest RAM for the raw loop.
type rawMem []byte

func (m rawMem) WriteAt(p []byte, gpa uint64) error {
	if gpa > uint64(len(m)) || uint64(len(p)) > uint64(len(m))-gpa {
		return fmt.Errorf("write [%#x, +%d) outside guest memory", gpa, len(p))
	}
	copy(m[gpa:], p)
	return nil
}

func (m rawMem) Size() uint64 { return uint64(len(m)) }

// runRaw runs the guest with the kvm package alone: the same ioctls as the
// C program, through Go's syscall path, with none of the machine's device
// bus, clock or interrupt bookkeeping.
func runRaw(n int, p *tinyguest.Program) (result, error) {
	sys, err := kvm.Open()
	if err != nil {
		return result{}, err
	}
	defer sys.Close()
	vm, err := sys.CreateVM()
	if err != nil {
		return result{}, err
	}
	defer vm.Close()
	if vm.CheckExtension(kvm.CapSetTSSAddr) != 0 {
		if err := vm.SetTSSAddr(vmxTSSAddr); err != nil {
			return result{}, err
		}
	}
	buf, err := unix.Mmap(-1, 0, memSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
	if err != nil {
		return result{}, err
	}
	defer unix.Munmap(buf)
	if err := vm.SetUserMemoryRegion(kvm.UserMemoryRegion{Slot: 0, MemorySize: memSize, UserspaceAddr: kvm.HostAddr(buf)}); err != nil {
		return result{}, err
	}
	cpu, err := vm.CreateVCPU(0)
	if err != nil {
		return result{}, err
	}
	defer cpu.Close()
	if err := tinyguest.Load(rawMem(buf), cpu, p, tinyguest.Options{}); err != nil {
		return result{}, err
	}

	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var exits, sink uint64
	t0 := time.Now()
	for {
		if err := cpu.Run(); err != nil {
			return result{}, err
		}
		if cpu.ExitReason() == kvm.ExitIntr {
			continue // a host signal (Go's preemption): not a guest exit
		}
		exits++
		if r := cpu.ExitReason(); r != kvm.ExitIO {
			regs, _ := cpu.GetRegs()
			return result{}, fmt.Errorf("unexpected exit %v after %d exits (rip=%#x)", r, exits, regs.RIP)
		}
		io := cpu.IO()
		if io.Port == portSink {
			sink++
			continue
		}
		if io.Port == machine.PortTestExit && io.Direction == kvm.IOOut {
			break
		}
		return result{}, fmt.Errorf("unexpected port %#x after %d exits", io.Port, exits)
	}
	ns := time.Since(t0).Nanoseconds()
	if sink != uint64(n) {
		return result{}, fmt.Errorf("%d port-0x80 exits, want %d", sink, n)
	}
	return result{exits: exits, ns: uint64(ns)}, nil
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// medianDiff is the median over rounds of a[i]-b[i].
func medianDiff(a, b []float64) float64 {
	d := make([]float64, len(a))
	for i := range a {
		d[i] = a[i] - b[i]
	}
	return median(d)
}
