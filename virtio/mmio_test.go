package virtio_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math/rand"
	"reflect"
	"testing"

	"github.com/gokvm-ft/gokvm-ft/internal/statetest"
	"github.com/gokvm-ft/gokvm-ft/virtio"
	"github.com/gokvm-ft/gokvm-ft/virtio/virtiotest"
)

func TestIdentification(t *testing.T) {
	r := newRig(t)
	for reg, want := range map[uint64]uint32{
		virtio.RegMagicValue: 0x74726976, virtio.RegVersion: 2,
		virtio.RegDeviceID: virtio.DeviceNet, virtio.RegVendorID: virtio.VendorID,
		virtio.RegSHMLenLow: 0xffffffff, virtio.RegSHMLenHigh: 0xffffffff,
	} {
		if got := r.drv.Read32(reg); got != want {
			t.Errorf("register %#x = %#x, want %#x", reg, got, want)
		}
	}
	if f := r.drv.DeviceFeatures(); f != virtio.FeatureVersion1|netFeatureMAC {
		t.Errorf("features %#x", f)
	}
	r.drv.Write32(virtio.RegDeviceFeaturesSel, 2)
	if f := r.drv.Read32(virtio.RegDeviceFeatures); f != 0 {
		t.Errorf("features word 2 = %#x", f)
	}
}

func TestRegisterWidths(t *testing.T) {
	r := newRig(t)
	for _, n := range []int{1, 2, 8} {
		b := bytes.Repeat([]byte{0xaa}, n)
		r.mmio.ReadMMIO(virtio.RegMagicValue, b)
		if !bytes.Equal(b, make([]byte, n)) {
			t.Errorf("%d-byte read of MagicValue = %x, want zero", n, b)
		}
	}
	b := make([]byte, 4)
	r.mmio.ReadMMIO(virtio.RegMagicValue+1, b) // unaligned
	if !bytes.Equal(b, make([]byte, 4)) {
		t.Errorf("unaligned read = %x", b)
	}
	r.mmio.WriteMMIO(virtio.RegStatus, []byte{virtio.StatusAcknowledge})
	r.mmio.WriteMMIO(virtio.RegStatus, []byte{1, 0, 0, 0, 0, 0, 0, 0})
	if s := r.drv.Read32(virtio.RegStatus); s != 0 {
		t.Errorf("status %#x after 1- and 8-byte writes, want 0", s)
	}

	// Config space: 1, 2 and 4-byte accesses; 8 bytes is ignored.
	r.dev.config = [8]byte{1, 2, 3, 4, 5, 6, 7, 8}
	for _, c := range []struct {
		off  uint64
		n    int
		want []byte
	}{
		{0, 1, []byte{1}}, {1, 2, []byte{2, 3}}, {4, 4, []byte{5, 6, 7, 8}},
		{0, 8, make([]byte, 8)}, {0, 3, make([]byte, 3)}, {6, 4, []byte{7, 8, 0, 0}},
	} {
		b := bytes.Repeat([]byte{0xaa}, c.n)
		r.mmio.ReadMMIO(virtio.RegConfig+c.off, b)
		if !bytes.Equal(b, c.want) {
			t.Errorf("config read %d bytes at %d = %x, want %x", c.n, c.off, b, c.want)
		}
	}
	r.mmio.WriteMMIO(virtio.RegConfig+2, []byte{0xee, 0xff})
	r.mmio.WriteMMIO(virtio.RegConfig, bytes.Repeat([]byte{0x11}, 8))
	if want := [8]byte{1, 2, 0xee, 0xff, 5, 6, 7, 8}; r.dev.config != want {
		t.Errorf("config after writes %x, want %x", r.dev.config, want)
	}
}

func TestFeatureNegotiation(t *testing.T) {
	for _, c := range []struct {
		name     string
		features uint64
		ok       bool
	}{
		{"all offered", virtio.FeatureVersion1 | netFeatureMAC, true},
		{"version 1 only", virtio.FeatureVersion1, true},
		{"no VERSION_1", netFeatureMAC, false},
		{"not offered", virtio.FeatureVersion1 | 1<<3, false},
		{"not offered high", virtio.FeatureVersion1 | 1<<40, false},
	} {
		r := newRig(t)
		if ok := r.drv.Negotiate(c.features); ok != c.ok {
			t.Errorf("%s: FEATURES_OK kept = %v, want %v", c.name, ok, c.ok)
		}
		if !c.ok {
			continue
		}
		// Features are fixed once FEATURES_OK is set.
		r.drv.Write32(virtio.RegDriverFeaturesSel, 0)
		r.drv.Write32(virtio.RegDriverFeatures, 0xffffffff)
		r.drv.SetupQueue(0, 16, 0x10000)
		r.drv.SetupQueue(1, 16, 0x20000)
		r.drv.DriverOK()
		if r.dev.t == nil || r.dev.features != c.features {
			t.Errorf("%s: activated %v with features %#x", c.name, r.dev.t != nil, r.dev.features)
		}
	}
}

func TestDriverOKWithoutFeaturesOK(t *testing.T) {
	r := newRig(t)
	r.drv.Write32(virtio.RegStatus, virtio.StatusAcknowledge|virtio.StatusDriver)
	r.drv.Write32(virtio.RegStatus, virtio.StatusAcknowledge|virtio.StatusDriver|virtio.StatusDriverOK)
	if r.dev.t != nil {
		t.Error("device activated without FEATURES_OK")
	}
	if r.mmio.Broken() == nil || r.drv.Read32(virtio.RegStatus)&virtio.StatusDeviceNeedsReset == 0 {
		t.Error("device not broken")
	}
	if !r.line.Level || r.drv.Read32(virtio.RegInterruptStatus) != virtio.InterruptConfigChange {
		t.Error("no config change interrupt")
	}
}

func TestStatusBitsStick(t *testing.T) {
	r := newRig(t)
	r.drv.Write32(virtio.RegStatus, virtio.StatusAcknowledge|virtio.StatusDriver)
	r.drv.Write32(virtio.RegStatus, virtio.StatusAcknowledge|virtio.StatusDeviceNeedsReset)
	if s := r.drv.Read32(virtio.RegStatus); s != virtio.StatusAcknowledge|virtio.StatusDriver {
		t.Errorf("status %#x: the driver cleared a bit or set NEEDS_RESET", s)
	}
}

func TestReset(t *testing.T) {
	r, qs := initRig(t)
	qs[1].Add(virtiotest.Buffer{GPA: 0x80000, Len: 10})
	qs[1].Notify()
	if !r.line.Level {
		t.Fatal("no interrupt")
	}
	r.drv.Write32(virtio.RegQueueSel, 1)
	resets := r.dev.resets
	r.drv.Write32(virtio.RegStatus, 0)
	if r.dev.resets != resets+1 || r.dev.t != nil {
		t.Error("device not reset")
	}
	if r.line.Level {
		t.Error("line still high after reset")
	}
	for reg, want := range map[uint64]uint32{
		virtio.RegStatus: 0, virtio.RegInterruptStatus: 0, virtio.RegQueueReady: 0,
		virtio.RegQueueNumMax: 16,
	} {
		if got := r.drv.Read32(reg); got != want {
			t.Errorf("after reset register %#x = %#x, want %#x", reg, got, want)
		}
	}
	if q := r.mmio.Queue(1); q.Ready() || q.Size() != 16 {
		t.Errorf("queue after reset: ready %v size %d", q.Ready(), q.Size())
	}
	// The device works again after a fresh initialisation.
	qs = r.drv.Init(0x10000, 16, 16)
	qs[1].Add(virtiotest.Buffer{GPA: 0x80000, Len: 3})
	qs[1].Notify()
	if len(r.dev.sent) != 2 {
		t.Errorf("sent %d packets", len(r.dev.sent))
	}
}

func TestQueueRegistersLockedWhenReady(t *testing.T) {
	r, _ := initRig(t)
	r.drv.Write32(virtio.RegQueueSel, 0)
	before := r.mmio.Save()
	for _, reg := range []uint64{virtio.RegQueueNum, virtio.RegQueueDescLow, virtio.RegQueueDescHigh,
		virtio.RegQueueDriverLow, virtio.RegQueueDriverHigh, virtio.RegQueueDeviceLow, virtio.RegQueueDeviceHigh} {
		r.drv.Write32(reg, 0x1000)
	}
	if !reflect.DeepEqual(r.mmio.Save(), before) {
		t.Error("queue registers changed while ready")
	}
	// Disabled again, but after DRIVER_OK: still locked.
	r.drv.Write32(virtio.RegQueueReady, 0)
	if r.drv.Read32(virtio.RegQueueReady) != 0 {
		t.Fatal("queue still ready")
	}
	r.drv.Write32(virtio.RegQueueNum, 4)
	if r.mmio.Queue(0).Size() != 16 {
		t.Error("QueueNum written after DRIVER_OK")
	}
	r.drv.Write32(virtio.RegQueueReady, 1)
	if r.mmio.Queue(0).Ready() {
		t.Error("queue enabled after DRIVER_OK")
	}
}

func TestQueueSetupRefused(t *testing.T) {
	for _, c := range []struct {
		name              string
		size              uint32
		desc, avail, used uint64
		want              error
	}{
		{"size not power of two", 12, 0x1000, 0x2000, 0x3000, virtio.ErrQueueSize},
		{"size zero", 0, 0x1000, 0x2000, 0x3000, virtio.ErrQueueSize},
		{"size over max", 32, 0x1000, 0x2000, 0x3000, virtio.ErrQueueSize},
		{"size over 16 bits", 0x10010, 0x1000, 0x2000, 0x3000, virtio.ErrQueueSize},
		{"desc misaligned", 16, 0x1008, 0x2000, 0x3000, virtio.ErrRingMisaligned},
		{"avail misaligned", 16, 0x1000, 0x2001, 0x3000, virtio.ErrRingMisaligned},
		{"used misaligned", 16, 0x1000, 0x2000, 0x3002, virtio.ErrRingMisaligned},
		{"desc outside", 16, memSize - 0x80, 0x2000, 0x3000, virtio.ErrRingOutOfMemory},
		{"avail outside", 16, 0x1000, memSize - 36, 0x3000, virtio.ErrRingOutOfMemory},
		{"used outside", 16, 0x1000, 0x2000, memSize - 132, virtio.ErrRingOutOfMemory},
		{"used wraps", 16, 0x1000, 0x2000, 1<<64 - 4, virtio.ErrRingOutOfMemory},
	} {
		r := newRig(t)
		r.drv.Negotiate(r.drv.DeviceFeatures())
		r.drv.Write32(virtio.RegQueueSel, 0)
		r.drv.Write32(virtio.RegQueueNum, c.size)
		for _, w := range []struct {
			reg uint64
			v   uint64
		}{{virtio.RegQueueDescLow, c.desc}, {virtio.RegQueueDriverLow, c.avail}, {virtio.RegQueueDeviceLow, c.used}} {
			r.drv.Write32(w.reg, uint32(w.v))
			r.drv.Write32(w.reg+4, uint32(w.v>>32))
		}
		r.drv.Write32(virtio.RegQueueReady, 1)
		if r.drv.Read32(virtio.RegQueueReady) != 0 {
			t.Errorf("%s: queue enabled", c.name)
		}
		if err := r.mmio.Broken(); !errors.Is(err, c.want) {
			t.Errorf("%s: broken with %v, want %v", c.name, err, c.want)
		}
		r.drv.DriverOK()
		if r.dev.t != nil || !r.line.Level {
			t.Errorf("%s: broken device activated or silent", c.name)
		}
	}
}

func TestInterruptStatusAndLine(t *testing.T) {
	r, qs := initRig(t)
	qs[1].Add(virtiotest.Buffer{GPA: 0x80000, Len: 4})
	qs[1].Notify()
	if got := r.drv.Read32(virtio.RegInterruptStatus); got != virtio.InterruptUsedBuffer || !r.line.Level {
		t.Fatalf("interrupt status %#x line %v", got, r.line.Level)
	}
	r.mmio.SignalConfigChange()
	if got := r.drv.Read32(virtio.RegInterruptStatus); got != 3 || r.line.Rises != 1 {
		t.Fatalf("interrupt status %#x, rises %d", got, r.line.Rises)
	}
	if r.drv.Read32(virtio.RegConfigGeneration) != 1 {
		t.Error("config generation not bumped")
	}
	r.drv.Write32(virtio.RegInterruptACK, virtio.InterruptUsedBuffer)
	if !r.line.Level {
		t.Error("line dropped with config change pending")
	}
	r.drv.Write32(virtio.RegInterruptACK, virtio.InterruptConfigChange)
	if r.line.Level || r.drv.Read32(virtio.RegInterruptStatus) != 0 {
		t.Error("line high after ack")
	}

	// VIRTQ_AVAIL_F_NO_INTERRUPT suppresses the used-buffer interrupt.
	qs[1].SetNoInterrupt(true)
	qs[1].Add(virtiotest.Buffer{GPA: 0x80000, Len: 4})
	qs[1].Notify()
	if len(r.dev.sent) != 2 || r.line.Level {
		t.Errorf("sent %d, line %v with interrupts suppressed", len(r.dev.sent), r.line.Level)
	}
	if _, _, ok := qs[1].NextUsed(); !ok {
		t.Error("nothing used")
	}
}

func TestNotifyIgnored(t *testing.T) {
	r := newRig(t)
	r.drv.Negotiate(r.drv.DeviceFeatures())
	q := r.drv.SetupQueue(1, 16, 0x10000)
	q.Add(virtiotest.Buffer{GPA: 0x80000, Len: 4})
	q.Notify() // before DRIVER_OK
	r.drv.Write32(virtio.RegQueueNotify, 7)
	if len(r.dev.sent) != 0 {
		t.Error("notify served before DRIVER_OK")
	}
	r.drv.DriverOK()
	r.drv.Write32(virtio.RegQueueNotify, 0) // queue 0 not set up
	r.drv.Write32(virtio.RegQueueNotify, 99)
	q.Notify()
	if len(r.dev.sent) != 1 {
		t.Errorf("sent %d", len(r.dev.sent))
	}
}

func TestTransmitAndReceive(t *testing.T) {
	r, qs := initRig(t)
	copy(r.mem.B[0x80000:], "hello, ")
	copy(r.mem.B[0x81000:], "world")
	head := qs[1].Add(virtiotest.Buffer{GPA: 0x80000, Len: 7}, virtiotest.Buffer{GPA: 0x81000, Len: 5})
	qs[1].Notify()
	if len(r.dev.sent) != 1 || string(r.dev.sent[0]) != "hello, world" {
		t.Fatalf("sent %q", r.dev.sent)
	}
	if h, n, ok := qs[1].NextUsed(); !ok || h != head || n != 0 {
		t.Errorf("used %d %d %v", h, n, ok)
	}

	// Receive outside any notify exit, as the machine delivers a packet.
	if r.dev.Receive([]byte("early")) {
		t.Error("received without a buffer")
	}
	r.drv.Write32(virtio.RegInterruptACK, 3)
	head = qs[0].Add(virtiotest.Buffer{GPA: 0x90000, Len: 4, Writable: true}, virtiotest.Buffer{GPA: 0x91000, Len: 100, Writable: true})
	clear(r.mem.Dirty)
	if !r.dev.Receive([]byte("packet data")) {
		t.Fatal("not received")
	}
	if got := string(r.mem.B[0x90000:0x90004]) + string(r.mem.B[0x91000:0x91007]); got != "packet data" {
		t.Errorf("guest got %q", got)
	}
	if h, n, ok := qs[0].NextUsed(); !ok || h != head || n != 11 {
		t.Errorf("used %d %d %v", h, n, ok)
	}
	if !r.line.Level || r.drv.Read32(virtio.RegInterruptStatus) != virtio.InterruptUsedBuffer {
		t.Error("no interrupt for the received packet")
	}
	for _, p := range []uint64{0x90, 0x91, uint64(qs[0].Used) / virtiotest.PageSize} {
		if !r.mem.Dirty[p] {
			t.Errorf("page %#x not marked dirty", p)
		}
	}
}

func TestWrongDirectionBreaksDevice(t *testing.T) {
	r, qs := initRig(t)
	qs[0].Add(virtiotest.Buffer{GPA: 0x90000, Len: 4}) // readable on RX
	r.dev.Receive([]byte("x"))
	if !errors.Is(r.mmio.Broken(), virtio.ErrUnexpectedReadable) {
		t.Errorf("broken with %v", r.mmio.Broken())
	}
	r2, qs2 := initRig(t)
	qs2[1].Add(virtiotest.Buffer{GPA: 0x90000, Len: 4, Writable: true}) // writable on TX
	qs2[1].Notify()
	if !errors.Is(r2.mmio.Broken(), virtio.ErrUnexpectedWritable) {
		t.Errorf("broken with %v", r2.mmio.Broken())
	}
	// Broken: queues halt, config change raised, notifies ignored until reset.
	if r2.drv.Read32(virtio.RegStatus)&virtio.StatusDeviceNeedsReset == 0 ||
		r2.drv.Read32(virtio.RegInterruptStatus)&virtio.InterruptConfigChange == 0 || !r2.line.Level {
		t.Error("broken device not reported")
	}
	qs2[1].Add(virtiotest.Buffer{GPA: 0x90000, Len: 4})
	qs2[1].Notify()
	if _, ok, err := r2.mmio.Queue(1).Pop(); ok || err != nil || len(r2.dev.sent) != 0 {
		t.Error("broken device still processes its queue")
	}
	r2.drv.Write32(virtio.RegStatus, 0)
	if r2.mmio.Broken() != nil || r2.drv.Read32(virtio.RegStatus) != 0 {
		t.Error("reset did not clear the broken state")
	}
}

// exercise runs a little traffic on both queues and returns what the
// driver saw.
func exercise(r *rig, qs []*virtiotest.DriverQueue, seed int64) []byte {
	rng := rand.New(rand.NewSource(seed))
	var log []byte
	for range 20 {
		switch rng.Intn(3) {
		case 0:
			qs[1].Add(virtiotest.Buffer{GPA: 0x80000 + uint64(rng.Intn(100)), Len: uint32(1 + rng.Intn(50))})
			qs[1].Notify()
		case 1:
			qs[0].Add(virtiotest.Buffer{GPA: 0x90000, Len: uint32(1 + rng.Intn(50)), Writable: true})
		case 2:
			r.dev.Receive([]byte{byte(rng.Intn(256)), 1, 2})
		}
		for _, q := range qs {
			for {
				h, n, ok := q.NextUsed()
				if !ok {
					break
				}
				log = binary.LittleEndian.AppendUint32(append(log, byte(h)), n)
			}
		}
		log = append(log, byte(r.drv.Read32(virtio.RegInterruptStatus)))
		r.drv.Write32(virtio.RegInterruptACK, 3)
	}
	return append(log, r.mem.B[0x90000:0x90040]...)
}

func TestSaveRestoreRoundTrip(t *testing.T) {
	for seed := range int64(10) {
		a, qa := initRig(t)
		exercise(a, qa, seed)
		a.drv.Write32(virtio.RegQueueSel, 1)
		a.drv.Write32(virtio.RegDeviceFeaturesSel, 1)
		if seed%2 == 0 {
			a.mmio.SignalConfigChange() // leave an interrupt pending
		}
		s := a.mmio.Save()
		sj := statetest.ThroughGobAndJSON(t, s)
		if !reflect.DeepEqual(s, sj) {
			t.Fatalf("seed %d: state changed through encoding:\n%+v\n%+v", seed, s, sj)
		}

		b := newRig(t)
		copy(b.mem.B, a.mem.B)
		if err := b.mmio.Restore(sj); err != nil {
			t.Fatalf("seed %d: %v", seed, err)
		}
		if !reflect.DeepEqual(b.mmio.Save(), s) {
			t.Fatalf("seed %d: restored state differs", seed)
		}
		if b.line.Level != a.line.Level || b.dev.t == nil || b.dev.features != a.dev.features {
			t.Fatalf("seed %d: line %v/%v, activated %v", seed, b.line.Level, a.line.Level, b.dev.t != nil)
		}
		// The driver's side of the rings moves over with a copy of its queues.
		qb := []*virtiotest.DriverQueue{cloneQueue(qa[0], b.drv), cloneQueue(qa[1], b.drv)}
		la, lb := exercise(a, qa, seed+100), exercise(b, qb, seed+100)
		if !bytes.Equal(la, lb) {
			t.Fatalf("seed %d: behaviour differs after restore", seed)
		}
	}
}

func cloneQueue(q *virtiotest.DriverQueue, d *virtiotest.Driver) *virtiotest.DriverQueue {
	c := *q
	c.D = d
	return &c
}

func TestRestoreRejects(t *testing.T) {
	a, qa := initRig(t)
	exercise(a, qa, 1)
	base := a.mmio.Save()
	bad := map[string]func(*virtio.MMIOState){
		"device type":        func(s *virtio.MMIOState) { s.DeviceType = virtio.DeviceBlock },
		"status bits":        func(s *virtio.MMIOState) { s.Status |= 0x20 },
		"interrupt bits":     func(s *virtio.MMIOState) { s.InterruptStatus = 4 },
		"queue count":        func(s *virtio.MMIOState) { s.Queues = s.Queues[:1] },
		"size not pow2":      func(s *virtio.MMIOState) { s.Queues[0].Size = 12 },
		"size zero":          func(s *virtio.MMIOState) { s.Queues[1].Size = 0 },
		"size 0x8000":        func(s *virtio.MMIOState) { s.Queues[0].Size = 0x8000 },
		"size over max":      func(s *virtio.MMIOState) { s.Queues[0].Size = 32 },
		"ring outside":       func(s *virtio.MMIOState) { s.Queues[0].Desc = memSize },
		"ring misaligned":    func(s *virtio.MMIOState) { s.Queues[1].Device += 2 },
		"in flight":          func(s *virtio.MMIOState) { s.Queues[1].NextAvail = s.Queues[1].NextUsed + 17 },
		"features unoffered": func(s *virtio.MMIOState) { s.DriverFeatures |= 1 << 3 },
		"no VERSION_1":       func(s *virtio.MMIOState) { s.DriverFeatures &^= virtio.FeatureVersion1 },
		"DRIVER_OK alone":    func(s *virtio.MMIOState) { s.Status &^= virtio.StatusFeaturesOK },
		"device state":       func(s *virtio.MMIOState) { s.Device = nil },
	}
	for name, f := range bad {
		s := base
		s.Queues = append([]virtio.QueueState(nil), base.Queues...)
		f(&s)
		b, _ := initRig(t)
		before := b.mmio.Save()
		if err := b.mmio.Restore(s); err == nil {
			t.Errorf("%s: bad state accepted", name)
		} else {
			t.Logf("%s: %v", name, err)
		}
		if !reflect.DeepEqual(b.mmio.Save(), before) {
			t.Errorf("%s: failed restore changed the transport", name)
		}
	}
	// A broken device restores broken, with its queues halted.
	s := base
	s.Status |= virtio.StatusDeviceNeedsReset
	s.Queues = append([]virtio.QueueState(nil), base.Queues...)
	b := newRig(t)
	if err := b.mmio.Restore(s); err != nil {
		t.Fatal(err)
	}
	if b.mmio.Broken() == nil || b.dev.t != nil || b.mmio.Queue(0).Ready() {
		t.Error("broken state not restored")
	}
}

// TestHostileDriver throws random register writes and random ring contents
// at the transport: nothing may panic, and whatever state results must be
// restorable.
func TestHostileDriver(t *testing.T) {
	regs := []uint64{virtio.RegDeviceFeaturesSel, virtio.RegDriverFeatures, virtio.RegDriverFeaturesSel,
		virtio.RegQueueSel, virtio.RegQueueNum, virtio.RegQueueReady, virtio.RegQueueNotify,
		virtio.RegInterruptACK, virtio.RegStatus, virtio.RegQueueDescLow, virtio.RegQueueDescHigh,
		virtio.RegQueueDriverLow, virtio.RegQueueDriverHigh, virtio.RegQueueDeviceLow, virtio.RegQueueDeviceHigh}
	for seed := range int64(50) {
		rng := rand.New(rand.NewSource(seed))
		r, qs := initRig(t)
		for range 2000 {
			switch rng.Intn(10) {
			case 0:
				// Garbage into the rings of both queues.
				for _, q := range qs {
					b := r.mem.B[q.Desc : q.Used+6+8*16]
					for range 8 {
						b[rng.Intn(len(b))] = byte(rng.Intn(256))
					}
				}
			case 1:
				// Plausible descriptors with random fields.
				q := qs[rng.Intn(2)]
				q.WriteDesc(uint16(rng.Intn(16)), uint64(rng.Intn(2*memSize)), uint32(rng.Intn(1<<rng.Intn(32))), uint16(rng.Intn(8)), uint16(rng.Intn(20)))
				q.Publish(uint16(rng.Intn(18)))
			case 2:
				qs[rng.Intn(2)].Notify()
			case 3:
				r.dev.Receive(make([]byte, rng.Intn(200)))
			case 4:
				r.drv.Write32(regs[rng.Intn(len(regs))], rng.Uint32()&(1<<rng.Intn(33)-1))
			case 5:
				b := make([]byte, 1+rng.Intn(8))
				r.mmio.ReadMMIO(uint64(rng.Intn(0x200)), b)
			case 6:
				b := make([]byte, 1+rng.Intn(8))
				rng.Read(b)
				r.mmio.WriteMMIO(uint64(rng.Intn(0x200)), b)
			case 7:
				if rng.Intn(20) == 0 {
					qs = r.drv.Init(0x10000, 16, 16)
				}
			default:
				qs[rng.Intn(2)].Add(virtiotest.Buffer{GPA: uint64(rng.Intn(memSize)), Len: uint32(1 + rng.Intn(64)), Writable: rng.Intn(2) == 0})
			}
		}
		s := r.mmio.Save()
		b := newRig(t)
		copy(b.mem.B, r.mem.B)
		if err := b.mmio.Restore(s); err != nil {
			t.Fatalf("seed %d: saved state does not restore: %v", seed, err)
		}
	}
}
