package ftlog

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"testing/iotest"
	"time"
)

var testMeta = []byte(`{"host":"lab1","vmm":"gokvm-ft test","machine":{"mem":268435456}}`)

func pos(exits, rip uint64) Position { return Position{Exits: exits, RIP: rip} }

// sampleEntries returns one or more entries of every kind, in a valid order,
// ending with End.
func sampleEntries(pmu bool) []Entry {
	p := func(exits, rip, br, rcx uint64) Position {
		if !pmu {
			br, rcx = 0, 0
		}
		return Position{exits, rip, br, rcx}
	}
	var dg [DigestLen]byte
	for i := range dg {
		dg[i] = byte(i * 7)
	}
	return []Entry{
		{Kind: ClockRead, Pos: p(1, 0xffffffff81000000, 10, 0), Device: 1, Value: 123456789},
		{Kind: ClockRead, Pos: p(1, 0xffffffff81000000, 10, 0), Device: 2, Value: -5},
		{Kind: SerialInput, Pos: p(2, 0x1000, 11, 3), Device: 0, Data: []byte("ls\n")},
		{Kind: Interrupt, Pos: p(2, 0x1000, 11, 3), Vector: 0x30},
		{Kind: WindowRequest, Pos: p(3, 0x1004, 12, 0)},
		{Kind: Progress, Pos: Position{Exits: 3}},
		{Kind: Packet, Pos: p(4, 0x2000, 20, 0), Device: 7, Data: bytes.Repeat([]byte{0xab, 0x01}, 700)},
		{Kind: Completion, Pos: p(4, 0x2000, 20, 0), Device: 8, Data: []byte{1, 2, 3}},
		{Kind: Completion, Pos: p(5, 0x2000, 21, 0), Device: 8},
		{Kind: Digest, Pos: p(6, 0x3000, 30, 0), Digest: dg},
		{Kind: StateDelta, Pos: p(6, 0x3002, 31, 0), Data: []byte("delta bytes")},
		{Kind: StateDelta, Pos: p(6, 0x3002, 31, 0)},
		{Kind: Opaque, Pos: p(7, 0x3004, 40, 0), Device: 3, Name: "virtio-rng", Data: []byte{9, 9}},
		{Kind: Opaque, Pos: p(7, 0x3004, 40, 0), Name: "x"},
		{Kind: Progress, Pos: Position{Exits: 7}},
		{Kind: Progress, Pos: Position{Exits: 9}},
		{Kind: End, Pos: p(9, 0x3010, 50, 0)},
	}
}

func encodeLog(t testing.TB, h Header, entries []Entry) []byte {
	t.Helper()
	var buf bytes.Buffer
	e, err := NewEncoder(&buf, h)
	if err != nil {
		t.Fatal(err)
	}
	for i := range entries {
		if err := e.Write(&entries[i]); err != nil {
			t.Fatalf("entry %d: %v", i, err)
		}
	}
	if err := e.Flush(); err != nil {
		t.Fatal(err)
	}
	if e.Offset() != int64(buf.Len()) {
		t.Fatalf("Offset %d, wrote %d", e.Offset(), buf.Len())
	}
	return buf.Bytes()
}

// decodeAll decodes until End (then checks io.EOF) or an error.
func decodeAll(r io.Reader) (Header, []Entry, error) {
	d := NewDecoder(r)
	h, err := d.Header()
	if err != nil {
		return h, nil, err
	}
	var out []Entry
	for {
		ent, err := d.Next()
		if err != nil {
			return h, out, err
		}
		out = append(out, ent)
		if ent.Kind == End {
			if _, err := d.Next(); err != io.EOF {
				return h, out, fmt.Errorf("after End: %v, want io.EOF", err)
			}
			return h, out, nil
		}
	}
}

func sameEntry(a, b *Entry) bool {
	return a.Kind == b.Kind && a.Pos == b.Pos && a.Device == b.Device && a.Value == b.Value &&
		a.Vector == b.Vector && a.Digest == b.Digest && a.Name == b.Name && bytes.Equal(a.Data, b.Data)
}

func checkEntries(t *testing.T, got, want []Entry) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%d entries, want %d", len(got), len(want))
	}
	for i := range got {
		if !sameEntry(&got[i], &want[i]) {
			t.Fatalf("entry %d: got %+v, want %+v", i, got[i], want[i])
		}
	}
}

func TestCRCReference(t *testing.T) {
	if c := crc([]byte("123456789")); c != 0xE3069283 {
		t.Fatalf("CRC-32C check value %#x", c)
	}
}

func TestRoundTrip(t *testing.T) {
	created := time.Date(2025, 3, 1, 12, 0, 0, 123456789, time.UTC)
	for _, pmu := range []bool{false, true} {
		t.Run(fmt.Sprintf("pmu=%v", pmu), func(t *testing.T) {
			want := sampleEntries(pmu)
			b := encodeLog(t, Header{PMU: pmu, Created: created, Meta: testMeta}, want)
			for name, r := range map[string]io.Reader{
				"whole":   bytes.NewReader(b),
				"onebyte": iotest.OneByteReader(bytes.NewReader(b)),
				"half":    iotest.HalfReader(bytes.NewReader(b)),
				"dataerr": iotest.DataErrReader(bytes.NewReader(b)),
			} {
				h, got, err := decodeAll(r)
				if err != nil {
					t.Fatalf("%s: %v", name, err)
				}
				if h.PMU != pmu || !h.Created.Equal(created) || !bytes.Equal(h.Meta, testMeta) {
					t.Fatalf("%s: header %+v", name, h)
				}
				checkEntries(t, got, want)
			}
		})
	}
}

func TestEmptyHeader(t *testing.T) {
	b := encodeLog(t, Header{}, []Entry{{Kind: End}})
	if len(b) != 36+16+16 {
		t.Fatalf("minimal log of %d bytes", len(b))
	}
	h, got, err := decodeAll(bytes.NewReader(b))
	if err != nil || h.PMU || !h.Created.IsZero() || h.Meta != nil || len(got) != 1 {
		t.Fatalf("%+v %v %v", h, got, err)
	}
}

// TestLayout pins the byte layout documented in doc.go.
func TestLayout(t *testing.T) {
	created := time.Unix(0, 0x0102030405060708)
	b := encodeLog(t, Header{Created: created, Meta: []byte("{}")}, []Entry{
		{Kind: ClockRead, Pos: pos(5, 0xfff0), Device: 0x0203, Value: -2},
	})
	le := binary.LittleEndian
	want := func(what string, got, want uint64) {
		t.Helper()
		if got != want {
			t.Errorf("%s: %#x, want %#x", what, got, want)
		}
	}
	if string(b[:8]) != "GOKVMLOG" {
		t.Fatalf("magic %q", b[:8])
	}
	want("version", uint64(le.Uint32(b[8:])), 1)
	want("flags", uint64(le.Uint32(b[12:])), 0)
	want("created", le.Uint64(b[16:]), 0x0102030405060708)
	want("meta length", uint64(le.Uint32(b[24:])), 2)
	want("header CRC", uint64(le.Uint32(b[28:])), uint64(crc(b[:28])))
	if string(b[32:34]) != "{}" {
		t.Errorf("meta %q", b[32:34])
	}
	want("meta CRC", uint64(le.Uint32(b[34:])), uint64(crc(b[:34])))
	e := b[38:]
	if len(e) != 40 {
		t.Fatalf("ClockRead entry of %d bytes, want 40", len(e))
	}
	want("body length", uint64(le.Uint32(e)), 24)
	want("kind", uint64(e[4]), 1)
	want("reserved", uint64(e[5]), 0)
	want("device", uint64(le.Uint16(e[6:])), 0x0203)
	want("frame CRC", uint64(le.Uint32(e[8:])), uint64(crc(e[:8])))
	want("exits", le.Uint64(e[12:]), 5)
	want("rip", le.Uint64(e[20:]), 0xfff0)
	want("value", le.Uint64(e[28:]), uint64(0xfffffffffffffffe))
	// The running CRC is the CRC of the stream without the running CRC
	// fields, and continues from the header's.
	want("running CRC, stream", uint64(le.Uint32(e[36:])), uint64(crc(append(append([]byte(nil), b[:34]...), e[:36]...))))

	// PMU positions are 32 bytes.
	b = encodeLog(t, Header{PMU: true}, []Entry{{Kind: Interrupt, Pos: Position{1, 2, 3, 4}, Vector: 0x20}})
	want("pmu flags", uint64(le.Uint32(b[12:])), 1)
	e = b[36:]
	want("pmu body length", uint64(le.Uint32(e)), 33)
	want("branches", le.Uint64(e[28:]), 3)
	want("rcx", le.Uint64(e[36:]), 4)
	want("vector", uint64(e[44]), 0x20)
}

// TestRunningCRC checks, over a long log, that each entry's last field is the
// CRC-32C of the stream so far without the running CRC fields.
func TestRunningCRC(t *testing.T) {
	b := encodeLog(t, Header{Meta: testMeta}, sampleEntries(false))
	le := binary.LittleEndian
	var stream []byte
	off := 32 + len(testMeta)
	stream = append(stream, b[:off]...)
	if le.Uint32(b[off:]) != crc(stream) {
		t.Fatal("header")
	}
	off += 4
	for i := 0; off < len(b); i++ {
		n := frameLen + int(le.Uint32(b[off:]))
		stream = append(stream, b[off:off+n]...)
		if le.Uint32(b[off+n:]) != crc(stream) {
			t.Fatalf("entry %d", i)
		}
		off += n + 4
	}
}

// randomEntries returns n valid entries of random kinds and sizes, then End.
func randomEntries(rng *rand.Rand, n int, pmu bool) []Entry {
	var out []Entry
	var exits, br uint64
	data := func(lo, hi int) []byte {
		b := make([]byte, lo+rng.IntN(hi-lo+1))
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
		return b
	}
	for range n {
		if rng.IntN(3) == 0 {
			if d := uint64(rng.IntN(5)); d > 0 {
				exits += d
				br = 0
			}
		}
		if pmu {
			br += uint64(rng.IntN(3))
		}
		p := Position{Exits: exits, RIP: rng.Uint64()}
		if pmu {
			p.Branches, p.RCX = br, rng.Uint64()
		}
		dev := uint16(rng.IntN(4))
		var e Entry
		switch k := Kind(1 + rng.IntN(int(End)-1)); k {
		case ClockRead:
			e = Entry{Kind: k, Pos: p, Device: dev, Value: rng.Int64()}
		case SerialInput:
			e = Entry{Kind: k, Pos: p, Device: dev, Data: data(1, 64)}
		case Packet:
			e = Entry{Kind: k, Pos: p, Device: dev, Data: data(1, 2000)}
		case Completion:
			e = Entry{Kind: k, Pos: p, Device: dev, Data: data(0, MaxCompletionLen)}
		case Interrupt:
			e = Entry{Kind: k, Pos: p, Vector: uint8(rng.Uint32())}
		case WindowRequest:
			e = Entry{Kind: k, Pos: p}
		case Progress:
			e = Entry{Kind: k, Pos: Position{Exits: exits}}
			exits++
			br = 0
		case Digest:
			e = Entry{Kind: k, Pos: p}
			copy(e.Digest[:], data(DigestLen, DigestLen))
		case StateDelta:
			e = Entry{Kind: k, Pos: p, Data: data(0, 5000)}
		case Opaque:
			e = Entry{Kind: k, Pos: p, Device: dev, Name: "n" + fmt.Sprint(rng.IntN(100)), Data: data(0, 100)}
		}
		out = append(out, e)
	}
	p := Position{Exits: exits + 1}
	if pmu {
		p.Branches = br
	}
	return append(out, Entry{Kind: End, Pos: p})
}

func TestManyEntries(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for _, pmu := range []bool{false, true} {
		want := randomEntries(rng, 20000, pmu)
		b := encodeLog(t, Header{PMU: pmu}, want)
		_, got, err := decodeAll(bytes.NewReader(b))
		if err != nil {
			t.Fatal(err)
		}
		checkEntries(t, got, want)
		_, got, err = decodeAll(iotest.HalfReader(bytes.NewReader(b)))
		if err != nil {
			t.Fatal(err)
		}
		checkEntries(t, got, want)
	}
}

// chunkWriter records every Write call.
type chunkWriter struct{ chunks [][]byte }

func (w *chunkWriter) Write(b []byte) (int, error) {
	w.chunks = append(w.chunks, bytes.Clone(b))
	return len(b), nil
}

// TestWholeEntries: every write to the underlying writer ends on an entry
// boundary, with automatic flushes (large entries) and explicit ones.
func TestWholeEntries(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	ents := randomEntries(rng, 3000, false)
	var w chunkWriter
	e, err := NewEncoder(&w, Header{})
	if err != nil {
		t.Fatal(err)
	}
	for i := range ents {
		if err := e.Write(&ents[i]); err != nil {
			t.Fatal(err)
		}
		if rng.IntN(50) == 0 {
			if err := e.Flush(); err != nil {
				t.Fatal(err)
			}
		}
	}
	if len(w.chunks) < 10 {
		t.Fatalf("only %d writes", len(w.chunks))
	}
	var stream []byte
	for i, c := range w.chunks {
		stream = append(stream, c...)
		if i == len(w.chunks)-1 {
			break
		}
		// Everything so far decodes, and the decoder stops cleanly between
		// entries: a truncated error with no kind at the very end.
		d := NewDecoder(bytes.NewReader(stream))
		for {
			_, err := d.Next()
			if err == nil {
				continue
			}
			var fe *FormatError
			if !errors.As(err, &fe) || fe.Err != ErrTruncated || fe.Kind != 0 || fe.Offset != int64(len(stream)) {
				t.Fatalf("write %d: %v", i, err)
			}
			break
		}
	}
	_, got, err := decodeAll(bytes.NewReader(stream))
	if err != nil {
		t.Fatal(err)
	}
	checkEntries(t, got, ents)
}

func formatErr(t *testing.T, err error) *FormatError {
	t.Helper()
	var fe *FormatError
	if !errors.As(err, &fe) {
		t.Fatalf("error %v (%T) is not a *FormatError", err, err)
	}
	return fe
}

func TestBadMagic(t *testing.T) {
	b := encodeLog(t, Header{}, sampleEntries(false))
	for _, bad := range [][]byte{append([]byte("GOKVMSNP"), b[8:]...), []byte("X"), []byte("GOKVMLOX"), []byte("hello world, this is not a log at all")} {
		_, _, err := decodeAll(bytes.NewReader(bad))
		if !errors.Is(err, ErrBadMagic) {
			t.Errorf("%q: %v", bad[:min(len(bad), 8)], err)
		}
	}
}

// header returns a v1-shaped header with the given version and flags and
// correct CRCs.
func header(version, flags uint32, meta []byte) []byte {
	b := append([]byte(Magic), make([]byte, 24)...)
	le := binary.LittleEndian
	le.PutUint32(b[8:], version)
	le.PutUint32(b[12:], flags)
	le.PutUint32(b[24:], uint32(len(meta)))
	le.PutUint32(b[28:], crc(b[:28]))
	b = append(b, meta...)
	return le.AppendUint32(b, crc(b))
}

func TestVersion(t *testing.T) {
	for _, c := range []struct {
		name string
		b    []byte
		err  error
	}{
		{"version 2", header(2, 0, nil), ErrVersion},
		{"version 2, short", header(2, 0, nil)[:12], ErrVersion},
		{"version 0", header(0, 0, nil), ErrVersion},
		{"unknown flag", header(1, 2, nil), ErrVersion},
		{"big meta", header(1, 0, make([]byte, MaxMetaLen+1)), ErrTooLarge},
		{"meta not JSON", header(1, 0, []byte("{")), ErrCorrupt},
		{"v1 no entries", header(1, 0, nil), ErrTruncated},
		{"v1 pmu no entries", header(1, 1, []byte(`"x"`)), ErrTruncated},
	} {
		_, _, err := decodeAll(bytes.NewReader(c.b))
		if !errors.Is(err, c.err) {
			t.Errorf("%s: %v, want %v", c.name, err, c.err)
			continue
		}
		if fe := formatErr(t, err); fe.Entry != -1 && c.err != ErrTruncated {
			t.Errorf("%s: entry %d, want the header", c.name, fe.Entry)
		}
	}
}

// TestTruncation: every prefix of a log is ErrTruncated (never another error,
// never a panic), with the entries before the cut decoded, and the error
// names the entry being cut and its offset.
func TestTruncation(t *testing.T) {
	for _, pmu := range []bool{false, true} {
		want := sampleEntries(pmu)
		b := encodeLog(t, Header{PMU: pmu, Meta: testMeta}, want)
		// offsets[i] is the start of entry i.
		var offsets []int64
		d := NewDecoder(bytes.NewReader(b))
		if _, err := d.Header(); err != nil {
			t.Fatal(err)
		}
		for {
			offsets = append(offsets, d.Offset())
			ent, err := d.Next()
			if err != nil {
				t.Fatal(err)
			}
			if ent.Kind == End {
				break
			}
		}
		hdrLen := offsets[0]
		for n := 0; n < len(b); n++ {
			_, got, err := decodeAll(bytes.NewReader(b[:n]))
			if !errors.Is(err, ErrTruncated) || !errors.Is(err, io.ErrUnexpectedEOF) {
				t.Fatalf("prefix %d: %v", n, err)
			}
			fe := formatErr(t, err)
			if int64(n) < hdrLen {
				if fe.Entry != -1 || fe.Offset != 0 {
					t.Fatalf("prefix %d: %v", n, err)
				}
				continue
			}
			i := len(got)
			checkEntries(t, got, want[:i])
			if fe.Entry != int64(i) || fe.Offset != offsets[i] {
				t.Fatalf("prefix %d: %v; want entry %d at %d", n, err, i, offsets[i])
			}
			if readable := int64(n)-offsets[i] >= frameLen; readable != (fe.Kind != 0) || readable && fe.Kind != want[i].Kind {
				t.Fatalf("prefix %d: kind %v", n, fe.Kind)
			}
		}
	}
}

// TestBitFlips: every single-bit flip of a small log is detected, as an
// error other than ErrTruncated, and never a panic.
func TestBitFlips(t *testing.T) {
	ents := sampleEntries(false)
	ents[6].Data = ents[6].Data[:40] // keep the log small
	b := encodeLog(t, Header{Meta: []byte(`{"a":1}`)}, ents)
	for i := range len(b) * 8 {
		c := bytes.Clone(b)
		c[i/8] ^= 1 << (i % 8)
		_, _, err := decodeAll(bytes.NewReader(c))
		if err == nil || errors.Is(err, ErrTruncated) {
			t.Fatalf("flip of bit %d of byte %d: %v", i%8, i/8, err)
		}
		formatErr(t, err)
	}
}

// raw builds logs without the Encoder's checks.
type raw struct {
	b   []byte
	run uint32
	pmu bool
}

func newRaw(h Header) *raw {
	r := &raw{pmu: h.PMU}
	r.b, r.run = appendHeader(nil, &h)
	return r
}

func (r *raw) entry(e Entry) *raw {
	r.b, r.run = appendEntry(r.b, &e, r.pmu, r.run)
	return r
}

// frame appends an entry frame with a correct frame CRC and then body, with a
// correct running CRC if withCRC.
func (r *raw) frame(kind byte, reserved byte, dev uint16, bodyLen uint32, body []byte, withCRC bool) *raw {
	start := len(r.b)
	r.b = binary.LittleEndian.AppendUint32(r.b, bodyLen)
	r.b = append(r.b, kind, reserved)
	r.b = binary.LittleEndian.AppendUint16(r.b, dev)
	r.b = binary.LittleEndian.AppendUint32(r.b, crc(r.b[start:]))
	r.b = append(r.b, body...)
	if withCRC {
		r.run = crcUpdate(r.run, r.b[start:])
		r.b = binary.LittleEndian.AppendUint32(r.b, r.run)
	}
	return r
}

func (r *raw) end(p Position) []byte { return r.entry(Entry{Kind: End, Pos: p}).b }

func TestDecodeErrors(t *testing.T) {
	big := make([]byte, 16)
	pmuPos := Position{Exits: 1, RIP: 2, Branches: 3}
	for _, c := range []struct {
		name  string
		b     []byte
		err   error
		entry int64
	}{
		{"unknown kind 12", newRaw(Header{}).frame(12, 0, 0, 16, make([]byte, 16), true).end(pos(1, 0)), ErrUnknownKind, 0},
		{"unknown kind 0", newRaw(Header{}).entry(Entry{Kind: WindowRequest}).frame(0, 0, 0, 16, make([]byte, 16), true).end(pos(1, 0)), ErrUnknownKind, 1},
		{"reserved byte", newRaw(Header{}).frame(byte(WindowRequest), 1, 0, 16, make([]byte, 16), true).end(pos(1, 0)), ErrCorrupt, 0},
		{"device on interrupt", newRaw(Header{}).entry(Entry{Kind: Interrupt, Device: 1, Vector: 1}).end(pos(1, 0)), ErrCorrupt, 0},
		{"packet too large", newRaw(Header{}).frame(byte(Packet), 0, 0, 16+MaxPacketLen+1, big, false).b, ErrTooLarge, 0},
		{"delta too large", newRaw(Header{}).frame(byte(StateDelta), 0, 0, 16+MaxDeltaLen+1, big, false).b, ErrTooLarge, 0},
		{"length 2^32-1", newRaw(Header{}).frame(byte(Packet), 0, 0, 0xffffffff, big, false).b, ErrTooLarge, 0},
		{"clock body short", newRaw(Header{}).frame(byte(ClockRead), 0, 0, 16+4, make([]byte, 20), true).end(pos(1, 0)), ErrCorrupt, 0},
		{"body shorter than position", newRaw(Header{}).frame(byte(End), 0, 0, 8, make([]byte, 8), true).b, ErrCorrupt, 0},
		{"empty serial", newRaw(Header{}).frame(byte(SerialInput), 0, 0, 16, make([]byte, 16), true).end(pos(1, 0)), ErrCorrupt, 0},
		{"opaque name length 0", newRaw(Header{}).frame(byte(Opaque), 0, 0, 18, make([]byte, 18), true).end(pos(1, 0)), ErrCorrupt, 0},
		{"opaque name past payload", newRaw(Header{}).frame(byte(Opaque), 0, 0, 18, append(make([]byte, 16), 5, 'a'), true).end(pos(1, 0)), ErrCorrupt, 0},
		{"opaque name unprintable", newRaw(Header{}).frame(byte(Opaque), 0, 0, 18, append(make([]byte, 16), 1, ' '), true).end(pos(1, 0)), ErrCorrupt, 0},
		{"progress with rip", newRaw(Header{}).entry(Entry{Kind: Progress, Pos: pos(1, 5)}).end(pos(2, 0)), ErrCorrupt, 0},
		{"exits backwards", newRaw(Header{}).entry(Entry{Kind: Interrupt, Pos: pos(5, 0), Vector: 1}).entry(Entry{Kind: WindowRequest, Pos: pos(4, 0)}).end(pos(9, 0)), ErrOrder, 1},
		{"branches backwards", newRaw(Header{PMU: true}).entry(Entry{Kind: WindowRequest, Pos: pmuPos}).entry(Entry{Kind: WindowRequest, Pos: Position{Exits: 1, Branches: 2}}).end(pos(9, 0)), ErrOrder, 1},
		{"entry at covered exit", newRaw(Header{}).entry(Entry{Kind: Progress, Pos: pos(5, 0)}).entry(Entry{Kind: WindowRequest, Pos: pos(5, 0)}).end(pos(9, 0)), ErrOrder, 1},
		{"progress backwards", newRaw(Header{}).entry(Entry{Kind: Progress, Pos: pos(5, 0)}).entry(Entry{Kind: Progress, Pos: pos(4, 0)}).end(pos(9, 0)), ErrOrder, 1},
		{"progress behind entry", newRaw(Header{}).entry(Entry{Kind: WindowRequest, Pos: pos(5, 0)}).entry(Entry{Kind: Progress, Pos: pos(4, 0)}).end(pos(9, 0)), ErrOrder, 1},
		{"end behind progress", newRaw(Header{}).entry(Entry{Kind: Progress, Pos: pos(5, 0)}).end(pos(4, 0)), ErrOrder, 1},
		{"end behind entry", newRaw(Header{}).entry(Entry{Kind: Interrupt, Pos: pos(5, 0), Vector: 1}).end(pos(4, 0)), ErrOrder, 1},
	} {
		_, _, err := decodeAll(bytes.NewReader(c.b))
		if !errors.Is(err, c.err) {
			t.Errorf("%s: %v, want %v", c.name, err, c.err)
			continue
		}
		if c.err != ErrCorrupt && !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s: %v does not match ErrCorrupt", c.name, err)
		}
		if fe := formatErr(t, err); fe.Entry != c.entry {
			t.Errorf("%s: %v: entry %d, want %d", c.name, err, fe.Entry, c.entry)
		}
	}
	// End at the covered exit is fine, and so is an entry right after it.
	ok := newRaw(Header{}).entry(Entry{Kind: Progress, Pos: pos(5, 0)}).entry(Entry{Kind: Progress, Pos: pos(5, 0)}).
		entry(Entry{Kind: WindowRequest, Pos: pos(6, 0)}).entry(Entry{Kind: Progress, Pos: pos(6, 0)}).end(pos(6, 0))
	if _, _, err := decodeAll(bytes.NewReader(ok)); err != nil {
		t.Fatal(err)
	}
}

// TestDroppedEntry: an intact entry dropped, repeated or swapped fails the
// running CRC of the entry after it.
func TestDroppedEntry(t *testing.T) {
	ents := []Entry{
		{Kind: WindowRequest, Pos: pos(1, 0)},
		{Kind: WindowRequest, Pos: pos(1, 0)},
		{Kind: WindowRequest, Pos: pos(1, 0)},
		{Kind: End, Pos: pos(1, 0)},
	}
	b := encodeLog(t, Header{}, ents)
	const h, n = 36, 32 // header, WindowRequest entry
	e0, e1 := b[h:h+n], b[h+n:h+2*n]
	for name, c := range map[string][]byte{
		"dropped":  append(append([]byte(nil), b[:h+n]...), b[h+2*n:]...),
		"repeated": append(append(append([]byte(nil), b[:h+n]...), e0...), b[h+n:]...),
		"swapped":  append(append(append(append([]byte(nil), b[:h]...), e1...), e0...), b[h+2*n:]...),
	} {
		_, _, err := decodeAll(bytes.NewReader(c))
		if !errors.Is(err, ErrChecksum) {
			t.Errorf("%s: %v", name, err)
		}
	}
}

// TestStickyAndEOF: format errors repeat, truncation does not stick.
func TestStickyAndEOF(t *testing.T) {
	b := encodeLog(t, Header{}, []Entry{{Kind: WindowRequest, Pos: pos(1, 0)}, {Kind: End, Pos: pos(2, 0)}})
	c := bytes.Clone(b)
	c[len(c)-1] ^= 1
	d := NewDecoder(bytes.NewReader(c))
	if _, err := d.Next(); err != nil {
		t.Fatal(err)
	}
	_, err1 := d.Next()
	_, err2 := d.Next()
	if !errors.Is(err1, ErrChecksum) || err1 != err2 {
		t.Fatalf("%v, then %v", err1, err2)
	}
	d = NewDecoder(bytes.NewReader(b))
	for range 2 {
		if _, err := d.Next(); err != nil {
			t.Fatal(err)
		}
	}
	for range 2 {
		if _, err := d.Next(); err != io.EOF {
			t.Fatalf("after End: %v", err)
		}
	}
}

// TestLyingLengthAllocation: a length announcing 64 MiB on a short stream
// allocates with what arrives, not with what was announced.
func TestLyingLengthAllocation(t *testing.T) {
	b := newRaw(Header{}).frame(byte(StateDelta), 0, 0, 16+MaxDeltaLen, make([]byte, 1000), false).b
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	_, _, err := decodeAll(bytes.NewReader(b))
	runtime.ReadMemStats(&after)
	if !errors.Is(err, ErrTruncated) {
		t.Fatal(err)
	}
	if n := after.TotalAlloc - before.TotalAlloc; n > 1<<20 {
		t.Fatalf("allocated %d bytes", n)
	}
}

func TestEncoderRefuses(t *testing.T) {
	noPMU, _ := NewEncoder(io.Discard, Header{})
	for _, c := range []struct {
		name string
		e    Entry
		err  error
	}{
		{"kind 0", Entry{}, ErrUnknownKind},
		{"kind 12", Entry{Kind: 12}, ErrUnknownKind},
		{"empty serial", Entry{Kind: SerialInput}, ErrInvalid},
		{"long serial", Entry{Kind: SerialInput, Data: make([]byte, MaxSerialLen+1)}, ErrTooLarge},
		{"long packet", Entry{Kind: Packet, Data: make([]byte, MaxPacketLen+1)}, ErrTooLarge},
		{"long completion", Entry{Kind: Completion, Data: make([]byte, MaxCompletionLen+1)}, ErrTooLarge},
		{"device on digest", Entry{Kind: Digest, Device: 1}, ErrInvalid},
		{"data on interrupt", Entry{Kind: Interrupt, Data: []byte{1}}, ErrInvalid},
		{"value on packet", Entry{Kind: Packet, Value: 1, Data: []byte{1}}, ErrInvalid},
		{"vector on end", Entry{Kind: End, Vector: 1}, ErrInvalid},
		{"digest on clock", Entry{Kind: ClockRead, Digest: [DigestLen]byte{1}}, ErrInvalid},
		{"name on packet", Entry{Kind: Packet, Name: "x", Data: []byte{1}}, ErrInvalid},
		{"opaque without name", Entry{Kind: Opaque}, ErrInvalid},
		{"opaque long name", Entry{Kind: Opaque, Name: string(make([]byte, MaxNameLen+1))}, ErrInvalid},
		{"opaque space", Entry{Kind: Opaque, Name: "a b"}, ErrInvalid},
		{"opaque long data", Entry{Kind: Opaque, Name: "a", Data: make([]byte, MaxOpaqueLen+1)}, ErrTooLarge},
		{"pmu position", Entry{Kind: WindowRequest, Pos: Position{RCX: 1}}, ErrInvalid},
		{"progress rip", Entry{Kind: Progress, Pos: pos(1, 1)}, ErrInvalid},
	} {
		if err := noPMU.Write(&c.e); !errors.Is(err, c.err) {
			t.Errorf("%s: %v, want %v", c.name, err, c.err)
		}
	}
	if noPMU.Entries() != 0 || noPMU.Offset() != 36 {
		t.Fatalf("refused entries were counted: %d entries, offset %d", noPMU.Entries(), noPMU.Offset())
	}
	if err := noPMU.Interrupt(pos(5, 0), 0x20); err != nil {
		t.Fatal(err)
	}
	if err := noPMU.WindowRequest(pos(4, 0)); !errors.Is(err, ErrOrder) {
		t.Fatal(err)
	}
	if err := noPMU.Progress(5); err != nil {
		t.Fatal(err)
	}
	if err := noPMU.Interrupt(pos(5, 0), 0x20); !errors.Is(err, ErrOrder) {
		t.Fatal(err)
	}
	if err := noPMU.End(pos(6, 0)); err != nil {
		t.Fatal(err)
	}
	if err := noPMU.End(pos(6, 0)); !errors.Is(err, ErrEnded) {
		t.Fatal(err)
	}
	if _, err := NewEncoder(io.Discard, Header{Meta: make([]byte, MaxMetaLen+1)}); !errors.Is(err, ErrTooLarge) {
		t.Fatal(err)
	}
	if _, err := NewEncoder(io.Discard, Header{Meta: []byte("not json")}); !errors.Is(err, ErrInvalid) {
		t.Fatal(err)
	}
	// The largest entries of each kind pass.
	big, _ := NewEncoder(io.Discard, Header{PMU: true})
	for _, e := range []Entry{
		{Kind: SerialInput, Data: make([]byte, MaxSerialLen)},
		{Kind: Packet, Data: make([]byte, MaxPacketLen)},
		{Kind: Completion, Data: make([]byte, MaxCompletionLen)},
		{Kind: StateDelta, Data: make([]byte, MaxDeltaLen)},
		{Kind: Opaque, Name: string(bytes.Repeat([]byte("z"), MaxNameLen)), Data: make([]byte, MaxOpaqueLen)},
	} {
		if err := big.Write(&e); err != nil {
			t.Fatalf("%v: %v", e.Kind, err)
		}
	}
}

type failWriter struct{ n int }

func (w *failWriter) Write(b []byte) (int, error) {
	if w.n == 0 {
		return 0, errors.New("disk full")
	}
	w.n--
	return len(b), nil
}

func TestEncoderWriteErrorSticks(t *testing.T) {
	e, _ := NewEncoder(&failWriter{}, Header{})
	if err := e.WindowRequest(pos(1, 0)); err != nil {
		t.Fatal(err)
	}
	err1 := e.Flush()
	err2 := e.WindowRequest(pos(2, 0))
	if err1 == nil || err1 != err2 {
		t.Fatalf("%v, then %v", err1, err2)
	}
}

// growingReader is a stream being appended to: Read returns io.EOF at the
// current end, and the new bytes once they are there.
type growingReader struct {
	data []byte
	off  int
}

func (r *growingReader) Read(b []byte) (int, error) {
	if r.off == len(r.data) {
		return 0, io.EOF
	}
	n := copy(b, r.data[r.off:])
	r.off += n
	return n, nil
}

// TestTailing feeds a log in pieces of every size to one Decoder, which
// retries on ErrTruncated.
func TestTailing(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	want := randomEntries(rng, 500, true)
	b := encodeLog(t, Header{PMU: true, Meta: testMeta}, want)
	for _, step := range []int{1, 7, 13, 100, 4096} {
		r := &growingReader{}
		d := NewDecoder(r)
		var got []Entry
		for fed := 0; ; {
			ent, err := d.Next()
			if err == io.EOF {
				break
			}
			if errors.Is(err, ErrTruncated) {
				if fed == len(b) {
					t.Fatalf("step %d: truncated at the end: %v", step, err)
				}
				fed = min(fed+step, len(b))
				r.data = b[:fed]
				continue
			}
			if err != nil {
				t.Fatalf("step %d: %v", step, err)
			}
			got = append(got, ent)
		}
		checkEntries(t, got, want)
	}
}

// TestTailingFile: a recorder appends to a file through an Encoder while a
// replayer reads the same file, including a half-written entry.
func TestTailingFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "log")
	w, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	r, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	e, err := NewEncoder(w, Header{Meta: testMeta})
	if err != nil {
		t.Fatal(err)
	}
	d := NewDecoder(r)
	// Nothing written yet: truncated in the header.
	if _, err := d.Header(); !errors.Is(err, ErrTruncated) {
		t.Fatal(err)
	}
	want := sampleEntries(false)
	next := func(n int) {
		t.Helper()
		for range n {
			ent, err := d.Next()
			if err != nil {
				t.Fatal(err)
			}
			if !sameEntry(&ent, &want[d.Entries()-1]) {
				t.Fatalf("entry %d: %+v", d.Entries()-1, ent)
			}
		}
		if _, err := d.Next(); !errors.Is(err, ErrTruncated) {
			t.Fatalf("after %d entries: %v", d.Entries(), err)
		}
	}
	half := len(want) / 2
	for i := range want[:half] {
		if err := e.Write(&want[i]); err != nil {
			t.Fatal(err)
		}
	}
	if err := e.Flush(); err != nil {
		t.Fatal(err)
	}
	next(half)
	// The rest, written in two pieces that split an entry.
	var rest bytes.Buffer
	e2 := *e // the same encoder state, writing to a buffer instead
	e2.w = &rest
	for i := range want[half:] {
		if err := e2.Write(&want[half+i]); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := w.Write(rest.Bytes()[:50]); err != nil {
		t.Fatal(err)
	}
	next(1) // the 32-byte Completion fits in 50 bytes, the 64-byte Digest does not
	if _, err := w.Write(rest.Bytes()[50:]); err != nil {
		t.Fatal(err)
	}
	for d.Entries() < int64(len(want)) {
		ent, err := d.Next()
		if err != nil {
			t.Fatal(err)
		}
		if !sameEntry(&ent, &want[d.Entries()-1]) {
			t.Fatalf("entry %d: %+v", d.Entries()-1, ent)
		}
	}
	if _, err := d.Next(); err != io.EOF {
		t.Fatal(err)
	}
}

// BenchmarkEncode encodes 1M ClockRead entries per iteration.
func BenchmarkEncode(b *testing.B) {
	const n = 1 << 20
	var bytesPer float64
	b.ReportAllocs()
	for b.Loop() {
		var cw countWriter
		e, _ := NewEncoder(&cw, Header{})
		for i := range uint64(n) {
			if err := e.ClockRead(Position{Exits: i / 4, RIP: 0xffffffff81000000 + i}, 1, int64(i)*1000); err != nil {
				b.Fatal(err)
			}
		}
		e.Flush()
		bytesPer = float64(cw.n-36) / n
	}
	b.ReportMetric(float64(n*b.N)/b.Elapsed().Seconds(), "entries/s")
	b.ReportMetric(bytesPer, "bytes/entry")
}

// BenchmarkDecode decodes 1M ClockRead entries per iteration.
func BenchmarkDecode(b *testing.B) {
	const n = 1 << 20
	var buf bytes.Buffer
	e, _ := NewEncoder(&buf, Header{})
	for i := range uint64(n) {
		e.ClockRead(Position{Exits: i / 4, RIP: 0xffffffff81000000 + i}, 1, int64(i)*1000)
	}
	e.End(Position{Exits: n})
	log := buf.Bytes()
	b.ReportAllocs()
	for b.Loop() {
		d := NewDecoder(bytes.NewReader(log))
		for {
			ent, err := d.Next()
			if err != nil {
				b.Fatal(err)
			}
			if ent.Kind == End {
				break
			}
		}
	}
	b.ReportMetric(float64(n*b.N)/b.Elapsed().Seconds(), "entries/s")
}

type countWriter struct{ n int64 }

func (w *countWriter) Write(b []byte) (int, error) { w.n += int64(len(b)); return len(b), nil }

// TestMethods writes every kind through the Encoder's methods, with a large
// StateDelta, and checks the decoded entries and error messages.
func TestMethods(t *testing.T) {
	var buf bytes.Buffer
	e, err := NewEncoder(&buf, Header{PMU: true})
	if err != nil {
		t.Fatal(err)
	}
	p := Position{Exits: 1, RIP: 0x10, Branches: 5, RCX: 2}
	delta := bytes.Repeat([]byte("0123456789abcdef"), (2<<20)/16)
	dg := [DigestLen]byte{1, 2, 3}
	for _, err := range []error{
		e.ClockRead(p, 1, 42),
		e.SerialInput(p, 2, []byte("a")),
		e.Packet(p, 3, []byte("frame")),
		e.Completion(p, 4, nil),
		e.Interrupt(p, 0x21),
		e.WindowRequest(p),
		e.Digest(p, dg),
		e.StateDelta(p, delta),
		e.Opaque(p, 5, "rng", []byte{7}),
		e.Progress(1),
		e.End(Position{Exits: 2}),
	} {
		if err != nil {
			t.Fatal(err)
		}
	}
	want := []Entry{
		{Kind: ClockRead, Pos: p, Device: 1, Value: 42},
		{Kind: SerialInput, Pos: p, Device: 2, Data: []byte("a")},
		{Kind: Packet, Pos: p, Device: 3, Data: []byte("frame")},
		{Kind: Completion, Pos: p, Device: 4},
		{Kind: Interrupt, Pos: p, Vector: 0x21},
		{Kind: WindowRequest, Pos: p},
		{Kind: Digest, Pos: p, Digest: dg},
		{Kind: StateDelta, Pos: p, Data: delta},
		{Kind: Opaque, Pos: p, Device: 5, Name: "rng", Data: []byte{7}},
		{Kind: Progress, Pos: Position{Exits: 1}},
		{Kind: End, Pos: Position{Exits: 2}},
	}
	_, got, err := decodeAll(bytes.NewReader(buf.Bytes()))
	if err != nil {
		t.Fatal(err)
	}
	checkEntries(t, got, want)

	// Error messages name the entry, its kind and the offset.
	c := bytes.Clone(buf.Bytes())
	c[len(c)-1] ^= 1
	_, _, err = decodeAll(bytes.NewReader(c))
	if s := fmt.Sprint(err); s != fmt.Sprintf("ftlog: entry 10 (End) at byte %d: checksum mismatch: ", len(c)-48)+err.(*FormatError).Detail {
		t.Fatalf("message %q", s)
	}
	_, _, err = decodeAll(bytes.NewReader([]byte("GOKVMLOG")))
	if s := fmt.Sprint(err); s != "ftlog: header at byte 0: truncated: 8 of 32 header bytes" {
		t.Fatalf("message %q", s)
	}
	c[36+8] ^= 1 // the first entry's frame CRC
	_, _, err = decodeAll(bytes.NewReader(c))
	if s := fmt.Sprint(err); !bytes.HasPrefix([]byte(s), []byte("ftlog: entry 0 at byte 36: checksum mismatch: frame CRC")) {
		t.Fatalf("message %q", s)
	}
}

// errReader fails once after n bytes, then goes on.
type errReader struct {
	data []byte
	n    int
	done bool
}

func (r *errReader) Read(b []byte) (int, error) {
	if !r.done && r.n == 0 {
		r.done = true
		return 0, errors.New("connection reset")
	}
	m := len(b)
	if !r.done {
		m = min(m, r.n)
		r.n -= m
	}
	m = copy(b[:m], r.data)
	r.data = r.data[m:]
	if m == 0 {
		return 0, io.EOF
	}
	return m, nil
}

func TestReaderError(t *testing.T) {
	want := sampleEntries(false)
	b := encodeLog(t, Header{}, want)
	d := NewDecoder(&errReader{data: b, n: 100})
	var got []Entry
	failed := false
	for {
		ent, err := d.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			var fe *FormatError
			if failed || errors.As(err, &fe) || err.Error() != "ftlog: reading entry 1 at byte 76: connection reset" {
				t.Fatal(err)
			}
			failed = true
			continue
		}
		got = append(got, ent)
	}
	if !failed {
		t.Fatal("no error")
	}
	checkEntries(t, got, want)
}

// emptyReader returns nothing, forever.
type emptyReader struct{}

func (emptyReader) Read([]byte) (int, error) { return 0, nil }

func TestNoProgress(t *testing.T) {
	if _, err := NewDecoder(emptyReader{}).Next(); !errors.Is(err, io.ErrNoProgress) {
		t.Fatal(err)
	}
}
