package machine_test

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/buffer"

	"github.com/gokvm-ft/gokvm-ft/internal/tinyguest"
	"github.com/gokvm-ft/gokvm-ft/machine"
	"github.com/gokvm-ft/gokvm-ft/virtio"
	"github.com/gokvm-ft/gokvm-ft/virtio/blk"
	vnet "github.com/gokvm-ft/gokvm-ft/virtio/net"
)

// Rings and buffers of the virtio tiny guests, inside their 2 MiB of RAM.
const (
	vqDesc   = 0x100000
	vqAvail  = 0x101000
	vqUsed   = 0x102000
	vqBufs   = 0x103000
	irqCount = 0x90008
)

// virtioDriverSetup is a CPL3 driver for the device at MMIOBase (in %rbx):
// reset, ACKNOWLEDGE|DRIVER, VERSION_1 only, FEATURES_OK, queue 0 of 8
// entries at vqDesc/vqAvail/vqUsed, DRIVER_OK. It exits with 0xbad if the
// device refuses FEATURES_OK.
var virtioDriverSetup = `
	mov $0xd0000000, %rbx
	movl $0, 0x70(%rbx)
	movl $3, 0x70(%rbx)
	movl $1, 0x24(%rbx); movl $1, 0x20(%rbx)
	movl $0, 0x24(%rbx); movl $0, 0x20(%rbx)
	movl $0xb, 0x70(%rbx)
	mov 0x70(%rbx), %eax
	test $8, %eax
	jnz 1f
	mov $0xbad, %eax
` + exitWithEAX + `
1:	movl $0, 0x30(%rbx)
	movl $8, 0x38(%rbx)
	movl $0x100000, 0x80(%rbx); movl $0, 0x84(%rbx)
	movl $0x101000, 0x90(%rbx); movl $0, 0x94(%rbx)
	movl $0x102000, 0xa0(%rbx); movl $0, 0xa4(%rbx)
	movl $1, 0x44(%rbx)
	movl $0xf, 0x70(%rbx)
`

// virtioIRQ5 unmasks only IRQ5 (and the cascade) at the PIC; its handler
// (vector 0x25) acknowledges the device's interrupt status and counts.
var virtioIRQ5 = tinyguest.PICInit(0xdb)

const virtioHandler = `
vec_37:
	push %rax
	push %rbx
	mov $0xd0000000, %rbx
	mov 0x60(%rbx), %eax
	mov %eax, 0x64(%rbx)
	incq 0x90008
	mov $0x20, %al
	out %al, $0x20
	pop %rbx
	pop %rax
	iretq
`

type desc struct {
	addr  uint64
	len   uint32
	flags uint16
	next  uint16
}

func writeDescs(t *testing.T, m *machine.Machine, first int, ds ...desc) {
	t.Helper()
	for i, d := range ds {
		var b [16]byte
		binary.LittleEndian.PutUint64(b[0:], d.addr)
		binary.LittleEndian.PutUint32(b[8:], d.len)
		binary.LittleEndian.PutUint16(b[12:], d.flags)
		binary.LittleEndian.PutUint16(b[14:], d.next)
		if err := m.Memory().WriteAt(b[:], vqDesc+uint64(first+i)*16); err != nil {
			t.Fatal(err)
		}
	}
}

func writeAvailRing(t *testing.T, m *machine.Machine, heads ...uint16) {
	t.Helper()
	for i, h := range heads {
		var b [2]byte
		binary.LittleEndian.PutUint16(b[:], h)
		if err := m.Memory().WriteAt(b[:], vqAvail+4+uint64(i)*2); err != nil {
			t.Fatal(err)
		}
	}
}

func blkHeader(typ uint32, sector uint64) []byte {
	b := make([]byte, 16)
	binary.LittleEndian.PutUint32(b, typ)
	binary.LittleEndian.PutUint64(b[8:], sector)
	return b
}

func newDisk(t *testing.T, size int) (*blk.Blk, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(path, make([]byte, size), 0o644); err != nil {
		t.Fatal(err)
	}
	d, err := blk.New(path, false)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d, path
}

// TestVirtioBlkGuest: a tiny guest drives a virtio-blk disk through the
// MMIO transport, a write then a read of sector 2, each completed inside
// the notify exit and announced by IRQ5.
func TestVirtioBlkGuest(t *testing.T) {
	g := newGuest(t, `
_start:
`+virtioIRQ5+toUser+`
user:
`+virtioDriverSetup+`
	movw $1, 0x101002
	movl $0, 0x50(%rbx)
1:	cmpq $1, 0x90008
	jb 1b
	movw $2, 0x101002
	movl $0, 0x50(%rbx)
2:	cmpq $2, 0x90008
	jb 2b
	mov 0x70(%rbx), %eax
`+exitWithEAX+virtioHandler, machine.Config{}, tinyguest.Options{Kernel: true})
	disk, path := newDisk(t, 8*512)
	slot, err := g.m.AddVirtio("disk", disk)
	if err != nil {
		t.Fatal(err)
	}
	if slot.Base != machine.MMIOBase || slot.IRQ != 5 {
		t.Fatalf("slot at %#x irq %d", slot.Base, slot.IRQ)
	}
	if got := g.m.KernelCmdline(""); !strings.Contains(got, "virtio_mmio.device=512@0xd0000000:5") {
		t.Errorf("command line %q does not declare the device", got)
	}
	payload := bytes.Repeat([]byte("gokvm-ft"), 64)
	mem := g.m.Memory()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	const hdrOut, data, statOut, hdrIn, dataIn, statIn = vqBufs, vqBufs + 0x1000, vqBufs + 0x2000, vqBufs + 0x3000, vqBufs + 0x4000, vqBufs + 0x5000
	must(mem.WriteAt(blkHeader(1, 2), hdrOut))
	must(mem.WriteAt(payload, data))
	must(mem.WriteAt(blkHeader(0, 2), hdrIn))
	must(mem.WriteAt([]byte{0xff}, statOut))
	must(mem.WriteAt([]byte{0xff}, statIn))
	writeDescs(t, g.m, 0,
		desc{hdrOut, 16, 1, 1}, desc{data, 512, 1, 2}, desc{statOut, 1, 2, 0},
		desc{hdrIn, 16, 1, 4}, desc{dataIn, 512, 3, 5}, desc{statIn, 1, 2, 0})
	writeAvailRing(t, g.m, 0, 3)
	dirty, err := g.m.NewDirtySet()
	must(err)

	g.wantExit(10*time.Second, 0xf) // ACK|DRIVER|FEATURES_OK|DRIVER_OK, not broken
	onDisk, err := os.ReadFile(path)
	must(err)
	if !bytes.Equal(onDisk[1024:1536], payload) {
		t.Errorf("sector 2 on disk = %q...", onDisk[1024:1040])
	}
	got := make([]byte, 512)
	must(mem.ReadAt(got, dataIn))
	if !bytes.Equal(got, payload) {
		t.Errorf("read back %q...", got[:16])
	}
	st := make([]byte, 1)
	for _, a := range []uint64{statOut, statIn} {
		must(mem.ReadAt(st, a))
		if st[0] != 0 {
			t.Errorf("status byte at %#x = %d, want VIRTIO_BLK_S_OK", a, st[0])
		}
	}
	used := make([]byte, 4+2*8)
	must(mem.ReadAt(used, vqUsed))
	if idx := binary.LittleEndian.Uint16(used[2:]); idx != 2 {
		t.Errorf("used idx %d, want 2", idx)
	}
	if id, n := binary.LittleEndian.Uint32(used[4+8:]), binary.LittleEndian.Uint32(used[4+8+4:]); id != 3 || n != 513 {
		t.Errorf("second used element (%d, %d), want (3, 513)", id, n)
	}
	if n := g.read64(irqCount); n != 2 {
		t.Errorf("%d interrupts, want 2", n)
	}
	// The device's writes (read data, status bytes, used ring) went through
	// the memory accessor: they are in the machine's dirty set.
	bitmap, err := dirty.Take()
	must(err)
	for _, a := range []uint64{dataIn, statIn, vqUsed} {
		if p := a / machine.PageSize; bitmap[p/64]&(1<<(p%64)) == 0 {
			t.Errorf("page %#x written by the device is not dirty", a)
		}
	}
}

// TestVirtioHostileGuest: chains that loop, leave guest memory, point into
// the device's own registers or claim huge lengths break the device (the
// guest sees DEVICE_NEEDS_RESET), never the VMM; after a reset the same
// device serves a good request.
func TestVirtioHostileGuest(t *testing.T) {
	const data, stat = vqBufs + 0x1000, vqBufs + 0x2000
	for _, tc := range []struct {
		name  string
		descs []desc
	}{
		{"loop", []desc{{vqBufs, 16, 1, 1}, {data, 512, 3, 0}}},
		{"outside RAM", []desc{{vqBufs, 16, 1, 1}, {3 << 30, 512, 3, 2}, {stat, 1, 2, 0}}},
		{"at the device registers", []desc{{vqBufs, 16, 1, 1}, {machine.MMIOBase, 512, 3, 2}, {stat, 1, 2, 0}}},
		{"huge length", []desc{{vqBufs, 16, 1, 1}, {data, 0xffffffff, 3, 2}, {stat, 1, 2, 0}}},
		{"wrapping address", []desc{{vqBufs, 16, 1, 1}, {^uint64(0) - 8, 512, 3, 2}, {stat, 1, 2, 0}}},
		{"next out of range", []desc{{vqBufs, 16, 1, 200}}},
		{"no status byte", []desc{{vqBufs, 16, 0, 0}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := newGuest(t, `
_start:
`+virtioIRQ5+toUser+`
user:
`+virtioDriverSetup+`
	movw $1, 0x101002
	movl $0, 0x50(%rbx)
	mov 0x70(%rbx), %eax
	test $0x40, %eax       /* DEVICE_NEEDS_RESET? */
	jnz 1f
	or $0x1000, %eax
`+exitWithEAX+`
1:
`+virtioDriverSetup+`
	movw $1, 0x101002
	movl $0, 0x50(%rbx)
2:	cmpq $1, 0x90008
	jb 2b
	movzbl 0x105000, %eax   /* the good request's status byte */
`+exitWithEAX+virtioHandler, machine.Config{}, tinyguest.Options{Kernel: true})
			disk, _ := newDisk(t, 8*512)
			if _, err := g.m.AddVirtio("disk", disk); err != nil {
				t.Fatal(err)
			}
			mem := g.m.Memory()
			if err := mem.WriteAt(blkHeader(0, 1), vqBufs); err != nil {
				t.Fatal(err)
			}
			writeDescs(t, g.m, 0, tc.descs...)
			writeAvailRing(t, g.m, 0)
			// The guest then resets the device and sets it up again with
			// the same rings, whose indices restart at 0: the good request
			// is the chain at head 4, placed in ring slot 0 once the reset
			// is seen (OnExit below).
			writeDescs(t, g.m, 4, desc{vqBufs + 0x3000, 16, 1, 5}, desc{vqBufs + 0x4000, 512, 3, 6}, desc{vqBufs + 0x5000, 1, 2, 0})
			if err := mem.WriteAt(blkHeader(0, 1), vqBufs+0x3000); err != nil {
				t.Fatal(err)
			}
			if err := mem.WriteAt([]byte{0xff}, vqBufs+0x5000); err != nil {
				t.Fatal(err)
			}
			broken := false
			g.m.SetOnExit(func(ex machine.Exit) {
				// Once the device is broken, the driver's reset (status 0)
				// comes next: point ring slot 0 at the good chain.
				status := g.m.Virtio()[0].Transport.Status()
				broken = broken || status&virtio.StatusDeviceNeedsReset != 0
				if broken && ex.Addr == machine.MMIOBase+virtio.RegStatus && ex.Write && status == 0 {
					var b [2]byte
					binary.LittleEndian.PutUint16(b[:], 4)
					mem.WriteAt(b[:], vqAvail+4)
					mem.WriteAt([]byte{0, 0}, vqAvail+2)
				}
			})
			g.wantExit(10*time.Second, 0)
		})
	}
}

// TestVirtioNetGuest: a tiny guest drives virtio-net's two queues. Its
// transmitted frame leaves through the output port (inside the notify
// exit); the reply the test sends back through the input port lands in the
// guest's receive buffer between exits, announced by IRQ5.
func TestVirtioNetGuest(t *testing.T) {
	g := newGuest(t, `
_start:
`+virtioIRQ5+toUser+`
user:
	mov $0xd0000000, %rbx
	movl $0, 0x70(%rbx)
	movl $3, 0x70(%rbx)
	movl $1, 0x24(%rbx); movl $1, 0x20(%rbx)
	movl $0, 0x24(%rbx); movl $0, 0x20(%rbx)
	movl $0xb, 0x70(%rbx)
	movl $0, 0x30(%rbx)                     /* receiveq */
	movl $8, 0x38(%rbx)
	movl $0x100000, 0x80(%rbx); movl $0, 0x84(%rbx)
	movl $0x101000, 0x90(%rbx); movl $0, 0x94(%rbx)
	movl $0x102000, 0xa0(%rbx); movl $0, 0xa4(%rbx)
	movl $1, 0x44(%rbx)
	movl $1, 0x30(%rbx)                     /* transmitq */
	movl $8, 0x38(%rbx)
	movl $0x108000, 0x80(%rbx); movl $0, 0x84(%rbx)
	movl $0x109000, 0x90(%rbx); movl $0, 0x94(%rbx)
	movl $0x10a000, 0xa0(%rbx); movl $0, 0xa4(%rbx)
	movl $1, 0x44(%rbx)
	movl $0xf, 0x70(%rbx)
	movw $1, 0x101002                       /* one receive buffer */
	movl $0, 0x50(%rbx)
	movw $1, 0x109002                       /* one frame to send */
	movl $1, 0x50(%rbx)
1:	cmpw $1, 0x102002                       /* wait for the reply */
	jne 1b
2:	cmpq $1, 0x90008                        /* and an interrupt: one may cover both queues */
	jb 2b
	mov 0x102008, %eax                      /* bytes the device wrote */
`+exitWithEAX+virtioHandler, machine.Config{}, tinyguest.Options{Kernel: true})
	mac := []byte{0x52, 0x54, 0, 0x12, 0x34, 0x56}
	frame := append(append(append([]byte{}, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff), mac...), 0x88, 0xb5)
	frame = append(frame, bytes.Repeat([]byte("tx"), 23)...)
	reply := append(append(append([]byte{}, mac...), 2, 0, 0, 0, 0, 1, 0x88, 0xb5), bytes.Repeat([]byte("rx"), 40)...)
	var sent [][]byte
	var in *machine.InputPort
	out := g.m.NewOutputPort("net", func(b buffer.Buffer) {
		sent = append(sent, b.Flatten())
		b.Release()
		in.Send(buffer.MakeWithData(reply))
	})
	dev, err := vnet.New(mac, out.Emit)
	if err != nil {
		t.Fatal(err)
	}
	in = g.m.NewInputPort("net", dev.Deliver)
	if _, err := g.m.AddVirtio("net", dev); err != nil {
		t.Fatal(err)
	}
	mem := g.m.Memory()
	const rxBuf, txBuf = 0x104000, 0x10c000
	writeDescs(t, g.m, 0, desc{rxBuf, 12 + 1518, 2, 0})
	writeAvailRing(t, g.m, 0)
	var d [16]byte
	binary.LittleEndian.PutUint64(d[0:], txBuf)
	binary.LittleEndian.PutUint32(d[8:], uint32(12+len(frame)))
	if err := mem.WriteAt(d[:], 0x108000); err != nil {
		t.Fatal(err)
	}
	if err := mem.WriteAt(append(make([]byte, 12), frame...), txBuf); err != nil {
		t.Fatal(err)
	}
	g.wantExit(10*time.Second, uint32(12+len(reply)))
	if len(sent) != 1 || !bytes.Equal(sent[0], frame) {
		t.Errorf("sent %x, want one frame %x", sent, frame)
	}
	got := make([]byte, 12+len(reply))
	if err := mem.ReadAt(got, rxBuf); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got[12:], reply) || binary.LittleEndian.Uint16(got[10:]) != 1 {
		t.Errorf("received %x, want header with num_buffers 1 and %x", got, reply)
	}
}
