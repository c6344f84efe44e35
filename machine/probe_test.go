package machine_test

import (
	"fmt"
	"runtime"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gokvm-ft/gokvm-ft/internal/tinyguest"
	"github.com/gokvm-ft/gokvm-ft/machine"
)

// Host probes: what guest instructions the VMM cannot see do on this host.
// They assert only that the guest gets one of the architectural outcomes,
// and log which one (BENCHMARKS.md, "lab host facts"): record/replay
// depends on them.

// TestProbeUserRDTSCWithTSD: with CR4.TSD set, RDTSC at CPL3 must raise
// #GP. Where it does, a guest kernel can keep user programs off the TSC;
// where it does not (the lab host), user-mode RDTSC is a host input no log
// can carry.
func TestProbeUserRDTSCWithTSD(t *testing.T) {
	g := newGuest(t, `
_start:
	mov %cr4, %rax
	or $4, %rax
	mov %rax, %cr4
`+toUser+`
user:
	rdtsc
	mov $1, %eax
`+exitWithEAX+`
vec_13:
	mov $2, %eax
`+exitWithEAX, machine.Config{}, tinyguest.Options{Kernel: true})
	stop := g.run(5 * time.Second)
	switch {
	case stop.Kind == machine.StopTestExit && stop.Code == 1:
		t.Logf("user-mode RDTSC ran natively with CR4.TSD set (host %v)", g.m.Policy().Host)
	case stop.Kind == machine.StopTestExit && stop.Code == 2:
		t.Logf("user-mode RDTSC raised #GP with CR4.TSD set, as architected (host %v)", g.m.Policy().Host)
	default:
		t.Fatalf("stop %v", stop)
	}
}

// TestProbeUserRDRAND: RDRAND at CPL3, whatever CPUID says (the policy
// hides it; the lab host overrides leaf 1): a value, or #UD.
func TestProbeUserRDRAND(t *testing.T) {
	g := newGuest(t, `
_start:
`+toUser+`
user:
	rdrand %rax
	mov $1, %eax
	jc 1f
	mov $3, %eax
1:
`+exitWithEAX+`
vec_6:
	mov $2, %eax
`+exitWithEAX, machine.Config{}, tinyguest.Options{Kernel: true})
	stop := g.run(5 * time.Second)
	switch {
	case stop.Kind == machine.StopTestExit && stop.Code == 1:
		t.Logf("user-mode RDRAND returned a random value although the CPU policy hides it (host %v)", g.m.Policy().Host)
	case stop.Kind == machine.StopTestExit && stop.Code == 3:
		t.Logf("user-mode RDRAND executed but returned no value (CF=0) (host %v)", g.m.Policy().Host)
	case stop.Kind == machine.StopTestExit && stop.Code == 2:
		t.Logf("user-mode RDRAND raised #UD (host %v)", g.m.Policy().Host)
	default:
		t.Fatalf("stop %v", stop)
	}
}

// TestProbeCPUIDAcrossHostCPUs: CPUID is answered by KVM, not by us, so
// whatever it returns is guest input the log cannot see. Run the same
// guest on each host CPU and compare what CPUID tells user mode: a leaf
// that reports which host CPU the vCPU ran on (an APIC ID) makes two runs
// of one guest differ.
func TestProbeCPUIDAcrossHostCPUs(t *testing.T) {
	leaves := []uint32{0, 1, 4, 6, 7, 0xb, 0xd, 0x1f, 0x80000000, 0x80000001, 0x80000008, 0x8000001e}
	src := "_start:\n" + toUser + "user:\n\tmov $0x90000, %rdi\n"
	for _, l := range leaves {
		src += fmt.Sprintf("\tmov $%#x, %%eax; xor %%ecx, %%ecx; cpuid\n\tmov %%eax, (%%rdi); mov %%ebx, 4(%%rdi); mov %%ecx, 8(%%rdi); mov %%edx, 12(%%rdi); add $16, %%rdi\n", l)
	}
	src += "\tmov $1, %eax\n" + exitWithEAX
	n := runtime.NumCPU()
	if n < 2 {
		t.Skip("one host CPU")
	}
	var first []uint32
	for cpu := 0; cpu < n; cpu++ {
		got := func() []uint32 {
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			var set unix.CPUSet
			set.Set(cpu)
			if err := unix.SchedSetaffinity(0, &set); err != nil {
				t.Skipf("sched_setaffinity: %v", err)
			}
			g := newGuest(t, src, machine.Config{}, tinyguest.Options{Kernel: true})
			g.wantExit(5*time.Second, 1)
			var out []uint32
			for i := range leaves {
				for r := 0; r < 2; r++ {
					v := g.read64(0x90000 + uint64(16*i+8*r))
					out = append(out, uint32(v), uint32(v>>32))
				}
			}
			return out
		}()
		if first == nil {
			first = got
			continue
		}
		for i := range got {
			if got[i] != first[i] {
				t.Logf("CPUID leaf %#x %s differs between host CPU 0 and %d: %#x, %#x (host %v)",
					leaves[i/4], [4]string{"eax", "ebx", "ecx", "edx"}[i%4], cpu, first[i], got[i], machine.DetectHostKind())
			}
		}
	}
}

// TestProbeUserAVXWithoutOSXSAVE: with the guest's CR4.OSXSAVE clear (a
// kernel booted with noxsave, as the lab command line has), CPUID leaf 1
// must say OSXSAVE=0 and XGETBV must raise #UD, so programs do not use
// AVX state the kernel does not save. Where user-mode CPUID shows OSXSAVE
// and XGETBV answers (the lab host runs CPL3 natively, with its own CR4),
// a Go program in the guest uses AVX, and the kernel's context switches,
// saving only the XMM halves, corrupt its YMM registers.
func TestProbeUserAVXWithoutOSXSAVE(t *testing.T) {
	g := newGuest(t, `
_start:
	mov %cr4, %rax
	and $~(1 << 18), %rax
	mov %rax, %cr4
`+toUser+`
user:
	mov $1, %eax
	xor %ecx, %ecx
	cpuid
	mov %ecx, %ebx
	shr $27, %ebx
	and $1, %ebx
	shl $8, %ebx
	xor %ecx, %ecx
	xgetbv
	and $0xff, %eax
	or %ebx, %eax
`+exitWithEAX+`
vec_6:
	mov $0x1000, %eax
`+exitWithEAX, machine.Config{}, tinyguest.Options{Kernel: true})
	stop := g.run(5 * time.Second)
	if stop.Kind != machine.StopTestExit {
		t.Fatalf("stop %v", stop)
	}
	switch c := stop.Code; {
	case c == 0x1000:
		t.Logf("user-mode XGETBV raised #UD with CR4.OSXSAVE clear, as architected (host %v)", g.m.Policy().Host)
	default:
		t.Logf("user-mode CPUID.1 OSXSAVE=%d and XGETBV ran with CR4.OSXSAVE clear: XCR0 low byte %#x (AVX state %v) (host %v)",
			c>>8&1, c&0xff, c&6 == 6, g.m.Policy().Host)
	}
}
