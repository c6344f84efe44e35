// Package pic models the PC's pair of cascaded Intel 8259A programmable
// interrupt controllers (master at ports 0x20/0x21, slave at 0xA0/0xA1 wired
// to master input IRQ2) together with the chipset's edge/level control
// registers (ELCR, ports 0x4D0/0x4D1).
//
// The machine runs without an in-kernel irqchip, so this model is the
// interrupt controller the guest programs: devices raise lines with SetIRQ,
// the vCPU loop asks Pending and, when it can inject, calls Acknowledge for
// the vector (the INTA cycle). The model is a pure function of its state and
// the calls made on it; it reads no time and starts no goroutines, so a
// recorded run replays exactly. All calls must come from one thread.
//
// Not modelled: special fully nested mode is honoured only on the master,
// ICW1's LTIM bit is ignored (the ELCR decides edge/level, as on PIIX-class
// chipsets) and buffered mode is ignored.
package pic

import (
	"errors"
	"fmt"
)

// Port addresses decoded by the pair.
const (
	MasterCommand = 0x20
	MasterData    = 0x21
	SlaveCommand  = 0xA0
	SlaveData     = 0xA1
	ELCRMaster    = 0x4D0
	ELCRSlave     = 0x4D1
)

// cascadeIRQ is the master input the slave's INT output is wired to.
const cascadeIRQ = 2

// ELCR bits that chipsets hard-wire to edge: IRQ0 (PIT), IRQ1 (keyboard),
// IRQ2 (cascade), IRQ8 (RTC) and IRQ13 (FPU).
const (
	elcrMaskMaster = 0xf8
	elcrMaskSlave  = 0xde
)

// chip is one 8259A.
type chip struct {
	lines       uint8 // current input levels: edge detection and level mode
	irr         uint8
	imr         uint8
	isr         uint8
	elcr        uint8 // 1 = level triggered
	elcrMask    uint8
	priorityAdd uint8 // the input with the highest priority (rotation)
	base        uint8 // ICW2: vector of input 0
	icw3        uint8
	initState   uint8 // 0 ready, 1/2/3: expecting ICW2/ICW3/ICW4
	needICW4    bool
	single      bool
	autoEOI     bool
	rotateAEOI  bool
	mode8086    bool
	sfnm        bool // special fully nested mode (used on the master)
	readISR     bool // OCW3 RR/RIS: port A0=0 reads ISR instead of IRR
	poll        bool // next read is a poll (OCW3 P)
	specialMask bool
	isMaster    bool
}

// priority returns the priority (0 highest .. 7 lowest) of the
// highest-priority bit set in mask, or 8 if none is.
func (c *chip) priority(mask uint8) int {
	for p := 0; p < 8; p++ {
		if mask&(1<<((uint(p)+uint(c.priorityAdd))&7)) != 0 {
			return p
		}
	}
	return 8
}

// request returns the input the chip wants to interrupt for, or -1: the
// highest-priority unmasked request that outranks everything in service.
func (c *chip) request() int {
	p := c.priority(c.irr &^ c.imr)
	if p == 8 {
		return -1
	}
	inService := c.isr
	if c.specialMask {
		// Special mask mode: a masked level in service does not block
		// lower levels; that is its whole point.
		inService &^= c.imr
	}
	if c.sfnm && c.isMaster {
		// Special fully nested: the slave may interrupt while one of
		// its own requests is in service.
		inService &^= 1 << cascadeIRQ
	}
	if p < c.priority(inService) {
		return (p + int(c.priorityAdd)) & 7
	}
	return -1
}

// setInput drives input irq (0..7) to level.
func (c *chip) setInput(irq int, level bool) {
	m := uint8(1) << uint(irq)
	if c.elcr&m != 0 {
		// Level triggered: the request follows the line.
		if level {
			c.irr |= m
		} else {
			c.irr &^= m
		}
	} else if level && c.lines&m == 0 {
		// Edge triggered: only a 0->1 transition requests.
		c.irr |= m
	}
	if level {
		c.lines |= m
	} else {
		c.lines &^= m
	}
}

// intack performs the chip's part of an INTA cycle for input irq.
func (c *chip) intack(irq int) {
	m := uint8(1) << uint(irq)
	if c.autoEOI {
		if c.rotateAEOI {
			c.priorityAdd = uint8(irq+1) & 7
		}
	} else {
		c.isr |= m
	}
	// A level-triggered request stays while its line is high.
	if c.elcr&m == 0 {
		c.irr &^= m
	}
}

// pollRead is the OCW3 poll: the read acts as an INTA and returns
// 0x80|level, or 0 when nothing is requesting.
func (c *chip) pollRead() uint8 {
	irq := c.request()
	if irq < 0 {
		return 0
	}
	c.intack(irq)
	return 0x80 | uint8(irq)
}

func (c *chip) read(a0 bool) uint8 {
	if c.poll {
		c.poll = false
		return c.pollRead()
	}
	if a0 {
		return c.imr
	}
	if c.readISR {
		return c.isr
	}
	return c.irr
}

func (c *chip) write(a0 bool, v uint8) {
	if a0 {
		c.writeData(v)
		return
	}
	switch {
	case v&0x10 != 0:
		c.icw1(v)
	case v&0x08 != 0:
		// OCW3.
		if v&0x04 != 0 {
			c.poll = true
		}
		if v&0x02 != 0 {
			c.readISR = v&0x01 != 0
		}
		if v&0x40 != 0 {
			c.specialMask = v&0x20 != 0
		}
	default:
		c.ocw2(v)
	}
}

// icw1 starts the initialisation sequence. As the datasheet says it clears
// IMR and ISR, resets priority (IR0 highest), selects IRR for reads, leaves
// special mask mode and resets the edge-sense latches, so a line that is
// already high must go low and high again to request. Everything ICW4
// selects is zeroed in case no ICW4 follows.
func (c *chip) icw1(v uint8) {
	c.irr = c.lines & c.elcr
	c.imr = 0
	c.isr = 0
	c.priorityAdd = 0
	c.readISR = false
	c.poll = false
	c.specialMask = false
	c.autoEOI = false
	c.rotateAEOI = false
	c.mode8086 = false
	c.sfnm = false
	c.needICW4 = v&0x01 != 0
	c.single = v&0x02 != 0
	c.initState = 1
}

func (c *chip) writeData(v uint8) {
	switch c.initState {
	case 0:
		c.imr = v // OCW1
	case 1:
		c.base = v & 0xf8 // ICW2 (8086 mode: T7..T3)
		switch {
		case !c.single:
			c.initState = 2
		case c.needICW4:
			c.initState = 3
		default:
			c.initState = 0
		}
	case 2:
		c.icw3 = v
		if c.needICW4 {
			c.initState = 3
		} else {
			c.initState = 0
		}
	default:
		c.mode8086 = v&0x01 != 0
		c.autoEOI = v&0x02 != 0
		c.sfnm = v&0x10 != 0
		c.initState = 0
	}
}

func (c *chip) ocw2(v uint8) {
	switch v >> 5 {
	case 0: // clear rotate in automatic EOI mode
		c.rotateAEOI = false
	case 4: // set rotate in automatic EOI mode
		c.rotateAEOI = true
	case 1, 5: // non-specific EOI (5: and rotate)
		p := c.priority(c.isr)
		if p == 8 {
			return
		}
		irq := (p + int(c.priorityAdd)) & 7
		c.isr &^= 1 << uint(irq)
		if v>>5 == 5 {
			c.priorityAdd = uint8(irq+1) & 7
		}
	case 3: // specific EOI
		c.isr &^= 1 << (v & 7)
	case 6: // set priority: level L becomes the lowest
		c.priorityAdd = (v + 1) & 7
	case 7: // rotate on specific EOI
		c.isr &^= 1 << (v & 7)
		c.priorityAdd = (v + 1) & 7
	}
	// case 2: no operation
}

func (c *chip) setELCR(v uint8) {
	v &= c.elcrMask
	nowLevel := v &^ c.elcr
	c.elcr = v
	// A line switched to level mode requests exactly while it is high.
	c.irr = c.irr&^nowLevel | c.lines&nowLevel
}

// PIC is the master/slave 8259A pair.
type PIC struct {
	master, slave chip
	irq2          bool // level of the external IRQ2 line (ORed with the slave's INT)
}

// New returns the pair in its power-on state: not initialised, all inputs
// unmasked, vector base 0, everything edge triggered. Guests (and BIOSes)
// always run the ICW sequence before use.
func New() *PIC {
	p := &PIC{}
	p.master.isMaster = true
	p.master.elcrMask = elcrMaskMaster
	p.slave.elcrMask = elcrMaskSlave
	return p
}

// update propagates the slave's INT output to master input IRQ2. On the
// real chip a request must stay asserted until INTA; for the cascade input
// that matters (a slave request masked or withdrawn before INTA must not
// linger at the master), so IRR2 drops with the line. External lines keep
// their edge latch, since emulated devices deliver edges as short pulses.
func (p *PIC) update() {
	level := p.irq2 || p.slave.request() >= 0
	p.master.setInput(cascadeIRQ, level)
	if !level {
		p.master.irr &^= 1 << cascadeIRQ
	}
}

// SetIRQ drives interrupt line irq (0..15) to level; other values are
// ignored. IRQ2 is ORed with the slave's output on the master's cascade input.
func (p *PIC) SetIRQ(irq int, level bool) {
	switch {
	case irq == cascadeIRQ:
		p.irq2 = level
	case irq >= 0 && irq < 8:
		p.master.setInput(irq, level)
	case irq >= 8 && irq < 16:
		p.slave.setInput(irq-8, level)
	default:
		return
	}
	p.update()
}

// Pending reports whether the master's INT output is asserted: some unmasked
// request outranks everything in service.
func (p *PIC) Pending() bool {
	return p.master.request() >= 0
}

// Acknowledge runs an INTA cycle and returns the vector to inject. When no
// request is pending any more it returns the master's IR7 vector without
// touching ISR (a spurious interrupt); when the master picks the cascade but
// the slave has nothing (the external IRQ2 line raised it), the slave's IR7
// vector is returned and only the master's ISR bit 2 is set, as on real
// hardware.
func (p *PIC) Acknowledge() uint8 {
	irq := p.master.request()
	if irq < 0 {
		return p.master.base + 7
	}
	var vec uint8
	if irq == cascadeIRQ && !p.master.single {
		irq2 := p.slave.request()
		if irq2 >= 0 {
			p.slave.intack(irq2)
			vec = p.slave.base + uint8(irq2)
		} else {
			vec = p.slave.base + 7
		}
		// The slave's INT drops during INTA, so a request still
		// pending there (auto-EOI) is a fresh edge at the master.
		p.master.setInput(cascadeIRQ, p.irq2)
	} else {
		vec = p.master.base + uint8(irq)
	}
	p.master.intack(irq)
	p.update()
	return vec
}

// ReadPort reads a PIC or ELCR register. Only data[0] carries the 8-bit
// register; the rest of a wider read, and any port not decoded here, reads
// as all-ones.
func (p *PIC) ReadPort(port uint16, data []byte) {
	for i := range data {
		data[i] = 0xff
	}
	if len(data) == 0 {
		return
	}
	switch port {
	case MasterCommand, MasterData:
		data[0] = p.master.read(port == MasterData)
	case SlaveCommand, SlaveData:
		data[0] = p.slave.read(port == SlaveData)
	case ELCRMaster:
		data[0] = p.master.elcr
	case ELCRSlave:
		data[0] = p.slave.elcr
	default:
		return
	}
	// A poll read is an acknowledge and may change the slave's output.
	p.update()
}

// WritePort writes a PIC or ELCR register from data[0]; extra bytes and
// ports not decoded here are ignored.
func (p *PIC) WritePort(port uint16, data []byte) {
	if len(data) == 0 {
		return
	}
	v := data[0]
	switch port {
	case MasterCommand, MasterData:
		p.master.write(port == MasterData, v)
	case SlaveCommand, SlaveData:
		p.slave.write(port == SlaveData, v)
	case ELCRMaster:
		p.master.setELCR(v)
	case ELCRSlave:
		p.slave.setELCR(v)
	default:
		return
	}
	p.update()
}

// ChipState is the saved state of one 8259A.
type ChipState struct {
	Lines              uint8 // input line levels
	IRR                uint8
	IMR                uint8
	ISR                uint8
	ELCR               uint8
	PriorityAdd        uint8 // highest-priority input, 0..7
	VectorBase         uint8 // multiple of 8
	ICW3               uint8
	InitState          uint8 // 0 ready; 1, 2, 3 expecting ICW2, ICW3, ICW4
	NeedICW4           bool
	SingleMode         bool
	AutoEOI            bool
	RotateAEOI         bool
	Mode8086           bool
	SpecialFullyNested bool
	ReadISR            bool
	Poll               bool
	SpecialMask        bool
}

// State is the saved state of the pair.
type State struct {
	Master   ChipState
	Slave    ChipState
	IRQ2Line bool // level of the external IRQ2 line
}

func (c *chip) save() ChipState {
	return ChipState{
		Lines: c.lines, IRR: c.irr, IMR: c.imr, ISR: c.isr, ELCR: c.elcr,
		PriorityAdd: c.priorityAdd, VectorBase: c.base, ICW3: c.icw3,
		InitState: c.initState, NeedICW4: c.needICW4, SingleMode: c.single,
		AutoEOI: c.autoEOI, RotateAEOI: c.rotateAEOI, Mode8086: c.mode8086,
		SpecialFullyNested: c.sfnm, ReadISR: c.readISR, Poll: c.poll,
		SpecialMask: c.specialMask,
	}
}

func (c *chip) load(s ChipState) {
	c.lines, c.irr, c.imr, c.isr, c.elcr = s.Lines, s.IRR, s.IMR, s.ISR, s.ELCR
	c.priorityAdd, c.base, c.icw3, c.initState = s.PriorityAdd, s.VectorBase, s.ICW3, s.InitState
	c.needICW4, c.single, c.autoEOI, c.rotateAEOI = s.NeedICW4, s.SingleMode, s.AutoEOI, s.RotateAEOI
	c.mode8086, c.sfnm, c.readISR, c.poll, c.specialMask = s.Mode8086, s.SpecialFullyNested, s.ReadISR, s.Poll, s.SpecialMask
}

func validateChip(s ChipState, elcrMask uint8) error {
	switch {
	case s.PriorityAdd > 7:
		return fmt.Errorf("priority %d out of range 0..7", s.PriorityAdd)
	case s.VectorBase&7 != 0:
		return fmt.Errorf("vector base %#x not a multiple of 8", s.VectorBase)
	case s.InitState > 3:
		return fmt.Errorf("init state %d out of range 0..3", s.InitState)
	case s.InitState == 2 && s.SingleMode:
		return errors.New("expecting ICW3 in single mode")
	case s.InitState == 3 && !s.NeedICW4:
		return errors.New("expecting ICW4 that ICW1 did not announce")
	case s.ELCR&^elcrMask != 0:
		return fmt.Errorf("ELCR %#x sets hard-wired edge bits (allowed %#x)", s.ELCR, elcrMask)
	case s.IRR&s.ELCR != s.Lines&s.ELCR:
		return fmt.Errorf("level-triggered IRR bits %#x differ from line levels %#x", s.IRR&s.ELCR, s.Lines&s.ELCR)
	}
	return nil
}

// Save returns the pair's state.
func (p *PIC) Save() State {
	return State{Master: p.master.save(), Slave: p.slave.save(), IRQ2Line: p.irq2}
}

// Restore replaces the pair's state with s after validating it; on error the
// PIC is unchanged.
func (p *PIC) Restore(s State) error {
	if err := validateChip(s.Master, elcrMaskMaster); err != nil {
		return fmt.Errorf("pic: master: %w", err)
	}
	if err := validateChip(s.Slave, elcrMaskSlave); err != nil {
		return fmt.Errorf("pic: slave: %w", err)
	}
	slave := chip{elcrMask: elcrMaskSlave}
	slave.load(s.Slave)
	wantIR2 := s.IRQ2Line || slave.request() >= 0
	if s.Master.IRR&^s.Master.Lines&(1<<cascadeIRQ) != 0 {
		return errors.New("pic: master IRR2 set while its line is low")
	}
	if (s.Master.Lines&(1<<cascadeIRQ) != 0) != wantIR2 {
		return fmt.Errorf("pic: master IRQ2 line level %v disagrees with slave output and IRQ2 line (%v)",
			!wantIR2, wantIR2)
	}
	p.master.load(s.Master)
	p.slave = slave
	p.irq2 = s.IRQ2Line
	return nil
}
