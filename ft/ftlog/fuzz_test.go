package ftlog

import (
	"bytes"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"testing"
)

// fuzzSeeds are the committed seeds of FuzzDecode (testdata/fuzz/FuzzDecode),
// regenerated with FTLOG_WRITE_SEEDS=1 go test -run TestWriteFuzzSeeds.
func fuzzSeeds(t testing.TB) map[string][]byte {
	small := sampleEntries(false)
	small[6].Data = small[6].Data[:40]
	meta := []byte(`{"host":"a"}`)
	valid := encodeLog(t, Header{Meta: meta}, small)
	pmu := sampleEntries(true)
	pmu[6].Data = pmu[6].Data[:40]
	validPMU := encodeLog(t, Header{PMU: true}, pmu)
	flipped := bytes.Clone(valid)
	flipped[len(flipped)/2] ^= 0x10
	flippedLen := bytes.Clone(valid)
	flippedLen[headerLen+len(meta)+crcLen] ^= 0x01 // the first entry's length
	return map[string][]byte{
		"valid":           valid,
		"valid-pmu":       validPMU,
		"minimal":         encodeLog(t, Header{}, []Entry{{Kind: End}}),
		"truncated-hdr":   valid[:20],
		"truncated-meta":  valid[:40],
		"truncated-frame": valid[:len(valid)-30],
		"truncated-mid":   valid[:len(valid)/2],
		"truncated-end":   valid[:len(valid)-1],
		"no-end":          encodeLog(t, Header{}, small[:5]),
		"flipped":         flipped,
		"flipped-length":  flippedLen,
		"bad-magic":       append([]byte("GOKVMLOX"), valid[8:]...),
		"version2":        header(2, 0, nil),
		"unknown-flag":    header(1, 4, nil),
		"unknown-kind":    newRaw(Header{}).frame(12, 0, 0, 16, make([]byte, 16), true).end(pos(1, 0)),
		"lying-length":    newRaw(Header{}).frame(byte(StateDelta), 0, 0, 16+MaxDeltaLen, []byte("abc"), false).b,
		"too-large":       newRaw(Header{}).frame(byte(Packet), 0, 0, 16+MaxPacketLen+1, []byte("abc"), false).b,
		"backwards":       newRaw(Header{}).entry(Entry{Kind: Interrupt, Pos: pos(5, 0), Vector: 1}).entry(Entry{Kind: WindowRequest, Pos: pos(4, 0)}).end(pos(9, 0)),
		"after-progress":  newRaw(Header{}).entry(Entry{Kind: Progress, Pos: pos(5, 0)}).entry(Entry{Kind: WindowRequest, Pos: pos(5, 0)}).end(pos(9, 0)),
		"trailing":        append(bytes.Clone(valid), "more"...),
	}
}

func TestWriteFuzzSeeds(t *testing.T) {
	if os.Getenv("FTLOG_WRITE_SEEDS") == "" {
		t.Skip("set FTLOG_WRITE_SEEDS=1 to rewrite testdata/fuzz/FuzzDecode")
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

var sentinels = []error{ErrBadMagic, ErrVersion, ErrTruncated, ErrChecksum, ErrCorrupt}

// result is what decoding a stream gives: the header, the entries, and the
// error that stopped it (nil after End) with its place.
type result struct {
	hdr     Header
	entries []Entry
	err     error
	fe      FormatError
	end     int64 // Decoder.Offset at the stop
}

func decodeResult(t *testing.T, r io.Reader, retry func() bool) result {
	var res result
	d := NewDecoder(r)
	for {
		ent, err := d.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			if errors.Is(err, ErrTruncated) && retry != nil && retry() {
				continue
			}
			var fe *FormatError
			if !errors.As(err, &fe) {
				t.Fatalf("error %v (%T) is not a *FormatError", err, err)
			}
			known := false
			for _, s := range sentinels {
				known = known || errors.Is(err, s)
			}
			if !known {
				t.Fatalf("error %v matches no sentinel", err)
			}
			res.err, res.fe = err, *fe
			break
		}
		res.entries = append(res.entries, ent)
	}
	res.hdr, _ = d.Header()
	res.end = d.Offset()
	return res
}

// FuzzDecode feeds arbitrary bytes to the Decoder. It must return a
// *FormatError matching a sentinel, or entries up to End; everything it
// accepted must re-encode to exactly the bytes it read; and a Decoder fed the
// same bytes piecemeal, retrying on ErrTruncated as a tailing replayer does,
// must return the same.
func FuzzDecode(f *testing.F) {
	for _, b := range fuzzSeeds(f) {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		whole := decodeResult(t, bytes.NewReader(b), nil)

		// Re-encode what was accepted.
		if whole.err == nil || whole.fe.Entry >= 0 {
			var buf bytes.Buffer
			e, err := NewEncoder(&buf, whole.hdr)
			if err != nil {
				t.Fatalf("decoded header refused: %v", err)
			}
			for i := range whole.entries {
				if err := e.Write(&whole.entries[i]); err != nil {
					t.Fatalf("decoded entry %d refused: %v", i, err)
				}
			}
			if err := e.Flush(); err != nil {
				t.Fatal(err)
			}
			if int64(buf.Len()) != whole.end || !bytes.Equal(buf.Bytes(), b[:whole.end]) {
				t.Fatalf("re-encoding gives %d bytes, decoder read %d, or they differ", buf.Len(), whole.end)
			}
		}

		// Tailing: the bytes arrive in pieces of varying size.
		r := &growingReader{}
		step := 1
		tail := decodeResult(t, r, func() bool {
			if len(r.data) == len(b) {
				return false
			}
			step = step*3%17 + 1
			r.data = b[:min(len(b), len(r.data)+step)]
			return true
		})
		if len(tail.entries) != len(whole.entries) || tail.end != whole.end ||
			(tail.err == nil) != (whole.err == nil) ||
			tail.err != nil && (tail.fe.Err != whole.fe.Err || tail.fe.Entry != whole.fe.Entry || tail.fe.Offset != whole.fe.Offset || tail.fe.Kind != whole.fe.Kind) {
			t.Fatalf("tailing: %d entries, %v; whole: %d entries, %v", len(tail.entries), tail.err, len(whole.entries), whole.err)
		}
		for i := range tail.entries {
			if !sameEntry(&tail.entries[i], &whole.entries[i]) {
				t.Fatalf("tailing: entry %d differs", i)
			}
		}
	})
}
