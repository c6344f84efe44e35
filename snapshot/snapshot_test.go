package snapshot

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
)

// testMem returns pages of memory where about one page in every is non-zero
// (none when every is 0), some of them only in their last byte or first
// half, reproducibly from seed.
func testMem(pages int, every int, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, 1))
	m := make([]byte, pages*PageSize)
	for p := 0; p < pages; p++ {
		if every == 0 || r.IntN(every) != 0 {
			continue
		}
		b := m[p*PageSize : (p+1)*PageSize]
		switch r.IntN(3) {
		case 0:
			b[PageSize-1] = byte(p) | 1
		case 1:
			for i := 0; i < PageSize/2; i++ {
				b[i] = byte(r.Uint32())
			}
		default:
			for i := range b {
				b[i] = byte(r.Uint32())
			}
		}
	}
	return m
}

func nonZeroPages(m []byte) int {
	n := 0
	for p := 0; p < len(m); p += PageSize {
		if !isZero(m[p : p+PageSize]) {
			n++
		}
	}
	return n
}

func encode(t testing.TB, sections []Section, mem []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	if err := Write(&buf, sections, uint64(len(mem)), Bytes(mem)); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// decodeFull reads a full snapshot into a destination filled with garbage,
// so that missing zero-fill shows.
func decodeFull(b []byte) ([]Section, []byte, error) {
	var dst []byte
	secs, err := Read(bytes.NewReader(b), func(size uint64) ([]byte, error) {
		if size > 64<<20 {
			return nil, fmt.Errorf("refusing %d bytes", size)
		}
		dst = bytes.Repeat([]byte{0xa5}, int(size))
		return dst, nil
	})
	return secs, dst, err
}

func testSections() []Section {
	return []Section{
		{"machine", []byte(`{"mem":1}`)},
		{"vcpu", bytes.Repeat([]byte("regs"), 1000)},
		{"empty", nil},
		{"devices/uart", []byte{0, 1, 2, 3}},
	}
}

func sameSections(a, b []Section) bool {
	return slices.EqualFunc(a, b, func(x, y Section) bool { return x.Name == y.Name && bytes.Equal(x.Data, y.Data) })
}

func TestRoundTrip(t *testing.T) {
	for _, c := range []struct {
		name  string
		pages int
		every int
	}{
		{"no memory", 0, 0},
		{"one zero page", 1, 0},
		{"one page", 1, 1},
		{"all zero 1MiB", 256, 0},
		{"full 3MiB", 768, 1},
		{"sparse 8MiB", 2048, 7},
		{"dense 5MiB", 1280, 2},
	} {
		t.Run(c.name, func(t *testing.T) {
			mem := testMem(c.pages, c.every, uint64(c.pages))
			secs := testSections()
			b := encode(t, secs, mem)
			gotSecs, got, err := decodeFull(b)
			if err != nil {
				t.Fatal(err)
			}
			if !sameSections(gotSecs, secs) {
				t.Errorf("sections differ: %v", gotSecs)
			}
			if !bytes.Equal(got, mem) {
				t.Errorf("memory differs")
			}
			// Only non-zero pages are stored: the size is the pages
			// plus a small overhead per run.
			stored := nonZeroPages(mem) * PageSize
			if len(b) < stored || len(b) > stored+stored/64+8192 {
				t.Errorf("%d bytes for %d bytes of non-zero pages", len(b), stored)
			}
		})
	}
}

func TestSparseSnapshotSize(t *testing.T) {
	// 64 MiB guest with 4 MiB in use: a ~4 MiB snapshot.
	mem := make([]byte, 64<<20)
	copy(mem[1<<20:], testMem(512, 1, 1)) // 2 MiB contiguous
	for p := 0; p < 512; p++ {            // 2 MiB scattered
		mem[(4096+p*20)*PageSize+7] = 1
	}
	b := encode(t, nil, mem)
	if len(b) > 4<<20+64<<10 {
		t.Errorf("snapshot of a 64 MiB guest with 4 MiB in use has %d bytes", len(b))
	}
	_, got, err := decodeFull(b)
	if err != nil || !bytes.Equal(got, mem) {
		t.Fatalf("round trip: %v", err)
	}
}

// TestIncremental streams a full record and pre-copy rounds on one
// connection and checks the destination after every record.
func TestIncremental(t *testing.T) {
	const pages = 1000 // not a multiple of 64
	src := testMem(pages, 3, 42)
	r := rand.New(rand.NewPCG(7, 7))
	pr, pw := io.Pipe()
	errc := make(chan error, 1)
	rounds := 6
	states := make(chan []byte, rounds+2) // the source after each pages record
	states <- slices.Clone(src)
	go func() {
		errc <- func() error {
			e, err := NewEncoder(pw, uint64(len(src)))
			if err != nil {
				return err
			}
			if err := e.WriteMemory(Bytes(src)); err != nil {
				return err
			}
			if err := e.Flush(); err != nil {
				return err
			}
			for round := 0; round < rounds; round++ {
				dirty := make([]uint64, (pages+63)/64)
				n := 1 + r.IntN(200>>round)
				if round == 5 {
					n = 0 // an empty round
				}
				for range n {
					p := r.IntN(pages)
					if round == 2 {
						p = pages - 1 - r.IntN(3) // the tail word
					}
					dirty[p/64] |= 1 << (p % 64)
					pg := src[p*PageSize : (p+1)*PageSize]
					switch r.IntN(3) {
					case 0:
						clear(pg) // a page that became zero must be sent
					case 1:
						pg[r.IntN(PageSize)]++
					default:
						for i := range pg {
							pg[i] = byte(r.Uint32())
						}
					}
				}
				if round == 4 {
					for p := 100; p < 700; p++ { // long runs across words and chunks
						dirty[p/64] |= 1 << (p % 64)
						src[p*PageSize] = byte(round)
					}
					clear(src[300*PageSize : 600*PageSize])
				}
				if err := e.WritePages(Bytes(src), dirty); err != nil {
					return err
				}
				states <- slices.Clone(src)
				if err := e.Flush(); err != nil {
					return err
				}
			}
			if err := e.WriteSection("vcpu", []byte("final")); err != nil {
				return err
			}
			if err := e.WriteEnd(); err != nil {
				return err
			}
			return pw.Close()
		}()
	}()
	d, err := NewDecoder(pr)
	if err != nil {
		t.Fatal(err)
	}
	if d.MemorySize() != pages*PageSize {
		t.Fatalf("memory size %d", d.MemorySize())
	}
	if err := d.SetMemory(make([]byte, 1)); !errors.Is(err, ErrMemorySize) {
		t.Errorf("SetMemory with the wrong size: %v", err)
	}
	dst := bytes.Repeat([]byte{1}, pages*PageSize)
	if err := d.SetMemory(dst); err != nil {
		t.Fatal(err)
	}
	nPages := 0
	for {
		rec, err := d.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		switch rec.Kind {
		case PagesRecord:
			if rec.Full != (nPages == 0) {
				t.Errorf("record %d: Full = %v", nPages, rec.Full)
			}
			if !bytes.Equal(dst, <-states) {
				t.Fatalf("destination differs from the source after pages record %d", nPages)
			}
			nPages++
		case SectionRecord:
			if rec.Name != "vcpu" || string(rec.Data) != "final" {
				t.Errorf("section %q %q", rec.Name, rec.Data)
			}
		}
	}
	if nPages != rounds+1 {
		t.Errorf("%d pages records", nPages)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if _, err := d.Next(); err != io.EOF {
		t.Errorf("Next after the end: %v", err)
	}
}

func TestEncoderRefusals(t *testing.T) {
	for _, size := range []uint64{1, PageSize + 1, MaxMemorySize + PageSize} {
		if _, err := NewEncoder(io.Discard, size); !errors.Is(err, ErrMemorySize) {
			t.Errorf("NewEncoder(%d) = %v", size, err)
		}
	}
	e, err := NewEncoder(io.Discard, 100*PageSize)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"", "a b", "é", strings.Repeat("x", MaxNameLen+1), "tab\t"} {
		if err := e.WriteSection(name, nil); err == nil {
			t.Errorf("section name %q accepted", name)
		}
	}
	if err := e.WriteSection("big", make([]byte, MaxSectionSize+1)); !errors.Is(err, ErrTooLarge) {
		t.Errorf("section too large: %v", err)
	}
	if err := e.WriteSection(strings.Repeat("x", MaxNameLen), nil); err != nil {
		t.Error(err)
	}
	if err := e.WriteSection("a", nil); err != nil {
		t.Fatal(err)
	}
	if err := e.WriteSection("a", nil); !errors.Is(err, ErrDuplicate) {
		t.Errorf("duplicate section: %v", err)
	}
	mem := Bytes(make([]byte, 100*PageSize))
	if err := e.WritePages(mem, make([]uint64, 1)); err == nil {
		t.Error("short bitmap accepted")
	}
	if err := e.WritePages(mem, []uint64{0, 1 << 36}); err == nil {
		t.Error("bitmap beyond the memory accepted")
	}
	if err := e.WritePages(mem, []uint64{0, 1 << 35}); err != nil {
		t.Error(err)
	}
	if err := e.WriteEnd(); err != nil {
		t.Fatal(err)
	}
	if err := e.WriteSection("b", nil); err == nil {
		t.Error("section after the end accepted")
	}
	// A memory read error is reported and sticks.
	e, _ = NewEncoder(io.Discard, 100*PageSize)
	if err := e.WriteMemory(Bytes(make([]byte, 10*PageSize))); err == nil {
		t.Error("short memory accepted")
	}
	if err := e.WriteEnd(); err == nil {
		t.Error("WriteEnd after an error succeeded")
	}
}

// raw builds streams by hand, following the documented layout, to produce
// what the Encoder refuses to.
type raw struct{ bytes.Buffer }

func crcOf(b ...[]byte) uint32 {
	var c uint32
	for _, p := range b {
		c = crc32.Update(c, crc32.MakeTable(crc32.Castagnoli), p)
	}
	return c
}

func (r *raw) u32(v uint32) { r.Write(binary.LittleEndian.AppendUint32(nil, v)) }

func (r *raw) header(version, flags uint32, memSize uint64) *raw {
	h := []byte(Magic)
	h = binary.LittleEndian.AppendUint32(h, version)
	h = binary.LittleEndian.AppendUint32(h, flags)
	h = binary.LittleEndian.AppendUint64(h, memSize)
	h = binary.LittleEndian.AppendUint32(h, 0)
	r.Write(h)
	r.u32(crcOf(h))
	return r
}

func (r *raw) section(name string, declared uint32, data []byte) *raw {
	h := []byte{1, byte(len(name)), 0, 0}
	h = binary.LittleEndian.AppendUint32(h, declared)
	h = append(h, name...)
	r.Write(h)
	r.u32(crcOf(h))
	r.Write(data)
	r.u32(crcOf(data))
	return r
}

func (r *raw) pages(flags byte) *raw {
	h := []byte{2, flags, 0, 0}
	r.Write(h)
	r.u32(crcOf(h))
	return r
}

func (r *raw) chunk(kind byte, count uint32, first uint64, data []byte) *raw {
	h := []byte{kind, 0, 0, 0}
	h = binary.LittleEndian.AppendUint32(h, count)
	h = binary.LittleEndian.AppendUint64(h, first)
	r.Write(h)
	r.Write(data)
	r.u32(crcOf(h, data))
	return r
}

func (r *raw) end() []byte {
	h := []byte{3, 0, 0, 0}
	r.Write(h)
	r.u32(crcOf(h))
	sum := sha256.Sum256(r.Bytes())
	r.Write(sum[:])
	return r.Bytes()
}

// decodeAll runs a Decoder over b to the end, with a destination when the
// declared memory is small enough.
func decodeAll(b []byte) error {
	d, err := NewDecoder(bytes.NewReader(b))
	if err != nil {
		return err
	}
	if d.MemorySize() <= 1<<20 {
		if err := d.SetMemory(make([]byte, d.MemorySize())); err != nil {
			return err
		}
	}
	for {
		if _, err := d.Next(); err != nil {
			if err == io.EOF {
				return nil
			}
			return err
		}
	}
}

func TestRawMatchesEncoder(t *testing.T) {
	// The hand-built stream and the Encoder agree byte for byte: the
	// documented layout is the one implemented.
	mem := make([]byte, 4*PageSize)
	mem[PageSize] = 9
	mem[2*PageSize+5] = 8
	got := encode(t, []Section{{"m", []byte("x")}}, mem)
	var r raw
	want := r.header(1, 0, 4*PageSize).section("m", 1, []byte("x")).pages(1).
		chunk(1, 2, 1, mem[PageSize:3*PageSize]).chunk(3, 0, 2, nil).end()
	if !bytes.Equal(got, want) {
		t.Fatalf("encoder output differs from the documented layout:\n%x\n%x", got, want)
	}
	if crcOf([]byte("123456789")) != 0xe3069283 {
		t.Error("CRC-32C check value")
	}
}

func TestDecodeErrors(t *testing.T) {
	good := func() *raw { var r raw; return r.header(1, 0, 4*PageSize) }
	page := bytes.Repeat([]byte{7}, PageSize)
	for _, c := range []struct {
		name   string
		stream []byte
		want   error
	}{
		{"empty", nil, ErrTruncated},
		{"bad magic", append([]byte("GOKVMSNQ"), good().Bytes()[8:]...), ErrBadMagic},
		{"elf", []byte("\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00"), ErrBadMagic},
		{"newer version", new(raw).header(2, 0, 0).end(), ErrVersion},
		{"version 0", new(raw).header(0, 0, 0).end(), ErrVersion},
		{"newer version, short header", []byte("GOKVMSNP\x02\x00\x00\x00"), ErrVersion},
		{"unknown flags", new(raw).header(1, 4, 0).end(), ErrVersion},
		{"odd memory size", new(raw).header(1, 0, 4097).end(), ErrCorrupt},
		{"memory too large", new(raw).header(1, 0, MaxMemorySize+PageSize).end(), ErrCorrupt},
		{"no end", good().Bytes(), ErrTruncated},
		{"unknown record", append(good().Bytes(), 9, 0, 0, 0), ErrCorrupt},
		{"section too big", good().section("s", MaxSectionSize+1, nil).end(), ErrTooLarge},
		{"section lying length", good().section("s", MaxSectionSize, []byte("short")).Bytes(), ErrTruncated},
		{"duplicate section", good().section("a", 1, []byte("1")).section("a", 1, []byte("2")).end(), ErrDuplicate},
		{"bad section name", good().section("a b", 0, nil).end(), ErrCorrupt},
		{"empty section name", good().section("", 0, nil).end(), ErrCorrupt},
		{"section data length mismatch", good().section("a", 2, []byte("1")).end(), ErrChecksum},
		{"page out of range", good().pages(0).chunk(1, 1, 4, page).chunk(3, 0, 1, nil).end(), ErrPageRange},
		{"pages past the end", good().pages(0).chunk(1, 2, 3, append(page, page...)).chunk(3, 0, 2, nil).end(), ErrPageRange},
		{"huge page number", good().pages(0).chunk(2, 2, ^uint64(0), nil).chunk(3, 0, 2, nil).end(), ErrPageRange},
		{"zero run past the end", good().pages(0).chunk(2, 5, 0, nil).chunk(3, 0, 5, nil).end(), ErrPageRange},
		{"empty data chunk", good().pages(0).chunk(1, 0, 0, nil).chunk(3, 0, 0, nil).end(), ErrCorrupt},
		{"data chunk too long", good().pages(0).chunk(1, maxChunkPages+1, 0, nil).end(), ErrCorrupt},
		{"empty zero chunk", good().pages(0).chunk(2, 0, 0, nil).chunk(3, 0, 0, nil).end(), ErrCorrupt},
		{"overlapping chunks", good().pages(0).chunk(1, 1, 1, page).chunk(1, 1, 1, page).chunk(3, 0, 2, nil).end(), ErrCorrupt},
		{"decreasing chunks", good().pages(0).chunk(1, 1, 2, page).chunk(2, 1, 0, nil).chunk(3, 0, 2, nil).end(), ErrCorrupt},
		{"wrong total", good().pages(0).chunk(1, 1, 2, page).chunk(3, 0, 2, nil).end(), ErrCorrupt},
		{"end chunk with count", good().pages(0).chunk(3, 1, 0, nil).end(), ErrCorrupt},
		{"unknown chunk", good().pages(0).chunk(4, 0, 0, nil).end(), ErrCorrupt},
		{"unknown pages flag", good().pages(2).chunk(3, 0, 0, nil).end(), ErrCorrupt},
		{"page data short", good().pages(0).chunk(1, 1, 0, page[:100]).Bytes(), ErrTruncated},
		{"bad digest", append(good().end()[:headerLen+8], make([]byte, 32)...), ErrChecksum},
	} {
		t.Run(c.name, func(t *testing.T) {
			err := decodeAll(c.stream)
			var fe *FormatError
			if !errors.Is(err, c.want) || !errors.As(err, &fe) {
				t.Fatalf("got %v, want %v", err, c.want)
			}
			t.Log(err)
		})
	}
}

func TestLyingLengthAllocatesLittle(t *testing.T) {
	var r raw
	b := r.header(1, 0, 0).section("s", MaxSectionSize, make([]byte, 1000)).Bytes()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	if err := decodeAll(b); !errors.Is(err, ErrTruncated) {
		t.Fatal(err)
	}
	runtime.ReadMemStats(&after)
	if n := after.TotalAlloc - before.TotalAlloc; n > 4<<20 {
		t.Errorf("decoding a short stream that declares a 64 MiB section allocated %d bytes", n)
	}
}

func TestReorderedRecordsFailDigest(t *testing.T) {
	var a, b raw
	a.header(1, 0, 0).section("x", 1, []byte("1")).section("y", 1, []byte("2"))
	b.header(1, 0, 0).section("y", 1, []byte("2")).section("x", 1, []byte("1"))
	swapped := append(b.Bytes(), a.end()[a.Len()-40:]...)
	if err := decodeAll(swapped); !errors.Is(err, ErrChecksum) {
		t.Errorf("swapped records: %v", err)
	}
}

// small is a small valid snapshot with sections, data and zero pages.
func small(t testing.TB) ([]Section, []byte, []byte) {
	mem := make([]byte, 6*PageSize)
	mem[1*PageSize+3] = 1
	for i := 3 * PageSize; i < 5*PageSize; i += 7 {
		mem[i] = byte(i)
	}
	secs := []Section{{"machine", []byte(`{"a":1}`)}, {"vcpu", []byte("rax=1")}}
	return secs, mem, encode(t, secs, mem)
}

func TestTruncatedEveryPrefix(t *testing.T) {
	_, _, b := small(t)
	for n := 0; n < len(b); n++ {
		if _, _, err := decodeFull(b[:n]); !errors.Is(err, ErrTruncated) {
			t.Fatalf("prefix of %d of %d bytes: %v", n, len(b), err)
		}
	}
}

func TestBitFlipEveryByte(t *testing.T) {
	secs, mem, b := small(t)
	c := slices.Clone(b)
	for i := range c {
		for bit := range 8 {
			c[i] ^= 1 << bit
			gotSecs, got, err := decodeFull(c)
			if err == nil && (!sameSections(gotSecs, secs) || !bytes.Equal(got, mem)) {
				t.Fatalf("byte %d bit %d: accepted with a different result", i, bit)
			}
			if err == nil {
				t.Errorf("byte %d bit %d: accepted", i, bit) // every byte is checksummed
			}
			c[i] ^= 1 << bit
		}
	}
}

func TestReadFullOnly(t *testing.T) {
	page := bytes.Repeat([]byte{7}, PageSize)
	good := func() *raw { var r raw; return r.header(1, 0, 4*PageSize) }
	for name, b := range map[string][]byte{
		"no memory record":   good().end(),
		"incremental record": good().pages(0).chunk(1, 1, 0, page).chunk(3, 0, 1, nil).end(),
		"two full records":   good().pages(1).chunk(3, 0, 0, nil).pages(1).chunk(3, 0, 0, nil).end(),
		"trailing data":      append(good().pages(1).chunk(3, 0, 0, nil).end(), 0),
	} {
		if _, _, err := decodeFull(b); !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s: %v", name, err)
		}
	}
	// The caller refuses the size before any page is read.
	refused := errors.New("too big for me")
	_, err := Read(bytes.NewReader(good().Bytes()), func(size uint64) ([]byte, error) {
		if size != 4*PageSize {
			t.Errorf("size %d", size)
		}
		return nil, refused
	})
	if err != refused {
		t.Errorf("refusal: %v", err)
	}
	if _, err := Read(bytes.NewReader(good().Bytes()), func(size uint64) ([]byte, error) {
		return make([]byte, size-PageSize), nil
	}); !errors.Is(err, ErrMemorySize) {
		t.Errorf("wrong destination size: %v", err)
	}
	// A pages record needs a destination.
	d, err := NewDecoder(bytes.NewReader(good().pages(1).chunk(3, 0, 0, nil).end()))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := d.Next(); err == nil {
		t.Error("pages record decoded without a destination")
	}
}

func TestDecoderStopsAtEnd(t *testing.T) {
	_, mem, b := small(t)
	br := bufio.NewReader(io.MultiReader(bytes.NewReader(b), strings.NewReader("next message")))
	d, err := NewDecoder(br)
	if err != nil {
		t.Fatal(err)
	}
	dst := make([]byte, len(mem))
	d.SetMemory(dst)
	for {
		rec, err := d.Next()
		if err != nil {
			t.Fatal(err)
		}
		if rec.Kind == EndRecord {
			break
		}
	}
	if d.Offset() != int64(len(b)) || !bytes.Equal(dst, mem) {
		t.Errorf("offset %d of %d", d.Offset(), len(b))
	}
	if rest, _ := io.ReadAll(br); string(rest) != "next message" {
		t.Errorf("the decoder consumed past its end: %q left", rest)
	}
}

type failingMem struct{ after int }

func (m *failingMem) ReadAt(p []byte, off uint64) error {
	if m.after--; m.after < 0 {
		return errors.New("memory gone")
	}
	clear(p)
	p[0] = 1
	return nil
}

func TestFileAtomic(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "vm.snap")
	secs, mem, _ := small(t)
	if err := WriteFile(path, secs, uint64(len(mem)), Bytes(mem)); err != nil {
		t.Fatal(err)
	}
	var dst []byte
	got, err := ReadFile(path, func(size uint64) ([]byte, error) { dst = make([]byte, size); return dst, nil })
	if err != nil || !sameSections(got, secs) || !bytes.Equal(dst, mem) {
		t.Fatalf("ReadFile: %v", err)
	}
	before, _ := os.ReadFile(path)
	// A failure while writing leaves the old snapshot and no temporary.
	if err := WriteFile(path, secs, 4<<20, &failingMem{after: 2}); err == nil {
		t.Fatal("WriteFile with failing memory succeeded")
	}
	after, _ := os.ReadFile(path)
	if !bytes.Equal(before, after) {
		t.Error("failed WriteFile changed the snapshot")
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 1 {
		t.Errorf("directory holds %d entries after a failed write", len(ents))
	}
	if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o600 {
		t.Errorf("mode %v", fi.Mode())
	}
	if _, err := ReadFile(filepath.Join(dir, "missing"), nil); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing file: %v", err)
	}
}

func BenchmarkWrite256MiB(b *testing.B) {
	// 256 MiB guest with ~31 MiB in use: 16 MiB contiguous (kernel,
	// page tables) and one page in 16 of the rest.
	mem := make([]byte, 256<<20)
	r := rand.New(rand.NewPCG(1, 2))
	fill := func(p []byte) {
		for i := 0; i < len(p); i += 8 {
			binary.LittleEndian.PutUint64(p[i:], r.Uint64())
		}
	}
	fill(mem[1<<20 : 17<<20])
	for p := 17 << 8; p < 256<<8; p += 16 {
		fill(mem[p*PageSize : (p+1)*PageSize])
	}
	secs := testSections()
	var cw countWriter
	b.SetBytes(int64(len(mem)))
	b.ResetTimer()
	for range b.N {
		cw = 0
		if err := Write(&cw, secs, uint64(len(mem)), Bytes(mem)); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(cw)/(1<<20), "MiB-out")
}

// BenchmarkWriteDense64MiB is the worst case: every page stored.
func BenchmarkWriteDense64MiB(b *testing.B) {
	mem := make([]byte, 64<<20)
	r := rand.New(rand.NewPCG(3, 4))
	for i := 0; i < len(mem); i += 8 {
		binary.LittleEndian.PutUint64(mem[i:], r.Uint64()|1)
	}
	b.SetBytes(int64(len(mem)))
	b.ResetTimer()
	for range b.N {
		if err := Write(io.Discard, nil, uint64(len(mem)), Bytes(mem)); err != nil {
			b.Fatal(err)
		}
	}
}

type countWriter int64

func (w *countWriter) Write(p []byte) (int, error) { *w += countWriter(len(p)); return len(p), nil }

func BenchmarkRead256MiB(b *testing.B) {
	mem := make([]byte, 256<<20)
	for p := 0; p < len(mem)/PageSize; p += 8 {
		mem[p*PageSize+p%PageSize] = byte(p) | 1
	}
	snap := encode(b, testSections(), mem)
	dst := make([]byte, len(mem))
	b.SetBytes(int64(len(mem)))
	b.ResetTimer()
	for range b.N {
		if _, err := Read(bytes.NewReader(snap), func(uint64) ([]byte, error) { return dst, nil }); err != nil {
			b.Fatal(err)
		}
	}
}
