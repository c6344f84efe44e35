package main

import (
	"bytes"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/gokvm-ft/gokvm-ft/machine"
)

func TestParseSize(t *testing.T) {
	for in, want := range map[string]uint64{"4096": 4096, "256M": 256 << 20, "1g": 1 << 30, "64K": 64 << 10, "2GB": 2 << 30} {
		if got, err := parseSize(in); err != nil || got != want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "M", "0", "-1M", "12X", "1.5G", "99999999999999999999G"} {
		if _, err := parseSize(bad); err == nil {
			t.Errorf("parseSize(%q) accepted", bad)
		}
	}
}

func TestFlagsNameTheBadOne(t *testing.T) {
	for args, want := range map[string]string{
		"-mem 12X":                          "-mem",
		"-mem 4097":                         "-mem",
		"-mem 8G":                           "-mem",
		"-host vmware":                      "-host",
		"-log loud":                         "-log",
		"-bogus":                            "bogus",
		"-disk-ro":                          "-disk-ro",
		"-net tap":                          "-net",
		"-net mac=52:54:00:00:00:01":        "-net",
		"-net tap=t0,mac=01:00:00:00:00:01": "-net",
		"-net tap=t0,mac=zz":                "-net",
		"-net tap=t0,speed=10":              "-net",
		"-net tap=averyveryverylongname":    "-net",
		"stray":                             "stray",
		"-host-cpu 4096":                    "-host-cpu",
		"-host-cpu -2":                      "-host-cpu",
		"record -log l -delta-after -1s":    "-delta-after",
		"record -log l -digest-every x":     "-digest-every",
		"record -delta-after 1ms":           "-log",
		"-primary :7000":                    "-key",
		"-primary :7000 -key k":             "-arbiter",
		"-primary nocolon -key k -arbiter file:/a":       "-primary",
		"-primary :1 -backup :2 -key k -arbiter file:/a": "exclude",
		"-backup :1 -key k -arbiter file:/a -restore d":  "-restore",
		"-primary :1 -key k -arbiter file:/a -serve :2":  "-serve",
		"-key k": "-primary or -backup",
		"-primary :1 -key k -arbiter file:/a -peer-timeout 1ms":                "-peer-timeout",
		"-primary :1 -key k -arbiter file:/a -guest-ip 10.0.0.300 -net tap=t0": "-guest-ip",
		"-primary :1 -key k -arbiter file:/a -guest-ip 10.0.0.3":               "-net",
		"-primary :1 -key k -arbiter file:/a -incoming :2":                     "-incoming",
		"-positions pmu":             "-positions",
		"record -log l -positions x": "-positions",
	} {
		var stderr bytes.Buffer
		if code := run(strings.Fields(args), nil, &bytes.Buffer{}, &stderr); code != exitUsage {
			t.Errorf("%q: exit %d, want %d", args, code, exitUsage)
		}
		if !strings.Contains(stderr.String(), want) {
			t.Errorf("%q: message %q does not name %q", args, stderr.String(), want)
		}
	}
}

func TestMissingImages(t *testing.T) {
	var stderr bytes.Buffer
	code := run([]string{"-kernel", "/nonexistent/bzImage"}, nil, &bytes.Buffer{}, &stderr)
	if code != exitError || !strings.Contains(stderr.String(), "/nonexistent/bzImage") {
		t.Errorf("exit %d, %q", code, stderr.String())
	}
	stderr.Reset()
	code = run([]string{"-kernel", "/", "-initrd", ""}, nil, &bytes.Buffer{}, &stderr)
	if code != exitError || !strings.Contains(stderr.String(), "not a regular file") {
		t.Errorf("exit %d, %q", code, stderr.String())
	}
}

func TestEscapeFilter(t *testing.T) {
	var f escapeFilter
	out, quit := f.filter([]byte("ab\x01\x01c\x01"))
	if string(out) != "ab\x01c" || quit {
		t.Errorf("filter = %q, %v", out, quit)
	}
	// The escape carries over to the next read.
	out, quit = f.filter([]byte("x"))
	if len(out) != 0 || !quit {
		t.Errorf("split escape: %q, %v", out, quit)
	}
	out, quit = f.filter([]byte("\x01qz"))
	if string(out) != "\x01qz" || quit {
		t.Errorf("unknown escape: %q, %v", out, quit)
	}
}

func TestStopStatus(t *testing.T) {
	for _, c := range []struct {
		stop machine.Stop
		want int
		msg  string
	}{
		{machine.Stop{Kind: machine.StopPowerOff}, exitOK, ""},
		{machine.Stop{Kind: machine.StopReset, Detail: "i8042 reset command"}, exitReset, "guest reset"},
		{machine.Stop{Kind: machine.StopTripleFault}, exitTripleFault, "triple fault"},
		{machine.Stop{Kind: machine.StopTestExit, Code: 7}, 7, ""},
	} {
		var stderr bytes.Buffer
		if got := stopStatus(c.stop, &stderr); got != c.want || !strings.Contains(stderr.String(), c.msg) {
			t.Errorf("%v: status %d %q, want %d %q", c.stop, got, stderr.String(), c.want, c.msg)
		}
	}
}

func TestParseNet(t *testing.T) {
	n, err := parseNet("tap=gk0,mac=52:54:00:12:34:56")
	if err != nil || n.tap != "gk0" || n.mac.String() != "52:54:00:12:34:56" {
		t.Fatalf("parseNet = %+v, %v", n, err)
	}
	n, err = parseNet("tap=gk1")
	if err != nil || n.tap != "gk1" || len(n.mac) != 6 || n.mac[0]&1 != 0 || n.mac[0]&2 == 0 {
		t.Fatalf("random MAC: %+v, %v (want unicast, locally administered)", n, err)
	}
}

func TestBadDisk(t *testing.T) {
	var stderr bytes.Buffer
	code := run([]string{"-kernel", "/bin/true", "-initrd", "", "-disk", "/nonexistent/disk.img"}, nil, &bytes.Buffer{}, &stderr)
	if code != exitError || !strings.Contains(stderr.String(), "/nonexistent/disk.img") {
		t.Errorf("exit %d, %q", code, stderr.String())
	}
}

// The pair's key and arbiter are checked before anything starts, with
// messages that say what to do.
func TestPairKeyAndArbiterErrors(t *testing.T) {
	dir := t.TempDir()
	short := filepath.Join(dir, "short.key")
	os.WriteFile(short, []byte("tooshort\n"), 0o600)
	good := filepath.Join(dir, "good.key")
	os.WriteFile(good, []byte("0123456789abcdef0123456789abcdef\n"), 0o600)
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"-primary", "127.0.0.1:0", "-key", filepath.Join(dir, "none.key"), "-arbiter", "file:" + dir}, "no such file"},
		{[]string{"-primary", "127.0.0.1:0", "-key", short, "-arbiter", "file:" + dir}, "fewer than 16"},
		{[]string{"-primary", "127.0.0.1:0", "-key", good, "-arbiter", "etcd:x"}, "-arbiter"},
		{[]string{"-primary", "127.0.0.1:0", "-key", good, "-arbiter", "file:" + filepath.Join(dir, "missing")}, "-arbiter"},
	} {
		var stderr bytes.Buffer
		if code := run(c.args, nil, &bytes.Buffer{}, &stderr); code != exitError {
			t.Errorf("%q: exit %d, want %d (%s)", c.args, code, exitError, stderr.String())
		}
		if !strings.Contains(stderr.String(), c.want) {
			t.Errorf("%q: message %q does not say %q", c.args, stderr.String(), c.want)
		}
	}
}

// The compatibility check names each difference, and refuses one image
// file used by both VMMs.
func TestPairCompatCheck(t *testing.T) {
	a := pairCompat{Protocol: protocolName, Host: "lab-pvm", Position: positionsExits, Memory: 256 << 20, Devices: []string{"disk", "net"}, MAC: "52:54:00:12:34:56", DiskFile: "h:1:2", Name: "A"}
	if err := a.check(a); err == nil || !strings.Contains(err.Error(), "same disk image file") {
		t.Errorf("one image file for both: %v", err)
	}
	b := a
	b.DiskFile, b.Memory, b.MAC, b.Name = "h:1:3", 512<<20, "52:54:00:00:00:01", "B"
	err := a.check(b)
	if err == nil || !strings.Contains(err.Error(), "guest memory (-mem): 256M here, 512M on B") || !strings.Contains(err.Error(), "guest MAC") {
		t.Errorf("differences: %v", err)
	}
	b = a
	b.DiskFile, b.Position = "h:1:3", positionsCounterPrefix+"(Intel Skylake) + deterministic exits"
	if err := a.check(b); err == nil || !strings.Contains(err.Error(), "position source: "+positionsExits+" here, branch counter") {
		t.Errorf("one side with a branch counter: %v", err)
	}
	b = a
	b.DiskFile = "h:1:3"
	if err := a.check(b); err != nil {
		t.Errorf("compatible: %v", err)
	}
}

// TestReplayPositions: a log recorded without a branch counter replays
// with none; one recorded with a counter this host does not have is
// refused with both named, before any guest runs.
func TestReplayPositions(t *testing.T) {
	log := slog.New(slog.DiscardHandler)
	if p, err := replayPositions("", log); err != nil || p.new != nil {
		t.Fatalf("no recorded source: %+v, %v", p, err)
	}
	if p, err := replayPositions(positionsExits, log); err != nil || p.new != nil {
		t.Fatalf("exits: %+v, %v", p, err)
	}
	here := hostPositions("auto", log)
	if here.new != nil {
		t.Skipf("this host has a usable branch counter (%s)", here.name)
	}
	recorded := positionsCounterPrefix + "(Intel Skylake) + deterministic exits"
	_, err := replayPositions(recorded, log)
	if err == nil || !strings.Contains(err.Error(), "Intel Skylake") || !strings.Contains(err.Error(), positionsExits) {
		t.Fatalf("a log from a counter this host lacks: %v", err)
	}
	if p := hostPositions("exits", log); p.new != nil || p.name != positionsExits {
		t.Fatalf("-positions exits: %+v", p)
	}
}
