package machine

import (
	"encoding/binary"
	"fmt"
	"math/bits"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// PageSize is the granule of dirty tracking.
const PageSize = 4096

// Memory is guest RAM: one anonymous mapping that appears at guest physical
// address 0. Every access by the VMM goes through its bounds-checked methods,
// and every write the VMM makes is recorded in a dirty bitmap of its own,
// because KVM's dirty log only sees writes made by the guest.
type Memory struct {
	mem   []byte
	dirty []atomic.Uint64 // one bit per page written by the VMM
}

// NewMemory maps size bytes of zeroed guest RAM (a multiple of PageSize).
func NewMemory(size uint64) (*Memory, error) {
	if size == 0 || size%PageSize != 0 {
		return nil, fmt.Errorf("memory size %d is not a positive multiple of %d", size, PageSize)
	}
	if size > MaxMemory {
		return nil, fmt.Errorf("memory size %d MiB exceeds the maximum of %d MiB", size>>20, MaxMemory>>20)
	}
	mem, err := unix.Mmap(-1, 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
	if err != nil {
		return nil, fmt.Errorf("map %d MiB of guest memory: %w", size>>20, err)
	}
	// Transparent huge pages where the host allows them (as QEMU does):
	// fewer page faults on first touch and fewer TLB misses for the guest.
	// Advice only; a host without THP just ignores it.
	_ = unix.Madvise(mem, unix.MADV_HUGEPAGE)
	pages := size / PageSize
	return &Memory{mem: mem, dirty: make([]atomic.Uint64, (pages+63)/64)}, nil
}

// Close unmaps the memory. The VM using it must be gone.
func (m *Memory) Close() error {
	if m.mem == nil {
		return nil
	}
	err := unix.Munmap(m.mem)
	m.mem = nil
	return err
}

// Size is the size of guest RAM in bytes.
func (m *Memory) Size() uint64 { return uint64(len(m.mem)) }

// host returns the backing mapping for KVM_SET_USER_MEMORY_REGION.
func (m *Memory) host() []byte { return m.mem }

// OutOfRangeError is a guest-physical access outside RAM.
type OutOfRangeError struct {
	Addr, Len, Size uint64
}

func (e *OutOfRangeError) Error() string {
	return fmt.Sprintf("guest memory access [%#x, +%d) outside RAM of %#x bytes", e.Addr, e.Len, e.Size)
}

// check validates [gpa, gpa+n) without overflow.
func (m *Memory) check(gpa, n uint64) error {
	size := uint64(len(m.mem))
	if gpa > size || n > size-gpa {
		return &OutOfRangeError{Addr: gpa, Len: n, Size: size}
	}
	return nil
}

// Slice returns a view of [gpa, gpa+n) for reading. Do not write through it:
// use WriteAt or MutableSlice so the write is tracked.
func (m *Memory) Slice(gpa, n uint64) ([]byte, error) {
	if err := m.check(gpa, n); err != nil {
		return nil, err
	}
	return m.mem[gpa : gpa+n : gpa+n], nil
}

// MutableSlice returns a writable view of [gpa, gpa+n) and marks those pages
// dirty.
func (m *Memory) MutableSlice(gpa, n uint64) ([]byte, error) {
	b, err := m.Slice(gpa, n)
	if err != nil {
		return nil, err
	}
	m.MarkDirty(gpa, n)
	return b, nil
}

// ReadAt copies guest memory at gpa into p.
func (m *Memory) ReadAt(p []byte, gpa uint64) error {
	b, err := m.Slice(gpa, uint64(len(p)))
	if err != nil {
		return err
	}
	copy(p, b)
	return nil
}

// WriteAt copies p into guest memory at gpa and marks the pages dirty.
func (m *Memory) WriteAt(p []byte, gpa uint64) error {
	b, err := m.MutableSlice(gpa, uint64(len(p)))
	if err != nil {
		return err
	}
	copy(b, p)
	return nil
}

// Read64 reads a little-endian uint64.
func (m *Memory) Read64(gpa uint64) (uint64, error) {
	b, err := m.Slice(gpa, 8)
	if err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint64(b), nil
}

// Write64 writes a little-endian uint64.
func (m *Memory) Write64(gpa, v uint64) error {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], v)
	return m.WriteAt(b[:], gpa)
}

// MarkDirty records that the VMM wrote [gpa, gpa+n). Out-of-range parts are
// ignored (the write itself was refused).
func (m *Memory) MarkDirty(gpa, n uint64) {
	if n == 0 || m.check(gpa, n) != nil {
		return
	}
	for p := gpa / PageSize; p <= (gpa+n-1)/PageSize; p++ {
		m.dirty[p/64].Or(1 << (p % 64))
	}
}

// TakeVMMDirty ORs the VMM's own dirty bitmap into into (one bit per page)
// and clears it. into must have at least (pages+63)/64 words.
func (m *Memory) TakeVMMDirty(into []uint64) {
	for i := range m.dirty {
		into[i] |= m.dirty[i].Swap(0)
	}
}

// BitmapWords is the length of a dirty bitmap covering this memory.
func (m *Memory) BitmapWords() int { return len(m.dirty) }

// CountBits counts the pages set in a dirty bitmap.
func CountBits(bitmap []uint64) int {
	n := 0
	for _, w := range bitmap {
		n += bits.OnesCount64(w)
	}
	return n
}
