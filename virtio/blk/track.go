package blk

import (
	"sync"
)

// TrackBlock is the unit in which TrackWrites records the guest's writes.
const TrackBlock = 64 << 10

// writeTracker records which TrackBlock-sized blocks of the image the guest
// wrote. The vCPU thread marks; a live transfer takes.
type writeTracker struct {
	mu     sync.Mutex
	bitmap []uint64
}

func (w *writeTracker) mark(from, to int64) {
	if to <= from {
		return
	}
	w.mu.Lock()
	for b := from / TrackBlock; b <= (to-1)/TrackBlock; b++ {
		if int(b/64) < len(w.bitmap) {
			w.bitmap[b/64] |= 1 << (b % 64)
		}
	}
	w.mu.Unlock()
}

// TrackWrites starts recording the guest's writes to the image, for a live
// transfer that copies the disk while the guest runs. take returns a
// bitmap of the TrackBlock-sized blocks written since the start or the
// last take (bit i of word j: block 64j+i) and clears it; stop ends the
// recording. One recording at a time: a second call replaces the first.
func (b *Blk) TrackWrites() (take func() []uint64, stop func()) {
	blocks := (int64(b.capacity)*SectorSize + TrackBlock - 1) / TrackBlock
	w := &writeTracker{bitmap: make([]uint64, (blocks+63)/64)}
	b.tracker.Store(w)
	take = func() []uint64 {
		w.mu.Lock()
		defer w.mu.Unlock()
		out := w.bitmap
		w.bitmap = make([]uint64, len(out))
		return out
	}
	stop = func() { b.tracker.CompareAndSwap(w, nil) }
	return take, stop
}
