package migrate

import (
	"bufio"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"os"
	"strings"
	"time"

	"github.com/gokvm-ft/gokvm-ft/machine"
	"github.com/gokvm-ft/gokvm-ft/snapshot"
	"github.com/gokvm-ft/gokvm-ft/virtio/blk"
)

// SendOptions tune and connect a live transfer's source side.
type SendOptions struct {
	// Disks are the machine's disk images. The destination must use the
	// same images (shared, or copies with equal contents): their SHA-256
	// is compared once the guest is stopped.
	Disks []DiskSource
	// Pause stops the guest at a consistent point, runs f there and
	// resumes the guest unless f returns stop (the guest moved).
	Pause func(f func() (stop bool, err error)) error
	// Release gives up the host resources the destination takes over (the
	// tap) once the destination holds the guest, before it starts it.
	Release func() error
	// CopyDisks sends the disks' contents too, while the guest runs
	// (each DiskSource needs TrackWrites), the blocks written meanwhile
	// again at the end: the destination needs no copy of its own.
	CopyDisks bool
	// Keep, if set, makes the transfer a copy instead of a move (an FT
	// backup joining): once the destination holds the state and was told
	// to start, Keep runs, still in the pause, and the guest then resumes
	// here. Release is not called.
	Keep func() error
	// Progress, if set, is told about each round.
	Progress func(Progress)
	// MaxRounds bounds the pre-copy rounds after the first full copy
	// (default 30); StopPages ends pre-copy once a round finds at most
	// this many dirty pages (default 256: 1 MiB).
	MaxRounds int
	StopPages int
	// Timeout bounds each wait for the destination (default 2 minutes).
	Timeout time.Duration
}

// Progress is the state of a live transfer after a round.
type Progress struct {
	Round int   // 0: the full copy; then pre-copy rounds; Final: stop-and-copy
	Pages int   // pages sent in this round
	Bytes int64 // stream bytes sent so far
	Dirty int   // pages dirtied while the round was sent (still to send)
	Final bool  // the guest is stopped
	Took  time.Duration
}

func (p Progress) String() string {
	what := fmt.Sprintf("round %d", p.Round)
	if p.Final {
		what = "stop-and-copy"
	}
	return fmt.Sprintf("%s: %d pages in %v, %.1f MiB sent in all, %d pages dirty (about %.1f MiB to go)",
		what, p.Pages, p.Took.Round(time.Millisecond), float64(p.Bytes)/(1<<20), p.Dirty, float64(p.Dirty)*machine.PageSize/(1<<20))
}

// Result sums up a finished live transfer.
type Result struct {
	Rounds     int
	Bytes      int64
	FinalPages int
	// Downtime is how long the guest was stopped on the source, from the
	// pause to the release (the destination starts right after).
	Downtime time.Duration
	Total    time.Duration
}

// reply is the destination's answer after the stream, and the source's
// after it released its resources.
type reply struct {
	Ready    bool   `json:",omitempty"`
	Released bool   `json:",omitempty"`
	Error    string `json:",omitempty"`
}

func count(bm []uint64) int {
	n := 0
	for _, w := range bm {
		n += bits.OnesCount64(w)
	}
	return n
}

type deadliner interface{ SetDeadline(time.Time) error }

// bufferedReader reads conn through the buffer it offers, if it has one (an
// FT channel's stream, which carries framed traffic after the transfer:
// nothing of it may stay behind in a buffer of ours), else a new one.
func bufferedReader(conn io.Reader, size int) *bufio.Reader {
	if b, ok := conn.(interface{ BufferedReader() *bufio.Reader }); ok {
		return b.BufferedReader()
	}
	return bufio.NewReaderSize(conn, size)
}

// Send moves the running machine m to the destination at the other end of
// conn. It copies memory while the guest runs, round after round, until
// little is left, then stops the guest (o.Pause), sends the rest, the
// machine state and the disks' identities, and waits for the destination.
// If the destination refuses or fails, the guest resumes here and Send
// returns the error; on success the guest has stopped here for good.
func Send(conn io.ReadWriter, m *machine.Machine, o SendOptions) (Result, error) {
	if o.MaxRounds == 0 {
		o.MaxRounds = 30
	}
	if o.StopPages == 0 {
		o.StopPages = 256
	}
	if o.Timeout == 0 {
		o.Timeout = 2 * time.Minute
	}
	if o.Progress == nil {
		o.Progress = func(Progress) {}
	}
	start := time.Now()
	var res Result
	res, err := send(conn, m, o, start)
	if err != nil && !errors.Is(err, errMoved) {
		err = explain(conn, err)
	}
	return res, err
}

// errMoved marks errors after the destination took the guest.
var errMoved = errors.New("the guest left this VMM but the hand-over failed")

// explain replaces a write error with the destination's refusal, when it
// sent one before closing the connection.
func explain(conn io.ReadWriter, err error) error {
	if r, rerr := readReply(conn, bufferedReader(conn, 4096), time.Second); rerr == nil && r.Error != "" {
		return fmt.Errorf("the destination refused the guest: %s", r.Error)
	}
	return err
}

func send(conn io.ReadWriter, m *machine.Machine, o SendOptions, start time.Time) (Result, error) {
	var res Result
	ds, err := m.NewDirtySet()
	if err != nil {
		return res, err
	}
	defer ds.Close()
	bw := bufio.NewWriterSize(conn, 1<<20)
	br := bufferedReader(conn, 4096)
	enc, err := snapshot.NewEncoder(bw, m.Memory().Size())
	if err != nil {
		return res, err
	}
	mf := ManifestOf(m)
	var takes []func() []uint64
	if o.CopyDisks {
		for _, d := range o.Disks {
			if d.TrackWrites == nil {
				return res, fmt.Errorf("disk %s: cannot be copied live (its writes are not tracked)", d.Name)
			}
			st, err := os.Stat(d.Path)
			if err != nil {
				return res, fmt.Errorf("disk %s: %w", d.Name, err)
			}
			mf.CopiedDisks = append(mf.CopiedDisks, CopiedDisk{Name: d.Name, Size: st.Size()})
			take, stop := d.TrackWrites()
			defer stop()
			takes = append(takes, take)
		}
	}
	if err := enc.WriteSection(sectionManifest, marshal(mf)); err != nil {
		return res, err
	}
	var diskSections int
	for i := range takes {
		if err := sendDisk(enc, o.Disks[i], nil, &diskSections); err != nil {
			return res, err
		}
	}
	mem := m.Memory()
	t := time.Now()
	if err := enc.WriteMemory(mem); err != nil {
		return res, err
	}
	if err := enc.Flush(); err != nil {
		return res, err
	}
	dirty, err := ds.Take()
	if err != nil {
		return res, err
	}
	o.Progress(Progress{Round: 0, Pages: int(mem.Size() / machine.PageSize), Bytes: enc.Written(), Dirty: count(dirty), Took: time.Since(t)})
	for res.Rounds = 1; res.Rounds <= o.MaxRounds && count(dirty) > o.StopPages; res.Rounds++ {
		t := time.Now()
		if err := enc.WritePages(mem, dirty); err != nil {
			return res, err
		}
		if err := enc.Flush(); err != nil {
			return res, err
		}
		sent := count(dirty)
		if dirty, err = ds.Take(); err != nil {
			return res, err
		}
		o.Progress(Progress{Round: res.Rounds, Pages: sent, Bytes: enc.Written(), Dirty: count(dirty), Took: time.Since(t)})
	}

	// Stop-and-copy.
	moved := false
	perr := o.Pause(func() (bool, error) {
		stopped := time.Now()
		st, err := m.Save()
		if err != nil {
			return false, err
		}
		last, err := ds.Take()
		if err != nil {
			return false, err
		}
		for i := range last {
			last[i] |= dirty[i]
		}
		res.FinalPages = count(last)
		if err := enc.WritePages(mem, last); err != nil {
			return false, err
		}
		for i, take := range takes {
			if err := sendDisk(enc, o.Disks[i], take(), &diskSections); err != nil {
				return false, err
			}
		}
		var disks []Disk
		for _, d := range o.Disks {
			size, sum, err := hashFile(d.Path)
			if err != nil {
				return false, fmt.Errorf("disk %s: %w", d.Name, err)
			}
			disks = append(disks, Disk{Name: d.Name, Size: size, SHA256: sum, ReadOnly: d.ReadOnly})
		}
		for _, s := range []struct {
			name string
			v    any
		}{{sectionDisks, disks}, {sectionState, st}} {
			if err := enc.WriteSection(s.name, marshal(s.v)); err != nil {
				return false, err
			}
		}
		if err := enc.WriteEnd(); err != nil {
			return false, err
		}
		o.Progress(Progress{Round: res.Rounds, Pages: res.FinalPages, Bytes: enc.Written(), Final: true, Took: time.Since(stopped)})
		r, err := readReply(conn, br, o.Timeout)
		if err != nil {
			return false, fmt.Errorf("waiting for the destination: %w", err)
		}
		if !r.Ready {
			return false, fmt.Errorf("the destination refused the guest: %s", r.Error)
		}
		if o.Keep != nil {
			// A copy: the guest goes on here, from this very state.
			if err := writeReply(bw, reply{Released: true}); err != nil {
				return false, fmt.Errorf("telling the destination to start: %w", err)
			}
			res.Downtime = time.Since(stopped)
			return false, o.Keep()
		}
		// From here the destination holds the guest: it must not run here.
		moved = true
		if o.Release != nil {
			if err := o.Release(); err != nil {
				return true, fmt.Errorf("releasing host resources: %w", err)
			}
		}
		if err := writeReply(bw, reply{Released: true}); err != nil {
			return true, fmt.Errorf("telling the destination to start: %w", err)
		}
		res.Downtime = time.Since(stopped)
		return true, nil
	})
	res.Bytes = enc.Written()
	res.Total = time.Since(start)
	if perr != nil && moved {
		return res, fmt.Errorf("%w: %w", errMoved, perr)
	}
	return res, perr
}

// diskChunk is the most disk data one section carries.
const diskChunk = 1 << 20

// sendDisk sends d's image: all of it (blocks nil), or the blocks of
// blk.TrackBlock bytes set in blocks. All-zero chunks are skipped: the
// destination's image starts as zeros.
func sendDisk(enc *snapshot.Encoder, d DiskSource, blocks []uint64, seq *int) error {
	f, err := os.Open(d.Path)
	if err != nil {
		return fmt.Errorf("disk %s: %w", d.Name, err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return fmt.Errorf("disk %s: %w", d.Name, err)
	}
	size := st.Size()
	buf := make([]byte, diskChunk)
	send := func(off, n int64) error {
		n = min(n, size-off)
		if n <= 0 {
			return nil
		}
		b := buf[:n]
		if _, err := f.ReadAt(b, off); err != nil && err != io.EOF {
			return fmt.Errorf("disk %s: %w", d.Name, err)
		}
		if blocks == nil && allZero(b) {
			return nil
		}
		hdr := append([]byte{byte(len(d.Name))}, d.Name...)
		hdr = binary.BigEndian.AppendUint64(hdr, uint64(off))
		*seq++
		return enc.WriteSection(fmt.Sprintf("%s%d", sectionDiskData, *seq), append(hdr, b...))
	}
	if blocks == nil {
		for off := int64(0); off < size; off += diskChunk {
			if err := send(off, diskChunk); err != nil {
				return err
			}
		}
		return nil
	}
	for w, word := range blocks {
		for word != 0 {
			bit := bits.TrailingZeros64(word)
			word &^= 1 << bit
			if err := send(int64(w*64+bit)*blk.TrackBlock, blk.TrackBlock); err != nil {
				return err
			}
		}
	}
	return nil
}

// diskWriter writes the disk-data sections of a transfer into the images
// they name, each opened once.
type diskWriter struct {
	copied []CopiedDisk
	path   func(string) string
	files  map[string]*os.File
}

// write writes one disk-data section.
func (w *diskWriter) write(data []byte) error {
	if len(data) < 1 || len(data) < 1+int(data[0])+8 {
		return errors.New("a short disk-data section")
	}
	name := string(data[1 : 1+data[0]])
	off := int64(binary.BigEndian.Uint64(data[1+len(name):]))
	body := data[1+len(name)+8:]
	var size int64 = -1
	for _, c := range w.copied {
		if c.Name == name {
			size = c.Size
		}
	}
	if size < 0 {
		return fmt.Errorf("disk data for %q, which the manifest does not copy", name)
	}
	if off < 0 || off > size || int64(len(body)) > size-off {
		return fmt.Errorf("disk %s: data at %d+%d, past its %d bytes", name, off, len(body), size)
	}
	f := w.files[name]
	if f == nil {
		p := ""
		if w.path != nil {
			p = w.path(name)
		}
		if p == "" {
			return fmt.Errorf("disk %s: this side has no image for it", name)
		}
		var err error
		if f, err = os.OpenFile(p, os.O_WRONLY, 0); err != nil {
			return fmt.Errorf("disk %s: %w", name, err)
		}
		if w.files == nil {
			w.files = map[string]*os.File{}
		}
		w.files[name] = f
	}
	if _, err := f.WriteAt(body, off); err != nil {
		return fmt.Errorf("disk %s: %w", name, err)
	}
	return nil
}

// close closes the images; the first error counts.
func (w *diskWriter) close() error {
	var first error
	for name, f := range w.files {
		if err := f.Close(); err != nil && first == nil {
			first = fmt.Errorf("disk %s: %w", name, err)
		}
	}
	w.files = nil
	return first
}

func readReply(conn io.ReadWriter, br *bufio.Reader, timeout time.Duration) (reply, error) {
	if d, ok := conn.(deadliner); ok {
		d.SetDeadline(time.Now().Add(timeout))
		defer d.SetDeadline(time.Time{})
	}
	line, err := br.ReadBytes('\n')
	if err != nil {
		return reply{}, err
	}
	var r reply
	if err := json.Unmarshal(line, &r); err != nil {
		return reply{}, fmt.Errorf("bad reply %q: %w", line, err)
	}
	return r, nil
}

func writeReply(bw *bufio.Writer, r reply) error {
	b := marshal(r)
	bw.Write(append(b, '\n'))
	return bw.Flush()
}

// ReceiveOptions connect a live transfer's destination side.
type ReceiveOptions struct {
	// Build makes the machine the manifest describes (memory size and
	// virtio devices in order), not yet running.
	Build func(Manifest) (*machine.Machine, error)
	// DiskPath returns the image this side uses for the disk of the given
	// virtio device name; its contents must equal the source's. A disk
	// the transfer copies (Manifest.CopiedDisks) is written there: Build
	// makes the file, of the manifest's size.
	DiskPath func(name string) string
	Progress func(Progress)
	Timeout  time.Duration
}

// Receive takes a guest from the source at the other end of conn. It
// returns the restored machine once the source has let go of it; the
// caller then takes over the host resources (the tap) and runs it. On
// error the source keeps (or resumes) the guest; a machine that was built
// is closed.
func Receive(conn io.ReadWriter, o ReceiveOptions) (m *machine.Machine, res Result, err error) {
	if o.Timeout == 0 {
		o.Timeout = 2 * time.Minute
	}
	if o.Progress == nil {
		o.Progress = func(Progress) {}
	}
	start := time.Now()
	br := bufferedReader(conn, 1<<20)
	bw := bufio.NewWriter(conn)
	defer func() {
		if err != nil && m != nil {
			m.Close()
			m = nil
		}
	}()
	refuse := func(e error) (*machine.Machine, Result, error) {
		writeReply(bw, reply{Error: e.Error()})
		return m, res, e
	}
	dec, err := snapshot.NewDecoder(br)
	if err != nil {
		return nil, res, err
	}
	rec, err := dec.Next()
	if err != nil {
		return nil, res, err
	}
	if rec.Kind != snapshot.SectionRecord || rec.Name != sectionManifest {
		return refuse(fmt.Errorf("the stream starts with %v %q, not the manifest", rec.Kind, rec.Name))
	}
	var mf Manifest
	if err := unmarshal(rec.Name, rec.Data, &mf); err != nil {
		return refuse(err)
	}
	if mf.MemorySize != dec.MemorySize() {
		return refuse(fmt.Errorf("manifest says %d bytes of memory, the stream %d", mf.MemorySize, dec.MemorySize()))
	}
	if m, err = o.Build(mf); err != nil {
		return refuse(err)
	}
	if err := mf.Check(m); err != nil {
		return refuse(err)
	}
	mem, err := m.Memory().MutableSlice(0, m.Memory().Size())
	if err != nil {
		return refuse(err)
	}
	if err := dec.SetMemory(mem); err != nil {
		return refuse(err)
	}
	var st *machine.State
	copies := &diskWriter{copied: mf.CopiedDisks, path: o.DiskPath}
	defer copies.close()
	round := 0
	for done := false; !done; {
		t := time.Now()
		rec, err := dec.Next()
		if err != nil {
			return m, res, err // a broken stream: the source resumes on its own
		}
		switch rec.Kind {
		case snapshot.PagesRecord:
			o.Progress(Progress{Round: round, Pages: int(rec.DataPages + rec.ZeroPages), Bytes: dec.Offset(), Took: time.Since(t)})
			round++
		case snapshot.SectionRecord:
			if strings.HasPrefix(rec.Name, sectionDiskData) {
				if err := copies.write(rec.Data); err != nil {
					return refuse(err)
				}
				break
			}
			switch rec.Name {
			case sectionDisks:
				// Copied images are complete: close them before they are
				// compared with the source's.
				if err := copies.close(); err != nil {
					return refuse(err)
				}
				var disks []Disk
				if err := unmarshal(rec.Name, rec.Data, &disks); err != nil {
					return refuse(err)
				}
				if err := checkDisks(disks, o.DiskPath); err != nil {
					return refuse(err)
				}
			case sectionState:
				st = &machine.State{}
				if err := unmarshal(rec.Name, rec.Data, st); err != nil {
					return refuse(err)
				}
			}
		case snapshot.EndRecord:
			done = true
		}
	}
	if st == nil {
		return refuse(errors.New("the stream carried no machine state"))
	}
	if err := m.Restore(st); err != nil {
		return refuse(err)
	}
	if err := writeReply(bw, reply{Ready: true}); err != nil {
		return m, res, err
	}
	r, err := readReply(conn, br, o.Timeout)
	if err != nil {
		return m, res, fmt.Errorf("waiting for the source to let go: %w", err)
	}
	if !r.Released {
		return m, res, fmt.Errorf("the source did not let go: %s", r.Error)
	}
	res.Rounds, res.Bytes, res.Total = round, dec.Offset(), time.Since(start)
	return m, res, nil
}

// checkDisks compares the source's disks with this side's images.
func checkDisks(disks []Disk, path func(string) string) error {
	for _, d := range disks {
		p := ""
		if path != nil {
			p = path(d.Name)
		}
		if p == "" {
			return fmt.Errorf("disk %s: this side has no image for it", d.Name)
		}
		size, sum, err := hashFile(p)
		if err != nil {
			return fmt.Errorf("disk %s: %w", d.Name, err)
		}
		if size != d.Size || sum != d.SHA256 {
			return fmt.Errorf("disk %s: %s: %w (source %d bytes, SHA-256 %.16s; here %d bytes, %.16s)", d.Name, p, ErrDiskMismatch, d.Size, d.SHA256, size, sum)
		}
	}
	return nil
}
