package machine

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"

	"github.com/gokvm-ft/gokvm-ft/kvm"
)

// Digest is a SHA-256 of the guest-visible state: general registers, the
// segment and control registers that matter, and all of memory. Recorder
// and replayer compare it to prove they reached the same state.
func (m *Machine) Digest() ([32]byte, error) {
	r, ctl, err := m.digestRegs()
	if err != nil {
		return [32]byte{}, err
	}
	h := sha256.New()
	binary.Write(h, binary.LittleEndian, r)
	binary.Write(h, binary.LittleEndian, ctl)
	mem, _ := m.mem.Slice(0, m.mem.Size())
	h.Write(mem)
	var d [32]byte
	copy(d[:], h.Sum(nil))
	return d, nil
}

// digestRegs completes a pending exit and returns what Digest covers of
// the vCPU.
func (m *Machine) digestRegs() (kvm.Regs, [6]uint64, error) {
	if err := m.completeExit(); err != nil {
		return kvm.Regs{}, [6]uint64{}, err
	}
	return m.regsAsTheyAre()
}

// regsAsTheyAre is digestRegs without completing an exit first: what a
// sync point digests, since recorder and replayer stand at the same place
// in the same exit, and completing it would run the guest's instruction
// emulator (which on the lab host sometimes goes on past the exit).
func (m *Machine) regsAsTheyAre() (kvm.Regs, [6]uint64, error) {
	r, err := m.cpu.GetRegs()
	if err != nil {
		return kvm.Regs{}, [6]uint64{}, err
	}
	s, err := m.cpu.GetSregs()
	if err != nil {
		return kvm.Regs{}, [6]uint64{}, err
	}
	return r, [6]uint64{s.CR0, s.CR2, s.CR3, s.CR4, s.EFER, uint64(s.CS.Selector)}, nil
}

// StateSummary is what Digest covers, kept apart so that two machines whose
// digests differ can say where: the registers, and a short hash of each
// chunk of memory.
type StateSummary struct {
	Regs      kvm.Regs
	Control   [6]uint64 // CR0, CR2, CR3, CR4, EFER, CS selector
	ChunkSize uint64    // bytes of memory per hash: a page, or more for large guests
	Chunks    []uint64  // first 8 bytes of each chunk's SHA-256
}

// maxSummaryChunks keeps a summary within 512 KiB (a log entry).
const maxSummaryChunks = 64 << 10

// Summary returns m's StateSummary.
func (m *Machine) Summary() (*StateSummary, error) {
	r, ctl, err := m.digestRegs()
	if err != nil {
		return nil, err
	}
	s := &StateSummary{Regs: r, Control: ctl, ChunkSize: PageSize}
	size := m.mem.Size()
	for size/s.ChunkSize > maxSummaryChunks {
		s.ChunkSize *= 2
	}
	mem, _ := m.mem.Slice(0, size)
	for off := uint64(0); off < size; off += s.ChunkSize {
		sum := sha256.Sum256(mem[off:min(off+s.ChunkSize, size)])
		s.Chunks = append(s.Chunks, binary.LittleEndian.Uint64(sum[:8]))
	}
	return s, nil
}

const summaryHeader = 18*8 + 6*8 + 8 + 8 // regs, control, chunk size, chunk count

// MarshalBinary encodes s (little-endian).
func (s *StateSummary) MarshalBinary() ([]byte, error) {
	b := make([]byte, 0, summaryHeader+8*len(s.Chunks))
	b, _ = binary.Append(b, binary.LittleEndian, s.Regs)
	b, _ = binary.Append(b, binary.LittleEndian, s.Control)
	b = binary.LittleEndian.AppendUint64(b, s.ChunkSize)
	b = binary.LittleEndian.AppendUint64(b, uint64(len(s.Chunks)))
	for _, c := range s.Chunks {
		b = binary.LittleEndian.AppendUint64(b, c)
	}
	return b, nil
}

// UnmarshalBinary decodes what MarshalBinary wrote, checking every length
// (it comes from a log file).
func (s *StateSummary) UnmarshalBinary(b []byte) error {
	if len(b) < summaryHeader {
		return errors.New("state summary: truncated")
	}
	if _, err := binary.Decode(b, binary.LittleEndian, &s.Regs); err != nil {
		return fmt.Errorf("state summary: %w", err)
	}
	if _, err := binary.Decode(b[18*8:], binary.LittleEndian, &s.Control); err != nil {
		return fmt.Errorf("state summary: %w", err)
	}
	s.ChunkSize = binary.LittleEndian.Uint64(b[24*8:])
	n := binary.LittleEndian.Uint64(b[25*8:])
	if s.ChunkSize == 0 || n > maxSummaryChunks || uint64(len(b)-summaryHeader) != 8*n {
		return fmt.Errorf("state summary: %d chunks of %d bytes in %d bytes", n, s.ChunkSize, len(b))
	}
	s.Chunks = make([]uint64, n)
	for i := range s.Chunks {
		s.Chunks[i] = binary.LittleEndian.Uint64(b[summaryHeader+8*i:])
	}
	return nil
}

// Diff describes how s differs from want: registers by name, memory as the
// guest-physical ranges whose hashes differ (the first few). Empty if they
// agree.
func (s *StateSummary) Diff(want *StateSummary) string {
	out := regsDiff(&s.Regs, &want.Regs)
	for i, name := range []string{"cr0", "cr2", "cr3", "cr4", "efer", "cs"} {
		if s.Control[i] != want.Control[i] {
			out = append(out, fmt.Sprintf("%s %#x (want %#x)", name, s.Control[i], want.Control[i]))
		}
	}
	if s.ChunkSize != want.ChunkSize || len(s.Chunks) != len(want.Chunks) {
		return strings.Join(append(out, fmt.Sprintf("memory summarized differently (%d chunks of %d bytes, want %d of %d)",
			len(s.Chunks), s.ChunkSize, len(want.Chunks), want.ChunkSize)), "; ")
	}
	var ranges []string
	differ := 0
	for i := range s.Chunks {
		if s.Chunks[i] != want.Chunks[i] {
			differ++
			if len(ranges) < 8 {
				ranges = append(ranges, fmt.Sprintf("%#x", uint64(i)*s.ChunkSize))
			}
		}
	}
	if differ > 0 {
		out = append(out, fmt.Sprintf("memory differs in %d chunks of %d bytes, at %s", differ, s.ChunkSize, strings.Join(ranges, ", ")))
	}
	return strings.Join(out, "; ")
}

// regsDiff names the general registers that differ, with both values.
func regsDiff(got, want *kvm.Regs) []string {
	var out []string
	names := []string{"rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags"}
	g, w := regWords(got), regWords(want)
	for i, name := range names {
		if g[i] != w[i] {
			out = append(out, fmt.Sprintf("%s %#x (want %#x)", name, g[i], w[i]))
		}
	}
	return out
}

func regWords(r *kvm.Regs) [18]uint64 {
	return [18]uint64{r.RAX, r.RBX, r.RCX, r.RDX, r.RSI, r.RDI, r.RSP, r.RBP, r.R8, r.R9, r.R10, r.R11, r.R12, r.R13, r.R14, r.R15, r.RIP, r.RFLAGS}
}
