package snapshot

import (
	"bufio"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"hash/crc32"
	"io"
	"slices"
)

// errNoMemory is the Decoder's answer to a pages record before SetMemory.
var errNoMemory = errors.New("snapshot: pages record before Decoder.SetMemory")

// RecordKind tells what a Record is.
type RecordKind uint8

// Record kinds.
const (
	SectionRecord RecordKind = recSection // a named section: Name, Data
	PagesRecord   RecordKind = recPages   // pages applied to the destination
	EndRecord     RecordKind = recEnd     // the end: the stream is complete and verified
)

func (k RecordKind) String() string {
	switch k {
	case SectionRecord:
		return "section"
	case PagesRecord:
		return "pages"
	case EndRecord:
		return "end"
	}
	return fmt.Sprintf("RecordKind(%d)", uint8(k))
}

// Record is one decoded record.
type Record struct {
	Kind RecordKind

	// SectionRecord.
	Name string
	Data []byte // owned by the caller

	// PagesRecord, already applied to the destination memory.
	Full      bool   // every page not carried was zeroed
	DataPages uint64 // pages copied from the stream
	ZeroPages uint64 // pages zeroed by zero chunks (not counting Full's)
}

// Decoder reads a snapshot stream record by record. NewDecoder reads the
// header, so the memory size is known before anything else; the caller
// checks it, calls SetMemory with a destination of that size, then calls
// Next until it returns the end record. A Decoder reads ahead of the end
// record through a buffer, unless the reader given to NewDecoder is a
// *bufio.Reader (then it reads exactly the snapshot from it, and the
// connection can carry more). After an error every call returns it again.
type Decoder struct {
	r       *bufio.Reader
	sum     hash.Hash
	off     int64
	memSize uint64
	pages   uint64
	dst     []byte
	names   map[string]bool
	staging []byte
	ended   bool
	err     error
}

// NewDecoder reads and checks the header of the stream in r.
func NewDecoder(r io.Reader) (*Decoder, error) {
	br, ok := r.(*bufio.Reader)
	if !ok {
		br = bufio.NewReaderSize(r, 64<<10)
	}
	d := &Decoder{r: br, sum: sha256.New(), names: make(map[string]bool)}
	var h [headerLen]byte
	if err := d.read(h[:12]); err != nil {
		return nil, err
	}
	if string(h[:8]) != Magic {
		return nil, d.fail(0, ErrBadMagic, fmt.Sprintf("starts with %q", h[:8]))
	}
	if v := binary.LittleEndian.Uint32(h[8:]); v != Version {
		return nil, d.fail(8, ErrVersion, fmt.Sprintf("version %d, this decoder reads version %d", v, Version))
	}
	if err := d.read(h[12:]); err != nil {
		return nil, err
	}
	if got, want := binary.LittleEndian.Uint32(h[28:]), crc(h[:28]); got != want {
		return nil, d.fail(0, ErrChecksum, "header")
	}
	if f := binary.LittleEndian.Uint32(h[12:]); f != 0 {
		return nil, d.fail(12, ErrVersion, fmt.Sprintf("unknown header flags %#x", f))
	}
	if binary.LittleEndian.Uint32(h[24:]) != 0 {
		return nil, d.fail(24, ErrCorrupt, "reserved header bytes set")
	}
	d.memSize = binary.LittleEndian.Uint64(h[16:])
	if checkMemSize(d.memSize) != nil {
		return nil, d.fail(16, ErrCorrupt, fmt.Sprintf("memory size %d is not a multiple of %d at most %d", d.memSize, PageSize, uint64(MaxMemorySize)))
	}
	d.pages = d.memSize / PageSize
	return d, nil
}

// MemorySize is the guest memory size the header declares, in bytes.
func (d *Decoder) MemorySize() uint64 { return d.memSize }

// Offset is the number of stream bytes consumed so far.
func (d *Decoder) Offset() int64 { return d.off }

// SetMemory sets the destination of the pages records: exactly
// MemorySize bytes. Pages records write only into it, only at the pages
// they carry (and, when Full, zero the others); a pages record before
// SetMemory is an error unless the memory size is 0.
func (d *Decoder) SetMemory(dst []byte) error {
	if uint64(len(dst)) != d.memSize {
		return fmt.Errorf("snapshot: %w: destination has %d bytes, the snapshot %d", ErrMemorySize, len(dst), d.memSize)
	}
	d.dst = dst
	return nil
}

// fail records and returns a format error.
func (d *Decoder) fail(off int64, err error, detail string) error {
	d.err = &FormatError{Offset: off, Err: err, Detail: detail}
	return d.err
}

// read fills p from the stream and adds it to the digest. The end of the
// input is ErrTruncated: a complete stream ends with its end record.
func (d *Decoder) read(p []byte) error {
	n, err := io.ReadFull(d.r, p)
	d.sum.Write(p[:n])
	d.off += int64(n)
	if err != nil {
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			return d.fail(d.off, ErrTruncated, "")
		}
		d.err = fmt.Errorf("snapshot: read at byte %d: %w", d.off, err)
		return d.err
	}
	return nil
}

// Next reads the next record. A pages record is applied to the destination
// before Next returns it. After the end record (whose digest has been
// verified) Next returns io.EOF.
func (d *Decoder) Next() (Record, error) {
	if d.err != nil {
		return Record{}, d.err
	}
	if d.ended {
		return Record{}, io.EOF
	}
	start := d.off
	var t [1]byte
	if err := d.read(t[:]); err != nil {
		return Record{}, err
	}
	switch t[0] {
	case recSection:
		return d.section(start)
	case recPages:
		return d.pagesRecord(start)
	case recEnd:
		return d.end(start)
	}
	return Record{}, d.fail(start, ErrCorrupt, fmt.Sprintf("unknown record type %d", t[0]))
}

func (d *Decoder) section(start int64) (Record, error) {
	var h [sectionFixed + 255 + 4]byte
	h[0] = recSection
	if err := d.read(h[1:sectionFixed]); err != nil {
		return Record{}, err
	}
	n := int(h[1])
	if err := d.read(h[sectionFixed : sectionFixed+n+4]); err != nil {
		return Record{}, err
	}
	if binary.LittleEndian.Uint32(h[sectionFixed+n:]) != crc(h[:sectionFixed+n]) {
		return Record{}, d.fail(start, ErrChecksum, "section header")
	}
	name := string(h[sectionFixed : sectionFixed+n])
	size := binary.LittleEndian.Uint32(h[4:])
	switch {
	case h[2] != 0 || h[3] != 0:
		return Record{}, d.fail(start, ErrCorrupt, fmt.Sprintf("section %q: reserved bytes set", name))
	case checkName(name) != nil:
		return Record{}, d.fail(start, ErrCorrupt, checkName(name).Error())
	case size > MaxSectionSize:
		return Record{}, d.fail(start, ErrTooLarge, fmt.Sprintf("section %q declares %d bytes, the limit is %d", name, size, MaxSectionSize))
	case d.names[name]:
		return Record{}, d.fail(start, ErrDuplicate, fmt.Sprintf("section %q", name))
	}
	d.names[name] = true
	// Grow the buffer with the bytes that actually arrive, so a false
	// length cannot make a large allocation for a short stream.
	data := make([]byte, 0, min(int(size), 1<<20))
	for len(data) < int(size) {
		k := min(int(size)-len(data), max(len(data), 1<<20))
		data = slices.Grow(data, k)[:len(data)+k]
		if err := d.read(data[len(data)-k:]); err != nil {
			return Record{}, err
		}
	}
	var c [4]byte
	if err := d.read(c[:]); err != nil {
		return Record{}, err
	}
	if binary.LittleEndian.Uint32(c[:]) != crc(data) {
		return Record{}, d.fail(start, ErrChecksum, fmt.Sprintf("section %q data", name))
	}
	return Record{Kind: SectionRecord, Name: name, Data: data}, nil
}

func (d *Decoder) pagesRecord(start int64) (Record, error) {
	var h [pagesHdrLen]byte
	h[0] = recPages
	if err := d.read(h[1:]); err != nil {
		return Record{}, err
	}
	if binary.LittleEndian.Uint32(h[4:]) != crc(h[:4]) {
		return Record{}, d.fail(start, ErrChecksum, "pages record header")
	}
	if h[1]&^pagesFullFlag != 0 || h[2] != 0 || h[3] != 0 {
		return Record{}, d.fail(start, ErrCorrupt, fmt.Sprintf("pages record: unknown flags %#x or reserved bytes set", h[1]))
	}
	if d.dst == nil && d.memSize != 0 {
		d.err = errNoMemory
		return Record{}, d.err
	}
	rec := Record{Kind: PagesRecord, Full: h[1]&pagesFullFlag != 0}
	next := uint64(0) // first page after the previous chunk
	for {
		cstart := d.off
		var ch [chunkHdrLen]byte
		if err := d.read(ch[:]); err != nil {
			return Record{}, err
		}
		kind := ch[0]
		count := uint64(binary.LittleEndian.Uint32(ch[4:]))
		first := binary.LittleEndian.Uint64(ch[8:])
		// Bound what is read before the CRC can be checked.
		var data []byte
		if kind == chunkData {
			if count == 0 || count > maxChunkPages {
				return Record{}, d.fail(cstart, ErrCorrupt, fmt.Sprintf("data chunk of %d pages, not 1..%d", count, maxChunkPages))
			}
			if uint64(len(d.staging)) < count*PageSize {
				d.staging = make([]byte, count*PageSize)
			}
			data = d.staging[:count*PageSize]
			if err := d.read(data); err != nil {
				return Record{}, err
			}
		}
		var c [4]byte
		if err := d.read(c[:]); err != nil {
			return Record{}, err
		}
		if binary.LittleEndian.Uint32(c[:]) != crc32.Update(crc(ch[:]), castagnoli, data) {
			return Record{}, d.fail(cstart, ErrChecksum, "page chunk")
		}
		if ch[1] != 0 || ch[2] != 0 || ch[3] != 0 {
			return Record{}, d.fail(cstart, ErrCorrupt, "page chunk: reserved bytes set")
		}
		switch kind {
		case chunkEnd:
			if count != 0 || first != rec.DataPages+rec.ZeroPages {
				return Record{}, d.fail(cstart, ErrCorrupt, fmt.Sprintf("pages record end: count %d, total %d, but %d pages were carried", count, first, rec.DataPages+rec.ZeroPages))
			}
			if rec.Full {
				d.zero(next, d.pages)
			}
			return rec, nil
		case chunkData, chunkZero:
		default:
			return Record{}, d.fail(cstart, ErrCorrupt, fmt.Sprintf("unknown page chunk kind %d", kind))
		}
		switch {
		case count == 0:
			return Record{}, d.fail(cstart, ErrCorrupt, "empty zero chunk")
		case first >= d.pages || count > d.pages-first:
			return Record{}, d.fail(cstart, ErrPageRange, fmt.Sprintf("pages [%d, +%d) in a memory of %d pages", first, count, d.pages))
		case first < next:
			return Record{}, d.fail(cstart, ErrCorrupt, fmt.Sprintf("chunk at page %d overlaps or precedes the previous one, which ended at %d", first, next))
		}
		if rec.Full {
			d.zero(next, first)
		}
		if kind == chunkData {
			copy(d.dst[first*PageSize:], data)
			rec.DataPages += count
		} else {
			d.zero(first, first+count)
			rec.ZeroPages += count
		}
		next = first + count
	}
}

// zero clears the destination pages [from, to), skipping those already
// zero: reading a fresh mapping costs no memory, writing it would.
func (d *Decoder) zero(from, to uint64) {
	for p := from; p < to; p++ {
		b := d.dst[p*PageSize : (p+1)*PageSize]
		if !isZero(b) {
			clear(b)
		}
	}
}

func (d *Decoder) end(start int64) (Record, error) {
	var h [endLen]byte
	h[0] = recEnd
	if err := d.read(h[1:]); err != nil {
		return Record{}, err
	}
	if binary.LittleEndian.Uint32(h[4:]) != crc(h[:4]) {
		return Record{}, d.fail(start, ErrChecksum, "end record")
	}
	if h[1] != 0 || h[2] != 0 || h[3] != 0 {
		return Record{}, d.fail(start, ErrCorrupt, "end record: reserved bytes set")
	}
	want := d.sum.Sum(nil)
	var got [digestLen]byte
	if err := d.read(got[:]); err != nil {
		return Record{}, err
	}
	if string(got[:]) != string(want) {
		return Record{}, d.fail(start, ErrChecksum, "SHA-256 of the stream")
	}
	d.ended = true
	return Record{Kind: EndRecord}, nil
}
