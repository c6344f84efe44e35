package machine

import (
	"fmt"
	"io"
	"sort"
	"time"

	"github.com/gokvm-ft/gokvm-ft/kvm"
)

// ExitStats counts what the vCPU loop did: exits by reason and by port or
// MMIO address, interrupts injected, and the time spent in KVM_RUN versus
// in the VMM. It costs a few map increments per exit and is always on.
type ExitStats struct {
	ByReason   map[kvm.ExitReason]uint64
	ByAddr     map[statKey]uint64
	OtherAddr  uint64 // port and MMIO exits beyond the first maxStatAddrs addresses
	Injections uint64
	HostExits  uint64        // kicks and host signals
	InGuest    time.Duration // wall time inside KVM_RUN
	Halted     time.Duration // wall time waiting in HLT
	Started    time.Time
	// Under a journal: how long (guest time) interrupts waited from
	// falling due (a PIT edge, or input seen at an exit) to injection at
	// a deterministic exit.
	IRQWaits     uint64
	IRQWaitTotal time.Duration
	IRQWaitMax   time.Duration
	// Sync points under a journal with Config.SyncPoints: state deltas
	// taken (recording) or applied (replay), the bytes of page data they
	// carried, and digest checks; with a position source, branch points
	// taken or reached instead of deltas.
	Deltas, DeltaBytes, SyncChecks, BranchPoints uint64
}

type statKey struct {
	MMIO  bool
	Addr  uint64
	Write bool
}

// maxStatAddrs bounds ByAddr: a guest that touches ever new addresses must
// not make the VMM's memory grow with it. Further addresses are counted
// under OtherAddr.
const maxStatAddrs = 4096

// count adds one handled deterministic exit.
func (s *ExitStats) count(ex *Exit) {
	s.ByReason[ex.Reason]++
	if ex.Reason != kvm.ExitIO && ex.Reason != kvm.ExitMMIO {
		return
	}
	k := statKey{ex.Reason == kvm.ExitMMIO, ex.Addr, ex.Write}
	if _, ok := s.ByAddr[k]; ok || len(s.ByAddr) < maxStatAddrs {
		s.ByAddr[k]++
	} else {
		s.OtherAddr++
	}
}

func newExitStats() ExitStats {
	return ExitStats{ByReason: map[kvm.ExitReason]uint64{}, ByAddr: map[statKey]uint64{}}
}

// Stats returns a copy of the exit statistics; call it only while the
// machine is not running.
func (m *Machine) Stats() ExitStats {
	s := m.stats
	if m.sync != nil {
		s.Deltas, s.DeltaBytes, s.SyncChecks, s.BranchPoints = m.sync.deltas, m.sync.deltaBytes, m.sync.checks, m.sync.branchPoints
	}
	s.ByReason = make(map[kvm.ExitReason]uint64, len(m.stats.ByReason))
	for k, v := range m.stats.ByReason {
		s.ByReason[k] = v
	}
	s.ByAddr = make(map[statKey]uint64, len(m.stats.ByAddr))
	for k, v := range m.stats.ByAddr {
		s.ByAddr[k] = v
	}
	return s
}

// Write prints the statistics, busiest ports and addresses first.
func (s ExitStats) Write(w io.Writer) {
	var total uint64
	for _, n := range s.ByReason {
		total += n
	}
	wall := time.Since(s.Started)
	fmt.Fprintf(w, "exits: %d guest-caused, %d host (kicks), %d interrupts injected\n", total, s.HostExits, s.Injections)
	fmt.Fprintf(w, "time: %.1fs wall, %.1fs in KVM_RUN, %.1fs halted, %.1fs in the VMM\n",
		wall.Seconds(), s.InGuest.Seconds(), s.Halted.Seconds(), (wall - s.InGuest - s.Halted).Seconds())
	if s.Deltas+s.SyncChecks+s.BranchPoints > 0 {
		fmt.Fprintf(w, "sync points (journal): %d state deltas (%d KiB of pages), %d branch points, %d digest checks\n", s.Deltas, s.DeltaBytes>>10, s.BranchPoints, s.SyncChecks)
	}
	if s.IRQWaits > 0 {
		fmt.Fprintf(w, "interrupt waits (journal): %d, mean %v, max %v\n", s.IRQWaits, s.IRQWaitTotal/time.Duration(s.IRQWaits), s.IRQWaitMax)
	}
	reasons := make([]kvm.ExitReason, 0, len(s.ByReason))
	for r := range s.ByReason {
		reasons = append(reasons, r)
	}
	sort.Slice(reasons, func(i, j int) bool { return s.ByReason[reasons[i]] > s.ByReason[reasons[j]] })
	for _, r := range reasons {
		fmt.Fprintf(w, "  %-16v %10d\n", r, s.ByReason[r])
	}
	keys := make([]statKey, 0, len(s.ByAddr))
	for k := range s.ByAddr {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool { return s.ByAddr[keys[i]] > s.ByAddr[keys[j]] })
	for i, k := range keys {
		if i == 20 {
			break
		}
		space, dir := "port", "in"
		if k.MMIO {
			space = "mmio"
		}
		if k.Write {
			dir = "out"
		}
		fmt.Fprintf(w, "  %s %#-10x %-3s %10d\n", space, k.Addr, dir, s.ByAddr[k])
	}
	if s.OtherAddr > 0 {
		fmt.Fprintf(w, "  %d more exits at addresses beyond the first %d\n", s.OtherAddr, maxStatAddrs)
	}
}

// PortExits is the number of exits for one port and direction.
func (s ExitStats) PortExits(port uint16, write bool) uint64 {
	return s.ByAddr[statKey{Addr: uint64(port), Write: write}]
}
