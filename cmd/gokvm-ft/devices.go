package main

import (
	"crypto/rand"
	"fmt"
	"log/slog"
	"net"
	"strings"

	"gvisor.dev/gvisor/pkg/buffer"

	"github.com/gokvm-ft/gokvm-ft/machine"
	"github.com/gokvm-ft/gokvm-ft/migrate"
	"github.com/gokvm-ft/gokvm-ft/virtio/blk"
)

// netSpec is a parsed -net flag: tap=NAME[,mac=MAC].
type netSpec struct {
	tap string
	mac net.HardwareAddr
}

// parseNet parses "tap=NAME[,mac=52:54:00:12:34:56]". Without a MAC the
// guest gets a random locally administered unicast one.
func parseNet(s string) (*netSpec, error) {
	n := &netSpec{}
	for _, kv := range strings.Split(s, ",") {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || v == "" {
			return nil, fmt.Errorf("bad item %q in %q (want tap=NAME[,mac=MAC])", kv, s)
		}
		switch k {
		case "tap":
			if len(v) >= 16 || strings.ContainsAny(v, "/ \t") {
				return nil, fmt.Errorf("bad tap name %q (at most 15 characters, no '/' or spaces)", v)
			}
			n.tap = v
		case "mac":
			mac, err := net.ParseMAC(v)
			if err != nil || len(mac) != 6 {
				return nil, fmt.Errorf("bad MAC %q (want six bytes like 52:54:00:12:34:56)", v)
			}
			if mac[0]&1 != 0 {
				return nil, fmt.Errorf("MAC %s is a multicast address", v)
			}
			n.mac = mac
		default:
			return nil, fmt.Errorf("unknown item %q in %q (want tap=NAME[,mac=MAC])", k, s)
		}
	}
	if n.tap == "" {
		return nil, fmt.Errorf("%q names no tap device (want tap=NAME[,mac=MAC])", s)
	}
	if n.mac == nil {
		n.mac = make(net.HardwareAddr, 6)
		rand.Read(n.mac)
		n.mac[0] = n.mac[0]&^1 | 2 // unicast, locally administered
	}
	return n, nil
}

// diskPath is the image this VMM uses for a virtio device's disk ("" if
// it has none), as a live transfer's destination asks.
func (o *options) diskPath(name string) string {
	if name == "disk" {
		return o.disk
	}
	return ""
}

// shareDisk makes b an FT pair's shared disk: its reads travel as the
// machine's device input, its writes as output through the gate (held on a
// primary until the backup has the log, dropped on a backup).
func shareDisk(m *machine.Machine, b *blk.Blk) {
	port := m.NewOutputPort("disk", func(w buffer.Buffer) {
		b.Apply(w.Flatten()) // a failure is logged by the disk
		w.Release()
	})
	port.OnDrop(func(w buffer.Buffer) {
		b.Forget(w.Flatten())
		w.Release()
	})
	b.SetShared(blk.Shared{
		Input: func(live func() ([]byte, error)) ([]byte, error) { return m.DeviceInput("disk-read", live) },
		Emit:  func(w []byte) { port.Emit(buffer.MakeWithData(w)) },
	})
}

// devices are the machine's virtio devices and their host resources.
type devices struct {
	disks   []migrate.DiskSource
	net     *netDev
	closers []func() error
}

// attachDevices adds the virtio devices the flags ask for, disk first (so
// it is vda). diskPath replaces -disk's path when not empty (a restored
// snapshot's copy). With deferTap the tap is opened only by startNet (the
// destination of a live transfer takes it once the source let go).
func attachDevices(m *machine.Machine, o *options, diskPath string, deferTap bool, log *slog.Logger) (*devices, error) {
	d := &devices{}
	if diskPath == "" {
		diskPath = o.disk
	}
	if diskPath != "" {
		b, err := blk.New(diskPath, o.diskRO)
		if err != nil {
			return d, fmt.Errorf("-disk: %w", err)
		}
		b.SetLogger(log.With("disk", diskPath))
		d.closers = append(d.closers, b.Close)
		if o.pair.diskShared {
			shareDisk(m, b)
		}
		if _, err := m.AddVirtio("disk", b); err != nil {
			return d, err
		}
		d.disks = append(d.disks, migrate.DiskSource{Name: "disk", Path: diskPath, ReadOnly: o.diskRO, TrackWrites: b.TrackWrites})
	}
	if o.net != nil {
		n, err := attachNet(m, o.net, log)
		if err != nil {
			return d, fmt.Errorf("-net: %w", err)
		}
		d.net = n
		d.closers = append(d.closers, n.close)
		if !deferTap {
			if err := n.start(); err != nil {
				return d, fmt.Errorf("-net: %w", err)
			}
		}
	}
	return d, nil
}

// startNet opens the tap if it is not open yet and starts reading it.
func (d *devices) startNet() error {
	if d.net == nil {
		return nil
	}
	return d.net.start()
}

// releaseNet closes the tap, for another VMM to take it.
func (d *devices) releaseNet() error {
	if d.net == nil {
		return nil
	}
	return d.net.close()
}

// close releases every host resource.
func (d *devices) close() {
	for i := len(d.closers) - 1; i >= 0; i-- {
		d.closers[i]()
	}
	d.closers = nil
}
