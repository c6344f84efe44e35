// Package pit models the PC's Intel 8254 programmable interval timer
// (channels 0..2 at ports 0x40..0x42, control word at 0x43) and the NMI
// status and control port 0x61 (channel 2 gate, speaker enable, refresh
// toggle, OUT2).
//
// Channel 0's OUT drives IRQ0 through a callback; channel 2 is what Linux
// uses, together with port 0x61, to calibrate the TSC. Every counter value
// and OUT level is computed from guest time read from a Clock, never from
// the host, so the model is a pure function of its state, the port accesses
// and the clock readings: a recorded run replays exactly. It starts no
// goroutines and must be called from one thread.
//
// Timing model: the input clock runs at Freq Hz with its phase taken from
// the moment a count is loaded; a count is loaded into the counting element
// at the instant it is written (or at the gate edge that triggers it), so in
// mode 0 OUT rises exactly N ticks after the count write. The BCD bit is
// recorded and reported in the status byte, but counting is always binary
// (a count of 0 means 65536). In mode 3 with an odd count the OUT timing is
// exact ((N+1)/2 ticks high, (N-1)/2 low); a new count written while modes
// 2 and 3 are counting takes effect at the end of the current period.
package pit

import (
	"errors"
	"fmt"
	"math"
	"math/bits"
	"time"
)

// Freq is the 8254's input clock in Hz.
const Freq = 1193182

// Ports decoded by the PIT.
const (
	PortCounter0 = 0x40
	PortCounter1 = 0x41
	PortCounter2 = 0x42
	PortControl  = 0x43
	PortSystem   = 0x61 // NMI status and control
)

// refreshPeriod is how often port 0x61 bit 4 toggles (the DRAM refresh
// request of the original PC, which software still uses as a delay).
const refreshPeriod = 15085 * time.Nanosecond

// port61RW is the part of port 0x61 that reads back as written: gate 2,
// speaker data enable and the parity/channel check enables.
const port61RW = 0x0f

// Clock is the source of guest time: the time since machine start,
// monotonic.
type Clock interface {
	Now() time.Duration
}

// durToTicks converts elapsed guest time into whole input clock ticks. The
// 128-bit product cannot overflow and its quotient always fits.
func durToTicks(d time.Duration) uint64 {
	if d <= 0 {
		return 0
	}
	hi, lo := bits.Mul64(uint64(d), Freq)
	q, _ := bits.Div64(hi, lo, 1e9)
	return q
}

// tickToDur is the first instant (after the load time) at which tick t has
// begun: ceil(t*1e9/Freq). ok is false when it does not fit a Duration.
func tickToDur(t uint64) (time.Duration, bool) {
	hi, lo := bits.Mul64(t, 1e9)
	if hi >= Freq {
		return 0, false
	}
	q, r := bits.Div64(hi, lo, Freq)
	if r != 0 {
		q++
	}
	if q > math.MaxInt64 {
		return 0, false
	}
	return time.Duration(q), true
}

// segOut is OUT d ticks into a counting segment of count n in mode m
// (effective mode 0..5). fired says terminal count was reached in an
// earlier segment (a counter paused by its gate and resumed).
func segOut(m uint8, n uint32, fired bool, d uint64) bool {
	N := uint64(n)
	switch m {
	case 0, 1:
		return fired || d >= N
	case 4, 5:
		return fired || d != N
	case 2:
		return d%N != N-1
	default: // 3
		return d%N < (N+1)/2
	}
}

// segCE is the counting element d ticks into a segment.
func segCE(m uint8, n uint32, d uint64) uint16 {
	N := uint64(n)
	switch m {
	case 0, 1, 4, 5:
		return uint16(N - d) // wraps through 0xffff and keeps counting
	case 2:
		return uint16(N - d%N)
	default: // 3: decrements by two; odd counts load N-1
		p := d % N
		half := (N + 1) / 2
		if p >= half {
			p -= half
		}
		if N&1 == 0 {
			return uint16(N - 2*p)
		}
		return uint16(N - 1 - 2*p)
	}
}

// segRiseAfter is the first tick d' > d of a segment at which OUT rises.
func segRiseAfter(m uint8, n uint32, fired bool, d uint64) (uint64, bool) {
	N := uint64(n)
	var r uint64
	switch m {
	case 0, 1:
		if fired || N == 0 {
			return 0, false
		}
		r = N
	case 4, 5:
		if fired {
			return 0, false
		}
		r = N + 1
	default: // 2, 3: OUT rises at the start of every period
		if N <= 1 {
			return 0, false // constant OUT: mode 2/3 with count 1
		}
		r = (d/N + 1) * N
	}
	if r <= d {
		return 0, false
	}
	return r, true
}

// channel is one counter.
type channel struct {
	mode          uint8 // as programmed, 0..7; 6 and 7 alias 2 and 3
	access        uint8 // 1 LSB, 2 MSB, 3 LSB then MSB
	bcd           bool
	cr            uint16 // count register, as written
	lsb           uint8  // LSB received, waiting for the MSB
	writeHi       bool   // write flip-flop: next byte is the MSB
	readHi        bool   // read flip-flop: next byte is the MSB
	countLatched  bool
	latch         uint16
	statusLatched bool
	status        uint8
	gate          bool
	crValid       bool // a count was written since the control word
	nullCount     bool

	// While running, the counter is a function of time: ticks since
	// loadTime, minus startTick, into a segment that began with start.
	running   bool
	loadTime  time.Duration
	startTick uint64
	start     uint32
	fired     bool
	// Modes 2/3: a count written while counting, loaded at pendingTick.
	pending     bool
	pendingN    uint32
	pendingTick uint64

	// While not running: the frozen counting element and OUT. paused
	// means a gate-low pause in modes 0/4 that resumes on a gate rise.
	paused  bool
	held    uint32
	heldOut bool
}

func (c *channel) eff() uint8 {
	if c.mode >= 6 {
		return c.mode - 4
	}
	return c.mode
}

func countOf(v uint16) uint32 {
	if v == 0 {
		return 65536
	}
	return uint32(v)
}

// ticks is the absolute tick count since loadTime at now.
func (c *channel) ticks(now time.Duration) uint64 {
	if now <= c.loadTime {
		return 0
	}
	return durToTicks(now - c.loadTime)
}

// sync moves into the pending segment once its start tick T has come.
func (c *channel) sync(T uint64) {
	if c.running && c.pending && T >= c.pendingTick {
		c.startTick = c.pendingTick
		c.start = c.pendingN
		c.pending = false
		c.fired = false
		c.nullCount = false
	}
}

// seg returns the segment offset at absolute tick T (synced).
func (c *channel) seg(T uint64) uint64 {
	c.sync(T)
	if T < c.startTick {
		return 0
	}
	return T - c.startTick
}

func (c *channel) outAt(now time.Duration) bool {
	if !c.running {
		return c.heldOut
	}
	d := c.seg(c.ticks(now))
	return segOut(c.eff(), c.start, c.fired, d)
}

func (c *channel) ceAt(now time.Duration) uint16 {
	if !c.running {
		return uint16(c.held)
	}
	d := c.seg(c.ticks(now))
	return segCE(c.eff(), c.start, d)
}

// riseTickAfter is the first absolute tick > T at which OUT rises, looking
// across a pending reload. The channel must be synced up to T only.
func (c *channel) riseTickAfter(T uint64) (uint64, bool) {
	if !c.running {
		return 0, false
	}
	m := c.eff()
	if T < c.startTick {
		T = c.startTick
	}
	d := T - c.startTick
	if !c.pending {
		x, ok := segRiseAfter(m, c.start, c.fired, d)
		return c.startTick + x, ok
	}
	if T < c.pendingTick {
		if x, ok := segRiseAfter(m, c.start, c.fired, d); ok && c.startTick+x < c.pendingTick {
			return c.startTick + x, true
		}
		before := segOut(m, c.start, c.fired, c.pendingTick-1-c.startTick)
		if !before && segOut(m, c.pendingN, false, 0) {
			return c.pendingTick, true
		}
		T = c.pendingTick
	}
	x, ok := segRiseAfter(m, c.pendingN, false, T-c.pendingTick)
	return c.pendingTick + x, ok
}

func (c *channel) startRun(now time.Duration, n uint32, fired bool) {
	c.running = true
	c.paused = false
	c.pending = false
	c.loadTime = now
	c.startTick = 0
	c.start = n
	c.fired = fired
}

// freeze stops counting, remembering the counting element and OUT.
func (c *channel) freeze(now time.Duration) {
	if !c.running {
		return
	}
	d := c.seg(c.ticks(now))
	m := c.eff()
	c.heldOut = segOut(m, c.start, c.fired, d)
	switch m {
	case 0, 1, 4, 5:
		N := uint64(c.start)
		switch {
		case !c.fired && d < N:
			c.held = c.start - uint32(d)
		default:
			c.held = uint32(uint16(N - d))
			if (m == 0 || m == 1) || d > N {
				c.fired = true
			}
		}
	default:
		c.held = uint32(segCE(m, c.start, d))
	}
	c.running = false
	c.pending = false
}

// program handles a control word selecting this counter: all control logic
// is reset and OUT goes to its initial state (low in mode 0, else high).
func (c *channel) program(now time.Duration, mode, access uint8, bcd bool) {
	ce := c.ceAt(now)
	c.mode, c.access, c.bcd = mode, access, bcd
	c.writeHi, c.readHi = false, false
	c.countLatched, c.statusLatched = false, false
	c.running, c.paused, c.pending, c.fired, c.crValid = false, false, false, false, false
	c.held = uint32(ce)
	c.heldOut = c.eff() != 0
	c.nullCount = true
}

func (c *channel) writeCount(now time.Duration, v uint8) {
	switch c.access {
	case 1:
		c.loadCR(now, uint16(v))
	case 2:
		c.loadCR(now, uint16(v)<<8)
	default:
		if !c.writeHi {
			c.lsb = v
			c.writeHi = true
			if c.eff() == 0 {
				// Mode 0: the first byte stops counting and
				// drives OUT low until the second arrives.
				c.freeze(now)
				c.paused = false
				c.heldOut = false
			}
			return
		}
		c.writeHi = false
		c.loadCR(now, uint16(c.lsb)|uint16(v)<<8)
	}
}

// loadCR handles a complete count written to the count register.
func (c *channel) loadCR(now time.Duration, v uint16) {
	c.cr = v
	c.crValid = true
	c.nullCount = true
	n := countOf(v)
	switch c.eff() {
	case 0, 4:
		// Loaded (and restarted) at once; counting needs the gate.
		if c.gate {
			c.startRun(now, n, false)
		} else {
			c.running, c.pending, c.fired = false, false, false
			c.paused = true
			c.held = n
			c.heldOut = c.eff() == 4
		}
		c.nullCount = false
	case 2, 3:
		if c.running {
			d := c.seg(c.ticks(now))
			N := uint64(c.start)
			c.pending = true
			c.pendingN = n
			c.pendingTick = c.startTick + (d/N+1)*N
		} else if c.gate {
			c.startRun(now, n, false)
			c.nullCount = false
		}
	}
	// Modes 1 and 5 wait for a gate rising edge.
}

func (c *channel) setGate(now time.Duration, g bool) {
	if g == c.gate {
		return
	}
	m := c.eff()
	if !g {
		switch m {
		case 0, 4: // gate low suspends counting
			if c.running {
				c.freeze(now)
				c.paused = true
			}
		case 2, 3: // gate low stops counting and forces OUT high
			if c.running {
				c.freeze(now)
				c.heldOut = true
			}
		}
		c.gate = false
		return
	}
	c.gate = true
	switch m {
	case 0, 4:
		if c.paused {
			c.startRun(now, c.held, c.fired)
		}
	default: // 1, 2, 3, 5: a rising gate (re)loads the count
		if c.crValid {
			c.startRun(now, countOf(c.cr), false)
			c.nullCount = false
		}
	}
}

func (c *channel) latchCount(now time.Duration) {
	if c.countLatched {
		return // a second latch before the read is ignored
	}
	c.latch = c.ceAt(now)
	c.countLatched = true
}

func (c *channel) latchStatus(now time.Duration) {
	if c.statusLatched {
		return
	}
	s := c.access<<4 | c.mode<<1
	if c.bcd {
		s |= 0x01
	}
	if c.nullCount {
		s |= 0x40
	}
	if c.outAt(now) {
		s |= 0x80
	}
	c.status = s
	c.statusLatched = true
}

// pick returns the byte of v that the read flip-flop selects and whether
// the value has been read completely.
func (c *channel) pick(v uint16) (uint8, bool) {
	switch c.access {
	case 1:
		return uint8(v), true
	case 2:
		return uint8(v >> 8), true
	}
	if c.readHi {
		c.readHi = false
		return uint8(v >> 8), true
	}
	c.readHi = true
	return uint8(v), false
}

func (c *channel) read(now time.Duration) uint8 {
	if c.statusLatched {
		c.statusLatched = false
		return c.status
	}
	if c.countLatched {
		b, done := c.pick(c.latch)
		if done {
			c.countLatched = false
		}
		return b
	}
	b, _ := c.pick(c.ceAt(now))
	return b
}

type zeroClock struct{}

func (zeroClock) Now() time.Duration { return 0 }

// PIT is the 8254 plus port 0x61.
type PIT struct {
	clock Clock
	irq0  func(level bool)
	ch    [3]channel
	p61   uint8 // port 0x61 bits that read back as written

	last      time.Duration // latest guest time seen; time never goes back
	lastCheck time.Duration // channel 0 edges delivered up to here
	irqLevel  bool          // level last delivered through irq0
}

// New returns a PIT that reads guest time from clock and drives IRQ0
// through irq0 (either may be nil). All counters start unprogrammed with
// OUT high; channels 0 and 1 are permanently gated on, channel 2's gate is
// port 0x61 bit 0 (initially 0).
func New(clock Clock, irq0 func(level bool)) *PIT {
	if clock == nil {
		clock = zeroClock{}
	}
	// The 8254's OUT levels are undefined at power-on; taking them (and
	// the IRQ0 line) as high means programming a periodic or one-shot
	// mode is not itself a rising edge, so the first interrupt comes
	// when the first period ends. New does not call irq0.
	p := &PIT{clock: clock, irq0: irq0, irqLevel: true}
	for i := range p.ch {
		p.ch[i].access = 3
		p.ch[i].gate = i != 2
		p.ch[i].heldOut = true
	}
	return p
}

// now reads the clock, never letting time run backwards relative to what
// the PIT has already seen (through Advance or an earlier access).
func (p *PIT) now() time.Duration {
	t := p.clock.Now()
	if t < p.last {
		t = p.last
	}
	p.last = t
	return t
}

func (p *PIT) setIRQ(level bool) {
	p.irqLevel = level
	if p.irq0 != nil {
		p.irq0(level)
	}
}

// catchUp delivers the channel 0 edges due in (lastCheck, now]. Any number
// of rising edges collapses into one pulse: the edge-triggered PIC could
// not have told them apart anyway.
func (p *PIT) catchUp(now time.Duration) {
	c := &p.ch[0]
	rose := false
	var out bool
	if c.running {
		T0 := c.ticks(p.lastCheck)
		T1 := c.ticks(now)
		c.sync(T0)
		r, ok := c.riseTickAfter(T0)
		rose = ok && r <= T1
		out = segOut(c.eff(), c.start, c.fired, c.seg(T1))
	} else {
		out = c.heldOut
	}
	if rose {
		if p.irqLevel {
			p.setIRQ(false)
		}
		p.setIRQ(true)
	}
	if out != p.irqLevel {
		p.setIRQ(out)
	}
	p.lastCheck = now
}

// Advance brings channel 0 up to guest time now, delivers the IRQ0 edges
// that became due and returns the time of the next rising edge of OUT0,
// which the caller must wake up for (ok is false when none is coming:
// mode 0/4 after terminal count, or an unprogrammed or stopped counter).
// Falling edges are delivered lazily, at the next call or port access,
// since only rising edges request interrupts. A now earlier than one
// already seen is treated as that time.
func (p *PIT) Advance(now time.Duration) (next time.Duration, ok bool) {
	if now < p.last {
		now = p.last
	}
	p.last = now
	p.catchUp(now)
	c := &p.ch[0]
	r, ok := c.riseTickAfter(c.ticks(now))
	if !ok {
		return 0, false
	}
	off, ok := tickToDur(r)
	if !ok || c.loadTime > math.MaxInt64-off {
		return 0, false
	}
	return c.loadTime + off, true
}

// ReadPort reads a counter or port 0x61 into data[0]; the rest of a wider
// read, and ports not decoded here (including the write-only control
// port), read as all-ones.
func (p *PIT) ReadPort(port uint16, data []byte) {
	for i := range data {
		data[i] = 0xff
	}
	if len(data) == 0 {
		return
	}
	switch port {
	case PortCounter0, PortCounter1, PortCounter2:
		now := p.now()
		p.catchUp(now)
		data[0] = p.ch[port-PortCounter0].read(now)
	case PortSystem:
		now := p.now()
		p.catchUp(now)
		v := p.p61
		if (now/refreshPeriod)&1 != 0 {
			v |= 0x10
		}
		if p.ch[2].outAt(now) {
			v |= 0x20
		}
		data[0] = v
	}
}

// WritePort writes data[0] to a counter, the control port or port 0x61;
// extra bytes and other ports are ignored.
func (p *PIT) WritePort(port uint16, data []byte) {
	if len(data) == 0 {
		return
	}
	v := data[0]
	switch port {
	case PortCounter0, PortCounter1, PortCounter2, PortControl, PortSystem:
	default:
		return
	}
	now := p.now()
	p.catchUp(now)
	switch port {
	case PortControl:
		p.control(now, v)
	case PortSystem:
		p.p61 = v & port61RW
		p.ch[2].setGate(now, v&0x01 != 0)
	default:
		p.ch[port-PortCounter0].writeCount(now, v)
	}
	// A write may have changed OUT0 at once (control word, new count).
	p.catchUp(now)
}

func (p *PIT) control(now time.Duration, v uint8) {
	sel := v >> 6
	if sel == 3 {
		// Read-back: bits 3..1 select counters, bit 5 clear latches
		// counts, bit 4 clear latches status.
		for i := range p.ch {
			if v&(2<<uint(i)) == 0 {
				continue
			}
			if v&0x20 == 0 {
				p.ch[i].latchCount(now)
			}
			if v&0x10 == 0 {
				p.ch[i].latchStatus(now)
			}
		}
		return
	}
	c := &p.ch[sel]
	access := (v >> 4) & 3
	if access == 0 {
		c.latchCount(now)
		return
	}
	c.program(now, (v>>1)&7, access, v&1 != 0)
}

// ChannelState is the saved state of one counter. Times are guest times
// from the Clock.
type ChannelState struct {
	Mode          uint8 // 0..7 as programmed
	Access        uint8 // 1 LSB, 2 MSB, 3 LSB then MSB
	BCD           bool
	CountRegister uint16
	LowByte       uint8 // LSB written, waiting for the MSB
	WriteHigh     bool  // write flip-flop
	ReadHigh      bool  // read flip-flop
	CountLatched  bool
	LatchedCount  uint16
	StatusLatched bool
	LatchedStatus uint8
	Gate          bool
	CountValid    bool
	NullCount     bool

	Running   bool
	LoadTime  time.Duration // when the count was loaded / the gate started it
	StartTick uint64        // ticks after LoadTime where the current segment began
	Start     uint32        // counting element at StartTick, 0..65536
	Fired     bool          // terminal count already reached (modes 0, 1, 4, 5)

	Pending      bool // modes 2/3: count to load at PendingTick
	PendingCount uint32
	PendingTick  uint64

	Paused  bool   // modes 0/4: suspended by gate low
	Held    uint32 // counting element while not running, 0..65536
	HeldOut bool   // OUT while not running
}

// State is the saved state of the PIT and port 0x61.
type State struct {
	Channels  [3]ChannelState
	Port61    uint8         // bits 0..3 as written
	LastTime  time.Duration // latest guest time the PIT has seen
	LastCheck time.Duration // channel 0 edges delivered up to here
	IRQ0Level bool          // level last driven on IRQ0
}

// Save returns the PIT's state.
func (p *PIT) Save() State {
	s := State{Port61: p.p61, LastTime: p.last, LastCheck: p.lastCheck, IRQ0Level: p.irqLevel}
	for i := range p.ch {
		c := &p.ch[i]
		s.Channels[i] = ChannelState{
			Mode: c.mode, Access: c.access, BCD: c.bcd,
			CountRegister: c.cr, LowByte: c.lsb, WriteHigh: c.writeHi, ReadHigh: c.readHi,
			CountLatched: c.countLatched, LatchedCount: c.latch,
			StatusLatched: c.statusLatched, LatchedStatus: c.status,
			Gate: c.gate, CountValid: c.crValid, NullCount: c.nullCount,
			Running: c.running, LoadTime: c.loadTime, StartTick: c.startTick,
			Start: c.start, Fired: c.fired,
			Pending: c.pending, PendingCount: c.pendingN, PendingTick: c.pendingTick,
			Paused: c.paused, Held: c.held, HeldOut: c.heldOut,
		}
	}
	return s
}

func validateChannel(i int, s ChannelState, last time.Duration) error {
	m := s.Mode
	if m >= 6 {
		m -= 4
	}
	switch {
	case s.Mode > 7:
		return fmt.Errorf("mode %d out of range 0..7", s.Mode)
	case s.Access < 1 || s.Access > 3:
		return fmt.Errorf("access mode %d out of range 1..3", s.Access)
	case (s.WriteHigh || s.ReadHigh) && s.Access != 3:
		return errors.New("byte flip-flop set outside LSB/MSB access")
	case i != 2 && !s.Gate:
		return errors.New("gate low on a counter whose gate is wired high")
	case s.Start > 65536 || s.Held > 65536:
		return errors.New("count above 65536")
	case s.Running && s.Paused:
		return errors.New("both running and paused")
	case s.Running && (m == 2 || m == 3) && s.Start == 0:
		return errors.New("zero period in mode 2/3")
	case s.Running && (s.LoadTime < 0 || s.LoadTime > last):
		return fmt.Errorf("load time %v outside [0, last time %v]", s.LoadTime, last)
	case s.Running && s.StartTick > durToTicks(last-s.LoadTime):
		return errors.New("segment starts after the last time seen")
	case s.Pending && (!s.Running || (m != 2 && m != 3)):
		return errors.New("pending reload outside running mode 2/3")
	case s.Pending && (s.PendingCount == 0 || s.PendingCount > 65536 || s.PendingTick <= s.StartTick):
		return errors.New("bad pending reload")
	}
	return nil
}

// Restore replaces the PIT's state with s after validating it; on error
// the PIT is unchanged. irq0 is not called: the PIC's saved state already
// holds the line level.
func (p *PIT) Restore(s State) error {
	if s.LastTime < 0 || s.LastCheck < 0 || s.LastCheck > s.LastTime {
		return fmt.Errorf("pit: bad times: last %v, last check %v", s.LastTime, s.LastCheck)
	}
	if s.Port61&^port61RW != 0 {
		return fmt.Errorf("pit: port 0x61 bits %#x are read-only", s.Port61&^port61RW)
	}
	for i, cs := range s.Channels {
		if err := validateChannel(i, cs, s.LastTime); err != nil {
			return fmt.Errorf("pit: channel %d: %w", i, err)
		}
	}
	if s.Channels[2].Gate != (s.Port61&0x01 != 0) {
		return errors.New("pit: channel 2 gate disagrees with port 0x61 bit 0")
	}
	for i, cs := range s.Channels {
		p.ch[i] = channel{
			mode: cs.Mode, access: cs.Access, bcd: cs.BCD,
			cr: cs.CountRegister, lsb: cs.LowByte, writeHi: cs.WriteHigh, readHi: cs.ReadHigh,
			countLatched: cs.CountLatched, latch: cs.LatchedCount,
			statusLatched: cs.StatusLatched, status: cs.LatchedStatus,
			gate: cs.Gate, crValid: cs.CountValid, nullCount: cs.NullCount,
			running: cs.Running, loadTime: cs.LoadTime, startTick: cs.StartTick,
			start: cs.Start, fired: cs.Fired,
			pending: cs.Pending, pendingN: cs.PendingCount, pendingTick: cs.PendingTick,
			paused: cs.Paused, held: cs.Held, heldOut: cs.HeldOut,
		}
	}
	p.p61 = s.Port61
	p.last = s.LastTime
	p.lastCheck = s.LastCheck
	p.irqLevel = s.IRQ0Level
	return nil
}
