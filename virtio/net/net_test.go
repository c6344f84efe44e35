package net_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	stdnet "net"
	"reflect"
	"sync"
	"testing"

	"gvisor.dev/gvisor/pkg/buffer"

	"github.com/gokvm-ft/gokvm-ft/internal/statetest"
	"github.com/gokvm-ft/gokvm-ft/virtio"
	vnet "github.com/gokvm-ft/gokvm-ft/virtio/net"
	"github.com/gokvm-ft/gokvm-ft/virtio/virtiotest"
)

const (
	memSize   = 2 << 20
	queueBase = 0x10000 // receiveq at +0, transmitq at +64 KiB
	bufBase   = 0x40000 // receive buffers: one 2 KiB slot per descriptor
	txBase    = 0x100000
	hdr       = vnet.HeaderSize
	linuxRx   = hdr + vnet.MaxRxFrame // what Linux 6.1 posts per receive chain
)

var testMAC = stdnet.HardwareAddr{0x52, 0x54, 0x00, 0x12, 0x34, 0x56}

type nic struct {
	t      *testing.T
	n      *vnet.Net
	mmio   *virtio.MMIO
	mem    *virtiotest.Memory
	line   *virtiotest.Line
	drv    *virtiotest.Driver
	rx, tx *virtiotest.DriverQueue
	sent   [][]byte // emitted frames
	rxSlot uint64   // next receive buffer slot
}

// newNIC makes a device and, unless raw, brings it up as Linux does.
func newNIC(t *testing.T, raw bool) *nic {
	d := &nic{t: t, mem: virtiotest.NewMemory(memSize), line: &virtiotest.Line{}}
	n, err := vnet.New(testMAC, d.emit)
	if err != nil {
		t.Fatal(err)
	}
	d.n = n
	d.mmio = virtio.NewMMIO(n, d.mem, d.line.Set)
	d.drv = &virtiotest.Driver{T: t, Regs: d.mmio, Mem: d.mem}
	if !raw {
		qs := d.drv.Init(queueBase, vnet.QueueSize, vnet.QueueSize)
		d.rx, d.tx = qs[0], qs[1]
	}
	return d
}

// emit is the device's output: it keeps a copy and releases the buffer,
// as the machine's output path must.
func (d *nic) emit(pkt buffer.Buffer) {
	d.sent = append(d.sent, pkt.Flatten())
	pkt.Release()
}

func frame(n int, seed byte) []byte {
	f := make([]byte, n)
	for i := range f {
		f[i] = seed + byte(i*7)
	}
	return f
}

func deliver(d *nic, f []byte) { d.n.Deliver(buffer.MakeWithData(f)) }

// addRx posts one receive chain made of writable buffers of the given sizes.
func (d *nic) addRx(sizes ...uint32) uint16 {
	var bufs []virtiotest.Buffer
	for _, s := range sizes {
		gpa := bufBase + (d.rxSlot%256)*2048
		d.rxSlot++
		bufs = append(bufs, virtiotest.Buffer{GPA: gpa, Len: s, Writable: true})
	}
	return d.rx.Add(bufs...)
}

// gather reads n bytes of the chain at head (a receive chain addRx made,
// with its buffers in consecutive descriptors).
func (d *nic) gather(head uint16, n uint32) []byte {
	var out []byte
	for i := head; n > 0; i = (i + 1) % d.rx.Size {
		e := d.rx.Desc + 16*uint64(i)
		gpa := binary.LittleEndian.Uint64(d.mem.B[e:])
		l := min(binary.LittleEndian.Uint32(d.mem.B[e+8:]), n)
		out = append(out, d.mem.B[gpa:gpa+uint64(l)]...)
		n -= l
	}
	return out
}

// send makes one transmit chain of readable buffers holding the given
// pieces (laid out one after another at txBase) and notifies.
func (d *nic) send(pieces ...[]byte) uint16 {
	var bufs []virtiotest.Buffer
	gpa := uint64(txBase)
	for _, p := range pieces {
		copy(d.mem.B[gpa:], p)
		bufs = append(bufs, virtiotest.Buffer{GPA: gpa, Len: uint32(len(p))})
		gpa += uint64(len(p))
	}
	head := d.tx.Add(bufs...)
	d.tx.Notify()
	return head
}

func (d *nic) ack() { d.drv.Write32(virtio.RegInterruptACK, d.drv.Read32(virtio.RegInterruptStatus)) }

func (d *nic) wantHealthy() {
	d.t.Helper()
	if err := d.mmio.Broken(); err != nil {
		d.t.Fatalf("device broken: %v", err)
	}
}

func (d *nic) wantBroken(want error) {
	d.t.Helper()
	err := d.mmio.Broken()
	if !errors.Is(err, want) {
		d.t.Fatalf("broken with %v, want %v", err, want)
	}
	if d.drv.Read32(virtio.RegStatus)&virtio.StatusDeviceNeedsReset == 0 {
		d.t.Error("DEVICE_NEEDS_RESET not set")
	}
}

func TestNew(t *testing.T) {
	if _, err := vnet.New(stdnet.HardwareAddr{1, 2, 3}, func(buffer.Buffer) {}); err == nil {
		t.Error("short MAC accepted")
	}
	if _, err := vnet.New(testMAC, nil); err == nil {
		t.Error("nil emit accepted")
	}
	mac := append(stdnet.HardwareAddr(nil), testMAC...)
	n, _ := vnet.New(mac, func(buffer.Buffer) {})
	mac[0] = 0xff
	if n.MAC().String() != testMAC.String() {
		t.Error("device shares the caller's MAC slice")
	}
	n.MAC()[0] = 0xff
	if n.MAC().String() != testMAC.String() {
		t.Error("MAC returns the device's own array")
	}
}

func TestConfigAndFeatures(t *testing.T) {
	d := newNIC(t, false)
	if d.drv.Read32(virtio.RegDeviceID) != virtio.DeviceNet {
		t.Error("not a network device")
	}
	want := virtio.FeatureVersion1 | vnet.FeatureMAC | vnet.FeatureStatus | vnet.FeatureMTU
	if f := d.drv.DeviceFeatures(); f != want {
		t.Errorf("features %#x, want %#x", f, want)
	}
	for i, n := range []uint32{vnet.QueueSize, vnet.QueueSize, 0} {
		d.drv.Write32(virtio.RegQueueSel, uint32(i))
		if got := d.drv.Read32(virtio.RegQueueNumMax); got != n {
			t.Errorf("queue %d maximum %d, want %d", i, got, n)
		}
	}
	cfg := func(off uint64, n int) []byte {
		b := make([]byte, n)
		d.mmio.ReadMMIO(virtio.RegConfig+off, b)
		return b
	}
	want12 := []byte{0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 1, 0, 1, 0, 0xdc, 0x05}
	var all []byte
	for off := uint64(0); off < 12; off++ {
		all = append(all, cfg(off, 1)...)
	}
	if !bytes.Equal(all, want12) {
		t.Errorf("config bytes % x, want % x", all, want12)
	}
	if got := binary.LittleEndian.Uint16(cfg(10, 2)); got != vnet.MTU {
		t.Errorf("mtu %d", got)
	}
	if got := binary.LittleEndian.Uint16(cfg(6, 2)); got != vnet.StatusLinkUp {
		t.Errorf("status %d", got)
	}
	if got := cfg(4, 4); !bytes.Equal(got, []byte{0x34, 0x56, 1, 0}) {
		t.Errorf("4-byte read at 4: % x", got)
	}
	if got := cfg(12, 4); !bytes.Equal(got, make([]byte, 4)) {
		t.Errorf("past the end: % x", got)
	}
	if got := cfg(10, 4); !bytes.Equal(got, []byte{0xdc, 0x05, 0, 0}) {
		t.Errorf("straddling the end: % x", got)
	}
	if got := cfg(1<<40, 2); !bytes.Equal(got, []byte{0, 0}) {
		t.Errorf("far past the end: % x", got)
	}
	// Writes, the MAC included, are ignored.
	d.mmio.WriteMMIO(virtio.RegConfig, []byte{0xff, 0xff, 0xff, 0xff})
	d.mmio.WriteMMIO(virtio.RegConfig+6, []byte{0, 0})
	all = all[:0]
	for off := uint64(0); off < 12; off += 4 {
		all = append(all, cfg(off, 4)...)
	}
	if !bytes.Equal(all, want12) {
		t.Errorf("config after writes % x, want % x", all, want12)
	}
}

func TestTransmit(t *testing.T) {
	d := newNIC(t, false)
	var h [hdr]byte
	f1, f2, f3 := frame(60, 1), frame(1514, 2), frame(vnet.MaxTxFrame, 3)
	// Linux's two layouts: header in its own descriptor, or pushed in
	// front of the frame; and a frame in several pieces.
	heads := []uint16{
		d.send(h[:], f1),
		d.send(append(h[:], f2...)),
		d.send(h[:4], h[4:], f3[:14], f3[14:1000], f3[1000:]),
	}
	if len(d.sent) != 3 || !bytes.Equal(d.sent[0], f1) || !bytes.Equal(d.sent[1], f2) || !bytes.Equal(d.sent[2], f3) {
		t.Fatalf("sent %d frames, or wrong contents", len(d.sent))
	}
	for _, want := range heads {
		head, written, ok := d.tx.NextUsed()
		if !ok || head != want || written != 0 {
			t.Errorf("used %d/%d %v, want head %d written 0", head, written, ok, want)
		}
	}
	if !d.line.Level || d.line.Rises != 1 {
		t.Errorf("interrupt level %v rises %d", d.line.Level, d.line.Rises)
	}
	// A batch of chains: one interrupt after all of them.
	d.ack()
	for i := range 10 {
		copy(d.mem.B[txBase+uint64(i)*100:], append(make([]byte, hdr), frame(100-hdr, byte(i))...))
		d.tx.Add(virtiotest.Buffer{GPA: txBase + uint64(i)*100, Len: 100})
	}
	d.tx.Notify()
	if len(d.sent) != 13 || d.line.Rises != 2 {
		t.Errorf("batch: %d frames sent, %d interrupts", len(d.sent), d.line.Rises)
	}
	st := d.n.Stats()
	if st.TxPackets != 13 || st.TxBytes != 60+1514+vnet.MaxTxFrame+10*(100-hdr) {
		t.Errorf("stats %+v", st)
	}
	// Suppressed interrupts stay suppressed.
	d.ack()
	d.tx.SetNoInterrupt(true)
	d.send(h[:], f1)
	if d.line.Level || len(d.sent) != 14 {
		t.Errorf("interrupt despite NO_INTERRUPT, or not sent")
	}
	d.wantHealthy()
}

func TestTransmitDrops(t *testing.T) {
	d := newNIC(t, false)
	var h [hdr]byte
	csum := [hdr]byte{1}
	gso := [hdr]byte{0, 1}
	dataValid := [hdr]byte{2} // a receive-only flag: harmless, sent
	for _, c := range []struct {
		name   string
		pieces [][]byte
		sent   bool
	}{
		{"header only", [][]byte{h[:]}, false},
		{"short header", [][]byte{h[:hdr-1]}, false},
		{"frame shorter than Ethernet header", [][]byte{h[:], frame(13, 0)}, false},
		{"smallest frame", [][]byte{h[:], frame(14, 0)}, true},
		{"frame over MaxTxFrame", [][]byte{h[:], frame(vnet.MaxTxFrame+1, 0)}, false},
		{"NEEDS_CSUM", [][]byte{csum[:], frame(60, 0)}, false},
		{"GSO", [][]byte{gso[:], frame(60, 0)}, false},
		{"DATA_VALID", [][]byte{dataValid[:], frame(60, 0)}, true},
	} {
		before := len(d.sent)
		head := d.send(c.pieces...)
		if sent := len(d.sent) > before; sent != c.sent {
			t.Errorf("%s: sent %v, want %v", c.name, sent, c.sent)
		}
		if h, n, ok := d.tx.NextUsed(); !ok || h != head || n != 0 {
			t.Errorf("%s: chain not returned (used %d/%d %v)", c.name, h, n, ok)
		}
	}
	st := d.n.Stats()
	if st.TxDropSize != 4 || st.TxDropHeader != 2 || st.TxPackets != 2 {
		t.Errorf("stats %+v", st)
	}
	d.wantHealthy()
}

func TestTransmitMalformed(t *testing.T) {
	var h [hdr]byte
	// A writable buffer in a transmit chain.
	d := newNIC(t, false)
	copy(d.mem.B[txBase:], h[:])
	d.tx.Add(virtiotest.Buffer{GPA: txBase, Len: 100}, virtiotest.Buffer{GPA: txBase + 100, Len: 100, Writable: true})
	d.tx.Notify()
	d.wantBroken(virtio.ErrUnexpectedWritable)
	if len(d.sent) != 0 || !d.line.Level {
		t.Errorf("sent %d frames, interrupt %v", len(d.sent), d.line.Level)
	}
	// A chain that loops.
	d = newNIC(t, false)
	d.tx.WriteDesc(0, txBase, 100, 1, 0)
	d.tx.Publish(0)
	d.tx.Notify()
	d.wantBroken(virtio.ErrChainTooLong)
	// A buffer outside guest memory.
	d = newNIC(t, false)
	d.tx.Add(virtiotest.Buffer{GPA: memSize - 50, Len: 100})
	d.tx.Notify()
	d.wantBroken(virtio.ErrDescOutOfMemory)
	// The available index far ahead; good chains before it still go out.
	d = newNIC(t, false)
	d.send(h[:], frame(60, 0))
	d.tx.SetAvailIdx(1000)
	d.tx.Notify()
	d.wantBroken(virtio.ErrAvailIndex)
	if len(d.sent) != 1 {
		t.Errorf("sent %d frames", len(d.sent))
	}
	// Once broken, notifies do nothing and the device stays quiet.
	d.tx.Notify()
	deliver(d, frame(60, 0))
	if d.n.Stats().RxDropInactive != 1 {
		t.Errorf("delivered to a broken device: %+v", d.n.Stats())
	}
}

func TestReceive(t *testing.T) {
	d := newNIC(t, false)
	// Linux's small buffers: header and frame in one descriptor.
	h1 := d.addRx(linuxRx)
	// Header in its own descriptor, frame spread over two.
	h2 := d.addRx(hdr, 1000, 518)
	h3 := d.addRx(linuxRx)
	d.rx.Notify() // nothing pending: nothing consumed
	if _, _, ok := d.rx.NextUsed(); ok || d.line.Level {
		t.Fatal("receive buffer used with nothing to receive")
	}
	clear(d.mem.Dirty)
	frames := [][]byte{frame(60, 1), frame(vnet.MaxRxFrame, 2), frame(14, 3)}
	for i, f := range frames {
		deliver(d, f)
		if !d.line.Level || d.line.Rises != i+1 {
			t.Errorf("frame %d: interrupt %v rises %d", i, d.line.Level, d.line.Rises)
		}
		d.ack()
	}
	wantHdr := make([]byte, hdr)
	wantHdr[10] = 1 // num_buffers
	for i, want := range []uint16{h1, h2, h3} {
		head, written, ok := d.rx.NextUsed()
		if !ok || head != want || written != uint32(hdr+len(frames[i])) {
			t.Fatalf("frame %d: used %d/%d %v, want head %d", i, head, written, ok, want)
		}
		got := d.gather(head, written)
		if !bytes.Equal(got[:hdr], wantHdr) || !bytes.Equal(got[hdr:], frames[i]) {
			t.Errorf("frame %d: header % x or frame wrong", i, got[:hdr])
		}
	}
	if !d.mem.Dirty[bufBase/virtiotest.PageSize] {
		t.Error("receive buffer not marked dirty")
	}
	st := d.n.Stats()
	if st.RxPackets != 3 || st.RxBytes != 60+vnet.MaxRxFrame+14 || d.n.Pending() != 0 {
		t.Errorf("stats %+v, pending %d", st, d.n.Pending())
	}
	d.wantHealthy()
}

func TestReceivePending(t *testing.T) {
	d := newNIC(t, false)
	// Frames wait for buffers, up to MaxPending; newer ones are dropped.
	for i := range vnet.MaxPending + 5 {
		deliver(d, frame(64, byte(i)))
	}
	if d.n.Pending() != vnet.MaxPending || d.n.Stats().RxDropFull != 5 || d.line.Level {
		t.Fatalf("pending %d, stats %+v", d.n.Pending(), d.n.Stats())
	}
	// The driver adds 100 buffers: the 100 oldest frames go in, in order,
	// with one interrupt.
	for range 100 {
		d.addRx(linuxRx)
	}
	d.rx.Notify()
	if d.n.Pending() != vnet.MaxPending-100 || d.line.Rises != 1 {
		t.Fatalf("pending %d, interrupts %d", d.n.Pending(), d.line.Rises)
	}
	seen := 0
	check := func() {
		for {
			head, written, ok := d.rx.NextUsed()
			if !ok {
				return
			}
			if got := d.gather(head, written)[hdr:]; !bytes.Equal(got, frame(64, byte(seen))) {
				t.Fatalf("frame %d out of order", seen)
			}
			seen++
		}
	}
	check()
	// A new frame queues behind the old ones even when a buffer is there.
	d.addRx(linuxRx)
	deliver(d, frame(64, 0)) // byte(MaxPending): the pattern of frame number MaxPending
	check()
	for range 200 {
		d.addRx(linuxRx)
	}
	d.rx.Notify()
	check()
	if seen != vnet.MaxPending+1 || d.n.Pending() != 0 {
		t.Fatalf("received %d frames, %d pending", seen, d.n.Pending())
	}
	// And the late frame (after the dropped ones) comes last.
	deliver(d, frame(64, byte(seen)))
	check()
	if seen != vnet.MaxPending+2 {
		t.Errorf("late frame not received")
	}
	d.wantHealthy()
}

func TestReceiveDrops(t *testing.T) {
	// Before DRIVER_OK.
	d := newNIC(t, true)
	deliver(d, frame(60, 0))
	d.drv.Negotiate(d.drv.DeviceFeatures())
	d.rx = d.drv.SetupQueue(0, 16, queueBase)
	d.tx = d.drv.SetupQueue(1, 16, queueBase+0x10000)
	deliver(d, frame(60, 0))
	if st := d.n.Stats(); st.RxDropInactive != 2 || d.n.Pending() != 0 {
		t.Errorf("inactive: %+v", st)
	}
	d.drv.DriverOK()
	d.wantHealthy()

	// Sizes.
	d.addRx(linuxRx)
	d.addRx(linuxRx)
	deliver(d, frame(13, 0))
	deliver(d, frame(vnet.MaxRxFrame+1, 0))
	d.n.Deliver(buffer.Buffer{})
	if st := d.n.Stats(); st.RxDropSize != 3 || st.RxPackets != 0 {
		t.Errorf("sizes: %+v", st)
	}
	// A chain too small: the frame is dropped, the chain comes back empty,
	// and the next frame takes the next chain.
	small := d.addRx(hdr + 59) // behind the two above
	deliver(d, frame(60, 1))
	if h, n, ok := d.rx.NextUsed(); !ok || h != small-2 || n != hdr+60 {
		t.Errorf("used %d/%d %v", h, n, ok)
	}
	deliver(d, frame(60, 2))
	if h, n, ok := d.rx.NextUsed(); !ok || h != small-1 || n != hdr+60 {
		t.Errorf("used %d/%d %v", h, n, ok)
	}
	deliver(d, frame(60, 3))
	if h, n, ok := d.rx.NextUsed(); !ok || h != small || n != 0 {
		t.Errorf("small chain: used %d/%d %v", h, n, ok)
	}
	next := d.addRx(linuxRx)
	deliver(d, frame(60, 4))
	if h, n, ok := d.rx.NextUsed(); !ok || h != next || n != hdr+60 {
		t.Errorf("after the small chain: used %d/%d %v", h, n, ok)
	}
	if st := d.n.Stats(); st.RxDropShortBuffer != 1 || st.RxPackets != 3 {
		t.Errorf("short buffer: %+v", st)
	}
	d.wantHealthy()
	// After a reset.
	d.drv.Write32(virtio.RegStatus, 0)
	deliver(d, frame(60, 0))
	if st := d.n.Stats(); st.RxDropInactive != 3 {
		t.Errorf("after reset: %+v", st)
	}
}

func TestReceiveMalformed(t *testing.T) {
	for _, c := range []struct {
		name string
		bad  func(d *nic)
		want error
	}{
		{"readable buffer", func(d *nic) {
			d.rx.Add(virtiotest.Buffer{GPA: bufBase, Len: 12}, virtiotest.Buffer{GPA: bufBase + 12, Len: 2000, Writable: true})
		}, virtio.ErrUnexpectedReadable},
		{"loop", func(d *nic) { d.rx.WriteDesc(0, bufBase, 2000, 3, 0); d.rx.Publish(0) }, virtio.ErrChainTooLong},
		{"head out of range", func(d *nic) { d.rx.Publish(vnet.QueueSize) }, virtio.ErrHeadIndex},
		{"indirect", func(d *nic) { d.rx.WriteDesc(0, bufBase, 2000, 4|2, 0); d.rx.Publish(0) }, virtio.ErrIndirect},
	} {
		t.Run(c.name, func(t *testing.T) {
			d := newNIC(t, false)
			for range 3 {
				deliver(d, frame(60, 0))
			}
			c.bad(d)
			d.rx.Notify()
			d.wantBroken(c.want)
			if d.n.Pending() != 0 || d.n.Stats().RxDropReset != 3 {
				t.Errorf("pending %d, stats %+v", d.n.Pending(), d.n.Stats())
			}
			if !d.line.Level {
				t.Error("no configuration change interrupt")
			}
			deliver(d, frame(60, 0))
			if d.n.Stats().RxDropInactive != 1 {
				t.Errorf("delivered to a broken device: %+v", d.n.Stats())
			}
			// A reset brings it back.
			qs := d.drv.Init(queueBase, 16, 16)
			d.rx, d.tx = qs[0], qs[1]
			d.addRx(linuxRx)
			deliver(d, frame(60, 0))
			if _, _, ok := d.rx.NextUsed(); !ok {
				t.Error("no frame after reset")
			}
			d.wantHealthy()
		})
	}
	// Breaking in the middle of a batch: the frames before the bad chain
	// are received, the rest dropped.
	d := newNIC(t, false)
	for range 4 {
		deliver(d, frame(60, 0))
	}
	d.addRx(linuxRx)
	d.addRx(linuxRx)
	d.rx.Add(virtiotest.Buffer{GPA: bufBase, Len: 2000})
	d.rx.Notify()
	d.wantBroken(virtio.ErrUnexpectedReadable)
	if st := d.n.Stats(); st.RxPackets != 2 || st.RxDropReset != 2 || d.rx.UsedIdx() != 2 {
		t.Errorf("stats %+v, used %d", st, d.rx.UsedIdx())
	}
}

func TestResetDropsPending(t *testing.T) {
	d := newNIC(t, false)
	for range 7 {
		deliver(d, frame(60, 0))
	}
	d.drv.Write32(virtio.RegStatus, 0)
	if d.n.Pending() != 0 || d.n.Stats().RxDropReset != 7 {
		t.Errorf("pending %d, stats %+v", d.n.Pending(), d.n.Stats())
	}
	// Nothing pending reaches the new driver's buffers.
	qs := d.drv.Init(queueBase, 16, 16)
	d.rx = qs[0]
	d.addRx(linuxRx)
	d.rx.Notify()
	if _, _, ok := d.rx.NextUsed(); ok {
		t.Error("a frame from before the reset was received")
	}
}

func TestLink(t *testing.T) {
	d := newNIC(t, false)
	gen := d.drv.Read32(virtio.RegConfigGeneration)
	d.n.SetLink(false)
	if d.n.LinkUp() || d.drv.Read32(virtio.RegInterruptStatus) != virtio.InterruptConfigChange ||
		d.drv.Read32(virtio.RegConfigGeneration) == gen {
		t.Error("no configuration change for link down")
	}
	var st [2]byte
	d.mmio.ReadMMIO(virtio.RegConfig+6, st[:])
	if st != [2]byte{} {
		t.Errorf("status % x with link down", st)
	}
	d.ack()
	d.n.SetLink(false) // no change, no interrupt
	if d.line.Level {
		t.Error("interrupt without a change")
	}
	d.addRx(linuxRx)
	deliver(d, frame(60, 0))
	var h [hdr]byte
	head := d.send(h[:], frame(60, 0))
	if s := d.n.Stats(); s.RxDropInactive != 1 || s.TxDropLink != 1 || len(d.sent) != 0 {
		t.Errorf("link down: %+v", s)
	}
	if h, _, ok := d.tx.NextUsed(); !ok || h != head {
		t.Error("transmit chain not returned while link down")
	}
	d.n.SetLink(true)
	deliver(d, frame(60, 0))
	d.send(h[:], frame(60, 0))
	if s := d.n.Stats(); s.RxPackets != 1 || s.TxPackets != 1 {
		t.Errorf("link up again: %+v", s)
	}
	// Before activation the status changes silently.
	d2 := newNIC(t, true)
	d2.n.SetLink(false)
	if d2.line.Level {
		t.Error("interrupt from an inactive device")
	}
}

func TestSaveRestore(t *testing.T) {
	d := newNIC(t, false)
	var h [hdr]byte
	d.send(h[:], frame(60, 0))
	d.addRx(linuxRx)
	d.addRx(linuxRx)
	deliver(d, frame(60, 1))
	d.rx.NextUsed()
	d.n.SetLink(false)
	d.n.SetLink(true)
	d.n.SetLink(false)
	s := d.mmio.Save()
	sj := statetest.ThroughGobAndJSON(t, s)
	if !reflect.DeepEqual(s, sj) {
		t.Fatal("state changed through encoding")
	}
	// A fresh device with the same MAC takes over where the old one was.
	d2 := newNIC(t, true)
	copy(d2.mem.B, d.mem.B)
	if err := d2.mmio.Restore(sj); err != nil {
		t.Fatal(err)
	}
	d2.rx, d2.tx = d.rx, d.tx
	d2.rx.D, d2.tx.D = d2.drv, d2.drv
	if d2.n.LinkUp() {
		t.Error("link status not restored")
	}
	d2.n.SetLink(true)
	deliver(d2, frame(60, 2))
	if h, n, ok := d2.rx.NextUsed(); !ok || h != 1 || n != hdr+60 || !bytes.Equal(d2.gather(h, n)[hdr:], frame(60, 2)) {
		t.Errorf("after restore: used %d/%d %v", h, n, ok)
	}
	d2.send(h[:], frame(70, 3))
	if len(d2.sent) != 1 || !bytes.Equal(d2.sent[0], frame(70, 3)) {
		t.Errorf("after restore: sent %d", len(d2.sent))
	}
	d2.wantHealthy()

	// Refusals leave the device as it was.
	other, _ := vnet.New(stdnet.HardwareAddr{2, 0, 0, 0, 0, 1}, func(p buffer.Buffer) { p.Release() })
	m3 := virtio.NewMMIO(other, virtiotest.NewMemory(memSize), nil)
	if err := m3.Restore(s); err == nil {
		t.Error("restored onto a different MAC")
	} else {
		t.Log(err)
	}
	for _, bad := range []string{"", "{", `{"MAC": 5}`, `{"MAC": "nonsense"}`} {
		if err := d2.n.RestoreState([]byte(bad)); err == nil {
			t.Errorf("state %q accepted", bad)
		}
	}
	if !d2.n.LinkUp() {
		t.Error("refused restore changed the link status")
	}
	// Pending frames are not part of the state.
	deliver(d2, frame(60, 0))
	deliver(d2, frame(60, 0))
	if err := d2.n.RestoreState(d2.n.SaveState()); err != nil || d2.n.Pending() != 0 {
		t.Errorf("restore: %v, pending %d", err, d2.n.Pending())
	}
}

// TestStatsConcurrent reads the counters from another goroutine while the
// vCPU thread works: under -race this checks Stats is safe to monitor.
func TestStatsConcurrent(t *testing.T) {
	d := newNIC(t, false)
	var wg sync.WaitGroup
	stop := make(chan struct{})
	wg.Go(func() {
		for {
			select {
			case <-stop:
				return
			default:
				_ = d.n.Stats()
			}
		}
	})
	for i := range 500 {
		d.addRx(linuxRx)
		deliver(d, frame(60+i%100, byte(i)))
		d.rx.NextUsed()
	}
	close(stop)
	wg.Wait()
	if d.n.Stats().RxPackets != 500 {
		t.Errorf("stats %+v", d.n.Stats())
	}
}

// TestLoopback has emit hand each frame straight back to Deliver, and a
// receive chain that breaks the device in the middle of a transmit batch.
func TestLoopback(t *testing.T) {
	d := newNIC(t, false)
	d.n, _ = vnet.New(testMAC, func(p buffer.Buffer) { d.n.Deliver(p) })
	d.mmio = virtio.NewMMIO(d.n, d.mem, d.line.Set)
	d.drv.Regs = d.mmio
	qs := d.drv.Init(queueBase, 16, 16)
	d.rx, d.tx = qs[0], qs[1]
	var h [hdr]byte
	d.addRx(linuxRx)
	d.send(h[:], frame(60, 9))
	if head, n, ok := d.rx.NextUsed(); !ok || !bytes.Equal(d.gather(head, n)[hdr:], frame(60, 9)) {
		t.Fatal("looped frame not received")
	}
	d.rx.Add(virtiotest.Buffer{GPA: bufBase, Len: 100}) // readable: breaks the device
	for i := range 3 {
		copy(d.mem.B[txBase+uint64(i)*100:], append(make([]byte, hdr), frame(100-hdr, byte(i))...))
		d.tx.Add(virtiotest.Buffer{GPA: txBase + uint64(i)*100, Len: 100})
	}
	d.tx.Notify()
	d.wantBroken(virtio.ErrUnexpectedReadable)
	if st := d.n.Stats(); st.TxPackets != 2 || st.RxDropReset != 1 {
		t.Errorf("stats %+v", st)
	}
}
