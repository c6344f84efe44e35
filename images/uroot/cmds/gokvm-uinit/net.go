package main

import (
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/vishvananda/netlink"
)

// configure brings lo and eth0 up, gives eth0 n's address and, when n has
// a gateway, adds the default route. It waits up to wait for eth0 to
// appear (the virtio-net driver may still be probing).
func configure(n *NetConfig, wait time.Duration) error {
	if lo, err := netlink.LinkByName("lo"); err == nil {
		if err := netlink.LinkSetUp(lo); err != nil {
			return fmt.Errorf("lo up: %w", err)
		}
	}
	var eth0 netlink.Link
	deadline := time.Now().Add(wait)
	for {
		l, err := netlink.LinkByName("eth0")
		if err == nil {
			eth0 = l
			break
		}
		var nf netlink.LinkNotFoundError
		if !errors.As(err, &nf) {
			return fmt.Errorf("eth0: %w", err)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("eth0 did not appear within %v (no network device?)", wait)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err := netlink.LinkSetUp(eth0); err != nil {
		return fmt.Errorf("eth0 up: %w", err)
	}
	addr := &netlink.Addr{IPNet: &net.IPNet{
		IP:   n.Addr.Addr().AsSlice(),
		Mask: net.CIDRMask(n.Addr.Bits(), n.Addr.Addr().BitLen()),
	}}
	if err := netlink.AddrReplace(eth0, addr); err != nil {
		return fmt.Errorf("eth0 address %v: %w", n.Addr, err)
	}
	if n.Gateway.IsValid() {
		r := &netlink.Route{LinkIndex: eth0.Attrs().Index, Gw: n.Gateway.AsSlice()}
		if err := netlink.RouteReplace(r); err != nil {
			return fmt.Errorf("default route via %v: %w", n.Gateway, err)
		}
	}
	return nil
}
