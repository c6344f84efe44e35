//go:build linux

package tap_test

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/buffer"

	"github.com/gokvm-ft/gokvm-ft/tap"
)

// Local experimental EtherTypes, so the test's frames are told apart from
// whatever the host kernel sends on a fresh interface (IPv6 router
// solicitations and the like).
const (
	typeToGuest = 0x88b5
	typeToHost  = 0x88b6
)

func uniqueName(t *testing.T) string {
	var b [4]byte
	rand.Read(b[:])
	return "gkt" + hex.EncodeToString(b[:])
}

// open creates a fresh tap, or skips the test where this host cannot.
func open(t *testing.T) *tap.Tap {
	t.Helper()
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		t.Skipf("no tun device: %v", err)
	}
	tp, err := tap.Open(uniqueName(t))
	if errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES) {
		t.Skipf("not allowed to create a tap: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tp.Close() })
	return tp
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// packetSocket is a raw AF_PACKET socket bound to the interface: the host
// side of the tap.
func packetSocket(t *testing.T, ifname string) (fd, ifindex int) {
	t.Helper()
	ifc, err := net.InterfaceByName(ifname)
	if err != nil {
		t.Fatal(err)
	}
	fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ALL)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifc.Index}); err != nil {
		t.Fatal(err)
	}
	tv := unix.NsecToTimeval(int64(200 * time.Millisecond))
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		t.Fatal(err)
	}
	return fd, ifc.Index
}

func testFrame(etherType uint16, payload string) []byte {
	f := []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0, 0, 0, 0, 1, 0, 0}
	binary.BigEndian.PutUint16(f[12:], etherType)
	return append(f, payload...)
}

func etherType(f []byte) uint16 {
	if len(f) < 14 {
		return 0
	}
	return binary.BigEndian.Uint16(f[12:])
}

func TestOpenErrors(t *testing.T) {
	tp := open(t)
	for _, c := range []struct {
		name, want string
	}{
		{"a-name-much-too-long", "longer than 15 bytes"},
		{"bad\x00name", "bad interface name"},
		{tp.Name(), "busy"},        // already attached here
		{"lo", "invalid argument"}, // exists, not a tap
	} {
		other, err := tap.Open(c.name)
		if err == nil {
			other.Close()
			t.Errorf("%q: opened", c.name)
			continue
		}
		if !strings.Contains(err.Error(), strings.ReplaceAll(c.name, "\x00", `\x00`)) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%q: error %q does not name the device or say %q", c.name, err, c.want)
		}
		t.Log(err)
	}
}

func TestFrames(t *testing.T) {
	tp := open(t)
	if err := tp.SetUp(); err != nil {
		t.Fatal(err)
	}
	fd, ifindex := packetSocket(t, tp.Name())

	got := make(chan []byte, 64)
	done := make(chan error, 1)
	go func() {
		done <- tp.ReadLoop(func(pkt buffer.Buffer) bool {
			got <- pkt.Flatten()
			pkt.Release()
			return true
		})
	}()

	// Host to guest: a frame sent on the interface comes out of ReadLoop.
	toGuest := testFrame(typeToGuest, "to the guest "+tp.Name())
	sa := &unix.SockaddrLinklayer{Ifindex: ifindex, Halen: 6, Addr: [8]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}}
	if err := unix.Sendto(fd, toGuest, 0, sa); err != nil {
		t.Fatal(err)
	}
	deadline := time.After(5 * time.Second)
wait:
	for {
		select {
		case f := <-got:
			if etherType(f) == typeToGuest {
				if !bytes.Equal(f, toGuest) {
					t.Fatalf("read % x, want % x", f, toGuest)
				}
				break wait
			}
		case <-deadline:
			t.Fatal("frame sent by the host never read")
		}
	}

	// Guest to host: a written frame arrives on the interface.
	toHost := testFrame(typeToHost, "to the host "+tp.Name())
	pkt := buffer.MakeWithData(toHost[:20])
	pkt.Append(buffer.NewViewWithData(toHost[20:])) // two views: writev
	if err := tp.Write(pkt); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 2048)
	for start := time.Now(); ; {
		if time.Since(start) > 5*time.Second {
			t.Fatal("written frame never arrived on the interface")
		}
		n, from, err := unix.Recvfrom(fd, buf, 0)
		if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		ll, _ := from.(*unix.SockaddrLinklayer)
		if ll == nil || ll.Pkttype == unix.PACKET_OUTGOING || etherType(buf[:n]) != typeToHost {
			continue
		}
		if !bytes.Equal(buf[:n], toHost) {
			t.Fatalf("received % x, want % x", buf[:n], toHost)
		}
		break
	}
	st := tp.Stats()
	if st.TxFrames != 1 || st.TxBytes != uint64(len(toHost)) || st.RxFrames == 0 || st.TxDropped != 0 || st.TxErrors != 0 {
		t.Errorf("stats %+v", st)
	}

	// Close unblocks the reader.
	if err := tp.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("ReadLoop after Close: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("ReadLoop still running after Close")
	}
	// The tap was not persistent: closing it deleted the interface.
	if _, err := net.InterfaceByName(tp.Name()); err == nil {
		t.Error("interface still exists after Close")
	}
	// Writing to a closed tap is an error, not a drop.
	if err := tp.Write(buffer.MakeWithData(toHost)); err == nil {
		t.Error("write after Close succeeded")
	}
	if st := tp.Stats(); st.TxErrors != 1 {
		t.Errorf("stats after a write to a closed tap: %+v", st)
	}
}

func TestDeliverRefuses(t *testing.T) {
	tp := open(t)
	if err := tp.SetUp(); err != nil {
		t.Fatal(err)
	}
	fd, ifindex := packetSocket(t, tp.Name())
	done := make(chan error, 1)
	calls := 0
	go func() {
		done <- tp.ReadLoop(func(pkt buffer.Buffer) bool {
			calls++
			pkt.Release()
			return false // the machine has stopped
		})
	}()
	sa := &unix.SockaddrLinklayer{Ifindex: ifindex, Halen: 6, Addr: [8]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}}
	for range 2 {
		if err := unix.Sendto(fd, testFrame(typeToGuest, "x"), 0, sa); err != nil {
			t.Fatal(err)
		}
	}
	select {
	case err := <-done:
		if err != nil || calls != 1 {
			t.Errorf("ReadLoop returned %v after %d deliveries", err, calls)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("ReadLoop went on after deliver refused")
	}
}

func TestWriteWhileDown(t *testing.T) {
	tp := open(t)
	// The interface was never brought up: the kernel refuses the frame,
	// which counts as a drop, not an error.
	if err := tp.Write(buffer.MakeWithData(testFrame(typeToHost, "lost"))); err != nil {
		t.Fatal(err)
	}
	if st := tp.Stats(); st.TxDropped != 1 || st.TxFrames != 0 || st.TxErrors != 0 {
		t.Errorf("stats %+v", st)
	}
}

func TestCloseIdle(t *testing.T) {
	tp := open(t)
	done := make(chan error, 1)
	go func() {
		done <- tp.ReadLoop(func(pkt buffer.Buffer) bool { pkt.Release(); return true })
	}()
	time.Sleep(50 * time.Millisecond) // let it block in Read
	tp.Close()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("ReadLoop after Close: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("ReadLoop still blocked after Close")
	}
}
