// Package uart models a National Semiconductor 16550A UART, the PC serial
// port, well enough for Linux's 8250 driver (including its probing, which
// must conclude "16550A") and for small hand-written test guests.
//
// The model is deterministic: its state changes only through port accesses
// and through Receive, it reads no clock and starts no goroutines, so a
// recorder that logs those calls can replay it exactly. Line timing is not
// modelled: a byte written to THR is handed to the output writer at once and
// the transmitter is immediately empty again, and received bytes are visible
// as soon as Receive accepts them. Because of that, a FIFO holding fewer
// bytes than its trigger level reports the character-timeout interrupt
// (IIR 0xC) at once rather than after four character times.
//
// The interrupt output follows PC wiring: it is (interrupt pending && MCR
// OUT2), and off in loopback mode; irq is called on changes only.
//
// All methods must be called from one thread (the vCPU thread); there is no
// locking.
package uart

import (
	"errors"
	"fmt"
	"io"
)

// Register offsets from the base port.
const (
	regRBR = 0 // RBR (read), THR (write), DLL when DLAB=1
	regIER = 1 // IER, DLM when DLAB=1
	regIIR = 2 // IIR (read), FCR (write)
	regLCR = 3
	regMCR = 4
	regLSR = 5
	regMSR = 6
	regSCR = 7

	numRegs = 8
)

// Register bits.
const (
	ierRDI  = 0x01 // received data available
	ierTHRI = 0x02 // THR empty
	ierRLSI = 0x04 // receiver line status
	ierMSI  = 0x08 // modem status
	ierMask = 0x0f // a 16550A has no IER bits 4-7; they read as 0

	iirNoInt  = 0x01
	iirMSI    = 0x00
	iirTHRI   = 0x02
	iirRDI    = 0x04
	iirRLSI   = 0x06
	iirCTI    = 0x0c // character timeout
	iirFIFOOn = 0xc0 // both bits set: a 16550A with FIFOs enabled

	fcrEnable   = 0x01
	fcrClearRx  = 0x02
	fcrClearTx  = 0x04
	fcrDMA      = 0x08
	fcrTrigMask = 0xc0
	fcrStored   = fcrEnable | fcrDMA | fcrTrigMask

	lcrDLAB = 0x80

	mcrDTR  = 0x01
	mcrRTS  = 0x02
	mcrOUT1 = 0x04
	mcrOUT2 = 0x08
	mcrLOOP = 0x10
	mcrMask = 0x1f // bits 5-7 read as 0 on a 16550A

	lsrDR   = 0x01
	lsrOE   = 0x02
	lsrTHRE = 0x20
	lsrTEMT = 0x40

	msrDCTS  = 0x01
	msrDDSR  = 0x02
	msrTERI  = 0x04
	msrDDCD  = 0x08
	msrDelta = 0x0f
	msrCTS   = 0x10
	msrDSR   = 0x20
	msrRI    = 0x40
	msrDCD   = 0x80
)

// FIFOSize is the depth of the 16550A receive FIFO.
const FIFOSize = 16

// rxTriggers maps FCR bits 7:6 to the receive-data interrupt threshold.
var rxTriggers = [4]int{1, 4, 8, 14}

// UART is one 16550A at eight consecutive I/O ports.
type UART struct {
	base uint16
	irq  func(level bool)
	out  io.Writer
	err  error // first output error; output stops after it

	dll, dlm byte
	ier      byte
	fcr      byte // only fcrStored bits
	lcr      byte
	mcr      byte
	scr      byte
	msrDelta byte
	overrun  bool
	// thrPending is the THRE interrupt latch. It is kept false while IER
	// bit 1 is clear so that the state has one canonical form.
	thrPending bool

	rx    [FIFOSize]byte
	rxLen int // bytes at rx[0:rxLen], oldest first

	level bool // last level handed to irq
}

// New returns a 16550A decoding ports base..base+7 in its reset state. irq
// is called with the new level whenever the interrupt output changes (wire
// it to the PIC input, IRQ4 for COM1 at 0x3F8); out receives every
// transmitted byte. Either may be nil.
func New(base uint16, irq func(level bool), out io.Writer) *UART {
	if irq == nil {
		irq = func(bool) {}
	}
	if out == nil {
		out = io.Discard
	}
	return &UART{base: base, irq: irq, out: out}
}

// Base returns the first port the UART decodes.
func (u *UART) Base() uint16 { return u.base }

// Err returns the first error out returned, if any. After an error no more
// bytes are written to out (the guest still sees them sent).
func (u *UART) Err() error { return u.err }

// IRQLevel returns the current level of the interrupt output.
func (u *UART) IRQLevel() bool { return u.level }

func (u *UART) loopback() bool { return u.mcr&mcrLOOP != 0 }

func (u *UART) fifoOn() bool { return u.fcr&fcrEnable != 0 }

// rxCap is the receiver's capacity: the FIFO, or the single holding
// register when FIFOs are off.
func (u *UART) rxCap() int {
	if u.fifoOn() {
		return FIFOSize
	}
	return 1
}

// RxSpace returns how many bytes Receive would accept now. It is 0 in
// loopback mode, where the receiver is disconnected from the serial input.
func (u *UART) RxSpace() int {
	if u.loopback() {
		return 0
	}
	return u.rxCap() - u.rxLen
}

// Receive hands bytes from the outside world to the receiver and returns
// how many it took (at most RxSpace). The caller keeps the rest and offers
// them again later, typically after the guest has read RBR, so no input is
// ever lost to an overrun.
func (u *UART) Receive(b []byte) int {
	n := min(len(b), u.RxSpace())
	if n <= 0 {
		return 0
	}
	copy(u.rx[u.rxLen:], b[:n])
	u.rxLen += n
	u.update()
	return n
}

// push is the receiver input that cannot push back (the loopback path):
// a byte arriving at a full receiver is dropped and flagged as an overrun.
func (u *UART) push(b byte) {
	if u.rxLen >= u.rxCap() {
		u.overrun = true
		return
	}
	u.rx[u.rxLen] = b
	u.rxLen++
}

func (u *UART) pop() byte {
	if u.rxLen == 0 {
		return 0
	}
	b := u.rx[0]
	copy(u.rx[:], u.rx[1:u.rxLen])
	u.rxLen--
	return b
}

// modemLines returns the MSR status bits 4-7. In loopback the modem inputs
// are wired to the MCR outputs inside the chip; otherwise a terminal is
// attached and holds DCD, DSR and CTS asserted.
func modemLines(mcr byte) byte {
	if mcr&mcrLOOP == 0 {
		return msrDCD | msrDSR | msrCTS
	}
	var v byte
	if mcr&mcrDTR != 0 {
		v |= msrDSR
	}
	if mcr&mcrRTS != 0 {
		v |= msrCTS
	}
	if mcr&mcrOUT1 != 0 {
		v |= msrRI
	}
	if mcr&mcrOUT2 != 0 {
		v |= msrDCD
	}
	return v
}

func (u *UART) lsr() byte {
	v := byte(lsrTHRE | lsrTEMT) // the transmitter is always idle
	if u.rxLen > 0 {
		v |= lsrDR
	}
	if u.overrun {
		v |= lsrOE
	}
	return v
}

// interruptID returns IIR bits 0-3: the highest-priority pending and
// enabled source, or iirNoInt.
func (u *UART) interruptID() byte {
	switch {
	case u.ier&ierRLSI != 0 && u.overrun:
		return iirRLSI
	case u.ier&ierRDI != 0 && u.rxLen > 0:
		// Time is not modelled, so a FIFO below its trigger level reports
		// the character timeout at once instead of after four character
		// times; either way the driver drains the FIFO.
		if u.fifoOn() && u.rxLen < rxTriggers[u.fcr>>6] {
			return iirCTI
		}
		return iirRDI
	case u.ier&ierTHRI != 0 && u.thrPending:
		return iirTHRI
	case u.ier&ierMSI != 0 && u.msrDelta != 0:
		return iirMSI
	}
	return iirNoInt
}

func (u *UART) iir() byte {
	v := u.interruptID()
	if u.fifoOn() {
		v |= iirFIFOOn
	}
	return v
}

// computeLevel is the INTR pin as seen by the PIC: on PC boards OUT2 gates
// it, and in loopback the chip disconnects it.
func (u *UART) computeLevel() bool {
	return u.interruptID() != iirNoInt && u.mcr&mcrOUT2 != 0 && !u.loopback()
}

// update recomputes the interrupt output and reports changes only.
func (u *UART) update() {
	if l := u.computeLevel(); l != u.level {
		u.level = l
		u.irq(l)
	}
}

func (u *UART) reg(port uint16) (int, bool) {
	off := int(port) - int(u.base)
	if off < 0 || off >= numRegs {
		return 0, false
	}
	return off, true
}

// ReadPort implements an IN from port. Registers are 8 bits wide: a wider
// access reads the register into data[0] and all-ones into the rest.
func (u *UART) ReadPort(port uint16, data []byte) {
	for i := range data {
		data[i] = 0xff
	}
	off, ok := u.reg(port)
	if !ok || len(data) == 0 {
		return
	}
	data[0] = u.read(off)
}

// WritePort implements an OUT to port. Only data[0] is used.
func (u *UART) WritePort(port uint16, data []byte) {
	off, ok := u.reg(port)
	if !ok || len(data) == 0 {
		return
	}
	u.write(off, data[0])
}

func (u *UART) read(off int) byte {
	dlab := u.lcr&lcrDLAB != 0
	switch off {
	case regRBR:
		if dlab {
			return u.dll
		}
		b := u.pop()
		u.update()
		return b
	case regIER:
		if dlab {
			return u.dlm
		}
		return u.ier
	case regIIR:
		v := u.iir()
		// Reading IIR acknowledges THRE only when THRE is what it reports.
		if v&0x0f == iirTHRI {
			u.thrPending = false
			u.update()
		}
		return v
	case regLCR:
		return u.lcr
	case regMCR:
		return u.mcr
	case regLSR:
		v := u.lsr()
		u.overrun = false // error bits clear on read
		u.update()
		return v
	case regMSR:
		v := modemLines(u.mcr) | u.msrDelta
		u.msrDelta = 0
		u.update()
		return v
	default: // regSCR
		return u.scr
	}
}

func (u *UART) write(off int, v byte) {
	dlab := u.lcr&lcrDLAB != 0
	switch off {
	case regRBR:
		if dlab {
			u.dll = v
			return
		}
		u.transmit(v)
	case regIER:
		if dlab {
			u.dlm = v
			return
		}
		old := u.ier
		u.ier = v & ierMask
		// Enabling THRI while THR is empty raises THRE (Linux's startup test
		// and its tx start path rely on that); disabling it drops the latch.
		// As in QEMU and Bochs only the rising edge resamples.
		if (old^u.ier)&ierTHRI != 0 {
			u.thrPending = u.ier&ierTHRI != 0
		}
	case regIIR:
		u.writeFCR(v)
	case regLCR:
		u.lcr = v
	case regMCR:
		old := u.mcr
		u.mcr = v & mcrMask
		u.modemChange(modemLines(old), modemLines(u.mcr))
	case regLSR, regMSR:
		// Read-only on a 16550A (writable only in factory test mode).
	default:
		u.scr = v
	}
	u.update()
}

// transmit handles a THR write: the byte goes out at once (or, in loopback,
// into the receiver), so THR is empty again and THRE is re-raised.
func (u *UART) transmit(b byte) {
	if u.loopback() {
		u.push(b)
	} else if u.err == nil {
		n, err := u.out.Write([]byte{b})
		if err == nil && n != 1 {
			err = io.ErrShortWrite
		}
		if err != nil {
			u.err = fmt.Errorf("uart %#x: output: %w", u.base, err)
		}
	}
	u.thrPending = u.ier&ierTHRI != 0
}

func (u *UART) writeFCR(v byte) {
	old := u.fcr
	if v&fcrEnable == 0 {
		// With bit 0 clear the other bits are not programmed.
		u.fcr = 0
	} else {
		u.fcr = v & fcrStored
	}
	// Toggling FIFO mode resets the FIFOs; so do the reset bits.
	if (old^u.fcr)&fcrEnable != 0 || (u.fcr&fcrEnable != 0 && v&fcrClearRx != 0) {
		u.rxLen = 0
	}
	// fcrClearTx: the transmit side holds nothing, so there is nothing to do.
}

// modemChange latches MSR delta bits for a change of the modem inputs.
func (u *UART) modemChange(old, cur byte) {
	ch := old ^ cur
	if ch&msrCTS != 0 {
		u.msrDelta |= msrDCTS
	}
	if ch&msrDSR != 0 {
		u.msrDelta |= msrDDSR
	}
	if old&msrRI != 0 && cur&msrRI == 0 { // trailing edge only
		u.msrDelta |= msrTERI
	}
	if ch&msrDCD != 0 {
		u.msrDelta |= msrDDCD
	}
}

// State is the guest-visible state of a UART, for snapshots. The base port,
// irq callback and output writer are wiring, not state.
type State struct {
	DLL, DLM byte
	IER      byte // bits 0-3
	FCR      byte // FIFO enable, DMA mode and trigger bits (0xc9 mask); 0 when FIFOs are off
	LCR      byte
	MCR      byte // bits 0-4
	SCR      byte
	MSRDelta byte // MSR bits 0-3 latched since the last MSR read
	Overrun  bool // LSR OE, cleared by reading LSR
	// THRPending is the THRE interrupt latch; it can only be set while
	// IER bit 1 is.
	THRPending bool
	RxFIFO     []byte // received bytes, oldest first
}

// Save returns a copy of the UART's state.
func (u *UART) Save() State {
	return State{
		DLL: u.dll, DLM: u.dlm,
		IER: u.ier, FCR: u.fcr, LCR: u.lcr, MCR: u.mcr, SCR: u.scr,
		MSRDelta:   u.msrDelta,
		Overrun:    u.overrun,
		THRPending: u.thrPending,
		RxFIFO:     append([]byte{}, u.rx[:u.rxLen]...),
	}
}

// Validate reports whether s is a state a 16550A can be in.
func (s *State) Validate() error {
	var errs []error
	if s.IER&^ierMask != 0 {
		errs = append(errs, fmt.Errorf("IER %#02x has bits outside %#02x", s.IER, ierMask))
	}
	if s.FCR&^fcrStored != 0 || (s.FCR != 0 && s.FCR&fcrEnable == 0) {
		errs = append(errs, fmt.Errorf("FCR %#02x is not a stored FCR value (FIFO enable plus mask %#02x, or 0)", s.FCR, fcrStored))
	}
	if s.MCR&^mcrMask != 0 {
		errs = append(errs, fmt.Errorf("MCR %#02x has bits outside %#02x", s.MCR, mcrMask))
	}
	if s.MSRDelta&^msrDelta != 0 {
		errs = append(errs, fmt.Errorf("MSRDelta %#02x has bits outside %#02x", s.MSRDelta, msrDelta))
	}
	if s.THRPending && s.IER&ierTHRI == 0 {
		errs = append(errs, errors.New("THRPending set while IER bit 1 is clear"))
	}
	capacity := 1
	if s.FCR&fcrEnable != 0 {
		capacity = FIFOSize
	}
	if len(s.RxFIFO) > capacity {
		errs = append(errs, fmt.Errorf("RxFIFO holds %d bytes, receiver capacity is %d", len(s.RxFIFO), capacity))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("uart: invalid state: %w", err)
	}
	return nil
}

// Restore loads s after validating it; on error the UART is unchanged.
// Restore does not call irq: the interrupt controller's own saved state
// already holds the line level, so IRQLevel simply reflects s afterwards.
func (u *UART) Restore(s State) error {
	if err := s.Validate(); err != nil {
		return err
	}
	u.dll, u.dlm = s.DLL, s.DLM
	u.ier, u.fcr, u.lcr, u.mcr, u.scr = s.IER, s.FCR, s.LCR, s.MCR, s.SCR
	u.msrDelta = s.MSRDelta
	u.overrun = s.Overrun
	u.thrPending = s.THRPending
	u.rxLen = copy(u.rx[:], s.RxFIFO)
	u.level = u.computeLevel()
	return nil
}
