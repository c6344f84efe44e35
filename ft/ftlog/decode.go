package ftlog

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"
)

const (
	// minBuf is the Decoder's initial buffer and its read size.
	minBuf = 64 << 10
	// keepBuf: a buffer grown past this for a large entry is dropped once
	// that entry is consumed.
	keepBuf = 1 << 20
	// maxEmptyReads: this many reads in a row returning nothing and no
	// error fail with io.ErrNoProgress.
	maxEmptyReads = 100
)

// Decoder reads a log entry by entry. NewDecoder reads nothing; Header and
// Next read the header first if it has not been read yet. Next returns the
// entries in order, the End entry last, then io.EOF.
//
// On a *FormatError matching ErrTruncated the Decoder has consumed nothing
// of the incomplete header or entry: call again when more data may be
// there (see "Streaming and tailing" in the package documentation). Any
// other *FormatError is sticky: every later call returns it again. An error
// of the reader other than io.EOF is returned wrapped, not sticky.
//
// The Decoder reads ahead through its buffer: the log should be alone on
// its reader. It is not safe for concurrent use.
type Decoder struct {
	r      io.Reader
	buf    []byte // buf[rd:wr] is read and not yet consumed
	rd, wr int
	off    int64 // stream offset of buf[rd]

	hdr     Header
	hdrDone bool
	pmu     bool
	posLen  int
	running uint32
	n       int64 // entries decoded
	ord     order
	ended   bool
	err     error // sticky *FormatError
}

// NewDecoder returns a Decoder reading a log from r.
func NewDecoder(r io.Reader) *Decoder { return &Decoder{r: r} }

// Header reads the header if it was not read yet, and returns it. Once
// read, it is returned even after a later error in an entry.
func (d *Decoder) Header() (Header, error) {
	if err := d.readHeader(); err != nil {
		return Header{}, err
	}
	return d.hdr, nil
}

// Entries returns the number of entries decoded so far; it is also the
// number of the next entry.
func (d *Decoder) Entries() int64 { return d.n }

// Offset returns the byte offset in the stream of the next entry (or of
// the header, before it is read).
func (d *Decoder) Offset() int64 { return d.off }

// fill makes sure buf[rd:wr] holds at least need bytes, reading as
// needed. It returns nil, or the error that stopped the reading (io.EOF
// included) with fewer bytes available. The buffer grows with the bytes
// received: at most to twice what is held, and never beyond need unless
// need is below minBuf.
func (d *Decoder) fill(need int) error {
	if d.wr-d.rd >= need {
		return nil
	}
	if d.rd > 0 {
		d.wr = copy(d.buf, d.buf[d.rd:d.wr])
		d.rd = 0
	}
	empty := 0
	for d.wr < need {
		if d.wr == len(d.buf) {
			n := min(max(2*len(d.buf), minBuf), max(need, minBuf))
			nb := make([]byte, n)
			copy(nb, d.buf[:d.wr])
			d.buf = nb
		}
		m, err := d.r.Read(d.buf[d.wr:])
		if m < 0 || m > len(d.buf)-d.wr {
			return errors.New("ftlog: reader returned an invalid count")
		}
		d.wr += m
		switch {
		case d.wr >= need:
			return nil
		case err != nil:
			return err
		case m == 0:
			if empty++; empty >= maxEmptyReads {
				return io.ErrNoProgress
			}
		default:
			empty = 0
		}
	}
	return nil
}

// consume drops n bytes of the buffer: the header or an entry is done.
func (d *Decoder) consume(n int) {
	d.rd += n
	d.off += int64(n)
	if d.rd == d.wr {
		d.rd, d.wr = 0, 0
		if len(d.buf) > keepBuf {
			d.buf = nil
		}
	}
}

// fail records and returns a format error at the current offset.
func (d *Decoder) fail(kind Kind, err error, detail string) error {
	entry := d.n
	if !d.hdrDone {
		entry = -1
	}
	fe := &FormatError{Entry: entry, Kind: kind, Offset: d.off, Err: err, Detail: detail}
	if err != ErrTruncated {
		d.err = fe
	}
	return fe
}

// short turns the error that stopped a fill into the Decoder's error.
func (d *Decoder) short(kind Kind, err error, detail string) error {
	if err == io.EOF {
		return d.fail(kind, ErrTruncated, detail)
	}
	what := "header"
	if d.hdrDone {
		what = fmt.Sprintf("entry %d", d.n)
	}
	return fmt.Errorf("ftlog: reading %s at byte %d: %w", what, d.off, err)
}

func (d *Decoder) readHeader() error {
	if d.hdrDone {
		return nil
	}
	if d.err != nil {
		return d.err
	}
	if err := d.fill(headerLen); err != nil {
		have := d.buf[d.rd:d.wr]
		if len(have) > len(Magic) {
			have = have[:len(Magic)]
		}
		if string(have) != Magic[:len(have)] {
			return d.fail(0, ErrBadMagic, "")
		}
		if d.wr-d.rd >= 12 {
			if v := binary.LittleEndian.Uint32(d.buf[d.rd+8:]); v != Version {
				return d.fail(0, ErrVersion, fmt.Sprintf("version %d, want %d", v, Version))
			}
		}
		return d.short(0, err, fmt.Sprintf("%d of %d header bytes", d.wr-d.rd, headerLen))
	}
	h := d.buf[d.rd : d.rd+headerLen]
	if string(h[:8]) != Magic {
		return d.fail(0, ErrBadMagic, "")
	}
	if v := binary.LittleEndian.Uint32(h[8:]); v != Version {
		return d.fail(0, ErrVersion, fmt.Sprintf("version %d, want %d", v, Version))
	}
	if got, want := binary.LittleEndian.Uint32(h[28:]), crc(h[:28]); got != want {
		return d.fail(0, ErrChecksum, fmt.Sprintf("header CRC %#08x, computed %#08x", got, want))
	}
	flags := binary.LittleEndian.Uint32(h[12:])
	if flags&^flagPMU != 0 {
		return d.fail(0, ErrVersion, fmt.Sprintf("unknown header flags %#x", flags&^flagPMU))
	}
	metaLen := binary.LittleEndian.Uint32(h[24:])
	if metaLen > MaxMetaLen {
		return d.fail(0, ErrTooLarge, fmt.Sprintf("metadata of %d bytes, at most %d", metaLen, MaxMetaLen))
	}
	total := headerLen + int(metaLen) + crcLen
	if err := d.fill(total); err != nil {
		return d.short(0, err, fmt.Sprintf("%d of %d header bytes", d.wr-d.rd, total))
	}
	h = d.buf[d.rd : d.rd+total]
	c := crc(h[:total-crcLen])
	if got := binary.LittleEndian.Uint32(h[total-crcLen:]); got != c {
		return d.fail(0, ErrChecksum, fmt.Sprintf("metadata CRC %#08x, computed %#08x", got, c))
	}
	meta := h[headerLen : headerLen+int(metaLen)]
	if len(meta) > 0 && !json.Valid(meta) {
		return d.fail(0, ErrCorrupt, "metadata is not JSON")
	}
	hdr := Header{PMU: flags&flagPMU != 0}
	if created := int64(binary.LittleEndian.Uint64(h[16:])); created != 0 {
		hdr.Created = time.Unix(0, created).UTC()
	}
	if len(meta) > 0 {
		hdr.Meta = append([]byte(nil), meta...)
	}
	d.hdr, d.hdrDone, d.pmu, d.running = hdr, true, hdr.PMU, c
	d.posLen = posLenExit
	if d.pmu {
		d.posLen = posLenPMU
	}
	d.consume(total)
	return nil
}

// Next returns the next entry; io.EOF after the End entry.
func (d *Decoder) Next() (Entry, error) {
	if err := d.readHeader(); err != nil {
		return Entry{}, err
	}
	if d.err != nil {
		return Entry{}, d.err
	}
	if d.ended {
		return Entry{}, io.EOF
	}
	if err := d.fill(frameLen); err != nil {
		detail := "no End entry"
		if d.wr > d.rd {
			detail = fmt.Sprintf("%d of %d frame bytes", d.wr-d.rd, frameLen)
		}
		return Entry{}, d.short(0, err, detail)
	}
	f := d.buf[d.rd : d.rd+frameLen]
	if got, want := binary.LittleEndian.Uint32(f[8:]), crc(f[:8]); got != want {
		return Entry{}, d.fail(0, ErrChecksum, fmt.Sprintf("frame CRC %#08x, computed %#08x", got, want))
	}
	bodyLen := binary.LittleEndian.Uint32(f)
	kind := Kind(f[4])
	dev := binary.LittleEndian.Uint16(f[6:])
	if !kind.valid() {
		return Entry{}, d.fail(0, ErrUnknownKind, fmt.Sprintf("kind %d", f[4]))
	}
	if f[5] != 0 {
		return Entry{}, d.fail(kind, ErrCorrupt, fmt.Sprintf("reserved byte %#x", f[5]))
	}
	if !kind.hasDevice() && dev != 0 {
		return Entry{}, d.fail(kind, ErrCorrupt, fmt.Sprintf("device %d on a %v entry", dev, kind))
	}
	lo, hi := kind.payloadBounds()
	if bodyLen > uint32(d.posLen+hi) {
		return Entry{}, d.fail(kind, ErrTooLarge, fmt.Sprintf("body of %d bytes, at most %d", bodyLen, d.posLen+hi))
	}
	if bodyLen < uint32(d.posLen+lo) {
		return Entry{}, d.fail(kind, ErrCorrupt, fmt.Sprintf("body of %d bytes, at least %d", bodyLen, d.posLen+lo))
	}
	total := frameLen + int(bodyLen) + crcLen
	if err := d.fill(total); err != nil {
		return Entry{}, d.short(kind, err, fmt.Sprintf("%d of %d bytes", d.wr-d.rd, total))
	}
	b := d.buf[d.rd : d.rd+total]
	c := crcUpdate(d.running, b[:total-crcLen])
	if got := binary.LittleEndian.Uint32(b[total-crcLen:]); got != c {
		return Entry{}, d.fail(kind, ErrChecksum, fmt.Sprintf("CRC %#08x, computed %#08x (damage, or an entry dropped, repeated or moved)", got, c))
	}
	ent := Entry{Kind: kind, Device: dev}
	p := b[frameLen:]
	ent.Pos.Exits = binary.LittleEndian.Uint64(p)
	ent.Pos.RIP = binary.LittleEndian.Uint64(p[8:])
	if d.pmu {
		ent.Pos.Branches = binary.LittleEndian.Uint64(p[16:])
		ent.Pos.RCX = binary.LittleEndian.Uint64(p[24:])
	}
	pl := b[frameLen+d.posLen : total-crcLen]
	switch kind {
	case ClockRead:
		ent.Value = int64(binary.LittleEndian.Uint64(pl))
	case Interrupt:
		ent.Vector = pl[0]
	case Digest:
		copy(ent.Digest[:], pl)
	case Opaque:
		n := int(pl[0])
		if n == 0 || n > len(pl)-1 {
			return Entry{}, d.fail(kind, ErrCorrupt, fmt.Sprintf("name length %d in a payload of %d bytes", n, len(pl)))
		}
		ent.Name = string(pl[1 : 1+n])
		if len(pl) > 1+n {
			ent.Data = append([]byte(nil), pl[1+n:]...)
		}
	default:
		if len(pl) > 0 {
			ent.Data = append([]byte(nil), pl...)
		}
	}
	if detail, err := checkEntry(&ent, d.pmu); err != nil {
		return Entry{}, d.fail(kind, err, detail)
	}
	if detail := d.ord.check(kind, ent.Pos); detail != "" {
		return Entry{}, d.fail(kind, ErrOrder, detail)
	}
	d.ord.advance(kind, ent.Pos)
	d.running = c
	d.n++
	d.consume(total)
	if kind == End {
		d.ended = true
	}
	return ent, nil
}
