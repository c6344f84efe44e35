package main

import (
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"

	"gvisor.dev/gvisor/pkg/buffer"

	"github.com/gokvm-ft/gokvm-ft/machine"
	"github.com/gokvm-ft/gokvm-ft/tap"
	vnet "github.com/gokvm-ft/gokvm-ft/virtio/net"
)

// netDev is a virtio-net device and the tap behind it. Frames the tap reads
// enter the machine through an input port (delivered on the vCPU thread);
// frames the guest sends leave through an output port, and so through the
// machine's output gate, to the tap. The tap can be opened after the device
// exists and closed before the machine ends (live transfer).
type netDev struct {
	spec *netSpec
	log  *slog.Logger
	dev  *vnet.Net
	in   *machine.InputPort

	mu      sync.Mutex
	tap     *tap.Tap
	stopped chan error
	closed  bool
	// draining: frames read from the tap are dropped (an FT backup: its
	// guest must not see what the bridge floods to it before go-live).
	draining atomic.Bool
}

func attachNet(m *machine.Machine, n *netSpec, log *slog.Logger) (*netDev, error) {
	nd := &netDev{spec: n, log: log.With("tap", n.tap)}
	out := m.NewOutputPort("net", nd.write)
	dev, err := vnet.New(n.mac, out.Emit)
	if err != nil {
		return nil, err
	}
	nd.dev = dev
	nd.in = m.NewInputPort("net", dev.Deliver)
	if _, err := m.AddVirtio("net", dev); err != nil {
		return nil, err
	}
	return nd, nil
}

// write sends a guest frame to the tap; with no tap open it is dropped.
func (nd *netDev) write(pkt buffer.Buffer) {
	nd.mu.Lock()
	t := nd.tap
	nd.mu.Unlock()
	if t == nil {
		pkt.Release()
		return
	}
	if err := t.Write(pkt); err != nil {
		nd.log.Warn("tap write", "err", err)
	}
}

// deliver hands a frame from the tap to the guest, unless draining.
func (nd *netDev) deliver(pkt buffer.Buffer) bool {
	if nd.draining.Load() {
		pkt.Release()
		return true
	}
	return nd.in.Send(pkt)
}

// startDraining opens the tap and drops what it reads until goLive.
func (nd *netDev) startDraining() error {
	nd.draining.Store(true)
	return nd.start()
}

// goLive stops draining: from now on the guest gets the tap's frames.
func (nd *netDev) goLive() { nd.draining.Store(false) }

// announce writes frames to the tap (gratuitous ARP and the like).
func (nd *netDev) announce(frames [][]byte) {
	nd.mu.Lock()
	t := nd.tap
	nd.mu.Unlock()
	if t == nil {
		return
	}
	for _, f := range frames {
		if err := t.Write(buffer.MakeWithData(f)); err != nil {
			nd.log.Warn("announcing the guest", "err", err)
			return
		}
	}
}

// start opens the tap and starts its reader, once.
func (nd *netDev) start() error {
	nd.mu.Lock()
	defer nd.mu.Unlock()
	if nd.tap != nil {
		return nil
	}
	if nd.closed {
		return errors.New("the tap was released")
	}
	t, err := tap.Open(nd.spec.tap)
	if err != nil {
		return err
	}
	if err := t.SetUp(); err != nil {
		t.Close()
		return err
	}
	nd.tap = t
	nd.stopped = make(chan error, 1)
	go func() { nd.stopped <- t.ReadLoop(nd.deliver) }()
	nd.log.Debug("virtio-net on tap", "mac", nd.spec.mac)
	return nil
}

// close closes the tap and waits for its reader; later frames are dropped.
func (nd *netDev) close() error {
	nd.mu.Lock()
	defer nd.mu.Unlock()
	nd.closed = true
	if nd.tap == nil {
		return nil
	}
	err := nd.tap.Close()
	if rerr := <-nd.stopped; rerr != nil {
		err = errors.Join(err, rerr)
	}
	nd.log.Debug("virtio-net stats", "stats", fmt.Sprintf("%+v", nd.dev.Stats()), "tap", fmt.Sprintf("%+v", nd.tap.Stats()), "input dropped", nd.in.Dropped())
	nd.tap = nil
	return err
}
