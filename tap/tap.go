//go:build linux

// Package tap connects a guest NIC to the host through a Linux tap
// device: whole Ethernet frames in both directions, without a packet-info
// prefix or a virtio-net header (no offloads are negotiated, so the
// kernel never needs one).
//
// Frames from the host are read by a goroutine of the caller's (ReadLoop)
// and handed to the machine's input path, which delivers them on the vCPU
// thread; this package never sees guest memory. Frames to the host are
// written by the vCPU thread (Write) on a nonblocking descriptor, so a
// congested or downed tap loses frames, as a wire would, instead of
// stalling the guest.
package tap

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"sync/atomic"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/buffer"
)

// MaxFrame is the largest frame read from the tap in one go; the kernel
// cuts longer ones (it cannot hand out more than the tap's MTU allows plus
// headers anyway).
const MaxFrame = 65536

const tunPath = "/dev/net/tun"

// Stats are the tap's frame counters, readable from any goroutine.
type Stats struct {
	RxFrames, RxBytes uint64 // read from the tap (host to guest)
	TxFrames, TxBytes uint64 // written to the tap (guest to host)
	TxDropped         uint64 // congestion (EAGAIN, ENOBUFS) or interface down (EIO)
	TxErrors          uint64 // any other write failure
}

// Tap is an open tap device. Write is for one goroutine (the vCPU
// thread), ReadLoop for another; Close and Stats may be called from any.
type Tap struct {
	f    *os.File
	name string

	rxFrames, rxBytes, txFrames, txBytes atomic.Uint64
	txDropped, txErrors                  atomic.Uint64
}

// Open attaches to the tap interface name, creating it if it does not
// exist. A tap created here is not persistent: it disappears when the Tap
// is closed. An existing (persistent) tap must allow this user and must not
// already be attached to another process.
//
// An empty name lets the kernel pick one (tap0, tap1, ...); Name says
// which.
func Open(name string) (*Tap, error) {
	if len(name) >= unix.IFNAMSIZ {
		return nil, fmt.Errorf("tap %q: interface name longer than %d bytes", name, unix.IFNAMSIZ-1)
	}
	if strings.IndexByte(name, 0) >= 0 {
		// The kernel would silently use the part before the NUL.
		return nil, fmt.Errorf("tap %q: bad interface name: contains NUL", name)
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return nil, fmt.Errorf("tap %q: bad interface name: %w", name, err)
	}
	fd, err := unix.Open(tunPath, unix.O_RDWR|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		return nil, fmt.Errorf("tap %q: open %s: %w", name, tunPath, err)
	}
	ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("tap %q: attach (TUNSETIFF): %w%s", name, err, hint(err))
	}
	// A nonblocking descriptor makes os.File use the runtime poller:
	// Read parks the goroutine instead of a thread, and Close wakes it.
	f := os.NewFile(uintptr(fd), tunPath+":"+ifr.Name())
	return &Tap{f: f, name: ifr.Name()}, nil
}

// hint says what usually causes a TUNSETIFF failure.
func hint(err error) string {
	switch {
	case errors.Is(err, unix.EPERM):
		return " (needs CAP_NET_ADMIN, or a persistent tap owned by this user)"
	case errors.Is(err, unix.EBUSY):
		return " (already attached, by this or another process)"
	case errors.Is(err, unix.EINVAL):
		return " (an interface of that name exists and is not a tap)"
	}
	return ""
}

// Name is the interface name.
func (t *Tap) Name() string { return t.name }

// SetUp brings the interface up (IFF_UP), as `ip link set NAME up` does.
// The kernel refuses frames written to a tap that is down.
func (t *Tap) SetUp() error {
	s, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("tap %s: set up: %w", t.name, err)
	}
	defer unix.Close(s)
	ifr, err := unix.NewIfreq(t.name)
	if err != nil {
		return fmt.Errorf("tap %s: set up: %w", t.name, err)
	}
	if err := unix.IoctlIfreq(s, unix.SIOCGIFFLAGS, ifr); err != nil {
		return fmt.Errorf("tap %s: get flags: %w", t.name, err)
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	if err := unix.IoctlIfreq(s, unix.SIOCSIFFLAGS, ifr); err != nil {
		return fmt.Errorf("tap %s: set flags: %w", t.name, err)
	}
	return nil
}

// ReadLoop reads frames until the tap is closed and hands each to deliver,
// which takes ownership of the buffer. deliver returning false (the
// machine has stopped) ends the loop. It returns nil after Close or when
// deliver refuses, and the read error otherwise. Run it on its own
// goroutine.
func (t *Tap) ReadLoop(deliver func(pkt buffer.Buffer) bool) error {
	// One scratch buffer for the largest frame; each frame is then copied
	// into a pooled view of its own size, so a small frame does not pin
	// 64 KiB.
	scratch := make([]byte, MaxFrame)
	for {
		n, err := t.f.Read(scratch)
		if err != nil {
			if errors.Is(err, os.ErrClosed) {
				return nil
			}
			return fmt.Errorf("tap %s: read: %w", t.name, err)
		}
		if n == 0 {
			continue
		}
		t.rxFrames.Add(1)
		t.rxBytes.Add(uint64(n))
		if !deliver(buffer.MakeWithData(scratch[:n])) {
			return nil
		}
	}
}

// Write sends one frame to the host and releases pkt. It never blocks: a
// frame the tap cannot take now (its queue is full, or the interface is
// down) is dropped, counted in Stats, and Write returns nil, as a NIC
// loses frames on a congested or unplugged wire. Other failures (the tap
// was closed, the frame is malformed) are returned.
func (t *Tap) Write(pkt buffer.Buffer) error {
	defer pkt.Release()
	var iov [][]byte
	views := pkt.AsViewList()
	for v := views.Front(); v != nil; v = v.Next() {
		iov = append(iov, v.AsSlice())
	}
	size := pkt.Size()
	rc, err := t.f.SyscallConn()
	if err != nil {
		t.txErrors.Add(1)
		return fmt.Errorf("tap %s: write: %w", t.name, err)
	}
	var n int
	var werr error
	// Returning true from the callback means "done": the poller never
	// waits for the descriptor to become writable.
	err = rc.Write(func(fd uintptr) bool {
		for {
			n, werr = unix.Writev(int(fd), iov)
			if werr != unix.EINTR {
				return true
			}
		}
	})
	if err == nil {
		err = werr
	}
	switch {
	case err == nil && int64(n) == size:
		t.txFrames.Add(1)
		t.txBytes.Add(uint64(n))
		return nil
	case err == nil:
		// A tap takes a frame whole or not at all; be safe anyway.
		t.txErrors.Add(1)
		return fmt.Errorf("tap %s: wrote %d of %d bytes", t.name, n, size)
	case errors.Is(err, unix.EAGAIN), errors.Is(err, unix.ENOBUFS), errors.Is(err, unix.EIO):
		t.txDropped.Add(1)
		return nil
	}
	t.txErrors.Add(1)
	return fmt.Errorf("tap %s: write: %w", t.name, err)
}

// Stats returns the counters.
func (t *Tap) Stats() Stats {
	return Stats{
		RxFrames: t.rxFrames.Load(), RxBytes: t.rxBytes.Load(),
		TxFrames: t.txFrames.Load(), TxBytes: t.txBytes.Load(),
		TxDropped: t.txDropped.Load(), TxErrors: t.txErrors.Load(),
	}
}

// Close detaches from the tap (deleting it unless it is persistent) and
// makes a running ReadLoop return.
func (t *Tap) Close() error {
	if err := t.f.Close(); err != nil {
		return fmt.Errorf("tap %s: %w", t.name, err)
	}
	return nil
}
