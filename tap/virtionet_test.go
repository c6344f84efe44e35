//go:build linux

package tap_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/buffer"

	"github.com/gokvm-ft/gokvm-ft/virtio"
	vnet "github.com/gokvm-ft/gokvm-ft/virtio/net"
	"github.com/gokvm-ft/gokvm-ft/virtio/virtiotest"
)

// TestVirtioNet wires a virtio-net device to a tap the way the machine
// does: the device's output goes to Write on the "vCPU thread" (the test
// goroutine), and ReadLoop's goroutine hands frames to that thread through
// a channel (the machine's input path), which calls Deliver. The guest's
// side is a virtiotest driver.
func TestVirtioNet(t *testing.T) {
	tp := open(t)
	if err := tp.SetUp(); err != nil {
		t.Fatal(err)
	}
	fd, ifindex := packetSocket(t, tp.Name())

	var writeErr error
	dev, err := vnet.New(net.HardwareAddr{0x52, 0x54, 0, 0, 0, 1}, func(pkt buffer.Buffer) {
		if err := tp.Write(pkt); err != nil {
			writeErr = err
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	mem := virtiotest.NewMemory(1 << 20)
	mmio := virtio.NewMMIO(dev, mem, nil)
	drv := &virtiotest.Driver{T: t, Regs: mmio, Mem: mem}
	qs := drv.Init(0x10000, 16, 16)
	rx, tx := qs[0], qs[1]

	input := make(chan buffer.Buffer, 16)
	done := make(chan error, 1)
	go func() {
		done <- tp.ReadLoop(func(pkt buffer.Buffer) bool {
			input <- pkt // ownership passes to the vCPU thread
			return true
		})
	}()
	defer func() {
		tp.Close()
		for {
			select {
			case pkt := <-input:
				pkt.Release()
			case <-done:
				close(input)
				for pkt := range input {
					pkt.Release()
				}
				return
			}
		}
	}()

	// Guest to host.
	toHost := testFrame(typeToHost, "from the guest")
	copy(mem.B[0x40000:], make([]byte, vnet.HeaderSize))
	copy(mem.B[0x40000+vnet.HeaderSize:], toHost)
	tx.Add(virtiotest.Buffer{GPA: 0x40000, Len: uint32(vnet.HeaderSize + len(toHost))})
	tx.Notify()
	if writeErr != nil {
		t.Fatal(writeErr)
	}
	buf := make([]byte, 2048)
	for start := time.Now(); ; {
		if time.Since(start) > 5*time.Second {
			t.Fatal("guest frame never reached the host")
		}
		n, from, err := unix.Recvfrom(fd, buf, 0)
		if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		if ll, _ := from.(*unix.SockaddrLinklayer); ll != nil && ll.Pkttype != unix.PACKET_OUTGOING && bytes.Equal(buf[:n], toHost) {
			break
		}
	}

	// Host to guest.
	for i := range 8 {
		rx.Add(virtiotest.Buffer{GPA: 0x50000 + uint64(i)*2048, Len: vnet.HeaderSize + vnet.MaxRxFrame, Writable: true})
	}
	rx.Notify()
	toGuest := testFrame(typeToGuest, "to the guest")
	sa := &unix.SockaddrLinklayer{Ifindex: ifindex, Halen: 6, Addr: [8]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}}
	if err := unix.Sendto(fd, toGuest, 0, sa); err != nil {
		t.Fatal(err)
	}
	deadline := time.After(5 * time.Second)
	for {
		select {
		case pkt := <-input:
			dev.Deliver(pkt)
		case <-deadline:
			t.Fatal("host frame never reached the guest")
		}
		for {
			head, n, ok := rx.NextUsed()
			if !ok {
				break
			}
			gpa := binary.LittleEndian.Uint64(mem.B[rx.Desc+16*uint64(head):])
			if bytes.Equal(mem.B[gpa+vnet.HeaderSize:gpa+uint64(n)], toGuest) {
				return
			}
			// Something of the host's own (IPv6 solicitations): give the
			// buffer back.
			rx.Add(virtiotest.Buffer{GPA: gpa, Len: vnet.HeaderSize + vnet.MaxRxFrame, Writable: true})
			rx.Notify()
		}
	}
}
