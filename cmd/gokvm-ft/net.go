package main

import (
	"errors"
	"log/slog"

	"gvisor.dev/gvisor/pkg/buffer"

	"github.com/gokvm-ft/gokvm-ft/machine"
	"github.com/gokvm-ft/gokvm-ft/tap"
	vnet "github.com/gokvm-ft/gokvm-ft/virtio/net"
)

// attachNet connects a virtio-net device to a tap: frames the tap reads
// enter the machine through an input port (delivered on the vCPU thread);
// frames the guest sends leave through an output port, and so through the
// machine's output gate, to the tap.
func attachNet(m *machine.Machine, n *netSpec, log *slog.Logger) (func() error, error) {
	t, err := tap.Open(n.tap)
	if err != nil {
		return nil, err
	}
	if err := t.SetUp(); err != nil {
		t.Close()
		return nil, err
	}
	out := m.NewOutputPort("net", func(pkt buffer.Buffer) {
		if err := t.Write(pkt); err != nil {
			log.Warn("tap write", "tap", n.tap, "err", err)
		}
	})
	dev, err := vnet.New(n.mac, out.Emit)
	if err != nil {
		t.Close()
		return nil, err
	}
	in := m.NewInputPort("net", dev.Deliver)
	if _, err := m.AddVirtio("net", dev); err != nil {
		t.Close()
		return nil, err
	}
	stopped := make(chan error, 1)
	go func() { stopped <- t.ReadLoop(in.Send) }()
	log.Debug("virtio-net on tap", "tap", n.tap, "mac", n.mac)
	return func() error {
		err := t.Close()
		if rerr := <-stopped; rerr != nil {
			err = errors.Join(err, rerr)
		}
		s := dev.Stats()
		log.Debug("virtio-net stats", "stats", s, "tap", t.Stats(), "input dropped", in.Dropped())
		return err
	}, nil
}
