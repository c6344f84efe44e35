package virtio_test

import (
	"errors"
	"testing"

	"github.com/gokvm-ft/gokvm-ft/virtio"
	"github.com/gokvm-ft/gokvm-ft/virtio/virtiotest"
)

// netLike is a test device shaped like virtio-net: queue 0 receives (the
// host fills writable chains, outside any notify), queue 1 transmits
// (readable chains, served in Notify).
type netLike struct {
	t        virtio.Transport
	features uint64
	config   [8]byte
	sent     [][]byte
	resets   int
	received uint32 // guest-visible counter, saved as the device state
}

const netFeatureMAC = 1 << 5

func (d *netLike) Type() uint32            { return virtio.DeviceNet }
func (d *netLike) Features() uint64        { return netFeatureMAC }
func (d *netLike) QueueMaxSizes() []uint16 { return []uint16{16, 16} }
func (d *netLike) ReadConfig(off uint64, data []byte) {
	clear(data)
	if off < uint64(len(d.config)) {
		copy(data, d.config[off:])
	}
}
func (d *netLike) WriteConfig(off uint64, data []byte) {
	if off < uint64(len(d.config)) {
		copy(d.config[off:], data)
	}
}
func (d *netLike) Activate(t virtio.Transport, f uint64) { d.t, d.features = t, f }
func (d *netLike) Reset()                                { d.t, d.features = nil, 0; d.resets++ }
func (d *netLike) SaveState() []byte                     { return []byte{byte(d.received), byte(d.received >> 8)} }
func (d *netLike) RestoreState(s []byte) error {
	if len(s) != 2 {
		return errors.New("bad netLike state")
	}
	d.Reset()
	d.received = uint32(s[0]) | uint32(s[1])<<8
	return nil
}

// Notify transmits every chain of the TX queue.
func (d *netLike) Notify(queue int) {
	if queue != 1 {
		return
	}
	q := d.t.Queue(1)
	for {
		c, ok, err := q.Pop()
		if err == nil && ok {
			err = c.RequireReadOnly()
		}
		if err != nil {
			d.t.Fail(err)
			return
		}
		if !ok {
			break
		}
		pkt := make([]byte, c.ReadableLen)
		if _, err := c.ReadReadable(pkt, 0); err != nil {
			d.t.Fail(err)
			return
		}
		d.sent = append(d.sent, pkt)
		if err := q.Push(c.Head, 0); err != nil {
			d.t.Fail(err)
			return
		}
	}
	d.t.SignalUsed(1)
}

// Receive is the host delivering a packet on the vCPU thread outside any
// notify exit. It reports whether the guest had a buffer for it.
func (d *netLike) Receive(pkt []byte) bool {
	if d.t == nil {
		return false
	}
	q := d.t.Queue(0)
	c, ok, err := q.Pop()
	if err == nil && ok {
		err = c.RequireWriteOnly()
	}
	if err != nil {
		d.t.Fail(err)
		return false
	}
	if !ok {
		return false
	}
	n, err := c.WriteWritable(pkt, 0)
	if err != nil && !errors.Is(err, virtio.ErrShortChain) {
		d.t.Fail(err)
		return false
	}
	if err := q.Push(c.Head, uint32(n)); err != nil {
		d.t.Fail(err)
		return false
	}
	d.received++
	d.t.SignalUsed(0)
	return true
}

// rig is a transport with a netLike device in 1 MiB of fake memory.
type rig struct {
	dev  *netLike
	mmio *virtio.MMIO
	mem  *virtiotest.Memory
	line *virtiotest.Line
	drv  *virtiotest.Driver
}

const memSize = 1 << 20

func newRig(t testing.TB) *rig {
	r := &rig{dev: &netLike{}, mem: virtiotest.NewMemory(memSize), line: &virtiotest.Line{}}
	r.mmio = virtio.NewMMIO(r.dev, r.mem, r.line.Set)
	r.drv = &virtiotest.Driver{T: t, Regs: r.mmio, Mem: r.mem}
	return r
}

// initRig negotiates everything and sets up both queues with 16 entries.
func initRig(t testing.TB) (*rig, []*virtiotest.DriverQueue) {
	r := newRig(t)
	qs := r.drv.Init(0x10000, 16, 16)
	return r, qs
}
