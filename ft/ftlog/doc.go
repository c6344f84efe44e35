// Package ftlog is the record/replay log: the stream in which a recorder (the
// primary of a fault-tolerant pair, or a recording run) writes down every
// non-deterministic input the guest sees, each with the exact execution
// position at which the guest saw it, so that a replayer (the backup, or a
// replay run) can feed the same inputs at the same positions. The same
// stream serves a log file and the logging channel between two hosts: it is
// written strictly front to back and read the same way, one entry at a time.
//
// # Positions
//
// Without a PMU a position is the number of deterministic VM exits (PIO,
// MMIO, HLT, interrupt window) completed, the current one included, plus the
// guest RIP at that point (see the design notes, DESIGN.md). A log can instead
// carry PMU positions (retired-branch count and REP count, RCX, added); the
// header says which, and every position in the log is of that kind.
//
// Positions are ordered by (Exits, Branches), lexicographically; RIP and RCX
// tell where the guest stands but are not ordered (RCX counts down during a
// REP instruction). The entries of a log have non-decreasing positions. A
// Progress entry carries only an exit count N and promises that no later
// entry is at or before exit N: every later entry has Exits > N, except a
// Progress (Exits >= N) and the End entry (Exits >= N). So a replayer may run
// up to and through exit N once it has read Progress N, and must wait for
// more of the log before it goes beyond. Encoder and Decoder both enforce
// these rules (ErrOrder).
//
// # Streaming and tailing
//
// An Encoder writes to an io.Writer through its own buffer and only ever
// hands whole entries to the writer: every Write call on the underlying
// writer carries a whole number of entries (the header counting as one). It
// writes when its buffer passes 64 KiB and on Flush; a logging channel calls
// Flush when it wants the entries on the wire.
//
// A Decoder reads from an io.Reader, ahead through its own buffer, and
// returns one entry per Next call; after the End entry, Next returns io.EOF.
// When the reader ends (io.EOF) in the middle of the header or an entry, or
// between two entries before the End entry, Next returns a *FormatError
// matching ErrTruncated (and io.ErrUnexpectedEOF). That error is not sticky:
// the Decoder keeps the bytes it read and has consumed nothing of the
// incomplete entry, so calling Next again once more data is available
// continues where it stopped. This is how a replayer tails a log file that
// a recorder is still appending to: read the file through an *os.File (which
// returns io.EOF at the current end and the new bytes on a later Read), call
// Next, and on ErrTruncated wait for the file to grow and call Next again.
// Because every length is protected by a checksum before it is used (below),
// ErrTruncated means "need more data": the header and every complete entry
// so far checked, and so did the length of the incomplete entry once its
// frame was there, so the Decoder waits only for bytes that were really
// announced. Damage in the incomplete part shows as soon as that entry is
// complete, as one of the other errors; those errors are sticky. A complete
// log never gives ErrTruncated, whatever single bit of it is flipped.
//
// # Robustness
//
// Every entry starts with a 12-byte frame (body length, kind, device) that
// carries its own CRC-32C, so a damaged length is detected before the
// Decoder waits for or allocates the bytes it announces, and the length is
// bounded by the kind's maximum before anything is read. The rest of the
// entry is covered by a running CRC-32C: each entry's CRC continues the CRC
// of everything before it, so an entry that is intact but dropped, repeated
// or moved also fails the check, at the first entry after the damage. The
// Decoder grows its buffer with the bytes actually received, never to a
// length it was told. No field is interpreted before its checksum has been
// verified, reserved fields must be zero, and every payload must have a
// size its kind allows. Decoding errors are *FormatError values that
// name the entry (numbered from 0), its kind when the frame was readable,
// and its byte offset; match them with errors.Is against the sentinels
// (ErrBadMagic, ErrVersion, ErrTruncated, ErrChecksum, ErrCorrupt,
// ErrUnknownKind, ErrTooLarge, ErrOrder).
//
// CRC-32C detects every error burst up to 32 bits and misses random damage
// with probability 2^-32; it is computed in hardware. It is not
// authentication: the format has no key and does not defend against a
// forger.
//
// # Byte layout, version 1
//
// All integers are little-endian. Offsets are from the start of the
// structure. CRC-32C is the Castagnoli CRC (polynomial 0x1EDC6F41,
// reflected, initial value and final XOR 0xFFFFFFFF; the CRC of "123456789"
// is 0xE3069283). "Reserved" bytes are written as zero and a decoder rejects
// non-zero ones.
//
// The stream is a header, then entries, the last of which is an End entry.
// Nothing after the End entry belongs to the log.
//
// Header, 36+M bytes:
//
//	0     8  magic "GOKVMLOG"
//	8     4  format version, 1
//	12    4  flags: bit 0 PMU (positions are 32 bytes, with Branches and
//	         RCX; else 16); the other bits are reserved and a decoder
//	         refuses a header with one set as a newer version (ErrVersion)
//	16    8  creation time, nanoseconds since the Unix epoch (int64); 0 if
//	         unknown
//	24    4  metadata length M, at most MaxMetaLen
//	28    4  CRC-32C of bytes 0..27
//	32    M  metadata: nothing, or one JSON value (in practice an object:
//	         host, VMM version, machine configuration), opaque to this package
//	32+M  4  CRC-32C of bytes 0..32+M-1: the start of the running CRC
//
// The magic and the version are the only fields whose position is fixed for
// every version: a decoder reads those 12 bytes first and refuses a version
// it does not know before interpreting anything else.
//
// Entry, 16+N bytes:
//
//	0     4  body length N = P + payload length, where P is the position
//	         size (16, or 32 with the PMU flag); at most P plus the kind's
//	         maximum payload (below)
//	4     1  kind (below)
//	5     1  reserved
//	6     2  device ID: which device the input belongs to, for the kinds
//	         that have one (ClockRead, SerialInput, Packet, Completion,
//	         Opaque); 0 for the others
//	8     4  CRC-32C of bytes 0..7 (the frame)
//	12    8  position: Exits
//	20    8  position: RIP
//	28    8  position: Branches (PMU flag only)
//	36    8  position: RCX (PMU flag only)
//	12+P  N-P payload
//	12+N  4  running CRC: CRC-32C continued from the previous running CRC
//	         (the header's last field, or the previous entry's last field)
//	         over bytes 0..12+N-1 of this entry
//
// Equivalently, the running CRC of an entry is the CRC-32C of every byte of
// the stream up to it, leaving out the running CRC fields themselves (the
// header's last field and each earlier entry's last field).
//
// Kinds and payloads (n is the payload length):
//
//	1  ClockRead      n = 8: the clock value, int64 nanoseconds
//	2  SerialInput    n = 1..MaxSerialLen: bytes handed to the UART
//	3  Packet         n = 1..MaxPacketLen: a received network frame
//	4  Completion     n = 0..MaxCompletionLen: an asynchronous completion,
//	                  opaque to this package
//	5  Interrupt      n = 1: the vector injected with KVM_INTERRUPT
//	6  WindowRequest  n = 0: the recorder requested an interrupt-window exit
//	7  Progress       n = 0: nothing is due through exit Exits; RIP,
//	                  Branches and RCX are 0
//	8  Digest         n = 32: a digest of the guest state (DigestLen)
//	9  StateDelta     n = 0..MaxDeltaLen: a state delta, opaque to this
//	                  package (its encoding is the business of its owner)
//	10 Opaque         n = 1+k+m: a name length k (1 byte, 1..MaxNameLen),
//	                  the name (ASCII 0x21..0x7E), then m = 0..MaxOpaqueLen
//	                  bytes of data; for inputs a later version names
//	11 End            n = 0: the end of the log, at the final position
//
// Kind 0 and kinds above 11 are invalid in version 1 (ErrUnknownKind): there
// is no "skippable" kind. A new kind of input that needs no new check is an
// Opaque entry with a new name; anything else is a new format version.
package ftlog
