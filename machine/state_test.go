package machine_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/gokvm-ft/gokvm-ft/internal/statetest"
	"github.com/gokvm-ft/gokvm-ft/internal/tinyguest"
	"github.com/gokvm-ft/gokvm-ft/machine"
)

// onePort answers every read with 1.
type onePort struct{}

func (onePort) ReadPort(port uint16, data []byte) {
	for i := range data {
		data[i] = 0
	}
	data[0] = 1
}
func (onePort) WritePort(port uint16, data []byte) {}

// countingGuest counts in user mode (0x90000) while the PIT ticks (0x90008);
// every 1<<18 counts it reads port 0x510 (which answers 1) and adds the
// value to a sum. It exits with the sum once the count reaches 1<<26: 256 if
// no "in" was lost.
var countingGuest = `
_start:
` + picInit + pitPeriodic(1193) + toUser + `
user:
	incq 0x90000
	mov 0x90000, %rax
	test $0x3ffff, %rax
	jnz user
	mov $0x510, %dx
	in %dx, %eax
	add %rax, 0x90010
	cmpq $0x4000000, 0x90000
	jb user
	mov 0x90010, %rax
` + exitWithEAX + tinyguest.CountTicks

func newCounting(t *testing.T, clock machine.Clock) *guest {
	g := newGuest(t, countingGuest, machine.Config{Clock: clock}, tinyguest.Options{Kernel: true})
	if err := g.m.RegisterPort(0x510, 1, onePort{}); err != nil {
		t.Fatal(err)
	}
	return g
}

// runUntilIn runs the guest and stops it right after its n-th "in" exit,
// before KVM_RUN completes it.
func runUntilIn(t *testing.T, g *guest, n int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	seen := 0
	g.m.SetOnExit(func(ex machine.Exit) {
		if ex.Addr == 0x510 && !ex.Write {
			if seen++; seen == n {
				cancel()
			}
		}
	})
	stop, err := g.m.Run(ctx)
	if err != nil || stop.Kind != machine.StopCanceled || seen != n {
		t.Fatalf("run to in #%d: %v, %v after %d", n, stop, err, seen)
	}
	g.m.SetOnExit(nil)
}

// TestSaveRestoreMidRun: a counting guest stopped at an "in" exit is saved
// (the exit completed first), its state passed through gob and JSON and
// restored with its memory into a fresh machine, where it finishes with no
// count or "in" lost; the timer keeps ticking.
func TestSaveRestoreMidRun(t *testing.T) {
	src := newCounting(t, nil)
	runUntilIn(t, src, 100)
	st, err := src.m.Save()
	if err != nil {
		t.Fatal(err)
	}
	if st.Exits == 0 || st.Clock <= 0 {
		t.Errorf("state has %d exits, clock %v", st.Exits, st.Clock)
	}
	ticks := src.read64(0x90008)
	count := src.read64(0x90000)
	if count != 100<<18 {
		t.Fatalf("count %d at the 100th in, want %d", count, 100<<18)
	}
	st2 := statetest.ThroughGobAndJSON(t, *st)

	dst := newCounting(t, nil)
	mem, err := src.m.Memory().Slice(0, src.m.Memory().Size())
	if err != nil {
		t.Fatal(err)
	}
	if err := dst.m.Memory().WriteAt(mem, 0); err != nil {
		t.Fatal(err)
	}
	if err := dst.m.Restore(&st2); err != nil {
		t.Fatal(err)
	}
	if dst.m.Exits() != st.Exits {
		t.Errorf("restored exit count %d, want %d", dst.m.Exits(), st.Exits)
	}
	dst.wantExit(20*time.Second, 256)
	if got := dst.read64(0x90000); got != 1<<26 {
		t.Errorf("final count %d", got)
	}
	if got := dst.read64(0x90008); got <= ticks {
		t.Errorf("timer ticks %d after restore, %d before: the PIT stopped", got, ticks)
	}
}

// TestRestoreRefuses: a state for another machine, or a broken one, is
// refused before anything changes, and the machine still runs its own
// guest to the end.
func TestRestoreRefuses(t *testing.T) {
	src := newCounting(t, nil)
	runUntilIn(t, src, 3)
	good, err := src.m.Save()
	if err != nil {
		t.Fatal(err)
	}
	for name, mutate := range map[string]func(s *machine.State){
		"version":         func(s *machine.State) { s.Version++ },
		"model":           func(s *machine.State) { s.Model = "other" },
		"memory size":     func(s *machine.State) { s.MemorySize *= 2 },
		"host kind":       func(s *machine.State) { s.Host = "elsewhere" },
		"cpuid":           func(s *machine.State) { s.CPUID = "0000" },
		"virtio devices":  func(s *machine.State) { s.Virtio = append(s.Virtio, machine.VirtioState{Name: "disk"}) },
		"negative clock":  func(s *machine.State) { s.Clock = -1 },
		"PIC state":       func(s *machine.State) { s.PIC.Master.IRR = 0x04; s.PIC.Master.Lines = 0 },
		"PIT state":       func(s *machine.State) { s.PIT.Port61 = 0xff },
		"UART state":      func(s *machine.State) { s.UART.RxFIFO = make([]byte, 1000) },
		"system controls": func(s *machine.State) { s.SysCtl.PortA = 0xff },
	} {
		t.Run(name, func(t *testing.T) {
			s := statetest.ThroughGobAndJSON(t, *good)
			mutate(&s)
			dst := newCounting(t, nil)
			err := dst.m.Restore(&s)
			if err == nil {
				t.Fatal("accepted")
			}
			if errors.Is(err, machine.ErrRestoreFailed) {
				t.Fatalf("refused only after changing the machine: %v", err)
			}
			t.Log(err)
			dst.wantExit(20*time.Second, 256)
		})
	}
}

// memWriter is a device that writes guest memory page 0x150000 on each
// port write, as a DMA-ing device would, on the vCPU thread.
type memWriter struct{ m *machine.Machine }

func (w memWriter) ReadPort(port uint16, data []byte) {}
func (w memWriter) WritePort(port uint16, data []byte) {
	w.m.Memory().WriteAt(data[:1], 0x150000)
}

// TestDirtySets: two users' dirty sets, taken while the guest runs, each
// see every page the guest and the VMM wrote after they were made; taking
// one never empties the other.
func TestDirtySets(t *testing.T) {
	g := newGuest(t, `
_start:
`+toUser+`
user:
	mov $0x100000, %rbx
1:	incq (%rbx)
	add $0x1000, %rbx
	cmp $0x140000, %rbx
	jb 1b
	mov $0x510, %dx
	out %al, %dx
	cmpq $0, 0x90020
	je user
	xor %eax, %eax
`+exitWithEAX, machine.Config{}, tinyguest.Options{})
	if err := g.m.RegisterPort(0x510, 1, memWriter{g.m}); err != nil {
		t.Fatal(err)
	}
	a, err := g.m.NewDirtySet()
	if err != nil {
		t.Fatal(err)
	}
	union := func(dst []uint64, bits []uint64) []uint64 {
		if dst == nil {
			dst = make([]uint64, len(bits))
		}
		for i := range bits {
			dst[i] |= bits[i]
		}
		return dst
	}
	done := make(chan machine.Stop, 1)
	go func() {
		stop, err := g.m.Run(context.Background())
		if err != nil {
			t.Error(err)
		}
		done <- stop
	}()
	time.Sleep(20 * time.Millisecond)
	b, err := g.m.NewDirtySet()
	if err != nil {
		t.Fatal(err)
	}
	var ua, ub []uint64
	for i := 0; i < 20; i++ {
		bits, err := a.Take()
		if err != nil {
			t.Fatal(err)
		}
		ua = union(ua, bits)
		if i%3 == 0 {
			bits, err := b.Take()
			if err != nil {
				t.Fatal(err)
			}
			ub = union(ub, bits)
		}
		time.Sleep(time.Millisecond)
	}
	// Tell the guest to stop: a VMM write from the vCPU thread.
	g.m.Do(func() { g.m.Memory().Write64(0x90020, 1) })
	if stop := <-done; stop.Kind != machine.StopTestExit {
		t.Fatalf("stop %v", stop)
	}
	for _, s := range []struct {
		name string
		set  *machine.DirtySet
		u    []uint64
	}{{"a", a, ua}, {"b", b, ub}} {
		bits, err := s.set.Take()
		if err != nil {
			t.Fatal(err)
		}
		u := union(s.u, bits)
		for p := uint64(0x100); p < 0x140; p++ {
			if u[p/64]&(1<<(p%64)) == 0 {
				t.Errorf("set %s lost guest-written page %#x", s.name, p<<12)
			}
		}
		for _, p := range []uint64{0x150, 0x90} {
			if u[p/64]&(1<<(p%64)) == 0 {
				t.Errorf("set %s lost VMM-written page %#x", s.name, p<<12)
			}
		}
		s.set.Close()
	}
	if _, err := a.Take(); err == nil {
		t.Error("Take on a closed set succeeded")
	}
}

// nopJournal is a machine.Journal that delivers nothing but the time.
type nopJournal struct{}

func (nopJournal) Deliver(p machine.Position, halted bool, live func() []machine.Input) ([]machine.Input, error) {
	return live(), nil
}
func (nopJournal) Injected(machine.Position, uint8) error            { return nil }
func (nopJournal) WindowRequested(machine.Position) error            { return nil }
func (nopJournal) Sync(*machine.SyncPoint) error                     { return nil }
func (nopJournal) NextSync(uint64, bool) (*machine.SyncPoint, error) { return nil, nil }
func (nopJournal) Live() bool                                        { return true }

// TestJournalCmdline: under a journal the guest kernel is kept off the TSC
// and still told about its virtio devices and the user's words.
func TestJournalCmdline(t *testing.T) {
	g := newGuest(t, "_start:\n hlt\n", machine.Config{Journal: nopJournal{}}, tinyguest.Options{})
	disk, _ := newDisk(t, 512)
	if _, err := g.m.AddVirtio("disk", disk); err != nil {
		t.Fatal(err)
	}
	line := g.m.KernelCmdline("extra=1")
	for _, want := range []string{"clocksource=jiffies", "nokaslr", "virtio_mmio.device=512@0xd0000000:5", "extra=1"} {
		if !strings.Contains(line, want) {
			t.Errorf("%q lacks %q", line, want)
		}
	}
	if !strings.Contains(line, "clearcpuid=tsc") || strings.Contains(line, "tsc_early_khz") || strings.Contains(line, "tsc=reliable") {
		t.Errorf("%q does not keep the guest off the TSC", line)
	}
	if !strings.HasSuffix(line, " extra=1") {
		t.Errorf("%q: the user's words must come last", line)
	}
}

// TestDirtyLogSeesKernelWrites: guest writes made in kernel mode (CPL0,
// which the lab host emulates instruction by instruction) reach KVM's
// dirty log like user-mode ones: state deltas and incremental digests rely
// on it. Both kinds of write, and a REP STOSQ, on pages of their own.
func TestDirtyLogSeesKernelWrites(t *testing.T) {
	g := newGuest(t, `
_start:
	mov $0x100000, %rbx
1:	movq $1, (%rbx)
	add $0x1000, %rbx
	cmp $0x110000, %rbx
	jb 1b
	mov $0x120000, %rdi
	mov $1024, %rcx
	xor %eax, %eax
	inc %eax
	rep stosq
`+toUser+`
user:
	mov $0x130000, %rbx
1:	movq $1, (%rbx)
	add $0x1000, %rbx
	cmp $0x140000, %rbx
	jb 1b
	xor %eax, %eax
`+exitWithEAX, machine.Config{}, tinyguest.Options{Kernel: true})
	d, err := g.m.NewDirtySet()
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	g.wantExit(5*time.Second, 0)
	bits, err := d.Take()
	if err != nil {
		t.Fatal(err)
	}
	dirty := func(addr uint64) bool { p := addr / machine.PageSize; return bits[p/64]&(1<<(p%64)) != 0 }
	for _, r := range []struct {
		what       string
		start, end uint64
	}{{"kernel-mode MOV", 0x100000, 0x110000}, {"kernel-mode REP STOSQ", 0x120000, 0x122000}, {"user-mode MOV", 0x130000, 0x140000}} {
		for a := r.start; a < r.end; a += machine.PageSize {
			if !dirty(a) {
				t.Errorf("%s to %#x is not in the dirty log", r.what, a)
			}
		}
	}
	if dirty(0x110000) || dirty(0x150000) {
		t.Errorf("pages the guest did not write are in the dirty set")
	}
}
