package machine

import (
	"errors"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/gokvm-ft/gokvm-ft/kvm"
)

func TestBusRegisterAndFind(t *testing.T) {
	var b bus[string]
	for _, r := range []struct{ base, size uint64 }{{0x20, 2}, {0x40, 4}, {0xa0, 2}} {
		if err := b.register(r.base, r.size, "dev"); err != nil {
			t.Fatal(err)
		}
	}
	for _, bad := range []struct{ base, size uint64 }{{0x21, 1}, {0x1f, 2}, {0x3f, 2}, {0x30, 0}, {^uint64(0), 2}} {
		if err := b.register(bad.base, bad.size, "x"); err == nil {
			t.Errorf("register [%#x,+%d) accepted", bad.base, bad.size)
		}
	}
	for addr, want := range map[uint64]uint64{0x20: 0x20, 0x21: 0x20, 0x43: 0x40, 0xa1: 0xa0} {
		if _, base, ok := b.find(addr); !ok || base != want {
			t.Errorf("find(%#x) = %#x %v, want %#x", addr, base, ok, want)
		}
	}
	for _, addr := range []uint64{0, 0x22, 0x44, 0x9f, 0xa2, ^uint64(0)} {
		if _, _, ok := b.find(addr); ok {
			t.Errorf("find(%#x) found a device", addr)
		}
	}
}

func TestMemoryBoundsAndDirty(t *testing.T) {
	for _, size := range []uint64{0, 100, MaxMemory + PageSize} {
		if _, err := NewMemory(size); err == nil {
			t.Errorf("NewMemory(%d) accepted", size)
		}
	}
	m, err := NewMemory(1 << 20)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	var oor *OutOfRangeError
	for _, c := range []struct{ gpa, n uint64 }{{1 << 20, 1}, {1<<20 - 1, 2}, {^uint64(0), 2}, {0, ^uint64(0)}, {1 << 40, 0}} {
		if _, err := m.Slice(c.gpa, c.n); !errors.As(err, &oor) {
			t.Errorf("Slice(%#x, %d) = %v, want out of range", c.gpa, c.n, err)
		}
		if c.gpa != 0 {
			if err := m.WriteAt(make([]byte, min(c.n, 16)+1), c.gpa); err == nil {
				t.Errorf("WriteAt(%#x) accepted", c.gpa)
			}
		}
	}
	if _, err := m.Slice(1<<20, 0); err != nil {
		t.Errorf("empty slice at the end refused: %v", err)
	}
	// Writes mark exactly the pages they touch.
	if err := m.WriteAt([]byte{1, 2}, 2*PageSize-1); err != nil {
		t.Fatal(err)
	}
	if err := m.Write64(10*PageSize, 42); err != nil {
		t.Fatal(err)
	}
	if v, err := m.Read64(10 * PageSize); err != nil || v != 42 {
		t.Errorf("Read64 = %d, %v", v, err)
	}
	bm := make([]uint64, m.BitmapWords())
	m.TakeVMMDirty(bm)
	if bm[0] != 1<<1|1<<2|1<<10 || CountBits(bm) != 3 {
		t.Errorf("dirty bitmap %#x, want pages 1, 2, 10", bm[0])
	}
	bm[0] = 0
	m.TakeVMMDirty(bm)
	if bm[0] != 0 {
		t.Errorf("dirty bitmap not cleared: %#x", bm[0])
	}
	m.MarkDirty(1<<20-1, 2) // out of range: ignored, no panic
	m.MarkDirty(0, 0)
}

func cpuidTable() []kvm.CPUIDEntry {
	// A made-up AMD host with everything turned on.
	return []kvm.CPUIDEntry{
		{Function: 0, EAX: 0xd, EBX: 0x68747541, EDX: 0x69746e65, ECX: 0x444d4163},
		{Function: 1, EBX: 0x00ff0800, ECX: 0xffffffff, EDX: 0xffffffff},
		{Function: 6, EAX: 4},
		{Function: 7, Index: 0, Flags: kvm.CPUIDFlagSignificantIndex, EBX: 0xffffffff, ECX: 0xffffffff, EDX: 0xffffffff},
		{Function: 0xa, EAX: 0x07300403},
		{Function: 0xb, EBX: 1},
		{Function: 0xd, EAX: 7},
		{Function: 0x40000000, EBX: 0x4b4d564b},
		{Function: 0x40000001, EAX: 0xffffffff},
		{Function: 0x80000001, ECX: 0xffffffff, EDX: 0xffffffff},
		{Function: 0x80000008, EBX: 0, ECX: 0x3f},
		{Function: 0x80000022, EAX: 1},
	}
}

func find(t []kvm.CPUIDEntry, fn uint32) *kvm.CPUIDEntry {
	for i := range t {
		if t[i].Function == fn {
			return &t[i]
		}
	}
	return nil
}

func TestCPUPolicy(t *testing.T) {
	for _, host := range []HostKind{HostBareMetal, HostLabPVM} {
		out := CPUPolicy{Host: host}.Apply(cpuidTable())
		if Vendor(out) != VendorAMD {
			t.Errorf("%v: vendor %q", host, Vendor(out))
		}
		for _, gone := range []uint32{0xa, 0xb, 0x40000000, 0x40000001, 0x80000022} {
			if find(out, gone) != nil {
				t.Errorf("%v: leaf %#x still present", host, gone)
			}
		}
		l1 := find(out, 1)
		for name, b := range map[string]uint{"x2APIC": c1X2APIC, "TSC-deadline": c1TSCDeadline, "RDRAND": c1RDRAND, "MONITOR": c1MONITOR, "VMX": c1VMX, "PDCM": c1PDCM} {
			if l1.ECX&bit(b) != 0 {
				t.Errorf("%v: leaf 1 %s visible", host, name)
			}
		}
		if l1.EDX&bit(d1APIC) != 0 {
			t.Errorf("%v: APIC visible", host)
		}
		if l1.EBX>>24 != 0 || l1.EBX>>16&0xff != 1 {
			t.Errorf("%v: leaf 1 EBX %#x, want APIC ID 0 and one logical CPU", host, l1.EBX)
		}
		if l1.ECX&bit(c1Hypervisor) == 0 {
			t.Errorf("%v: hypervisor bit hidden", host)
		}
		l7 := find(out, 7)
		if l7.EBX&bit(b7RDSEED) != 0 || l7.ECX&bit(c7RDPID) != 0 {
			t.Errorf("%v: RDSEED or RDPID visible", host)
		}
		e1 := find(out, 0x80000001)
		if e1.EDX&bit(de1RDTSCP) != 0 || e1.ECX&bit(ce1PerfCtrCore) != 0 {
			t.Errorf("%v: RDTSCP or perfctr visible", host)
		}
		e8 := find(out, 0x80000008)
		lab := host == HostLabPVM
		if (e8.EBX&bit(b88XSAVEERPTR) != 0) != lab {
			t.Errorf("%v: XSAVEERPTR = %v", host, e8.EBX&bit(b88XSAVEERPTR) != 0)
		}
		// Lab-only masks.
		if got := l1.ECX&bit(c1XSAVE) == 0; got != lab {
			t.Errorf("%v: XSAVE hidden = %v", host, got)
		}
		if got := l1.ECX&bit(c1POPCNT) == 0; got != lab {
			t.Errorf("%v: POPCNT hidden = %v", host, got)
		}
		if got := l7.EBX&(1<<7|1<<20) == 0; got != lab { // SMEP, SMAP
			t.Errorf("%v: SMEP/SMAP hidden = %v", host, got)
		}
		if got := find(out, 0xd) == nil; got != lab {
			t.Errorf("%v: leaf 0xd removed = %v", host, got)
		}
		if lab && (l1.ECX&bit(c1OSXSAVE) != 0 || l1.ECX&bit(c1AVX) != 0) {
			t.Errorf("lab: AVX/OSXSAVE visible without XSAVE")
		}
		if lab && e1.ECX&bit(ce1ABM) != 0 {
			t.Errorf("lab: ABM visible")
		}
	}
}

func TestParseHostKind(t *testing.T) {
	for s, want := range map[string]HostKind{"lab": HostLabPVM, "bare-metal": HostBareMetal, "auto": DetectHostKind()} {
		if got, err := ParseHostKind(s); err != nil || got != want {
			t.Errorf("ParseHostKind(%q) = %v, %v", s, got, err)
		}
	}
	if _, err := ParseHostKind("vmware"); err == nil {
		t.Error("bogus host kind accepted")
	}
}

func TestSavedMSRs(t *testing.T) {
	got := CPUPolicy{}.SavedMSRs([]uint32{MSRLSTAR, MSRSTAR, 0x1234})
	want := []uint32{MSRTSC, MSRSTAR, MSRLSTAR}
	if len(got) != len(want) {
		t.Fatalf("SavedMSRs = %#x, want %#x", got, want)
	}
	for i := range got {
		if got[i] != want[i] {
			t.Fatalf("SavedMSRs = %#x, want %#x", got, want)
		}
	}
}

func TestI8042(t *testing.T) {
	var resets []string
	k := &i8042{reset: func(why string) { resets = append(resets, why) }}
	b := []byte{0}
	k.ReadPort(portI8042Cmd, b)
	if b[0]&i8042StatusOBF != 0 {
		t.Error("output buffer full at start")
	}
	k.WritePort(portI8042Cmd, []byte{i8042CmdSelf})
	k.ReadPort(portI8042Cmd, b)
	if b[0]&i8042StatusOBF == 0 {
		t.Fatal("no self-test answer")
	}
	k.ReadPort(portI8042Data, b)
	if b[0] != 0x55 {
		t.Errorf("self test %#x, want 0x55", b[0])
	}
	k.WritePort(portI8042Cmd, []byte{i8042CmdWriteCB})
	k.WritePort(portI8042Data, []byte{0x65})
	k.WritePort(portI8042Cmd, []byte{i8042CmdReadCB})
	k.ReadPort(portI8042Data, b)
	if b[0] != 0x65 {
		t.Errorf("command byte %#x, want 0x65", b[0])
	}
	k.WritePort(portI8042Data, []byte{0xff}) // to the keyboard: nobody answers
	if len(resets) != 0 {
		t.Fatal("reset too early")
	}
	k.WritePort(portI8042Cmd, []byte{0xfe})
	if len(resets) != 1 {
		t.Errorf("0xfe did not reset")
	}
	wide := []byte{0, 0, 0, 0}
	k.ReadPort(portI8042Cmd, wide)
	if wide[1] != 0xff || wide[3] != 0xff {
		t.Errorf("wide read %x", wide)
	}
}

func TestSysCtrlReset(t *testing.T) {
	n := 0
	s := &sysCtrl{reset: func(string) { n++ }}
	s.WritePort(portSysCtrlA, []byte{0x02}) // A20 only
	b := []byte{0}
	s.ReadPort(portSysCtrlA, b)
	if b[0] != 0x02 || n != 0 {
		t.Errorf("port A = %#x, resets %d", b[0], n)
	}
	s.WritePort(portSysCtrlA, []byte{0x03})
	s.WritePort(portResetCtrl, []byte{0x02}) // reset type only, no reset
	if n != 1 {
		t.Errorf("resets %d, want 1", n)
	}
	s.WritePort(portResetCtrl, []byte{0x06})
	if n != 2 {
		t.Errorf("resets %d, want 2", n)
	}
}

func TestManualClock(t *testing.T) {
	var c ManualClock
	c.Advance(5)
	c.Advance(-3)
	c.Set(2)
	if c.Now() != 5 {
		t.Errorf("Now = %d, want 5", c.Now())
	}
	c.SleepUntil(t.Context(), 100, nil)
	if c.Now() != 100 {
		t.Errorf("SleepUntil did not jump: %d", c.Now())
	}
	h := NewHostClock(time.Hour)
	if h.Now() < time.Hour {
		t.Error("host clock ignores its offset")
	}
	done := make(chan struct{})
	h.WakeAt(h.Now()+time.Millisecond, func() { close(done) })
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("WakeAt never fired")
	}
}

// TestInputQueueBounded checks that a producer blocks, and loses nothing,
// when the guest does not read.
func TestInputQueueBounded(t *testing.T) {
	m := &Machine{}
	m.inputs.init()
	m.closed = true // no vCPU to kick
	var wg sync.WaitGroup
	wg.Add(1)
	big := make([]byte, maxQueuedSerial+10)
	var ok bool
	go func() {
		defer wg.Done()
		ok = m.DeliverSerial(big)
	}()
	deadline := time.Now().Add(5 * time.Second)
	for {
		m.inputs.mu.Lock()
		n := len(m.inputs.serial)
		m.inputs.mu.Unlock()
		if n == maxQueuedSerial {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("queue holds %d bytes", n)
		}
		time.Sleep(time.Millisecond)
	}
	// Take some out, as the UART would: the producer finishes.
	m.inputs.mu.Lock()
	m.inputs.serial = m.inputs.serial[:0]
	m.inputs.space.Broadcast()
	m.inputs.mu.Unlock()
	wg.Wait()
	if !ok || len(m.inputs.serial) != 10 {
		t.Errorf("DeliverSerial = %v, %d bytes left queued, want 10", ok, len(m.inputs.serial))
	}
	m.CloseInput()
	if m.DeliverSerial(big) {
		t.Error("DeliverSerial after CloseInput succeeded")
	}
}

func TestOverriddenLeaves(t *testing.T) {
	set := []kvm.CPUIDEntry{{Function: 0, EAX: 0xd}, {Function: 1, ECX: 0x80000000}, {Function: 7, Index: 0}, {Function: 0x80000000}}
	got := []kvm.CPUIDEntry{{Function: 0, EAX: 0xd}, {Function: 1, ECX: 0xf6d81203}, {Function: 7, Index: 0}, {Function: 0xd, Index: 1}}
	if d := overriddenLeaves(set, got); !slices.Equal(d, []uint32{1, 0xd, 0x80000000}) {
		t.Errorf("overriddenLeaves = %#x, want [0x1 0xd 0x80000000] (changed, added, dropped)", d)
	}
	if d := overriddenLeaves(set, set); len(d) != 0 {
		t.Errorf("identical tables: %#x", d)
	}
}

func TestExitStatsBounded(t *testing.T) {
	s := newExitStats()
	for i := 0; i < maxStatAddrs+904; i++ {
		s.count(&Exit{Reason: kvm.ExitMMIO, Addr: uint64(i) * 8})
	}
	s.count(&Exit{Reason: kvm.ExitMMIO, Addr: 0}) // a known address still counts as itself
	if len(s.ByAddr) != maxStatAddrs || s.OtherAddr != 904 || s.ByAddr[statKey{MMIO: true, Addr: 0}] != 2 {
		t.Errorf("%d addresses, %d other, address 0 counted %d times", len(s.ByAddr), s.OtherAddr, s.ByAddr[statKey{MMIO: true}])
	}
	if s.ByReason[kvm.ExitMMIO] != maxStatAddrs+905 {
		t.Errorf("%d MMIO exits counted", s.ByReason[kvm.ExitMMIO])
	}
}
