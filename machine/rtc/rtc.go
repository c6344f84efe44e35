// Package rtc models the Motorola MC146818 real-time clock and CMOS RAM of
// the PC, at I/O ports 0x70 (index) and 0x71 (data), well enough for Linux's
// CMOS RTC driver and mc146818 helpers, for firmware-style CMOS reads (memory
// size bytes) and for small test guests.
//
// The time is never kept by ticking: it is computed on every read from a
// Clock (guest time since machine start) plus an epoch, so the model is a
// pure function of its state, the port accesses and the clock values it
// reads. It never reads host time and starts no goroutines; a recorder that
// logs the clock readings can replay it exactly.
//
// The day-of-week register is derived from the date, as in QEMU (Linux
// sets the date without writing it); a value the guest writes shows only
// while SET is on.
//
// Not modelled: interrupts (IRQ8 is not wired, so the PIE/AIE/UIE enables
// are stored but never fire and register C always reads 0), the periodic
// rate and divider-chain bits of register A (stored only; the time never
// stops for a divider reset), the alarm (registers 0x01/0x03/0x05 are plain
// storage) and daylight-saving adjustment (DSE is stored only).
//
// All methods must be called from one thread (the vCPU thread); there is no
// locking.
package rtc

import (
	"errors"
	"fmt"
	"time"
)

// Ports decoded by the RTC.
const (
	PortIndex = 0x70 // write: bit 7 NMI disable, bits 0-6 CMOS index
	PortData  = 0x71
)

// CMOS indices with special meaning.
const (
	RegSeconds    = 0x00
	RegAlarmSec   = 0x01
	RegMinutes    = 0x02
	RegAlarmMin   = 0x03
	RegHours      = 0x04
	RegAlarmHour  = 0x05
	RegDayOfWeek  = 0x06
	RegDayOfMonth = 0x07
	RegMonth      = 0x08
	RegYear       = 0x09
	RegA          = 0x0a
	RegB          = 0x0b
	RegC          = 0x0c
	RegD          = 0x0d
	RegCentury    = 0x32 // as named by the ACPI FADT century field

	CMOSSize = 128
)

const (
	nmiDisable = 0x80
	indexMask  = 0x7f
	regAUIP    = 0x80
	regBSET    = 0x80
	regBUIE    = 0x10
	regBDM     = 0x04 // binary (not BCD) data mode
	regB24h    = 0x02
	regDVRT    = 0x80
	hourPM     = 0x80

	uipWindow = 244 * time.Microsecond
	// maxEpochSecond bounds a restored epoch (~34,800 years either side of
	// 1970), far beyond anything a guest can set through the registers.
	maxEpochSecond = 1 << 40
)

// Clock is the source of guest time: the time elapsed since machine start,
// never running backwards.
type Clock interface {
	Now() time.Duration
}

// stoppedClock stands in for a nil Clock: time stays at 0.
type stoppedClock struct{}

func (stoppedClock) Now() time.Duration { return 0 }

// TimeRegs are the bytes of the eight time registers, in whatever format
// (BCD or binary, 12 or 24 hour) register B selected when they were written.
type TimeRegs struct {
	Sec, Min, Hour, DayOfWeek, DayOfMonth, Month, Year, Century byte
}

// field returns the TimeRegs byte backing CMOS index i, or nil.
func (tr *TimeRegs) field(i byte) *byte {
	switch i {
	case RegSeconds:
		return &tr.Sec
	case RegMinutes:
		return &tr.Min
	case RegHours:
		return &tr.Hour
	case RegDayOfWeek:
		return &tr.DayOfWeek
	case RegDayOfMonth:
		return &tr.DayOfMonth
	case RegMonth:
		return &tr.Month
	case RegYear:
		return &tr.Year
	case RegCentury:
		return &tr.Century
	}
	return nil
}

// isTimeReg reports whether CMOS index i is one of the time registers.
func isTimeReg(i byte) bool {
	var tr TimeRegs
	return tr.field(i) != nil
}

// isClockReg reports whether CMOS index i is computed rather than RAM.
func isClockReg(i byte) bool {
	return isTimeReg(i) || (i >= RegA && i <= RegD)
}

// RTC is the MC146818 and its 128 bytes of CMOS.
type RTC struct {
	clock Clock
	index byte // as last written to port 0x70, NMI bit included
	ram   [CMOSSize]byte
	regA  byte // bits 0-6; UIP is computed
	regB  byte
	// epoch is the RTC time at clock time 0: the RTC shows epoch+Now().
	epoch time.Time
	// frozen holds the time registers while SET is on: the clock does not
	// advance for the guest and writes land here.
	frozen TimeRegs
}

// New returns an RTC showing base+clock.Now() in UTC, in 24-hour BCD mode
// (register B 0x02) with register A 0x26 (32.768 kHz time base, 1024 Hz
// rate), as PC firmware leaves them, and otherwise zeroed CMOS. A nil
// clock is a clock stopped at 0.
func New(clock Clock, base time.Time) *RTC {
	if clock == nil {
		clock = stoppedClock{}
	}
	return &RTC{
		clock: clock,
		regA:  0x26, // 32.768 kHz time base, 1024 Hz periodic rate
		regB:  regB24h,
		epoch: base.UTC(),
	}
}

// NMIDisabled reports bit 7 of the last index written to port 0x70.
func (r *RTC) NMIDisabled() bool { return r.index&nmiDisable != 0 }

// SetRAM sets a CMOS RAM byte, for the machine to fill in what firmware
// would (memory sizes at 0x15-0x18, 0x30/0x31, 0x34/0x35, ...). Indices of
// the clock and control registers, and those beyond 127, are ignored.
func (r *RTC) SetRAM(index, value byte) {
	if index >= CMOSSize || isClockReg(index) {
		return
	}
	r.ram[index] = value
}

// Time returns the time the RTC currently shows (the frozen registers'
// time while SET is on), for the host side; it reads the clock like a
// guest access does.
func (r *RTC) Time() time.Time {
	if r.regB&regBSET != 0 {
		return r.decode(r.frozen)
	}
	return r.epoch.Add(r.clock.Now())
}

// ReadPort implements an IN. Registers are 8 bits wide: a wider access
// reads into data[0] and all-ones into the rest. Port 0x70 reads back the
// last index written, NMI bit included.
func (r *RTC) ReadPort(port uint16, data []byte) {
	for i := range data {
		data[i] = 0xff
	}
	if len(data) == 0 {
		return
	}
	switch port {
	case PortIndex:
		data[0] = r.index
	case PortData:
		data[0] = r.read(r.index & indexMask)
	}
}

// WritePort implements an OUT. Only data[0] is used.
func (r *RTC) WritePort(port uint16, data []byte) {
	if len(data) == 0 {
		return
	}
	switch port {
	case PortIndex:
		r.index = data[0]
	case PortData:
		r.write(r.index&indexMask, data[0])
	}
}

func (r *RTC) read(i byte) byte {
	if isTimeReg(i) {
		if r.regB&regBSET != 0 {
			return *r.frozen.field(i)
		}
		tr := r.encode(r.epoch.Add(r.clock.Now()), r.regB)
		return *tr.field(i)
	}
	switch i {
	case RegA:
		return r.regA | r.uip()
	case RegB:
		return r.regB
	case RegC:
		return 0 // no interrupt flags are ever raised
	case RegD:
		return regDVRT
	}
	return r.ram[i]
}

// uip returns register A's update-in-progress bit: set in the last 244 us
// before each second boundary of RTC time, when a real chip would be
// about to start its update cycle, so guests that wait for it to clear
// then read without tearing. Updates are inhibited while SET is on.
func (r *RTC) uip() byte {
	if r.regB&regBSET != 0 {
		return 0
	}
	t := r.epoch.Add(r.clock.Now())
	if time.Duration(t.Nanosecond()) >= time.Second-uipWindow {
		return regAUIP
	}
	return 0
}

func (r *RTC) write(i byte, v byte) {
	if isTimeReg(i) {
		if r.regB&regBSET != 0 {
			*r.frozen.field(i) = v
			return
		}
		// Writing a counter of a running clock: change just that field,
		// keeping the sub-second phase.
		n := r.clock.Now()
		t := r.epoch.Add(n)
		tr := r.encode(t, r.regB)
		*tr.field(i) = v
		r.apply(tr, time.Duration(t.Nanosecond()), n)
		return
	}
	switch i {
	case RegA:
		r.regA = v &^ regAUIP // UIP is read-only
	case RegB:
		r.writeB(v)
	case RegC, RegD:
		// Read-only.
	default:
		r.ram[i] = v
	}
}

func (r *RTC) writeB(v byte) {
	old := r.regB
	if v&regBSET != 0 {
		// Setting SET clears UIE on the MC146818.
		v &^= regBUIE
	}
	switch {
	case old&regBSET == 0 && v&regBSET != 0:
		// Freeze the registers in the format they were in.
		r.frozen = r.encode(r.epoch.Add(r.clock.Now()), old)
	case old&regBSET != 0 && v&regBSET == 0:
		// Resume counting from the written time, with a fresh second
		// starting now, in the format now selected.
		r.regB = v
		r.apply(r.frozen, 0, r.clock.Now())
		r.frozen = TimeRegs{}
	}
	r.regB = v
}

// apply makes the RTC show the time in tr plus frac at clock time n.
func (r *RTC) apply(tr TimeRegs, frac, n time.Duration) {
	t := r.decode(tr).Add(frac)
	r.epoch = t.Add(-n)
}

// encode returns the time registers for t in register B's format b.
func (r *RTC) encode(t time.Time, b byte) TimeRegs {
	enc := func(v int) byte {
		if b&regBDM != 0 {
			return byte(v)
		}
		return byte(v/10<<4 | v%10)
	}
	h := t.Hour()
	hour := enc(h)
	if b&regB24h == 0 {
		h12 := h % 12
		if h12 == 0 {
			h12 = 12
		}
		hour = enc(h12)
		if h >= 12 {
			hour |= hourPM
		}
	}
	y := t.Year()
	return TimeRegs{
		Sec:        enc(t.Second()),
		Min:        enc(t.Minute()),
		Hour:       hour,
		DayOfWeek:  enc(int(t.Weekday()) + 1), // Sunday is 1
		DayOfMonth: enc(t.Day()),
		Month:      enc(int(t.Month())),
		Year:       enc(mod(y, 100)),
		Century:    enc(mod(floorDiv(y, 100), 100)),
	}
}

// decode interprets tr in the current register B format. The day of week
// is not used: as in QEMU it is always derived from the date, so it stays
// right after Linux sets the date without writing it. Out-of-range
// fields (a guest may write anything) are normalised by time.Date, and
// invalid BCD digits are taken at face value; a real chip would count on
// from such values in its own odd way, which no sane guest depends on.
func (r *RTC) decode(tr TimeRegs) time.Time {
	bin := r.regB&regBDM != 0
	dec := func(v byte) int {
		if bin {
			return int(v)
		}
		return int(v>>4)*10 + int(v&0x0f)
	}
	h := dec(tr.Hour)
	if r.regB&regB24h == 0 {
		h = dec(tr.Hour&^hourPM) % 12
		if tr.Hour&hourPM != 0 {
			h += 12
		}
	}
	return time.Date(dec(tr.Century)*100+dec(tr.Year), time.Month(dec(tr.Month)), dec(tr.DayOfMonth),
		h, dec(tr.Min), dec(tr.Sec), 0, time.UTC)
}

func mod(a, m int) int {
	a %= m
	if a < 0 {
		a += m
	}
	return a
}

func floorDiv(a, m int) int {
	q := a / m
	if a%m < 0 {
		q--
	}
	return q
}

// State is the RTC's state, for snapshots. The clock is wiring, not
// state: a restored RTC shows EpochSec/EpochNsec plus its clock's Now, so
// it continues where the saved one was provided the clock does too.
type State struct {
	Index byte           // last write to port 0x70, NMI disable in bit 7
	RAM   [CMOSSize]byte // plain CMOS; bytes at clock and control indices must be 0
	RegA  byte           // bits 0-6
	RegB  byte
	// EpochSec and EpochNsec are the RTC time at clock time 0, as Unix
	// time (seconds and 0..999999999 nanoseconds): the base time passed
	// to New plus whatever offset the guest set.
	EpochSec  int64
	EpochNsec int32
	// Frozen holds the time registers while register B's SET bit is on
	// (zero otherwise); clearing SET interprets them in the format
	// register B then selects.
	Frozen TimeRegs
}

// Save returns the RTC's state. It does not read the clock.
func (r *RTC) Save() State {
	return State{
		Index:     r.index,
		RAM:       r.ram,
		RegA:      r.regA,
		RegB:      r.regB,
		EpochSec:  r.epoch.Unix(),
		EpochNsec: int32(r.epoch.Nanosecond()),
		Frozen:    r.frozen,
	}
}

// Validate reports whether s is a state the RTC can be in.
func (s *State) Validate() error {
	var errs []error
	for i := range s.RAM {
		if isClockReg(byte(i)) && s.RAM[i] != 0 {
			errs = append(errs, fmt.Errorf("RAM[%#02x] = %#02x: clock/control register slots must be 0", i, s.RAM[i]))
		}
	}
	if s.RegA&regAUIP != 0 {
		errs = append(errs, fmt.Errorf("RegA %#02x: bit 7 (UIP) is computed, must be 0", s.RegA))
	}
	if s.RegB&regBSET != 0 && s.RegB&regBUIE != 0 {
		errs = append(errs, fmt.Errorf("RegB %#02x: UIE cannot be set while SET is", s.RegB))
	}
	if s.RegB&regBSET == 0 && s.Frozen != (TimeRegs{}) {
		errs = append(errs, errors.New("Frozen time registers set while SET is clear"))
	}
	if s.EpochSec > maxEpochSecond || s.EpochSec < -maxEpochSecond {
		errs = append(errs, fmt.Errorf("EpochSec %d out of range ±%d", s.EpochSec, int64(maxEpochSecond)))
	}
	if s.EpochNsec < 0 || s.EpochNsec >= 1e9 {
		errs = append(errs, fmt.Errorf("EpochNsec %d out of range [0, 1e9)", s.EpochNsec))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("rtc: invalid state: %w", err)
	}
	return nil
}

// Restore loads s after validating it; on error the RTC is unchanged.
func (r *RTC) Restore(s State) error {
	if err := s.Validate(); err != nil {
		return err
	}
	r.index = s.Index
	r.ram = s.RAM
	r.regA = s.RegA
	r.regB = s.RegB
	r.epoch = time.Unix(s.EpochSec, int64(s.EpochNsec)).UTC()
	r.frozen = s.Frozen
	return nil
}
