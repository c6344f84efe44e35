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
	"math/bits"
)

// errEnded is the Encoder's answer after WriteEnd.
var errEnded = errors.New("snapshot: encoder already ended")

// Encoder writes a snapshot stream: the header (written by NewEncoder), then
// any sequence of WriteSection, WriteMemory and WritePages, then WriteEnd.
// Output is buffered: Flush pushes it to the writer (at the end of a pre-copy
// round, say) and WriteEnd flushes. After an error every method returns it
// again. An Encoder is not safe for concurrent use.
type Encoder struct {
	w       *bufio.Writer
	sum     hash.Hash
	n       int64
	pages   uint64 // memory size in pages
	names   map[string]bool
	buf     []byte // staging for memory reads, maxChunkPages pages
	scratch [chunkHdrLen]byte
	err     error

	// State of the pages record being written.
	total      uint64 // pages carried so far (data and zero chunks)
	zeroFirst  uint64 // pending zero run, merged until a gap or a data page
	zeroCount  uint64
	zeroChunks bool // incremental record: send zero pages as zero chunks
}

// NewEncoder writes the header of a stream for a guest of memSize bytes (a
// multiple of PageSize, at most MaxMemorySize; 0 for a stream without
// memory) and returns the Encoder for the rest.
func NewEncoder(w io.Writer, memSize uint64) (*Encoder, error) {
	if err := checkMemSize(memSize); err != nil {
		return nil, err
	}
	e := &Encoder{
		w:     bufio.NewWriterSize(w, 1<<20),
		sum:   sha256.New(),
		pages: memSize / PageSize,
		names: make(map[string]bool),
	}
	var h [headerLen]byte
	copy(h[:8], Magic)
	binary.LittleEndian.PutUint32(h[8:], Version)
	binary.LittleEndian.PutUint32(h[12:], 0)
	binary.LittleEndian.PutUint64(h[16:], memSize)
	binary.LittleEndian.PutUint32(h[28:], crc(h[:28]))
	if err := e.write(h[:]); err != nil {
		return nil, err
	}
	return e, nil
}

// Written is the number of bytes of the stream so far, buffered or not.
func (e *Encoder) Written() int64 { return e.n }

// write appends p to the stream and the digest.
func (e *Encoder) write(p []byte) error {
	if e.err != nil {
		return e.err
	}
	e.sum.Write(p)
	n, err := e.w.Write(p)
	e.n += int64(n)
	if err != nil {
		e.err = fmt.Errorf("snapshot: write: %w", err)
	}
	return e.err
}

func (e *Encoder) ready() error { return e.err }

// WriteSection writes a section record: data stored under name. Names are
// 1..MaxNameLen bytes of printable ASCII without spaces and unique in the
// stream; data is at most MaxSectionSize bytes. Refusals of name or size
// (ErrTooLarge, ErrDuplicate) leave the Encoder usable.
func (e *Encoder) WriteSection(name string, data []byte) error {
	if err := e.ready(); err != nil {
		return err
	}
	if err := checkName(name); err != nil {
		return fmt.Errorf("snapshot: %w", err)
	}
	if len(data) > MaxSectionSize {
		return fmt.Errorf("snapshot: %w: %q has %d bytes, the limit is %d", ErrTooLarge, name, len(data), MaxSectionSize)
	}
	if e.names[name] {
		return fmt.Errorf("snapshot: %w: %q", ErrDuplicate, name)
	}
	e.names[name] = true
	h := make([]byte, sectionFixed+len(name)+4)
	h[0] = recSection
	h[1] = byte(len(name))
	binary.LittleEndian.PutUint32(h[4:], uint32(len(data)))
	copy(h[sectionFixed:], name)
	binary.LittleEndian.PutUint32(h[sectionFixed+len(name):], crc(h[:sectionFixed+len(name)]))
	var c [4]byte
	binary.LittleEndian.PutUint32(c[:], crc(data))
	if err := e.write(h); err != nil {
		return err
	}
	if err := e.write(data); err != nil {
		return err
	}
	return e.write(c[:])
}

// WriteMemory writes a full pages record: every non-zero page of mem, which
// must hold the stream's memory size. A decoder zeroes the pages it omits.
func (e *Encoder) WriteMemory(mem Memory) error {
	if err := e.beginPages(pagesFullFlag); err != nil {
		return err
	}
	for p := uint64(0); p < e.pages; p += maxChunkPages {
		if err := e.pageRange(mem, p, min(maxChunkPages, e.pages-p)); err != nil {
			return err
		}
	}
	return e.endPages()
}

// WritePages writes an incremental pages record: the pages of mem whose bit
// is set in dirty (bit i%64 of dirty[i/64] for page i), zero pages
// included, to be applied over the destination's current contents. dirty
// has exactly (pages+63)/64 words and no bit set beyond the last page.
func (e *Encoder) WritePages(mem Memory, dirty []uint64) error {
	if err := e.ready(); err != nil {
		return err
	}
	if want := (e.pages + 63) / 64; uint64(len(dirty)) != want {
		return fmt.Errorf("snapshot: dirty bitmap has %d words, memory of %d pages needs %d", len(dirty), e.pages, want)
	}
	if r := e.pages % 64; r != 0 && dirty[len(dirty)-1]>>r != 0 {
		return fmt.Errorf("snapshot: dirty bitmap marks pages beyond the last of %d", e.pages)
	}
	if err := e.beginPages(0); err != nil {
		return err
	}
	e.zeroChunks = true
	// Send each run of set bits in pieces of at most maxChunkPages.
	for p := uint64(0); p < e.pages; {
		start := nextBit(dirty, p, true)
		if start >= e.pages {
			break
		}
		end := min(nextBit(dirty, start, false), e.pages)
		for q := start; q < end; q += maxChunkPages {
			if err := e.pageRange(mem, q, min(maxChunkPages, end-q)); err != nil {
				return err
			}
		}
		p = end
	}
	return e.endPages()
}

func (e *Encoder) beginPages(flags byte) error {
	if err := e.ready(); err != nil {
		return err
	}
	var h [pagesHdrLen]byte
	h[0] = recPages
	h[1] = flags
	binary.LittleEndian.PutUint32(h[4:], crc(h[:4]))
	if err := e.write(h[:]); err != nil {
		return err
	}
	e.zeroChunks, e.total, e.zeroCount = false, 0, 0
	return nil
}

// pageRange reads n <= maxChunkPages pages from page first and sends the
// non-zero ones as data chunks and, in an incremental record, the zero ones
// as zero runs.
func (e *Encoder) pageRange(mem Memory, first, n uint64) error {
	if e.buf == nil {
		e.buf = make([]byte, maxChunkPages*PageSize)
	}
	b := e.buf[:n*PageSize]
	if mem == nil {
		e.err = errors.New("snapshot: nil memory")
		return e.err
	}
	if err := mem.ReadAt(b, first*PageSize); err != nil {
		e.err = fmt.Errorf("snapshot: read guest memory: %w", err)
		return e.err
	}
	if isZero(b) {
		if e.zeroChunks {
			e.zeroRun(first, n)
		}
		return e.err
	}
	for i := uint64(0); i < n; {
		j := i
		if isZero(b[i*PageSize : (i+1)*PageSize]) {
			for j < n && isZero(b[j*PageSize:(j+1)*PageSize]) {
				j++
			}
			if e.zeroChunks {
				e.zeroRun(first+i, j-i)
			}
		} else {
			for j < n && !isZero(b[j*PageSize:(j+1)*PageSize]) {
				j++
			}
			if err := e.flushZero(); err != nil {
				return err
			}
			if err := e.chunk(chunkData, first+i, j-i, b[i*PageSize:j*PageSize]); err != nil {
				return err
			}
		}
		i = j
	}
	return e.err
}

// zeroRun adds pages [first, first+n) to the pending zero run.
func (e *Encoder) zeroRun(first, n uint64) {
	if e.zeroCount > 0 && e.zeroFirst+e.zeroCount == first && e.zeroCount+n <= 1<<32-1 {
		e.zeroCount += n
		return
	}
	if e.flushZero() != nil {
		return
	}
	e.zeroFirst, e.zeroCount = first, n
}

func (e *Encoder) flushZero() error {
	if e.zeroCount == 0 {
		return e.err
	}
	n := e.zeroCount
	e.zeroCount = 0
	return e.chunk(chunkZero, e.zeroFirst, n, nil)
}

// chunk writes one chunk; count is the page count (or, for the end chunk,
// 0 with first the record's total).
func (e *Encoder) chunk(kind byte, first, count uint64, data []byte) error {
	h := e.scratch[:]
	clear(h)
	h[0] = kind
	binary.LittleEndian.PutUint32(h[4:], uint32(count))
	binary.LittleEndian.PutUint64(h[8:], first)
	c := crc32.Update(crc(h), castagnoli, data)
	var cb [4]byte
	binary.LittleEndian.PutUint32(cb[:], c)
	if err := e.write(h); err != nil {
		return err
	}
	if err := e.write(data); err != nil {
		return err
	}
	e.total += count
	return e.write(cb[:])
}

func (e *Encoder) endPages() error {
	if err := e.flushZero(); err != nil {
		return err
	}
	total := e.total
	return e.chunk(chunkEnd, total, 0, nil)
}

// Flush writes the buffered part of the stream to the underlying writer.
func (e *Encoder) Flush() error {
	if e.err != nil {
		return e.err
	}
	if err := e.w.Flush(); err != nil {
		e.err = fmt.Errorf("snapshot: write: %w", err)
	}
	return e.err
}

// WriteEnd writes the end record with the digest of the stream and flushes.
// The Encoder accepts nothing more afterwards.
func (e *Encoder) WriteEnd() error {
	if err := e.ready(); err != nil {
		return err
	}
	var h [endLen]byte
	h[0] = recEnd
	binary.LittleEndian.PutUint32(h[4:], crc(h[:4]))
	if err := e.write(h[:]); err != nil {
		return err
	}
	if err := e.write(e.sum.Sum(nil)); err != nil {
		return err
	}
	if err := e.Flush(); err != nil {
		return err
	}
	e.err = errEnded
	return nil
}

// nextBit returns the first page at or after from whose bit in bm is set
// (or clear, when set is false), or len(bm)*64 when there is none.
func nextBit(bm []uint64, from uint64, set bool) uint64 {
	for w := from / 64; w < uint64(len(bm)); w++ {
		x := bm[w]
		if !set {
			x = ^x
		}
		if w == from/64 {
			x &^= 1<<(from%64) - 1
		}
		if x != 0 {
			return w*64 + uint64(bits.TrailingZeros64(x))
		}
	}
	return uint64(len(bm)) * 64
}
