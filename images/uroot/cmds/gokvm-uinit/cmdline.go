package main

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// DefaultCounterPort is the counter service's TCP port when gokvm.ip is
// given and gokvm.counter is not.
const DefaultCounterPort = 7777

// NetConfig is a parsed gokvm.ip=ADDR/PREFIX[,GATEWAY].
type NetConfig struct {
	Addr    netip.Prefix // the interface address with its prefix length, e.g. 10.0.2.15/24
	Gateway netip.Addr   // the default route's gateway; invalid (zero) when none was given
}

func (n *NetConfig) String() string {
	s := "eth0 " + n.Addr.String()
	if n.Gateway.IsValid() {
		s += ", default via " + n.Gateway.String()
	}
	return s
}

// Config is what the kernel command line asks of the guest setup. A
// parameter that is absent leaves its field at the zero value; a malformed
// one sets its error (and the other parameter is still honoured).
type Config struct {
	IPParam    string     // the raw gokvm.ip value, for messages ("" when absent)
	Net        *NetConfig // nil: no (valid) gokvm.ip
	NetErr     error      // gokvm.ip is present but malformed
	Counter    int        // counter service TCP port; 0: no counter service
	CounterErr error      // gokvm.counter is present but malformed
	Bulk       int        // bulk-transfer service TCP port; 0: none (the default)
	BulkErr    error      // gokvm.bulk is present but malformed
}

// Params splits a kernel command line into key=value parameters the way
// Linux's next_arg() does: whitespace separates parameters, double quotes
// group (and are removed), a parameter without '=' has the empty value.
// When a key repeats, the last one wins; "--" ends the kernel's part.
func Params(cmdline string) map[string]string {
	m := map[string]string{}
	s := cmdline
	for {
		s = strings.TrimLeft(s, " \t\n\r\v\f")
		if s == "" {
			return m
		}
		var tok strings.Builder
		inQuote := false
		i := 0
		for ; i < len(s); i++ {
			c := s[i]
			if c == '"' {
				inQuote = !inQuote
				continue
			}
			if !inQuote && (c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f') {
				break
			}
			tok.WriteByte(c)
		}
		s = s[i:]
		k, v, _ := strings.Cut(tok.String(), "=")
		if k == "--" {
			// Everything after "--" is for init, not a kernel parameter.
			return m
		}
		m[k] = v
	}
}

// ParseIP parses ADDR/PREFIX[,GATEWAY] (IPv4 or IPv6).
func ParseIP(v string) (*NetConfig, error) {
	addr, gw, hasGW := strings.Cut(v, ",")
	p, err := netip.ParsePrefix(addr)
	if err != nil {
		return nil, fmt.Errorf("address %q is not ADDR/PREFIX", addr)
	}
	if p.Addr().Is4In6() || p.Addr().Zone() != "" {
		return nil, fmt.Errorf("address %q: use a plain IPv4 or IPv6 address", addr)
	}
	if p.Addr().IsUnspecified() || p.Addr().IsMulticast() {
		return nil, fmt.Errorf("address %q is not a unicast address", addr)
	}
	n := &NetConfig{Addr: p}
	if !hasGW {
		return n, nil
	}
	g, err := netip.ParseAddr(gw)
	if err != nil || g.Zone() != "" || g.Is4In6() {
		return nil, fmt.Errorf("gateway %q is not an IP address", gw)
	}
	switch {
	case g.Is4() != p.Addr().Is4():
		return nil, fmt.Errorf("gateway %s and address %s are of different IP versions", g, p)
	case g == p.Addr():
		return nil, fmt.Errorf("gateway %s is the address itself", g)
	case !p.Masked().Contains(g):
		return nil, fmt.Errorf("gateway %s is outside %s", g, p.Masked())
	}
	n.Gateway = g
	return n, nil
}

// ParseCounter parses the gokvm.counter (or gokvm.bulk) value: a TCP port
// 1-65535, or "off". It returns 0 for off.
func ParseCounter(v string) (int, error) {
	if v == "off" {
		return 0, nil
	}
	p, err := strconv.Atoi(v)
	if err != nil || p < 1 || p > 65535 {
		return 0, fmt.Errorf("%q is neither a TCP port (1-65535) nor off", v)
	}
	return p, nil
}

// Parse reads the gokvm.ip, gokvm.counter and gokvm.bulk parameters of a
// kernel command line.
func Parse(cmdline string) Config {
	var c Config
	m := Params(cmdline)
	ip, hasIP := m["gokvm.ip"]
	if hasIP {
		c.IPParam = ip
		c.Net, c.NetErr = ParseIP(ip)
		c.Counter = DefaultCounterPort
	}
	if v, ok := m["gokvm.counter"]; ok {
		c.Counter, c.CounterErr = ParseCounter(v)
	}
	if v, ok := m["gokvm.bulk"]; ok {
		c.Bulk, c.BulkErr = ParseCounter(v)
		if c.Bulk != 0 && c.Bulk == c.Counter {
			c.Bulk, c.BulkErr = 0, fmt.Errorf("port %d is the counter service's", c.Counter)
		}
	}
	return c
}
