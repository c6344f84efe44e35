package main

import (
	"bytes"
	"net/netip"
	"strings"
	"testing"
)

// A command line as the gokvm-ft VMM builds it, plus the user's -append.
const vmmCmdline = "console=ttyS0 earlyprintk=serial,ttyS0,115200 nolapic noapic no_timer_check tsc_early_khz=2596134 lpj=25961340 tsc=reliable reboot=k panic=-1 quiet gokvm.lab=1 noxsave clearcpuid=cx16,popcnt"

func TestParams(t *testing.T) {
	m := Params(` a=1  b="x y" c "d=q"uoted e= a=2 -- gokvm.ip=1.2.3.4/8` + "\n")
	want := map[string]string{"a": "2", "b": "x y", "c": "", "d": "quoted", "e": ""}
	if len(m) != len(want) {
		t.Fatalf("Params = %q, want %q", m, want)
	}
	for k, v := range want {
		if got, ok := m[k]; !ok || got != v {
			t.Errorf("Params[%q] = %q, %v; want %q", k, got, ok, v)
		}
	}
}

func TestParseGood(t *testing.T) {
	pfx := netip.MustParsePrefix
	addr := netip.MustParseAddr
	for _, c := range []struct {
		cmdline string
		net     *NetConfig
		counter int
	}{
		{vmmCmdline + " gokvm.ip=10.0.2.15/24,10.0.2.2", &NetConfig{pfx("10.0.2.15/24"), addr("10.0.2.2")}, 7777},
		{"gokvm.ip=10.0.2.15/24 " + vmmCmdline, &NetConfig{pfx("10.0.2.15/24"), netip.Addr{}}, 7777},
		{"gokvm.ip=192.168.7.2/30,192.168.7.1 gokvm.counter=9000", &NetConfig{pfx("192.168.7.2/30"), addr("192.168.7.1")}, 9000},
		{"gokvm.counter=off gokvm.ip=10.1.2.3/8", &NetConfig{pfx("10.1.2.3/8"), netip.Addr{}}, 0},
		{"gokvm.ip=fd00::15/64,fd00::1", &NetConfig{pfx("fd00::15/64"), addr("fd00::1")}, 7777},
		{`gokvm.ip="10.0.2.15/24,10.0.2.2"`, &NetConfig{pfx("10.0.2.15/24"), addr("10.0.2.2")}, 7777},
		{"gokvm.ip=1.1.1.1/24 gokvm.ip=10.0.2.15/32", &NetConfig{pfx("10.0.2.15/32"), netip.Addr{}}, 7777}, // last wins
		{"gokvm.counter=1", nil, 1},         // counter without network (loopback)
		{"gokvm.counter=65535", nil, 65535}, // highest port
	} {
		got := Parse(c.cmdline)
		if got.NetErr != nil || got.CounterErr != nil {
			t.Errorf("%q: errors %v, %v", c.cmdline, got.NetErr, got.CounterErr)
			continue
		}
		if (got.Net == nil) != (c.net == nil) || got.Net != nil && *got.Net != *c.net {
			t.Errorf("%q: net %v, want %v", c.cmdline, got.Net, c.net)
		}
		if got.Counter != c.counter {
			t.Errorf("%q: counter %d, want %d", c.cmdline, got.Counter, c.counter)
		}
	}
}

func TestParseAbsent(t *testing.T) {
	for _, s := range []string{"", vmmCmdline, "gokvm.ipx=1.2.3.4/8 xgokvm.ip=1.2.3.4/8 gokvm.counterx=5", "init=/bin/sh -- gokvm.ip=10.0.2.15/24"} {
		if got := Parse(s); got != (Config{}) {
			t.Errorf("%q: %+v, want nothing", s, got)
		}
		var out bytes.Buffer
		run(Parse(s), &out)
		if out.Len() != 0 {
			t.Errorf("%q: printed %q", s, out.String())
		}
	}
}

func TestParseMalformed(t *testing.T) {
	for _, v := range []string{
		"", "10.0.2.15", "10.0.2.15/", "10.0.2.15/33", "10.0.2/24", "eth0", "10.0.2.15/24,",
		"10.0.2.15/24,gw", "10.0.2.15/24,10.0.3.1", "10.0.2.15/24,10.0.2.15", "10.0.2.15/24,fd00::1",
		"fd00::15/64,10.0.2.2", "fe80::1%eth0/64", "0.0.0.0/0", "224.0.0.1/4", "::ffff:10.0.2.15/120",
		"10.0.2.15/24,10.0.2.2,10.0.2.3", " 10.0.2.15/24",
	} {
		got := Parse(vmmCmdline + ` "gokvm.ip=` + v + `"`)
		if got.NetErr == nil {
			t.Errorf("gokvm.ip=%q: no error, net %v", v, got.Net)
			continue
		}
		if got.Net != nil || got.IPParam != v {
			t.Errorf("gokvm.ip=%q: net %v, param %q", v, got.Net, got.IPParam)
		}
		if got.Counter != DefaultCounterPort {
			t.Errorf("gokvm.ip=%q: counter %d, want the default", v, got.Counter)
		}
		t.Logf("gokvm.ip=%q: %v", v, got.NetErr)
	}
	got := Parse("gokvm.ip") // no "=": present but empty
	if got.NetErr == nil {
		t.Errorf("bare gokvm.ip: no error")
	}
	for _, v := range []string{"", "0", "65536", "-1", "7777x", "on", "OFF", "0x1f"} {
		got := Parse("gokvm.ip=10.0.2.15/24 gokvm.counter=" + v)
		if got.CounterErr == nil || got.Counter != 0 {
			t.Errorf("gokvm.counter=%q: counter %d, error %v", v, got.Counter, got.CounterErr)
		}
		if got.Net == nil || got.NetErr != nil {
			t.Errorf("gokvm.counter=%q spoilt gokvm.ip: %v %v", v, got.Net, got.NetErr)
		}
	}
}

// TestRunMessages checks the console lines for malformed parameters (the
// network and the counter are not touched then).
func TestRunMessages(t *testing.T) {
	var out bytes.Buffer
	run(Parse("gokvm.ip=10.0.2.15 gokvm.counter=http"), &out)
	lines := strings.Split(strings.TrimSuffix(out.String(), "\n"), "\n")
	if len(lines) != 2 ||
		!strings.HasPrefix(lines[0], `gokvm: bad gokvm.ip="10.0.2.15": `) || !strings.HasSuffix(lines[0], "network not configured") ||
		!strings.HasPrefix(lines[1], "gokvm: bad gokvm.counter: ") || !strings.HasSuffix(lines[1], "counter service not started") {
		t.Errorf("output:\n%s", out.String())
	}
}

func TestNetConfigString(t *testing.T) {
	n, err := ParseIP("10.0.2.15/24,10.0.2.2")
	if err != nil {
		t.Fatal(err)
	}
	if got, want := n.String(), "eth0 10.0.2.15/24, default via 10.0.2.2"; got != want {
		t.Errorf("String() = %q, want %q", got, want)
	}
}

func TestParseBulk(t *testing.T) {
	for _, c := range []struct {
		cmdline       string
		counter, bulk int
	}{
		{"gokvm.ip=10.0.2.15/24", 7777, 0}, // off by default
		{"gokvm.ip=10.0.2.15/24 gokvm.bulk=7778", 7777, 7778},
		{"gokvm.ip=10.0.2.15/24 gokvm.counter=off gokvm.bulk=9000", 0, 9000},
		{"gokvm.bulk=9000", 0, 9000}, // without network (loopback)
		{"gokvm.ip=10.0.2.15/24 gokvm.bulk=off", 7777, 0},
		{"gokvm.counter=7000 gokvm.bulk=7777", 7000, 7777},
	} {
		got := Parse(c.cmdline)
		if got.CounterErr != nil || got.BulkErr != nil || got.Counter != c.counter || got.Bulk != c.bulk {
			t.Errorf("%q: counter %d (%v), bulk %d (%v); want %d, %d", c.cmdline, got.Counter, got.CounterErr, got.Bulk, got.BulkErr, c.counter, c.bulk)
		}
	}
	for _, s := range []string{
		"gokvm.bulk=", "gokvm.bulk=0", "gokvm.bulk=65536", "gokvm.bulk=x",
		"gokvm.ip=10.0.2.15/24 gokvm.bulk=7777",             // the default counter port
		"gokvm.counter=9000 gokvm.bulk=9000",                // the same port twice
		"gokvm.ip=10.0.2.15/24 gokvm.bulk=7778 gokvm.bulk=", // last wins
	} {
		got := Parse(s)
		if got.BulkErr == nil || got.Bulk != 0 {
			t.Errorf("%q: bulk %d, error %v; want an error", s, got.Bulk, got.BulkErr)
			continue
		}
		t.Logf("%q: %v", s, got.BulkErr)
	}
	var out bytes.Buffer
	run(Parse("gokvm.counter=off gokvm.bulk=http"), &out)
	if want := "gokvm: bad gokvm.bulk: \"http\" is neither a TCP port (1-65535) nor off; bulk service not started\n"; out.String() != want {
		t.Errorf("output %q, want %q", out.String(), want)
	}
}
