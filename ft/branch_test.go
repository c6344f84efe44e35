package ft_test

import (
	"errors"
	"testing"
	"time"

	"github.com/gokvm-ft/gokvm-ft/ft/pmu"
	"github.com/gokvm-ft/gokvm-ft/internal/tinyguest"
	"github.com/gokvm-ft/gokvm-ft/kvm"
	"github.com/gokvm-ft/gokvm-ft/machine"
)

// branchGuest runs in kernel mode without exits of its own, with
// interrupts on (REP STOSB inside: positions within one instruction) and
// off in turn, and counts its own conditional branches in R15 (an `inc
// %r15` before each): the simulated branch counter regCounter reads it.
// Its tick handler's EOI is the only deterministic exit. It stops after 30
// ticks.
var branchGuest = `
_start:
` + tinyguest.PICInit(0xfe) + tinyguest.PIT1kHz + `
	xor %r15, %r15
	sti
1:	mov $200, %ebx
2:	incq 0x90000
	mov $0x91000, %edi
	mov $48, %ecx
	mov %bl, %al
	rep stosb
	inc %r15
	dec %ebx
	jnz 2b
	cli
	mov $200, %ebx
3:	incq 0x90010
	inc %r15
	dec %ebx
	jnz 3b
	sti
	inc %r15
	cmpq $30, 0x90008
	jb 1b
	mov $1, %eax
` + tinyguest.ExitWithEAX + tinyguest.CountTicks + `
`

// regCounter is the simulated branch counter of the lab host, which has no
// PMU: the guest's R15. It has no overflow, so the seeker reaches every
// target by the breakpoint on its RIP and single steps, which this host
// honours at CPL0 (TestHostDebugGuest): only the count is simulated; the
// seeking is KVM's.
type regCounter struct{ cpu *kvm.VCPU }

func (c regCounter) Branches() (uint64, error) {
	r, err := c.cpu.GetRegs()
	return r.R15, err
}

func (regCounter) ArmOverflow(uint64) error {
	return errors.New("the simulated counter has no overflow")
}

func (regCounter) Disarm() error { return nil }

// regPositions is a machine's position source on regCounter
// (machine.Config.Positions).
func regPositions(cpu *kvm.VCPU) (machine.PositionSource, error) {
	return &pmu.Source{
		CPU:  cpu,
		Skid: 1 << 40, // never arm the overflow it does not have
		Open: func() (pmu.Counter, func() error, error) {
			return regCounter{cpu}, func() error { return nil }, nil
		},
	}, nil
}

// TestBranchPointReplay records a guest that makes no exits of its own
// with a position source (a branch counter): due ticks are injected where
// the delta kick stops the guest, logged as branch points (a digest, no
// pages) instead of state deltas, and the replay runs its guest to each
// one (breakpoint and single steps) and checks the digest there. Every
// replay must end in the recording's state; the same guest recorded with
// state deltas gives the figures to compare.
func TestBranchPointReplay(t *testing.T) {
	prog, err := tinyguest.Assemble(t.TempDir(), branchGuest)
	if err != nil {
		t.Fatal(err)
	}
	rounds := 20
	if testing.Short() {
		rounds = 3
	}
	var points, checks, logBytes uint64
	var rec, rep time.Duration
	for i := range rounds {
		r := recordSyncWith(t, prog, true, true, regPositions)
		if r.stats.BranchPoints == 0 || r.stats.Deltas != 0 {
			t.Fatalf("round %d: recording took %d branch points and %d state deltas; want branch points only", i, r.stats.BranchPoints, r.stats.Deltas)
		}
		got, err := replaySyncWith(t, prog, true, r.log, nil, regPositions)
		if err != nil {
			t.Fatalf("round %d: replay: %v", i, err)
		}
		if got.stop != r.stop || got.digest != r.digest {
			t.Fatalf("round %d: replay stopped with %v digest %x, recording %v digest %x", i, got.stop, got.digest[:8], r.stop, r.digest[:8])
		}
		if got.stats.BranchPoints != r.stats.BranchPoints || got.stats.SyncChecks != r.stats.SyncChecks {
			t.Fatalf("round %d: %d branch points and %d checks recorded, %d and %d replayed", i, r.stats.BranchPoints, r.stats.SyncChecks, got.stats.BranchPoints, got.stats.SyncChecks)
		}
		points += r.stats.BranchPoints
		checks += r.stats.SyncChecks
		logBytes += uint64(len(r.log))
		rec += r.took
		rep += got.took
	}
	t.Logf("branch counter: %d rounds identical; %d branch points (%.0f%% of %d sync points), log %.0f KiB/s; replay took %.2f of the recording's time",
		rounds, points, 100*float64(points)/float64(points+checks), points+checks, float64(logBytes)/1024/rec.Seconds(), rep.Seconds()/rec.Seconds())

	// The same guest with state deltas instead.
	d := recordSync(t, prog, true, true)
	got, err := replaySync(t, prog, true, d.log, nil)
	if err != nil || got.digest != d.digest {
		t.Fatalf("state deltas: replay %v, digest %x want %x", err, got.digest[:8], d.digest[:8])
	}
	t.Logf("state deltas: %d deltas of %.1f KiB of pages, log %.0f KiB/s; replay took %.2f of the recording's time",
		d.stats.Deltas, float64(d.stats.DeltaBytes)/1024/float64(max(d.stats.Deltas, 1)), float64(len(d.log))/1024/d.took.Seconds(), got.took.Seconds()/d.took.Seconds())
}

// TestBranchPointNeedsSource: a log with branch points replayed without a
// position source stops with a clear error at the first one, and a replay
// whose counter is off by one branch does not pass a branch point.
func TestBranchPointNeedsSource(t *testing.T) {
	prog, err := tinyguest.Assemble(t.TempDir(), branchGuest)
	if err != nil {
		t.Fatal(err)
	}
	r := recordSyncWith(t, prog, true, true, regPositions)
	if _, err := replaySync(t, prog, true, r.log, nil); !errors.Is(err, machine.ErrNoPositionSource) {
		t.Fatalf("replay without a position source: %v, want %v", err, machine.ErrNoPositionSource)
	}
	// One branch more in the guest's count after exit 20: the seek lands
	// a loop iteration early (or overshoots), and the digest says so.
	skew := func(m *machine.Machine) {
		regs, err := m.VCPU().GetRegs()
		if err != nil {
			t.Error(err)
			return
		}
		regs.R15++
		if err := m.VCPU().SetRegs(regs); err != nil {
			t.Error(err)
		}
	}
	_, err = replaySyncWith(t, prog, true, r.log, skew, regPositions)
	var mismatch *machine.SyncMismatchError
	if !errors.As(err, &mismatch) {
		t.Fatalf("replay with a skewed counter: %v, want a sync point mismatch", err)
	}
	t.Logf("skewed counter caught: %v", err)
}

// TestPairBranchPoints: a protected pair whose VMMs have a position source
// (the simulated counter): the primary's branch points travel over the
// logging channel and the backup, following live, runs its guest to each
// one and ends in the primary's state.
func TestPairBranchPoints(t *testing.T) {
	prog, err := tinyguest.Assemble(t.TempDir(), branchGuest)
	if err != nil {
		t.Fatal(err)
	}
	r := newPairWith(t, prog, regPositions)
	p, b := r.start(t)
	wantExit(t, "primary", <-p)
	res := <-b
	if res.err != nil || (res.stop.Kind != machine.StopLogEnd && res.stop.Kind != machine.StopTestExit) {
		t.Fatalf("backup: %v, %v", res.stop, res.err)
	}
	ps, bs := r.primary.M.Stats(), r.backup.M.Stats()
	if ps.BranchPoints == 0 || ps.Deltas != 0 || bs.BranchPoints != ps.BranchPoints || bs.Deltas != 0 {
		t.Fatalf("primary: %d branch points, %d deltas; backup: %d branch points, %d deltas", ps.BranchPoints, ps.Deltas, bs.BranchPoints, bs.Deltas)
	}
	t.Logf("primary took %d branch points, the backup reached them all; %d digest checks passed; %d log bytes", ps.BranchPoints, bs.SyncChecks, r.pConn.Sent())
}
