// Package net is virtio-net (virtio device type 1, spec 5.1): an Ethernet
// NIC with one receive and one transmit queue and no offloads.
//
// The device never touches guest memory or its transport from a goroutine
// of its own. Transmitted frames are copied out of the guest inside the
// queue notify exit and handed to the machine's output function; received
// frames are handed in by the machine on the vCPU thread (Deliver) and
// copied into the guest's receive buffers right there. A frame that finds
// no receive buffer waits in a small host-side FIFO until the driver adds
// buffers (a later notify), so what the guest sees depends only on the
// order of vCPU-thread events, which record/replay and fault tolerance can
// reproduce.
//
// Packets travel in gVisor's buffer.Buffer. Ownership passes with the
// buffer: Deliver takes the caller's, and the emit function takes the
// device's; whoever holds a buffer last calls Release.
//
// With VIRTIO_F_VERSION_1 (which the transport requires) every packet in
// either direction starts with the 12-byte struct virtio_net_hdr_v1,
// num_buffers included, whether or not MRG_RXBUF is negotiated (spec
// 5.1.6). No checksum or segmentation offload is offered, so the header of
// a received frame is all zero but num_buffers = 1, and a transmitted frame
// must ask for neither.
package net

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	stdnet "net"
	"sync/atomic"

	"gvisor.dev/gvisor/pkg/buffer"

	"github.com/gokvm-ft/gokvm-ft/virtio"
)

// Queue indexes and sizes.
const (
	RxQueue   = 0
	TxQueue   = 1
	QueueSize = 256
)

// Feature bits offered (spec 5.1.3).
const (
	FeatureMTU    = 1 << 3
	FeatureMAC    = 1 << 5
	FeatureStatus = 1 << 16
)

// StatusLinkUp is VIRTIO_NET_S_LINK_UP in the configuration status field.
const StatusLinkUp = 1

// Frame sizes.
const (
	// HeaderSize is struct virtio_net_hdr_v1 (with num_buffers).
	HeaderSize = 12
	// MTU is the largest IP packet the guest is told it may send and
	// should expect, through the config mtu field.
	MTU = 1500
	// EthHeader is an untagged Ethernet header: destination, source, type.
	EthHeader = 14
	// MaxRxFrame is the largest frame delivered to the guest: MTU plus an
	// Ethernet header with one VLAN tag. Linux 6.1, without MRG_RXBUF or
	// guest TSO and with an MTU of 1500, posts one 12 + 1518 byte buffer
	// per receive chain ("small" buffers, GOOD_PACKET_LEN) and drops
	// anything longer, so a larger frame would be lost in the guest anyway.
	MaxRxFrame = MTU + EthHeader + 4
	// MaxTxFrame is the largest frame accepted from the guest. Without
	// TSO the guest sends at most MaxRxFrame, but nothing breaks if it
	// sends up to what a tap device takes, so only that is enforced.
	MaxTxFrame = 65535
	// MaxPending is how many received frames wait for receive buffers
	// before newer ones are dropped.
	MaxPending = 256
)

// Header flag and GSO type values this device refuses on transmit: it
// offers neither CSUM nor any HOST_ offload, so a driver must not use them.
const (
	hdrFlagNeedsCsum = 1
	gsoNone          = 0
)

// configSize covers mac, status, max_virtqueue_pairs and mtu; bytes past it
// (speed, duplex, RSS fields) read as zero.
const configSize = 12

// Stats are the device's packet counters. They are host-side diagnostics,
// not guest-visible state: not saved, not restored, not reset with the
// device.
type Stats struct {
	RxPackets, RxBytes uint64 // frames (without virtio header) written to the guest
	TxPackets, TxBytes uint64 // frames handed to emit

	RxDropInactive    uint64 // device not running (no DRIVER_OK, reset, broken) or link down
	RxDropSize        uint64 // shorter than an Ethernet header or longer than MaxRxFrame
	RxDropFull        uint64 // the pending FIFO was full
	RxDropShortBuffer uint64 // receive chain smaller than header plus frame (chain returned empty)
	RxDropReset       uint64 // pending when the device was reset or broken

	TxDropSize   uint64 // chain shorter than header plus Ethernet header, or frame over MaxTxFrame
	TxDropHeader uint64 // header asks for an offload that was not offered
	TxDropLink   uint64 // link down
}

// counters is Stats with atomic fields, so Stats may be read from any
// goroutine (a monitor) while the vCPU thread updates them.
type counters struct {
	rxPackets, rxBytes, txPackets, txBytes atomic.Uint64
	rxDropInactive, rxDropSize, rxDropFull atomic.Uint64
	rxDropShortBuffer, rxDropReset         atomic.Uint64
	txDropSize, txDropHeader, txDropLink   atomic.Uint64
}

// Net is a virtio-net device. It implements virtio.Device. Every method
// but Stats must be called on the vCPU thread.
type Net struct {
	mac    [6]byte
	emit   func(pkt buffer.Buffer)
	linkUp bool

	t       virtio.Transport // nil unless active
	pending []buffer.Buffer  // received frames waiting for receive buffers, oldest first
	stats   counters
}

// New returns a device with the given MAC address (6 bytes) whose
// transmitted frames go to emit. emit is called on the vCPU thread, inside
// the transmit notify exit, once per frame; it owns the buffer it is given
// and must Release it. It may call Deliver (a loopback). The link starts up.
func New(mac stdnet.HardwareAddr, emit func(pkt buffer.Buffer)) (*Net, error) {
	if len(mac) != 6 {
		return nil, fmt.Errorf("virtio-net: MAC address %q is not 6 bytes", mac)
	}
	if emit == nil {
		return nil, errors.New("virtio-net: no output function")
	}
	n := &Net{emit: emit, linkUp: true}
	copy(n.mac[:], mac)
	return n, nil
}

// MAC is the device's MAC address.
func (n *Net) MAC() stdnet.HardwareAddr { return stdnet.HardwareAddr(append([]byte(nil), n.mac[:]...)) }

// Stats returns the counters. Safe from any goroutine.
func (n *Net) Stats() Stats {
	c := &n.stats
	return Stats{
		RxPackets: c.rxPackets.Load(), RxBytes: c.rxBytes.Load(),
		TxPackets: c.txPackets.Load(), TxBytes: c.txBytes.Load(),
		RxDropInactive: c.rxDropInactive.Load(), RxDropSize: c.rxDropSize.Load(),
		RxDropFull: c.rxDropFull.Load(), RxDropShortBuffer: c.rxDropShortBuffer.Load(),
		RxDropReset: c.rxDropReset.Load(),
		TxDropSize:  c.txDropSize.Load(), TxDropHeader: c.txDropHeader.Load(), TxDropLink: c.txDropLink.Load(),
	}
}

// Pending is the number of received frames waiting for receive buffers.
func (n *Net) Pending() int { return len(n.pending) }

// Type is virtio.DeviceNet.
func (n *Net) Type() uint32 { return virtio.DeviceNet }

// Features offers the MAC address, the link status and the MTU.
func (n *Net) Features() uint64 { return FeatureMAC | FeatureStatus | FeatureMTU }

// QueueMaxSizes is one receive and one transmit queue.
func (n *Net) QueueMaxSizes() []uint16 { return []uint16{QueueSize, QueueSize} }

// ReadConfig reads struct virtio_net_config: mac, status,
// max_virtqueue_pairs (1: there is no MQ, but the field reads sanely) and
// mtu.
func (n *Net) ReadConfig(offset uint64, data []byte) {
	var cfg [configSize]byte
	copy(cfg[0:6], n.mac[:])
	if n.linkUp {
		binary.LittleEndian.PutUint16(cfg[6:], StatusLinkUp)
	}
	binary.LittleEndian.PutUint16(cfg[8:], 1)
	binary.LittleEndian.PutUint16(cfg[10:], MTU)
	clear(data)
	if offset < configSize {
		copy(data, cfg[offset:])
	}
}

// WriteConfig ignores writes. Only a legacy driver may write mac; a
// VERSION_1 driver (Linux included) changes its address in software and
// keeps using the one in config as the permanent address. This device does
// no MAC filtering, so the guest receives whatever the host delivers.
func (n *Net) WriteConfig(offset uint64, data []byte) {}

// Activate starts the device. No received frame is pending: Deliver drops
// frames while the device is inactive.
func (n *Net) Activate(t virtio.Transport, features uint64) { n.t = t }

// Reset stops the device and drops the frames waiting for receive buffers.
func (n *Net) Reset() {
	n.t = nil
	n.dropPending()
}

func (n *Net) dropPending() {
	for i := range n.pending {
		n.pending[i].Release()
	}
	n.stats.rxDropReset.Add(uint64(len(n.pending)))
	clear(n.pending)
	n.pending = n.pending[:0]
}

// fail breaks the transport after the driver broke a ring or chain. The
// queues stop until a reset, so pending frames could never be delivered.
func (n *Net) fail(err error) {
	n.t.Fail(err)
	n.t = nil
	n.dropPending()
}

// SetLink sets the link status the guest sees and tells it with a
// configuration change interrupt. While the link is down, received frames
// are dropped and transmitted ones are completed but not emitted, as with
// an unplugged cable.
func (n *Net) SetLink(up bool) {
	if up == n.linkUp {
		return
	}
	n.linkUp = up
	if n.t != nil {
		n.t.SignalConfigChange()
	}
}

// LinkUp reports the link status.
func (n *Net) LinkUp() bool { return n.linkUp }

// Notify serves the transmit queue or, for the receive queue (the driver
// added buffers), delivers pending frames.
func (n *Net) Notify(queue int) {
	if n.t == nil {
		return
	}
	switch queue {
	case RxQueue:
		n.fill()
	case TxQueue:
		n.transmit()
	}
}

// transmit pops every available transmit chain, completes it and emits its
// frame. Every chain is completed inside this exit, in ring order, so the
// guest can reuse its buffers at once.
func (n *Net) transmit() {
	q := n.t.Queue(TxQueue)
	done := false
	for {
		c, ok, err := q.Pop()
		if err == nil && ok {
			err = c.RequireReadOnly()
		}
		if err != nil {
			n.fail(fmt.Errorf("virtio-net transmit queue: %w", err))
			return
		}
		if !ok {
			break
		}
		pkt, ok := n.frame(&c)
		if err := q.Push(c.Head, 0); err != nil {
			if ok {
				pkt.Release()
			}
			n.fail(fmt.Errorf("virtio-net transmit queue: %w", err))
			return
		}
		done = true
		if ok {
			n.stats.txPackets.Add(1)
			n.stats.txBytes.Add(uint64(pkt.Size()))
			n.emit(pkt) // emit owns pkt now
			if n.t == nil {
				// emit looped the frame back through Deliver and a bad
				// receive chain broke the device.
				return
			}
		}
	}
	if done {
		n.t.SignalUsed(TxQueue)
	}
}

// frame checks a transmit chain and copies its frame out of guest memory.
// ok is false, and the reason counted, for a frame that must be dropped.
func (n *Net) frame(c *virtio.Chain) (pkt buffer.Buffer, ok bool) {
	if c.ReadableLen < HeaderSize+EthHeader || c.ReadableLen > HeaderSize+MaxTxFrame {
		n.stats.txDropSize.Add(1)
		return buffer.Buffer{}, false
	}
	var hdr [HeaderSize]byte
	if _, err := c.ReadReadable(hdr[:], 0); err != nil {
		n.stats.txDropSize.Add(1)
		return buffer.Buffer{}, false
	}
	// A partial checksum or a segmentation request would put a wrong
	// packet on the wire: refuse rather than emit it.
	if hdr[0]&hdrFlagNeedsCsum != 0 || hdr[1] != gsoNone {
		n.stats.txDropHeader.Add(1)
		return buffer.Buffer{}, false
	}
	if !n.linkUp {
		n.stats.txDropLink.Add(1)
		return buffer.Buffer{}, false
	}
	size := c.ReadableLen - HeaderSize
	slices, err := c.ReadableSlices(HeaderSize, size)
	if err != nil {
		// Segments were checked at Pop; cannot happen.
		n.stats.txDropSize.Add(1)
		return buffer.Buffer{}, false
	}
	v := buffer.NewView(int(size))
	for _, s := range slices {
		v.Write(s)
	}
	return buffer.MakeWithView(v), true
}

// Deliver hands the device a frame received from the outside world. It
// must be called on the vCPU thread; the device owns pkt from then on. The
// frame is written into the guest's next receive buffer at once if there
// is one, queued for later if not, or dropped (counted in Stats).
func (n *Net) Deliver(pkt buffer.Buffer) {
	switch size := pkt.Size(); {
	case n.t == nil || !n.linkUp:
		n.stats.rxDropInactive.Add(1)
		pkt.Release()
		return
	case size < EthHeader || size > MaxRxFrame:
		n.stats.rxDropSize.Add(1)
		pkt.Release()
		return
	case len(n.pending) >= MaxPending:
		n.stats.rxDropFull.Add(1)
		pkt.Release()
		return
	}
	n.pending = append(n.pending, pkt)
	n.fill()
}

// fill writes pending frames into receive chains, oldest first, while both
// last, then signals the used buffers once.
func (n *Net) fill() {
	q := n.t.Queue(RxQueue)
	// Frames are taken from the front by index and the rest moved down
	// once at the end, so the FIFO's array is reused without allocating.
	taken := 0
	var err error
	for taken < len(n.pending) {
		var c virtio.Chain
		var ok bool
		c, ok, err = q.Pop()
		if err == nil && ok {
			err = c.RequireWriteOnly()
		}
		if err != nil || !ok {
			break
		}
		pkt := n.pending[taken]
		n.pending[taken] = buffer.Buffer{}
		taken++
		var written uint32
		written, err = n.receive(&c, &pkt)
		pkt.Release()
		if err == nil {
			err = q.Push(c.Head, written)
		}
		if err != nil {
			break
		}
	}
	left := copy(n.pending, n.pending[taken:])
	clear(n.pending[left:])
	n.pending = n.pending[:left]
	if err != nil {
		n.fail(fmt.Errorf("virtio-net receive queue: %w", err))
		return
	}
	if taken > 0 {
		n.t.SignalUsed(RxQueue)
	}
}

// receive writes the header and pkt into a receive chain and returns the
// bytes written. A chain too small for the frame gets nothing: the frame
// is dropped and the chain returned empty, which Linux counts as a length
// error and refills. (Keeping the frame for the next chain could let a
// driver posting tiny buffers consume the whole ring for one frame.)
func (n *Net) receive(c *virtio.Chain, pkt *buffer.Buffer) (uint32, error) {
	size := uint64(pkt.Size())
	if c.WritableLen < HeaderSize+size {
		n.stats.rxDropShortBuffer.Add(1)
		return 0, nil
	}
	var hdr [HeaderSize]byte
	binary.LittleEndian.PutUint16(hdr[10:], 1) // num_buffers
	if _, err := c.WriteWritable(hdr[:], 0); err != nil {
		return 0, err
	}
	off := uint64(HeaderSize)
	views := pkt.AsViewList()
	for v := views.Front(); v != nil; v = v.Next() {
		if _, err := c.WriteWritable(v.AsSlice(), off); err != nil {
			return 0, err
		}
		off += uint64(v.Size())
	}
	n.stats.rxPackets.Add(1)
	n.stats.rxBytes.Add(size)
	return uint32(off), nil
}

// State is the guest-visible state of the device: the MAC address it was
// shown and the link status. Negotiated features and queues are the
// transport's. Frames pending for receive buffers are host-side packets,
// not guest state, and are not saved: a restored device starts with none,
// as if they had been lost on the wire.
type State struct {
	MAC    string
	LinkUp bool
}

// SaveState encodes State as JSON.
func (n *Net) SaveState() []byte {
	js, _ := json.Marshal(State{MAC: n.MAC().String(), LinkUp: n.linkUp})
	return js
}

// RestoreState checks that state was saved by a device with this MAC
// address, then resets the device and takes the saved link status.
func (n *Net) RestoreState(state []byte) error {
	var s State
	if err := json.Unmarshal(state, &s); err != nil {
		return fmt.Errorf("virtio-net: bad state: %w", err)
	}
	if s.MAC != n.MAC().String() {
		return fmt.Errorf("virtio-net: state is for MAC address %q, this device has %s", s.MAC, n.MAC())
	}
	n.Reset()
	n.linkUp = s.LinkUp
	return nil
}
