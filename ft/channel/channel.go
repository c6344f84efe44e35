package channel

import (
	"bufio"
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// Version is the channel protocol's version; both ends must speak the same.
const Version = 1

// Role is an end's role in the pair.
type Role uint8

// Roles.
const (
	Primary Role = 1
	Backup  Role = 2
)

func (r Role) String() string {
	switch r {
	case Primary:
		return "primary"
	case Backup:
		return "backup"
	}
	return fmt.Sprintf("role(%d)", uint8(r))
}

// Message types on the wire: a frame is type (1 byte), payload length (4
// bytes, big-endian) and the payload.
const (
	mHello     = 1 // version u16, role u8, nonce [32]
	mProof     = 2 // HMAC-SHA256 [32]
	mRefuse    = 3 // why, in words
	mCompat    = 4 // the sender's compatibility record
	mAccept    = 5 // the sender accepts the receiver's compatibility record
	mLog       = 10
	mAck       = 11 // received u64, applied u64
	mHeartbeat = 12
	mBye       = 13 // why, in words
	mControl   = 14
)

// MaxFrame is the largest payload a frame may carry; a peer that announces
// more is refused (it is broken or hostile).
const MaxFrame = 4 << 20

// maxChunk is the most log one frame carries.
const maxChunk = 1 << 20

const proofLabel = "gokvm-ft channel proof v1"

// MinKey is the shortest shared key accepted, in bytes.
const MinKey = 16

var (
	// ErrPeerLost: the peer said nothing for the timeout, or the
	// connection broke.
	ErrPeerLost = errors.New("peer lost")
	// ErrRefused: the handshake failed (authentication or compatibility).
	ErrRefused = errors.New("refused")
)

// ByeError is how a connection ended when the peer said goodbye.
type ByeError struct{ Reason string }

func (e *ByeError) Error() string { return "the peer closed the channel: " + e.Reason }

// Config sets up one end of a channel.
type Config struct {
	// Key is the shared secret (at least MinKey bytes).
	Key  []byte
	Role Role
	// Compat is this end's compatibility record, shown to the peer's
	// Check; Check decides on the peer's (nil accepts any). Neither is
	// sent before both ends have proved they hold Key.
	Compat []byte
	Check  func(peer []byte) error
	// Heartbeat is how often an end that has nothing else to send says it
	// is alive (default 20 ms); Timeout how long an end waits for any
	// word from its peer before it declares it lost (default 200 ms).
	Heartbeat time.Duration
	Timeout   time.Duration
	// HandshakeTimeout bounds the handshake (default 10 s).
	HandshakeTimeout time.Duration
	// MaxUnacked bounds the log in flight (sent, not acknowledged) before
	// LogWriter.Write blocks (default 16 MiB). MaxLag bounds how long ago
	// the oldest log the backup's replay has not yet applied was sent
	// before Write blocks (default 100 ms; negative: no bound). Both slow
	// the primary's guest down rather than let the backup fall behind.
	MaxUnacked int64
	MaxLag     time.Duration
	Logger     *slog.Logger
}

func (c *Config) defaults() {
	if c.Heartbeat <= 0 {
		c.Heartbeat = 20 * time.Millisecond
	}
	if c.Timeout <= 0 {
		c.Timeout = 200 * time.Millisecond
	}
	if c.HandshakeTimeout <= 0 {
		c.HandshakeTimeout = 10 * time.Second
	}
	if c.MaxUnacked <= 0 {
		c.MaxUnacked = 16 << 20
	}
	if c.MaxLag == 0 {
		c.MaxLag = 100 * time.Millisecond
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
}

// Conn is one end of an established channel.
type Conn struct {
	nc        net.Conn
	br        *bufio.Reader
	cfg       Config
	peer      []byte // the peer's compatibility record
	startOnce sync.Once

	wmu      sync.Mutex
	bw       *bufio.Writer
	lastSend atomic.Int64 // unix ns

	mu sync.Mutex
	// Primary: log bytes sent, acknowledged as received, applied by the
	// backup's replay; flights are the sent frames not yet applied.
	sent, acked, applied int64
	flights              []flight
	// Backup: log received and not yet read, and the totals.
	in               []byte
	received         int64
	appliedLocal     int64 // what SetApplied last said
	ackedApplied     int64 // applied as last sent
	arrived, changed chan struct{}
	control          chan []byte

	dead    chan struct{}
	deadErr error

	lastSlowLog time.Time // waitRoom's rate limit (under mu)
}

type flight struct {
	end int64
	at  time.Time
}

// Dial connects to a primary at addr and runs the handshake; the channel
// is established, not started.
func Dial(ctx context.Context, addr string, cfg Config) (*Conn, error) {
	var d net.Dialer
	nc, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	return Establish(nc, cfg)
}

// Establish authenticates the peer on nc and checks compatibility both
// ways, without starting the channel (see Start, Stream). On failure it
// tells the peer why (if it can), closes nc and returns an error wrapping
// ErrRefused (or the connection's error).
func Establish(nc net.Conn, cfg Config) (*Conn, error) {
	cfg.defaults()
	if len(cfg.Key) < MinKey {
		if nc != nil {
			nc.Close()
		}
		return nil, fmt.Errorf("channel: the shared key has %d bytes, fewer than %d", len(cfg.Key), MinKey)
	}
	if cfg.Role != Primary && cfg.Role != Backup {
		nc.Close()
		return nil, fmt.Errorf("channel: bad role %v", cfg.Role)
	}
	c := &Conn{nc: nc, cfg: cfg, bw: bufio.NewWriterSize(nc, 64<<10), arrived: make(chan struct{}, 1),
		changed: make(chan struct{}), control: make(chan []byte, 16), dead: make(chan struct{})}
	nc.SetDeadline(time.Now().Add(cfg.HandshakeTimeout))
	c.br = bufio.NewReader(nc)
	if err := c.handshake(); err != nil {
		nc.Close()
		return nil, err
	}
	nc.SetDeadline(time.Time{})
	return c, nil
}

// Handshake authenticates the peer on nc, checks compatibility both ways
// and starts the channel. On failure it tells the peer why (if it can),
// closes nc and returns an error wrapping ErrRefused (or the connection's
// error).
func Handshake(nc net.Conn, cfg Config) (*Conn, error) {
	c, err := Establish(nc, cfg)
	if err != nil {
		return nil, err
	}
	c.Start()
	return c, nil
}

// Start starts the framed channel (heartbeats, the reading of frames) on
// an established connection. Until then the connection's Stream may carry
// something else, such as the state transfer that makes a backup.
func (c *Conn) Start() {
	c.startOnce.Do(func() {
		c.lastSend.Store(time.Now().UnixNano())
		go c.readLoop()
		go c.heartbeat()
	})
}

// Stream is the established connection as a plain byte stream, for use
// before Start. Its reads come through the channel's own buffer, which
// BufferedReader returns, so that a reader that buffers too (migrate) can
// share it and leave nothing of the framed channel behind in a buffer of
// its own.
func (c *Conn) Stream() *Stream { return &Stream{c} }

// Stream is a Conn before Start.
type Stream struct{ c *Conn }

func (s *Stream) Read(p []byte) (int, error)  { return s.c.br.Read(p) }
func (s *Stream) Write(p []byte) (int, error) { return s.c.nc.Write(p) }

// SetDeadline sets the connection's deadline.
func (s *Stream) SetDeadline(t time.Time) error { return s.c.nc.SetDeadline(t) }

// BufferedReader is the buffer reads come through.
func (s *Stream) BufferedReader() *bufio.Reader { return s.c.br }

// refuse tells the peer why, then returns the local error.
func (c *Conn) refuse(why string) error {
	c.writeFrame(mRefuse, []byte(why))
	return fmt.Errorf("channel: %w: %s", ErrRefused, why)
}

// expect reads the next handshake frame, which must be of type want.
func (c *Conn) expect(want byte, what string) ([]byte, error) {
	typ, p, err := readFrame(c.br)
	if err != nil {
		return nil, fmt.Errorf("channel: handshake: waiting for the peer's %s: %w", what, err)
	}
	if typ == mRefuse {
		return nil, fmt.Errorf("channel: %w by the peer: %s", ErrRefused, p)
	}
	if typ != want {
		return nil, c.refuse(fmt.Sprintf("protocol error: message %d where the %s belongs", typ, what))
	}
	return p, nil
}

func (c *Conn) handshake() error {
	var nonce [32]byte
	if _, err := rand.Read(nonce[:]); err != nil {
		return err
	}
	hello := make([]byte, 3, 35)
	binary.BigEndian.PutUint16(hello, Version)
	hello[2] = byte(c.cfg.Role)
	hello = append(hello, nonce[:]...)
	if err := c.writeFrame(mHello, hello); err != nil {
		return fmt.Errorf("channel: handshake: %w", err)
	}
	p, err := c.expect(mHello, "hello")
	if err != nil {
		return err
	}
	if len(p) != 35 {
		return c.refuse(fmt.Sprintf("protocol error: a hello of %d bytes (not a gokvm-ft peer?)", len(p)))
	}
	if v := binary.BigEndian.Uint16(p); v != Version {
		return c.refuse(fmt.Sprintf("channel protocol version %d, this end speaks %d", v, Version))
	}
	peerRole := Role(p[2])
	if peerRole == c.cfg.Role || (peerRole != Primary && peerRole != Backup) {
		return c.refuse(fmt.Sprintf("both ends are a %v: a pair is one primary and one backup", c.cfg.Role))
	}
	peerNonce := p[3:35]
	if bytes.Equal(peerNonce, nonce[:]) {
		return c.refuse("the peer echoed our nonce")
	}
	if err := c.writeFrame(mProof, proof(c.cfg.Key, c.cfg.Role, peerNonce, nonce[:])); err != nil {
		return fmt.Errorf("channel: handshake: %w", err)
	}
	p, err = c.expect(mProof, "proof of the key")
	if err != nil {
		return err
	}
	if !hmac.Equal(p, proof(c.cfg.Key, peerRole, nonce[:], peerNonce)) {
		return c.refuse("authentication failed: the peers do not hold the same -key")
	}
	// Authenticated: now the compatibility records.
	if err := c.writeFrame(mCompat, c.cfg.Compat); err != nil {
		return fmt.Errorf("channel: handshake: %w", err)
	}
	if c.peer, err = c.expect(mCompat, "compatibility record"); err != nil {
		return err
	}
	if c.cfg.Check != nil {
		if err := c.cfg.Check(c.peer); err != nil {
			return c.refuse(fmt.Sprintf("incompatible peer: %v", err))
		}
	}
	if err := c.writeFrame(mAccept, nil); err != nil {
		return fmt.Errorf("channel: handshake: %w", err)
	}
	_, err = c.expect(mAccept, "acceptance")
	return err
}

// proof is what an end of role r sends to prove it holds key: a MAC over
// the peer's nonce (freshness) and its own (no reflection: the role and
// the order differ between the two proofs).
func proof(key []byte, r Role, theirs, ours []byte) []byte {
	h := hmac.New(sha256.New, key)
	h.Write([]byte(proofLabel))
	h.Write([]byte{byte(r)})
	h.Write(theirs)
	h.Write(ours)
	return h.Sum(nil)
}

func (c *Conn) writeFrame(typ byte, p []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return c.writeFrameLocked(typ, p)
}

// writeFrameLocked writes a frame; c.wmu held.
func (c *Conn) writeFrameLocked(typ byte, p []byte) error {
	if len(p) > MaxFrame {
		return fmt.Errorf("channel: frame of %d bytes", len(p))
	}
	var hdr [5]byte
	hdr[0] = typ
	binary.BigEndian.PutUint32(hdr[1:], uint32(len(p)))
	// A generous guard: a peer that stops reading is caught by the read
	// timeout, which closes the connection and ends this write.
	c.nc.SetWriteDeadline(time.Now().Add(max(10*time.Second, 4*c.cfg.Timeout)))
	c.bw.Write(hdr[:])
	c.bw.Write(p)
	err := c.bw.Flush()
	if err == nil {
		c.lastSend.Store(time.Now().UnixNano())
	}
	return err
}

func readFrame(br *bufio.Reader) (byte, []byte, error) {
	var hdr [5]byte
	if _, err := io.ReadFull(br, hdr[:]); err != nil {
		return 0, nil, err
	}
	n := binary.BigEndian.Uint32(hdr[1:])
	if n > MaxFrame {
		return 0, nil, fmt.Errorf("a frame of %d bytes, more than %d", n, MaxFrame)
	}
	p := make([]byte, n)
	if _, err := io.ReadFull(br, p); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return 0, nil, err
	}
	return hdr[0], p, nil
}

// Peer returns the peer's compatibility record.
func (c *Conn) Peer() []byte { return c.peer }

// RemoteAddr is the peer's address.
func (c *Conn) RemoteAddr() net.Addr { return c.nc.RemoteAddr() }

// Dead is closed once the peer is lost or the channel closed; Err then
// says why.
func (c *Conn) Dead() <-chan struct{} { return c.dead }

// Err is why the channel ended (nil while it lives).
func (c *Conn) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.deadErr
}

// fail ends the channel with err (the first one counts).
func (c *Conn) fail(err error) {
	c.mu.Lock()
	if c.deadErr == nil {
		c.deadErr = err
		close(c.dead)
		c.bump()
	}
	c.mu.Unlock()
	c.nc.Close()
}

// bump wakes everyone waiting for a change; c.mu held.
func (c *Conn) bump() {
	close(c.changed)
	c.changed = make(chan struct{})
}

// Close says goodbye to the peer with why, then closes the connection.
func (c *Conn) Close(why string) error {
	select {
	case <-c.dead:
	default:
		c.writeFrame(mBye, []byte(why))
	}
	c.fail(fmt.Errorf("channel closed here: %s", why))
	return nil
}

// Abort closes the connection without a word, as a crash would (tests).
func (c *Conn) Abort() { c.fail(errors.New("channel aborted here")) }

func (c *Conn) readLoop() {
	for {
		c.nc.SetReadDeadline(time.Now().Add(c.cfg.Timeout))
		typ, p, err := readFrame(c.br)
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				err = fmt.Errorf("%w: no word from the %v at %v for %v", ErrPeerLost, c.peerRole(), c.nc.RemoteAddr(), c.cfg.Timeout)
			} else {
				err = fmt.Errorf("%w: %v", ErrPeerLost, err)
			}
			c.fail(err)
			return
		}
		switch typ {
		case mLog:
			if c.cfg.Role != Backup {
				c.fail(fmt.Errorf("%w: protocol error: the backup sent log", ErrPeerLost))
				return
			}
			c.mu.Lock()
			c.in = append(c.in, p...)
			c.received += int64(len(p))
			c.mu.Unlock()
			select {
			case c.arrived <- struct{}{}:
			default:
			}
			c.sendAck()
		case mAck:
			if len(p) != 16 || c.cfg.Role != Primary {
				c.fail(fmt.Errorf("%w: protocol error: a bad acknowledgement", ErrPeerLost))
				return
			}
			rcv, app := int64(binary.BigEndian.Uint64(p)), int64(binary.BigEndian.Uint64(p[8:]))
			c.mu.Lock()
			if rcv > c.sent || app > rcv || rcv < c.acked || app < c.applied {
				c.mu.Unlock()
				c.fail(fmt.Errorf("%w: protocol error: acknowledgement of %d bytes (%d applied), %d sent", ErrPeerLost, rcv, app, c.sent))
				return
			}
			c.acked, c.applied = rcv, app
			i := 0
			for i < len(c.flights) && c.flights[i].end <= app {
				i++
			}
			c.flights = c.flights[i:]
			c.bump()
			c.mu.Unlock()
		case mHeartbeat:
		case mBye:
			c.fail(&ByeError{Reason: string(p)})
			return
		case mControl:
			// A reader that falls behind holds the stream (TCP pushes
			// back on the peer) rather than losing the connection: a
			// busy host may not schedule it for a while.
			select {
			case c.control <- p:
			case <-c.dead:
				return
			}
		default:
			c.fail(fmt.Errorf("%w: protocol error: message type %d", ErrPeerLost, typ))
			return
		}
	}
}

func (c *Conn) peerRole() Role {
	if c.cfg.Role == Primary {
		return Backup
	}
	return Primary
}

// sendAck acknowledges what has been received and applied so far. The
// figures are read under the write lock, so acknowledgements never go out
// of order.
func (c *Conn) sendAck() {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	var b [16]byte
	c.mu.Lock()
	binary.BigEndian.PutUint64(b[:], uint64(c.received))
	binary.BigEndian.PutUint64(b[8:], uint64(c.appliedLocal))
	c.ackedApplied = c.appliedLocal
	c.mu.Unlock()
	if err := c.writeFrameLocked(mAck, b[:]); err != nil {
		c.fail(fmt.Errorf("%w: %v", ErrPeerLost, err))
	}
}

// heartbeat says the end is alive whenever it has been quiet for a
// heartbeat period; a backup's heartbeat is an acknowledgement, so the
// primary also learns how far the replay got.
func (c *Conn) heartbeat() {
	t := time.NewTicker(c.cfg.Heartbeat / 2)
	defer t.Stop()
	for {
		select {
		case <-c.dead:
			return
		case <-t.C:
		}
		c.mu.Lock()
		moved := c.appliedLocal != c.ackedApplied
		c.mu.Unlock()
		quiet := time.Since(time.Unix(0, c.lastSend.Load())) >= c.cfg.Heartbeat
		switch {
		case c.cfg.Role == Backup && (quiet || moved):
			c.sendAck()
		case quiet:
			if err := c.writeFrame(mHeartbeat, nil); err != nil {
				c.fail(fmt.Errorf("%w: %v", ErrPeerLost, err))
			}
		}
	}
}

// SendControl sends a control message (a role's business: switchover,
// status).
func (c *Conn) SendControl(p []byte) error { return c.writeFrame(mControl, p) }

// Control delivers the peer's control messages. Its owner must read it:
// the messages after an unread one wait, and so does the peer's log and
// acknowledgements behind them.
func (c *Conn) Control() <-chan []byte { return c.control }

// LogWriter is the primary's log stream to the backup.
type LogWriter struct{ c *Conn }

// LogWriter returns the log stream of a primary's channel.
func (c *Conn) LogWriter() *LogWriter { return &LogWriter{c} }

// Write sends p to the backup. It first waits while the log in flight or
// the backup's lag is over its bound (Config.MaxUnacked, MaxLag), and
// fails with an error wrapping ErrPeerLost once the channel is dead.
func (w *LogWriter) Write(p []byte) (int, error) {
	c := w.c
	if c.cfg.Role != Primary {
		return 0, errors.New("channel: only a primary writes log")
	}
	n := 0
	for len(p) > 0 {
		k := min(len(p), maxChunk)
		if err := c.waitRoom(int64(k)); err != nil {
			return n, err
		}
		c.mu.Lock()
		c.sent += int64(k)
		c.flights = append(c.flights, flight{end: c.sent, at: time.Now()})
		c.mu.Unlock()
		if err := c.writeFrame(mLog, p[:k]); err != nil {
			err = fmt.Errorf("%w: %v", ErrPeerLost, err)
			c.fail(err)
			return n, err
		}
		n += k
		p = p[k:]
	}
	return n, nil
}

// waitRoom blocks while k more bytes would put the log in flight over its
// bound (unless nothing is in flight), or while the lag is over its bound.
func (c *Conn) waitRoom(k int64) error {
	for {
		c.mu.Lock()
		if c.deadErr != nil {
			err := c.deadErr
			c.mu.Unlock()
			return err
		}
		unacked := c.sent - c.acked
		over := c.sent > c.acked && unacked+k > c.cfg.MaxUnacked
		lag := c.lagLocked()
		changed := c.changed
		logSlow := time.Since(c.lastSlowLog) > 5*time.Second
		if logSlow {
			c.lastSlowLog = time.Now()
		}
		c.mu.Unlock()
		if !over && (c.cfg.MaxLag < 0 || lag <= c.cfg.MaxLag) {
			return nil
		}
		if logSlow {
			c.cfg.Logger.Warn("slowing the guest: the backup lags", "lag", lag.Round(time.Millisecond), "max", c.cfg.MaxLag, "unacknowledged bytes", unacked)
		}
		// Acks come at least every heartbeat; look again then anyway.
		select {
		case <-changed:
		case <-time.After(c.cfg.Heartbeat):
		}
	}
}

func (c *Conn) lagLocked() time.Duration {
	if len(c.flights) == 0 {
		return 0
	}
	return time.Since(c.flights[0].at)
}

// Sent is the number of log bytes sent; Acked how many the backup has
// received; Applied how many its replay has applied.
func (c *Conn) Sent() int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.sent
}

// Acked is the number of log bytes the backup acknowledged receiving.
func (c *Conn) Acked() int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.acked
}

// Lag is how long ago the oldest log the backup has not applied was sent
// (0 when it is up to date).
func (c *Conn) Lag() time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.lagLocked()
}

// WaitAcked blocks until the backup acknowledged off bytes of log, the
// channel dies (an error wrapping ErrPeerLost) or ctx ends.
func (c *Conn) WaitAcked(ctx context.Context, off int64) error {
	for {
		c.mu.Lock()
		acked, err, changed := c.acked, c.deadErr, c.changed
		c.mu.Unlock()
		switch {
		case acked >= off:
			return nil
		case err != nil:
			return err
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// Changed returns a channel closed at the next acknowledgement or when the
// channel dies.
func (c *Conn) Changed() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.changed
}

// LogReader is the backup's log stream from the primary. It never blocks:
// at the end of what has arrived it returns io.EOF, like a file still being
// written; Arrived says when more came.
type LogReader struct{ c *Conn }

// LogReader returns the log stream of a backup's channel.
func (c *Conn) LogReader() *LogReader { return &LogReader{c} }

// Read returns log that has arrived, or 0, io.EOF.
func (r *LogReader) Read(p []byte) (int, error) {
	c := r.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.in) == 0 {
		return 0, io.EOF
	}
	n := copy(p, c.in)
	c.in = c.in[n:]
	if len(c.in) == 0 {
		c.in = nil // let the arrived bytes go
	}
	return n, nil
}

// Arrived receives a value when log arrives.
func (r *LogReader) Arrived() <-chan struct{} { return r.c.arrived }

// Received is the number of log bytes received.
func (c *Conn) Received() int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.received
}

// SetApplied tells the primary (with the next acknowledgement) how much of
// the log the backup's replay has applied: the primary's lag bound counts
// from it.
func (c *Conn) SetApplied(off int64) {
	c.mu.Lock()
	if off > c.appliedLocal && off <= c.received {
		c.appliedLocal = off
	}
	c.mu.Unlock()
}
