// Command bootbench measures boot time, start to first userspace output,
// for gokvm-ft and for QEMU on the same kernel, initramfs and command line,
// alternating the two in one run, and prints the ratio (make bench-boot).
//
// QEMU runs in its fastest fair setup: the microvm machine without option
// ROMs, and PVH direct boot of the same vmlinux when the kernel has a PVH
// entry (else the bzImage through microvm's qboot firmware). Both get one
// vCPU, the same memory, the legacy PIC/PIT/RTC and a 16550 console. QEMU
// gets no local APIC and its userspace PIC and PIT (kernel-irqchip=off),
// as gokvm-ft has: with a local APIC, QEMU leaves LINT0 masked (firmware's
// job, and direct boot runs none), and a guest booted with nolapic then
// gets no 8259 interrupt at all, timer tick included.
package main

import (
	"bufio"
	"bytes"
	"context"
	"debug/elf"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"github.com/gokvm-ft/gokvm-ft/internal/benchutil"
	"github.com/gokvm-ft/gokvm-ft/machine"
)

func main() {
	rounds := flag.Int("rounds", 3, "alternating rounds")
	images := flag.String("images", "images/out", "directory with vmlinux, bzImage and initramfs.cpio")
	marker := flag.String("marker", "Welcome to u-root", "console text that marks the first userspace output")
	mem := flag.String("mem", "256M", "guest memory for both")
	qemu := flag.String("qemu", "qemu-system-x86_64", "QEMU binary")
	timeout := flag.Duration("timeout", 10*time.Minute, "give up on one boot after this long")
	hostFlag := flag.String("host", "auto", "host kind for the command line: auto, lab or bare-metal")
	flag.Parse()
	if err := run(*rounds, *images, *marker, *mem, *qemu, *hostFlag, *timeout); err != nil {
		fmt.Fprintln(os.Stderr, "bootbench:", err)
		os.Exit(1)
	}
}

type contender struct {
	name string
	args []string
}

func run(rounds int, images, marker, mem, qemu, hostFlag string, timeout time.Duration) error {
	host, err := machine.ParseHostKind(hostFlag)
	if err != nil {
		return err
	}
	vmlinux, bz, initrd := filepath.Join(images, "vmlinux"), filepath.Join(images, "bzImage"), filepath.Join(images, "initramfs.cpio")
	for _, f := range []string{vmlinux, initrd} {
		if _, err := os.Stat(f); err != nil {
			return fmt.Errorf("%v (run make images)", err)
		}
	}
	tmp, err := os.MkdirTemp("", "bootbench")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	bin := filepath.Join(tmp, "gokvm-ft")
	if out, err := exec.Command("go", "build", "-o", bin, "./cmd/gokvm-ft").CombinedOutput(); err != nil {
		return fmt.Errorf("go build: %v\n%s", err, out)
	}
	// The command line gokvm-ft itself would use on this host, TSC
	// frequency included.
	m, err := machine.New(machine.Config{MemorySize: 16 << 20, Host: host})
	if err != nil {
		return err
	}
	cmdline := m.KernelCmdline("")
	m.Close()
	qemuKernel, boot := bz, "bzImage via microvm's qboot"
	if hasPVHNote(vmlinux) {
		qemuKernel, boot = vmlinux, "PVH direct boot of vmlinux"
	}
	// No local APIC (see above); no KVM async page faults (their MSR
	// needs the in-kernel LAPIC).
	qemuCPU := "host,-apic,-x2apic,-kvm-asyncpf-int"
	if host == machine.HostLabPVM {
		// The lab host refuses QEMU's write of IA32_ARCH_CAPABILITIES.
		qemuCPU += ",-arch-capabilities"
	}
	cs := []contender{
		{"gokvm-ft", []string{bin, "-kernel", vmlinux, "-initrd", initrd, "-mem", mem, "-host", host.String()}},
		{"qemu", []string{qemu, "-M", "microvm,x-option-roms=off,pit=on,pic=on,rtc=on,isa-serial=on,acpi=off",
			"-accel", "kvm,kernel-irqchip=off", "-cpu", qemuCPU, "-smp", "1", "-m", mem, "-nodefaults", "-no-user-config",
			"-nographic", "-no-reboot", "-serial", "stdio",
			"-kernel", qemuKernel, "-initrd", initrd, "-append", cmdline}},
	}
	fmt.Printf("host: %s, %s, %d CPUs; kind %v\n", benchutil.Uname(), benchutil.CPUModel(), runtime.NumCPU(), host)
	fmt.Printf("kernel command line: %s\n", cmdline)
	fmt.Printf("QEMU boots the %s\n", boot)
	for _, c := range cs {
		fmt.Printf("%s: %s\n", c.name, strings.Join(benchutil.Quote(c.args), " "))
	}
	times := map[string][]time.Duration{}
	var ratios []float64
	fmt.Printf("\n%-6s %12s %12s %8s\n", "round", "gokvm-ft", "qemu", "ratio")
	for r := 0; r < rounds; r++ {
		order := []int{0, 1}
		if r%2 == 1 {
			order = []int{1, 0}
		}
		got := map[string]time.Duration{}
		for _, i := range order {
			d, err := bootOnce(cs[i].args, marker, timeout)
			if err != nil {
				return fmt.Errorf("%s: %w", cs[i].name, err)
			}
			got[cs[i].name] = d
			times[cs[i].name] = append(times[cs[i].name], d)
		}
		ratio := got["gokvm-ft"].Seconds() / got["qemu"].Seconds()
		ratios = append(ratios, ratio)
		fmt.Printf("%-6d %11.2fs %11.2fs %8.3f\n", r+1, got["gokvm-ft"].Seconds(), got["qemu"].Seconds(), ratio)
	}
	fmt.Printf("%-6s %11.2fs %11.2fs %8.3f\n", "median", benchutil.Median(times["gokvm-ft"]).Seconds(), benchutil.Median(times["qemu"]).Seconds(), benchutil.Median(ratios))
	return nil
}

// bootOnce starts a VMM, waits for marker on its console and kills it.
func bootOnce(args []string, marker string, timeout time.Duration) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, args[0], args[1:]...)
	cmd.Stdin = nil
	out, err := cmd.StdoutPipe()
	if err != nil {
		return 0, err
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return 0, err
	}
	defer func() {
		cmd.Process.Kill()
		cmd.Wait()
	}()
	found := make(chan time.Duration, 1)
	eof := make(chan struct{})
	go func() {
		defer close(eof)
		r := bufio.NewReader(out)
		var seen []byte
		buf := make([]byte, 4096)
		for {
			n, err := r.Read(buf)
			seen = append(seen, buf[:n]...)
			if bytes.Contains(seen, []byte(marker)) {
				found <- time.Since(start)
				io.Copy(io.Discard, r)
				return
			}
			if len(seen) > 1<<20 {
				seen = seen[len(seen)-len(marker):]
			}
			if err != nil {
				return
			}
		}
	}()
	select {
	case d := <-found:
		return d, nil
	case <-eof:
		select {
		case d := <-found:
			return d, nil
		default:
		}
		return 0, fmt.Errorf("exited before %q; stderr: %s", marker, stderr.String())
	case <-ctx.Done():
		return 0, fmt.Errorf("no %q within %v; stderr: %s", marker, timeout, stderr.String())
	}
}

// hasPVHNote reports whether an ELF kernel carries the Xen PVH entry note
// (XEN_ELFNOTE_PHYS32_ENTRY) that QEMU needs to boot it directly.
func hasPVHNote(path string) bool {
	f, err := elf.Open(path)
	if err != nil {
		return false
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type != elf.PT_NOTE {
			continue
		}
		b, err := io.ReadAll(p.Open())
		if err != nil {
			continue
		}
		for len(b) >= 12 {
			nsz, dsz, typ := le32(b), le32(b[4:]), le32(b[8:])
			name := b[12:min(len(b), 12+int(nsz))]
			if typ == 18 && strings.HasPrefix(string(name), "Xen") {
				return true
			}
			adv := 12 + align4(int(nsz)) + align4(int(dsz))
			if adv > len(b) || adv <= 0 {
				break
			}
			b = b[adv:]
		}
	}
	return false
}

func le32(b []byte) uint32 {
	return uint32(b[0]) | uint32(b[1])<<8 | uint32(b[2])<<16 | uint32(b[3])<<24
}
func align4(n int) int { return (n + 3) &^ 3 }
