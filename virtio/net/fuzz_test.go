package net_test

import (
	"testing"

	"gvisor.dev/gvisor/pkg/buffer"

	"github.com/gokvm-ft/gokvm-ft/virtio"
	vnet "github.com/gokvm-ft/gokvm-ft/virtio/net"
	"github.com/gokvm-ft/gokvm-ft/virtio/virtiotest"
)

// FuzzRings hands the device arbitrary receive and transmit rings (the
// descriptor tables and available rings are the fuzz input) and arbitrary
// frames to receive. It must never panic, emit only frames of legal size,
// and hold no frames once broken.
func FuzzRings(f *testing.F) {
	f.Add([]byte{}, []byte{}, uint16(60), uint8(3))
	f.Add(make([]byte, 512), make([]byte, 512), uint16(1518), uint8(1))
	f.Fuzz(func(t *testing.T, rxRing, txRing []byte, frameLen uint16, frames uint8) {
		const size = 16
		mem := virtiotest.NewMemory(256 << 10)
		var sent int
		n, err := vnet.New(testMAC, func(p buffer.Buffer) {
			if s := p.Size(); s < vnet.EthHeader || s > vnet.MaxTxFrame {
				t.Errorf("emitted a frame of %d bytes", s)
			}
			sent++
			p.Release()
		})
		if err != nil {
			t.Fatal(err)
		}
		m := virtio.NewMMIO(n, mem, nil)
		drv := &virtiotest.Driver{T: t, Regs: m, Mem: mem}
		qs := drv.Init(0, size, size) // receiveq at 0, transmitq at 64 KiB
		rx, tx := qs[0], qs[1]
		copy(mem.B[rx.Desc:rx.Used], rxRing)
		copy(mem.B[tx.Desc:tx.Used], txRing)
		tx.Notify()
		for i := range int(frames % 8) {
			n.Deliver(buffer.MakeWithData(make([]byte, int(frameLen)+i)))
		}
		rx.Notify()
		if m.Broken() != nil && n.Pending() != 0 {
			t.Errorf("broken (%v) with %d frames pending", m.Broken(), n.Pending())
		}
		st := n.Stats()
		if st.TxPackets != uint64(sent) {
			t.Errorf("stats %+v, emitted %d", st, sent)
		}
	})
}
