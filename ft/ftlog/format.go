package ftlog

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"time"
)

// Format constants. See the package documentation for the layout.
const (
	// Magic starts every log.
	Magic = "GOKVMLOG"
	// Version is the format version this package writes and reads.
	Version = 1

	// MaxMetaLen bounds the header's metadata (16 KiB).
	MaxMetaLen = 16 << 10
	// MaxSerialLen bounds the bytes of one SerialInput entry.
	MaxSerialLen = 4 << 10
	// MaxPacketLen bounds a Packet entry's frame (64 KiB).
	MaxPacketLen = 64 << 10
	// MaxCompletionLen bounds a Completion entry's payload.
	MaxCompletionLen = 256
	// MaxDeltaLen bounds a StateDelta entry's payload (64 MiB).
	MaxDeltaLen = 64 << 20
	// MaxOpaqueLen bounds the data of an Opaque entry (1 MiB).
	MaxOpaqueLen = 1 << 20
	// MaxNameLen bounds the name of an Opaque entry.
	MaxNameLen = 32
	// DigestLen is the size of a Digest entry's digest.
	DigestLen = 32
)

const (
	headerLen  = 32 // header before the metadata
	frameLen   = 12 // entry frame: length, kind, reserved, device, CRC
	crcLen     = 4
	posLenExit = 16 // Exits, RIP
	posLenPMU  = 32 // Exits, RIP, Branches, RCX
	flagPMU    = 1
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func crc(b []byte) uint32 { return crc32.Checksum(b, castagnoli) }

func crcUpdate(c uint32, b []byte) uint32 { return crc32.Update(c, castagnoli, b) }

// Kind tells what an entry is.
type Kind uint8

// Entry kinds. The comment says which Entry fields each kind uses besides
// Kind and Pos.
const (
	ClockRead     Kind = 1  // Device, Value: a clock reading in ns
	SerialInput   Kind = 2  // Device, Data: bytes for the UART
	Packet        Kind = 3  // Device, Data: a received network frame
	Completion    Kind = 4  // Device, Data: an asynchronous completion
	Interrupt     Kind = 5  // Vector: injected with KVM_INTERRUPT
	WindowRequest Kind = 6  // nothing: an interrupt-window exit requested
	Progress      Kind = 7  // nothing: no entry follows at or before Pos.Exits
	Digest        Kind = 8  // Digest: a digest of the guest state
	StateDelta    Kind = 9  // Data: a state delta, opaque here
	Opaque        Kind = 10 // Device, Name, Data: an input of a later kind
	End           Kind = 11 // nothing: the end of the log
	maxKind            = End
)

var kindNames = [...]string{
	ClockRead:     "ClockRead",
	SerialInput:   "SerialInput",
	Packet:        "Packet",
	Completion:    "Completion",
	Interrupt:     "Interrupt",
	WindowRequest: "WindowRequest",
	Progress:      "Progress",
	Digest:        "Digest",
	StateDelta:    "StateDelta",
	Opaque:        "Opaque",
	End:           "End",
}

func (k Kind) valid() bool { return k >= ClockRead && k <= maxKind }

func (k Kind) String() string {
	if k.valid() {
		return kindNames[k]
	}
	return fmt.Sprintf("Kind(%d)", uint8(k))
}

// hasDevice reports whether entries of kind k carry a device ID.
func (k Kind) hasDevice() bool {
	switch k {
	case ClockRead, SerialInput, Packet, Completion, Opaque:
		return true
	}
	return false
}

// payloadBounds returns the smallest and largest payload of kind k (valid).
func (k Kind) payloadBounds() (lo, hi int) {
	switch k {
	case ClockRead:
		return 8, 8
	case SerialInput:
		return 1, MaxSerialLen
	case Packet:
		return 1, MaxPacketLen
	case Completion:
		return 0, MaxCompletionLen
	case Interrupt:
		return 1, 1
	case Digest:
		return DigestLen, DigestLen
	case StateDelta:
		return 0, MaxDeltaLen
	case Opaque:
		return 2, 1 + MaxNameLen + MaxOpaqueLen
	}
	return 0, 0 // WindowRequest, Progress, End
}

// Position is an execution position of the guest. Without a PMU only Exits
// and RIP are set (Branches and RCX are 0); in a log with PMU positions
// (Header.PMU) all four are. See the package documentation for the order.
type Position struct {
	Exits    uint64 // deterministic exits completed, the current one included
	RIP      uint64 // guest RIP
	Branches uint64 // retired branches (PMU positions only, else 0)
	RCX      uint64 // RCX, the REP count (PMU positions only, else 0)
}

// Before reports whether p comes strictly before q in the order of the log:
// by Exits, then by Branches. RIP and RCX do not take part.
func (p Position) Before(q Position) bool {
	if p.Exits != q.Exits {
		return p.Exits < q.Exits
	}
	return p.Branches < q.Branches
}

func (p Position) String() string {
	if p.Branches == 0 && p.RCX == 0 {
		return fmt.Sprintf("exit %d rip %#x", p.Exits, p.RIP)
	}
	return fmt.Sprintf("exit %d rip %#x branches %d rcx %#x", p.Exits, p.RIP, p.Branches, p.RCX)
}

// Header is the start of a log.
type Header struct {
	// PMU: the log's positions are PMU positions (Branches and RCX set).
	PMU bool
	// Created is when the recording started; the zero Time if unknown.
	// It is stored with nanosecond precision; a decoded one is in UTC.
	Created time.Time
	// Meta is nothing or one JSON value of at most MaxMetaLen bytes,
	// opaque to this package: the host, the VMM version, the machine
	// configuration.
	Meta []byte
}

// Entry is one entry of the log. Kind says which fields beyond Pos are used
// (see the Kind constants); the others are zero. A decoded entry's Data is
// its own (the caller may keep it).
type Entry struct {
	Kind   Kind
	Pos    Position
	Device uint16          // ClockRead, SerialInput, Packet, Completion, Opaque
	Value  int64           // ClockRead: the value returned, in ns
	Vector uint8           // Interrupt
	Digest [DigestLen]byte // Digest
	Name   string          // Opaque: what the data is
	Data   []byte          // SerialInput, Packet, Completion, StateDelta, Opaque
}

// Errors an Encoder or Decoder reports; match them with errors.Is. A
// Decoder wraps them in a *FormatError. ErrUnknownKind, ErrTooLarge and
// ErrOrder are kinds of ErrCorrupt when a Decoder reports them: such an
// error matches ErrCorrupt too. ErrTruncated also matches
// io.ErrUnexpectedEOF.
var (
	// ErrBadMagic: the stream does not start with Magic; it is not a log.
	ErrBadMagic = errors.New("not a log (bad magic)")
	// ErrVersion: the format version or a header flag is not one this
	// package knows, typically a log from a newer gokvm-ft.
	ErrVersion = errors.New("unsupported version")
	// ErrTruncated: the stream ended before the End entry, possibly in
	// the middle of the header or of an entry; what was there is a valid
	// beginning of a log. Not sticky: with more data, Next continues.
	ErrTruncated = errors.New("truncated")
	// ErrChecksum: a CRC-32C does not match: damage, or an entry
	// dropped, repeated or moved before this point.
	ErrChecksum = errors.New("checksum mismatch")
	// ErrCorrupt: an entry or the header is malformed although its
	// checksum matches (reserved bits set, wrong payload size, a device
	// ID on a kind without one, metadata that is not JSON...).
	ErrCorrupt = errors.New("corrupt")
	// ErrUnknownKind: an entry kind this version does not define.
	ErrUnknownKind = errors.New("unknown entry kind")
	// ErrTooLarge: a length above its bound.
	ErrTooLarge = errors.New("too large")
	// ErrOrder: a position before the previous entry's, or at or before
	// an exit a Progress entry already covered.
	ErrOrder = errors.New("position out of order")
	// ErrInvalid: the Encoder was given an entry that is not valid (an
	// unused field set, a bad name, a PMU position in a log without PMU
	// positions...).
	ErrInvalid = errors.New("invalid entry")
	// ErrEnded: the Encoder already wrote the End entry.
	ErrEnded = errors.New("log already ended")
)

// FormatError is a decoding error: what is wrong (one of the sentinel
// errors) and where.
type FormatError struct {
	Entry  int64  // entry number, from 0; -1 for the header
	Kind   Kind   // the entry's kind, 0 when not known (frame unreadable)
	Offset int64  // byte offset in the stream of the entry (or header)
	Err    error  // the sentinel: ErrChecksum, ErrTruncated...
	Detail string // what exactly, for people
}

func (e *FormatError) Error() string {
	where := "header"
	if e.Entry >= 0 {
		where = fmt.Sprintf("entry %d", e.Entry)
		if e.Kind != 0 {
			where += " (" + e.Kind.String() + ")"
		}
	}
	s := fmt.Sprintf("ftlog: %s at byte %d: %v", where, e.Offset, e.Err)
	if e.Detail != "" {
		s += ": " + e.Detail
	}
	return s
}

// Unwrap returns the sentinel, and ErrCorrupt for its kinds, or
// io.ErrUnexpectedEOF for ErrTruncated.
func (e *FormatError) Unwrap() []error {
	switch e.Err {
	case ErrUnknownKind, ErrTooLarge, ErrOrder:
		return []error{e.Err, ErrCorrupt}
	case ErrTruncated:
		return []error{e.Err, io.ErrUnexpectedEOF}
	}
	return []error{e.Err}
}

// checkEntry checks the fields of e against its kind, as both the Encoder
// and the Decoder require them. It returns a detail and the sentinel
// (ErrUnknownKind, ErrTooLarge, ErrCorrupt for a malformed entry), or nil.
func checkEntry(e *Entry, pmu bool) (string, error) {
	if !e.Kind.valid() {
		return fmt.Sprintf("kind %d", uint8(e.Kind)), ErrUnknownKind
	}
	k := e.Kind
	if !pmu && (e.Pos.Branches != 0 || e.Pos.RCX != 0) {
		return "PMU position fields in a log without PMU positions", ErrCorrupt
	}
	if !k.hasDevice() && e.Device != 0 {
		return fmt.Sprintf("device %d on a %v entry", e.Device, k), ErrCorrupt
	}
	if k != ClockRead && e.Value != 0 {
		return "Value set on a " + k.String() + " entry", ErrCorrupt
	}
	if k != Interrupt && e.Vector != 0 {
		return "Vector set on a " + k.String() + " entry", ErrCorrupt
	}
	if k != Digest && e.Digest != ([DigestLen]byte{}) {
		return "Digest set on a " + k.String() + " entry", ErrCorrupt
	}
	if k != Opaque && e.Name != "" {
		return "Name set on a " + k.String() + " entry", ErrCorrupt
	}
	switch k {
	case SerialInput, Packet, Completion, StateDelta:
		lo, hi := k.payloadBounds()
		if len(e.Data) > hi {
			return fmt.Sprintf("%d bytes of data, at most %d", len(e.Data), hi), ErrTooLarge
		}
		if len(e.Data) < lo {
			return "no data", ErrCorrupt
		}
	case Opaque:
		if len(e.Name) == 0 || len(e.Name) > MaxNameLen {
			return fmt.Sprintf("name of %d bytes, want 1..%d", len(e.Name), MaxNameLen), ErrCorrupt
		}
		for i := 0; i < len(e.Name); i++ {
			if c := e.Name[i]; c < 0x21 || c > 0x7e {
				return fmt.Sprintf("name %q: byte %#x is not printable ASCII", e.Name, c), ErrCorrupt
			}
		}
		if len(e.Data) > MaxOpaqueLen {
			return fmt.Sprintf("%d bytes of data, at most %d", len(e.Data), MaxOpaqueLen), ErrTooLarge
		}
	default:
		if len(e.Data) != 0 {
			return "Data set on a " + k.String() + " entry", ErrCorrupt
		}
	}
	if k == Progress && (e.Pos.RIP != 0 || e.Pos.Branches != 0 || e.Pos.RCX != 0) {
		return "a Progress position is an exit count only", ErrCorrupt
	}
	return "", nil
}

// order is the state of the position rules, the same in Encoder and
// Decoder.
type order struct {
	last     Position // the latest position of an entry other than Progress
	covered  uint64   // the latest Progress exit count
	progress bool     // a Progress entry was seen
}

// check returns what is wrong with an entry at p of kind k coming next, or
// "".
func (o *order) check(k Kind, p Position) string {
	if k == Progress {
		switch {
		case p.Exits < o.last.Exits:
			return fmt.Sprintf("progress through exit %d after an entry at exit %d", p.Exits, o.last.Exits)
		case o.progress && p.Exits < o.covered:
			return fmt.Sprintf("progress through exit %d after progress through exit %d", p.Exits, o.covered)
		}
		return ""
	}
	if p.Before(o.last) {
		return fmt.Sprintf("%v before the previous entry's %v", p, o.last)
	}
	if o.progress && k != End && p.Exits <= o.covered {
		return fmt.Sprintf("entry at exit %d after progress through exit %d", p.Exits, o.covered)
	}
	if o.progress && k == End && p.Exits < o.covered {
		return fmt.Sprintf("end at exit %d after progress through exit %d", p.Exits, o.covered)
	}
	return ""
}

func (o *order) advance(k Kind, p Position) {
	if k == Progress {
		o.covered, o.progress = p.Exits, true
		return
	}
	o.last = p
}

// appendHeader appends the encoded header to b and returns it with the
// running CRC's start.
func appendHeader(b []byte, h *Header) ([]byte, uint32) {
	start := len(b)
	var flags uint32
	if h.PMU {
		flags |= flagPMU
	}
	var created int64
	if !h.Created.IsZero() {
		created = h.Created.UnixNano()
	}
	b = append(b, Magic...)
	b = binary.LittleEndian.AppendUint32(b, Version)
	b = binary.LittleEndian.AppendUint32(b, flags)
	b = binary.LittleEndian.AppendUint64(b, uint64(created))
	b = binary.LittleEndian.AppendUint32(b, uint32(len(h.Meta)))
	b = binary.LittleEndian.AppendUint32(b, crc(b[start:]))
	b = append(b, h.Meta...)
	c := crc(b[start:])
	return binary.LittleEndian.AppendUint32(b, c), c
}

// payloadLen is the encoded payload size of a checked entry.
func payloadLen(e *Entry) int {
	switch e.Kind {
	case ClockRead:
		return 8
	case Interrupt:
		return 1
	case Digest:
		return DigestLen
	case Opaque:
		return 1 + len(e.Name) + len(e.Data)
	}
	return len(e.Data)
}

// appendEntry appends the checked entry e to b and returns it with the new
// running CRC.
func appendEntry(b []byte, e *Entry, pmu bool, running uint32) ([]byte, uint32) {
	start := len(b)
	posLen := posLenExit
	if pmu {
		posLen = posLenPMU
	}
	b = binary.LittleEndian.AppendUint32(b, uint32(posLen+payloadLen(e)))
	b = append(b, byte(e.Kind), 0)
	b = binary.LittleEndian.AppendUint16(b, e.Device)
	b = binary.LittleEndian.AppendUint32(b, crc(b[start:]))
	b = binary.LittleEndian.AppendUint64(b, e.Pos.Exits)
	b = binary.LittleEndian.AppendUint64(b, e.Pos.RIP)
	if pmu {
		b = binary.LittleEndian.AppendUint64(b, e.Pos.Branches)
		b = binary.LittleEndian.AppendUint64(b, e.Pos.RCX)
	}
	switch e.Kind {
	case ClockRead:
		b = binary.LittleEndian.AppendUint64(b, uint64(e.Value))
	case Interrupt:
		b = append(b, e.Vector)
	case Digest:
		b = append(b, e.Digest[:]...)
	case Opaque:
		b = append(b, byte(len(e.Name)))
		b = append(b, e.Name...)
		b = append(b, e.Data...)
	default:
		b = append(b, e.Data...)
	}
	c := crcUpdate(running, b[start:])
	return binary.LittleEndian.AppendUint32(b, c), c
}
