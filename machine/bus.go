package machine

import (
	"fmt"
	"sort"
)

// PortDevice is a device on the x86 I/O port bus. The bus passes the
// absolute port number and a data slice of 1, 2 or 4 bytes (little endian).
// ReadPort must fill all of data; a device that does not implement a given
// width or register returns all-ones, as an open ISA bus does.
type PortDevice interface {
	ReadPort(port uint16, data []byte)
	WritePort(port uint16, data []byte)
}

// MMIODevice is a device on the memory-mapped I/O bus. offset is relative to
// the base of the range the device was registered at; data is 1 to 8 bytes.
type MMIODevice interface {
	ReadMMIO(offset uint64, data []byte)
	WriteMMIO(offset uint64, data []byte)
}

// IRQLine is how a device drives an interrupt request input of the PIC.
// Lines are edge triggered at the PIC (as ISA is): a 0->1 transition
// requests an interrupt.
type IRQLine interface {
	SetIRQ(irq int, level bool)
}

type busRange[D any] struct {
	base, size uint64
	dev        D
}

// bus maps address ranges to devices. Ranges never overlap; lookups are a
// binary search, which matters because every PIO/MMIO exit does one.
type bus[D any] struct {
	ranges []busRange[D]
}

func (b *bus[D]) register(base, size uint64, dev D) error {
	if size == 0 || base+size < base {
		return fmt.Errorf("bad range [%#x, +%#x)", base, size)
	}
	for _, r := range b.ranges {
		if base < r.base+r.size && r.base < base+size {
			return fmt.Errorf("range [%#x, %#x) overlaps [%#x, %#x)", base, base+size, r.base, r.base+r.size)
		}
	}
	b.ranges = append(b.ranges, busRange[D]{base, size, dev})
	sort.Slice(b.ranges, func(i, j int) bool { return b.ranges[i].base < b.ranges[j].base })
	return nil
}

// find returns the device covering addr and addr's offset in its range.
func (b *bus[D]) find(addr uint64) (dev D, base uint64, ok bool) {
	i := sort.Search(len(b.ranges), func(i int) bool { return b.ranges[i].base+b.ranges[i].size > addr })
	if i < len(b.ranges) && b.ranges[i].base <= addr {
		return b.ranges[i].dev, b.ranges[i].base, true
	}
	return dev, 0, false
}

// fillOnes sets data to all-ones: what a read of an unclaimed address returns.
func fillOnes(data []byte) {
	for i := range data {
		data[i] = 0xff
	}
}
