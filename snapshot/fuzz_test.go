package snapshot

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"testing"
)

// fuzzSeeds are the committed seeds of FuzzDecode (testdata/fuzz/FuzzDecode),
// regenerated with SNAPSHOT_WRITE_SEEDS=1 go test -run TestWriteFuzzSeeds.
func fuzzSeeds(t testing.TB) map[string][]byte {
	// Printable page contents keep the seed files small and readable.
	page := bytes.Repeat([]byte("gokvm-ft "), PageSize/9+1)[:PageSize]
	valid := encode(t, []Section{{"machine", []byte(`{"a":1}`)}, {"vcpu", []byte("rax=1")}},
		append(make([]byte, PageSize), page...))
	good := func() *raw { var r raw; return r.header(1, 0, 4*PageSize) }
	var inc bytes.Buffer
	e, _ := NewEncoder(&inc, 4*PageSize)
	mem := make([]byte, 4*PageSize)
	copy(mem[3*PageSize:], page)
	e.WriteMemory(Bytes(mem))
	clear(mem[3*PageSize:])
	copy(mem[PageSize:], page)
	e.WritePages(Bytes(mem), []uint64{0b1010})
	e.WriteSection("devices", []byte("{}"))
	e.WriteEnd()
	flipped := bytes.Clone(valid)
	flipped[len(flipped)/2] ^= 0x10
	return map[string][]byte{
		"valid":           valid,
		"incremental":     inc.Bytes(),
		"truncated-hdr":   valid[:20],
		"truncated-mid":   valid[:len(valid)/2],
		"truncated-end":   valid[:len(valid)-1],
		"flipped":         flipped,
		"bad-magic":       append([]byte("GOKVMSNX"), valid[8:]...),
		"version2":        new(raw).header(2, 0, 0).end(),
		"dup-section":     good().section("a", 1, []byte("1")).section("a", 0, nil).pages(1).chunk(3, 0, 0, nil).end(),
		"page-range":      good().pages(1).chunk(1, 1, 4, page).chunk(3, 0, 1, nil).end(),
		"big-section":     good().section("s", MaxSectionSize+1, nil).end(),
		"lying-length":    good().section("s", 1<<25, []byte("abc")).Bytes(),
		"overlap":         good().pages(0).chunk(2, 3, 0, nil).chunk(1, 1, 2, page).chunk(3, 0, 4, nil).end(),
		"trailing":        append(bytes.Clone(valid), 0),
		"no-memory-seen":  good().section("x", 0, nil).end(),
		"huge-memory-hdr": new(raw).header(1, 0, MaxMemorySize).pages(1).chunk(3, 0, 0, nil).end(),
	}
}

func TestWriteFuzzSeeds(t *testing.T) {
	if os.Getenv("SNAPSHOT_WRITE_SEEDS") == "" {
		t.Skip("set SNAPSHOT_WRITE_SEEDS=1 to rewrite testdata/fuzz/FuzzDecode")
	}
	dir := filepath.Join("testdata", "fuzz", "FuzzDecode")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, b := range fuzzSeeds(t) {
		s := "go test fuzz v1\n[]byte(" + strconv.Quote(string(b)) + ")\n"
		if err := os.WriteFile(filepath.Join(dir, name), []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

var sentinels = []error{ErrBadMagic, ErrVersion, ErrTruncated, ErrChecksum, ErrCorrupt, errNoMemory}

// FuzzDecode feeds arbitrary bytes to the Decoder and to Read: they must
// return a sentinel error or a result that survives a round trip, and never
// panic, write out of range or allocate wildly.
func FuzzDecode(f *testing.F) {
	for _, b := range fuzzSeeds(f) {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		check := func(what string, err error) {
			var fe *FormatError
			if errors.As(err, &fe) {
				for _, s := range sentinels {
					if errors.Is(err, s) {
						return
					}
				}
			}
			if err == errNoMemory {
				return
			}
			t.Fatalf("%s: unexpected error %v", what, err)
		}
		if err := decodeAll(b); err != nil {
			check("Decoder", err)
		}
		var dst []byte
		secs, err := Read(bytes.NewReader(b), func(size uint64) ([]byte, error) {
			if size > 1<<20 {
				return nil, errRefused
			}
			dst = bytes.Repeat([]byte{0xee}, int(size))
			return dst, nil
		})
		if err == errRefused {
			return
		}
		if err != nil {
			check("Read", err)
			return
		}
		// Accepted: encoding what was read and reading it again gives
		// the same snapshot.
		var buf bytes.Buffer
		if err := Write(&buf, secs, uint64(len(dst)), Bytes(dst)); err != nil {
			t.Fatalf("re-encode: %v", err)
		}
		secs2, dst2, err := decodeFull(buf.Bytes())
		if err != nil || !sameSections(secs, secs2) || !bytes.Equal(dst, dst2) {
			t.Fatalf("round trip of an accepted snapshot: %v", err)
		}
	})
}

var errRefused = fmt.Errorf("refused")

// FuzzRecords builds streams whose checksums are all valid from the fuzzer's
// bytes, so that the checks behind the checksums (names, sizes, page ranges,
// chunk order, record order) are explored too.
func FuzzRecords(f *testing.F) {
	f.Add([]byte{4, 1, 1, 2, 1, 0, 1, 2, 3, 0, 0, 3})
	f.Add([]byte{2, 0, 0, 5, 1, 0, 1, 2, 2, 3, 1, 2, 3, 0, 0, 3})
	f.Add([]byte{1, 0, 1, 3, 0, 0, 0, 0, 1, 2, 3, 0, 0, 3})
	f.Fuzz(func(t *testing.T, ops []byte) {
		next := func() byte {
			if len(ops) == 0 {
				return 0
			}
			b := ops[0]
			ops = ops[1:]
			return b
		}
		var r raw
		r.header(1, 0, uint64(next())*PageSize)
		names := []string{"a", "b", "machine", "", "a b", "\x00"}
		for len(ops) > 0 && r.Len() < 1<<20 {
			switch next() % 4 {
			case 0:
				name := names[int(next())%len(names)]
				n := int(next())
				declared := uint32(n)
				if next()%8 == 0 {
					declared += uint32(next())
				}
				r.section(name, declared, bytes.Repeat([]byte{'x'}, n))
			case 1:
				r.pages(next() % 4)
			case 2:
				kind, count, first := next()%5, uint32(next()), uint64(next())
				var data []byte
				if kind == chunkData && count <= 4 {
					data = bytes.Repeat([]byte{next() | 1}, int(count)*PageSize)
				}
				r.chunk(kind, count, first, data)
			case 3:
				r.end()
			}
		}
		b := r.Bytes()
		if err := decodeAll(b); err != nil {
			var fe *FormatError
			if !errors.As(err, &fe) && err != errNoMemory {
				t.Fatalf("Decoder: %v", err)
			}
		}
		var dst []byte
		secs, err := Read(bytes.NewReader(b), func(size uint64) ([]byte, error) {
			dst = make([]byte, size)
			return dst, nil
		})
		if err != nil {
			var fe *FormatError
			if !errors.As(err, &fe) {
				t.Fatalf("Read: %v", err)
			}
			return
		}
		var buf bytes.Buffer
		if err := Write(&buf, secs, uint64(len(dst)), Bytes(dst)); err != nil {
			t.Fatalf("re-encode: %v", err)
		}
		secs2, dst2, err := decodeFull(buf.Bytes())
		if err != nil || !sameSections(secs, secs2) || !bytes.Equal(dst, dst2) {
			t.Fatalf("round trip of an accepted snapshot: %v", err)
		}
	})
}
