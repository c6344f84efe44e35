package blk

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
)

// Shared connects a disk whose image another VMM uses too (an FT pair on
// shared storage) to its machine. Reads become input: the image can change
// under a replaying VMM, so what the live VMM read travels in its log.
// Writes become output: the machine's output gate lets each reach the
// image only when it may (Apply), or forgets it (Forget); until then the
// disk serves reads of those sectors from the writes it holds.
type Shared struct {
	// Input reads outside data the way the machine's journal wants
	// (machine.DeviceInput): live reads the image.
	Input func(live func() ([]byte, error)) ([]byte, error)
	// Emit sends an encoded write (see Apply) through the output gate.
	Emit func(write []byte)
}

type heldSector struct {
	seq  uint64
	data []byte
}

// sharedState is a shared disk's writes not yet on the image.
type sharedState struct {
	Shared
	mu   sync.Mutex
	held map[int64]heldSector // by sector
	seq  uint64
}

// SetShared makes the disk shared (see Shared). Set it before the guest
// runs.
func (b *Blk) SetShared(s Shared) {
	b.shared = &sharedState{Shared: s, held: map[int64]heldSector{}}
}

// writeHeader is an encoded write's header: offset, sequence number.
const writeHeader = 16

// sharedReadChunk bounds one input (a log entry) of a shared read.
const sharedReadChunk = 512 << 10

// readShared reads n bytes at pos: the image patched with held writes, as
// input, in chunks of at most sharedReadChunk.
func (b *Blk) readShared(pos int64, n int) ([]byte, error) {
	out := make([]byte, 0, n)
	for len(out) < n {
		k := min(n-len(out), sharedReadChunk)
		chunk, err := b.readSharedChunk(pos+int64(len(out)), k)
		if err != nil {
			return nil, err
		}
		out = append(out, chunk...)
	}
	return out, nil
}

func (b *Blk) readSharedChunk(pos int64, n int) ([]byte, error) {
	s := b.shared
	data, err := s.Input(func() ([]byte, error) {
		buf := make([]byte, n)
		if _, err := b.f.ReadAt(buf, pos); err != nil {
			return nil, err
		}
		s.mu.Lock()
		for sec := pos / SectorSize; sec < (pos+int64(n))/SectorSize; sec++ {
			if h, ok := s.held[sec]; ok {
				copy(buf[sec*SectorSize-pos:], h.data)
			}
		}
		s.mu.Unlock()
		return buf, nil
	})
	if err == nil && len(data) != n {
		err = fmt.Errorf("the log's read has %d bytes, the request %d", len(data), n)
	}
	return data, err
}

// writeShared holds a write and sends it out through the gate.
func (b *Blk) writeShared(pos int64, data []byte) {
	s := b.shared
	s.mu.Lock()
	s.seq++
	seq := s.seq
	for i := 0; i < len(data); i += SectorSize {
		s.held[pos/SectorSize+int64(i/SectorSize)] = heldSector{seq, data[i : i+SectorSize]}
	}
	s.mu.Unlock()
	rec := make([]byte, writeHeader, writeHeader+len(data))
	binary.BigEndian.PutUint64(rec, uint64(pos))
	binary.BigEndian.PutUint64(rec[8:], seq)
	s.Emit(append(rec, data...))
}

func (b *Blk) decodeWrite(rec []byte) (pos int64, seq uint64, data []byte, err error) {
	if len(rec) < writeHeader || (len(rec)-writeHeader)%SectorSize != 0 {
		return 0, 0, nil, errors.New("blk: a malformed shared write")
	}
	pos, seq, data = int64(binary.BigEndian.Uint64(rec)), binary.BigEndian.Uint64(rec[8:]), rec[writeHeader:]
	if pos < 0 || pos%SectorSize != 0 || uint64(pos)+uint64(len(data)) > b.capacity*SectorSize {
		return 0, 0, nil, errors.New("blk: a shared write outside the disk")
	}
	return pos, seq, data, nil
}

// forget drops the held sectors of write seq (unless a later write holds
// them).
func (s *sharedState) forget(pos int64, seq uint64, n int) {
	s.mu.Lock()
	for i := 0; i < n; i += SectorSize {
		sec := pos/SectorSize + int64(i/SectorSize)
		if h, ok := s.held[sec]; ok && h.seq == seq {
			delete(s.held, sec)
		}
	}
	s.mu.Unlock()
}

// Apply writes an encoded write (one the disk emitted) to the image: the
// output gate let it go.
func (b *Blk) Apply(rec []byte) error {
	pos, seq, data, err := b.decodeWrite(rec)
	if err != nil {
		return err
	}
	_, err = b.f.WriteAt(data, pos)
	if err != nil {
		b.hostError("shared write", err)
	}
	if b.shared != nil {
		b.shared.forget(pos, seq, len(data))
	}
	return err
}

// Forget drops an encoded write the output gate will never let go (this
// VMM is a backup whose primary wrote it, or it stops).
func (b *Blk) Forget(rec []byte) {
	pos, seq, data, err := b.decodeWrite(rec)
	if err == nil && b.shared != nil {
		b.shared.forget(pos, seq, len(data))
	}
}

// Held is the number of sectors written and not yet on the image.
func (b *Blk) Held() int {
	if b.shared == nil {
		return 0
	}
	b.shared.mu.Lock()
	defer b.shared.mu.Unlock()
	return len(b.shared.held)
}
