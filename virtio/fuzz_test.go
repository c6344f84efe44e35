package virtio_test

import (
	"testing"

	"github.com/gokvm-ft/gokvm-ft/virtio"
	"github.com/gokvm-ft/gokvm-ft/virtio/virtiotest"
)

// Layout of FuzzChain's guest: 64 KiB of memory whose first bytes are the
// fuzz input, with the queue's descriptor table at 0 and its available ring
// right after it (fuzzQueue's layout), so the input is the driver's rings.
const fuzzMem = 64 << 10

// FuzzChain feeds arbitrary rings to the chain parser: every chain it
// accepts must lie inside guest memory, be no longer than the queue and no
// bigger than MaxChainBytes.
func FuzzChain(f *testing.F) {
	f.Add(uint8(4), []byte{})
	f.Fuzz(func(t *testing.T, sizeLog uint8, rings []byte) {
		size := uint16(1) << (sizeLog % 5) // 1..16, the test device's maximum
		mem := virtiotest.NewMemory(fuzzMem)
		dev := &netLike{}
		m := virtio.NewMMIO(dev, mem, nil)
		drv := &virtiotest.Driver{T: t, Regs: m, Mem: mem}
		drv.Negotiate(drv.DeviceFeatures())
		q := drv.SetupQueue(1, size, 0)
		drv.DriverOK()
		copy(mem.B[:q.Used], rings)
		vq := m.Queue(1)
		for range 2 * int(q.Size) {
			c, ok, err := vq.Pop()
			if err != nil || !ok {
				return
			}
			if c.Len() > int(q.Size) || c.Len() == 0 {
				t.Fatalf("chain of %d descriptors in a queue of %d", c.Len(), q.Size)
			}
			var total uint64
			for _, s := range append(c.Readable, c.Writable...) {
				if s.Len == 0 || s.GPA > fuzzMem || uint64(s.Len) > fuzzMem-s.GPA {
					t.Fatalf("segment %+v outside memory", s)
				}
				total += uint64(s.Len)
			}
			if total != c.ReadableLen+c.WritableLen || total > virtio.MaxChainBytes {
				t.Fatalf("chain of %d bytes (%d+%d)", total, c.ReadableLen, c.WritableLen)
			}
			if err := vq.Push(c.Head, 0); err != nil {
				t.Fatal(err)
			}
		}
	})
}
