// Package virtiotest helps test virtio devices without a VM: an in-memory
// GuestMemory that records dirty pages, and a Driver that programs a
// virtio-mmio transport through its registers the way Linux's
// virtio_mmio driver does, builds descriptor chains and reads the used ring.
package virtiotest

import (
	"encoding/binary"
	"fmt"
	"testing"

	"github.com/gokvm-ft/gokvm-ft/virtio"
)

// PageSize is the granule of Memory's dirty tracking.
const PageSize = 4096

// Memory is guest RAM in a byte slice, with bounds checks like the
// machine's and a record of the pages written through the mutating
// methods.
type Memory struct {
	B     []byte
	Dirty map[uint64]bool // page numbers written through WriteAt or MutableSlice
}

// NewMemory returns size bytes of zeroed memory.
func NewMemory(size uint64) *Memory {
	return &Memory{B: make([]byte, size), Dirty: map[uint64]bool{}}
}

// Size is the memory size in bytes.
func (m *Memory) Size() uint64 { return uint64(len(m.B)) }

func (m *Memory) check(gpa, n uint64) error {
	if gpa > m.Size() || n > m.Size()-gpa {
		return fmt.Errorf("access [%#x, +%d) outside memory of %#x bytes", gpa, n, m.Size())
	}
	return nil
}

// Slice is a read-only view of [gpa, gpa+n).
func (m *Memory) Slice(gpa, n uint64) ([]byte, error) {
	if err := m.check(gpa, n); err != nil {
		return nil, err
	}
	return m.B[gpa : gpa+n : gpa+n], nil
}

// MutableSlice is a writable view of [gpa, gpa+n), marked dirty.
func (m *Memory) MutableSlice(gpa, n uint64) ([]byte, error) {
	b, err := m.Slice(gpa, n)
	if err != nil {
		return nil, err
	}
	for p := gpa / PageSize; n > 0 && p <= (gpa+n-1)/PageSize; p++ {
		m.Dirty[p] = true
	}
	return b, nil
}

// ReadAt copies memory at gpa into p.
func (m *Memory) ReadAt(p []byte, gpa uint64) error {
	b, err := m.Slice(gpa, uint64(len(p)))
	if err == nil {
		copy(p, b)
	}
	return err
}

// WriteAt copies p into memory at gpa, marking it dirty.
func (m *Memory) WriteAt(p []byte, gpa uint64) error {
	b, err := m.MutableSlice(gpa, uint64(len(p)))
	if err == nil {
		copy(b, p)
	}
	return err
}

// Line is an InterruptLine that records its level and how often it rose.
type Line struct {
	Level bool
	Rises int
}

// Set is the InterruptLine.
func (l *Line) Set(level bool) {
	if level && !l.Level {
		l.Rises++
	}
	l.Level = level
}

// Registers is the register window a Driver programs: *virtio.MMIO.
type Registers interface {
	ReadMMIO(offset uint64, data []byte)
	WriteMMIO(offset uint64, data []byte)
}

// Driver programs a virtio-mmio transport as Linux's driver does. Its
// helpers fail the test on a protocol error.
type Driver struct {
	T    testing.TB
	Regs Registers
	Mem  *Memory
}

// Read32 reads a 32-bit register.
func (d *Driver) Read32(off uint64) uint32 {
	var b [4]byte
	d.Regs.ReadMMIO(off, b[:])
	return binary.LittleEndian.Uint32(b[:])
}

// Write32 writes a 32-bit register.
func (d *Driver) Write32(off uint64, v uint32) {
	var b [4]byte
	binary.LittleEndian.PutUint32(b[:], v)
	d.Regs.WriteMMIO(off, b[:])
}

// DeviceFeatures reads the 64 offered feature bits.
func (d *Driver) DeviceFeatures() uint64 {
	d.Write32(virtio.RegDeviceFeaturesSel, 1)
	f := uint64(d.Read32(virtio.RegDeviceFeatures)) << 32
	d.Write32(virtio.RegDeviceFeaturesSel, 0)
	return f | uint64(d.Read32(virtio.RegDeviceFeatures))
}

// Negotiate resets the device, acknowledges it, accepts features and sets
// FEATURES_OK; it reports whether the device kept FEATURES_OK.
func (d *Driver) Negotiate(features uint64) bool {
	if d.Read32(virtio.RegMagicValue) != virtio.MagicValue || d.Read32(virtio.RegVersion) != 2 {
		d.T.Fatal("not a virtio-mmio version 2 device")
	}
	d.Write32(virtio.RegStatus, 0)
	d.Write32(virtio.RegStatus, virtio.StatusAcknowledge)
	d.Write32(virtio.RegStatus, virtio.StatusAcknowledge|virtio.StatusDriver)
	d.Write32(virtio.RegDriverFeaturesSel, 1)
	d.Write32(virtio.RegDriverFeatures, uint32(features>>32))
	d.Write32(virtio.RegDriverFeaturesSel, 0)
	d.Write32(virtio.RegDriverFeatures, uint32(features))
	d.Write32(virtio.RegStatus, d.Read32(virtio.RegStatus)|virtio.StatusFeaturesOK)
	return d.Read32(virtio.RegStatus)&virtio.StatusFeaturesOK != 0
}

// DriverOK sets DRIVER_OK.
func (d *Driver) DriverOK() {
	d.Write32(virtio.RegStatus, d.Read32(virtio.RegStatus)|virtio.StatusDriverOK)
}

// Init negotiates every offered feature, sets up queues of the given sizes
// at base (one 64 KiB area each) and sets DRIVER_OK.
func (d *Driver) Init(base uint64, sizes ...uint16) []*DriverQueue {
	if !d.Negotiate(d.DeviceFeatures()) {
		d.T.Fatal("device refused its own features")
	}
	var qs []*DriverQueue
	for i, n := range sizes {
		qs = append(qs, d.SetupQueue(i, n, base+uint64(i)<<16))
	}
	d.DriverOK()
	if s := d.Read32(virtio.RegStatus); s&virtio.StatusDeviceNeedsReset != 0 {
		d.T.Fatalf("device broken after init: status %#x", s)
	}
	return qs
}

// SetupQueue lays out queue idx of size n at base (descriptor table,
// then available ring, then the used ring at the next 4 KiB boundary) and
// enables it.
func (d *Driver) SetupQueue(idx int, n uint16, base uint64) *DriverQueue {
	q := &DriverQueue{D: d, Index: idx, Size: n, Desc: base, Avail: base + 16*uint64(n)}
	q.Used = (q.Avail + 6 + 2*uint64(n) + 4095) &^ 4095
	d.Write32(virtio.RegQueueSel, uint32(idx))
	if d.Read32(virtio.RegQueueReady) != 0 {
		d.T.Fatalf("queue %d already set up", idx)
	}
	if maxSize := d.Read32(virtio.RegQueueNumMax); maxSize < uint32(n) {
		d.T.Fatalf("queue %d: maximum size %d < %d", idx, maxSize, n)
	}
	d.Write32(virtio.RegQueueNum, uint32(n))
	d.Write32(virtio.RegQueueDescLow, uint32(q.Desc))
	d.Write32(virtio.RegQueueDescHigh, uint32(q.Desc>>32))
	d.Write32(virtio.RegQueueDriverLow, uint32(q.Avail))
	d.Write32(virtio.RegQueueDriverHigh, uint32(q.Avail>>32))
	d.Write32(virtio.RegQueueDeviceLow, uint32(q.Used))
	d.Write32(virtio.RegQueueDeviceHigh, uint32(q.Used>>32))
	d.Write32(virtio.RegQueueReady, 1)
	return q
}

// Buffer is one descriptor's buffer.
type Buffer struct {
	GPA      uint64
	Len      uint32
	Writable bool
}

// DriverQueue is the driver's side of one split virtqueue.
type DriverQueue struct {
	D                 *Driver
	Index             int
	Size              uint16
	Desc, Avail, Used uint64
	nextDesc          uint16
	availIdx          uint16
	usedSeen          uint16
}

// Add writes bufs as one chain into the next free descriptors, makes it
// available and returns its head. It does not notify.
func (q *DriverQueue) Add(bufs ...Buffer) uint16 {
	head := q.nextDesc
	for i, b := range bufs {
		idx := q.nextDesc
		q.nextDesc = (q.nextDesc + 1) % q.Size
		var flags uint16
		if b.Writable {
			flags |= 2
		}
		if i < len(bufs)-1 {
			flags |= 1
		}
		q.WriteDesc(idx, b.GPA, b.Len, flags, q.nextDesc)
	}
	q.Publish(head)
	return head
}

// WriteDesc writes descriptor idx verbatim, for tests of malformed chains.
func (q *DriverQueue) WriteDesc(idx uint16, gpa uint64, n uint32, flags, next uint16) {
	var d [16]byte
	binary.LittleEndian.PutUint64(d[0:], gpa)
	binary.LittleEndian.PutUint32(d[8:], n)
	binary.LittleEndian.PutUint16(d[12:], flags)
	binary.LittleEndian.PutUint16(d[14:], next)
	q.write(d[:], q.Desc+16*uint64(idx))
}

// Publish puts head in the available ring and bumps avail->idx.
func (q *DriverQueue) Publish(head uint16) {
	var b [2]byte
	binary.LittleEndian.PutUint16(b[:], head)
	q.write(b[:], q.Avail+4+2*uint64(q.availIdx%q.Size))
	q.availIdx++
	q.SetAvailIdx(q.availIdx)
}

// SetAvailIdx writes avail->idx verbatim.
func (q *DriverQueue) SetAvailIdx(idx uint16) {
	var b [2]byte
	binary.LittleEndian.PutUint16(b[:], idx)
	q.write(b[:], q.Avail+2)
}

// SetNoInterrupt sets or clears VIRTQ_AVAIL_F_NO_INTERRUPT.
func (q *DriverQueue) SetNoInterrupt(on bool) {
	var b [2]byte
	if on {
		b[0] = 1
	}
	q.write(b[:], q.Avail)
}

// Notify writes the queue's index to QueueNotify.
func (q *DriverQueue) Notify() { q.D.Write32(virtio.RegQueueNotify, uint32(q.Index)) }

// UsedIdx reads used->idx.
func (q *DriverQueue) UsedIdx() uint16 {
	return binary.LittleEndian.Uint16(q.D.Mem.B[q.Used+2:])
}

// NextUsed returns the next used element not seen yet, if any.
func (q *DriverQueue) NextUsed() (head uint16, written uint32, ok bool) {
	if q.UsedIdx() == q.usedSeen {
		return 0, 0, false
	}
	e := q.Used + 4 + 8*uint64(q.usedSeen%q.Size)
	q.usedSeen++
	return uint16(binary.LittleEndian.Uint32(q.D.Mem.B[e:])), binary.LittleEndian.Uint32(q.D.Mem.B[e+4:]), true
}

func (q *DriverQueue) write(p []byte, gpa uint64) {
	// The driver is the guest: its writes bypass dirty tracking, as KVM's
	// dirty log (not the VMM's) records them.
	if err := q.D.Mem.check(gpa, uint64(len(p))); err != nil {
		q.D.T.Fatal(err)
	}
	copy(q.D.Mem.B[gpa:], p)
}
