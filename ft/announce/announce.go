package announce

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

const (
	// MinFrameSize is the minimum Ethernet frame size without FCS. Every
	// frame built by this package is zero-padded to at least this size.
	MinFrameSize = 60

	// MaxAddrs is the number of addresses of each family (IPv4, IPv6) a
	// Learner remembers.
	MaxAddrs = 8

	// rarpProtocolNumber is the Ethernet type of Reverse ARP (RFC 903).
	rarpProtocolNumber tcpip.NetworkProtocolNumber = 0x8035

	// rarpRequestReverse is the RARP "request reverse" opcode (RFC 903).
	rarpRequestReverse header.ARPOp = 3
)

// ipv6AllNodesMAC is the Ethernet multicast address of ff02::1 (RFC 2464
// section 7).
var ipv6AllNodesMAC = header.EthernetAddressFromMulticastIPv6Address(header.IPv6AllNodesMulticastAddress)

// linkAddr checks that mac is an Ethernet address and converts it.
func linkAddr(mac net.HardwareAddr) (tcpip.LinkAddress, error) {
	if len(mac) != header.EthernetAddressSize {
		return "", fmt.Errorf("announce: MAC %q is not a %d-byte Ethernet address", mac.String(), header.EthernetAddressSize)
	}
	return tcpip.LinkAddress(mac), nil
}

// newFrame allocates a zeroed frame of max(n, MinFrameSize) bytes and
// encodes its Ethernet header.
func newFrame(n int, dst, src tcpip.LinkAddress, typ tcpip.NetworkProtocolNumber) []byte {
	frame := make([]byte, max(n, MinFrameSize))
	header.Ethernet(frame).Encode(&header.EthernetFields{
		SrcAddr: src,
		DstAddr: dst,
		Type:    typ,
	})
	return frame
}

// arpFrame builds a broadcast frame of type typ carrying an IPv4-over-Ethernet
// ARP packet with the given fields, sent from sha.
func arpFrame(typ tcpip.NetworkProtocolNumber, op header.ARPOp, sha tcpip.LinkAddress, spa [4]byte, tha tcpip.LinkAddress, tpa [4]byte) []byte {
	frame := newFrame(header.EthernetMinimumSize+header.ARPSize, header.EthernetBroadcastAddress, sha, typ)
	arp := header.ARP(frame[header.EthernetMinimumSize:])
	arp.SetIPv4OverEthernet()
	arp.SetOp(op)
	copy(arp.HardwareAddressSender(), sha)
	copy(arp.ProtocolAddressSender(), spa[:])
	copy(arp.HardwareAddressTarget(), tha)
	copy(arp.ProtocolAddressTarget(), tpa[:])
	return frame
}

// GratuitousARP returns a gratuitous ARP request announcing that ip is at
// mac: a broadcast Ethernet frame from mac whose ARP request has sender
// hardware address mac, sender and target protocol address ip and an all-zero
// target hardware address (RFC 5227 section 3).
//
// It returns an error if mac is not a 6-byte Ethernet address or ip is not an
// IPv4 address (an IPv4-mapped IPv6 address is refused too).
func GratuitousARP(mac net.HardwareAddr, ip netip.Addr) ([]byte, error) {
	src, err := linkAddr(mac)
	if err != nil {
		return nil, err
	}
	if !ip.Is4() {
		return nil, fmt.Errorf("announce: gratuitous ARP needs an IPv4 address, got %v", ip)
	}
	a := ip.As4()
	return arpFrame(header.ARPProtocolNumber, header.ARPRequest, src, a, header.UnspecifiedEthernetAddress, a), nil
}

// RARP returns the frame QEMU's announce-self sends for mac: a broadcast
// Ethernet frame of type RARP (0x8035) from mac whose ARP-format payload is a
// "request reverse" (opcode 3) with sender and target hardware address mac
// and sender and target protocol address 0.0.0.0. It carries no IP address;
// its only purpose is to make bridges learn mac on the sending port.
//
// It returns an error if mac is not a 6-byte Ethernet address.
func RARP(mac net.HardwareAddr) ([]byte, error) {
	src, err := linkAddr(mac)
	if err != nil {
		return nil, err
	}
	return arpFrame(rarpProtocolNumber, rarpRequestReverse, src, [4]byte{}, src, [4]byte{}), nil
}

// unsolicitedNASize is the size of an unsolicited Neighbor Advertisement
// frame: Ethernet, IPv6, ICMPv6 header, NA body and one 8-byte Target
// Link-Layer Address option.
const unsolicitedNASize = header.EthernetMinimumSize + header.IPv6MinimumSize + header.ICMPv6NeighborAdvertMinimumSize + 8

// UnsolicitedNA returns an unsolicited Neighbor Advertisement (RFC 4861
// section 7.2.6) announcing that ip is at mac: an Ethernet frame from mac to
// 33:33:00:00:00:01 carrying an IPv6 packet from ip to ff02::1 with hop limit
// 255, whose ICMPv6 type 136 message has the Override flag set (Router and
// Solicited clear), target address ip and a Target Link-Layer Address option
// holding mac. The ICMPv6 checksum is filled in.
//
// It returns an error if mac is not a 6-byte Ethernet address or ip is not an
// IPv6 unicast address (IPv4-mapped, unspecified and multicast addresses are
// refused). A zone on ip is ignored.
func UnsolicitedNA(mac net.HardwareAddr, ip netip.Addr) ([]byte, error) {
	src, err := linkAddr(mac)
	if err != nil {
		return nil, err
	}
	if !ip.Is6() || ip.Is4In6() {
		return nil, fmt.Errorf("announce: neighbour advertisement needs an IPv6 address, got %v", ip)
	}
	if ip.IsUnspecified() || ip.IsMulticast() {
		return nil, fmt.Errorf("announce: neighbour advertisement needs a unicast IPv6 address, got %v", ip)
	}
	addr := tcpip.AddrFrom16(ip.As16())

	frame := newFrame(unsolicitedNASize, ipv6AllNodesMAC, src, header.IPv6ProtocolNumber)
	ipv6 := header.IPv6(frame[header.EthernetMinimumSize:unsolicitedNASize])
	icmp := header.ICMPv6(ipv6[header.IPv6MinimumSize:])
	ipv6.Encode(&header.IPv6Fields{
		PayloadLength:     uint16(len(icmp)),
		TransportProtocol: header.ICMPv6ProtocolNumber,
		HopLimit:          header.NDPHopLimit,
		SrcAddr:           addr,
		DstAddr:           header.IPv6AllNodesMulticastAddress,
	})
	icmp.SetType(header.ICMPv6NeighborAdvert)
	icmp.SetCode(header.ICMPv6UnusedCode)
	na := header.NDPNeighborAdvert(icmp.MessageBody())
	na.SetOverrideFlag(true)
	na.SetTargetAddress(addr)
	opts := header.NDPOptionsSerializer{header.NDPTargetLinkLayerAddressOption(src)}
	if n := na.Options().Serialize(opts); n != len(na.Options()) {
		// Cannot happen: unsolicitedNASize leaves room for exactly opts.
		return nil, errors.New("announce: neighbour advertisement options do not fit")
	}
	icmp.SetChecksum(header.ICMPv6Checksum(header.ICMPv6ChecksumParams{
		Header: icmp,
		Src:    addr,
		Dst:    header.IPv6AllNodesMulticastAddress,
	}))
	return frame, nil
}

// LinkLocal returns the IPv6 link-local address a guest derives from mac by
// stateless autoconfiguration: fe80::/64 followed by the modified EUI-64 of
// mac (U/L bit flipped, ff:fe inserted; RFC 4291 appendix A). For example
// 52:54:00:12:34:56 yields fe80::5054:ff:fe12:3456.
//
// It returns the zero netip.Addr if mac is not a 6-byte Ethernet address.
func LinkLocal(mac net.HardwareAddr) netip.Addr {
	src, err := linkAddr(mac)
	if err != nil {
		return netip.Addr{}
	}
	return netip.AddrFrom16(header.LinkLocalAddr(src).As16())
}

// Frames returns every frame to send once to announce a guest with Ethernet
// address mac and IP addresses addrs, in order: one RARP frame, then for each
// distinct address in addrs a gratuitous ARP (IPv4, IPv4-mapped IPv6
// included) or an unsolicited Neighbor Advertisement (IPv6), then an
// unsolicited Neighbor Advertisement for LinkLocal(mac) unless addrs already
// holds it. Zones are ignored.
//
// It returns an error if mac is not a 6-byte Ethernet address or an address
// cannot be announced (invalid, or an unspecified or multicast IPv6 address).
func Frames(mac net.HardwareAddr, addrs []netip.Addr) ([][]byte, error) {
	rarp, err := RARP(mac)
	if err != nil {
		return nil, err
	}
	frames := make([][]byte, 0, len(addrs)+2)
	frames = append(frames, rarp)
	ll := LinkLocal(mac)
	seen := make(map[netip.Addr]bool, len(addrs))
	for _, a := range addrs {
		a = a.Unmap().WithZone("")
		if seen[a] {
			continue
		}
		seen[a] = true
		var frame []byte
		switch {
		case a.Is4():
			frame, err = GratuitousARP(mac, a)
		case a.Is6():
			frame, err = UnsolicitedNA(mac, a)
		default:
			err = fmt.Errorf("announce: invalid address %v", a)
		}
		if err != nil {
			return nil, err
		}
		frames = append(frames, frame)
	}
	if !seen[ll] {
		frame, err := UnsolicitedNA(mac, ll)
		if err != nil {
			return nil, err
		}
		frames = append(frames, frame)
	}
	return frames, nil
}

// Learner learns a guest's IP addresses from the frames the guest transmits.
// It keeps up to MaxAddrs addresses of each family, most recently seen first.
//
// The zero value is not usable; use NewLearner. A Learner is safe for
// concurrent use.
type Learner struct {
	// mac is the guest's Ethernet address. It is immutable.
	mac tcpip.LinkAddress

	// mu protects the fields below.
	mu sync.Mutex

	// v4 and v6 hold the learned addresses, most recently seen first, at
	// most MaxAddrs each.
	v4 []netip.Addr
	v6 []netip.Addr
}

// NewLearner returns a Learner for the guest whose Ethernet address is mac.
// mac is copied. If mac is not a 6-byte Ethernet address, the Learner never
// learns anything.
func NewLearner(mac net.HardwareAddr) *Learner {
	return &Learner{mac: tcpip.LinkAddress(mac)}
}

// Observe inspects frame, an Ethernet frame (without FCS or virtio-net
// header) the guest transmitted, and remembers the address it reveals, if
// any:
//   - the sender IPv4 address of an ARP request or reply whose Ethernet
//     source and ARP sender hardware address are the guest's, unless it is
//     0.0.0.0, multicast or 255.255.255.255;
//   - the source address of an IPv6 packet whose Ethernet source is the
//     guest's, if it is a unicast address other than ::, ::1 and IPv4-mapped
//     addresses.
//
// An address seen again moves to the front; when a family already holds
// MaxAddrs addresses the least recently seen one is dropped. Anything else,
// including malformed or truncated frames, is ignored. Observe does not
// retain frame.
func (l *Learner) Observe(frame []byte) {
	if len(l.mac) != header.EthernetAddressSize || len(frame) < header.EthernetMinimumSize {
		return
	}
	eth := header.Ethernet(frame)
	if eth.SourceAddress() != l.mac {
		return
	}
	payload := frame[header.EthernetMinimumSize:]
	switch eth.Type() {
	case header.ARPProtocolNumber:
		arp := header.ARP(payload)
		if !arp.IsValid() {
			return
		}
		if op := arp.Op(); op != header.ARPRequest && op != header.ARPReply {
			return
		}
		if tcpip.LinkAddress(arp.HardwareAddressSender()) != l.mac {
			return
		}
		ip := netip.AddrFrom4([4]byte(arp.ProtocolAddressSender()))
		if ip.IsUnspecified() || ip.IsMulticast() || ip == netip.AddrFrom4([4]byte{255, 255, 255, 255}) {
			return
		}
		l.remember(&l.v4, ip)
	case header.IPv6ProtocolNumber:
		ipv6 := header.IPv6(payload)
		if !ipv6.IsValid(len(payload)) {
			return
		}
		src := ipv6.SourceAddress()
		if !header.IsV6UnicastAddress(src) || header.IsV6LoopbackAddress(src) || header.IsV4MappedAddress(src) {
			return
		}
		l.remember(&l.v6, netip.AddrFrom16(src.As16()))
	}
}

// remember moves ip to the front of *list, inserting it if absent and
// dropping the last address if that makes the list longer than MaxAddrs.
func (l *Learner) remember(list *[]netip.Addr, ip netip.Addr) {
	l.mu.Lock()
	defer l.mu.Unlock()
	s := *list
	i := 0
	for i < len(s) && s[i] != ip {
		i++
	}
	switch {
	case i < len(s):
		// Seen before: shift s[:i] right by one.
	case len(s) < MaxAddrs:
		s = append(s, netip.Addr{})
	default:
		i = len(s) - 1 // Full: drop the least recently seen.
	}
	copy(s[1:i+1], s[:i])
	s[0] = ip
	*list = s
}

// Addrs returns the learned addresses: the IPv4 ones, most recently seen
// first, followed by the IPv6 ones, most recently seen first. The slice is
// the caller's.
func (l *Learner) Addrs() []netip.Addr {
	l.mu.Lock()
	defer l.mu.Unlock()
	addrs := make([]netip.Addr, 0, len(l.v4)+len(l.v6))
	addrs = append(addrs, l.v4...)
	return append(addrs, l.v6...)
}
