// Package blk is virtio-blk (virtio device type 2, spec 5.2) backed by a
// raw disk image file.
//
// Requests are served synchronously inside the queue notify exit, with
// pread and pwrite straight between the image and guest memory on the vCPU
// thread: slower than a worker pool, but the guest sees every request
// complete at a deterministic point, which record/replay and fault
// tolerance need.
package blk

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync/atomic"

	"github.com/gokvm-ft/gokvm-ft/virtio"
)

// SectorSize is the unit of capacity and request offsets.
const SectorSize = 512

// Queue and request limits offered to the driver. SegMax and SizeMax keep
// every request below virtio.MaxChainBytes (254 * 64 KiB + header and
// status < 16 MiB); 64 KiB is also Linux's default segment size.
const (
	QueueSize = 256
	SegMax    = QueueSize - 2 // data descriptors per request: the ring less header and status
	SizeMax   = 64 << 10      // bytes per data descriptor
)

// Feature bits (spec 5.2.3).
const (
	FeatureSizeMax = 1 << 1
	FeatureSegMax  = 1 << 2
	FeatureRO      = 1 << 5
	FeatureFlush   = 1 << 9
)

// Request types and status values (spec 5.2.6).
const (
	TypeIn    = 0
	TypeOut   = 1
	TypeFlush = 4
	TypeGetID = 8

	StatusOK     = 0
	StatusIOErr  = 1
	StatusUnsupp = 2
)

// IDBytes is the length of the serial returned by TypeGetID.
const IDBytes = 20

const headerSize = 16 // type u32, reserved u32, sector u64

// configSize is the part of struct virtio_blk_config this device shows:
// up to and including the write-zeroes fields; everything past size_max
// and seg_max reads as zero.
const configSize = 0x3c

// Blk is a virtio-blk device. It implements virtio.Device.
type Blk struct {
	f        *os.File
	name     string
	readOnly bool
	capacity uint64 // in sectors
	serial   [IDBytes]byte
	log      *slog.Logger
	logged   map[string]bool // host error kinds already logged

	t        virtio.Transport // nil until activated
	features uint64

	tracker atomic.Pointer[writeTracker] // see TrackWrites
	shared  *sharedState                 // see SetShared
}

// New opens the raw image at path (read-only if readOnly) as a disk.
func New(path string, readOnly bool) (*Blk, error) {
	flag := os.O_RDWR
	if readOnly {
		flag = os.O_RDONLY
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return nil, fmt.Errorf("blk: %w", err)
	}
	b, err := NewFile(f, readOnly)
	if err != nil {
		f.Close()
		return nil, err
	}
	return b, nil
}

// NewFile makes a disk of an open image file, which the Blk then owns. The
// image size must be a multiple of SectorSize. The serial (TypeGetID) is
// the file's base name, cut to IDBytes.
func NewFile(f *os.File, readOnly bool) (*Blk, error) {
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("blk: image %s: %w", f.Name(), err)
	}
	if fi.IsDir() {
		return nil, fmt.Errorf("blk: image %s is a directory", f.Name())
	}
	// Seek rather than Stat: block devices report their size this way.
	size, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		return nil, fmt.Errorf("blk: image %s: %w", f.Name(), err)
	}
	if size%SectorSize != 0 {
		return nil, fmt.Errorf("blk: image %s: size %d bytes is not a multiple of %d", f.Name(), size, SectorSize)
	}
	b := &Blk{f: f, name: f.Name(), readOnly: readOnly, capacity: uint64(size) / SectorSize,
		log: slog.New(slog.DiscardHandler), logged: map[string]bool{}}
	copy(b.serial[:], filepath.Base(f.Name()))
	return b, nil
}

// SetLogger sets where host I/O errors are reported (once per kind).
func (b *Blk) SetLogger(l *slog.Logger) { b.log = l }

// Close closes the image.
func (b *Blk) Close() error { return b.f.Close() }

// Capacity is the disk size in sectors.
func (b *Blk) Capacity() uint64 { return b.capacity }

// Type is virtio.DeviceBlock.
func (b *Blk) Type() uint32 { return virtio.DeviceBlock }

// Features offers segment limits, flush and, for a read-only image, RO.
func (b *Blk) Features() uint64 {
	f := uint64(FeatureSizeMax | FeatureSegMax | FeatureFlush)
	if b.readOnly {
		f |= FeatureRO
	}
	return f
}

// QueueMaxSizes is one request queue.
func (b *Blk) QueueMaxSizes() []uint16 { return []uint16{QueueSize} }

// ReadConfig reads struct virtio_blk_config: capacity, size_max, seg_max.
func (b *Blk) ReadConfig(offset uint64, data []byte) {
	var cfg [configSize]byte
	binary.LittleEndian.PutUint64(cfg[0:], b.capacity)
	binary.LittleEndian.PutUint32(cfg[8:], SizeMax)
	binary.LittleEndian.PutUint32(cfg[12:], SegMax)
	clear(data)
	if offset < configSize {
		copy(data, cfg[offset:])
	}
}

// WriteConfig ignores writes: no field this device offers is writable.
func (b *Blk) WriteConfig(offset uint64, data []byte) {}

// Activate starts serving requests.
func (b *Blk) Activate(t virtio.Transport, features uint64) {
	b.t, b.features = t, features
}

// Reset stops serving requests.
func (b *Blk) Reset() { b.t, b.features = nil, 0 }

// Notify serves every request the driver made available, then signals the
// used buffers once.
func (b *Blk) Notify(queue int) {
	if b.t == nil || queue != 0 {
		return
	}
	q := b.t.Queue(0)
	served := false
	for {
		c, ok, err := q.Pop()
		if err != nil {
			b.t.Fail(err)
			break
		}
		if !ok {
			break
		}
		written, err := b.serve(&c)
		if err != nil {
			b.t.Fail(err)
			break
		}
		if err := q.Push(c.Head, written); err != nil {
			b.t.Fail(err)
			break
		}
		served = true
	}
	if served {
		b.t.SignalUsed(0)
	}
}

// errNoStatus is a request without a writable status byte: nothing can be
// reported to the driver, so the device goes broken.
var errNoStatus = errors.New("blk: request has no writable status byte")

// serve carries out one request and writes its status byte, the last
// writable byte of the chain. It returns the bytes written to the chain.
func (b *Blk) serve(c *virtio.Chain) (uint32, error) {
	if c.WritableLen == 0 {
		return 0, &virtio.ChainError{Head: c.Head, Err: errNoStatus}
	}
	dataOut := c.WritableLen - 1 // writable bytes before the status byte
	status, data := b.request(c, dataOut)
	if _, err := c.WriteWritable([]byte{status}, dataOut); err != nil {
		return 0, err
	}
	// WritableLen <= virtio.MaxChainBytes, so this fits.
	return uint32(data + 1), nil
}

// request decodes and performs one request; it returns the status and the
// number of data bytes written into the chain.
func (b *Blk) request(c *virtio.Chain, dataOut uint64) (status byte, written uint64) {
	var hdr [headerSize]byte
	if c.ReadableLen < headerSize {
		return StatusIOErr, 0
	}
	if _, err := c.ReadReadable(hdr[:], 0); err != nil {
		return StatusIOErr, 0
	}
	typ := binary.LittleEndian.Uint32(hdr[0:])
	sector := binary.LittleEndian.Uint64(hdr[8:])
	dataIn := c.ReadableLen - headerSize // readable bytes after the header
	switch typ {
	case TypeIn:
		if dataIn != 0 || !b.rangeOK(sector, dataOut) {
			return StatusIOErr, 0
		}
		slices, err := c.WritableSlices(0, dataOut)
		if err != nil || !b.segmentsOK(slices) {
			return StatusIOErr, 0
		}
		pos := int64(sector * SectorSize)
		if b.shared != nil {
			data, err := b.readShared(pos, int(dataOut))
			if err != nil {
				b.hostError("read", err)
				return StatusIOErr, 0
			}
			for _, s := range slices {
				written += uint64(copy(s, data[written:]))
			}
			return StatusOK, written
		}
		for _, s := range slices {
			n, err := b.f.ReadAt(s, pos)
			written += uint64(n)
			if err != nil {
				b.hostError("read", err)
				return StatusIOErr, written
			}
			pos += int64(n)
		}
		return StatusOK, written
	case TypeOut:
		if dataOut != 0 || b.readOnly || !b.rangeOK(sector, dataIn) {
			return StatusIOErr, 0
		}
		slices, err := c.ReadableSlices(headerSize, dataIn)
		if err != nil || !b.segmentsOK(slices) {
			return StatusIOErr, 0
		}
		start := int64(sector * SectorSize)
		if b.shared != nil {
			data := make([]byte, 0, dataIn)
			for _, s := range slices {
				data = append(data, s...)
			}
			b.writeShared(start, data)
			return StatusOK, 0
		}
		pos := start
		defer func() {
			if w := b.tracker.Load(); w != nil {
				w.mark(start, pos) // what reached the image, even on an error
			}
		}()
		for _, s := range slices {
			n, err := b.f.WriteAt(s, pos)
			pos += int64(n)
			if err != nil {
				b.hostError("write", err)
				return StatusIOErr, 0
			}
		}
		return StatusOK, 0
	case TypeFlush:
		if dataIn != 0 || dataOut != 0 {
			return StatusIOErr, 0
		}
		if err := b.f.Sync(); err != nil {
			b.hostError("flush", err)
			return StatusIOErr, 0
		}
		return StatusOK, 0
	case TypeGetID:
		if dataIn != 0 || dataOut == 0 {
			return StatusIOErr, 0
		}
		n, err := c.WriteWritable(b.serial[:min(dataOut, IDBytes)], 0)
		if err != nil {
			return StatusIOErr, uint64(n)
		}
		return StatusOK, uint64(n)
	}
	return StatusUnsupp, 0
}

// rangeOK checks a data transfer of n bytes at sector: whole sectors,
// inside the disk, without overflow.
func (b *Blk) rangeOK(sector, n uint64) bool {
	if n%SectorSize != 0 || sector > b.capacity {
		return false
	}
	return n/SectorSize <= b.capacity-sector
}

// segmentsOK enforces SEG_MAX and SIZE_MAX when the driver accepted them.
func (b *Blk) segmentsOK(slices [][]byte) bool {
	if b.features&FeatureSegMax != 0 && len(slices) > SegMax {
		return false
	}
	if b.features&FeatureSizeMax != 0 {
		for _, s := range slices {
			if len(s) > SizeMax {
				return false
			}
		}
	}
	return true
}

// hostError logs the first host I/O error of each kind; the guest hears of
// every one through the request status.
func (b *Blk) hostError(kind string, err error) {
	if b.logged[kind] {
		return
	}
	b.logged[kind] = true
	b.log.Error("virtio-blk host I/O error (further ones of this kind not logged)", "image", b.name, "op", kind, "err", err)
}

// State is the guest-visible state of the disk: what the guest was shown.
// A restore onto a different disk is refused.
type State struct {
	Capacity uint64 // sectors
	ReadOnly bool
	Serial   []byte
}

// SaveState encodes State as JSON.
func (b *Blk) SaveState() []byte {
	// Marshal cannot fail on a struct of plain fields.
	js, _ := json.Marshal(State{Capacity: b.capacity, ReadOnly: b.readOnly, Serial: b.serial[:]})
	return js
}

// RestoreState checks that state describes this disk and resets the
// device, ready for activation.
func (b *Blk) RestoreState(state []byte) error {
	var s State
	if err := json.Unmarshal(state, &s); err != nil {
		return fmt.Errorf("blk: bad state: %w", err)
	}
	switch {
	case s.Capacity != b.capacity:
		return fmt.Errorf("blk: state is for a disk of %d sectors, %s has %d", s.Capacity, b.name, b.capacity)
	case s.ReadOnly != b.readOnly:
		return fmt.Errorf("blk: state is for a disk with read-only %v, %s has %v", s.ReadOnly, b.name, b.readOnly)
	case len(s.Serial) != IDBytes:
		return fmt.Errorf("blk: state has a serial of %d bytes, want %d", len(s.Serial), IDBytes)
	}
	b.Reset()
	// The serial is guest-visible: the guest keeps the one it saw, even
	// when its image now lives in a file of another name (a copy in a
	// snapshot, the destination of a live transfer). Which image is the
	// right one is for the caller to check (package migrate compares
	// contents).
	copy(b.serial[:], s.Serial)
	return nil
}
