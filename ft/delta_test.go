package ft_test

import (
	"bytes"
	"context"
	"errors"
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gokvm-ft/gokvm-ft/ft"
	"github.com/gokvm-ft/gokvm-ft/internal/tinyguest"
	"github.com/gokvm-ft/gokvm-ft/kvm"
	"github.com/gokvm-ft/gokvm-ft/machine"
)

// cpuBoundGuest counts in user mode and never exits on its own: PIT ticks
// (1 kHz) reach it only through state deltas; its tick handler's EOI is
// the only deterministic exit. It stops after 50 ticks.
var cpuBoundGuest = `
_start:
` + tinyguest.PICInit(0xfe) + tinyguest.PIT1kHz + `
` + tinyguest.ToUser + `
user:
	incq 0x90000
	cmpq $50, 0x90008
	jb user
	mov $1, %eax
` + tinyguest.ExitWithEAX + `
vec_32:
	push %rax
	incq 0x90008
	mov 0x90000, %rax
	mov %rax, 0x90100(,%rax,1)
	mov $0x20, %al
	out %al, $0x20
	pop %rax
	iretq
`

// ifGuest runs in kernel mode, alternating stretches with interrupts off
// and on and no exits in either: a delta kick that finds interrupts off
// must wait for an interrupt window. It stops after 30 ticks.
var ifGuest = `
_start:
` + tinyguest.PICInit(0xfe) + tinyguest.PIT1kHz + `
1:	cli
	mov $2000, %ecx
2:	incq 0x90000
	dec %ecx
	jnz 2b
	sti
	mov $2000, %ecx
3:	incq 0x90010
	dec %ecx
	jnz 3b
	cmpq $30, 0x90008
	jb 1b
	mov $1, %eax
` + tinyguest.ExitWithEAX + tinyguest.CountTicks + `
`

// deltaConfig is a machine with sync points: deltas after 2 ms (quick
// tests), digest checks every 10 ms.
func deltaConfig(j machine.Journal, deltas bool) machine.Config {
	// The RTC's starting time is an input too (gokvm-ft record logs it).
	wall := time.Date(2026, 11, 30, 0, 0, 0, 0, time.UTC)
	cfg := machine.Config{MemorySize: 2 << 20, TestExit: true, Host: machine.DetectHostKind(), Journal: j, SyncPoints: true, DigestEvery: 10 * time.Millisecond, WallTime: wall}
	if deltas {
		cfg.DeltaAfter = 2 * time.Millisecond
	}
	return cfg
}

func newDeltaMachine(t *testing.T, p *tinyguest.Program, cfg machine.Config, kernel bool) *machine.Machine {
	t.Helper()
	if _, err := os.Stat("/dev/kvm"); err != nil {
		t.Skip("no /dev/kvm")
	}
	m, err := machine.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	if err := tinyguest.Load(m.Memory(), m.VCPU(), p, tinyguest.Options{Kernel: kernel}); err != nil {
		t.Fatal(err)
	}
	return m
}

type syncRun struct {
	stop   machine.Stop
	digest [32]byte
	took   time.Duration
	stats  machine.ExitStats
	log    []byte
}

// recordSync records p with sync points (and deltas if asked).
func recordSync(t *testing.T, p *tinyguest.Program, kernel, deltas bool) syncRun {
	return recordSyncWith(t, p, kernel, deltas, nil)
}

// recordSyncWith is recordSync on a machine whose position source, if
// any, positions makes (machine.Config.Positions).
func recordSyncWith(t *testing.T, p *tinyguest.Program, kernel, deltas bool, positions func(*kvm.VCPU) (machine.PositionSource, error)) syncRun {
	t.Helper()
	var log bytes.Buffer
	rec, err := ft.NewRecorder(&log, nil)
	if err != nil {
		t.Fatal(err)
	}
	cfg := deltaConfig(rec, deltas)
	cfg.Positions = positions
	m := newDeltaMachine(t, p, cfg, kernel)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	start := time.Now()
	stop, err := m.Run(ctx)
	took := time.Since(start)
	if err != nil {
		t.Fatal(err)
	}
	if stop.Kind != machine.StopTestExit || stop.Code != 1 {
		t.Fatalf("recording stopped with %v", stop)
	}
	if err := rec.Finish(m); err != nil {
		t.Fatal(err)
	}
	d, err := m.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return syncRun{stop, d, took, m.Stats(), log.Bytes()}
}

// replaySync replays a log with sync points; corrupt, if set, runs on the
// vCPU thread after the replay's 20th deterministic exit.
func replaySync(t *testing.T, p *tinyguest.Program, kernel bool, log []byte, corrupt func(*machine.Machine)) (syncRun, error) {
	return replaySyncWith(t, p, kernel, log, corrupt, nil)
}

// replaySyncWith is replaySync on a machine whose position source, if
// any, positions makes.
func replaySyncWith(t *testing.T, p *tinyguest.Program, kernel bool, log []byte, corrupt func(*machine.Machine), positions func(*kvm.VCPU) (machine.PositionSource, error)) (syncRun, error) {
	t.Helper()
	rep, err := ft.NewReplayer(bytes.NewReader(log))
	if err != nil {
		t.Fatal(err)
	}
	cfg := deltaConfig(rep, false)
	var m *machine.Machine
	if corrupt != nil {
		cfg.OnExit = func(ex machine.Exit) {
			if ex.Count == 20 {
				corrupt(m)
			}
		}
	}
	cfg.Positions = positions
	m = newDeltaMachine(t, p, cfg, kernel)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	start := time.Now()
	stop, err := m.Run(ctx)
	took := time.Since(start)
	if err != nil {
		return syncRun{}, err
	}
	if err := rep.Verify(m); err != nil {
		return syncRun{}, err
	}
	d, _ := m.Digest()
	return syncRun{stop, d, took, m.Stats(), nil}, nil
}

// TestDeltaReplay records guests that make (almost) no deterministic exits
// 20 times each, with the host loaded during the recording or the replay,
// and replays them: timer ticks reach the guests through state deltas, and
// every replay passes every sync point (digest checks and the checks
// before and after each delta) and ends in the recording's state. The
// exit-rich busy guest is recorded with deltas allowed too, for the
// fraction of its sync points that are deltas.
func TestDeltaReplay(t *testing.T) {
	ifProg, err := tinyguest.Assemble(t.TempDir(), ifGuest)
	if err != nil {
		t.Fatal(err)
	}
	cpuProg, err := tinyguest.Assemble(t.TempDir(), cpuBoundGuest)
	if err != nil {
		t.Fatal(err)
	}
	rounds := 20
	if testing.Short() {
		rounds = 3
	}
	for _, w := range []struct {
		name   string
		prog   *tinyguest.Program
		kernel bool
	}{
		{"CPU-bound user loop", cpuProg, false},
		{"kernel loop, interrupts off and on", ifProg, true},
	} {
		var deltas, checks, bytes, logBytes uint64
		var rec, rep time.Duration
		for i := 0; i < rounds; i++ {
			load := func() func() {
				stop := make(chan struct{})
				wg := perturb(stop)
				return func() { close(stop); wg.Wait() }
			}
			var unload func()
			if i%2 == 1 {
				unload = load()
			}
			r := recordSync(t, w.prog, w.kernel, true)
			if unload != nil {
				unload()
			} else {
				unload = load()
			}
			got, err := replaySync(t, w.prog, w.kernel, r.log, nil)
			if i%2 == 0 {
				unload()
			}
			if err != nil {
				t.Fatalf("%s, round %d: replay: %v", w.name, i, err)
			}
			if got.stop != r.stop || got.digest != r.digest {
				t.Fatalf("%s, round %d: replay stopped with %v digest %x, recording %v digest %x", w.name, i, got.stop, got.digest[:8], r.stop, r.digest[:8])
			}
			if r.stats.Deltas == 0 || got.stats.Deltas != r.stats.Deltas || got.stats.SyncChecks != r.stats.SyncChecks {
				t.Fatalf("%s, round %d: %d deltas and %d checks recorded, %d and %d replayed", w.name, i, r.stats.Deltas, r.stats.SyncChecks, got.stats.Deltas, got.stats.SyncChecks)
			}
			deltas += r.stats.Deltas
			checks += r.stats.SyncChecks
			bytes += r.stats.DeltaBytes
			logBytes += uint64(len(r.log))
			rec += r.took
			rep += got.took
		}
		t.Logf("%s: %d rounds identical; %d state deltas (%.0f%% of %d sync points), %.1f KiB of pages each, log %.0f KiB/s; replay took %.2f of the recording's time",
			w.name, rounds, deltas, 100*float64(deltas)/float64(deltas+checks), deltas+checks, float64(bytes)/1024/float64(deltas),
			float64(logBytes)/1024/rec.Seconds(), rep.Seconds()/rec.Seconds())
	}
	// The exit-rich busy guest with deltas allowed: few are needed.
	r := recordSyncBusy(t)
	t.Logf("busy guest (exits every ~100 us), deltas allowed: %d state deltas of %d sync points (%.0f%%)",
		r.Deltas, r.Deltas+r.SyncChecks, 100*float64(r.Deltas)/float64(max(r.Deltas+r.SyncChecks, 1)))
}

// recordSyncBusy records and replays the busy guest of TestRecordReplay
// with sync points and deltas on, and returns the recording's figures.
func recordSyncBusy(t *testing.T) machine.ExitStats {
	var log bytes.Buffer
	rec, err := ft.NewRecorder(&log, nil)
	if err != nil {
		t.Fatal(err)
	}
	m := newDeltaMachine(t, prog, deltaConfig(rec, true), true)
	rng := rand.New(rand.NewSource(1))
	typeWhenReady(m, 'a', func(int) time.Duration { return time.Duration(rng.Intn(8000)) * time.Microsecond })
	stop, err := m.Run(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if err := rec.Finish(m); err != nil {
		t.Fatal(err)
	}
	want, _ := m.Digest()
	got, err := replaySync(t, prog, true, log.Bytes(), nil)
	if err != nil || got.stop != stop || got.digest != want {
		t.Fatalf("busy guest with deltas: replay %v, %v; recording %v", got.stop, err, stop)
	}
	return m.Stats()
}

// TestDeltaReplayCatchesCorruption: one byte of guest memory changed during
// a replay, in a page no later delta carries, is caught at the next sync
// point, with its position.
func TestDeltaReplayCatchesCorruption(t *testing.T) {
	p, err := tinyguest.Assemble(t.TempDir(), cpuBoundGuest)
	if err != nil {
		t.Fatal(err)
	}
	r := recordSync(t, p, false, true)
	_, err = replaySync(t, p, false, r.log, func(m *machine.Machine) {
		// Far from the guest's code, stack and data: no delta resends it.
		m.Memory().WriteAt([]byte{0x42}, 0x1c0123)
	})
	var mis *machine.SyncMismatchError
	if !errors.As(err, &mis) {
		t.Fatalf("replay with a corrupted byte: %v; want a sync point mismatch", err)
	}
	t.Logf("caught: %v", err)
}

// TestDeltaFollowFile replays the CPU-bound guest from its log file while
// the recorder still writes it: the replayer takes each delta as it
// arrives and never runs past what the log covers.
func TestDeltaFollowFile(t *testing.T) {
	p, err := tinyguest.Assemble(t.TempDir(), cpuBoundGuest)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "live.ftlog")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	rec, err := ft.NewRecorder(f, nil)
	if err != nil {
		t.Fatal(err)
	}
	rec.FlushEvery = time.Millisecond
	src := newDeltaMachine(t, p, deltaConfig(rec, true), false)
	stopWaiting := make(chan struct{})
	defer close(stopWaiting)
	type result struct {
		digest [32]byte
		err    error
	}
	done := make(chan result, 1)
	go func() {
		in, err := os.Open(path)
		if err != nil {
			done <- result{err: err}
			return
		}
		defer in.Close()
		rep, err := ft.NewFollowingReplayer(in, time.Millisecond, stopWaiting)
		if err != nil {
			done <- result{err: err}
			return
		}
		m := newDeltaMachine(t, p, deltaConfig(rep, false), false)
		_, err = m.Run(context.Background())
		if err == nil {
			err = rep.Verify(m)
		}
		d, _ := m.Digest()
		done <- result{d, err}
	}()
	if _, err := src.Run(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := rec.Finish(src); err != nil {
		t.Fatal(err)
	}
	want, _ := src.Digest()
	select {
	case r := <-done:
		if r.err != nil || r.digest != want {
			t.Fatalf("following replay: %v, digest %x want %x", r.err, r.digest[:8], want[:8])
		}
	case <-time.After(time.Minute):
		t.Fatal("the following replay did not finish")
	}
	t.Logf("%d deltas followed", src.Stats().Deltas)
}

// TestSyncCheckNamesRegisters: a register that differs in a replay (here
// R15, which the fixed-work guest never touches, so nothing else changes)
// is caught at the next digest check, by name.
func TestSyncCheckNamesRegisters(t *testing.T) {
	work, err := tinyguest.Assemble(t.TempDir(), workGuest)
	if err != nil {
		t.Fatal(err)
	}
	var log bytes.Buffer
	rec, err := ft.NewRecorder(&log, nil)
	if err != nil {
		t.Fatal(err)
	}
	src := newDeltaMachine(t, work, deltaConfig(rec, false), true)
	if _, err := src.Run(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := rec.Finish(src); err != nil {
		t.Fatal(err)
	}
	_, err = replaySync(t, work, true, log.Bytes(), func(m *machine.Machine) {
		r, err := m.VCPU().GetRegs()
		if err != nil {
			t.Error(err)
			return
		}
		r.R15 ^= 0x1000
		if err := m.VCPU().SetRegs(r); err != nil {
			t.Error(err)
		}
	})
	var mis *machine.SyncMismatchError
	if !errors.As(err, &mis) || !strings.Contains(err.Error(), "r15 ") {
		t.Fatalf("replay with R15 changed: %v; want a sync point mismatch naming r15", err)
	}
	t.Logf("caught: %v", err)
}
