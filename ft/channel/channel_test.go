package channel

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gokvm-ft/gokvm-ft/internal/netproxy"
)

var testKey = []byte("0123456789abcdef-test-key")

// pair connects a primary (listening) and a backup through addr (the
// listener's, or a proxy's in front of it).
func pair(t *testing.T, pcfg, bcfg Config, via func(target string) string) (p, b *Conn, perr, berr error) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	addr := ln.Addr().String()
	if via != nil {
		addr = via(addr)
	}
	pcfg.Role, bcfg.Role = Primary, Backup
	done := make(chan struct{})
	go func() {
		defer close(done)
		nc, err := ln.Accept()
		if err != nil {
			perr = err
			return
		}
		p, perr = Handshake(nc, pcfg)
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	b, berr = Dial(ctx, addr, bcfg)
	if berr == nil {
		b.Start()
	}
	<-done
	t.Cleanup(func() {
		if p != nil {
			p.Abort()
		}
		if b != nil {
			b.Abort()
		}
	})
	return
}

// viaProxy puts a proxy (returned in *px) between the ends of a pair.
func viaProxy(t *testing.T, px **netproxy.Proxy) func(target string) string {
	return func(target string) string {
		var err error
		if *px, err = netproxy.New(target); err != nil {
			t.Fatal(err)
		}
		return (*px).Addr()
	}
}

// A burst of control messages that the owner reads late (a busy host)
// waits for it: none lost, in order, and the channel stays up.
func TestControlReadLate(t *testing.T) {
	p, b, perr, berr := pair(t, Config{Key: testKey}, Config{Key: testKey}, nil)
	if perr != nil || berr != nil {
		t.Fatalf("handshake: %v / %v", perr, berr)
	}
	const n = 200 // well over the queue's length
	for i := range n {
		if err := p.SendControl([]byte{byte(i)}); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(100 * time.Millisecond) // under Timeout: the backup reads nothing meanwhile
	for i := range n {
		select {
		case m := <-b.Control():
			if len(m) != 1 || m[0] != byte(i) {
				t.Fatalf("control message %d: %v", i, m)
			}
		case <-b.Dead():
			t.Fatalf("after %d control messages the channel died: %v", i, b.Err())
		case <-time.After(5 * time.Second):
			t.Fatalf("control message %d did not come", i)
		}
	}
	// The log behind them still flows.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := p.LogWriter().Write([]byte("after")); err != nil {
		t.Fatal(err)
	}
	if err := p.WaitAcked(ctx, 5); err != nil {
		t.Fatal(err)
	}
}

func TestHandshakeAndLog(t *testing.T) {
	p, b, perr, berr := pair(t, Config{Key: testKey, Compat: []byte("P")}, Config{Key: testKey, Compat: []byte("B")}, nil)
	if perr != nil || berr != nil {
		t.Fatalf("handshake: %v / %v", perr, berr)
	}
	if string(p.Peer()) != "B" || string(b.Peer()) != "P" {
		t.Fatalf("compat records: %q %q", p.Peer(), b.Peer())
	}
	// 3 MiB in one write travels in several frames and arrives whole.
	want := bytes.Repeat([]byte("gokvm-ft log "), 3<<20/13)
	if _, err := p.LogWriter().Write(want); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := p.WaitAcked(ctx, int64(len(want))); err != nil {
		t.Fatal(err)
	}
	var got bytes.Buffer
	r := b.LogReader()
	buf := make([]byte, 100000)
	for got.Len() < len(want) {
		n, err := r.Read(buf)
		got.Write(buf[:n])
		if err == io.EOF {
			t.Fatalf("read %d of %d bytes, then EOF although all were acknowledged", got.Len(), len(want))
		}
	}
	if !bytes.Equal(got.Bytes(), want) {
		t.Fatal("the log arrived changed")
	}
	if n, err := r.Read(buf); n != 0 || err != io.EOF {
		t.Fatalf("read past the log: %d, %v", n, err)
	}
	// Control messages, and a goodbye that the peer sees as such.
	if err := b.SendControl([]byte("status?")); err != nil {
		t.Fatal(err)
	}
	select {
	case m := <-p.Control():
		if string(m) != "status?" {
			t.Fatalf("control %q", m)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no control message")
	}
	p.Close("guest powered off")
	select {
	case <-b.Dead():
	case <-time.After(5 * time.Second):
		t.Fatal("the backup did not see the goodbye")
	}
	var bye *ByeError
	if !errors.As(b.Err(), &bye) || bye.Reason != "guest powered off" {
		t.Fatalf("backup's end: %v", b.Err())
	}
}

func TestHandshakeRefusals(t *testing.T) {
	other := []byte("fedcba9876543210-other-key")
	_, _, perr, berr := pair(t, Config{Key: testKey}, Config{Key: other}, nil)
	for _, err := range []error{perr, berr} {
		if !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), "-key") {
			t.Errorf("wrong key: %v", err)
		}
	}
	incompatible := func(peer []byte) error {
		if string(peer) != "mem=256M" {
			return errors.New("guest memory differs: " + string(peer))
		}
		return nil
	}
	_, _, perr, berr = pair(t, Config{Key: testKey, Compat: []byte("mem=256M"), Check: incompatible}, Config{Key: testKey, Compat: []byte("mem=512M"), Check: incompatible}, nil)
	for _, err := range []error{perr, berr} {
		if !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), "guest memory differs") {
			t.Errorf("incompatible: %v", err)
		}
	}
	// Guest data never reaches an unauthenticated peer: the compatibility
	// record follows the proofs.
	if _, err := Handshake(nil, Config{Key: []byte("short"), Role: Primary}); err == nil || !strings.Contains(err.Error(), "fewer than") {
		t.Errorf("short key: %v", err)
	}
}

// A peer that is not a gokvm-ft backup (or is a hostile one) is refused
// with a message, and a huge frame announcement does not allocate.
func TestHandshakeWithStranger(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	for _, garbage := range [][]byte{
		[]byte("GET / HTTP/1.0\r\n\r\n"),
		{mHello, 0xff, 0xff, 0xff, 0xff},
		{mHello, 0, 0, 0, 3, 0, 1, 1},
	} {
		errc := make(chan error, 1)
		go func() {
			nc, err := ln.Accept()
			if err != nil {
				errc <- err
				return
			}
			_, err = Handshake(nc, Config{Key: testKey, Role: Primary, HandshakeTimeout: 2 * time.Second})
			errc <- err
		}()
		nc, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		nc.Write(garbage)
		err = <-errc
		nc.Close()
		if err == nil {
			t.Fatalf("%q: accepted", garbage)
		}
		t.Logf("%q: %v", garbage, err)
	}
}

func TestPeerLostWhenSilent(t *testing.T) {
	var px *netproxy.Proxy
	cfg := Config{Key: testKey, Timeout: 150 * time.Millisecond, Heartbeat: 20 * time.Millisecond}
	p, b, perr, berr := pair(t, cfg, cfg, viaProxy(t, &px))
	if perr != nil || berr != nil {
		t.Fatalf("handshake: %v / %v", perr, berr)
	}
	defer px.Close()
	time.Sleep(300 * time.Millisecond) // heartbeats keep it alive
	select {
	case <-p.Dead():
		t.Fatalf("primary declared the backup lost while it was alive: %v", p.Err())
	case <-b.Dead():
		t.Fatalf("backup declared the primary lost while it was alive: %v", b.Err())
	default:
	}
	// Cut the wire without closing it: both ends notice within the timeout.
	cut := time.Now()
	px.Freeze(netproxy.Forward, true)
	px.Freeze(netproxy.Back, true)
	for _, c := range []*Conn{p, b} {
		select {
		case <-c.Dead():
		case <-time.After(2 * time.Second):
			t.Fatal("no loss detected")
		}
		if !errors.Is(c.Err(), ErrPeerLost) {
			t.Fatalf("loss: %v", c.Err())
		}
	}
	took := time.Since(cut)
	t.Logf("loss detected after %v (timeout 150ms): %v", took, b.Err())
	// The timeout counts from the last frame heard, which went out up to
	// one and a half heartbeat periods before the cut (a quiet end checks
	// every half period whether it has been quiet for a whole one).
	if took < 150*time.Millisecond-2*cfg.Heartbeat {
		t.Fatalf("loss declared after %v, before the timeout", took)
	}
	if _, err := p.LogWriter().Write([]byte("x")); !errors.Is(err, ErrPeerLost) {
		t.Fatalf("write after loss: %v", err)
	}
}

// Heartbeats keep a pair together while the host's CPUs are busy and the
// garbage collector runs hard: no false failover.
func TestNoFalseLossUnderLoad(t *testing.T) {
	cfg := Config{Key: testKey, Timeout: 200 * time.Millisecond}
	p, b, perr, berr := pair(t, cfg, cfg, nil)
	if perr != nil || berr != nil {
		t.Fatalf("handshake: %v / %v", perr, berr)
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	defer wg.Wait()
	defer close(stop)
	for i := 0; i < max(2, runtime.NumCPU()); i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			var keep [][]byte
			for {
				select {
				case <-stop:
					return
				default:
				}
				if i%2 == 0 {
					keep = append(keep, make([]byte, 1<<20)) // garbage
					if len(keep) > 64 {
						keep = nil
						runtime.GC()
					}
				} else {
					x := 0
					for k := 0; k < 1e6; k++ {
						x += k
					}
					_ = x
				}
			}
		}(i)
	}
	// Log flows meanwhile too, and the backup applies it as it comes.
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			case <-time.After(time.Millisecond):
				b.SetApplied(b.Received())
			}
		}
	}()
	w := p.LogWriter()
	deadline := time.Now().Add(3 * time.Second)
	for time.Now().Before(deadline) {
		if _, err := w.Write(make([]byte, 4096)); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Millisecond)
	}
	select {
	case <-p.Dead():
		t.Fatalf("false loss at the primary: %v", p.Err())
	case <-b.Dead():
		t.Fatalf("false loss at the backup: %v", b.Err())
	default:
	}
}

// The primary's writes wait while too much log is unacknowledged (flow
// control) and while the backup's replay lags too far behind.
func TestFlowControlAndLag(t *testing.T) {
	var px *netproxy.Proxy
	cfg := Config{Key: testKey, Timeout: 2 * time.Second, MaxUnacked: 64 << 10, MaxLag: -1}
	p, b, perr, berr := pair(t, cfg, Config{Key: testKey, Timeout: 2 * time.Second}, viaProxy(t, &px))
	if perr != nil || berr != nil {
		t.Fatalf("handshake: %v / %v", perr, berr)
	}
	defer px.Close()
	const ackDelay = 100 * time.Millisecond
	px.Delay(netproxy.Back, ackDelay)
	w := p.LogWriter()
	start := time.Now()
	for i := 0; i < 4; i++ {
		if _, err := w.Write(make([]byte, 64<<10)); err != nil {
			t.Fatal(err)
		}
	}
	// Each write beyond the first must wait for the previous one's ack.
	if took := time.Since(start); took < 3*ackDelay {
		t.Fatalf("4 writes of the window took %v with acks delayed %v: no flow control", took, ackDelay)
	}
	px.Delay(netproxy.Back, 0)

	// Lag: the backup receives but does not apply.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := p.WaitAcked(ctx, 4*64<<10); err != nil {
		t.Fatal(err)
	}
	b.SetApplied(b.Received())
	for p.Lag() != 0 {
		if ctx.Err() != nil {
			t.Fatal("the backup's applied offset never reached the primary")
		}
		time.Sleep(5 * time.Millisecond)
	}
	p.cfg.MaxLag = 100 * time.Millisecond
	p.cfg.MaxUnacked = 16 << 20
	if _, err := w.Write([]byte("a")); err != nil {
		t.Fatal(err)
	}
	done := make(chan time.Time, 1)
	go func() {
		time.Sleep(150 * time.Millisecond) // over MaxLag: the next write waits
		w.Write([]byte("b"))
		done <- time.Now()
	}()
	time.Sleep(400 * time.Millisecond)
	select {
	case <-done:
		t.Fatal("a write went through while the backup lagged over MaxLag")
	default:
	}
	applied := time.Now()
	b.SetApplied(b.Received())
	select {
	case at := <-done:
		t.Logf("write released %v after the backup caught up", at.Sub(applied))
	case <-time.After(2 * time.Second):
		t.Fatal("the write stayed blocked after the backup caught up")
	}
	if lag := p.Lag(); lag > time.Second {
		t.Fatalf("lag %v", lag)
	}
}
