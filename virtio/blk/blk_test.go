package blk_test

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/gokvm-ft/gokvm-ft/internal/statetest"
	"github.com/gokvm-ft/gokvm-ft/virtio"
	"github.com/gokvm-ft/gokvm-ft/virtio/blk"
	"github.com/gokvm-ft/gokvm-ft/virtio/virtiotest"
)

const (
	sectors = 64
	memSize = 2 << 20
	hdrGPA  = 0x100000
	dataGPA = 0x110000
	statGPA = 0x1f0000
)

// image writes a disk image whose sector i is filled with byte i.
func image(t *testing.T, name string) string {
	path := filepath.Join(t.TempDir(), name)
	b := make([]byte, sectors*blk.SectorSize)
	for i := range b {
		b[i] = byte(i / blk.SectorSize)
	}
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

type disk struct {
	t    *testing.T
	b    *blk.Blk
	mmio *virtio.MMIO
	mem  *virtiotest.Memory
	line *virtiotest.Line
	drv  *virtiotest.Driver
	q    *virtiotest.DriverQueue
}

func newDisk(t *testing.T, b *blk.Blk) *disk {
	t.Cleanup(func() { b.Close() })
	d := &disk{t: t, b: b, mem: virtiotest.NewMemory(memSize), line: &virtiotest.Line{}}
	d.mmio = virtio.NewMMIO(b, d.mem, d.line.Set)
	d.drv = &virtiotest.Driver{T: t, Regs: d.mmio, Mem: d.mem}
	d.q = d.drv.Init(0x10000, blk.QueueSize)[0]
	return d
}

func openDisk(t *testing.T, readOnly bool) (*disk, string) {
	path := image(t, "disk.img")
	b, err := blk.New(path, readOnly)
	if err != nil {
		t.Fatal(err)
	}
	return newDisk(t, b), path
}

// do sends one request: header, then the given data buffers, then a
// status byte (unless noStatus), and returns the status and used length.
func (d *disk) do(typ uint32, sector uint64, data ...virtiotest.Buffer) (status byte, used uint32) {
	d.t.Helper()
	var hdr [16]byte
	binary.LittleEndian.PutUint32(hdr[0:], typ)
	binary.LittleEndian.PutUint64(hdr[8:], sector)
	copy(d.mem.B[hdrGPA:], hdr[:])
	d.mem.B[statGPA] = 0xee
	bufs := append([]virtiotest.Buffer{{GPA: hdrGPA, Len: 16}}, data...)
	bufs = append(bufs, virtiotest.Buffer{GPA: statGPA, Len: 1, Writable: true})
	head := d.q.Add(bufs...)
	d.q.Notify()
	h, n, ok := d.q.NextUsed()
	if !ok || h != head {
		d.t.Fatalf("request not completed (used %d %v, broken %v)", h, ok, d.mmio.Broken())
	}
	if !d.line.Level {
		d.t.Error("no interrupt")
	}
	d.drv.Write32(virtio.RegInterruptACK, virtio.InterruptUsedBuffer)
	return d.mem.B[statGPA], n
}

func in(gpa uint64, n uint32) virtiotest.Buffer {
	return virtiotest.Buffer{GPA: gpa, Len: n, Writable: true}
}
func out(gpa uint64, n uint32) virtiotest.Buffer { return virtiotest.Buffer{GPA: gpa, Len: n} }

func TestConfigAndFeatures(t *testing.T) {
	d, _ := openDisk(t, false)
	if d.drv.Read32(virtio.RegDeviceID) != virtio.DeviceBlock {
		t.Error("not a block device")
	}
	f := d.drv.DeviceFeatures()
	if want := virtio.FeatureVersion1 | blk.FeatureFlush | blk.FeatureSegMax | blk.FeatureSizeMax; f != want {
		t.Errorf("features %#x, want %#x", f, want)
	}
	for off, want := range map[uint64]uint32{0: sectors, 4: 0, 8: blk.SizeMax, 12: blk.SegMax, 0x20: 0, 0x40: 0} {
		if got := d.drv.Read32(virtio.RegConfig + off); got != want {
			t.Errorf("config %#x = %d, want %d", off, got, want)
		}
	}
	ro, _ := openDisk(t, true)
	if ro.drv.DeviceFeatures()&blk.FeatureRO == 0 {
		t.Error("read-only disk without VIRTIO_BLK_F_RO")
	}
}

func TestReadWrite(t *testing.T) {
	d, path := openDisk(t, false)
	clear(d.mem.Dirty)
	// Read sectors 3..5 into two buffers.
	st, n := d.do(blk.TypeIn, 3, in(dataGPA, 1024), in(dataGPA+0x1000, 512))
	if st != blk.StatusOK || n != 1536+1 {
		t.Fatalf("read: status %d, used %d", st, n)
	}
	got := append(append([]byte(nil), d.mem.B[dataGPA:dataGPA+1024]...), d.mem.B[dataGPA+0x1000:dataGPA+0x1200]...)
	for i, c := range got {
		if c != byte(3+i/512) {
			t.Fatalf("read byte %d = %d", i, c)
		}
	}
	if !d.mem.Dirty[dataGPA/virtiotest.PageSize] || !d.mem.Dirty[dataGPA/virtiotest.PageSize+1] || !d.mem.Dirty[statGPA/virtiotest.PageSize] {
		t.Error("read data or status not marked dirty")
	}

	// Write two sectors at 10 from buffers of 100 and 924 bytes.
	for i := range 1024 {
		d.mem.B[dataGPA+uint64(i)] = 0xa5
	}
	st, n = d.do(blk.TypeOut, 10, out(dataGPA, 100), out(dataGPA+100, 924))
	if st != blk.StatusOK || n != 1 {
		t.Fatalf("write: status %d, used %d", st, n)
	}
	if st, _ := d.do(blk.TypeFlush, 0); st != blk.StatusOK {
		t.Fatalf("flush: status %d", st)
	}
	img, _ := os.ReadFile(path)
	if !bytes.Equal(img[10*512:12*512], bytes.Repeat([]byte{0xa5}, 1024)) || img[12*512] != 12 || img[10*512-1] != 9 {
		t.Error("image content wrong after write")
	}
	// The last sector can be read; reading it back shows the write.
	if st, _ := d.do(blk.TypeIn, sectors-1, in(dataGPA, 512)); st != blk.StatusOK || d.mem.B[dataGPA] != sectors-1 {
		t.Errorf("last sector: status %d", st)
	}
	if st, _ := d.do(blk.TypeIn, 11, in(dataGPA, 512)); st != blk.StatusOK || d.mem.B[dataGPA] != 0xa5 {
		t.Errorf("read back: status %d byte %#x", st, d.mem.B[dataGPA])
	}
}

func TestGetID(t *testing.T) {
	path := image(t, "a-rather-long-disk-image-name.img")
	b, err := blk.New(path, false)
	if err != nil {
		t.Fatal(err)
	}
	d := newDisk(t, b)
	st, n := d.do(blk.TypeGetID, 0, in(dataGPA, blk.IDBytes))
	if st != blk.StatusOK || n != blk.IDBytes+1 || string(d.mem.B[dataGPA:dataGPA+20]) != "a-rather-long-disk-i" {
		t.Errorf("get id: status %d used %d id %q", st, n, d.mem.B[dataGPA:dataGPA+20])
	}
	d2, _ := openDisk(t, false)
	copy(d2.mem.B[dataGPA:], bytes.Repeat([]byte{'x'}, 30))
	st, n = d2.do(blk.TypeGetID, 0, in(dataGPA, 30))
	if st != blk.StatusOK || n != blk.IDBytes+1 || string(d2.mem.B[dataGPA:dataGPA+21]) != "disk.img\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00x" {
		t.Errorf("get id: status %d used %d id %q", st, n, d2.mem.B[dataGPA:dataGPA+21])
	}
}

func TestRefusedRequests(t *testing.T) {
	d, path := openDisk(t, false)
	before, _ := os.ReadFile(path)
	for _, c := range []struct {
		name   string
		typ    uint32
		sector uint64
		data   []virtiotest.Buffer
		want   byte
	}{
		{"unsupported type", 99, 0, nil, blk.StatusUnsupp},
		{"discard unsupported", 11, 0, []virtiotest.Buffer{out(dataGPA, 16)}, blk.StatusUnsupp},
		{"read past end", blk.TypeIn, sectors, []virtiotest.Buffer{in(dataGPA, 512)}, blk.StatusIOErr},
		{"read straddling end", blk.TypeIn, sectors - 1, []virtiotest.Buffer{in(dataGPA, 1024)}, blk.StatusIOErr},
		{"write past end", blk.TypeOut, sectors, []virtiotest.Buffer{out(dataGPA, 512)}, blk.StatusIOErr},
		{"sector overflows", blk.TypeIn, 1<<64 - 1, []virtiotest.Buffer{in(dataGPA, 1024)}, blk.StatusIOErr},
		{"sector overflows bytes", blk.TypeOut, 1 << 55, []virtiotest.Buffer{out(dataGPA, 512)}, blk.StatusIOErr},
		{"read not whole sectors", blk.TypeIn, 0, []virtiotest.Buffer{in(dataGPA, 500)}, blk.StatusIOErr},
		{"write not whole sectors", blk.TypeOut, 0, []virtiotest.Buffer{out(dataGPA, 513)}, blk.StatusIOErr},
		{"read with readable data", blk.TypeIn, 0, []virtiotest.Buffer{out(dataGPA, 512)}, blk.StatusIOErr},
		{"write with writable data", blk.TypeOut, 0, []virtiotest.Buffer{in(dataGPA, 512)}, blk.StatusIOErr},
		{"flush with data", blk.TypeFlush, 0, []virtiotest.Buffer{in(dataGPA, 512)}, blk.StatusIOErr},
		{"get id without buffer", blk.TypeGetID, 0, nil, blk.StatusIOErr},
		{"get id with readable data", blk.TypeGetID, 0, []virtiotest.Buffer{out(dataGPA, 20), in(dataGPA, 20)}, blk.StatusIOErr},
		{"segment over SIZE_MAX", blk.TypeIn, 0, []virtiotest.Buffer{in(dataGPA, blk.SizeMax+512)}, blk.StatusIOErr},
	} {
		st, _ := d.do(c.typ, c.sector, c.data...)
		if st != c.want {
			t.Errorf("%s: status %d, want %d", c.name, st, c.want)
		}
	}
	if after, _ := os.ReadFile(path); !bytes.Equal(before, after) {
		t.Error("refused requests changed the image")
	}
	if d.mmio.Broken() != nil {
		t.Errorf("device broken: %v", d.mmio.Broken())
	}
}

func TestSegMax(t *testing.T) {
	// A one-sector read whose data is spread over n writable buffers, the
	// last of which also holds the status byte.
	read := func(d *disk, n int) (byte, uint32) {
		var hdr [16]byte // TypeIn, sector 0
		copy(d.mem.B[hdrGPA:], hdr[:])
		bufs := []virtiotest.Buffer{out(hdrGPA, 16)}
		for i := range n - 1 {
			bufs = append(bufs, in(dataGPA+uint64(i), 1))
		}
		bufs = append(bufs, in(statGPA-uint64(512-n+1), uint32(512-n+1)+1))
		d.q.Add(bufs...)
		d.q.Notify()
		_, used, ok := d.q.NextUsed()
		if !ok {
			t.Fatalf("%d segments: not completed, broken %v", n, d.mmio.Broken())
		}
		return d.mem.B[statGPA], used
	}
	d, _ := openDisk(t, false)
	if st, _ := read(d, blk.SegMax+1); st != blk.StatusIOErr {
		t.Errorf("%d segments: status %d", blk.SegMax+1, st)
	}
	if st, used := read(d, blk.SegMax); st != blk.StatusOK || used != 513 {
		t.Errorf("%d segments: status %d used %d", blk.SegMax, st, used)
	}
}

func TestReadOnly(t *testing.T) {
	d, path := openDisk(t, true)
	before, _ := os.ReadFile(path)
	if st, _ := d.do(blk.TypeOut, 0, out(dataGPA, 512)); st != blk.StatusIOErr {
		t.Errorf("write to read-only disk: status %d", st)
	}
	if st, _ := d.do(blk.TypeIn, 1, in(dataGPA, 512)); st != blk.StatusOK || d.mem.B[dataGPA] != 1 {
		t.Errorf("read from read-only disk: status %d", st)
	}
	if after, _ := os.ReadFile(path); !bytes.Equal(before, after) {
		t.Error("read-only image changed")
	}
}

func TestHostIOError(t *testing.T) {
	f, err := os.OpenFile(image(t, "x.img"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	b, err := blk.NewFile(f, false)
	if err != nil {
		t.Fatal(err)
	}
	d := newDisk(t, b)
	f.Close() // the image goes away underneath the device
	for _, c := range []struct {
		typ  uint32
		data []virtiotest.Buffer
	}{
		{blk.TypeIn, []virtiotest.Buffer{in(dataGPA, 512)}},
		{blk.TypeOut, []virtiotest.Buffer{out(dataGPA, 512)}},
		{blk.TypeFlush, nil},
	} {
		if st, _ := d.do(c.typ, 0, c.data...); st != blk.StatusIOErr {
			t.Errorf("type %d on a closed image: status %d", c.typ, st)
		}
	}
}

func TestMalformedRequests(t *testing.T) {
	// No writable byte at all: nowhere to put a status, so the device breaks.
	d, _ := openDisk(t, false)
	d.q.Add(out(hdrGPA, 16), out(dataGPA, 512))
	d.q.Notify()
	if d.mmio.Broken() == nil || d.drv.Read32(virtio.RegStatus)&virtio.StatusDeviceNeedsReset == 0 || !d.line.Level {
		t.Errorf("no status byte: broken %v", d.mmio.Broken())
	}
	// Header too short but a status byte: IOERR.
	d, _ = openDisk(t, false)
	d.mem.B[statGPA] = 0xee
	d.q.Add(out(hdrGPA, 8), in(statGPA, 1))
	d.q.Notify()
	if _, n, ok := d.q.NextUsed(); !ok || n != 1 || d.mem.B[statGPA] != blk.StatusIOErr {
		t.Errorf("short header: status %d used %d %v", d.mem.B[statGPA], n, ok)
	}
	// Header missing entirely: IOERR.
	d.q.Add(in(statGPA, 1))
	d.q.Notify()
	if _, _, ok := d.q.NextUsed(); !ok || d.mem.B[statGPA] != blk.StatusIOErr || d.mmio.Broken() != nil {
		t.Errorf("no header: status %d", d.mem.B[statGPA])
	}
	// A malformed chain (a loop) breaks the device.
	d.q.WriteDesc(0, hdrGPA, 16, 1, 0)
	d.q.Publish(0)
	d.q.Notify()
	if !errors.Is(d.mmio.Broken(), virtio.ErrChainTooLong) {
		t.Errorf("loop: broken %v", d.mmio.Broken())
	}
}

func TestImageChecks(t *testing.T) {
	dir := t.TempDir()
	odd := filepath.Join(dir, "odd.img")
	os.WriteFile(odd, make([]byte, 1000), 0o600)
	if _, err := blk.New(odd, false); err == nil || !strings.Contains(err.Error(), odd) {
		t.Errorf("odd-sized image: %v", err)
	}
	if _, err := blk.New(dir, true); err == nil || !strings.Contains(err.Error(), dir) {
		t.Errorf("directory: %v", err)
	}
	if _, err := blk.New(filepath.Join(dir, "missing.img"), false); err == nil {
		t.Error("missing image opened")
	}
}

func TestSaveRestore(t *testing.T) {
	d, path := openDisk(t, false)
	d.do(blk.TypeIn, 0, in(dataGPA, 512))
	s := d.mmio.Save()
	sj := statetest.ThroughGobAndJSON(t, s)
	if !reflect.DeepEqual(s, sj) {
		t.Fatal("state changed through encoding")
	}
	// Same image, fresh device: restores and serves where the old one left off.
	b2, err := blk.New(path, false)
	if err != nil {
		t.Fatal(err)
	}
	defer b2.Close()
	mem := virtiotest.NewMemory(memSize)
	copy(mem.B, d.mem.B)
	line := &virtiotest.Line{}
	m2 := virtio.NewMMIO(b2, mem, line.Set)
	if err := m2.Restore(sj); err != nil {
		t.Fatal(err)
	}
	d.mmio, d.mem, d.line, d.drv.Regs, d.drv.Mem = m2, mem, line, m2, mem
	if st, _ := d.do(blk.TypeIn, 7, in(dataGPA, 512)); st != blk.StatusOK || mem.B[dataGPA] != 7 {
		t.Errorf("after restore: status %d", st)
	}
	// A different disk is refused.
	for _, c := range []struct {
		name     string
		size     int
		readOnly bool
	}{{"disk.img", 2 * sectors * 512, false}, {"disk.img", sectors * 512, true}} {
		p := filepath.Join(t.TempDir(), c.name)
		os.WriteFile(p, make([]byte, c.size), 0o600)
		b3, err := blk.New(p, c.readOnly)
		if err != nil {
			t.Fatal(err)
		}
		m3 := virtio.NewMMIO(b3, virtiotest.NewMemory(memSize), nil)
		if err := m3.Restore(s); err == nil {
			t.Errorf("%+v: restored onto a different disk", c)
		} else {
			t.Log(err)
		}
		b3.Close()
	}
	// The same disk under another file name (a copy): accepted, and the
	// guest keeps the serial it saw.
	p := filepath.Join(t.TempDir(), "copy-of-disk.img")
	os.WriteFile(p, make([]byte, sectors*512), 0o600)
	b4, err := blk.New(p, false)
	if err != nil {
		t.Fatal(err)
	}
	defer b4.Close()
	if err := virtio.NewMMIO(b4, virtiotest.NewMemory(memSize), nil).Restore(s); err != nil {
		t.Fatalf("restore onto a copy: %v", err)
	}
	var st blk.State
	if err := json.Unmarshal(b4.SaveState(), &st); err != nil || !strings.HasPrefix(string(st.Serial), "disk.img\x00") {
		t.Errorf("serial after restore %q, %v; want the saved disk.img", st.Serial, err)
	}
}

// TrackWrites records the blocks the guest writes, and only those, until
// stopped; take clears what it returns.
func TestTrackWrites(t *testing.T) {
	path := filepath.Join(t.TempDir(), "big.img")
	if err := os.WriteFile(path, make([]byte, 2*blk.TrackBlock), 0o600); err != nil {
		t.Fatal(err)
	}
	b, err := blk.New(path, false)
	if err != nil {
		t.Fatal(err)
	}
	d := newDisk(t, b)
	d.do(blk.TypeOut, 0, out(dataGPA, 512)) // before tracking: not recorded
	take, stop := d.b.TrackWrites()
	// A write across the first block's end: blocks 0 and 1.
	st, _ := d.do(blk.TypeOut, blk.TrackBlock/blk.SectorSize-1, out(dataGPA, 1024))
	if st != blk.StatusOK {
		t.Fatalf("write: status %d", st)
	}
	d.do(blk.TypeIn, 3, in(dataGPA, 512)) // reads are not writes
	got := take()
	if len(got) == 0 || got[0] != 0b11 {
		t.Fatalf("blocks written: %b, want 0b11", got)
	}
	if again := take(); again[0] != 0 {
		t.Fatalf("take did not clear: %b", again)
	}
	stop()
	d.do(blk.TypeOut, 0, out(dataGPA, 512))
	if after := take(); after[0] != 0 {
		t.Fatalf("recorded after stop: %b", after)
	}
}

// A shared disk: writes wait in the disk until the gate applies them (reads
// see them meanwhile), reads go through the journal's input path, and a
// forgotten write never reaches the image.
func TestSharedDisk(t *testing.T) {
	d, path := openDisk(t, false)
	var emitted [][]byte
	var reads int
	replay := [][]byte(nil) // when set, reads come from here (a replay)
	d.b.SetShared(blk.Shared{
		Input: func(live func() ([]byte, error)) ([]byte, error) {
			reads++
			if len(replay) > 0 {
				r := replay[0]
				replay = replay[1:]
				return r, nil
			}
			return live()
		},
		Emit: func(w []byte) { emitted = append(emitted, w) },
	})
	for i := range 512 {
		d.mem.B[dataGPA+uint64(i)] = 0x5a
	}
	if st, _ := d.do(blk.TypeOut, 10, out(dataGPA, 512)); st != blk.StatusOK || len(emitted) != 1 {
		t.Fatalf("write: status %d, %d emitted", st, len(emitted))
	}
	img, _ := os.ReadFile(path)
	if img[10*512] != 10 {
		t.Fatal("a held write reached the image before the gate let it go")
	}
	// The guest reads its own write back meanwhile.
	if st, _ := d.do(blk.TypeIn, 10, in(dataGPA+0x1000, 1024)); st != blk.StatusOK || d.mem.B[dataGPA+0x1000] != 0x5a || d.mem.B[dataGPA+0x1000+512] != 11 {
		t.Fatalf("read back: status %d, bytes %#x %#x", st, d.mem.B[dataGPA+0x1000], d.mem.B[dataGPA+0x1000+512])
	}
	if d.b.Held() != 1 {
		t.Fatalf("held sectors: %d", d.b.Held())
	}
	if err := d.b.Apply(emitted[0]); err != nil {
		t.Fatal(err)
	}
	img, _ = os.ReadFile(path)
	if img[10*512] != 0x5a || d.b.Held() != 0 {
		t.Fatalf("after apply: image byte %#x, held %d", img[10*512], d.b.Held())
	}
	// A forgotten write is gone: reads see the image again.
	d.mem.B[dataGPA] = 0x77
	d.do(blk.TypeOut, 20, out(dataGPA, 512))
	d.b.Forget(emitted[1])
	if st, _ := d.do(blk.TypeIn, 20, in(dataGPA+0x1000, 512)); st != blk.StatusOK || d.mem.B[dataGPA+0x1000] != 20 {
		t.Fatalf("after forget: status %d byte %#x", st, d.mem.B[dataGPA+0x1000])
	}
	// A replay's reads come from its log, not the image.
	replay = [][]byte{bytes.Repeat([]byte{0xcc}, 512)}
	if st, _ := d.do(blk.TypeIn, 30, in(dataGPA+0x1000, 512)); st != blk.StatusOK || d.mem.B[dataGPA+0x1000] != 0xcc {
		t.Fatalf("replayed read: status %d byte %#x", st, d.mem.B[dataGPA+0x1000])
	}
	if reads != 3 {
		t.Fatalf("%d reads went through the input path, want 3", reads)
	}
	if err := d.b.Apply([]byte{1, 2, 3}); err == nil {
		t.Fatal("a malformed write was applied")
	}
}
