// Package netproxy is a TCP proxy for tests of the FT pair's channel: it
// forwards one connection and can delay either direction, freeze it (the
// bytes stop, the connection stays open, as when a cable is cut) or break
// it.
package netproxy

import (
	"io"
	"net"
	"sync"
	"time"
)

// Direction is one way through the proxy.
type Direction int

// Directions: from the dialling side to the listening target, and back.
const (
	Forward Direction = iota
	Back
)

// Proxy accepts on Addr and forwards each connection to a target.
type Proxy struct {
	ln     net.Listener
	target string
	dial   func(addr string) (net.Conn, error)

	mu     sync.Mutex
	delay  [2]time.Duration
	frozen [2]bool
	conns  []net.Conn
	wake   *sync.Cond
}

// New starts a proxy on a loopback port forwarding to target.
func New(target string) (*Proxy, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	return Serve(ln, target, nil), nil
}

// Serve forwards connections accepted on ln to target, dialled with dial
// (net.Dial's TCP if nil): a proxy inside a network namespace listens and
// dials there.
func Serve(ln net.Listener, target string, dial func(addr string) (net.Conn, error)) *Proxy {
	if dial == nil {
		dial = func(addr string) (net.Conn, error) { return net.Dial("tcp", addr) }
	}
	p := &Proxy{ln: ln, target: target, dial: dial}
	p.wake = sync.NewCond(&p.mu)
	go p.serve()
	return p
}

// Addr is where to connect.
func (p *Proxy) Addr() string { return p.ln.Addr().String() }

// Delay holds each chunk going direction d for dt before forwarding it.
func (p *Proxy) Delay(d Direction, dt time.Duration) {
	p.mu.Lock()
	p.delay[d] = dt
	p.mu.Unlock()
}

// Freeze stops (or, with false, resumes) forwarding in direction d; the
// connections stay open.
func (p *Proxy) Freeze(d Direction, on bool) {
	p.mu.Lock()
	p.frozen[d] = on
	p.wake.Broadcast()
	p.mu.Unlock()
}

// Close stops the proxy and breaks its connections.
func (p *Proxy) Close() {
	p.ln.Close()
	p.mu.Lock()
	for _, c := range p.conns {
		c.Close()
	}
	p.frozen = [2]bool{}
	p.wake.Broadcast()
	p.mu.Unlock()
}

func (p *Proxy) serve() {
	for {
		a, err := p.ln.Accept()
		if err != nil {
			return
		}
		b, err := p.dial(p.target)
		if err != nil {
			a.Close()
			continue
		}
		p.mu.Lock()
		p.conns = append(p.conns, a, b)
		p.mu.Unlock()
		go p.pump(Forward, a, b)
		go p.pump(Back, b, a)
	}
}

type chunk struct {
	data []byte
	at   time.Time
}

// pump copies src to dst in direction d, through a queue so that a delay
// holds each chunk without holding the reading.
func (p *Proxy) pump(d Direction, src, dst net.Conn) {
	q := make(chan chunk, 1024)
	go func() {
		defer dst.Close()
		for c := range q {
			p.mu.Lock()
			for p.frozen[d] {
				p.wake.Wait()
			}
			p.mu.Unlock()
			time.Sleep(time.Until(c.at))
			if _, err := dst.Write(c.data); err != nil {
				return
			}
		}
	}()
	defer close(q)
	buf := make([]byte, 64<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			p.mu.Lock()
			dt := p.delay[d]
			p.mu.Unlock()
			q <- chunk{append([]byte(nil), buf[:n]...), time.Now().Add(dt)}
		}
		if err != nil {
			if err != io.EOF {
				src.Close()
			}
			return
		}
	}
}
