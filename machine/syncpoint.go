package machine

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math/bits"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/klauspost/compress/s2"

	"github.com/gokvm-ft/gokvm-ft/kvm"
)

// A sync point is where a recording and its replay compare their states,
// and, for a state delta, where the replay takes the recording's state
// instead of computing it.
//
// A guest that runs without a deterministic exit would keep a due interrupt
// waiting; under a journal with Config.DeltaAfter set, the recorder kicks it
// out after that long, injects where the guest stands (waiting for an
// interrupt window if it has interrupts off) and logs a state delta there:
// the vCPU state and every page written since the last sync point. Devices
// need not travel: they change only at exits, which the log already covers.
// The replayer, standing at the same last deterministic exit, applies the
// delta instead of running the guest to a place it cannot find without a
// branch counter. Now and then (Config.DigestEvery) the recorder also logs
// a check at a deterministic exit: a digest only.
//
// Both sides keep an incremental hash of memory (a short hash per page and
// a mixed sum of them), updated at each sync point from the pages written
// since the last one, so a digest costs the pages that changed, not all of
// memory.

// SyncPoint is one sync point as the log carries it.
type SyncPoint struct {
	Pos Position
	// Delta says this is a state delta; otherwise a digest check at a
	// deterministic exit, or at a branch point.
	Delta bool
	// Branch says this check is a branch point: an asynchronous position
	// a PositionSource counted, Branches retired conditional branches
	// after the deterministic exit Pos.Exits, at Pos.RIP with Regs.RCX in
	// RCX. The replay runs the guest there instead of taking a delta.
	Branch   bool
	Branches uint64
	// Digest covers the general and control registers and the memory sum
	// (after the delta is applied).
	Digest [32]byte
	// MemBefore is the memory sum without the delta's pages: what the
	// replay must have before it applies the delta.
	MemBefore [2]uint64
	// Regions are the memory sums (one lane) of equal slices of guest
	// memory, taken as MemBefore is: where a mismatch is, for the report.
	Regions []uint64
	// Devices is a short hash of the devices' state and guest time, and
	// Regs the general registers (checks only): they name what differs
	// when the digest does not match.
	Devices uint64
	Regs    kvm.Regs
	VCPU    *VCPUState // Delta only
	Pages   []uint64   // Delta only: page numbers, ascending
	Data    []byte     // Delta only: the pages' contents, PageSize each
}

// SyncMismatchError says a replay's state differs from the recording's at
// a sync point.
type SyncMismatchError struct {
	Pos    Position
	Detail string
}

func (e *SyncMismatchError) Error() string {
	return fmt.Sprintf("replay diverged at the sync point at %v: %s", e.Pos, e.Detail)
}

const syncHeaderLen = 1 + 32 + 16 + 8 + 2

// The kinds of sync point, the encoding's first byte.
const (
	syncCheck  = 0
	syncDelta  = 1
	syncBranch = 2
)

// regsLen is the encoded size of kvm.Regs.
const regsLen = 18 * 8

// maxRegions bounds SyncPoint.Regions.
const maxRegions = 64

// MarshalBinary encodes s (without its position, which the log entry has).
func (s *SyncPoint) MarshalBinary() ([]byte, error) {
	b := make([]byte, 0, syncHeaderLen+len(s.Data)+8*len(s.Pages)+8<<10)
	switch {
	case s.Delta && s.Branch:
		return nil, errors.New("sync point: a state delta cannot be a branch point")
	case s.Delta:
		b = append(b, syncDelta)
	case s.Branch:
		b = append(b, syncBranch)
	default:
		b = append(b, syncCheck)
	}
	b = append(b, s.Digest[:]...)
	b = binary.LittleEndian.AppendUint64(b, s.MemBefore[0])
	b = binary.LittleEndian.AppendUint64(b, s.MemBefore[1])
	b = binary.LittleEndian.AppendUint64(b, s.Devices)
	if len(s.Regions) > maxRegions {
		return nil, errors.New("sync point: too many memory regions")
	}
	b = binary.LittleEndian.AppendUint16(b, uint16(len(s.Regions)))
	for _, r := range s.Regions {
		b = binary.LittleEndian.AppendUint64(b, r)
	}
	if !s.Delta {
		b, err := binary.Append(b, binary.LittleEndian, s.Regs)
		if err != nil || !s.Branch {
			return b, err
		}
		return binary.LittleEndian.AppendUint64(b, s.Branches), nil
	}
	if s.VCPU == nil || len(s.Data) != len(s.Pages)*PageSize {
		return nil, errors.New("sync point: a delta needs the vCPU state and PageSize bytes per page")
	}
	v, err := json.Marshal(s.VCPU)
	if err != nil {
		return nil, err
	}
	v = s2.Encode(nil, v) // mostly the XSAVE area's zeros
	b = binary.LittleEndian.AppendUint32(b, uint32(len(v)))
	b = append(b, v...)
	// Page numbers (zero pages flagged, their contents left out), then
	// the other pages' contents as one S2 block: a guest that clears or
	// copies memory writes much that compresses.
	b = binary.LittleEndian.AppendUint32(b, uint32(len(s.Pages)))
	content := make([]byte, 0, len(s.Data))
	for k, p := range s.Pages {
		page := s.Data[k*PageSize : (k+1)*PageSize]
		if bytes.Equal(page, zeroPage[:]) {
			p |= zeroPageFlag
		} else {
			content = append(content, page...)
		}
		b = binary.LittleEndian.AppendUint64(b, p)
	}
	packed := s2.Encode(nil, content)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(packed)))
	return append(b, packed...), nil
}

// zeroPageFlag marks a delta page that is all zeros (its contents are not
// in the entry).
const zeroPageFlag = 1 << 63

// UnmarshalBinary decodes what MarshalBinary wrote. Every length is
// checked (the bytes come from a log); page numbers are checked against
// the machine when the delta is applied.
func (s *SyncPoint) UnmarshalBinary(b []byte) error {
	bad := func(what string) error { return fmt.Errorf("sync point: %s", what) }
	if len(b) < syncHeaderLen || b[0] > syncBranch {
		return bad("truncated or unknown kind")
	}
	s.Delta, s.Branch, s.Branches = b[0] == syncDelta, b[0] == syncBranch, 0
	copy(s.Digest[:], b[1:33])
	s.MemBefore = [2]uint64{binary.LittleEndian.Uint64(b[33:]), binary.LittleEndian.Uint64(b[41:])}
	s.Devices = binary.LittleEndian.Uint64(b[49:])
	nr := int(binary.LittleEndian.Uint16(b[57:]))
	b = b[syncHeaderLen:]
	if nr > maxRegions || len(b) < 8*nr {
		return bad(fmt.Sprintf("%d memory regions", nr))
	}
	s.Regions = make([]uint64, nr)
	for i := range s.Regions {
		s.Regions[i] = binary.LittleEndian.Uint64(b[8*i:])
	}
	b = b[8*nr:]
	s.VCPU, s.Pages, s.Data = nil, nil, nil
	if !s.Delta {
		want := regsLen
		if s.Branch {
			want += 8
		}
		if len(b) != want {
			return bad(fmt.Sprintf("a check with %d bytes of registers", len(b)))
		}
		if s.Branch {
			s.Branches = binary.LittleEndian.Uint64(b[regsLen:])
		}
		_, err := binary.Decode(b[:regsLen], binary.LittleEndian, &s.Regs)
		return err
	}
	if len(b) < 4 {
		return bad("no vCPU state")
	}
	n := uint64(binary.LittleEndian.Uint32(b))
	if n > uint64(len(b)-4) {
		return bad("vCPU state longer than the entry")
	}
	if l, err := s2.DecodedLen(b[4 : 4+n]); err != nil || l > 1<<20 {
		return bad(fmt.Sprintf("vCPU state of %d bytes (%v)", l, err))
	}
	v, err := s2.Decode(nil, b[4:4+n])
	if err != nil {
		return bad("vCPU state: " + err.Error())
	}
	s.VCPU = &VCPUState{}
	if err := json.Unmarshal(v, s.VCPU); err != nil {
		return bad("vCPU state: " + err.Error())
	}
	b = b[4+n:]
	if len(b) < 4 {
		return bad("no page count")
	}
	np := uint64(binary.LittleEndian.Uint32(b))
	b = b[4:]
	if np > maxDeltaPages || np*8+4 > uint64(len(b)) {
		return bad(fmt.Sprintf("%d pages in %d bytes", np, len(b)))
	}
	s.Pages = make([]uint64, np)
	zero := make([]bool, np)
	nonzero := 0
	for i := range s.Pages {
		p := binary.LittleEndian.Uint64(b[8*i:])
		zero[i], s.Pages[i] = p&zeroPageFlag != 0, p&^zeroPageFlag
		if !zero[i] {
			nonzero++
		}
		if i > 0 && s.Pages[i] <= s.Pages[i-1] {
			return bad("page numbers not ascending")
		}
	}
	b = b[8*np:]
	n = uint64(binary.LittleEndian.Uint32(b))
	if n != uint64(len(b)-4) {
		return bad(fmt.Sprintf("a %d-byte page block in %d bytes", n, len(b)-4))
	}
	if l, err := s2.DecodedLen(b[4:]); err != nil || l != nonzero*PageSize {
		return bad(fmt.Sprintf("the page block holds %d bytes, not %d pages (%v)", l, nonzero, err))
	}
	content, err := s2.Decode(nil, b[4:])
	if err != nil || len(content) != nonzero*PageSize {
		return bad(fmt.Sprintf("the page block: %v", err))
	}
	s.Data = make([]byte, int(np)*PageSize)
	k := 0
	for i := range s.Pages {
		if !zero[i] {
			copy(s.Data[i*PageSize:], content[k*PageSize:(k+1)*PageSize])
			k++
		}
	}
	return nil
}

// memHash is the incremental hash of guest memory: a short hash per page
// and a sum of the pages' mixed hashes (two 64-bit lanes), which changes
// in O(1) per page that changed.
type memHash struct {
	page []uint64
	sum  [2]uint64
	// region holds lane 0 of the sum per slice of 1<<regionShift pages.
	region      []uint64
	regionShift uint
}

var zeroPage [PageSize]byte

// hashPage is a short hash of one page; all-zero pages (most of a fresh
// guest) skip SHA-256.
func hashPage(b []byte) uint64 {
	if bytes.Equal(b, zeroPage[:]) {
		return 0x5a17e0
	}
	s := sha256.Sum256(b)
	return binary.LittleEndian.Uint64(s[:])
}

// mixPage spreads page i's hash h over both lanes (splitmix64), so that
// a sum of them depends on which page holds what.
func mixPage(i, h uint64) [2]uint64 {
	f := func(x uint64) uint64 {
		x += 0x9e3779b97f4a7c15
		x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9
		x = (x ^ (x >> 27)) * 0x94d049bb133111eb
		return x ^ (x >> 31)
	}
	x := h ^ bits.RotateLeft64(i*0xd6e8feb86659fd93, 32)
	return [2]uint64{f(x), f(x ^ 0xd1b54a32d192ed03)}
}

func (h *memHash) init(mem []byte) {
	n := len(mem) / PageSize
	h.page = make([]uint64, n)
	h.regionShift = 0
	for n>>h.regionShift > maxRegions {
		h.regionShift++
	}
	h.region = make([]uint64, (n+(1<<h.regionShift)-1)>>h.regionShift)
	h.sum = [2]uint64{}
	for i := range h.page {
		h.page[i] = hashPage(mem[i*PageSize : (i+1)*PageSize])
		m := mixPage(uint64(i), h.page[i])
		h.sum[0] += m[0]
		h.sum[1] += m[1]
		h.region[i>>h.regionShift] += m[0]
	}
}

// rehash brings page i's hash up to date.
func (h *memHash) rehash(mem []byte, i uint64) {
	old := mixPage(i, h.page[i])
	h.page[i] = hashPage(mem[i*PageSize : (i+1)*PageSize])
	m := mixPage(i, h.page[i])
	h.sum[0] += m[0] - old[0]
	h.sum[1] += m[1] - old[1]
	h.region[i>>h.regionShift] += m[0] - old[0]
}

// without is the sum, and the region sums, less the given pages' terms.
func (h *memHash) without(pages []uint64) ([2]uint64, []uint64) {
	s := h.sum
	r := slices.Clone(h.region)
	for _, i := range pages {
		m := mixPage(i, h.page[i])
		s[0] -= m[0]
		s[1] -= m[1]
		r[i>>h.regionShift] -= m[0]
	}
	return s, r
}

// describeRegions names the regions whose sums differ from want's.
func (h *memHash) describeRegions(got, want []uint64) string {
	if len(got) != len(want) {
		return fmt.Sprintf("memory is split into %d regions here, %d in the log", len(got), len(want))
	}
	size := uint64(PageSize) << h.regionShift
	var at []string
	for i := range got {
		if got[i] != want[i] {
			at = append(at, fmt.Sprintf("%#x-%#x", uint64(i)*size, uint64(i+1)*size-1))
		}
	}
	return fmt.Sprintf("%d of %d regions of %d KiB differ: %s", len(at), len(got), size>>10, strings.Join(at, ", "))
}

// syncState is the machine's side of sync points under a journal.
type syncState struct {
	dirty  *DirtySet // pages written since the last sync point
	hash   memHash
	inited bool

	// Recording only.
	lastCheck time.Time
	timer     *time.Timer
	kicked    atomic.Bool // the delta timer fired
	window    bool        // waiting for an interrupt window to take a delta

	// atDelta: the next injection is at a delta point.
	atDelta bool

	// Figures (ExitStats).
	deltas, checks, deltaBytes, branchPoints uint64
}

// syncInit starts dirty tracking and hashes all of memory; on the vCPU
// thread, at the start of a run, so that both sides start from the same
// state.
func (m *Machine) syncInit() error {
	s := m.sync
	if s.inited {
		return nil
	}
	if s.dirty == nil {
		if !m.dirtyLog {
			if err := m.setDirtyLog(true); err != nil {
				return err
			}
		}
		if err := m.collectDirty(); err != nil {
			return err
		}
		s.dirty = &DirtySet{m: m, bits: make([]uint64, m.mem.BitmapWords()), open: true}
		m.dirtySets = append(m.dirtySets, s.dirty)
	} else if err := m.collectDirty(); err != nil {
		return err
	}
	clear(s.dirty.bits)
	s.hash.init(m.mem.host())
	s.lastCheck = time.Now()
	s.inited = true
	return nil
}

// syncDirty rehashes the pages written since the last sync point and
// returns their numbers.
func (m *Machine) syncDirty() ([]uint64, error) {
	if err := m.collectDirty(); err != nil {
		return nil, err
	}
	s := m.sync
	mem := m.mem.host()
	var pages []uint64
	for w, word := range s.dirty.bits {
		for word != 0 {
			i := uint64(w)*64 + uint64(bits.TrailingZeros64(word))
			word &= word - 1
			s.hash.rehash(mem, i)
			pages = append(pages, i)
		}
	}
	clear(s.dirty.bits)
	return pages, nil
}

// syncDigestParts is the digest of a sync point: the registers Digest
// covers, the memory sum, and the devices' state with guest time (which a
// delta does not carry: devices change only at exits, so a replay that
// agrees here agrees everywhere the log does not say otherwise). The
// general registers and a short hash of the devices' state come with it,
// for reports.
func (m *Machine) syncDigestParts() ([32]byte, kvm.Regs, uint64, error) {
	r, ctl, err := m.regsAsTheyAre()
	if err != nil {
		return [32]byte{}, r, 0, err
	}
	devs, err := json.Marshal(m.saveDevices())
	if err != nil {
		return [32]byte{}, r, 0, err
	}
	dh := sha256.Sum256(devs)
	h := sha256.New()
	binary.Write(h, binary.LittleEndian, r)
	binary.Write(h, binary.LittleEndian, ctl)
	binary.Write(h, binary.LittleEndian, m.sync.hash.sum)
	h.Write(devs)
	var d [32]byte
	copy(d[:], h.Sum(nil))
	return d, r, binary.LittleEndian.Uint64(dh[:]), nil
}

// maxDeltaPages keeps a delta within a log entry (64 MiB); a guest that
// wrote more since the last sync point waits for its next exit instead.
const maxDeltaPages = (64<<20 - 64<<10) / (PageSize + 8)

// takeSyncPoint makes a sync point at p: a delta of what changed since the
// last one, or a check.
func (m *Machine) takeSyncPoint(p Position, delta bool) (*SyncPoint, error) {
	pages, err := m.syncDirty()
	if err != nil {
		return nil, err
	}
	sp := &SyncPoint{Pos: p, Delta: delta}
	if delta {
		if len(pages) > maxDeltaPages {
			return nil, fmt.Errorf("state delta of %d pages: more than a log entry holds", len(pages))
		}
		if sp.VCPU, err = m.SaveVCPU(); err != nil {
			return nil, err
		}
		sp.Pages = pages
		mem := m.mem.host()
		sp.Data = make([]byte, 0, len(pages)*PageSize)
		for _, i := range pages {
			sp.Data = append(sp.Data, mem[i*PageSize:(i+1)*PageSize]...)
		}
		sp.MemBefore, sp.Regions = m.sync.hash.without(pages)
	} else {
		sp.MemBefore, sp.Regions = m.sync.hash.sum, slices.Clone(m.sync.hash.region)
	}
	var regs kvm.Regs
	if sp.Digest, regs, sp.Devices, err = m.syncDigestParts(); err != nil {
		return nil, err
	}
	if !delta {
		sp.Regs = regs
	}
	return sp, nil
}

// checkSyncPoint compares the replay's state with a logged check.
func (m *Machine) checkSyncPoint(sp *SyncPoint) error {
	if err := m.compareSyncPoint(sp); err != nil {
		return err
	}
	m.sync.checks++
	return nil
}

// compareSyncPoint compares the replay's state with a logged check or
// branch point.
func (m *Machine) compareSyncPoint(sp *SyncPoint) error {
	if _, err := m.syncDirty(); err != nil {
		return err
	}
	if m.sync.hash.sum != sp.MemBefore {
		return &SyncMismatchError{Pos: sp.Pos, Detail: "guest memory differs: " + m.sync.hash.describeRegions(m.sync.hash.region, sp.Regions)}
	}
	d, regs, devs, err := m.syncDigestParts()
	if err != nil {
		return err
	}
	if d != sp.Digest {
		what := regsDiff(&regs, &sp.Regs)
		if devs != sp.Devices {
			what = append(what, "the devices' state or guest time")
		}
		if len(what) == 0 {
			what = append(what, "the control registers")
		}
		return &SyncMismatchError{Pos: sp.Pos, Detail: "memory agrees, but these differ: " + strings.Join(what, "; ")}
	}
	return nil
}

// applyDelta checks that the replay agrees with the recording outside the
// delta's pages, then takes the delta's pages and vCPU state, and checks
// the result against the recorded digest.
func (m *Machine) applyDelta(sp *SyncPoint) error {
	// The replay stands at an exit whose I/O KVM completes on the next
	// KVM_RUN (a read's data into a register, an emulated instruction's
	// end): done after the delta's registers are in, that would change
	// them. The recording's guest completed it before the kick.
	if err := m.completePendingIO(); err != nil {
		return fmt.Errorf("state delta at %v: %w", sp.Pos, err)
	}
	if _, err := m.syncDirty(); err != nil {
		return err
	}
	npages := uint64(len(m.sync.hash.page))
	for _, i := range sp.Pages {
		if i >= npages {
			return fmt.Errorf("state delta at %v: page %#x is outside the guest's %d pages", sp.Pos, i, npages)
		}
	}
	if sum, regions := m.sync.hash.without(sp.Pages); sum != sp.MemBefore {
		return &SyncMismatchError{Pos: sp.Pos, Detail: fmt.Sprintf("guest memory outside the delta's %d pages differs before the delta: %s",
			len(sp.Pages), m.sync.hash.describeRegions(regions, sp.Regions))}
	}
	mem := m.mem.host()
	for k, i := range sp.Pages {
		copy(mem[i*PageSize:(i+1)*PageSize], sp.Data[k*PageSize:(k+1)*PageSize])
		m.sync.hash.rehash(mem, i)
		// Other dirty sets (a snapshot, a live transfer of this replica)
		// must see the page.
		m.mem.MarkDirty(i*PageSize, PageSize)
	}
	if err := m.RestoreVCPU(sp.VCPU); err != nil {
		return fmt.Errorf("state delta at %v: %w", sp.Pos, err)
	}
	// The delta rewrote guest page tables behind KVM's back, and the
	// TLB flushes the recording's guest made on the way were skipped: KVM
	// must forget every translation it holds (shadow pages on the lab
	// host, EPT and the TLB on bare metal).
	if err := m.zapTranslations(); err != nil {
		return fmt.Errorf("state delta at %v: %w", sp.Pos, err)
	}
	// zapTranslations collected the dirty pages, which since syncDirty
	// above are only the delta's, already hashed: our set need not
	// hash them again at the next sync point.
	clear(m.sync.dirty.bits)
	d, _, devs, err := m.syncDigestParts()
	if err != nil {
		return err
	}
	if d != sp.Digest {
		what := "the devices' state or guest time" // memory and registers came with the delta
		if devs == sp.Devices {
			what = "the control registers"
		}
		return &SyncMismatchError{Pos: sp.Pos, Detail: "after the delta, " + what + " differ from the recording's"}
	}
	m.sync.deltas++
	m.sync.deltaBytes += uint64(len(sp.Data))
	m.sync.atDelta = true
	return nil
}

// deltaDue reports whether a recording guest has an interrupt due that a
// state delta should deliver: one pending at the PIC, a PIT edge due by
// the host's clock, or queued input.
func (m *Machine) deltaDue() bool {
	if m.PIC.Pending() {
		return true
	}
	if m.hasNextDue && m.hostClock.Now() >= m.nextDue {
		return true
	}
	return m.inputs.pending(m.UART.RxSpace())
}

// armDelta sets the delta timer before the guest runs: DeltaAfter past the
// next PIT edge, or past now if something is due already.
func (m *Machine) armDelta() {
	s := m.sync
	var at time.Duration
	switch {
	case m.PIC.Pending() || m.inputs.pending(m.UART.RxSpace()):
		at = m.hostClock.Now()
	case m.hasNextDue:
		at = max(m.nextDue, m.hostClock.Now())
	default:
		return
	}
	d := at + m.cfg.DeltaAfter - m.hostClock.Now()
	if s.timer == nil {
		s.timer = time.AfterFunc(d, func() {
			s.kicked.Store(true)
			m.kick()
		})
		return
	}
	s.timer.Reset(d)
}

func (m *Machine) disarmDelta() {
	if m.sync.timer != nil {
		m.sync.timer.Stop()
	}
}

// deltaReady reports whether the guest can take an interrupt where it
// stands (after a kick or an interrupt-window exit), from its state: after
// a kick (KVM_EXIT_INTR) the lab host leaves kvm_run's
// ready_for_interrupt_injection and if_flag at 0.
func (m *Machine) deltaReady() (bool, error) {
	r, err := m.cpu.GetRegs()
	if err != nil {
		return false, err
	}
	if r.RFLAGS&rflagsIF == 0 {
		if m.policy.Host != HostLabPVM {
			return false, nil
		}
		// The lab host reports IF=0 for a guest kicked in user mode,
		// where IF is always 1 there (CLI at CPL3 faults, POPF cannot
		// clear it).
		sr, err := m.cpu.GetSregs()
		if err != nil {
			return false, err
		}
		if sr.CS.DPL != 3 {
			return false, nil
		}
	}
	ev, err := m.cpu.GetVCPUEvents()
	if err != nil {
		return false, err
	}
	return ev.Interrupt.Shadow == 0 && ev.Interrupt.Injected == 0 && ev.Exception.Injected == 0 &&
		ev.Exception.Pending == 0 && ev.NMI.Injected == 0, nil
}

const rflagsIF = 1 << 9

// zapTranslations makes KVM drop every translation it built from guest
// memory (shadow or EPT page tables, and with them the guest's TLB) by
// deleting the RAM slot and adding it again. Pages written since the last
// collection are collected first: the slot's dirty log goes with it.
func (m *Machine) zapTranslations() error {
	var flags uint32
	if m.dirtyLog {
		if err := m.collectDirty(); err != nil {
			return err
		}
		flags = kvm.MemLogDirtyPages
	}
	region := kvm.UserMemoryRegion{Slot: 0, UserspaceAddr: kvm.HostAddr(m.mem.host())}
	if err := m.vm.SetUserMemoryRegion(region); err != nil {
		return fmt.Errorf("dropping KVM's translations (removing the RAM slot): %w", err)
	}
	region.Flags, region.MemorySize = flags, m.mem.Size()
	if err := m.vm.SetUserMemoryRegion(region); err != nil {
		return fmt.Errorf("dropping KVM's translations (adding the RAM slot again): %w", err)
	}
	return nil
}
