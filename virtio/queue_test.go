package virtio_test

import (
	"errors"
	"testing"

	"github.com/gokvm-ft/gokvm-ft/virtio"
	"github.com/gokvm-ft/gokvm-ft/virtio/virtiotest"
)

func TestChainLayout(t *testing.T) {
	r, qs := initRig(t)
	q := qs[1]
	head := q.Add(
		virtiotest.Buffer{GPA: 0x80000, Len: 3},
		virtiotest.Buffer{GPA: 0x81000, Len: 5},
		virtiotest.Buffer{GPA: 0x82000, Len: 7, Writable: true},
		virtiotest.Buffer{GPA: 0x83000, Len: 2, Writable: true},
	)
	c, ok, err := r.mmio.Queue(1).Pop()
	if err != nil || !ok {
		t.Fatal(ok, err)
	}
	want := virtio.Chain{Head: head, ReadableLen: 8, WritableLen: 9,
		Readable: []virtio.Segment{{GPA: 0x80000, Len: 3}, {GPA: 0x81000, Len: 5}},
		Writable: []virtio.Segment{{GPA: 0x82000, Len: 7}, {GPA: 0x83000, Len: 2}}}
	if c.Head != want.Head || c.ReadableLen != 8 || c.WritableLen != 9 || c.Len() != 4 ||
		len(c.Readable) != 2 || c.Readable[1] != want.Readable[1] || c.Writable[0] != want.Writable[0] {
		t.Fatalf("chain %+v", c)
	}
	copy(r.mem.B[0x80000:], "abc")
	copy(r.mem.B[0x81000:], "defgh")
	p := make([]byte, 4)
	if n, err := c.ReadReadable(p, 2); n != 4 || err != nil || string(p) != "cdef" {
		t.Errorf("ReadReadable = %d %v %q", n, err, p)
	}
	if n, err := c.ReadReadable(p, 6); n != 2 || !errors.Is(err, virtio.ErrShortChain) {
		t.Errorf("short ReadReadable = %d %v", n, err)
	}
	clear(r.mem.Dirty)
	if n, err := c.WriteWritable([]byte("123456789"), 0); n != 9 || err != nil {
		t.Errorf("WriteWritable = %d %v", n, err)
	}
	if string(r.mem.B[0x82000:0x82007])+string(r.mem.B[0x83000:0x83002]) != "123456789" {
		t.Error("written data wrong")
	}
	if !r.mem.Dirty[0x82] || !r.mem.Dirty[0x83] {
		t.Error("writes not marked dirty")
	}
	if n, err := c.WriteWritable([]byte("xy"), 8); n != 1 || !errors.Is(err, virtio.ErrShortChain) {
		t.Errorf("short WriteWritable = %d %v", n, err)
	}
	sl, err := c.WritableSlices(5, 3)
	if err != nil || len(sl) != 2 || len(sl[0]) != 2 || len(sl[1]) != 1 {
		t.Errorf("WritableSlices = %v %v", sl, err)
	}
	if c.RequireReadOnly() == nil || c.RequireWriteOnly() == nil {
		t.Error("mixed chain passed a direction check")
	}
	if _, ok, err := r.mmio.Queue(1).Pop(); ok || err != nil {
		t.Error("second pop found something")
	}
	if err := r.mmio.Queue(1).Push(c.Head, 9); err != nil {
		t.Fatal(err)
	}
	if h, n, ok := q.NextUsed(); !ok || h != head || n != 9 {
		t.Errorf("used %d %d %v", h, n, ok)
	}
	if err := r.mmio.Queue(1).Push(16, 0); !errors.Is(err, virtio.ErrHeadIndex) {
		t.Errorf("push of head 16: %v", err)
	}
}

func TestChainWraps(t *testing.T) {
	r, qs := initRig(t)
	for i := range 40 { // more than twice round the 16-entry rings
		qs[1].Add(virtiotest.Buffer{GPA: 0x80000, Len: uint32(1 + i)})
		qs[1].Notify()
		if _, n, ok := qs[1].NextUsed(); !ok || n != 0 {
			t.Fatalf("round %d: nothing used", i)
		}
	}
	if len(r.dev.sent) != 40 || len(r.dev.sent[39]) != 40 || r.mmio.Broken() != nil {
		t.Errorf("sent %d, broken %v", len(r.dev.sent), r.mmio.Broken())
	}
}

// TestChainRefusals covers every way a driver can break a chain; each is
// refused with its own error and consumes nothing.
func TestChainRefusals(t *testing.T) {
	const big = 9 << 20
	for _, c := range []struct {
		name  string
		build func(q *virtiotest.DriverQueue)
		want  error
	}{
		{"avail idx too far", func(q *virtiotest.DriverQueue) { q.SetAvailIdx(17) }, virtio.ErrAvailIndex},
		{"avail idx behind", func(q *virtiotest.DriverQueue) { q.SetAvailIdx(0xffff) }, virtio.ErrAvailIndex},
		{"head out of range", func(q *virtiotest.DriverQueue) { q.Publish(16) }, virtio.ErrHeadIndex},
		{"next out of range", func(q *virtiotest.DriverQueue) {
			q.WriteDesc(0, 0x80000, 4, 1, 16)
			q.Publish(0)
		}, virtio.ErrNextIndex},
		{"self loop", func(q *virtiotest.DriverQueue) {
			q.WriteDesc(3, 0x80000, 4, 1, 3)
			q.Publish(3)
		}, virtio.ErrChainTooLong},
		{"long loop", func(q *virtiotest.DriverQueue) {
			for i := range uint16(16) {
				q.WriteDesc(i, 0x80000, 4, 1, (i+5)%16)
			}
			q.Publish(0)
		}, virtio.ErrChainTooLong},
		{"readable after writable", func(q *virtiotest.DriverQueue) {
			q.Add(virtiotest.Buffer{GPA: 0x80000, Len: 4, Writable: true}, virtiotest.Buffer{GPA: 0x81000, Len: 4})
		}, virtio.ErrReadableAfterWrite},
		{"zero length", func(q *virtiotest.DriverQueue) {
			q.Add(virtiotest.Buffer{GPA: 0x80000, Len: 4}, virtiotest.Buffer{GPA: 0x81000, Len: 0})
		}, virtio.ErrZeroLength},
		{"buffer past memory", func(q *virtiotest.DriverQueue) {
			q.Add(virtiotest.Buffer{GPA: 32<<20 - 8, Len: 9})
		}, virtio.ErrDescOutOfMemory},
		{"buffer after memory", func(q *virtiotest.DriverQueue) {
			q.Add(virtiotest.Buffer{GPA: 1 << 40, Len: 1})
		}, virtio.ErrDescOutOfMemory},
		{"length wraps", func(q *virtiotest.DriverQueue) {
			q.Add(virtiotest.Buffer{GPA: 1<<64 - 16, Len: 32})
		}, virtio.ErrDescOutOfMemory},
		{"huge length", func(q *virtiotest.DriverQueue) {
			q.Add(virtiotest.Buffer{GPA: 0, Len: 0xffffffff})
		}, virtio.ErrDescOutOfMemory},
		{"chain too big", func(q *virtiotest.DriverQueue) {
			q.Add(virtiotest.Buffer{GPA: 0, Len: big}, virtiotest.Buffer{GPA: 0, Len: big})
		}, virtio.ErrChainTooBig},
		{"indirect", func(q *virtiotest.DriverQueue) {
			q.WriteDesc(0, 0x80000, 32, 4, 0)
			q.Publish(0)
		}, virtio.ErrIndirect},
	} {
		t.Run(c.name, func(t *testing.T) {
			mem := virtiotest.NewMemory(32 << 20)
			dev := &netLike{}
			m := virtio.NewMMIO(dev, mem, nil)
			drv := &virtiotest.Driver{T: t, Regs: m, Mem: mem}
			qs := drv.Init(0x10000, 16, 16)
			c.build(qs[1])
			_, ok, err := m.Queue(1).Pop()
			if ok || !errors.Is(err, c.want) {
				t.Fatalf("Pop = %v, %v; want %v", ok, err, c.want)
			}
			t.Log(err)
			qs[1].Notify()
			if !errors.Is(m.Broken(), c.want) || len(dev.sent) != 0 {
				t.Errorf("device broken with %v, sent %d", m.Broken(), len(dev.sent))
			}
			if s := m.Save(); s.Queues[1].NextAvail != 0 || s.Queues[1].NextUsed != 0 {
				t.Errorf("refused chain consumed: %+v", s.Queues[1])
			}
		})
	}
}

func TestChainAtLimits(t *testing.T) {
	// A chain as long as the queue, and one exactly MaxChainBytes big.
	mem := virtiotest.NewMemory(32 << 20)
	dev := &netLike{}
	m := virtio.NewMMIO(dev, mem, nil)
	drv := &virtiotest.Driver{T: t, Regs: m, Mem: mem}
	qs := drv.Init(0x10000, 16, 16)
	bufs := make([]virtiotest.Buffer, 16)
	for i := range bufs {
		bufs[i] = virtiotest.Buffer{GPA: 0x100000, Len: 1}
	}
	for i, want := range []int{16, 2} {
		if i == 0 {
			qs[1].Add(bufs...)
		} else {
			qs[1].Add(virtiotest.Buffer{GPA: 0, Len: virtio.MaxChainBytes - 1}, virtiotest.Buffer{GPA: 0, Len: 1})
		}
		c, ok, err := m.Queue(1).Pop()
		if !ok || err != nil || c.Len() != want {
			t.Fatalf("chain %d: %v %v %d", i, ok, err, c.Len())
		}
	}
}
