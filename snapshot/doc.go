// Package snapshot is the container for a whole-VM snapshot, on disk and on
// the wire: a versioned, checksummed stream of named opaque sections (the
// machine, vCPU and device state, each encoded by its owner) and guest memory
// pages. The same stream serves a snapshot file and a live transfer over a
// connection: it is written strictly front to back (no seeking) and read the
// same way.
//
// A full snapshot (Write, WriteFile, Read, ReadFile) is a header, the
// sections, one full pages record holding every non-zero page, and an end
// record. A live transfer (Encoder, Decoder) is a header followed by any
// sequence of section and pages records, for example one full pages record,
// then one incremental pages record per pre-copy round (the pages dirtied
// since the previous round, zero pages included), then the sections and a
// last pages record after the guest stops, then the end record. The Decoder
// applies each pages record onto the destination memory as it arrives.
//
// # Robustness
//
// Every record carries its own CRC-32C, so a corrupted stream fails at the bad
// record, and the end record carries a SHA-256 of the whole stream, which also
// catches records that are individually intact but dropped, repeated or
// reordered. No field is trusted before its checksum is verified, except the
// few lengths needed to find the checksum, which are bounded first (a page
// chunk is at most 1 MiB, a section name at most 255 bytes). A section is at
// most MaxSectionSize bytes and its buffer grows with the bytes actually
// received, so a lying length field cannot cause a large allocation. Page
// data is verified before it is copied into the destination, and every page
// number is checked against the declared memory size. Decoding errors are
// *FormatError values that match the sentinel errors (ErrBadMagic, ErrVersion,
// ErrTruncated, ErrChecksum, ErrCorrupt, ErrTooLarge, ErrDuplicate,
// ErrPageRange) with errors.Is.
//
// CRC-32C is the per-record check because it is computed in hardware
// (SSE4.2) at many GB/s, detects every error burst up to 32 bits and misses a
// random corruption with probability 2^-32, which is what a per-record check
// against storage and transport faults needs. SHA-256 (SHA-NI on current x86)
// over the whole stream is the final check. Neither is authentication: the
// format has no key and does not defend against a forger.
//
// # Byte layout, version 1
//
// All integers are little-endian. Offsets are from the start of the
// structure. CRC-32C is the Castagnoli CRC (polynomial 0x1EDC6F41, reflected,
// initial value and final XOR 0xFFFFFFFF, as in iSCSI and ext4; the CRC of
// "123456789" is 0xE3069283). "Reserved" bytes are written as zero and a
// decoder rejects non-zero ones. PageSize is 4096.
//
// The stream is a header, then records, the last of which is the end record.
// Nothing after the end record belongs to the snapshot (ReadFile and Read
// reject trailing bytes).
//
// Header, 32 bytes:
//
//	0   8  magic "GOKVMSNP"
//	8   4  format version, 1
//	12  4  flags, 0 (no flags are defined in version 1)
//	16  8  guest memory size in bytes: a multiple of PageSize, at most MaxMemorySize
//	24  4  reserved
//	28  4  CRC-32C of bytes 0..27
//
// The magic and the version are the only fields whose position is fixed for
// every version: a decoder reads those 12 bytes first and refuses a version
// it does not know before interpreting anything else.
//
// Each record starts with a type byte: 1 section, 2 pages, 3 end.
//
// Section record, 16+n+L bytes:
//
//	0     1  type, 1
//	1     1  name length n, 1..MaxNameLen
//	2     2  reserved
//	4     4  data length L, at most MaxSectionSize
//	8     n  name: ASCII 0x21..0x7E (printable, no space)
//	8+n   4  CRC-32C of bytes 0..8+n-1
//	12+n  L  data
//	12+n+L 4 CRC-32C of the L data bytes (of nothing when L is 0: 0)
//
// Section names are unique within a stream.
//
// Pages record, 8 bytes then chunks:
//
//	0  1  type, 2
//	1  1  flags: bit 0 FULL (every page not carried by a chunk of this record
//	      is zero); the other bits are reserved
//	2  2  reserved
//	4  4  CRC-32C of bytes 0..3
//
// then chunks, each a 16-byte chunk header, the data, and a CRC:
//
//	0   1  kind: 1 data, 2 zero, 3 end of record
//	1   3  reserved
//	4   4  count: number of pages
//	8   8  first page number (page number = guest physical address / PageSize);
//	       in the end chunk, the number of pages the record's data and zero
//	       chunks carried, in all
//	16  D  data: count*PageSize bytes for a data chunk (the pages first,
//	       first+1, ... in order); nothing for zero and end chunks
//	16+D 4 CRC-32C of bytes 0..16+D-1 (chunk header and data)
//
// A data chunk has 1..256 pages (at most 1 MiB of data), a zero chunk at
// least 1 page (those pages become zero), an end chunk a count of 0. The
// chunks of a record cover increasing, non-overlapping page ranges: a chunk's
// first page is at least the previous chunk's first+count, and first+count is
// at most the number of memory pages. The end chunk ends the record. A
// decoder applies the pages onto the destination memory in order; in a FULL
// record it also zeroes every page no chunk covers.
//
// End record, 40 bytes:
//
//	0  1  type, 3
//	1  3  reserved
//	4  4  CRC-32C of bytes 0..3
//	8  32 SHA-256 of every byte of the stream before this field: from the
//	      first byte of the header to byte 7 of the end record
//
// A full snapshot as written by Write is: the header, one section record per
// section in the caller's order, one FULL pages record holding exactly the
// non-zero pages as data chunks, the end record.
package snapshot
