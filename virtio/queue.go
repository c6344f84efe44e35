package virtio

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// QueueMax is the largest virtqueue size the split ring format allows.
const QueueMax = 32768

// MaxChainBytes caps the total length of one descriptor chain. Legitimate
// requests are far smaller (virtio-blk bounds its requests below this with
// SEG_MAX and SIZE_MAX); the cap keeps one hostile chain from making the
// device touch a large part of guest memory in a single exit.
const MaxChainBytes = 16 << 20

// Descriptor flags (spec 2.7.5).
const (
	descFlagNext     = 1
	descFlagWrite    = 2
	descFlagIndirect = 4
)

// availFlagNoInterrupt is VIRTQ_AVAIL_F_NO_INTERRUPT: the driver does not
// want used-buffer interrupts for now.
const availFlagNoInterrupt = 1

const descSize = 16

// Errors for virtqueues and descriptor chains the driver got wrong. Each
// refusal has its own, so a test (or a log) says exactly what was wrong.
var (
	ErrQueueSize          = errors.New("virtio: queue size is not a power of two within the maximum")
	ErrRingMisaligned     = errors.New("virtio: ring address misaligned")
	ErrRingOutOfMemory    = errors.New("virtio: ring lies outside guest memory")
	ErrAvailIndex         = errors.New("virtio: available index ran ahead by more than the queue size")
	ErrHeadIndex          = errors.New("virtio: chain head index out of range")
	ErrNextIndex          = errors.New("virtio: descriptor next index out of range")
	ErrChainTooLong       = errors.New("virtio: descriptor chain loops or is longer than the queue")
	ErrReadableAfterWrite = errors.New("virtio: readable descriptor after a writable one")
	ErrZeroLength         = errors.New("virtio: zero-length descriptor")
	ErrDescOutOfMemory    = errors.New("virtio: descriptor buffer lies outside guest memory")
	ErrChainTooBig        = errors.New("virtio: descriptor chain longer than MaxChainBytes")
	ErrIndirect           = errors.New("virtio: indirect descriptor, but VIRTIO_F_INDIRECT_DESC is not offered")
	ErrUnexpectedWritable = errors.New("virtio: chain has writable buffers where only readable ones are allowed")
	ErrUnexpectedReadable = errors.New("virtio: chain has readable buffers where only writable ones are allowed")
	ErrShortChain         = errors.New("virtio: access past the end of the chain's buffers")
	ErrQueueNotReady      = errors.New("virtio: queue is not ready")
)

// ChainError is a refused chain: which head and descriptor, and why (one of
// the Err values above, reachable with errors.Is).
type ChainError struct {
	Head, Desc uint16
	Err        error
}

func (e *ChainError) Error() string {
	return fmt.Sprintf("chain at head %d, descriptor %d: %v", e.Head, e.Desc, e.Err)
}

func (e *ChainError) Unwrap() error { return e.Err }

// Queue is one split virtqueue (spec 2.7) as the device sees it: the three
// rings in guest memory and the device's two positions in them.
type Queue struct {
	mem     GuestMemory
	maxSize uint16

	size   uint16
	ready  bool
	desc   uint64 // descriptor table
	driver uint64 // available ring
	device uint64 // used ring

	nextAvail uint16 // next available ring entry to consume
	nextUsed  uint16 // used->idx as last published

	halted bool // the transport is broken: no more processing
}

// NewQueue returns a queue of at most maxSize entries (a power of two, at
// most QueueMax), not ready, with its size set to the maximum.
func NewQueue(mem GuestMemory, maxSize uint16) *Queue {
	return &Queue{mem: mem, maxSize: maxSize, size: maxSize}
}

// MaxSize is the largest size the driver may choose.
func (q *Queue) MaxSize() uint16 { return q.maxSize }

// Size is the number of entries the driver chose.
func (q *Queue) Size() uint16 { return q.size }

// Ready says whether the driver enabled the queue (and the device is not
// broken): only then do Pop and Push work.
func (q *Queue) Ready() bool { return q.ready && !q.halted }

// reset returns the queue to its state after a device reset.
func (q *Queue) reset() {
	*q = Queue{mem: q.mem, maxSize: q.maxSize, size: q.maxSize}
}

// validSize reports whether n is a usable size for a queue of at most
// maxSize entries.
func validSize(n, maxSize uint16) bool {
	return n != 0 && n <= maxSize && n&(n-1) == 0
}

// checkRings validates the ring addresses for the current size (spec
// 2.7: alignment 16, 2 and 4; every ring inside guest memory).
func (q *Queue) checkRings() error {
	return checkRings(q.mem, q.maxSize, q.size, q.desc, q.driver, q.device)
}

func checkRings(mem GuestMemory, maxSize, size uint16, desc, driver, device uint64) error {
	if !validSize(size, maxSize) || maxSize > QueueMax {
		return fmt.Errorf("%w: size %d, maximum %d", ErrQueueSize, size, maxSize)
	}
	n := uint64(size)
	rings := []struct {
		name      string
		addr, len uint64
		align     uint64
	}{
		{"descriptor table", desc, descSize * n, 16},
		{"available ring", driver, 6 + 2*n, 2}, // flags, idx, ring, used_event
		{"used ring", device, 6 + 8*n, 4},      // flags, idx, ring, avail_event
	}
	for _, r := range rings {
		if r.addr%r.align != 0 {
			return fmt.Errorf("%w: %s at %#x (needs %d-byte alignment)", ErrRingMisaligned, r.name, r.addr, r.align)
		}
		if !inside(mem, r.addr, r.len) {
			return fmt.Errorf("%w: %s [%#x, +%d)", ErrRingOutOfMemory, r.name, r.addr, r.len)
		}
	}
	return nil
}

// inside reports whether [addr, addr+n) lies in guest memory, without
// overflow.
func inside(mem GuestMemory, addr, n uint64) bool {
	size := mem.Size()
	return addr <= size && n <= size-addr
}

// enable marks the queue ready after checking its rings; the device starts
// at the beginning of both rings, as a freshly initialised driver does.
func (q *Queue) enable() error {
	if err := q.checkRings(); err != nil {
		return err
	}
	q.ready, q.nextAvail, q.nextUsed = true, 0, 0
	return nil
}

func (q *Queue) read16(gpa uint64) (uint16, error) {
	var b [2]byte
	if err := q.mem.ReadAt(b[:], gpa); err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint16(b[:]), nil
}

// Segment is one guest buffer of a chain.
type Segment struct {
	GPA uint64
	Len uint32
}

// Chain is a validated descriptor chain: its readable buffers (driver to
// device) followed by its writable ones (device to driver). Every segment
// lies inside guest memory, none is empty, and the chain is at most the
// queue size long and MaxChainBytes big.
type Chain struct {
	Head        uint16
	Readable    []Segment
	Writable    []Segment
	ReadableLen uint64 // total bytes of Readable
	WritableLen uint64 // total bytes of Writable
	mem         GuestMemory
}

// Len is the number of descriptors in the chain.
func (c *Chain) Len() int { return len(c.Readable) + len(c.Writable) }

// RequireReadOnly refuses a chain with writable buffers, for queues whose
// chains only carry data to the device (a network transmit queue).
func (c *Chain) RequireReadOnly() error {
	if len(c.Writable) != 0 {
		return &ChainError{Head: c.Head, Err: ErrUnexpectedWritable}
	}
	return nil
}

// RequireWriteOnly refuses a chain with readable buffers, for queues whose
// chains only carry data to the driver (a network receive queue).
func (c *Chain) RequireWriteOnly() error {
	if len(c.Readable) != 0 {
		return &ChainError{Head: c.Head, Err: ErrUnexpectedReadable}
	}
	return nil
}

// Pop takes the next available chain. ok is false when the driver has made
// nothing new available or the queue is not ready. An error means the driver
// broke the ring: the chain is not consumed and the caller should Fail the
// transport.
func (q *Queue) Pop() (c Chain, ok bool, err error) {
	if !q.Ready() {
		return Chain{}, false, nil
	}
	availIdx, err := q.read16(q.driver + 2)
	if err != nil {
		return Chain{}, false, fmt.Errorf("%w: %v", ErrRingOutOfMemory, err)
	}
	pending := availIdx - q.nextAvail
	if pending == 0 {
		return Chain{}, false, nil
	}
	if pending > q.size {
		return Chain{}, false, fmt.Errorf("%w: idx %d, device at %d, size %d", ErrAvailIndex, availIdx, q.nextAvail, q.size)
	}
	head, err := q.read16(q.driver + 4 + 2*uint64(q.nextAvail%q.size))
	if err != nil {
		return Chain{}, false, fmt.Errorf("%w: %v", ErrRingOutOfMemory, err)
	}
	c, err = q.walk(head)
	if err != nil {
		return Chain{}, false, err
	}
	q.nextAvail++
	return c, true, nil
}

// walk follows and validates the chain starting at head.
func (q *Queue) walk(head uint16) (Chain, error) {
	if head >= q.size {
		return Chain{}, &ChainError{Head: head, Desc: head, Err: ErrHeadIndex}
	}
	c := Chain{Head: head, mem: q.mem}
	var total uint64
	var d [descSize]byte
	for i, count := head, 0; ; count++ {
		fail := func(err error) (Chain, error) { return Chain{}, &ChainError{Head: head, Desc: i, Err: err} }
		if count >= int(q.size) {
			return fail(ErrChainTooLong)
		}
		if err := q.mem.ReadAt(d[:], q.desc+descSize*uint64(i)); err != nil {
			return fail(fmt.Errorf("%w: %v", ErrRingOutOfMemory, err))
		}
		addr := binary.LittleEndian.Uint64(d[0:])
		n := binary.LittleEndian.Uint32(d[8:])
		flags := binary.LittleEndian.Uint16(d[12:])
		next := binary.LittleEndian.Uint16(d[14:])
		switch {
		case flags&descFlagIndirect != 0:
			return fail(ErrIndirect)
		case n == 0:
			return fail(ErrZeroLength)
		case !inside(q.mem, addr, uint64(n)):
			return fail(fmt.Errorf("%w: [%#x, +%d)", ErrDescOutOfMemory, addr, n))
		}
		total += uint64(n)
		if total > MaxChainBytes {
			return fail(ErrChainTooBig)
		}
		seg := Segment{GPA: addr, Len: n}
		if flags&descFlagWrite != 0 {
			c.Writable = append(c.Writable, seg)
			c.WritableLen += uint64(n)
		} else {
			if len(c.Writable) != 0 {
				return fail(ErrReadableAfterWrite)
			}
			c.Readable = append(c.Readable, seg)
			c.ReadableLen += uint64(n)
		}
		if flags&descFlagNext == 0 {
			return c, nil
		}
		if next >= q.size {
			return fail(fmt.Errorf("%w: next %d, size %d", ErrNextIndex, next, q.size))
		}
		i = next
	}
}

// Push returns the chain with the given head to the driver, with written
// the number of bytes the device wrote into its writable buffers, and
// publishes it in used->idx.
func (q *Queue) Push(head uint16, written uint32) error {
	if !q.Ready() {
		return ErrQueueNotReady
	}
	if head >= q.size {
		return &ChainError{Head: head, Desc: head, Err: ErrHeadIndex}
	}
	var elem [8]byte
	binary.LittleEndian.PutUint32(elem[0:], uint32(head))
	binary.LittleEndian.PutUint32(elem[4:], written)
	if err := q.mem.WriteAt(elem[:], q.device+4+8*uint64(q.nextUsed%q.size)); err != nil {
		return fmt.Errorf("%w: %v", ErrRingOutOfMemory, err)
	}
	q.nextUsed++
	var idx [2]byte
	binary.LittleEndian.PutUint16(idx[:], q.nextUsed)
	if err := q.mem.WriteAt(idx[:], q.device+2); err != nil {
		return fmt.Errorf("%w: %v", ErrRingOutOfMemory, err)
	}
	return nil
}

// WantsInterrupt reports whether the driver wants a used-buffer interrupt:
// VIRTQ_AVAIL_F_NO_INTERRUPT is clear (VIRTIO_F_EVENT_IDX is not offered).
func (q *Queue) WantsInterrupt() bool {
	flags, err := q.read16(q.driver)
	return err != nil || flags&availFlagNoInterrupt == 0
}

// ReadReadable copies the chain's readable bytes from offset off into p,
// as if the readable buffers were one. It returns the bytes copied and
// ErrShortChain if the buffers end before p is full.
func (c *Chain) ReadReadable(p []byte, off uint64) (int, error) {
	slices, err := c.slices(c.Readable, off, uint64(len(p)), false)
	n := 0
	for _, s := range slices {
		n += copy(p[n:], s)
	}
	return n, err
}

// WriteWritable copies p into the chain's writable bytes from offset off,
// as if the writable buffers were one; the pages are marked dirty. It
// returns the bytes copied and ErrShortChain if the buffers end first.
func (c *Chain) WriteWritable(p []byte, off uint64) (int, error) {
	slices, err := c.slices(c.Writable, off, uint64(len(p)), true)
	n := 0
	for _, s := range slices {
		n += copy(s, p[n:])
	}
	return n, err
}

// ReadableSlices returns read-only views of the readable bytes [off,
// off+n), one per descriptor touched: for I/O straight from guest memory.
func (c *Chain) ReadableSlices(off, n uint64) ([][]byte, error) {
	return c.slices(c.Readable, off, n, false)
}

// WritableSlices returns writable views of the writable bytes [off, off+n),
// one per descriptor touched, with their pages marked dirty: for I/O
// straight into guest memory.
func (c *Chain) WritableSlices(off, n uint64) ([][]byte, error) {
	return c.slices(c.Writable, off, n, true)
}

// slices maps [off, off+n) of the concatenated segs onto guest memory. It
// returns the views it could make and ErrShortChain if the range runs past
// the end.
func (c *Chain) slices(segs []Segment, off, n uint64, mutable bool) ([][]byte, error) {
	var out [][]byte
	for _, s := range segs {
		if n == 0 {
			break
		}
		l := uint64(s.Len)
		if off >= l {
			off -= l
			continue
		}
		take := min(l-off, n)
		var b []byte
		var err error
		if mutable {
			b, err = c.mem.MutableSlice(s.GPA+off, take)
		} else {
			b, err = c.mem.Slice(s.GPA+off, take)
		}
		if err != nil {
			// Segments were checked at Pop; memory does not shrink.
			return out, fmt.Errorf("%w: %v", ErrDescOutOfMemory, err)
		}
		out = append(out, b)
		off, n = 0, n-take
	}
	if n != 0 {
		return out, ErrShortChain
	}
	return out, nil
}
