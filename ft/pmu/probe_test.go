package pmu

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func opens() error { return nil }

// TestProbeSimulated runs Probe against simulated hosts, good and faulty.
func TestProbeSimulated(t *testing.T) {
	cases := []struct {
		name   string
		probes func() Probes
		reason string // "" if usable, else a substring of the reason
	}{
		{name: "good", probes: func() Probes {
			l := newSimLoop(1000, 1)
			l.g.skidMax = 100
			return Probes{Open: opens, Debug: newSimDebug(), Loop: l}
		}},
		{name: "no PMU", probes: func() Probes {
			return Probes{Open: func() error {
				return fmt.Errorf("kvm: perf_event_open(raw event 0x5100d1, guest only): %w", unix.ENOENT)
			}, Debug: newSimDebug(), Loop: newSimLoop(1000, 1)}
		}, reason: "no PMU: kvm: perf_event_open"},
		{name: "paranoid", probes: func() Probes {
			return Probes{Open: func() error { return unix.EACCES }}
		}, reason: "not permitted"},
		{name: "no open check", probes: func() Probes {
			return Probes{Debug: newSimDebug(), Loop: newSimLoop(1000, 1)}
		}, reason: "no branch counter given"},
		{name: "no debug guest", probes: func() Probes {
			return Probes{Open: opens, Loop: newSimLoop(1000, 1)}
		}, reason: "guest debugging not checked"},
		{name: "no loop", probes: func() Probes {
			return Probes{Open: opens, Debug: newSimDebug()}
		}, reason: "exactness not checked"},
		{name: "single step does not stop", probes: func() Probes {
			d := newSimDebug()
			d.inertStep = true
			return Probes{Open: opens, Debug: d, Loop: newSimLoop(1000, 1)}
		}, reason: "single step stopped by other"},
		{name: "breakpoint does not stop", probes: func() Probes {
			d := newSimDebug()
			d.inertBP = true
			return Probes{Open: opens, Debug: d, Loop: newSimLoop(1000, 1)}
		}, reason: "breakpoint at 0x7c06: stopped by other"},
		{name: "inert debugging", probes: func() Probes {
			d := newSimDebug()
			d.inertStep, d.inertBP = true, true
			return Probes{Open: opens, Debug: d, Loop: newSimLoop(1000, 1)}
		}, reason: "guest debugging does not work"},
		{name: "exits overcount", probes: func() Probes {
			l := newSimLoop(1000, 2)
			l.g.exitBias = 0.001 // about one pass in two overcounts
			return Probes{Open: opens, Debug: newSimDebug(), Loop: l}
		}, reason: "counter not exact: pass"},
		{name: "locked instructions overcount", probes: func() Probes {
			l := newSimLoop(1000, 3)
			l.g.lockBias = true
			return Probes{Open: opens, Debug: newSimDebug(), Loop: l}
		}, reason: "counted 2000 branches, the loop retires 1000"},
		{name: "skid beyond bound", probes: func() Probes {
			l := newSimLoop(1000, 4)
			l.g.skidMin, l.g.skidMax = 150, 150
			return Probes{Open: opens, Debug: newSimDebug(), Loop: l, Skid: 100}
		}, reason: "skid 150 beyond 100"},
		{name: "loop too short for skid", probes: func() Probes {
			return Probes{Open: opens, Debug: newSimDebug(), Loop: newSimLoop(1000, 1), Skid: 10000}
		}, reason: "counter exactness not checked: probe loop too short"},
		{name: "one pass of five overcounts", probes: func() Probes {
			l := newSimLoop(1000, 6)
			l.badPass = 4
			return Probes{Open: opens, Debug: newSimDebug(), Loop: l}
		}, reason: "pass 4 of 5 counted 1001 branches"},
	}
	for _, c := range cases {
		r := Probe(c.probes())
		t.Logf("%s: %v", c.name, r)
		if c.reason == "" {
			if !r.Usable {
				t.Errorf("%s: %v, want usable", c.name, r)
			}
			continue
		}
		if r.Usable || !strings.Contains(r.Reason, c.reason) {
			t.Errorf("%s: %v, want not usable with %q", c.name, r, c.reason)
		}
	}
}

// TestProbeOverflowNeverLands: an overflow interrupt that never comes
// (as with an old kernel's PERF_EVENT_IOC_PERIOD) is refused.
func TestProbeOverflowNeverLands(t *testing.T) {
	l := newSimLoop(1000, 5)
	l.g.skidMin, l.g.skidMax = 5000, 5000
	_, err := CheckLoop(l, 3, 100)
	if err == nil || !strings.Contains(err.Error(), "without an overflow") {
		t.Fatalf("CheckLoop: %v, want the pass to end without an overflow", err)
	}
}

// TestProbeZeroResult: the zero Result is "not usable", so a machine that
// never probed uses exits-only positions.
func TestProbeZeroResult(t *testing.T) {
	var r Result
	if r.Usable {
		t.Fatal("zero Result usable")
	}
}

// TestProbeHost probes this host with its real counter and no probe
// guests: it can never be usable that way, and the reason must say why
// (on a host without a PMU, that there is none). No panic either way.
func TestProbeHost(t *testing.T) {
	r := Probe(Probes{Open: HostCounter})
	t.Logf("%v", r)
	if r.Usable || r.Reason == "" {
		t.Fatalf("%v: want not usable, with a reason", r)
	}
	if err := HostCounter(); err != nil {
		if errors.Is(err, unix.ENOENT) && !strings.HasPrefix(r.Reason, "no PMU: ") {
			t.Errorf("reason %q for ENOENT does not say there is no PMU", r.Reason)
		}
	} else if !strings.Contains(r.Reason, "guest debugging not checked") {
		t.Errorf("counter opens, but the reason is %q", r.Reason)
	}
}

// TestPMUPerfCounterAdapter checks the host Counter on a real counter,
// where there is one.
func TestPMUPerfCounterAdapter(t *testing.T) {
	if err := HostCounter(); err != nil {
		t.Skipf("no usable host counter: %v", err)
	}
	t.Log("host counter opens; the adapter is exercised by the machine's probe guest")
}
