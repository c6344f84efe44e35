package ft_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/gokvm-ft/gokvm-ft/ft"
	"github.com/gokvm-ft/gokvm-ft/ft/ftlog"
	"github.com/gokvm-ft/gokvm-ft/internal/benchutil"
	"github.com/gokvm-ft/gokvm-ft/internal/tinyguest"
	"github.com/gokvm-ft/gokvm-ft/machine"
)

// busyGuest runs in user mode, counting; every 1024 counts it latches and
// reads PIT channel 0 (a clock read) into a ring at 0x91000. The PIT ticks
// at 1 kHz (IRQ0 counts at 0x90008) and COM1 delivers typed bytes (IRQ4:
// the handler sums them at 0x90018 and counts them at 0x90020). After 300
// ticks and 20 bytes (however late the host's typing comes) the guest exits
// with the number of bytes it received.
var busyGuest = `
_start:
` + tinyguest.PICInit(0xea) + tinyguest.PIT1kHz + `
	mov $0x3f9, %dx; mov $0x01, %al; out %al, %dx
	mov $0x3fc, %dx; mov $0x08, %al; out %al, %dx
	mov $0x3fa, %dx; mov $0x01, %al; out %al, %dx
` + tinyguest.ToUser + `
user:
	incq 0x90000
	mov 0x90000, %rax
	test $0x3ff, %rax
	jnz user
	xor %eax, %eax
	out %al, $0x43
	in $0x40, %al
	mov %al, %bl
	in $0x40, %al
	mov %al, %bh
	mov 0x90028, %rcx
	and $0x1ff, %rcx
	mov %bx, 0x91000(,%rcx,2)
	incq 0x90028
	cmpq $300, 0x90008
	jb user
	cmpq $20, 0x90020
	jb user
	mov 0x90020, %eax
` + tinyguest.ExitWithEAX + tinyguest.CountTicks + `
vec_36:
	push %rax
	push %rdx
1:	mov $0x3fd, %dx
	in %dx, %al
	test $1, %al
	jz 2f
	mov $0x3f8, %dx
	in %dx, %al
	movzbq %al, %rax
	add %rax, 0x90018
	incq 0x90020
	jmp 1b
2:	mov $0x20, %al
	out %al, $0x20
	pop %rdx
	pop %rax
	iretq
`

var prog *tinyguest.Program

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "ft-test")
	if err == nil {
		prog, err = tinyguest.Assemble(dir, busyGuest)
		os.RemoveAll(dir)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "assemble:", err)
		os.Exit(1)
	}
	os.Exit(m.Run())
}

func newMachine(t *testing.T, j machine.Journal, console *bytes.Buffer) *machine.Machine {
	t.Helper()
	return newMachineFor(t, prog, j, console)
}

func newMachineFor(t *testing.T, prog *tinyguest.Program, j machine.Journal, console *bytes.Buffer) *machine.Machine {
	t.Helper()
	if _, err := os.Stat("/dev/kvm"); err != nil {
		t.Skip("no /dev/kvm")
	}
	m, err := machine.New(machine.Config{MemorySize: 2 << 20, TestExit: true, Host: machine.DetectHostKind(), Journal: j, Console: console})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	if err := tinyguest.Load(m.Memory(), m.VCPU(), prog, tinyguest.Options{Kernel: true}); err != nil {
		t.Fatal(err)
	}
	return m
}

// typeWhenReady types the 20 console bytes the busy guest waits for into
// m, first, first+1, ..., each after pause(i), once the guest has set up
// its UART: its FIFO-enable write clears the receiver, as on a real 16550
// (and QEMU's), so a byte typed before it would never reach the guest.
// Call it before m runs.
func typeWhenReady(m *machine.Machine, first byte, pause func(i int) time.Duration) {
	ready := make(chan struct{})
	var once sync.Once
	m.SetOnExit(func(ex machine.Exit) {
		if ex.Write && ex.Addr == 0x3fa { // FCR
			once.Do(func() { close(ready) })
		}
	})
	go func() {
		<-ready
		for i := 0; i < 20; i++ {
			time.Sleep(pause(i))
			m.DeliverSerial([]byte{first + byte(i)})
		}
	}()
}

// perturb loads the host's CPUs until stop is closed.
func perturb(stop <-chan struct{}) *sync.WaitGroup {
	var wg sync.WaitGroup
	for i := 0; i < runtime.NumCPU(); i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			x := 0
			for {
				select {
				case <-stop:
					return
				default:
				}
				for k := 0; k < 100000; k++ {
					x += k
				}
				runtime.Gosched()
			}
		}()
	}
	return &wg
}

// record runs the guest under a Recorder, typing bytes at random host
// times, and returns the log and the stop.
func record(t *testing.T, rng *rand.Rand) ([]byte, machine.Stop, [32]byte) {
	t.Helper()
	var log bytes.Buffer
	rec, err := ft.NewRecorder(&log, []byte(`{"test":"busy guest"}`))
	if err != nil {
		t.Fatal(err)
	}
	m := newMachine(t, rec, nil)
	typeWhenReady(m, 'a', func(int) time.Duration { return time.Duration(rng.Intn(8000)) * time.Microsecond })
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	stop, err := m.Run(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := rec.Finish(m); err != nil {
		t.Fatal(err)
	}
	if st := m.Stats(); st.IRQWaits > 0 {
		t.Logf("recording: %d interrupts waited %v on average, %v at most, for a deterministic exit", st.IRQWaits, st.IRQWaitTotal/time.Duration(st.IRQWaits), st.IRQWaitMax)
	}
	d, err := m.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return log.Bytes(), stop, d
}

func replay(t *testing.T, log []byte) (machine.Stop, [32]byte, error) {
	t.Helper()
	rep, err := ft.NewReplayer(bytes.NewReader(log))
	if err != nil {
		t.Fatal(err)
	}
	m := newMachine(t, rep, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	stop, err := m.Run(ctx)
	if err != nil {
		return stop, [32]byte{}, err
	}
	if err := rep.Verify(m); err != nil {
		return stop, [32]byte{}, err
	}
	d, _ := m.Digest()
	return stop, d, nil
}

// TestRecordReplay records the busy guest (PIT ticks delivered at its
// frequent exits, clock reads, console bytes typed at random host times)
// and replays it, 20 times, with the host loaded differently each time:
// every replay ends at the same exit with the same registers and memory.
func TestRecordReplay(t *testing.T) {
	rounds := 20
	if testing.Short() {
		rounds = 3
	}
	for i := 0; i < rounds; i++ {
		rng := rand.New(rand.NewSource(int64(i)))
		var stopLoad chan struct{}
		var wg *sync.WaitGroup
		if i%2 == 1 { // load during recording, not during replay
			stopLoad = make(chan struct{})
			wg = perturb(stopLoad)
		}
		log, stop, digest := record(t, rng)
		if stopLoad != nil {
			close(stopLoad)
			wg.Wait()
		}
		if stop.Kind != machine.StopTestExit || stop.Code != 20 {
			t.Fatalf("round %d: recording stopped with %v, want test exit 20 (all typed bytes received)", i, stop)
		}
		if i%2 == 0 { // load during replay instead
			stopLoad = make(chan struct{})
			wg = perturb(stopLoad)
		}
		rstop, rdigest, err := replay(t, log)
		if i%2 == 0 {
			close(stopLoad)
			wg.Wait()
		}
		if err != nil {
			t.Fatalf("round %d: replay: %v", i, err)
		}
		if rstop != stop || rdigest != digest {
			t.Fatalf("round %d: replay stopped with %v digest %x, recording %v digest %x", i, rstop, rdigest[:8], stop, digest[:8])
		}
		if i == 0 {
			t.Logf("log: %d bytes", len(log))
		}
	}
}

// TestReplayDetectsDivergence: a replay whose machine differs from the
// recorded one (a different guest memory byte) is reported at the first
// place the log and the replay disagree, or at the final digest.
func TestReplayDetectsDivergence(t *testing.T) {
	log, _, _ := record(t, rand.New(rand.NewSource(7)))
	rep, err := ft.NewReplayer(bytes.NewReader(log))
	if err != nil {
		t.Fatal(err)
	}
	m := newMachine(t, rep, nil)
	m.Memory().Write64(0x90028, 7) // the clock-read ring starts elsewhere
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err = m.Run(ctx)
	if err == nil {
		err = rep.Verify(m)
	}
	var div *ft.DivergenceError
	if !errors.As(err, &div) {
		t.Fatalf("divergence not reported: %v", err)
	}
	t.Log(err)
}

// TestReplayTruncatedLog: a log cut short stops the replay with an error
// naming the entry and offset.
func TestReplayTruncatedLog(t *testing.T) {
	log, _, _ := record(t, rand.New(rand.NewSource(3)))
	_, _, err := replay(t, log[:len(log)/2])
	if err == nil {
		t.Fatal("a truncated log replayed to the end")
	}
	t.Log(err)
}

// TestLiveReplay replays while the recording runs, the log streaming
// through a pipe as a backup's would: the replayer blocks at each exit
// until the log covers it (it reads entries as they arrive), and ends in
// the recording's state.
func TestLiveReplay(t *testing.T) {
	pr, pw := io.Pipe()
	recordWhileReplaying(t, pw, 10*time.Millisecond, func() { pw.Close() }, func() (*ft.Replayer, func(), error) {
		rep, err := ft.NewReplayer(pr)
		return rep, func() { pr.Close() }, err
	})
}

// TestFollowFile replays from a log file while the recorder is still
// appending to it: the replayer waits at the end of what is written, never
// runs past it, and ends in the recording's state.
func TestFollowFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "live.ftlog")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	stopWaiting := make(chan struct{})
	defer close(stopWaiting)
	recordWhileReplaying(t, f, 5*time.Millisecond, func() {}, func() (*ft.Replayer, func(), error) {
		in, err := os.Open(path)
		if err != nil {
			return nil, nil, err
		}
		rep, err := ft.NewFollowingReplayer(in, time.Millisecond, stopWaiting)
		return rep, func() { in.Close() }, err
	})
}

// recordWhileReplaying records the busy guest into w (flushing every
// flushEvery, closing w with closeW once the log ends) while a second
// machine replays it, on its own goroutine, through the replayer that
// newReplayer opens on the same log; the replay must end in the
// recording's state.
func recordWhileReplaying(t *testing.T, w io.Writer, flushEvery time.Duration, closeW func(), newReplayer func() (*ft.Replayer, func(), error)) {
	t.Helper()
	rec, err := ft.NewRecorder(w, nil)
	if err != nil {
		t.Fatal(err)
	}
	rec.FlushEvery = flushEvery
	src := newMachine(t, rec, nil)
	type result struct {
		stop   machine.Stop
		digest [32]byte
		err    error
	}
	done := make(chan result, 1)
	go func() {
		rep, release, err := newReplayer()
		if err != nil {
			done <- result{err: err}
			return
		}
		defer release()
		m := newMachine(t, rep, nil)
		stop, err := m.Run(context.Background())
		if err == nil {
			err = rep.Verify(m)
		}
		d, _ := m.Digest()
		done <- result{stop, d, err}
	}()
	typeWhenReady(src, 'A', func(int) time.Duration { return 2 * time.Millisecond })
	stop, err := src.Run(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if err := rec.Finish(src); err != nil {
		t.Fatal(err)
	}
	closeW()
	want, _ := src.Digest()
	select {
	case r := <-done:
		if r.err != nil {
			t.Fatalf("replay during the recording: %v", r.err)
		}
		if r.stop != stop || r.digest != want {
			t.Fatalf("replay stopped with %v, recording with %v (digests %x, %x)", r.stop, stop, r.digest[:8], want[:8])
		}
	case <-time.After(60 * time.Second):
		t.Fatal("the replay did not finish")
	}
}

// TestReplayerStopsWhereTheLogEnds: a replayer following a growing log
// runs through exits that no entry names as far as the recorder's progress
// marker covers them, and waits at the first exit beyond it until the log
// covers that one too.
func TestReplayerStopsWhereTheLogEnds(t *testing.T) {
	path := filepath.Join(t.TempDir(), "growing.ftlog")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	enc, err := ftlog.NewEncoder(f, ftlog.Header{})
	if err != nil {
		t.Fatal(err)
	}
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(enc.ClockRead(ftlog.Position{Exits: 2, RIP: 0x1000}, 0, int64(time.Millisecond)))
	must(enc.Progress(10))
	must(enc.Flush())

	in, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	stop := make(chan struct{})
	defer close(stop)
	rep, err := ft.NewFollowingReplayer(in, time.Millisecond, stop)
	if err != nil {
		t.Fatal(err)
	}
	got, err := rep.Deliver(machine.Position{Exits: 2, RIP: 0x1000}, false, nil)
	if err != nil || len(got) != 1 || got[0].Kind != machine.InputTime || got[0].Time != time.Millisecond {
		t.Fatalf("at exit 2: %v, %v; want the logged clock reading", got, err)
	}
	for n := uint64(3); n <= 10; n++ {
		start := time.Now()
		got, err := rep.Deliver(machine.Position{Exits: n, RIP: 0x2000}, false, nil)
		if err != nil || len(got) != 0 {
			t.Fatalf("at exit %d (covered): %v, %v; want nothing", n, got, err)
		}
		if d := time.Since(start); d > 50*time.Millisecond {
			t.Fatalf("at exit %d (covered) the replayer waited %v", n, d)
		}
	}
	done := make(chan error, 1)
	go func() {
		got, err := rep.Deliver(machine.Position{Exits: 11, RIP: 0x3000}, false, nil)
		if err == nil && len(got) != 1 {
			err = fmt.Errorf("got %v, want the clock reading logged at exit 11", got)
		}
		done <- err
	}()
	select {
	case err := <-done:
		t.Fatalf("at exit 11, beyond what the log covers, the replayer went on (%v)", err)
	case <-time.After(100 * time.Millisecond):
	}
	must(enc.ClockRead(ftlog.Position{Exits: 11, RIP: 0x3000}, 0, int64(2*time.Millisecond)))
	must(enc.Progress(11))
	must(enc.Flush())
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("at exit 11: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the replayer did not go on once the log covered exit 11")
	}
}

// workGuest does a fixed amount of work, whatever the host's speed: a
// user-mode count to 4M with a PIT counter latch and read (three port
// exits) every 1024 counts, while the PIT ticks at 1 kHz into a handler
// that counts.
var workGuest = `
_start:
` + tinyguest.PICInit(0xfe) + tinyguest.PIT1kHz + `
` + tinyguest.ToUser + `
user:
	incq 0x90000
	mov 0x90000, %rax
	test $0x3ff, %rax
	jnz user
	xor %eax, %eax
	out %al, $0x43
	in $0x40, %al
	in $0x40, %al
	cmpq $0x400000, 0x90000
	jb user
	mov $1, %eax
` + tinyguest.ExitWithEAX + tinyguest.CountTicks + `
`

// idleGuest halts with the PIT ticking at 1 kHz until 200 ticks came.
var idleGuest = `
_start:
` + tinyguest.PICInit(0xfe) + tinyguest.PIT1kHz + `
	sti
1:	hlt
	cmpq $200, 0x90008
	jb 1b
	mov $1, %eax
` + tinyguest.ExitWithEAX + tinyguest.CountTicks + `
`

// TestRecordingOverhead measures (and logs: the figures are in
// BENCHMARKS.md) what recording costs a tiny guest doing fixed work, plain
// and recorded alternately, and how fast the log grows busy and idle. It
// checks only that every recording replays.
func TestRecordingOverhead(t *testing.T) {
	work, err := tinyguest.Assemble(t.TempDir(), workGuest)
	if err != nil {
		t.Fatal(err)
	}
	idle, err := tinyguest.Assemble(t.TempDir(), idleGuest)
	if err != nil {
		t.Fatal(err)
	}
	run := func(p *tinyguest.Program, record bool) (time.Duration, []byte, machine.ExitStats) {
		t.Helper()
		var log bytes.Buffer
		var j machine.Journal
		if record {
			rec, err := ft.NewRecorder(&log, nil)
			if err != nil {
				t.Fatal(err)
			}
			j = rec
		}
		m := newMachineFor(t, p, j, nil)
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		start := time.Now()
		stop, err := m.Run(ctx)
		took := time.Since(start)
		if err != nil || stop.Kind != machine.StopTestExit || stop.Code != 1 {
			t.Fatalf("stopped with %v, %v", stop, err)
		}
		if record {
			if err := j.(*ft.Recorder).Finish(m); err != nil {
				t.Fatal(err)
			}
			rep, err := ft.NewReplayer(bytes.NewReader(log.Bytes()))
			if err != nil {
				t.Fatal(err)
			}
			r := newMachineFor(t, p, rep, nil)
			if rstop, err := r.Run(ctx); err != nil || rstop != stop {
				t.Fatalf("replay stopped with %v, %v; recording with %v", rstop, err, stop)
			}
			if err := rep.Verify(r); err != nil {
				t.Fatal(err)
			}
		}
		return took, log.Bytes(), m.Stats()
	}
	rounds := 5
	if testing.Short() {
		rounds = 1
	}
	var plain, rec []time.Duration
	var logBytes int
	var st machine.ExitStats
	for i := 0; i < rounds; i++ {
		d, _, _ := run(work, false)
		plain = append(plain, d)
		d, log, s := run(work, true)
		rec = append(rec, d)
		logBytes, st = len(log), s
	}
	mp, mr := benchutil.Median(plain), benchutil.Median(rec)
	t.Logf("fixed work (4M user-mode counts, 12288 port exits, PIT 1 kHz), median of %d: plain %v, recording %v: ratio %.2f; log %d bytes (%.1f KiB/s); %d interrupts waited %v on average, %v at most",
		rounds, mp.Round(time.Microsecond), mr.Round(time.Microsecond), mr.Seconds()/mp.Seconds(), logBytes, float64(logBytes)/1024/mr.Seconds(),
		st.IRQWaits, st.IRQWaitTotal/time.Duration(max(st.IRQWaits, 1)), st.IRQWaitMax)
	d, log, st := run(idle, true)
	t.Logf("idle (HLT, PIT 1 kHz, 200 ticks): %v, log %d bytes (%.1f KiB/s); %d interrupts waited %v on average, %v at most",
		d.Round(time.Millisecond), len(log), float64(len(log))/1024/d.Seconds(), st.IRQWaits, st.IRQWaitTotal/time.Duration(max(st.IRQWaits, 1)), st.IRQWaitMax)
}
