package snapshot

import (
	"bytes"
	"errors"
	"fmt"
	"hash/crc32"
)

// Format constants. See the package documentation for the layout.
const (
	// Magic starts every snapshot stream.
	Magic = "GOKVMSNP"
	// Version is the format version this package writes and reads.
	Version = 1

	// PageSize is the granule of guest memory in the pages records.
	PageSize = 4096
	// MaxMemorySize bounds the declared guest memory size (1 TiB), so that
	// page offsets always fit an int64 and an int.
	MaxMemorySize = 1 << 40
	// MaxSectionSize bounds the data of one section (64 MiB). Machine,
	// vCPU and device state are kilobytes; guest memory goes in pages
	// records, which have no overall limit.
	MaxSectionSize = 64 << 20
	// MaxNameLen bounds the length of a section name.
	MaxNameLen = 64

	// maxChunkPages bounds a data chunk (1 MiB of page data): the most a
	// decoder reads before it can check a chunk's CRC.
	maxChunkPages = 256
)

const (
	headerLen     = 32
	sectionFixed  = 8 // section record header before the name
	pagesHdrLen   = 8
	chunkHdrLen   = 16
	endLen        = 8 // end record before the digest
	digestLen     = 32
	recSection    = 1
	recPages      = 2
	recEnd        = 3
	chunkData     = 1
	chunkZero     = 2
	chunkEnd      = 3
	pagesFullFlag = 1
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func crc(b []byte) uint32 { return crc32.Checksum(b, castagnoli) }

// zeroPage is compared against to find all-zero pages.
var zeroPage [PageSize]byte

func isZero(p []byte) bool {
	for len(p) >= PageSize {
		if !bytes.Equal(p[:PageSize], zeroPage[:]) {
			return false
		}
		p = p[PageSize:]
	}
	return bytes.Equal(p, zeroPage[:len(p)])
}

// Errors a decoder reports, wrapped in a *FormatError; match them with
// errors.Is. ErrTooLarge, ErrDuplicate and ErrPageRange are kinds of
// ErrCorrupt: a decoding error that matches one of them matches ErrCorrupt
// too. The Encoder reports ErrTooLarge and ErrDuplicate as well, for the
// caller's own mistakes.
var (
	// ErrBadMagic: the stream does not start with Magic; it is not a
	// snapshot.
	ErrBadMagic = errors.New("not a snapshot (bad magic)")
	// ErrVersion: the format version (or a header flag) is not one this
	// package knows, typically a snapshot from a newer gokvm-ft.
	ErrVersion = errors.New("unsupported version")
	// ErrTruncated: the stream ended before the end record.
	ErrTruncated = errors.New("truncated")
	// ErrChecksum: a record's CRC-32C or the final SHA-256 does not match.
	ErrChecksum = errors.New("checksum mismatch")
	// ErrCorrupt: a record is malformed although its checksum matches (bad
	// type, reserved bits set, chunks out of order, trailing data...).
	ErrCorrupt = errors.New("corrupt")
	// ErrTooLarge: a section is larger than MaxSectionSize.
	ErrTooLarge = errors.New("section too large")
	// ErrDuplicate: a section name appears twice.
	ErrDuplicate = errors.New("duplicate section")
	// ErrPageRange: a page number is beyond the declared memory size.
	ErrPageRange = errors.New("page out of range")
	// ErrMemorySize: the destination memory does not have the declared
	// size, or a memory size is not a multiple of PageSize or above
	// MaxMemorySize.
	ErrMemorySize = errors.New("bad memory size")
)

// FormatError is a decoding error: what is wrong (one of the sentinel
// errors) and where.
type FormatError struct {
	Offset int64  // byte offset in the stream of the record or chunk at fault
	Err    error  // the sentinel: ErrChecksum, ErrTruncated...
	Detail string // what exactly, for people
}

func (e *FormatError) Error() string {
	if e.Detail == "" {
		return fmt.Sprintf("snapshot: %v at byte %d", e.Err, e.Offset)
	}
	return fmt.Sprintf("snapshot: %v at byte %d: %s", e.Err, e.Offset, e.Detail)
}

// Unwrap returns the sentinel, and ErrCorrupt for its kinds.
func (e *FormatError) Unwrap() []error {
	switch e.Err {
	case ErrTooLarge, ErrDuplicate, ErrPageRange:
		return []error{e.Err, ErrCorrupt}
	}
	return []error{e.Err}
}

// checkName validates a section name.
func checkName(name string) error {
	if len(name) == 0 || len(name) > MaxNameLen {
		return fmt.Errorf("section name length %d is not in 1..%d", len(name), MaxNameLen)
	}
	for i := 0; i < len(name); i++ {
		if c := name[i]; c < 0x21 || c > 0x7e {
			return fmt.Errorf("section name %q: byte %#x is not printable ASCII", name, c)
		}
	}
	return nil
}

// checkMemSize validates a declared memory size.
func checkMemSize(size uint64) error {
	if size%PageSize != 0 || size > MaxMemorySize {
		return fmt.Errorf("snapshot: %w: %d is not a multiple of %d at most %d", ErrMemorySize, size, PageSize, uint64(MaxMemorySize))
	}
	return nil
}

// Memory is guest memory as the Encoder reads it: ReadAt fills p with the
// bytes at offset off (a guest physical address). *machine.Memory
// implements it; Bytes adapts a plain slice.
type Memory interface {
	ReadAt(p []byte, off uint64) error
}

// Bytes is guest memory held in a slice.
type Bytes []byte

// ReadAt copies b[off:off+len(p)] into p.
func (b Bytes) ReadAt(p []byte, off uint64) error {
	if off > uint64(len(b)) || uint64(len(p)) > uint64(len(b))-off {
		return fmt.Errorf("snapshot: read [%#x, +%d) outside memory of %#x bytes", off, len(p), len(b))
	}
	copy(p, b[off:])
	return nil
}
