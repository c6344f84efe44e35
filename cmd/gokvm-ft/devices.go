package main

import (
	"crypto/rand"
	"fmt"
	"log/slog"
	"net"
	"strings"

	"github.com/gokvm-ft/gokvm-ft/machine"
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

// attachDevices adds the virtio devices the flags ask for, disk first (so
// it is vda), and returns what to close at the end.
func attachDevices(m *machine.Machine, o *options, log *slog.Logger) (func(), error) {
	var closers []func() error
	cleanup := func() {
		for i := len(closers) - 1; i >= 0; i-- {
			closers[i]()
		}
	}
	if o.disk != "" {
		d, err := blk.New(o.disk, o.diskRO)
		if err != nil {
			return cleanup, fmt.Errorf("-disk: %w", err)
		}
		d.SetLogger(log.With("disk", o.disk))
		closers = append(closers, d.Close)
		if _, err := m.AddVirtio("disk", d); err != nil {
			return cleanup, err
		}
	}
	if o.net != nil {
		closeNet, err := attachNet(m, o.net, log)
		if err != nil {
			return cleanup, fmt.Errorf("-net: %w", err)
		}
		closers = append(closers, closeNet)
	}
	return cleanup, nil
}
