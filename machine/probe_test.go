package machine_test

import (
	"testing"
	"time"

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
