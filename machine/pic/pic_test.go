package pic

import (
	"bytes"
	"github.com/gokvm-ft/gokvm-ft/internal/statetest"

	"math/rand"
	"reflect"
	"testing"
)

func out(p *PIC, port uint16, v uint8) { p.WritePort(port, []byte{v}) }

func in(p *PIC, port uint16) uint8 {
	b := []byte{0}
	p.ReadPort(port, b)
	return b[0]
}

// linuxInit is arch/x86/kernel/i8259.c:init_8259A(auto_eoi) followed by
// the masks Linux restores (everything masked but the cascade).
func linuxInit(p *PIC, autoEOI bool) {
	out(p, MasterData, 0xff)
	out(p, SlaveData, 0xff)
	out(p, MasterCommand, 0x11)
	out(p, MasterData, 0x30)
	out(p, MasterData, 0x04)
	if autoEOI {
		out(p, MasterData, 0x03)
	} else {
		out(p, MasterData, 0x01)
	}
	out(p, SlaveCommand, 0x11)
	out(p, SlaveData, 0x38)
	out(p, SlaveData, 0x02)
	out(p, SlaveData, 0x01)
	out(p, MasterData, 0xfb)
	out(p, SlaveData, 0xff)
}

func newLinux(t *testing.T) *PIC {
	t.Helper()
	p := New()
	linuxInit(p, false)
	out(p, MasterData, 0x00)
	out(p, SlaveData, 0x00)
	return p
}

func pulse(p *PIC, irq int) {
	p.SetIRQ(irq, true)
	p.SetIRQ(irq, false)
}

func wantAck(t *testing.T, p *PIC, want uint8) {
	t.Helper()
	if !p.Pending() {
		t.Fatalf("nothing pending, want vector %#x", want)
	}
	if got := p.Acknowledge(); got != want {
		t.Fatalf("Acknowledge = %#x, want %#x", got, want)
	}
}

func wantNone(t *testing.T, p *PIC) {
	t.Helper()
	if p.Pending() {
		t.Fatalf("unexpected pending interrupt (master IRR %#x ISR %#x IMR %#x)", p.master.irr, p.master.isr, p.master.imr)
	}
}

func readISR(p *PIC, cmd uint16) uint8 {
	out(p, cmd, 0x0b)
	v := in(p, cmd)
	out(p, cmd, 0x0a)
	return v
}

func TestLinuxProbeAndInit(t *testing.T) {
	p := New()
	// probe_8259A: the IMR must read back what was written.
	out(p, SlaveData, 0xff)
	out(p, MasterData, 0xa5)
	if got := in(p, MasterData); got != 0xa5 {
		t.Fatalf("IMR probe = %#x", got)
	}
	linuxInit(p, false)
	if got := in(p, MasterData); got != 0xfb {
		t.Fatalf("master IMR = %#x", got)
	}
	if got := in(p, SlaveData); got != 0xff {
		t.Fatalf("slave IMR = %#x", got)
	}
	wantNone(t, p)
	// Unmask the timer (IRQ0) as Linux does, raise it.
	out(p, MasterData, 0xfa)
	p.SetIRQ(0, true)
	wantAck(t, p, 0x30)
	p.SetIRQ(0, false)
	if got := readISR(p, MasterCommand); got != 0x01 {
		t.Fatalf("ISR = %#x", got)
	}
	// mask_and_ack_8259A: specific EOI.
	out(p, MasterCommand, 0x60)
	if got := readISR(p, MasterCommand); got != 0 {
		t.Fatalf("ISR after EOI = %#x", got)
	}
	wantNone(t, p)
	pulse(p, 0)
	wantAck(t, p, 0x30)
}

func TestMasking(t *testing.T) {
	p := newLinux(t)
	out(p, MasterData, 0x08)
	pulse(p, 3)
	wantNone(t, p)
	if got := in(p, MasterCommand); got != 0x08 {
		t.Fatalf("IRR = %#x, masked request must still be recorded", got)
	}
	out(p, MasterData, 0x00)
	wantAck(t, p, 0x33)
	// Masking the cascade hides slave requests.
	out(p, MasterCommand, 0x20)
	out(p, MasterData, 0x04)
	pulse(p, 9)
	wantNone(t, p)
	out(p, MasterData, 0x00)
	wantAck(t, p, 0x39)
}

func TestPriorityOrder(t *testing.T) {
	p := newLinux(t)
	for _, irq := range []int{7, 5, 3, 1, 6} {
		pulse(p, irq)
	}
	for _, v := range []uint8{0x31, 0x33, 0x35, 0x36, 0x37} {
		wantAck(t, p, v)
		wantNone(t, p) // lower levels wait for the EOI
		out(p, MasterCommand, 0x20)
	}
	wantNone(t, p)
}

func TestNested(t *testing.T) {
	p := newLinux(t)
	pulse(p, 4)
	wantAck(t, p, 0x34)
	pulse(p, 6)
	wantNone(t, p)
	pulse(p, 1)
	wantAck(t, p, 0x31) // higher priority interrupts the IRQ4 handler
	if got := readISR(p, MasterCommand); got != 0x12 {
		t.Fatalf("ISR = %#x, want 0x12", got)
	}
	pulse(p, 4)
	wantNone(t, p)              // same level as in service: must wait
	out(p, MasterCommand, 0x20) // non-specific EOI ends IRQ1
	if got := readISR(p, MasterCommand); got != 0x10 {
		t.Fatalf("ISR = %#x, want 0x10", got)
	}
	wantNone(t, p)
	out(p, MasterCommand, 0x20)
	wantAck(t, p, 0x34)
	out(p, MasterCommand, 0x20)
	wantAck(t, p, 0x36)
}

func TestCascade(t *testing.T) {
	p := newLinux(t)
	p.SetIRQ(12, true)
	if got := in(p, MasterCommand); got != 0x04 {
		t.Fatalf("master IRR = %#x, want cascade bit", got)
	}
	if got := in(p, SlaveCommand); got != 0x10 {
		t.Fatalf("slave IRR = %#x", got)
	}
	wantAck(t, p, 0x3c)
	p.SetIRQ(12, false)
	if m, s := readISR(p, MasterCommand), readISR(p, SlaveCommand); m != 0x04 || s != 0x10 {
		t.Fatalf("ISR master %#x slave %#x", m, s)
	}
	// Two slave requests; the lower one waits for both EOIs.
	pulse(p, 8)
	pulse(p, 14)
	wantNone(t, p)
	out(p, SlaveCommand, 0x64) // specific EOI IRQ12 on the slave
	wantNone(t, p)             // master still has IRQ2 in service
	out(p, MasterCommand, 0x62)
	wantAck(t, p, 0x38)
	wantNone(t, p)
	out(p, SlaveCommand, 0x20)
	out(p, MasterCommand, 0x20)
	wantAck(t, p, 0x3e)
	out(p, SlaveCommand, 0x20)
	out(p, MasterCommand, 0x20)
	wantNone(t, p)
	// Master IRQ1 outranks the cascade; IRQ3 does not.
	pulse(p, 3)
	pulse(p, 10)
	pulse(p, 1)
	wantAck(t, p, 0x31)
	out(p, MasterCommand, 0x20)
	wantAck(t, p, 0x3a)
	out(p, SlaveCommand, 0x20)
	out(p, MasterCommand, 0x20)
	wantAck(t, p, 0x33)
}

func TestAutoEOI(t *testing.T) {
	p := New()
	linuxInit(p, true)
	out(p, MasterData, 0)
	out(p, SlaveData, 0)
	pulse(p, 5)
	wantAck(t, p, 0x35)
	if got := readISR(p, MasterCommand); got != 0 {
		t.Fatalf("ISR = %#x in auto-EOI mode", got)
	}
	pulse(p, 6)
	wantAck(t, p, 0x36) // no EOI needed
	// Slave with auto-EOI (Linux leaves the slave in normal EOI):
	// back to back requests both get through.
	out(p, SlaveCommand, 0x11)
	out(p, SlaveData, 0x38)
	out(p, SlaveData, 0x02)
	out(p, SlaveData, 0x03)
	pulse(p, 9)
	pulse(p, 11)
	wantAck(t, p, 0x39)
	wantAck(t, p, 0x3b)
	wantNone(t, p)
	// Rotate in auto-EOI mode: the acknowledged level becomes lowest.
	out(p, MasterCommand, 0x80)
	pulse(p, 3)
	wantAck(t, p, 0x33)
	pulse(p, 3)
	pulse(p, 5)
	wantAck(t, p, 0x35)
	wantAck(t, p, 0x33)
	out(p, MasterCommand, 0x00) // clear rotate in AEOI
	pulse(p, 1)
	pulse(p, 6)
	// Priority stays where the last rotation left it (IRQ4 highest).
	wantAck(t, p, 0x36)
	wantAck(t, p, 0x31)
}

func TestSpuriousMaster(t *testing.T) {
	p := newLinux(t)
	if got := p.Acknowledge(); got != 0x37 {
		t.Fatalf("idle acknowledge = %#x, want 0x37", got)
	}
	if got := readISR(p, MasterCommand); got != 0 {
		t.Fatalf("spurious acknowledge set ISR %#x", got)
	}
	// Request withdrawn (masked) between INT and INTA.
	pulse(p, 4)
	out(p, MasterData, 0x10)
	if got := p.Acknowledge(); got != 0x37 {
		t.Fatalf("acknowledge = %#x, want spurious 0x37", got)
	}
	if got := readISR(p, MasterCommand); got != 0 {
		t.Fatalf("ISR = %#x", got)
	}
}

func TestSpuriousSlave(t *testing.T) {
	p := newLinux(t)
	// A slave request masked before INTA is withdrawn from the master
	// too, as on the real chip: no stale cascade request.
	pulse(p, 10)
	out(p, SlaveData, 0x04)
	wantNone(t, p)
	out(p, SlaveData, 0)
	wantAck(t, p, 0x3a) // the slave IRR bit was kept
	out(p, SlaveCommand, 0x20)
	out(p, MasterCommand, 0x20)

	// The cascade input requested with nothing at the slave: INTA
	// gets the slave's IR7 vector, and only the master is in service.
	p.SetIRQ(2, true)
	if got := p.Acknowledge(); got != 0x3f {
		t.Fatalf("acknowledge = %#x, want spurious 0x3f", got)
	}
	if m, s := readISR(p, MasterCommand), readISR(p, SlaveCommand); m != 0x04 || s != 0 {
		t.Fatalf("ISR master %#x slave %#x, want 0x04 0", m, s)
	}
	out(p, MasterCommand, 0x20) // Linux EOIs only the master
	wantNone(t, p)
	p.SetIRQ(2, false)
}

func TestPoll(t *testing.T) {
	p := newLinux(t)
	out(p, MasterCommand, 0x0c)
	if got := in(p, MasterCommand); got != 0 {
		t.Fatalf("poll with nothing = %#x", got)
	}
	pulse(p, 3)
	pulse(p, 6)
	out(p, MasterCommand, 0x0c)
	if got := in(p, MasterData); got != 0x83 {
		t.Fatalf("poll = %#x, want 0x83", got)
	}
	if got := readISR(p, MasterCommand); got != 0x08 {
		t.Fatalf("poll did not set ISR: %#x", got)
	}
	// The poll lasts one read: the next read is IRR again.
	if got := in(p, MasterCommand); got != 0x40 {
		t.Fatalf("IRR after poll = %#x", got)
	}
	out(p, MasterCommand, 0x20)
	out(p, MasterCommand, 0x0c)
	if got := in(p, MasterCommand); got != 0x86 {
		t.Fatalf("poll = %#x, want 0x86", got)
	}
	out(p, MasterCommand, 0x20)
	// Polling a cascaded request: master says 2, slave says which.
	pulse(p, 13)
	out(p, MasterCommand, 0x0c)
	if got := in(p, MasterCommand); got != 0x82 {
		t.Fatalf("master poll = %#x", got)
	}
	out(p, SlaveCommand, 0x0c)
	if got := in(p, SlaveCommand); got != 0x85 {
		t.Fatalf("slave poll = %#x", got)
	}
	out(p, SlaveCommand, 0x20)
	out(p, MasterCommand, 0x20)
	wantNone(t, p)
}

func TestReadIRRISR(t *testing.T) {
	p := newLinux(t)
	out(p, MasterData, 0xff)
	pulse(p, 1)
	pulse(p, 5)
	if got := in(p, MasterCommand); got != 0x22 {
		t.Fatalf("IRR = %#x", got)
	}
	out(p, MasterCommand, 0x0b)
	if got := in(p, MasterCommand); got != 0 {
		t.Fatalf("ISR = %#x", got)
	}
	if got := in(p, MasterCommand); got != 0 {
		t.Fatalf("ISR (sticky select) = %#x", got)
	}
	out(p, MasterCommand, 0x08) // RR=0: selection unchanged
	if got := in(p, MasterCommand); got != 0 {
		t.Fatalf("ISR = %#x", got)
	}
	out(p, MasterData, 0)
	wantAck(t, p, 0x31)
	if got := in(p, MasterCommand); got != 0x02 {
		t.Fatalf("ISR = %#x", got)
	}
	out(p, MasterCommand, 0x0a)
	if got := in(p, MasterCommand); got != 0x20 {
		t.Fatalf("IRR = %#x", got)
	}
	if got := in(p, MasterData); got != 0 {
		t.Fatalf("IMR = %#x", got)
	}
}

func TestRotation(t *testing.T) {
	p := newLinux(t)
	// Set priority: IRQ4 lowest, so IRQ5 is the highest.
	out(p, MasterCommand, 0xc4)
	pulse(p, 3)
	pulse(p, 6)
	pulse(p, 4)
	wantAck(t, p, 0x36)
	// Non-specific EOI clears the highest in-service level (6).
	out(p, MasterCommand, 0x20)
	wantAck(t, p, 0x33)
	out(p, MasterCommand, 0x20)
	wantAck(t, p, 0x34)
	out(p, MasterCommand, 0x20)
	out(p, MasterCommand, 0xc7) // back to IRQ0 highest

	// Rotate on non-specific EOI: the serviced level becomes lowest.
	pulse(p, 1)
	wantAck(t, p, 0x31)
	out(p, MasterCommand, 0xa0)
	pulse(p, 1)
	pulse(p, 3)
	wantAck(t, p, 0x33)
	// Rotate on specific EOI of IRQ3: IRQ4 highest, IRQ1 after 7 and 0.
	out(p, MasterCommand, 0xe3)
	pulse(p, 0)
	pulse(p, 7)
	wantAck(t, p, 0x37)
	out(p, MasterCommand, 0x20)
	wantAck(t, p, 0x30)
	out(p, MasterCommand, 0x20)
	wantAck(t, p, 0x31)
	out(p, MasterCommand, 0x20)
	wantNone(t, p)
	// ICW1 resets priority.
	linuxInit(p, false)
	out(p, MasterData, 0)
	pulse(p, 7)
	pulse(p, 0)
	wantAck(t, p, 0x30)
}

func TestLevelVsEdge(t *testing.T) {
	p := newLinux(t)
	out(p, ELCRMaster, 0xff)
	out(p, ELCRSlave, 0xff)
	if m, s := in(p, ELCRMaster), in(p, ELCRSlave); m != 0xf8 || s != 0xde {
		t.Fatalf("ELCR = %#x %#x, want 0xf8 0xde", m, s)
	}
	out(p, ELCRMaster, 0x00)
	out(p, ELCRSlave, 0x04) // IRQ10 level triggered

	// Edge: a line that stays high requests once.
	p.SetIRQ(5, true)
	wantAck(t, p, 0x35)
	out(p, MasterCommand, 0x20)
	wantNone(t, p)
	p.SetIRQ(5, true)
	wantNone(t, p)
	p.SetIRQ(5, false)
	p.SetIRQ(5, true)
	wantAck(t, p, 0x35)
	out(p, MasterCommand, 0x20)
	p.SetIRQ(5, false)

	// Level: requests again after EOI while the line is high.
	p.SetIRQ(10, true)
	wantAck(t, p, 0x3a)
	out(p, SlaveCommand, 0x20)
	out(p, MasterCommand, 0x20)
	wantAck(t, p, 0x3a)
	out(p, SlaveCommand, 0x20)
	out(p, MasterCommand, 0x20)
	p.SetIRQ(10, false)
	wantNone(t, p)
	if got := in(p, SlaveCommand); got != 0 {
		t.Fatalf("slave IRR = %#x after level line dropped", got)
	}
	// Dropping the line before INTA withdraws the request.
	p.SetIRQ(10, true)
	p.SetIRQ(10, false)
	if got := in(p, SlaveCommand); got != 0 {
		t.Fatalf("slave IRR = %#x", got)
	}
	// Switching a high line to level mode requests at once.
	out(p, ELCRSlave, 0)
	p.SetIRQ(11, true)
	wantAck(t, p, 0x3b)
	out(p, SlaveCommand, 0x20)
	out(p, MasterCommand, 0x20)
	wantNone(t, p)
	out(p, ELCRSlave, 0x08)
	wantAck(t, p, 0x3b)
}

func TestICW1Resets(t *testing.T) {
	p := newLinux(t)
	out(p, MasterData, 0x40)
	p.SetIRQ(3, true) // stays high through init
	wantAck(t, p, 0x33)
	pulse(p, 4)
	out(p, MasterCommand, 0x0b) // select ISR
	out(p, MasterCommand, 0x68) // special mask mode on
	out(p, MasterCommand, 0x11)
	if got := in(p, MasterCommand); got != 0 {
		t.Fatalf("IRR after ICW1 = %#x (edge latches must reset, IRR selected)", got)
	}
	if got := p.master.isr; got != 0 {
		t.Fatalf("ISR after ICW1 = %#x", got)
	}
	if got := in(p, MasterData); got != 0 {
		t.Fatalf("IMR after ICW1 = %#x", got)
	}
	if p.master.specialMask {
		t.Fatal("special mask mode survived ICW1")
	}
	out(p, MasterData, 0x40)
	out(p, MasterData, 0x04)
	out(p, MasterData, 0x01)
	if got := in(p, MasterData); got != 0 {
		t.Fatalf("IMR = %#x: ICW4 taken as OCW1?", got)
	}
	p.SetIRQ(3, true)
	wantNone(t, p) // still high: no new edge
	p.SetIRQ(3, false)
	p.SetIRQ(3, true)
	wantAck(t, p, 0x43)
	// ICW1 without ICW4: the third data write is OCW1, and ICW4 bits are 0.
	out(p, MasterCommand, 0x10)
	out(p, MasterData, 0x50)
	out(p, MasterData, 0x04)
	out(p, MasterData, 0x7f)
	if got := in(p, MasterData); got != 0x7f {
		t.Fatalf("IMR = %#x", got)
	}
}

func TestSingleMode(t *testing.T) {
	p := New()
	out(p, MasterCommand, 0x13) // single, ICW4
	out(p, MasterData, 0x08)
	out(p, MasterData, 0x03) // ICW4 (no ICW3 in single mode): auto-EOI
	out(p, MasterData, 0x00)
	p.SetIRQ(2, true)
	wantAck(t, p, 0x0a)
	if got := readISR(p, MasterCommand); got != 0 {
		t.Fatalf("ISR %#x with auto-EOI", got)
	}
}

func TestSpecialMaskMode(t *testing.T) {
	p := newLinux(t)
	pulse(p, 3)
	wantAck(t, p, 0x33)
	pulse(p, 5)
	wantNone(t, p)
	out(p, MasterData, 0x08)    // handler masks its own level
	out(p, MasterCommand, 0x68) // ... and enters special mask mode
	wantAck(t, p, 0x35)         // lower level now gets through
	out(p, MasterCommand, 0x65)
	out(p, MasterCommand, 0x48) // leave special mask mode
	pulse(p, 6)
	wantNone(t, p) // IRQ3 still in service
	out(p, MasterCommand, 0x63)
	wantAck(t, p, 0x36)
}

func TestSpecialFullyNested(t *testing.T) {
	p := New()
	out(p, MasterCommand, 0x11)
	out(p, MasterData, 0x30)
	out(p, MasterData, 0x04)
	out(p, MasterData, 0x11) // 8086, SFNM
	out(p, SlaveCommand, 0x11)
	out(p, SlaveData, 0x38)
	out(p, SlaveData, 0x02)
	out(p, SlaveData, 0x01)
	pulse(p, 12)
	wantAck(t, p, 0x3c)
	pulse(p, 9) // higher slave level while the slave is in service
	wantAck(t, p, 0x39)
}

func TestWideAndUndecoded(t *testing.T) {
	p := newLinux(t)
	out(p, MasterData, 0x5a)
	for _, n := range []int{1, 2, 4} {
		b := make([]byte, n)
		p.ReadPort(MasterData, b)
		if b[0] != 0x5a {
			t.Fatalf("%d-byte read = %#x", n, b[0])
		}
		for _, x := range b[1:] {
			if x != 0xff {
				t.Fatalf("%d-byte read upper bytes %x", n, b)
			}
		}
	}
	p.WritePort(MasterData, []byte{0x12, 0x34, 0x56, 0x78})
	if got := in(p, MasterData); got != 0x12 {
		t.Fatalf("IMR after wide write = %#x", got)
	}
	for _, port := range []uint16{0, 0x22, 0x40, 0xa2, 0x4d2, 0xffff} {
		b := []byte{0, 0}
		p.ReadPort(port, b)
		if b[0] != 0xff || b[1] != 0xff {
			t.Fatalf("read of undecoded port %#x = %x", port, b)
		}
	}
	p.ReadPort(MasterData, nil)
	p.WritePort(MasterData, nil)
}

// randomOps drives p with a reproducible stream of arbitrary operations and
// returns everything it observed.
func randomOps(p *PIC, seed int64, n int, garbage bool) []byte {
	r := rand.New(rand.NewSource(seed))
	ports := []uint16{0x20, 0x21, 0xa0, 0xa1, 0x4d0, 0x4d1}
	var log []byte
	for i := 0; i < n; i++ {
		port := ports[r.Intn(len(ports))]
		if garbage && r.Intn(4) == 0 {
			port = uint16(r.Intn(0x10000))
		}
		size := []int{1, 2, 4}[r.Intn(3)]
		if garbage && r.Intn(8) == 0 {
			size = r.Intn(9)
		}
		b := make([]byte, size)
		switch r.Intn(6) {
		case 0:
			r.Read(b)
			p.WritePort(port, b)
		case 1:
			p.ReadPort(port, b)
			log = append(log, b...)
		case 2, 3:
			irq := r.Intn(16)
			if garbage {
				irq = r.Intn(40) - 12
			}
			p.SetIRQ(irq, r.Intn(2) == 0)
		case 4:
			if p.Pending() {
				log = append(log, 1)
			}
		case 5:
			log = append(log, p.Acknowledge())
		}
	}
	return log
}

func TestGarbageNeverPanics(t *testing.T) {
	for seed := int64(0); seed < 200; seed++ {
		p := New()
		randomOps(p, seed, 2000, true)
		// Whatever happened, state must be restorable.
		if err := New().Restore(p.Save()); err != nil {
			t.Fatalf("seed %d: saved state does not restore: %v", seed, err)
		}
	}
}

func TestSaveRestoreRoundTrip(t *testing.T) {
	for seed := int64(0); seed < 100; seed++ {
		a := New()
		if seed%2 == 0 {
			linuxInit(a, seed%4 == 0)
		}
		randomOps(a, seed, 500, false)
		s := a.Save()

		// Through gob and JSON, as a snapshot file would.
		sj := statetest.ThroughGobAndJSON(t, s)
		if !reflect.DeepEqual(s, sj) {
			t.Fatalf("seed %d: state changed through encoding", seed)
		}
		b := New()
		if err := b.Restore(sj); err != nil {
			t.Fatalf("seed %d: %v", seed, err)
		}
		if !reflect.DeepEqual(b.Save(), s) {
			t.Fatalf("seed %d: restored state differs", seed)
		}
		la := randomOps(a, seed+1000, 500, false)
		lb := randomOps(b, seed+1000, 500, false)
		if !bytes.Equal(la, lb) {
			t.Fatalf("seed %d: behaviour differs after restore", seed)
		}
	}
}

func TestRestoreRejects(t *testing.T) {
	good := newLinux(t)
	pulse(good, 12)
	base := good.Save()
	bad := []func(*State){
		func(s *State) { s.Master.PriorityAdd = 8 },
		func(s *State) { s.Slave.VectorBase = 0x39 },
		func(s *State) { s.Master.InitState = 4 },
		func(s *State) { s.Master.InitState = 2; s.Master.SingleMode = true },
		func(s *State) { s.Slave.InitState = 3; s.Slave.NeedICW4 = false },
		func(s *State) { s.Master.ELCR = 0x01 },
		func(s *State) { s.Slave.ELCR = 0x01 },
		func(s *State) { s.Slave.ELCR = 0x02; s.Slave.Lines = 0x02; s.Slave.IRR = 0 },
		func(s *State) { s.Master.Lines &^= 0x04 }, // slave is requesting
	}
	for i, f := range bad {
		s := base
		f(&s)
		p := newLinux(t)
		before := p.Save()
		if err := p.Restore(s); err == nil {
			t.Errorf("case %d: bad state accepted", i)
		} else {
			t.Logf("case %d: %v", i, err)
		}
		if !reflect.DeepEqual(p.Save(), before) {
			t.Errorf("case %d: failed restore changed the device", i)
		}
	}
	p := New()
	if err := p.Restore(base); err != nil {
		t.Fatal(err)
	}
	wantAck(t, p, 0x3c)
}

func TestSetIRQOutOfRange(t *testing.T) {
	p := newLinux(t)
	before := p.Save()
	for _, irq := range []int{-1, 16, 100, -1 << 31} {
		p.SetIRQ(irq, true)
	}
	if !reflect.DeepEqual(p.Save(), before) {
		t.Fatal("out-of-range SetIRQ changed state")
	}
}
