package machine

import (
	"errors"
	"fmt"
)

// A PositionSource counts the guest's progress between deterministic exits
// exactly: a PMU's guest-only retired-conditional-branch counter (ft/pmu).
// With one, a recording with state deltas on (Config.DeltaAfter) delivers
// a due input where the delta kick stopped the guest and logs that
// position, a branch point (a digest check, no pages), instead of a state
// delta; the replay runs its guest to the same position and checks the
// digest there. Positions are counted from the last deterministic exit, so
// the two sides' counters need not agree on their zero.
//
// Every method runs on the vCPU thread, inside Run.
type PositionSource interface {
	// Start begins counting on the calling thread (Run's; it stays on it
	// until Stop).
	Start() error
	// Branches returns the count since Start.
	Branches() (uint64, error)
	// Seek runs the guest from where it stands to the position with the
	// count n since Start, at rip, with rcx in RCX, and leaves it stopped
	// there. The guest makes no deterministic exit on the way (the
	// recording made none); Seek reports one as an error.
	Seek(n, rip, rcx uint64) error
	// Stop ends counting.
	Stop() error
}

// ErrNoPositionSource: a replay met a branch point, which only a machine
// with a position source can reach.
var ErrNoPositionSource = errors.New("the log has branch points (it was recorded with a branch counter), and this machine has no position source")

// startPositions starts the position source for a Run under a journal with
// sync points and takes the count at the run's start, a deterministic
// exit. It returns the function that stops it.
func (m *Machine) startPositions() (func(), error) {
	if m.positions == nil || m.journal == nil || m.sync == nil {
		return func() {}, nil
	}
	if err := m.positions.Start(); err != nil {
		return nil, fmt.Errorf("position source: %w", err)
	}
	stop := func() {
		if err := m.positions.Stop(); err != nil {
			m.log.Warn("position source: stop", "err", err)
		}
	}
	if err := m.markExit(); err != nil {
		stop()
		return nil, err
	}
	return stop, nil
}

// markExit takes the count at a deterministic exit: branch points in the
// interval that follows count from here.
func (m *Machine) markExit() error {
	if m.positions == nil || m.sync == nil {
		return nil
	}
	n, err := m.positions.Branches()
	if err != nil {
		return fmt.Errorf("position source: %w", err)
	}
	m.branchBase = n
	return nil
}

// takeBranchPoint is the recorder's branch point at p, where a kick
// stopped a guest that can take an interrupt: a check that also says how
// far past the last deterministic exit the guest stands.
func (m *Machine) takeBranchPoint(p Position) (*SyncPoint, error) {
	n, err := m.positions.Branches()
	if err != nil {
		return nil, fmt.Errorf("position source: %w", err)
	}
	if n < m.branchBase {
		return nil, fmt.Errorf("position source: the count went backwards, from %d at the last exit to %d", m.branchBase, n)
	}
	sp, err := m.takeSyncPoint(p, false)
	if err != nil {
		return nil, err
	}
	sp.Branch, sp.Branches = true, n-m.branchBase
	return sp, nil
}

// seekBranchPoint is the replay's branch point: it runs the guest to the
// recorded position and checks the digest there.
func (m *Machine) seekBranchPoint(sp *SyncPoint) error {
	if m.positions == nil {
		return fmt.Errorf("branch point at %v: %w", sp.Pos, ErrNoPositionSource)
	}
	// The seek's first KVM_RUN completes the last exit's I/O. It is not
	// completed first with an immediate-exit KVM_RUN: the lab host's
	// emulator sometimes misbehaves doing that after a kernel-mode OUT
	// (see regsAsTheyAre), and the seek needs only RIP, RCX and the
	// count, which the I/O does not change.
	if err := m.positions.Seek(m.branchBase+sp.Branches, sp.Pos.RIP, sp.Regs.RCX); err != nil {
		return &SyncMismatchError{Pos: sp.Pos, Detail: fmt.Sprintf("the replay could not reach the branch point (%d branches past the exit, rcx %#x): %v", sp.Branches, sp.Regs.RCX, err)}
	}
	// A branch point at the exit itself: the guest did not run, and the
	// I/O the recording's kick completed is still pending.
	if err := m.completePendingIO(); err != nil {
		return fmt.Errorf("branch point at %v: %w", sp.Pos, err)
	}
	if err := m.compareSyncPoint(sp); err != nil {
		return err
	}
	m.sync.branchPoints++
	// The recorder took it where the guest could take an interrupt (the
	// exit flags KVM left after the seek's stop say nothing of that).
	m.sync.atDelta = true
	return nil
}
