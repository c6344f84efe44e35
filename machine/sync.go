package machine

import (
	"fmt"
	"time"

	"github.com/gokvm-ft/gokvm-ft/kvm"
)

type request struct {
	f    func()
	done chan struct{}
}

// Do runs f on the vCPU thread between two exits (a consistent point: no
// device is half-way through an exit) and returns when f has run. If the
// machine is not running, f runs on the caller's goroutine and Run waits
// for it. Do must not be called from the vCPU thread itself (a device, an
// OnExit hook or f): it would wait for itself.
func (m *Machine) Do(f func()) {
	for {
		m.reqMu.Lock()
		if m.running {
			done := make(chan struct{})
			m.reqs = append(m.reqs, request{f, done})
			m.reqMu.Unlock()
			m.inputs.nudge() // a halted vCPU loop waits on it
			m.kick()
			<-done
			return
		}
		m.reqMu.Unlock()
		if m.runMu.TryLock() {
			f()
			m.runMu.Unlock()
			return
		}
		// Run is starting or finishing; it will hold or drop runMu soon.
		time.Sleep(50 * time.Microsecond)
	}
}

func (m *Machine) setRunning(on bool) {
	m.reqMu.Lock()
	m.running = on
	m.reqMu.Unlock()
	if !on {
		m.runRequests() // those queued before Run noticed the end
	}
}

// runRequests runs queued Do requests; vCPU thread only.
func (m *Machine) runRequests() {
	m.reqMu.Lock()
	reqs := m.reqs
	m.reqs = nil
	m.reqMu.Unlock()
	for _, r := range reqs {
		r.f()
		close(r.done)
	}
}

// DirtySet is one user's set of guest pages written since it last took
// them: by the guest (KVM's dirty log) or by the VMM (device writes,
// loaders, restores). The machine is the single owner of both sources: each
// collection is handed to every open set, so users (a snapshot, live
// transfer, the replay layer) never take pages from each other.
type DirtySet struct {
	m    *Machine
	bits []uint64 // guarded by running on the vCPU thread (Do)
	open bool
}

// NewDirtySet starts a dirty set: it will hold pages written from now on.
// It switches KVM's dirty log on if it was off.
func (m *Machine) NewDirtySet() (*DirtySet, error) {
	d := &DirtySet{m: m, bits: make([]uint64, m.mem.BitmapWords()), open: true}
	var err error
	m.Do(func() {
		if !m.dirtyLog {
			if err = m.setDirtyLog(true); err != nil {
				return
			}
		}
		// Pages written before now belong to the sets already open.
		if err = m.collectDirty(); err != nil {
			return
		}
		m.dirtySets = append(m.dirtySets, d)
	})
	if err != nil {
		return nil, err
	}
	return d, nil
}

// Take returns the pages written since the set was made or last taken
// (one bit per page, Memory().BitmapWords() words) and empties the set.
func (d *DirtySet) Take() ([]uint64, error) {
	var out []uint64
	var err error
	d.m.Do(func() {
		if !d.open {
			err = fmt.Errorf("dirty set is closed")
			return
		}
		if err = d.m.collectDirty(); err != nil {
			return
		}
		out = d.bits
		d.bits = make([]uint64, len(out))
	})
	return out, err
}

// Close stops the set; its pages are dropped.
func (d *DirtySet) Close() {
	d.m.Do(func() {
		if !d.open {
			return
		}
		d.open = false
		sets := d.m.dirtySets[:0]
		for _, s := range d.m.dirtySets {
			if s != d {
				sets = append(sets, s)
			}
		}
		d.m.dirtySets = sets
	})
}

// collectDirty moves KVM's dirty log and the VMM's bitmap into every open
// set. It runs between exits (Do), so no device is writing guest memory
// while the VMM bitmap is swapped. With no set open, the bits are dropped.
func (m *Machine) collectDirty() error {
	got := make([]uint64, m.mem.BitmapWords())
	if m.dirtyLog {
		if err := m.vm.GetDirtyLog(0, got); err != nil {
			return err
		}
	}
	m.mem.TakeVMMDirty(got)
	for _, s := range m.dirtySets {
		for i, w := range got {
			s.bits[i] |= w
		}
	}
	return nil
}

// setDirtyLog switches KVM's dirty log for RAM on or off.
func (m *Machine) setDirtyLog(on bool) error {
	var flags uint32
	if on {
		flags = kvm.MemLogDirtyPages
	}
	if err := m.vm.SetUserMemoryRegion(kvm.UserMemoryRegion{Slot: 0, Flags: flags, MemorySize: m.mem.Size(), UserspaceAddr: kvm.HostAddr(m.mem.host())}); err != nil {
		return fmt.Errorf("dirty log on=%v: %w", on, err)
	}
	m.dirtyLog = on
	return nil
}
