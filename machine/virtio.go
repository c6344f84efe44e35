package machine

import (
	"fmt"
	"strings"

	"github.com/gokvm-ft/gokvm-ft/virtio"
)

// Virtio devices sit on the MMIO bus from MMIOBase, one virtioStride apart,
// each with its own ISA interrupt line. Linux finds them through
// virtio_mmio.device= on the command line (VirtioCmdline): there is no
// ACPI or device tree on this machine.
const virtioStride = 0x1000

// virtioIRQs are the PIC lines free for virtio devices: 0 (PIT), 1
// (keyboard), 2 (cascade), 3 and 4 (COM2, COM1) and 8 (RTC) are taken.
var virtioIRQs = []int{5, 6, 7, 9, 10, 11, 12, 14, 15}

// VirtioSlot is one attached virtio device.
type VirtioSlot struct {
	Name      string
	Base      uint64
	IRQ       int
	Transport *virtio.MMIO
}

// AddVirtio attaches dev on the next free MMIO slot and interrupt line and
// returns its slot. Attach devices before loading the kernel command line
// (KernelCmdline names them) and before Run; the order of attachment is
// the order Linux probes them in (the first disk is vda).
func (m *Machine) AddVirtio(name string, dev virtio.Device) (*VirtioSlot, error) {
	n := len(m.virtio)
	if n >= len(virtioIRQs) {
		return nil, fmt.Errorf("virtio %s: no free interrupt line (at most %d virtio devices)", name, len(virtioIRQs))
	}
	irq := virtioIRQs[n]
	t := virtio.NewMMIO(dev, m.mem, func(level bool) { m.PIC.SetIRQ(irq, level) })
	t.SetLogger(m.log.With("virtio", name))
	slot := &VirtioSlot{Name: name, Base: MMIOBase + uint64(n)*virtioStride, IRQ: irq, Transport: t}
	if err := m.RegisterMMIO(slot.Base, virtio.MMIOSize, t); err != nil {
		return nil, fmt.Errorf("virtio %s: %w", name, err)
	}
	m.virtio = append(m.virtio, slot)
	return slot, nil
}

// Virtio lists the attached virtio devices in attachment order.
func (m *Machine) Virtio() []*VirtioSlot { return m.virtio }

// VirtioCmdline is the kernel command-line words that declare the virtio
// devices to Linux (CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES).
func (m *Machine) VirtioCmdline() string {
	words := make([]string, 0, len(m.virtio))
	for _, s := range m.virtio {
		words = append(words, fmt.Sprintf("virtio_mmio.device=%d@%#x:%d", virtio.MMIOSize, s.Base, s.IRQ))
	}
	return strings.Join(words, " ")
}
