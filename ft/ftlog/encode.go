package ftlog

import (
	"encoding/json"
	"fmt"
	"io"
)

// flushAt is the buffer size past which an Encoder writes without being
// asked.
const flushAt = 64 << 10

// Encoder writes a log. NewEncoder starts it with the header; Write (or the
// methods named after the kinds) appends entries; End appends the End entry
// and flushes. The Encoder checks each entry as the Decoder will (fields,
// bounds, position order) and refuses a bad one without writing anything
// (ErrInvalid, ErrTooLarge, ErrOrder, ErrUnknownKind): such an error leaves
// the Encoder usable. An error from the underlying writer is sticky.
//
// Entries are buffered; each write to the underlying writer carries whole
// entries only. An Encoder is not safe for concurrent use.
type Encoder struct {
	w       io.Writer
	pmu     bool
	buf     []byte
	running uint32 // the running CRC after the last entry
	off     int64  // stream offset of the next entry
	n       int64  // entries encoded
	ord     order
	ended   bool
	err     error // sticky write error
}

// NewEncoder returns an Encoder writing a log with header h to w. The
// header is buffered like an entry. It fails only if h.Meta is too long or
// not JSON.
func NewEncoder(w io.Writer, h Header) (*Encoder, error) {
	if len(h.Meta) > MaxMetaLen {
		return nil, fmt.Errorf("ftlog: header metadata of %d bytes, at most %d: %w", len(h.Meta), MaxMetaLen, ErrTooLarge)
	}
	if len(h.Meta) > 0 && !json.Valid(h.Meta) {
		return nil, fmt.Errorf("ftlog: header metadata is not JSON: %w", ErrInvalid)
	}
	e := &Encoder{w: w, pmu: h.PMU, buf: make([]byte, 0, flushAt+frameLen+posLenPMU+64)}
	e.buf, e.running = appendHeader(e.buf, &h)
	e.off = int64(len(e.buf))
	return e, nil
}

// Write appends one entry. The caller keeps ent (its Data is copied).
func (e *Encoder) Write(ent *Entry) error {
	if e.err != nil {
		return e.err
	}
	if e.ended {
		return fmt.Errorf("ftlog: entry %d (%v): %w", e.n, ent.Kind, ErrEnded)
	}
	if detail, err := checkEntry(ent, e.pmu); err != nil {
		if err == ErrCorrupt {
			err = ErrInvalid
		}
		return fmt.Errorf("ftlog: entry %d (%v): %w: %s", e.n, ent.Kind, err, detail)
	}
	if detail := e.ord.check(ent.Kind, ent.Pos); detail != "" {
		return fmt.Errorf("ftlog: entry %d (%v): %w: %s", e.n, ent.Kind, ErrOrder, detail)
	}
	e.ord.advance(ent.Kind, ent.Pos)
	n := len(e.buf)
	e.buf, e.running = appendEntry(e.buf, ent, e.pmu, e.running)
	e.off += int64(len(e.buf) - n)
	e.n++
	if ent.Kind == End {
		e.ended = true
		return e.Flush()
	}
	if len(e.buf) >= flushAt {
		return e.Flush()
	}
	return nil
}

// Flush writes the buffered entries to the underlying writer: once it
// returns nil, every entry written so far is there, whole.
func (e *Encoder) Flush() error {
	if e.err != nil {
		return e.err
	}
	if len(e.buf) == 0 {
		return nil
	}
	n, err := e.w.Write(e.buf)
	if err == nil && n < len(e.buf) {
		err = io.ErrShortWrite
	}
	if err != nil {
		e.err = fmt.Errorf("ftlog: writing the log: %w", err)
		return e.err
	}
	if cap(e.buf) > 4*flushAt { // do not keep a buffer grown by a large entry
		e.buf = make([]byte, 0, flushAt+frameLen+posLenPMU+64)
	} else {
		e.buf = e.buf[:0]
	}
	return nil
}

// Entries returns the number of entries written so far (buffered ones
// included).
func (e *Encoder) Entries() int64 { return e.n }

// Offset returns the length of the log so far (buffered bytes included):
// the byte offset the next entry will have.
func (e *Encoder) Offset() int64 { return e.off }

// ClockRead appends a ClockRead entry: device dev read the value v (ns).
func (e *Encoder) ClockRead(p Position, dev uint16, v int64) error {
	return e.Write(&Entry{Kind: ClockRead, Pos: p, Device: dev, Value: v})
}

// SerialInput appends a SerialInput entry: b was handed to UART dev.
func (e *Encoder) SerialInput(p Position, dev uint16, b []byte) error {
	return e.Write(&Entry{Kind: SerialInput, Pos: p, Device: dev, Data: b})
}

// Packet appends a Packet entry: frame b was delivered to device dev.
func (e *Encoder) Packet(p Position, dev uint16, b []byte) error {
	return e.Write(&Entry{Kind: Packet, Pos: p, Device: dev, Data: b})
}

// Completion appends a Completion entry for device dev.
func (e *Encoder) Completion(p Position, dev uint16, b []byte) error {
	return e.Write(&Entry{Kind: Completion, Pos: p, Device: dev, Data: b})
}

// Interrupt appends an Interrupt entry: vector v was injected.
func (e *Encoder) Interrupt(p Position, v uint8) error {
	return e.Write(&Entry{Kind: Interrupt, Pos: p, Vector: v})
}

// WindowRequest appends a WindowRequest entry.
func (e *Encoder) WindowRequest(p Position) error {
	return e.Write(&Entry{Kind: WindowRequest, Pos: p})
}

// Progress appends a Progress entry: no later entry is at or before exit
// exits.
func (e *Encoder) Progress(exits uint64) error {
	return e.Write(&Entry{Kind: Progress, Pos: Position{Exits: exits}})
}

// Digest appends a Digest entry.
func (e *Encoder) Digest(p Position, d [DigestLen]byte) error {
	return e.Write(&Entry{Kind: Digest, Pos: p, Digest: d})
}

// StateDelta appends a StateDelta entry.
func (e *Encoder) StateDelta(p Position, b []byte) error {
	return e.Write(&Entry{Kind: StateDelta, Pos: p, Data: b})
}

// Opaque appends an Opaque entry named name for device dev.
func (e *Encoder) Opaque(p Position, dev uint16, name string, b []byte) error {
	return e.Write(&Entry{Kind: Opaque, Pos: p, Device: dev, Name: name, Data: b})
}

// End appends the End entry at the final position p and flushes.
func (e *Encoder) End(p Position) error {
	return e.Write(&Entry{Kind: End, Pos: p})
}
