package pit

import (
	"bytes"
	"github.com/gokvm-ft/gokvm-ft/internal/statetest"

	"fmt"
	"math/big"
	"math/rand"
	"reflect"
	"testing"
	"time"
)

type fakeClock struct{ t time.Duration }

func (c *fakeClock) Now() time.Duration { return c.t }

type harness struct {
	*PIT
	clk   *fakeClock
	edges []bool
}

func newHarness() *harness {
	h := &harness{clk: &fakeClock{}}
	h.PIT = New(h.clk, func(level bool) { h.edges = append(h.edges, level) })
	return h
}

func (h *harness) out(port uint16, v uint8) { h.WritePort(port, []byte{v}) }

func (h *harness) in(port uint16) uint8 {
	b := []byte{0}
	h.ReadPort(port, b)
	return b[0]
}

// latched reads channel ch with a counter latch command (LSB/MSB access).
func (h *harness) latched(ch int) uint16 {
	h.out(PortControl, uint8(ch)<<6)
	lo := h.in(PortCounter0 + uint16(ch))
	hi := h.in(PortCounter0 + uint16(ch))
	return uint16(lo) | uint16(hi)<<8
}

// status latches and reads channel ch's status byte with read-back.
func (h *harness) status(ch int) uint8 {
	h.out(PortControl, 0xe0|2<<uint(ch))
	return h.in(PortCounter0 + uint16(ch))
}

func (h *harness) outPin(ch int) bool { return h.status(ch)&0x80 != 0 }

// program writes a control word and a 16-bit count (LSB then MSB).
func (h *harness) program(ch int, mode uint8, count uint16) {
	h.out(PortControl, uint8(ch)<<6|0x30|mode<<1)
	h.out(PortCounter0+uint16(ch), uint8(count))
	h.out(PortCounter0+uint16(ch), uint8(count>>8))
}

func (h *harness) takeEdges() []bool {
	e := h.edges
	h.edges = nil
	return e
}

// tt is the instant input tick n begins after a load: ceil(n*1e9/Freq),
// computed independently of the package's 128-bit arithmetic.
func tt(n uint64) time.Duration {
	x := new(big.Int).Mul(new(big.Int).SetUint64(n), big.NewInt(1e9))
	x.Add(x, big.NewInt(Freq-1))
	x.Div(x, big.NewInt(Freq))
	return time.Duration(x.Int64())
}

func TestTickConversion(t *testing.T) {
	for _, n := range []uint64{0, 1, 2, 3, 1193, 1193182, 65536, 1e9, 1193182 * 86400 * 30, 1 << 50} {
		if got := durToTicks(tt(n)); got != n {
			t.Errorf("ticks(tt(%d)) = %d", n, got)
		}
		if n > 0 {
			if got := durToTicks(tt(n) - 1); got != n-1 {
				t.Errorf("ticks(tt(%d)-1) = %d", n, got)
			}
		}
		if d, ok := tickToDur(n); !ok || d != tt(n) {
			t.Errorf("tickToDur(%d) = %v %v, want %v", n, d, ok, tt(n))
		}
	}
	if _, ok := tickToDur(^uint64(0)); ok {
		t.Error("tickToDur of a huge tick count must fail, not overflow")
	}
	if got := durToTicks(time.Duration(1<<63 - 1)); got == 0 {
		t.Error("durToTicks of max duration")
	}
}

func TestMode0CountsAndFires(t *testing.T) {
	h := newHarness()
	t0 := 5 * time.Millisecond
	h.clk.t = t0
	h.program(0, 0, 1000)
	if e := h.takeEdges(); !reflect.DeepEqual(e, []bool{false}) {
		t.Fatalf("edges after programming mode 0 = %v, want OUT0 low", e)
	}
	next, ok := h.Advance(t0)
	if !ok || next != t0+tt(1000) {
		t.Fatalf("next = %v %v, want %v", next, ok, t0+tt(1000))
	}
	for _, k := range []uint64{0, 1, 2, 500, 999} {
		h.clk.t = t0 + tt(k)
		if got := h.latched(0); got != uint16(1000-k) {
			t.Fatalf("count at tick %d = %d", k, got)
		}
		if h.outPin(0) {
			t.Fatalf("OUT high at tick %d", k)
		}
	}
	h.clk.t = t0 + tt(1000) - 1
	if h.outPin(0) {
		t.Fatal("OUT high 1ns before terminal count")
	}
	if e := h.takeEdges(); len(e) != 0 {
		t.Fatalf("early edges %v", e)
	}
	if _, ok := h.Advance(t0 + tt(1000)); ok {
		t.Fatal("mode 0 after terminal count must have no next edge")
	}
	if e := h.takeEdges(); !reflect.DeepEqual(e, []bool{true}) {
		t.Fatalf("edges at terminal count = %v", e)
	}
	h.clk.t = t0 + tt(1000)
	if !h.outPin(0) || h.latched(0) != 0 {
		t.Fatal("OUT/count at terminal count")
	}
	// The counter wraps and keeps counting, OUT stays high.
	h.clk.t = t0 + tt(1003)
	if got := h.latched(0); got != 0xfffd || !h.outPin(0) {
		t.Fatalf("count after wrap = %#x", got)
	}
	// A new count restarts: OUT low again.
	h.out(PortCounter0, 10)
	h.out(PortCounter0, 0)
	if e := h.takeEdges(); !reflect.DeepEqual(e, []bool{false}) {
		t.Fatalf("edges = %v", e)
	}
	if next, ok := h.Advance(h.clk.t); !ok || next != h.clk.t+tt(10) {
		t.Fatalf("next = %v %v", next, ok)
	}
}

func TestMode0FirstByteStopsCounting(t *testing.T) {
	h := newHarness()
	h.program(2, 0, 100)
	h.out(PortSystem, 1)
	h.program(2, 0, 100)
	h.clk.t = tt(40)
	h.out(PortCounter2, 0x50) // LSB only: counting stops
	h.clk.t = tt(500)
	if got := h.latched(2); got != 60 {
		t.Fatalf("count while disabled = %d, want 60", got)
	}
	if h.outPin(2) {
		t.Fatal("OUT high while disabled")
	}
	h.out(PortCounter2, 0) // MSB: count 0x50 = 80 loaded
	h.clk.t = tt(500) + tt(79)
	if h.outPin(2) || h.latched(2) != 1 {
		t.Fatal("OUT/count one tick before terminal count")
	}
	h.clk.t = tt(500) + tt(80)
	if !h.outPin(2) {
		t.Fatal("OUT low at terminal count")
	}
}

func TestLatchHoldsValue(t *testing.T) {
	h := newHarness()
	h.program(1, 2, 5000)
	h.clk.t = tt(100)
	h.out(PortControl, 0x40) // latch channel 1
	h.clk.t = tt(300)
	h.out(PortControl, 0x40) // ignored: previous latch not read yet
	if lo := h.in(PortCounter1); lo != uint8(4900&0xff) {
		t.Fatalf("latched LSB = %#x", lo)
	}
	h.clk.t = tt(400)
	if hi := h.in(PortCounter1); hi != uint8(4900>>8) {
		t.Fatalf("latched MSB = %#x", hi)
	}
	// Latch consumed: reads are live again.
	lo := h.in(PortCounter1)
	hi := h.in(PortCounter1)
	if got := uint16(lo) | uint16(hi)<<8; got != 4600 {
		t.Fatalf("live count = %d, want 4600", got)
	}
	if got := h.latched(1); got != 4600 {
		t.Fatalf("latched = %d", got)
	}
}

func TestAccessModes(t *testing.T) {
	h := newHarness()
	// LSB only: the MSB is 0.
	h.out(PortControl, 0x50|2<<1) // ch1, LSB, mode 2
	h.out(PortCounter1, 200)
	h.clk.t = tt(50)
	if got := h.in(PortCounter1); got != 150 {
		t.Fatalf("LSB-only read = %d", got)
	}
	if got := h.in(PortCounter1); got != 150 {
		t.Fatalf("LSB-only reads do not toggle: %d", got)
	}
	// MSB only: the LSB is 0.
	h.out(PortControl, 0x60|2<<1)
	h.out(PortCounter1, 0x02) // 512
	h.clk.t = tt(50) + tt(256)
	if got := h.in(PortCounter1); got != 0x01 {
		t.Fatalf("MSB-only read = %#x", got)
	}
	if got := h.status(1) & 0x30; got != 0x20 {
		t.Fatalf("status RW = %#x", got)
	}
	// LSB then MSB, with unlatched reads alternating.
	h.out(PortControl, 0x70|2<<1)
	h.out(PortCounter1, 0x34)
	h.out(PortCounter1, 0x12)
	t1 := h.clk.t
	if lo := h.in(PortCounter1); lo != 0x34 {
		t.Fatalf("LSB = %#x", lo)
	}
	h.clk.t = t1 + tt(0x10)
	if hi := h.in(PortCounter1); hi != 0x12 {
		t.Fatalf("MSB = %#x", hi)
	}
	if lo := h.in(PortCounter1); lo != 0x24 {
		t.Fatalf("LSB = %#x", lo)
	}
	// A control word resets the read flip-flop.
	h.out(PortControl, 0x70|2<<1)
	h.out(PortCounter1, 0x00)
	h.out(PortCounter1, 0x01)
	if lo := h.in(PortCounter1); lo != 0x00 {
		t.Fatalf("LSB after control word = %#x", lo)
	}
}

func TestReadBack(t *testing.T) {
	h := newHarness()
	h.out(PortControl, 0x34) // ch0, LSB/MSB, mode 2, binary
	if got := h.status(0); got != 0xf4 {
		t.Fatalf("status before count = %#x, want OUT|null|RW3|mode2 = 0xf4", got)
	}
	h.out(PortCounter0, 0x00)
	h.out(PortCounter0, 0x10)
	if got := h.status(0); got != 0xb4 {
		t.Fatalf("status after count = %#x, want 0xb4", got)
	}
	// Mode 0 and BCD on channel 2; mode 6 on channel 1.
	h.out(PortControl, 0xb1)
	h.out(PortControl, 0x7c)
	// One read-back latching status and count of channels 0 and 2.
	h.clk.t = tt(0x100)
	h.out(PortControl, 0xc0|0x02|0x08)
	if got := h.in(PortCounter0); got != 0xb4 {
		t.Fatalf("ch0 status = %#x", got)
	}
	h.clk.t = tt(0x300)
	if lo, hi := h.in(PortCounter0), h.in(PortCounter0); lo != 0 || hi != 0x0f {
		t.Fatalf("ch0 latched count = %#x %#x", lo, hi)
	}
	if got := h.in(PortCounter2); got != 0x71 {
		t.Fatalf("ch2 status = %#x, want null|RW3|mode0|BCD = 0x71", got)
	}
	if got := h.status(1); got != 0xfc {
		t.Fatalf("ch1 status = %#x, want mode 6 as programmed = 0xfc", got)
	}
	// A second status latch before the read is ignored.
	h.out(PortControl, 0xe2)
	h.out(PortControl, 0x30) // reprogram ch0 mode 0: OUT low...
	h.out(PortControl, 0xe2)
	if got := h.in(PortCounter0); got != 0x70 {
		t.Fatalf("status = %#x (control word clears latches)", got)
	}
	// Count-only read-back.
	h.out(PortCounter0, 0x20)
	h.out(PortCounter0, 0x00)
	h.out(PortControl, 0xd2)
	if lo, hi := h.in(PortCounter0), h.in(PortCounter0); lo != 0x20 || hi != 0 {
		t.Fatalf("count read-back = %#x %#x", lo, hi)
	}
}

func TestNullCount(t *testing.T) {
	h := newHarness()
	h.program(0, 2, 100)
	if h.status(0)&0x40 != 0 {
		t.Fatal("null count set after count loaded")
	}
	h.clk.t = tt(130)
	h.out(PortCounter0, 50)
	h.out(PortCounter0, 0)
	if h.status(0)&0x40 == 0 {
		t.Fatal("null count clear before the new count is loaded")
	}
	h.clk.t = tt(199)
	if h.status(0)&0x40 == 0 || h.latched(0) != 1 {
		t.Fatal("new count loaded before the period ended")
	}
	h.clk.t = tt(200)
	if h.status(0)&0x40 != 0 || h.latched(0) != 50 {
		t.Fatal("new count not loaded at the end of the period")
	}
	h.clk.t = tt(249)
	if h.outPin(0) {
		t.Fatal("OUT high in the last tick of the new period")
	}
	// Mode 1 waits for a trigger: null count stays.
	h.out(PortControl, 0xb2)
	h.out(PortCounter2, 5)
	h.out(PortCounter2, 0)
	if h.status(2)&0x40 == 0 {
		t.Fatal("mode 1 count loaded without a trigger")
	}
	h.out(PortSystem, 1)
	if h.status(2)&0x40 != 0 {
		t.Fatal("null count after trigger")
	}
}

func TestZeroCountIs65536(t *testing.T) {
	h := newHarness()
	h.program(0, 0, 0)
	if got := h.latched(0); got != 0 {
		t.Fatalf("initial count = %#x", got)
	}
	h.clk.t = tt(1)
	if got := h.latched(0); got != 0xffff {
		t.Fatalf("count after one tick = %#x", got)
	}
	if next, ok := h.Advance(h.clk.t); !ok || next != tt(65536) {
		t.Fatalf("next = %v %v, want %v", next, ok, tt(65536))
	}
	h.program(0, 2, 0)
	t0 := h.clk.t
	if next, ok := h.Advance(t0); !ok || next != t0+tt(65536) {
		t.Fatalf("mode 2 next = %v, want %v", next, t0+tt(65536))
	}
}

func TestMode2Periodic(t *testing.T) {
	h := newHarness()
	const latch = 1193 // Linux's LATCH for HZ=1000
	t0 := time.Second
	h.clk.t = t0
	h.program(0, 2, latch)
	if e := h.takeEdges(); len(e) != 0 {
		t.Fatalf("programming mode 2 produced edges %v", e)
	}
	next, ok := h.Advance(t0)
	for k := uint64(1); k <= 5; k++ {
		want := t0 + tt(k*latch)
		if !ok || next != want {
			t.Fatalf("period %d: next = %v %v, want %v", k, next, ok, want)
		}
		if _, ok := h.Advance(want - tt(latch/2)); !ok || len(h.edges) != 0 {
			t.Fatalf("period %d: edges before the deadline: %v", k, h.edges)
		}
		// In the one low tick the fall is delivered; the rise at
		// the deadline completes the pulse.
		h.Advance(want - 1)
		if e := h.takeEdges(); !reflect.DeepEqual(e, []bool{false}) {
			t.Fatalf("period %d: edges in the low tick %v", k, e)
		}
		next, ok = h.Advance(want)
		if e := h.takeEdges(); !reflect.DeepEqual(e, []bool{true}) {
			t.Fatalf("period %d: edges %v, want the rise", k, e)
		}
	}
	// Counter and OUT within a period: N..1, low only while at 1.
	h = newHarness()
	h.clk.t = t0
	h.program(0, 2, latch)
	for _, c := range []struct {
		k   uint64
		ce  uint16
		out bool
	}{{0, latch, true}, {1, latch - 1, true}, {latch - 2, 2, true}, {latch - 1, 1, false}, {latch, latch, true}, {3*latch + 7, latch - 7, true}} {
		h.clk.t = t0 + tt(c.k)
		if got := h.latched(0); got != c.ce {
			t.Errorf("tick %d: count %d, want %d", c.k, got, c.ce)
		}
		if got := h.outPin(0); got != c.out {
			t.Errorf("tick %d: OUT %v, want %v", c.k, got, c.out)
		}
	}
}

func TestMode2CountsAtExactTicks(t *testing.T) {
	h := newHarness()
	h.program(1, 2, 10)
	for k := uint64(0); k < 40; k++ {
		h.clk.t = tt(k)
		want := uint16(10 - k%10)
		if got := h.latched(1); got != want {
			t.Fatalf("tick %d: %d, want %d", k, got, want)
		}
		if got, want := h.outPin(1), k%10 != 9; got != want {
			t.Fatalf("tick %d: OUT %v", k, got)
		}
	}
}

func TestMode3SquareWave(t *testing.T) {
	for _, c := range []struct {
		n    uint16
		high uint64
		ces  []uint16
	}{
		{10, 5, []uint16{10, 8, 6, 4, 2, 10, 8, 6, 4, 2}},
		{9, 5, []uint16{8, 6, 4, 2, 0, 8, 6, 4, 2}},
	} {
		h := newHarness()
		h.program(0, 3, c.n)
		N := uint64(c.n)
		for k := uint64(0); k < 3*N; k++ {
			h.clk.t = tt(k)
			if got, want := h.outPin(0), k%N < c.high; got != want {
				t.Fatalf("n=%d tick %d: OUT %v", c.n, k, got)
			}
			if got := h.latched(0); got != c.ces[k%N] {
				t.Fatalf("n=%d tick %d: count %d, want %d", c.n, k, got, c.ces[k%N])
			}
		}
		h.takeEdges()
		next, ok := h.Advance(h.clk.t)
		if !ok || next != tt(3*N) {
			t.Fatalf("n=%d: next %v, want %v", c.n, next, tt(3*N))
		}
	}
}

func TestMode4OneShot(t *testing.T) {
	h := newHarness()
	t0 := 3 * time.Millisecond
	h.clk.t = t0
	// Linux's i8253 oneshot: set_state_oneshot, then set_next_event.
	h.out(PortControl, 0x38)
	if _, ok := h.Advance(t0); ok {
		t.Fatal("deadline before a count was written")
	}
	h.out(PortCounter0, 100)
	h.out(PortCounter0, 0)
	if e := h.takeEdges(); len(e) != 0 {
		t.Fatalf("edges %v while OUT stays high", e)
	}
	next, ok := h.Advance(t0)
	if !ok || next != t0+tt(101) {
		t.Fatalf("next = %v %v, want %v (rise after the one-tick strobe)", next, ok, t0+tt(101))
	}
	h.clk.t = t0 + tt(99)
	if !h.outPin(0) {
		t.Fatal("OUT low before terminal count")
	}
	h.clk.t = t0 + tt(100)
	if h.outPin(0) || h.latched(0) != 0 {
		t.Fatal("strobe not low at terminal count")
	}
	if _, ok := h.Advance(next); ok {
		t.Fatal("one-shot must not repeat")
	}
	if e := h.takeEdges(); !reflect.DeepEqual(e, []bool{false, true}) {
		t.Fatalf("edges %v, want one pulse", e)
	}
	if _, ok := h.Advance(next + time.Second); ok || len(h.edges) != 0 {
		t.Fatalf("more pulses: %v", h.edges)
	}
	// Writing a new count rearms it.
	t1 := next + time.Second
	h.clk.t = t1
	h.out(PortCounter0, 0x10)
	h.out(PortCounter0, 0x00)
	if next, ok := h.Advance(t1); !ok || next != t1+tt(17) {
		t.Fatalf("rearmed next = %v %v", next, ok)
	}
	// ... and rewriting before expiry restarts from the new count.
	h.clk.t = t1 + tt(10)
	h.out(PortCounter0, 0x20)
	h.out(PortCounter0, 0x00)
	if next, ok := h.Advance(h.clk.t); !ok || next != h.clk.t+tt(33) {
		t.Fatalf("restarted next = %v %v", next, ok)
	}
	// Arriving late still gives exactly one pulse.
	h.Advance(h.clk.t + time.Hour)
	if e := h.takeEdges(); !reflect.DeepEqual(e, []bool{false, true}) {
		t.Fatalf("late edges %v", e)
	}
}

func TestMissedPeriodsCoalesce(t *testing.T) {
	h := newHarness()
	h.program(0, 2, 100)
	h.Advance(0)
	h.clk.t = tt(1000) + 5
	next, ok := h.Advance(h.clk.t)
	if e := h.takeEdges(); !reflect.DeepEqual(e, []bool{false, true}) {
		t.Fatalf("edges after 10 periods = %v, want a single pulse", e)
	}
	if !ok || next != tt(1100) {
		t.Fatalf("next = %v, want %v", next, tt(1100))
	}
	// Mode 3: the fall at mid-period was missed too; still one pulse.
	h.program(0, 3, 100)
	h.Advance(h.clk.t)
	h.takeEdges()
	t0 := h.clk.t
	h.Advance(t0 + tt(1050))
	if e := h.takeEdges(); !reflect.DeepEqual(e, []bool{false, true, false}) {
		t.Fatalf("mode 3 edges = %v", e)
	}
	// A port access catches up too.
	h.clk.t = t0 + tt(1100)
	h.in(PortCounter1)
	if e := h.takeEdges(); !reflect.DeepEqual(e, []bool{true}) {
		t.Fatalf("edges on port access = %v", e)
	}
}

func TestAdvanceNeverGoesBack(t *testing.T) {
	h := newHarness()
	h.program(0, 2, 100)
	n1, _ := h.Advance(tt(250))
	h.takeEdges()
	n2, ok := h.Advance(tt(50))
	if !ok || n2 != n1 || len(h.edges) != 0 {
		t.Fatalf("backwards Advance: next %v (was %v), edges %v", n2, n1, h.edges)
	}
	h.Advance(-time.Hour)
	// Port reads use the later of the clock and what was seen.
	if got := h.latched(0); got != 50 {
		t.Fatalf("count = %d, want 50 at the latest time seen", got)
	}
}

func TestMode2NewCountAtPeriodEnd(t *testing.T) {
	h := newHarness()
	h.program(0, 2, 100)
	h.clk.t = tt(150)
	h.out(PortCounter0, 40)
	h.out(PortCounter0, 0)
	next, ok := h.Advance(h.clk.t)
	if !ok || next != tt(200) {
		t.Fatalf("next = %v, want %v (old period)", next, tt(200))
	}
	h.clk.t = next
	next, _ = h.Advance(next)
	if next != tt(240) {
		t.Fatalf("next = %v, want %v (new period)", next, tt(240))
	}
	// Across the switch in one go.
	h.program(0, 2, 100)
	t0 := h.clk.t
	h.clk.t = t0 + tt(50)
	h.out(PortCounter0, 10)
	h.out(PortCounter0, 0)
	h.takeEdges()
	next, _ = h.Advance(t0 + tt(125))
	if e := h.takeEdges(); !reflect.DeepEqual(e, []bool{false, true}) || next != t0+tt(130) {
		t.Fatalf("edges %v next %v, want %v", e, next, t0+tt(130))
	}
}

func TestChannel2Gate(t *testing.T) {
	h := newHarness()
	// Mode 0, gate low: loaded but not counting.
	h.program(2, 0, 100)
	h.clk.t = tt(500)
	if got := h.latched(2); got != 100 {
		t.Fatalf("count with gate low = %d", got)
	}
	h.out(PortSystem, 0x01)
	t0 := h.clk.t
	h.clk.t = t0 + tt(30)
	if got := h.latched(2); got != 70 {
		t.Fatalf("count = %d, want 70", got)
	}
	h.out(PortSystem, 0x00) // pause
	h.clk.t = t0 + tt(1000)
	if got := h.latched(2); got != 70 {
		t.Fatalf("paused count = %d", got)
	}
	h.out(PortSystem, 0x01) // resume
	t1 := h.clk.t
	h.clk.t = t1 + tt(69)
	if h.in(PortSystem)&0x20 != 0 {
		t.Fatal("OUT2 high early")
	}
	h.clk.t = t1 + tt(70)
	if h.in(PortSystem)&0x20 == 0 {
		t.Fatal("OUT2 low at terminal count after resume")
	}

	// Mode 2: gate low forces OUT high and stops; rising reloads.
	h.program(2, 2, 10)
	t2 := h.clk.t
	h.clk.t = t2 + tt(9)
	if h.outPin(2) {
		t.Fatal("mode 2 OUT not low at count 1")
	}
	h.out(PortSystem, 0x00)
	if !h.outPin(2) {
		t.Fatal("gate low did not force OUT high")
	}
	h.clk.t = t2 + tt(100)
	h.out(PortSystem, 0x01)
	h.clk.t += tt(3)
	if got := h.latched(2); got != 7 {
		t.Fatalf("count after gate reload = %d, want 7", got)
	}

	// Mode 1: hardware retriggerable one-shot.
	h.out(PortSystem, 0x00)
	h.program(2, 1, 50)
	if !h.outPin(2) {
		t.Fatal("mode 1 OUT low before trigger")
	}
	h.clk.t += tt(100)
	if !h.outPin(2) {
		t.Fatal("mode 1 started without trigger")
	}
	h.out(PortSystem, 0x01)
	t3 := h.clk.t
	h.clk.t = t3 + tt(1)
	if h.outPin(2) {
		t.Fatal("mode 1 OUT high after trigger")
	}
	h.out(PortSystem, 0x00) // gate low does not stop mode 1
	h.clk.t = t3 + tt(20)
	h.out(PortSystem, 0x01) // retrigger
	t3 = h.clk.t
	h.clk.t = t3 + tt(49)
	if h.outPin(2) {
		t.Fatal("retrigger did not restart")
	}
	h.clk.t = t3 + tt(50)
	if !h.outPin(2) {
		t.Fatal("mode 1 OUT low after terminal count")
	}

	// Mode 5: hardware triggered strobe.
	h.out(PortSystem, 0x00)
	h.program(2, 5, 20)
	h.out(PortSystem, 0x01)
	t4 := h.clk.t
	for _, c := range []struct {
		k    uint64
		want bool
	}{{0, true}, {19, true}, {20, false}, {21, true}, {200, true}} {
		k, want := c.k, c.want
		h.clk.t = t4 + tt(k)
		if got := h.outPin(2); got != want {
			t.Fatalf("mode 5 tick %d: OUT %v", k, got)
		}
	}
	// Channels 0 and 1 ignore port 0x61.
	h.program(1, 0, 10)
	h.out(PortSystem, 0x00)
	h.clk.t += tt(10)
	if !h.outPin(1) {
		t.Fatal("channel 1 gated by port 0x61")
	}
}

// TestLinuxTSCCalibration follows arch/x86/kernel/tsc.c:pit_calibrate_tsc:
// gate high with the speaker off, channel 2 mode 0 with a 50 ms count,
// then poll port 0x61 bit 5.
func TestLinuxTSCCalibration(t *testing.T) {
	h := newHarness()
	h.clk.t = 123456789
	const latch = Freq / (1000 / 50)
	h.out(PortSystem, (h.in(PortSystem)&^0x02)|0x01)
	h.out(PortControl, 0xb0)
	h.out(PortCounter2, latch&0xff)
	h.out(PortCounter2, latch>>8)
	start := h.clk.t
	polls := 0
	for h.in(PortSystem)&0x20 == 0 {
		polls++
		if polls > 1e6 {
			t.Fatal("OUT2 never went high")
		}
		h.clk.t += 333 * time.Nanosecond
	}
	want := start + tt(latch)
	if h.clk.t < want || h.clk.t >= want+333 {
		t.Fatalf("OUT2 went high at %v, want within a poll of %v", h.clk.t-start, want-start)
	}

	// quick_pit_calibrate: count from 0xffff, read LSB/MSB pairs
	// without latching and watch the MSB fall.
	h.out(PortControl, 0xb0)
	h.out(PortCounter2, 0xff)
	h.out(PortCounter2, 0xff)
	t0 := h.clk.t
	for i := 0; i < 100; i++ {
		h.clk.t = t0 + tt(uint64(i)*256+1)
		h.in(PortCounter2)
		if got := h.in(PortCounter2); got != uint8(0xff-i) {
			t.Fatalf("MSB after %d*256 ticks = %#x", i, got)
		}
	}
	if e := h.takeEdges(); len(e) != 0 {
		t.Fatalf("channel 2 drove IRQ0: %v", e)
	}
}

func TestPort61(t *testing.T) {
	h := newHarness()
	for _, c := range []struct {
		t   time.Duration
		ref bool
	}{{0, false}, {15084, false}, {15085, true}, {30169, true}, {30170, false}, {45255, true}} {
		h.clk.t = c.t
		v := h.in(PortSystem)
		if got := v&0x10 != 0; got != c.ref {
			t.Fatalf("refresh bit at %v = %v", c.t, got)
		}
		if v&0xc0 != 0 {
			t.Fatalf("bits 7:6 = %#x", v)
		}
	}
	h.clk.t = 4 * 15085
	h.out(PortSystem, 0xff)
	if got := h.in(PortSystem); got != 0x0f|0x20 {
		t.Fatalf("port 0x61 = %#x, want written bits 0..3 and OUT2 (unprogrammed: high)", got)
	}
	h.out(PortSystem, 0x02)
	if got := h.in(PortSystem) & 0x0f; got != 0x02 {
		t.Fatalf("port 0x61 = %#x", got)
	}
	// OUT2 follows channel 2.
	h.program(2, 0, 10)
	if h.in(PortSystem)&0x20 != 0 {
		t.Fatal("OUT2 high after programming mode 0")
	}
}

func TestWideAndUndecoded(t *testing.T) {
	h := newHarness()
	h.program(0, 2, 0x1234)
	for _, n := range []int{1, 2, 4} {
		h.out(PortControl, 0x00)
		b := make([]byte, n)
		h.ReadPort(PortCounter0, b)
		if b[0] != 0x34 {
			t.Fatalf("%d-byte read = %x", n, b)
		}
		for _, x := range b[1:] {
			if x != 0xff {
				t.Fatalf("%d-byte read = %x", n, b)
			}
		}
		h.in(PortCounter0)
	}
	if got := h.in(PortControl); got != 0xff {
		t.Fatalf("control port read = %#x", got)
	}
	for _, port := range []uint16{0, 0x20, 0x44, 0x60, 0x62, 0xffff} {
		b := []byte{0, 0, 0, 0}
		h.ReadPort(port, b)
		if !bytes.Equal(b, []byte{0xff, 0xff, 0xff, 0xff}) {
			t.Fatalf("undecoded port %#x read %x", port, b)
		}
	}
	before := h.Save()
	h.WritePort(0x44, []byte{0x12})
	h.WritePort(PortControl, nil)
	h.ReadPort(PortCounter0, nil)
	if !reflect.DeepEqual(h.Save(), before) {
		t.Fatal("undecoded or empty accesses changed state")
	}
	// A wide write uses only the low byte.
	h.WritePort(PortControl, []byte{0x34, 0xff, 0xff, 0xff})
	if got := h.status(0); got != 0xf4 {
		t.Fatalf("status after wide control write = %#x", got)
	}
}

func TestLongGuestTime(t *testing.T) {
	h := newHarness()
	days := 40 * 24 * time.Hour
	h.clk.t = days
	h.program(0, 2, 1193)
	next, ok := h.Advance(days + 7*24*time.Hour)
	ticks := durToTicks(7 * 24 * time.Hour)
	want := days + tt((ticks/1193+1)*1193)
	if !ok || next != want {
		t.Fatalf("next = %v, want %v", next, want)
	}
	if got := h.latched(0); got != uint16(1193-ticks%1193) {
		t.Fatalf("count = %d", got)
	}
}

// randomOps drives h with a reproducible stream of port accesses, clock
// steps and Advance calls, returning everything observable.
func randomOps(h *harness, seed int64, n int, garbage bool) string {
	r := rand.New(rand.NewSource(seed))
	ports := []uint16{0x40, 0x41, 0x42, 0x43, 0x61}
	var log bytes.Buffer
	for i := 0; i < n; i++ {
		if r.Intn(3) == 0 {
			h.clk.t += time.Duration(r.Intn(100000))
		}
		if garbage && r.Intn(50) == 0 {
			h.clk.t = time.Duration(r.Int63n(1 << 50))
		}
		port := ports[r.Intn(len(ports))]
		if garbage && r.Intn(5) == 0 {
			port = uint16(r.Intn(0x10000))
		}
		size := []int{1, 2, 4}[r.Intn(3)]
		if garbage && r.Intn(8) == 0 {
			size = r.Intn(9)
		}
		b := make([]byte, size)
		switch r.Intn(5) {
		case 0, 1:
			r.Read(b)
			if !garbage && port == 0x43 {
				// Keep counters mostly in useful modes.
				b[0] = b[0]&0xc0 | 0x30 | b[0]&0x0f
				if r.Intn(4) == 0 {
					b[0] = 0xc0 | b[0]&0x3e
				}
			}
			h.WritePort(port, b)
		case 2, 3:
			h.ReadPort(port, b)
			log.Write(b)
		case 4:
			at := h.clk.t
			if garbage {
				at = time.Duration(r.Int63n(1<<62)) - 1<<40
			}
			next, ok := h.Advance(at)
			fmt.Fprintf(&log, "A%v%v", next, ok)
		}
	}
	fmt.Fprintf(&log, "E%v", h.takeEdges())
	return log.String()
}

func TestGarbageNeverPanics(t *testing.T) {
	for seed := int64(0); seed < 300; seed++ {
		h := newHarness()
		randomOps(h, seed, 3000, true)
		if err := New(nil, nil).Restore(h.Save()); err != nil {
			t.Fatalf("seed %d: saved state does not restore: %v", seed, err)
		}
	}
	p := New(nil, nil)
	p.WritePort(PortControl, []byte{0x34})
	p.WritePort(PortCounter0, []byte{1})
	p.WritePort(PortCounter0, []byte{0})
	p.Advance(time.Hour)
	p.ReadPort(PortSystem, make([]byte, 1))
}

func TestSaveRestoreRoundTrip(t *testing.T) {
	for seed := int64(0); seed < 150; seed++ {
		a := newHarness()
		randomOps(a, seed, 400, false)
		a.takeEdges()
		s := a.Save()

		sj := statetest.ThroughGobAndJSON(t, s)
		if !reflect.DeepEqual(s, sj) {
			t.Fatalf("seed %d: state changed through encoding", seed)
		}
		b := newHarness()
		b.clk.t = a.clk.t
		if err := b.Restore(sj); err != nil {
			t.Fatalf("seed %d: %v", seed, err)
		}
		if len(b.edges) != 0 {
			t.Fatal("Restore drove IRQ0")
		}
		if !reflect.DeepEqual(b.Save(), s) {
			t.Fatalf("seed %d: restored state differs", seed)
		}
		la := randomOps(a, seed+5000, 400, false)
		lb := randomOps(b, seed+5000, 400, false)
		if la != lb {
			t.Fatalf("seed %d: behaviour differs after restore", seed)
		}
	}
}

func TestRestoreRejects(t *testing.T) {
	g := newHarness()
	g.program(0, 2, 100)
	g.clk.t = tt(150)
	g.out(PortCounter0, 50)
	g.out(PortCounter0, 0)
	g.Advance(g.clk.t)
	base := g.Save()
	if !base.Channels[0].Pending {
		t.Fatal("test setup: expected a pending reload")
	}
	bad := []func(*State){
		func(s *State) { s.Channels[1].Mode = 8 },
		func(s *State) { s.Channels[0].Access = 0 },
		func(s *State) { s.Channels[2].Access = 4 },
		func(s *State) { s.Channels[1].Access = 1; s.Channels[1].ReadHigh = true },
		func(s *State) { s.Channels[0].Gate = false },
		func(s *State) { s.Channels[0].Start = 65537 },
		func(s *State) { s.Channels[0].Start = 0 },
		func(s *State) { s.Channels[2].Held = 1 << 20 },
		func(s *State) { s.Channels[0].Paused = true },
		func(s *State) { s.Channels[0].LoadTime = s.LastTime + 1 },
		func(s *State) { s.Channels[0].LoadTime = -1 },
		func(s *State) { s.Channels[0].StartTick = 1 << 40 },
		func(s *State) { s.Channels[0].PendingCount = 0 },
		func(s *State) { s.Channels[0].PendingTick = s.Channels[0].StartTick },
		func(s *State) { s.Channels[0].Mode = 0 },
		func(s *State) { s.Port61 = 0x10 },
		func(s *State) { s.Port61 = 0x01 },
		func(s *State) { s.LastTime = -5 },
		func(s *State) { s.LastCheck = s.LastTime + 1 },
	}
	for i, f := range bad {
		s := base
		f(&s)
		h := newHarness()
		h.program(1, 3, 77)
		before := h.Save()
		if err := h.Restore(s); err == nil {
			t.Errorf("case %d: bad state accepted", i)
		} else {
			t.Logf("case %d: %v", i, err)
		}
		if !reflect.DeepEqual(h.Save(), before) {
			t.Errorf("case %d: failed restore changed the device", i)
		}
	}
	// The good state resumes exactly where it was.
	h := newHarness()
	h.clk.t = g.clk.t
	if err := h.Restore(base); err != nil {
		t.Fatal(err)
	}
	if next, ok := h.Advance(h.clk.t); !ok || next != tt(200) {
		t.Fatalf("restored next = %v %v", next, ok)
	}
}
