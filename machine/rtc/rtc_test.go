package rtc

import (
	"bytes"
	"encoding/gob"
	"encoding/json"
	"math/rand"
	"reflect"
	"strings"
	"testing"
	"time"
)

// fakeClock returns now and then moves it on by step, so a test can model
// the time each port access takes.
type fakeClock struct {
	now, step time.Duration
	calls     int
}

func (c *fakeClock) Now() time.Duration {
	t := c.now
	c.now += c.step
	c.calls++
	return t
}

func date(y int, mo time.Month, d, h, mi, s int) time.Time {
	return time.Date(y, mo, d, h, mi, s, 0, time.UTC)
}

func rd(r *RTC, i byte) byte {
	r.WritePort(PortIndex, []byte{i})
	d := []byte{0}
	r.ReadPort(PortData, d)
	return d[0]
}

func wr(r *RTC, i, v byte) {
	r.WritePort(PortIndex, []byte{i})
	r.WritePort(PortData, []byte{v})
}

// regs reads the eight time registers in TimeRegs order.
func regs(r *RTC) [8]byte {
	var v [8]byte
	for k, i := range []byte{RegSeconds, RegMinutes, RegHours, RegDayOfWeek, RegDayOfMonth, RegMonth, RegYear, RegCentury} {
		v[k] = rd(r, i)
	}
	return v
}

func bcd(v byte) int { return int(v>>4)*10 + int(v&15) }

// readBCD decodes the time registers of an RTC in 24-hour BCD mode.
func readBCD(r *RTC) time.Time {
	v := regs(r)
	return date(bcd(v[7])*100+bcd(v[6]), time.Month(bcd(v[5])), bcd(v[4]), bcd(v[2]), bcd(v[1]), bcd(v[0]))
}

func TestKnownDateBCDAndBinary(t *testing.T) {
	clk := &fakeClock{}
	r := New(clk, date(2024, 2, 29, 13, 45, 56)) // a Thursday
	if got, want := regs(r), [8]byte{0x56, 0x45, 0x13, 5, 0x29, 0x02, 0x24, 0x20}; got != want {
		t.Fatalf("BCD regs % x, want % x", got, want)
	}
	if rd(r, RegB) != 0x02 || rd(r, RegA) != 0x26 || rd(r, RegD) != 0x80 || rd(r, RegC) != 0 {
		t.Fatal("control register reset values")
	}
	wr(r, RegB, 0x06) // binary, 24h
	if got, want := regs(r), [8]byte{56, 45, 13, 5, 29, 2, 24, 20}; got != want {
		t.Fatalf("binary regs % x, want % x", got, want)
	}
	if !r.Time().Equal(date(2024, 2, 29, 13, 45, 56)) {
		t.Fatalf("Time = %v", r.Time())
	}
	// A non-UTC base is shown in UTC.
	r = New(clk, time.Date(2024, 1, 1, 12, 0, 0, 0, time.FixedZone("X", 3600)))
	if rd(r, RegHours) != 0x11 {
		t.Fatalf("hour %#x, want 0x11 (UTC)", rd(r, RegHours))
	}
}

func TestTwelveHourMode(t *testing.T) {
	for _, c := range []struct {
		hour     int
		bcd, bin byte
	}{
		{0, 0x12, 12},         // 12 AM
		{1, 0x01, 1},          // 1 AM
		{11, 0x11, 11},        // 11 AM
		{12, 0x92, 0x80 | 12}, // 12 PM
		{13, 0x81, 0x80 | 1},  // 1 PM
		{23, 0x91, 0x80 | 11}, // 11 PM
	} {
		clk := &fakeClock{}
		r := New(clk, date(2023, 6, 1, c.hour, 30, 0))
		wr(r, RegB, 0x00)
		if got := rd(r, RegHours); got != c.bcd {
			t.Errorf("%02d:30 BCD 12h = %#02x, want %#02x", c.hour, got, c.bcd)
		}
		wr(r, RegB, regBDM)
		if got := rd(r, RegHours); got != c.bin {
			t.Errorf("%02d:30 binary 12h = %#02x, want %#02x", c.hour, got, c.bin)
		}
		// Writing the hour in 12-hour mode round-trips through 24h.
		wr(r, RegB, 0x00)
		wr(r, RegB, regBSET)
		wr(r, RegHours, c.bcd)
		wr(r, RegB, 0x00)
		wr(r, RegB, regB24h)
		if got := rd(r, RegHours); bcd(got) != c.hour {
			t.Errorf("12h write %#02x read back in 24h as %#02x, want %d", c.bcd, got, c.hour)
		}
	}
}

func TestUIPWindow(t *testing.T) {
	for _, frac := range []time.Duration{0, 300 * time.Millisecond, 999_900 * time.Microsecond} {
		base := date(2023, 1, 1, 0, 0, 0).Add(frac)
		clk := &fakeClock{}
		r := New(clk, base)
		next := time.Second - frac // clock time of the next second boundary
		for _, c := range []struct {
			at  time.Duration
			uip bool
		}{
			{next - uipWindow - 1, false},
			{next - uipWindow, true},
			{next - 1, true},
			{next, false},
			{next + time.Second - uipWindow - 1, false},
			{next + time.Second - uipWindow, true},
		} {
			clk.now = c.at
			got := rd(r, RegA)
			if (got&regAUIP != 0) != c.uip || got&0x7f != 0x26 {
				t.Errorf("frac %v, clock %v: reg A = %#02x, want UIP %v", frac, c.at, got, c.uip)
			}
		}
		// The seconds register ticks exactly at the boundary.
		clk.now = next - 1
		s0 := rd(r, RegSeconds)
		clk.now = next
		if s1 := rd(r, RegSeconds); bcd(s1) != (bcd(s0)+1)%60 {
			t.Errorf("frac %v: seconds %#x -> %#x across the boundary", frac, s0, s1)
		}
	}
	// UIP cannot be written.
	r := New(&fakeClock{}, date(2023, 1, 1, 0, 0, 0))
	wr(r, RegA, 0xff)
	if rd(r, RegA) != 0x7f {
		t.Fatalf("reg A = %#02x", rd(r, RegA))
	}
}

func TestRollover(t *testing.T) {
	for _, c := range []struct {
		base time.Time
		d    time.Duration
		want time.Time
		wday byte
	}{
		{date(2023, 12, 31, 23, 59, 59), time.Second, date(2024, 1, 1, 0, 0, 0), 2},     // Monday
		{date(2023, 4, 30, 23, 59, 59), time.Second, date(2023, 5, 1, 0, 0, 0), 2},      // month
		{date(2023, 6, 15, 23, 59, 59), time.Second, date(2023, 6, 16, 0, 0, 0), 6},     // midnight
		{date(2024, 2, 28, 23, 59, 59), time.Second, date(2024, 2, 29, 0, 0, 0), 5},     // leap year
		{date(2024, 2, 29, 23, 59, 59), time.Second, date(2024, 3, 1, 0, 0, 0), 6},      //
		{date(2023, 2, 28, 23, 59, 59), time.Second, date(2023, 3, 1, 0, 0, 0), 4},      // not leap
		{date(2100, 2, 28, 23, 59, 59), time.Second, date(2100, 3, 1, 0, 0, 0), 2},      // century, not leap
		{date(2000, 2, 28, 23, 59, 59), time.Second, date(2000, 2, 29, 0, 0, 0), 3},     // 400-year leap
		{date(2099, 12, 31, 23, 59, 59), time.Second, date(2100, 1, 1, 0, 0, 0), 6},     // century register
		{date(2023, 1, 1, 0, 0, 0), 400 * 24 * time.Hour, date(2024, 2, 5, 0, 0, 0), 2}, // long run
	} {
		clk := &fakeClock{}
		r := New(clk, c.base)
		clk.now = c.d - 1
		if got := readBCD(r); !got.Equal(c.base.Add(c.d - time.Second)) {
			t.Errorf("%v + %v - 1ns: read %v", c.base, c.d, got)
		}
		clk.now = c.d
		if got := readBCD(r); !got.Equal(c.want) {
			t.Errorf("%v + %v: read %v, want %v", c.base, c.d, got, c.want)
		}
		if got := rd(r, RegDayOfWeek); got != c.wday {
			t.Errorf("%v: day of week %d, want %d", c.want, got, c.wday)
		}
	}
}

func TestSetBit(t *testing.T) {
	clk := &fakeClock{now: 5 * time.Second}
	r := New(clk, date(2023, 3, 10, 10, 0, 0).Add(-5*time.Second))
	wr(r, RegB, 0x02|regBSET|regBUIE)
	if b := rd(r, RegB); b != 0x02|regBSET {
		t.Fatalf("reg B = %#02x: UIE must clear when SET is set", b)
	}
	clk.now += 10 * time.Second
	if got := readBCD(r); !got.Equal(date(2023, 3, 10, 10, 0, 0)) {
		t.Fatalf("time advanced while SET: %v", got)
	}
	// Write 2030-06-15 08:30:00 the way mc146818_set_time does.
	wr(r, RegYear, 0x30)
	wr(r, RegMonth, 0x06)
	wr(r, RegDayOfMonth, 0x15)
	wr(r, RegHours, 0x08)
	wr(r, RegMinutes, 0x30)
	wr(r, RegSeconds, 0x00)
	wr(r, RegCentury, 0x20)
	for _, at := range []time.Duration{0, 999_800 * time.Microsecond, 7 * time.Second} {
		clk.now = 15*time.Second + at
		if got := readBCD(r); !got.Equal(date(2030, 6, 15, 8, 30, 0)) {
			t.Fatalf("while SET, read %v", got)
		}
		if rd(r, RegA)&regAUIP != 0 {
			t.Fatal("UIP set while SET")
		}
	}
	clear := clk.now
	wr(r, RegB, 0x02)
	for _, c := range []struct {
		after time.Duration
		want  time.Time
	}{
		{0, date(2030, 6, 15, 8, 30, 0)},
		{time.Second - 1, date(2030, 6, 15, 8, 30, 0)},
		{time.Second, date(2030, 6, 15, 8, 30, 1)},
		{3*time.Second + time.Millisecond, date(2030, 6, 15, 8, 30, 3)},
		{24 * time.Hour, date(2030, 6, 16, 8, 30, 0)},
	} {
		clk.now = clear + c.after
		if got := readBCD(r); !got.Equal(c.want) {
			t.Errorf("%v after clearing SET: %v, want %v", c.after, got, c.want)
		}
	}
	// The second boundary phase starts when SET was cleared.
	clk.now = clear + time.Second - uipWindow - 1
	if rd(r, RegA)&regAUIP != 0 {
		t.Error("UIP early")
	}
	clk.now = clear + time.Second - uipWindow
	if rd(r, RegA)&regAUIP == 0 {
		t.Error("UIP not set at its window")
	}
	// The day of week follows the new date (a Saturday) although the guest
	// never wrote it; a written value shows only while SET is on.
	clk.now = clear
	if rd(r, RegDayOfWeek) != 7 {
		t.Fatalf("day of week %d, want 7", rd(r, RegDayOfWeek))
	}
	wr(r, RegB, 0x02|regBSET)
	wr(r, RegDayOfWeek, 3)
	if rd(r, RegDayOfWeek) != 3 {
		t.Fatal("day of week write while SET")
	}
	wr(r, RegB, 0x02)
	if rd(r, RegDayOfWeek) != 7 {
		t.Fatal("day of week not derived from the date")
	}
}

func TestWriteWhileRunning(t *testing.T) {
	clk := &fakeClock{now: 250 * time.Millisecond}
	r := New(clk, date(2023, 3, 10, 10, 20, 30))
	wr(r, RegMinutes, 0x05)
	if got := readBCD(r); !got.Equal(date(2023, 3, 10, 10, 5, 30)) {
		t.Fatalf("read %v", got)
	}
	// Sub-second phase is kept: the next tick is still at clock 1s.
	clk.now = time.Second - 1
	if rd(r, RegSeconds) != 0x30 {
		t.Fatal("ticked early")
	}
	clk.now = time.Second
	if rd(r, RegSeconds) != 0x31 {
		t.Fatal("did not tick")
	}
	wr(r, RegDayOfWeek, 1)
	if rd(r, RegDayOfWeek) != 6 || !readBCD(r).Equal(date(2023, 3, 10, 10, 5, 31)) {
		t.Fatal("day of week write changed something")
	}
}

func TestFormatChangeReinterprets(t *testing.T) {
	clk := &fakeClock{}
	r := New(clk, date(2023, 11, 22, 21, 7, 9))
	wr(r, RegB, 0x06)
	if rd(r, RegMonth) != 11 || rd(r, RegHours) != 21 {
		t.Fatal("binary")
	}
	wr(r, RegB, 0x04)
	if rd(r, RegHours) != 0x80|9 {
		t.Fatal("binary 12h")
	}
}

// linuxGetTime is mc146818_get_time() from Linux 6.1 (drivers/rtc/rtc-
// mc146818-lib.c) with the ACPI century register, on an RTC whose clock
// advances by a fixed step per access; mdelay(1) advances it by 1 ms.
func linuxGetTime(t *testing.T, r *RTC, clk *fakeClock) (time.Time, int) {
	tries := 0
again:
	tries++
	if tries > 100 {
		t.Fatal("mc146818_get_time did not converge")
	}
	if rd(r, RegD)&0x40 != 0 {
		t.Fatal("RTC_VALID bit 6 set")
	}
	sec := rd(r, RegSeconds)
	if rd(r, RegA)&regAUIP != 0 {
		clk.now += time.Millisecond
		goto again
	}
	if sec != rd(r, RegSeconds) {
		goto again
	}
	min := rd(r, RegMinutes)
	hour := rd(r, RegHours)
	mday := rd(r, RegDayOfMonth)
	mon := rd(r, RegMonth)
	year := rd(r, RegYear)
	century := rd(r, RegCentury)
	ctrl := rd(r, RegB)
	retry := rd(r, RegA)&regAUIP != 0
	retry = retry || sec != rd(r, RegSeconds)
	if retry {
		goto again
	}
	if ctrl&regBDM != 0 {
		t.Fatal("expected BCD")
	}
	return date(bcd(century)*100+bcd(year), time.Month(bcd(mon)), bcd(mday), bcd(hour), bcd(min), bcd(sec)), tries
}

func TestLinuxGetTimePattern(t *testing.T) {
	base := date(2023, 12, 31, 23, 59, 58)
	retried := false
	for start := 2*time.Second - 3*time.Millisecond; start < 2*time.Second+time.Millisecond; start += 7 * time.Microsecond {
		clk := &fakeClock{now: start, step: 3 * time.Microsecond}
		r := New(clk, base)
		got, tries := linuxGetTime(t, r, clk)
		end := clk.now
		if tries > 1 {
			retried = true
		}
		// No tearing: the result is the RTC time at some instant of the read.
		lo, hi := base.Add(start).Truncate(time.Second), base.Add(end).Truncate(time.Second)
		if !got.Equal(lo) && !got.Equal(hi) {
			t.Fatalf("start %v: read %v, not in [%v, %v]", start, got, lo, hi)
		}
	}
	if !retried {
		t.Fatal("UIP never made the reader retry")
	}
}

// TestLinuxSetTimePattern is mc146818_set_time(): SET, divider reset, write
// year..seconds, restore B and A.
func TestLinuxSetTimePattern(t *testing.T) {
	clk := &fakeClock{now: time.Hour, step: time.Microsecond}
	r := New(clk, date(2020, 1, 1, 0, 0, 0))
	saveControl := rd(r, RegB)
	wr(r, RegB, saveControl|regBSET)
	saveFreq := rd(r, RegA)
	wr(r, RegA, saveFreq|0x70)
	for _, w := range [][2]byte{{RegYear, 0x25}, {RegMonth, 0x07}, {RegDayOfMonth, 0x04}, {RegHours, 0x23}, {RegMinutes, 0x59}, {RegSeconds, 0x58}, {RegCentury, 0x20}} {
		wr(r, w[0], w[1])
	}
	wr(r, RegB, saveControl)
	wr(r, RegA, saveFreq)
	clk.step = 0
	clk.now += 2 * time.Second
	if got := readBCD(r); !got.Equal(date(2025, 7, 5, 0, 0, 0)) {
		t.Fatalf("read %v", got)
	}
	if rd(r, RegA) != 0x26 || rd(r, RegB) != 0x02 {
		t.Fatal("control registers not restored")
	}
}

func TestIndexAndNMI(t *testing.T) {
	r := New(&fakeClock{}, date(2023, 1, 1, 0, 0, 0))
	r.SetRAM(0x40, 0xaa)
	r.WritePort(PortIndex, []byte{0x80 | 0x40})
	if !r.NMIDisabled() {
		t.Fatal("NMI disable bit not stored")
	}
	d := []byte{0}
	r.ReadPort(PortData, d)
	if d[0] != 0xaa {
		t.Fatalf("read with NMI bit set: %#02x", d[0])
	}
	r.ReadPort(PortIndex, d)
	if d[0] != 0xc0 {
		t.Fatalf("index readback %#02x", d[0])
	}
	r.WritePort(PortIndex, []byte{0x40})
	if r.NMIDisabled() {
		t.Fatal("NMI bit stuck")
	}
	if r.Save().Index != 0x40 {
		t.Fatal("index not saved")
	}
}

func TestRAM(t *testing.T) {
	clk := &fakeClock{}
	r := New(clk, date(2023, 1, 1, 0, 0, 0))
	for i := 0; i < CMOSSize; i++ {
		if !isClockReg(byte(i)) {
			r.SetRAM(byte(i), byte(i)^0x5a)
		}
	}
	r.SetRAM(RegSeconds, 0x99) // ignored
	r.SetRAM(RegB, 0x99)
	r.SetRAM(0x80, 1) // beyond CMOS: ignored
	r.SetRAM(0xff, 1)
	for i := 0; i < CMOSSize; i++ {
		if !isClockReg(byte(i)) && rd(r, byte(i)) != byte(i)^0x5a {
			t.Fatalf("RAM[%#x] = %#x", i, rd(r, byte(i)))
		}
	}
	if rd(r, RegSeconds) != 0 || rd(r, RegB) != 0x02 {
		t.Fatal("SetRAM changed a clock register")
	}
	// Alarm registers and extended memory bytes are guest-writable storage.
	for _, i := range []byte{RegAlarmSec, RegAlarmMin, RegAlarmHour, 0x15, 0x30, 0x34, 0x7f} {
		wr(r, i, 0x3c)
		if rd(r, i) != 0x3c {
			t.Fatalf("RAM[%#x] write", i)
		}
	}
	// C and D are read-only.
	wr(r, RegC, 0xff)
	wr(r, RegD, 0x00)
	if rd(r, RegC) != 0 || rd(r, RegD) != 0x80 {
		t.Fatal("C/D writable")
	}
	// RAM access does not read the clock (it is logged on replay).
	calls := clk.calls
	rd(r, 0x15)
	wr(r, 0x15, 1)
	if clk.calls != calls {
		t.Fatal("RAM access read the clock")
	}
}

func TestWideAndUndecodedAccess(t *testing.T) {
	r := New(&fakeClock{}, date(2023, 1, 1, 0, 0, 0))
	r.SetRAM(0x20, 0x11)
	r.WritePort(PortIndex, []byte{0x20, 0x21, 0x22, 0x23})
	d := []byte{0, 0, 0, 0}
	r.ReadPort(PortData, d)
	if !bytes.Equal(d, []byte{0x11, 0xff, 0xff, 0xff}) {
		t.Fatalf("wide read %x", d)
	}
	for _, p := range []uint16{0x6f, 0x72, 0x73, 0, 0xffff} {
		d := []byte{0, 0}
		r.ReadPort(p, d)
		if !bytes.Equal(d, []byte{0xff, 0xff}) {
			t.Fatalf("read of %#x = %x", p, d)
		}
		r.WritePort(p, []byte{0x55})
	}
	if rd(r, 0x20) != 0x11 {
		t.Fatal("undecoded write changed state")
	}
	r.ReadPort(PortData, nil)
	r.WritePort(PortData, nil)
}

func TestSaveRestoreRoundTrip(t *testing.T) {
	clk := &fakeClock{now: 42 * time.Second}
	r := New(clk, date(2001, 9, 9, 1, 46, 40))
	r.SetRAM(0x15, 0x80)
	r.SetRAM(0x34, 0x12)
	wr(r, RegB, 0x02|regBSET)
	wr(r, RegYear, 0x39)
	wr(r, RegB, 0x02)
	wr(r, RegB, 0x06|0x40) // binary, PIE
	wr(r, RegA, 0x2f)
	r.WritePort(PortIndex, []byte{0x8b})
	clk.now += 1234 * time.Millisecond
	want := r.Time()

	wr(r, RegB, 0x06|regBSET)
	s := r.Save() // with SET: frozen registers in the state
	r.WritePort(PortIndex, []byte{0x8b})
	wr(r, RegB, 0x06|0x40)
	s2 := r.Save() // SET cleared again

	for name, codec := range map[string]func(State) State{
		"json": func(s State) State {
			b, err := json.Marshal(s)
			if err != nil {
				t.Fatal(err)
			}
			var o State
			if err := json.Unmarshal(b, &o); err != nil {
				t.Fatal(err)
			}
			return o
		},
		"gob": func(s State) State {
			var buf bytes.Buffer
			if err := gob.NewEncoder(&buf).Encode(s); err != nil {
				t.Fatal(err)
			}
			var o State
			if err := gob.NewDecoder(&buf).Decode(&o); err != nil {
				t.Fatal(err)
			}
			return o
		},
	} {
		for _, st := range []State{s, s2} {
			// Restore into an RTC with another base and the same clock:
			// the saved epoch (base plus the guest's offset) wins.
			c2 := &fakeClock{now: clk.now}
			r2 := New(c2, date(1999, 1, 1, 0, 0, 0))
			if err := r2.Restore(codec(st)); err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			if got := r2.Save(); !reflect.DeepEqual(got, st) {
				t.Fatalf("%s: restored %+v, want %+v", name, got, st)
			}
			r1 := New(&fakeClock{now: clk.now}, time.Time{})
			if err := r1.Restore(st); err != nil {
				t.Fatal(err)
			}
			for _, adv := range []time.Duration{0, 999 * time.Millisecond, 86400 * time.Second} {
				c2.now += adv
				r1.clock.(*fakeClock).now += adv
				for i := 0; i < CMOSSize; i++ {
					if a, b := rd(r1, byte(i)), rd(r2, byte(i)); a != b {
						t.Fatalf("%s: CMOS %#x: %#x vs %#x", name, i, a, b)
					}
				}
			}
		}
	}
	// The restored time continues: a restored RTC at the saved clock time
	// shows what the original showed.
	r3 := New(&fakeClock{now: clk.now}, time.Time{})
	if err := r3.Restore(s2); err != nil {
		t.Fatal(err)
	}
	if !r3.Time().Equal(r.Time()) {
		t.Fatalf("restored time %v, original %v", r3.Time(), r.Time())
	}
	if got := r3.Time(); got.Year() != 2039 || got.Sub(want) > 2*time.Second {
		t.Fatalf("restored time %v, want about %v", got, want)
	}
}

func TestRestoreRejectsInvalid(t *testing.T) {
	mk := func(f func(*State)) State {
		s := New(&fakeClock{}, date(2023, 1, 1, 0, 0, 0)).Save()
		f(&s)
		return s
	}
	bad := []State{
		mk(func(s *State) { s.RAM[RegSeconds] = 1 }),
		mk(func(s *State) { s.RAM[RegCentury] = 0x20 }),
		mk(func(s *State) { s.RegA = 0x80 }),
		mk(func(s *State) { s.RegB = regBSET | regBUIE }),
		mk(func(s *State) { s.Frozen.Sec = 1 }),
		mk(func(s *State) { s.EpochSec = 1 << 50 }),
		mk(func(s *State) { s.EpochSec = -(1 << 50) }),
		mk(func(s *State) { s.EpochNsec = 1e9 }),
		mk(func(s *State) { s.EpochNsec = -1 }),
	}
	for i, s := range bad {
		r := New(&fakeClock{}, date(2010, 5, 5, 5, 5, 5))
		r.SetRAM(0x40, 9)
		before := r.Save()
		err := r.Restore(s)
		if err == nil {
			t.Fatalf("case %d accepted", i)
		}
		if !strings.HasPrefix(err.Error(), "rtc: invalid state") {
			t.Errorf("case %d: error %q", i, err)
		}
		if !reflect.DeepEqual(r.Save(), before) {
			t.Fatalf("case %d: failed Restore changed state", i)
		}
	}
}

func TestGarbageNeverPanics(t *testing.T) {
	rng := rand.New(rand.NewSource(1))
	clk := &fakeClock{step: 17 * time.Microsecond}
	r := New(clk, date(2023, 1, 1, 0, 0, 0))
	sizes := []int{0, 1, 2, 4, 8}
	for i := 0; i < 300000; i++ {
		port := uint16(0x6e + rng.Intn(6))
		if rng.Intn(50) == 0 {
			port = uint16(rng.Intn(0x10000))
		}
		d := make([]byte, sizes[rng.Intn(len(sizes))])
		rng.Read(d)
		if rng.Intn(3) == 0 {
			r.ReadPort(port, d)
		} else {
			r.WritePort(port, d)
		}
		if rng.Intn(100) == 0 {
			r.SetRAM(byte(rng.Intn(256)), byte(rng.Intn(256)))
		}
		if i%997 == 0 {
			s := r.Save()
			if err := s.Validate(); err != nil {
				t.Fatalf("step %d: reachable state invalid: %v", i, err)
			}
			b, err := json.Marshal(s)
			if err != nil {
				t.Fatalf("step %d: %v", i, err)
			}
			var o State
			if err := json.Unmarshal(b, &o); err != nil || !reflect.DeepEqual(o, s) {
				t.Fatalf("step %d: JSON round trip: %v", i, err)
			}
		}
	}
	// Extreme but valid epochs.
	for _, sec := range []int64{maxEpochSecond, -maxEpochSecond, 0} {
		s := r.Save()
		s.EpochSec = sec
		if err := r.Restore(s); err != nil {
			t.Fatal(err)
		}
		for i := 0; i < CMOSSize; i++ {
			rd(r, byte(i))
			wr(r, byte(i), byte(rng.Intn(256)))
		}
	}
	// A nil clock is a stopped clock.
	r = New(nil, date(2023, 1, 1, 0, 0, 0))
	if rd(r, RegYear) != 0x23 {
		t.Fatal("nil clock")
	}
}
