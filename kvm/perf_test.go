package kvm

import (
	"bufio"
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// perfABISource prints the perf_event_open ABI facts perf.go relies on,
// from the installed headers. (testdata/abi.c covers the KVM ABI; this is
// kept apart because it needs <linux/perf_event.h> and <fcntl.h>.)
const perfABISource = `#define _GNU_SOURCE
#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/perf_event.h>

#define S(t) printf("sizeof.%s %zu\n", #t, sizeof(struct t))
#define O(t, f) printf("offsetof.%s.%s %zu\n", #t, #f, offsetof(struct t, f))
#define C(n) printf("const.%s %llu\n", #n, (unsigned long long)(n))

/* The flag word (after read_format) with the given bits set. */
static unsigned long long flags(int which) {
	struct perf_event_attr a;
	unsigned long long w;
	memset(&a, 0, sizeof a);
	if (which == 0) { a.disabled = 1; a.pinned = 1; a.exclude_host = 1; }
	else { a.exclude_kernel = 1; a.exclude_hv = 1; a.exclude_guest = 1; }
	memcpy(&w, (char *)&a + offsetof(struct perf_event_attr, read_format) + 8, 8);
	return w;
}

int main(void) {
	S(perf_event_attr); S(f_owner_ex);
	O(perf_event_attr, type); O(perf_event_attr, size); O(perf_event_attr, config);
	O(perf_event_attr, sample_period); O(perf_event_attr, sample_type);
	O(perf_event_attr, read_format); O(perf_event_attr, wakeup_events);
	O(perf_event_attr, bp_type); O(perf_event_attr, config1);
	O(perf_event_attr, sample_regs_intr); O(perf_event_attr, aux_watermark);
	O(perf_event_attr, sig_data);
	O(f_owner_ex, type); O(f_owner_ex, pid);
	C(PERF_ATTR_SIZE_VER7); C(PERF_TYPE_RAW); C(PERF_FLAG_FD_CLOEXEC);
	C(PERF_EVENT_IOC_ENABLE); C(PERF_EVENT_IOC_DISABLE); C(PERF_EVENT_IOC_RESET);
	C(PERF_EVENT_IOC_PERIOD);
	C(F_OWNER_TID); C(F_SETOWN_EX); C(F_SETSIG); C(F_SETFL); C(O_ASYNC);
	printf("flags.counter %llu\n", flags(0));
	printf("flags.speclockmap %llu\n", flags(1));
	return 0;
}
`

// perfABI compiles and runs perfABISource, like kernelABI in abi_test.go.
func perfABI(t *testing.T) map[string]uint64 {
	t.Helper()
	cc, err := exec.LookPath("cc")
	if err == nil {
		_, err = os.Stat("/usr/include/linux/perf_event.h")
	}
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("CI must provide a C compiler and linux-libc-dev: %v", err)
		}
		t.Skipf("no C compiler or kernel headers: %v", err)
	}
	dir := t.TempDir()
	src, bin := filepath.Join(dir, "perfabi.c"), filepath.Join(dir, "perfabi")
	if err := os.WriteFile(src, []byte(perfABISource), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(cc, "-o", bin, src).CombinedOutput(); err != nil {
		t.Fatalf("compile perfabi.c: %v\n%s", err, out)
	}
	out, err := exec.Command(bin).Output()
	if err != nil {
		t.Fatalf("run perfabi: %v", err)
	}
	facts := map[string]uint64{}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		name, val, ok := strings.Cut(sc.Text(), " ")
		v, err := strconv.ParseUint(val, 10, 64)
		if !ok || err != nil {
			t.Fatalf("bad line %q", sc.Text())
		}
		facts[name] = v
	}
	return facts
}

func TestPerfABI(t *testing.T) {
	facts := perfABI(t)
	var a perfAttr
	var o fOwnerEx
	ours := map[string]uint64{
		"sizeof.f_owner_ex":                         uint64(unsafe.Sizeof(o)),
		"offsetof.perf_event_attr.type":             uint64(unsafe.Offsetof(a.Type)),
		"offsetof.perf_event_attr.size":             uint64(unsafe.Offsetof(a.Size)),
		"offsetof.perf_event_attr.config":           uint64(unsafe.Offsetof(a.Config)),
		"offsetof.perf_event_attr.sample_period":    uint64(unsafe.Offsetof(a.Sample)),
		"offsetof.perf_event_attr.sample_type":      uint64(unsafe.Offsetof(a.Sample_type)),
		"offsetof.perf_event_attr.read_format":      uint64(unsafe.Offsetof(a.Read_format)),
		"offsetof.perf_event_attr.wakeup_events":    uint64(unsafe.Offsetof(a.Wakeup)),
		"offsetof.perf_event_attr.bp_type":          uint64(unsafe.Offsetof(a.Bp_type)),
		"offsetof.perf_event_attr.config1":          uint64(unsafe.Offsetof(a.Ext1)),
		"offsetof.perf_event_attr.sample_regs_intr": uint64(unsafe.Offsetof(a.Sample_regs_intr)),
		"offsetof.perf_event_attr.aux_watermark":    uint64(unsafe.Offsetof(a.Aux_watermark)),
		"offsetof.perf_event_attr.sig_data":         uint64(unsafe.Offsetof(a.Sig_data)),
		"offsetof.f_owner_ex.type":                  uint64(unsafe.Offsetof(o.Type)),
		"offsetof.f_owner_ex.pid":                   uint64(unsafe.Offsetof(o.PID)),
		// The size we pass is a size the kernel knows by name.
		"const.PERF_ATTR_SIZE_VER7":    uint64(unsafe.Sizeof(a)),
		"const.PERF_TYPE_RAW":          unix.PERF_TYPE_RAW,
		"const.PERF_FLAG_FD_CLOEXEC":   unix.PERF_FLAG_FD_CLOEXEC,
		"const.PERF_EVENT_IOC_ENABLE":  unix.PERF_EVENT_IOC_ENABLE,
		"const.PERF_EVENT_IOC_DISABLE": unix.PERF_EVENT_IOC_DISABLE,
		"const.PERF_EVENT_IOC_RESET":   unix.PERF_EVENT_IOC_RESET,
		"const.PERF_EVENT_IOC_PERIOD":  unix.PERF_EVENT_IOC_PERIOD,
		"const.F_OWNER_TID":            fOwnerTID,
		"const.F_SETOWN_EX":            unix.F_SETOWN_EX,
		"const.F_SETSIG":               unix.F_SETSIG,
		"const.F_SETFL":                unix.F_SETFL,
		"const.O_ASYNC":                unix.O_ASYNC,
		"flags.counter":                perfAttrBits,
		"flags.speclockmap":            unix.PerfBitExcludeKernel | unix.PerfBitExcludeHv | unix.PerfBitExcludeGuest,
	}
	for name, want := range facts {
		if name == "sizeof.perf_event_attr" {
			// The kernel's struct may be newer and longer; ours must be a
			// prefix of it.
			if got := uint64(unsafe.Sizeof(a)); got > want {
				t.Errorf("sizeof perf_event_attr = %d, longer than the kernel's %d", got, want)
			}
			continue
		}
		got, ok := ours[name]
		if !ok {
			t.Errorf("%s: printed but not checked", name)
			continue
		}
		if got != want {
			t.Errorf("%s = %d (%#x), kernel says %d (%#x)", name, got, got, want, want)
		}
	}
	for name := range ours {
		if _, ok := facts[name]; !ok {
			t.Errorf("%s: not printed", name)
		}
	}
	t.Logf("checked %d perf ABI facts", len(facts))
}

// cpuidFor builds leaves 0, 1 (and 7, for hybrid) of a CPU.
func cpuidFor(vendor string, eax1 uint32, hybrid bool) []CPUIDEntry {
	v := []byte(vendor)
	word := func(b []byte) uint32 { return uint32(b[0]) | uint32(b[1])<<8 | uint32(b[2])<<16 | uint32(b[3])<<24 }
	e := []CPUIDEntry{
		{Function: 0, EAX: 0x20, EBX: word(v[0:4]), EDX: word(v[4:8]), ECX: word(v[8:12])},
		{Function: 1, EAX: eax1},
	}
	if hybrid {
		e = append(e, CPUIDEntry{Function: 7, EDX: 1 << 15})
	}
	return e
}

func TestPerfCPUVendorBranchEvent(t *testing.T) {
	for _, c := range []struct {
		name   string
		cpuid  []CPUIDEntry
		raw    RawEvent
		skid   uint64
		zen    bool
		hybrid bool
		bad    string // substring of the error, if refused
	}{
		{name: "skylake", cpuid: cpuidFor("GenuineIntel", 0x000506e3, false), raw: 0x5101c4, skid: 100},
		{name: "haswell", cpuid: cpuidFor("GenuineIntel", 0x000306c3, false), raw: 0x5101c4, skid: 100},
		{name: "icelake server", cpuid: cpuidFor("GenuineIntel", 0x000606a6, false), raw: 0x5111c4, skid: 100},
		{name: "sapphire rapids", cpuid: cpuidFor("GenuineIntel", 0x000806f8, false), raw: 0x5111c4, skid: 125},
		{name: "alder lake", cpuid: cpuidFor("GenuineIntel", 0x00090672, true), raw: 0x5111c4, skid: 125, hybrid: true},
		{name: "arrow lake", cpuid: cpuidFor("GenuineIntel", 0x000c0662, true), raw: 0x100005111c4, skid: 125, hybrid: true},
		{name: "goldmont", cpuid: cpuidFor("GenuineIntel", 0x000506c9, false), raw: 0x517ec4, skid: 100},
		{name: "zen 2", cpuid: cpuidFor("AuthenticAMD", 0x00830f10, false), raw: 0x5100d1, skid: 10000, zen: true},
		{name: "zen 4 genoa", cpuid: cpuidFor("AuthenticAMD", 0x00a10f11, false), raw: 0x5100d1, skid: 10000, zen: true},
		{name: "zen 5", cpuid: cpuidFor("AuthenticAMD", 0x00b40f40, false), raw: 0x5100d1, skid: 10000, zen: true},
		{name: "penryn", cpuid: cpuidFor("GenuineIntel", 0x0001067a, false), bad: "Intel family 0x6 model 0x17"},
		{name: "unknown intel", cpuid: cpuidFor("GenuineIntel", 0x000f0ff0, false), bad: "no known"},
		{name: "amd family 15h", cpuid: cpuidFor("AuthenticAMD", 0x00630f01, false), bad: "AMD family 0x15"},
		{name: "other vendor", cpuid: cpuidFor("HygonGenuine", 0x00900f01, false), bad: "HygonGenuine"},
		{name: "no leaves", cpuid: nil, bad: "missing"},
	} {
		ev, err := CPUVendorBranchEvent(c.cpuid)
		if c.bad != "" {
			if err == nil || !strings.Contains(err.Error(), c.bad) {
				t.Errorf("%s: %+v, %v; want an error with %q", c.name, ev, err, c.bad)
			}
			continue
		}
		if err != nil || ev.Raw != c.raw || ev.Skid != c.skid || ev.Zen != c.zen || ev.Hybrid != c.hybrid {
			t.Errorf("%s: %+v, %v; want raw %v skid %d zen %v hybrid %v", c.name, ev, err, c.raw, c.skid, c.zen, c.hybrid)
		}
	}
}

// hostBranchEvent returns this host's event, skipping without KVM.
func hostBranchEvent(t *testing.T) BranchEvent {
	t.Helper()
	s := openOrSkip(t)
	ids, err := s.SupportedCPUID()
	if err != nil {
		t.Fatal(err)
	}
	ev, err := CPUVendorBranchEvent(ids)
	if err != nil {
		t.Skipf("no branch event for this CPU: %v", err)
	}
	t.Logf("host: %s, event %v, skid %d", ev.Uarch, ev.Raw, ev.Skid)
	return ev
}

// TestPerfBranchCounter counts a real-mode guest's loop of known length
// with a VM exit in every iteration, and arms an overflow inside it. It
// needs a PMU and skips, saying why, where perf_event_open fails (inside a
// VM without a virtual PMU, or with perf_event_paranoid too high).
func TestPerfBranchCounter(t *testing.T) {
	ev := hostBranchEvent(t)
	const n = 1000
	// mov cx,n; 1: out 0x10,al; dec cx; jnz 1b; hlt: n retired jnz.
	code := []byte{0xb9, n & 0xff, n >> 8, 0xe6, 0x10, 0x49, 0x75, 0xfb, 0xf4}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	pc, err := OpenBranchCounter(ev.Raw, 0)
	if err != nil {
		var errno unix.Errno
		errors.As(err, &errno)
		t.Skipf("no usable PMU here (%s): %v", unix.ErrnoName(errno), err)
	}
	defer pc.Close()
	run := func(cpu *VCPU) (exits int, last ExitReason) {
		t.Helper()
		for {
			if err := cpu.Run(); err != nil {
				t.Fatal(err)
			}
			switch r := cpu.ExitReason(); r {
			case ExitIO:
				exits++
			case ExitIntr: // a host signal: not ours to count
			default:
				return exits, r
			}
		}
	}

	// Exact count across n exits.
	_, cpu, _ := realModeVM(t, code)
	for _, step := range []func() error{pc.Reset, pc.Enable} {
		if err := step(); err != nil {
			t.Fatal(err)
		}
	}
	exits, last := run(cpu)
	if last != ExitHLT || exits != n {
		t.Fatalf("stopped by %v after %d exits, want HLT after %d", last, exits, n)
	}
	got, err := pc.Read()
	if err != nil {
		t.Fatal(err)
	}
	if got != n {
		t.Errorf("counted %d branches, the loop retires %d", got, n)
	}

	// An overflow armed at n/2 stops the guest within the skid.
	_, cpu, _ = realModeVM(t, code)
	if err := pc.Reset(); err != nil {
		t.Fatal(err)
	}
	if err := pc.SetPeriod(n / 2); err != nil {
		t.Fatal(err)
	}
	for {
		if err := cpu.Run(); err != nil {
			t.Fatal(err)
		}
		r := cpu.ExitReason()
		if r == ExitIO {
			continue
		}
		got, err := pc.Read()
		if err != nil {
			t.Fatal(err)
		}
		if r != ExitIntr {
			t.Fatalf("stopped by %v at %d branches: the overflow never interrupted the guest", r, got)
		}
		if got < n/2 {
			continue // another signal (the runtime's SIGURG), before the overflow
		}
		if got > n/2+ev.Skid {
			t.Errorf("overflow at %d stopped the guest at %d, outside [%d, %d]", n/2, got, n/2, n/2+ev.Skid)
		}
		break
	}
	if err := pc.SetPeriod(NeverOverflow); err != nil {
		t.Fatal(err)
	}
}

// TestPerfZenSpecLockMap reports the SpecLockMap setting on a Zen host.
func TestPerfZenSpecLockMap(t *testing.T) {
	ev := hostBranchEvent(t)
	if !ev.Zen {
		t.Skip("not an AMD Zen host")
	}
	off, err := ZenSpecLockMapDisabled()
	if err != nil {
		t.Skipf("cannot check: %v", err)
	}
	t.Logf("SpecLockMap disabled: %v", off)
}

// TestPerfCounterErrors checks the error of a failing open names the
// syscall and the event, and that methods on a closed counter fail.
func TestPerfCounterErrors(t *testing.T) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	// Bit 63 is no event on any CPU; with a PMU the kernel says EINVAL or
	// ENOENT, without one ENOENT.
	pc, err := OpenBranchCounter(RawEvent(1<<63|0xffff), 0)
	if err == nil {
		pc.Close()
		t.Skip("the kernel accepted a nonsense raw event")
	}
	if !strings.Contains(err.Error(), "perf_event_open(raw event 0x800000000000ffff, guest only)") {
		t.Errorf("error %q does not name the syscall and event", err)
	}
	var kerr *Error
	if !errors.As(err, &kerr) {
		t.Errorf("error %T is not a *kvm.Error", err)
	}
	closed := &PerfCounter{fd: -1}
	if _, err := closed.Read(); err == nil {
		t.Error("Read on a closed counter succeeded")
	}
	if err := closed.SetPeriod(0); err == nil {
		t.Error("SetPeriod(0) succeeded")
	}
	if err := closed.Close(); err != nil {
		t.Errorf("Close twice: %v", err)
	}
}
