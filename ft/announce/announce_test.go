package announce

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"sync"
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

var (
	guestMAC = net.HardwareAddr{0x52, 0x54, 0x00, 0x12, 0x34, 0x56}
	otherMAC = net.HardwareAddr{0x52, 0x54, 0x00, 0xab, 0xcd, 0xef}
	zeroMAC  = net.HardwareAddr{0, 0, 0, 0, 0, 0}
	bcastMAC = net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}
)

// checkEth checks frame's length and Ethernet header and returns its payload.
func checkEth(t *testing.T, frame []byte, dst, src net.HardwareAddr, typ uint16) []byte {
	t.Helper()
	if len(frame) < MinFrameSize {
		t.Fatalf("frame is %d bytes, want at least %d", len(frame), MinFrameSize)
	}
	eth := header.Ethernet(frame)
	if got := net.HardwareAddr(eth.DestinationAddress()); !bytes.Equal(got, dst) {
		t.Errorf("Ethernet dst = %v, want %v", got, dst)
	}
	if got := net.HardwareAddr(eth.SourceAddress()); !bytes.Equal(got, src) {
		t.Errorf("Ethernet src = %v, want %v", got, src)
	}
	if got := binary.BigEndian.Uint16(frame[12:14]); got != typ || uint16(eth.Type()) != typ {
		t.Errorf("ethertype = %#04x, want %#04x", got, typ)
	}
	return frame[header.EthernetMinimumSize:]
}

// checkARP checks an IPv4-over-Ethernet ARP payload field by field, by hand.
func checkARP(t *testing.T, p []byte, op uint16, sha net.HardwareAddr, spa netip.Addr, tha net.HardwareAddr, tpa netip.Addr) {
	t.Helper()
	if !header.ARP(p).IsValid() {
		t.Fatalf("ARP payload % x is not IPv4 over Ethernet", p)
	}
	if got := binary.BigEndian.Uint16(p[0:2]); got != 1 {
		t.Errorf("htype = %d, want 1", got)
	}
	if got := binary.BigEndian.Uint16(p[2:4]); got != 0x0800 {
		t.Errorf("ptype = %#04x, want 0x0800", got)
	}
	if p[4] != 6 || p[5] != 4 {
		t.Errorf("hlen, plen = %d, %d, want 6, 4", p[4], p[5])
	}
	if got := binary.BigEndian.Uint16(p[6:8]); got != op {
		t.Errorf("op = %d, want %d", got, op)
	}
	if got := net.HardwareAddr(p[8:14]); !bytes.Equal(got, sha) {
		t.Errorf("sender HW = %v, want %v", got, sha)
	}
	if got := netip.AddrFrom4([4]byte(p[14:18])); got != spa {
		t.Errorf("sender IP = %v, want %v", got, spa)
	}
	if got := net.HardwareAddr(p[18:24]); !bytes.Equal(got, tha) {
		t.Errorf("target HW = %v, want %v", got, tha)
	}
	if got := netip.AddrFrom4([4]byte(p[24:28])); got != tpa {
		t.Errorf("target IP = %v, want %v", got, tpa)
	}
	if pad := p[header.ARPSize:]; !bytes.Equal(pad, make([]byte, len(pad))) {
		t.Errorf("padding % x is not zero", pad)
	}
}

// onesSum adds b as big-endian 16-bit words to sum, padding an odd tail.
func onesSum(sum uint32, b []byte) uint32 {
	for len(b) >= 2 {
		sum += uint32(b[0])<<8 | uint32(b[1])
		b = b[2:]
	}
	if len(b) == 1 {
		sum += uint32(b[0]) << 8
	}
	return sum
}

// icmpv6ChecksumOK recomputes the ICMPv6 checksum of msg (RFC 4443 section
// 2.3, pseudo-header of RFC 8200 section 8.1) independently of gVisor.
func icmpv6ChecksumOK(src, dst netip.Addr, msg []byte) bool {
	s16, d16 := src.As16(), dst.As16()
	var pseudo [40]byte
	copy(pseudo[0:16], s16[:])
	copy(pseudo[16:32], d16[:])
	binary.BigEndian.PutUint32(pseudo[32:36], uint32(len(msg)))
	pseudo[39] = 58
	sum := onesSum(onesSum(0, pseudo[:]), msg)
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return sum == 0xffff
}

// checkNA checks an unsolicited neighbour advertisement frame.
func checkNA(t *testing.T, frame []byte, mac net.HardwareAddr, ip netip.Addr) {
	t.Helper()
	allNodes := netip.MustParseAddr("ff02::1")
	p := checkEth(t, frame, net.HardwareAddr{0x33, 0x33, 0, 0, 0, 1}, mac, 0x86dd)
	ipv6 := header.IPv6(p)
	if !ipv6.IsValid(len(p)) {
		t.Fatalf("invalid IPv6 packet % x", p)
	}
	if v := header.IPVersion(p); v != 6 {
		t.Errorf("IP version = %d, want 6", v)
	}
	if tc, fl := ipv6.TOS(); tc != 0 || fl != 0 {
		t.Errorf("traffic class, flow label = %d, %d, want 0, 0", tc, fl)
	}
	if got := ipv6.NextHeader(); got != 58 {
		t.Errorf("next header = %d, want 58", got)
	}
	if got := ipv6.HopLimit(); got != 255 {
		t.Errorf("hop limit = %d, want 255", got)
	}
	if got := netip.AddrFrom16(ipv6.SourceAddress().As16()); got != ip {
		t.Errorf("IPv6 src = %v, want %v", got, ip)
	}
	if got := netip.AddrFrom16(ipv6.DestinationAddress().As16()); got != allNodes {
		t.Errorf("IPv6 dst = %v, want %v", got, allNodes)
	}
	const icmpLen = 4 + 4 + 16 + 8
	if got := ipv6.PayloadLength(); got != icmpLen {
		t.Fatalf("payload length = %d, want %d", got, icmpLen)
	}
	if got := len(frame); got != 14+40+icmpLen {
		t.Errorf("frame length = %d, want %d", got, 14+40+icmpLen)
	}
	msg := ipv6.Payload()[:icmpLen]
	icmp := header.ICMPv6(msg)
	if icmp.Type() != header.ICMPv6NeighborAdvert || msg[0] != 136 {
		t.Errorf("ICMPv6 type = %d, want 136", msg[0])
	}
	if icmp.Code() != 0 {
		t.Errorf("ICMPv6 code = %d, want 0", icmp.Code())
	}
	if !icmpv6ChecksumOK(ip, allNodes, msg) {
		t.Errorf("ICMPv6 checksum %#04x does not verify", icmp.Checksum())
	}
	want := header.ICMPv6Checksum(header.ICMPv6ChecksumParams{
		Header: icmp,
		Src:    tcpip.AddrFrom16(ip.As16()),
		Dst:    header.IPv6AllNodesMulticastAddress,
	})
	if got := icmp.Checksum(); got != want {
		t.Errorf("ICMPv6 checksum = %#04x, gVisor computes %#04x", got, want)
	}
	na := header.NDPNeighborAdvert(icmp.MessageBody())
	if na.RouterFlag() || na.SolicitedFlag() || !na.OverrideFlag() {
		t.Errorf("flags R, S, O = %t, %t, %t, want false, false, true", na.RouterFlag(), na.SolicitedFlag(), na.OverrideFlag())
	}
	if msg[4] != 0x20 || !bytes.Equal(msg[5:8], []byte{0, 0, 0}) {
		t.Errorf("flags and reserved = % x, want 20 00 00 00", msg[4:8])
	}
	if got := netip.AddrFrom16(na.TargetAddress().As16()); got != ip {
		t.Errorf("target = %v, want %v", got, ip)
	}
	// The option by hand: type 2, length 1 (8 bytes), the MAC.
	if opt := msg[24:32]; opt[0] != 2 || opt[1] != 1 || !bytes.Equal(opt[2:8], mac) {
		t.Errorf("option = % x, want 02 01 %x", opt, []byte(mac))
	}
	// And through gVisor's option parser.
	it, err := na.Options().Iter(true)
	if err != nil {
		t.Fatalf("NDP options: %v", err)
	}
	var n int
	for {
		opt, done, err := it.Next()
		if err != nil {
			t.Fatalf("NDP options: %v", err)
		}
		if done {
			break
		}
		n++
		tlla, ok := opt.(header.NDPTargetLinkLayerAddressOption)
		if !ok {
			t.Errorf("option %v, want a target link-layer address", opt)
			continue
		}
		if got := net.HardwareAddr(tlla.EthernetAddress()); !bytes.Equal(got, mac) {
			t.Errorf("target link-layer address = %v, want %v", got, mac)
		}
	}
	if n != 1 {
		t.Errorf("%d NDP options, want 1", n)
	}
}

func TestGratuitousARP(t *testing.T) {
	ip := netip.MustParseAddr("192.168.7.42")
	frame, err := GratuitousARP(guestMAC, ip)
	if err != nil {
		t.Fatal(err)
	}
	if len(frame) != MinFrameSize {
		t.Errorf("frame is %d bytes, want %d", len(frame), MinFrameSize)
	}
	p := checkEth(t, frame, bcastMAC, guestMAC, 0x0806)
	checkARP(t, p, 1, guestMAC, ip, zeroMAC, ip)
}

func TestRARP(t *testing.T) {
	frame, err := RARP(guestMAC)
	if err != nil {
		t.Fatal(err)
	}
	if len(frame) != MinFrameSize {
		t.Errorf("frame is %d bytes, want %d", len(frame), MinFrameSize)
	}
	p := checkEth(t, frame, bcastMAC, guestMAC, 0x8035)
	zero := netip.AddrFrom4([4]byte{})
	checkARP(t, p, 3, guestMAC, zero, guestMAC, zero)
}

func TestUnsolicitedNA(t *testing.T) {
	for _, s := range []string{"2001:db8::1", "fe80::5054:ff:fe12:3456", "fd00:1:2:3:4:5:6:7", "2001:db8:ffff:ffff:ffff:ffff:ffff:fffe"} {
		t.Run(s, func(t *testing.T) {
			ip := netip.MustParseAddr(s)
			frame, err := UnsolicitedNA(guestMAC, ip)
			if err != nil {
				t.Fatal(err)
			}
			checkNA(t, frame, guestMAC, ip)
		})
	}
}

func TestZoneIgnored(t *testing.T) {
	frame, err := UnsolicitedNA(guestMAC, netip.MustParseAddr("fe80::1%eth0"))
	if err != nil {
		t.Fatal(err)
	}
	checkNA(t, frame, guestMAC, netip.MustParseAddr("fe80::1"))
}

func TestErrors(t *testing.T) {
	v4 := netip.MustParseAddr("10.0.0.1")
	v6 := netip.MustParseAddr("2001:db8::1")
	badMACs := []net.HardwareAddr{nil, {1, 2, 3, 4, 5}, {1, 2, 3, 4, 5, 6, 7, 8}}
	for _, mac := range badMACs {
		if _, err := GratuitousARP(mac, v4); err == nil {
			t.Errorf("GratuitousARP(%v, %v) succeeded", mac, v4)
		}
		if _, err := RARP(mac); err == nil {
			t.Errorf("RARP(%v) succeeded", mac)
		}
		if _, err := UnsolicitedNA(mac, v6); err == nil {
			t.Errorf("UnsolicitedNA(%v, %v) succeeded", mac, v6)
		}
		if _, err := Frames(mac, nil); err == nil {
			t.Errorf("Frames(%v, nil) succeeded", mac)
		}
		if ll := LinkLocal(mac); ll.IsValid() {
			t.Errorf("LinkLocal(%v) = %v, want the zero Addr", mac, ll)
		}
	}
	for _, ip := range []netip.Addr{{}, v6, netip.MustParseAddr("::ffff:10.0.0.1")} {
		if _, err := GratuitousARP(guestMAC, ip); err == nil {
			t.Errorf("GratuitousARP(%v) succeeded", ip)
		}
	}
	for _, ip := range []netip.Addr{{}, v4, netip.MustParseAddr("::ffff:10.0.0.1"), netip.MustParseAddr("::"), netip.MustParseAddr("ff02::1")} {
		if _, err := UnsolicitedNA(guestMAC, ip); err == nil {
			t.Errorf("UnsolicitedNA(%v) succeeded", ip)
		}
	}
	if _, err := Frames(guestMAC, []netip.Addr{{}}); err == nil {
		t.Error("Frames with an invalid address succeeded")
	}
	if _, err := Frames(guestMAC, []netip.Addr{netip.MustParseAddr("ff02::1")}); err == nil {
		t.Error("Frames with a multicast address succeeded")
	}
}

func TestLinkLocal(t *testing.T) {
	for _, tc := range []struct {
		mac  net.HardwareAddr
		want string
	}{
		{guestMAC, "fe80::5054:ff:fe12:3456"},
		{net.HardwareAddr{0x00, 0x11, 0x22, 0x33, 0x44, 0x55}, "fe80::211:22ff:fe33:4455"},
		{net.HardwareAddr{0x02, 0, 0, 0, 0, 1}, "fe80::ff:fe00:1"},
	} {
		if got := LinkLocal(tc.mac); got != netip.MustParseAddr(tc.want) {
			t.Errorf("LinkLocal(%v) = %v, want %s", tc.mac, got, tc.want)
		}
	}
}

// arpFrameFrom crafts an ARP frame the guest might send, by hand.
func arpFrameFrom(ethSrc, sha net.HardwareAddr, op uint16, spa, tpa netip.Addr) []byte {
	f := make([]byte, 60)
	copy(f[0:6], bcastMAC)
	copy(f[6:12], ethSrc)
	binary.BigEndian.PutUint16(f[12:], 0x0806)
	p := f[14:]
	binary.BigEndian.PutUint16(p[0:], 1)
	binary.BigEndian.PutUint16(p[2:], 0x0800)
	p[4], p[5] = 6, 4
	binary.BigEndian.PutUint16(p[6:], op)
	copy(p[8:14], sha)
	s, d := spa.As4(), tpa.As4()
	copy(p[14:18], s[:])
	copy(p[24:28], d[:])
	return f[:42] // unpadded, as a guest may hand it to virtio-net
}

// ipv6FrameFrom crafts an IPv6/UDP frame (8-byte UDP header, no data).
func ipv6FrameFrom(ethSrc net.HardwareAddr, src netip.Addr) []byte {
	f := make([]byte, 14+40+8)
	copy(f[0:6], otherMAC)
	copy(f[6:12], ethSrc)
	binary.BigEndian.PutUint16(f[12:], 0x86dd)
	header.IPv6(f[14:]).Encode(&header.IPv6Fields{
		PayloadLength:     8,
		TransportProtocol: header.UDPProtocolNumber,
		HopLimit:          64,
		SrcAddr:           tcpip.AddrFrom16(src.As16()),
		DstAddr:           tcpip.AddrFrom16(netip.MustParseAddr("2001:db8::99").As16()),
	})
	return f
}

func addrs(ss ...string) []netip.Addr {
	var a []netip.Addr
	for _, s := range ss {
		a = append(a, netip.MustParseAddr(s))
	}
	return a
}

func TestLearnerLearns(t *testing.T) {
	l := NewLearner(guestMAC)
	if got := l.Addrs(); len(got) != 0 {
		t.Fatalf("new Learner has %v", got)
	}
	l.Observe(ipv6FrameFrom(guestMAC, netip.MustParseAddr("2001:db8::5")))
	l.Observe(arpFrameFrom(guestMAC, guestMAC, 2, netip.MustParseAddr("10.1.2.3"), netip.MustParseAddr("10.1.2.1")))
	l.Observe(arpFrameFrom(guestMAC, guestMAC, 1, netip.MustParseAddr("10.1.2.4"), netip.MustParseAddr("10.1.2.1")))
	l.Observe(ipv6FrameFrom(guestMAC, LinkLocal(guestMAC)))
	want := addrs("10.1.2.4", "10.1.2.3", "fe80::5054:ff:fe12:3456", "2001:db8::5")
	if got := l.Addrs(); !slices.Equal(got, want) {
		t.Errorf("Addrs() = %v, want %v", got, want)
	}
	// Addrs returns a copy.
	got := l.Addrs()
	got[0] = netip.Addr{}
	if l.Addrs()[0] != want[0] {
		t.Error("Addrs() aliases the Learner's state")
	}
}

func TestLearnerIgnores(t *testing.T) {
	v4 := netip.MustParseAddr("10.1.2.3")
	gw := netip.MustParseAddr("10.1.2.1")
	v6 := netip.MustParseAddr("2001:db8::5")
	wrongType := arpFrameFrom(guestMAC, guestMAC, 1, v4, gw)
	binary.BigEndian.PutUint16(wrongType[12:], 0x0800)
	badHType := arpFrameFrom(guestMAC, guestMAC, 1, v4, gw)
	badHType[15] = 6
	badVersion := ipv6FrameFrom(guestMAC, v6)
	badVersion[14] = 0x40
	badLength := ipv6FrameFrom(guestMAC, v6)
	binary.BigEndian.PutUint16(badLength[14+4:], 9)
	for name, frame := range map[string][]byte{
		"ARP from other MAC":          arpFrameFrom(otherMAC, otherMAC, 2, v4, gw),
		"ARP with other sender HW":    arpFrameFrom(guestMAC, otherMAC, 2, v4, gw),
		"ARP via other Ethernet src":  arpFrameFrom(otherMAC, guestMAC, 2, v4, gw),
		"ARP probe":                   arpFrameFrom(guestMAC, guestMAC, 1, netip.AddrFrom4([4]byte{}), v4),
		"ARP multicast sender":        arpFrameFrom(guestMAC, guestMAC, 1, netip.MustParseAddr("224.0.0.1"), gw),
		"ARP broadcast sender":        arpFrameFrom(guestMAC, guestMAC, 1, netip.MustParseAddr("255.255.255.255"), gw),
		"RARP opcode":                 arpFrameFrom(guestMAC, guestMAC, 3, v4, gw),
		"ARP bad hardware type":       badHType,
		"ARP payload as IPv4":         wrongType,
		"IPv6 from other MAC":         ipv6FrameFrom(otherMAC, v6),
		"IPv6 unspecified source":     ipv6FrameFrom(guestMAC, netip.IPv6Unspecified()),
		"IPv6 multicast source":       ipv6FrameFrom(guestMAC, netip.MustParseAddr("ff02::1")),
		"IPv6 loopback source":        ipv6FrameFrom(guestMAC, netip.IPv6Loopback()),
		"IPv6 v4-mapped source":       ipv6FrameFrom(guestMAC, netip.MustParseAddr("::ffff:10.1.2.3")),
		"IPv6 wrong version":          badVersion,
		"IPv6 payload past frame end": badLength,
	} {
		l := NewLearner(guestMAC)
		l.Observe(frame)
		if got := l.Addrs(); len(got) != 0 {
			t.Errorf("%s: learned %v", name, got)
		}
	}
	// A Learner with a bad MAC learns nothing, even from frames sent by a
	// prefix of it.
	l := NewLearner(guestMAC[:5])
	l.Observe(arpFrameFrom(guestMAC, guestMAC, 2, v4, gw))
	l.Observe(ipv6FrameFrom(guestMAC, v6))
	if got := l.Addrs(); len(got) != 0 {
		t.Errorf("Learner with a 5-byte MAC learned %v", got)
	}
}

func TestLearnerTruncated(t *testing.T) {
	for _, frame := range [][]byte{
		arpFrameFrom(guestMAC, guestMAC, 2, netip.MustParseAddr("10.1.2.3"), netip.MustParseAddr("10.1.2.1")),
		ipv6FrameFrom(guestMAC, netip.MustParseAddr("2001:db8::5")),
	} {
		for n := 0; n <= len(frame); n++ {
			l := NewLearner(guestMAC)
			l.Observe(slices.Clone(frame[:n]))
			got := l.Addrs()
			if n < len(frame) && len(got) != 0 {
				t.Errorf("frame truncated to %d of %d bytes: learned %v", n, len(frame), got)
			}
			if n == len(frame) && len(got) != 1 {
				t.Errorf("whole frame: learned %v, want one address", got)
			}
		}
	}
}

func TestLearnerCap(t *testing.T) {
	l := NewLearner(guestMAC)
	gw := netip.MustParseAddr("10.0.0.254")
	v4 := func(i int) netip.Addr { return netip.AddrFrom4([4]byte{10, 0, 0, byte(i)}) }
	v6 := func(i int) netip.Addr { return netip.MustParseAddr(fmt.Sprintf("2001:db8::%x", i)) }
	for i := 1; i <= 12; i++ {
		l.Observe(arpFrameFrom(guestMAC, guestMAC, 1, v4(i), gw))
		l.Observe(ipv6FrameFrom(guestMAC, v6(i)))
	}
	var want []netip.Addr
	for i := 12; i > 4; i-- {
		want = append(want, v4(i))
	}
	for i := 12; i > 4; i-- {
		want = append(want, v6(i))
	}
	if got := l.Addrs(); !slices.Equal(got, want) {
		t.Fatalf("Addrs() = %v, want %v", got, want)
	}
	// Re-observing moves to the front without dropping anything.
	l.Observe(arpFrameFrom(guestMAC, guestMAC, 2, v4(7), gw))
	l.Observe(ipv6FrameFrom(guestMAC, v6(5)))
	l.Observe(ipv6FrameFrom(guestMAC, v6(5)))
	want = []netip.Addr{v4(7), v4(12), v4(11), v4(10), v4(9), v4(8), v4(6), v4(5),
		v6(5), v6(12), v6(11), v6(10), v6(9), v6(8), v6(7), v6(6)}
	if got := l.Addrs(); !slices.Equal(got, want) {
		t.Fatalf("after re-observing: Addrs() = %v, want %v", got, want)
	}
	// A new address now evicts the least recently seen one.
	l.Observe(ipv6FrameFrom(guestMAC, v6(1)))
	if got := l.Addrs()[MaxAddrs:]; !slices.Equal(got, []netip.Addr{v6(1), v6(5), v6(12), v6(11), v6(10), v6(9), v6(8), v6(7)}) {
		t.Errorf("after eviction: IPv6 = %v", got)
	}
}

func TestLearnerConcurrent(t *testing.T) {
	l := NewLearner(guestMAC)
	gw := netip.MustParseAddr("10.0.0.254")
	var wg sync.WaitGroup
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 200; i++ {
				l.Observe(arpFrameFrom(guestMAC, guestMAC, 1, netip.AddrFrom4([4]byte{10, 0, byte(g), byte(i)}), gw))
				l.Observe(ipv6FrameFrom(guestMAC, netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 14: byte(g), 15: byte(i + 1)})))
				if n := len(l.Addrs()); n > 2*MaxAddrs {
					t.Errorf("%d addresses", n)
					return
				}
			}
		}()
	}
	wg.Wait()
	if n := len(l.Addrs()); n != 2*MaxAddrs {
		t.Errorf("%d addresses, want %d", n, 2*MaxAddrs)
	}
}

func TestFrames(t *testing.T) {
	ll := LinkLocal(guestMAC)
	for _, tc := range []struct {
		name  string
		addrs []netip.Addr
		want  int
	}{
		{"none", nil, 2},
		{"one v4", addrs("10.0.0.1"), 3},
		{"v4 and v6", addrs("10.0.0.1", "10.0.0.2", "2001:db8::1"), 5},
		{"with link-local", []netip.Addr{netip.MustParseAddr("10.0.0.1"), ll}, 3},
		{"with zoned link-local", addrs("fe80::5054:ff:fe12:3456%eth0"), 2},
		{"duplicates", addrs("10.0.0.1", "::ffff:10.0.0.1", "2001:db8::1", "2001:db8::1"), 4},
	} {
		t.Run(tc.name, func(t *testing.T) {
			frames, err := Frames(guestMAC, tc.addrs)
			if err != nil {
				t.Fatal(err)
			}
			if len(frames) != tc.want {
				t.Fatalf("%d frames, want %d", len(frames), tc.want)
			}
			var rarp, garp, na int
			var sawLL bool
			for _, f := range frames {
				if len(f) < MinFrameSize {
					t.Errorf("frame of %d bytes", len(f))
				}
				switch header.Ethernet(f).Type() {
				case 0x8035:
					rarp++
				case header.ARPProtocolNumber:
					garp++
				case header.IPv6ProtocolNumber:
					na++
					src := netip.AddrFrom16(header.IPv6(f[14:]).SourceAddress().As16())
					checkNA(t, f, guestMAC, src)
					sawLL = sawLL || src == ll
				}
			}
			if rarp != 1 || header.Ethernet(frames[0]).Type() != 0x8035 {
				t.Errorf("%d RARP frames, want 1, first", rarp)
			}
			if !sawLL {
				t.Error("no neighbour advertisement for the link-local address")
			}
			if rarp+garp+na != len(frames) {
				t.Errorf("unexpected frame types: %d RARP, %d ARP, %d NA of %d", rarp, garp, na, len(frames))
			}
		})
	}

	// The exact sequence for a learned set.
	l := NewLearner(guestMAC)
	l.Observe(arpFrameFrom(guestMAC, guestMAC, 2, netip.MustParseAddr("10.1.2.3"), netip.MustParseAddr("10.1.2.1")))
	l.Observe(ipv6FrameFrom(guestMAC, netip.MustParseAddr("2001:db8::5")))
	frames, err := Frames(guestMAC, l.Addrs())
	if err != nil {
		t.Fatal(err)
	}
	wantRARP, _ := RARP(guestMAC)
	wantGARP, _ := GratuitousARP(guestMAC, netip.MustParseAddr("10.1.2.3"))
	wantNA, _ := UnsolicitedNA(guestMAC, netip.MustParseAddr("2001:db8::5"))
	wantLL, _ := UnsolicitedNA(guestMAC, ll)
	if want := [][]byte{wantRARP, wantGARP, wantNA, wantLL}; !slices.EqualFunc(frames, want, bytes.Equal) {
		t.Errorf("Frames(%v) = %x, want %x", l.Addrs(), frames, want)
	}
}

func FuzzObserve(f *testing.F) {
	v4 := netip.MustParseAddr("10.1.2.3")
	gw := netip.MustParseAddr("10.1.2.1")
	f.Add(arpFrameFrom(guestMAC, guestMAC, 2, v4, gw))
	f.Add(arpFrameFrom(guestMAC, guestMAC, 1, netip.AddrFrom4([4]byte{}), v4))
	f.Add(ipv6FrameFrom(guestMAC, netip.MustParseAddr("2001:db8::5")))
	f.Add(ipv6FrameFrom(guestMAC, LinkLocal(guestMAC)))
	if na, err := UnsolicitedNA(guestMAC, netip.MustParseAddr("2001:db8::7")); err == nil {
		f.Add(na)
	}
	if rarp, err := RARP(guestMAC); err == nil {
		f.Add(rarp)
	}
	f.Add([]byte{})
	f.Add([]byte(guestMAC))
	f.Fuzz(func(t *testing.T, frame []byte) {
		orig := slices.Clone(frame)
		l := NewLearner(guestMAC)
		l.Observe(frame)
		l.Observe(frame)
		if !bytes.Equal(frame, orig) {
			t.Fatal("Observe modified the frame")
		}
		got := l.Addrs()
		if len(got) > 1 {
			t.Fatalf("one frame taught %v", got)
		}
		// Whatever is learned can be announced.
		frames, err := Frames(guestMAC, got)
		if err != nil {
			t.Fatalf("Frames(%v): %v", got, err)
		}
		if want := 2 + len(got); len(frames) < want-1 || len(frames) > want {
			t.Fatalf("Frames(%v) = %d frames", got, len(frames))
		}
	})
}
