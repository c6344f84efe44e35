package pmu

import (
	"errors"
	"math/rand/v2"
	"slices"
	"testing"
)

// seekTo seeks g to tr[i] and checks it stands at the first instance of
// that position at or after where it was.
func seekTo(t *testing.T, sk *Seeker, g *sim, tr []Target, i int) {
	t.Helper()
	want := firstAt(tr, g.executed, tr[i])
	if err := sk.Seek(tr[i]); err != nil {
		t.Fatalf("seek to %v (trace index %d) from index %d: %v", tr[i], i, g.executed, err)
	}
	if g.executed != want || g.where() != tr[i] {
		t.Fatalf("seek to %v: guest at index %d (%v), want index %d", tr[i], g.executed, g.where(), want)
	}
	if g.bpSet {
		t.Fatalf("seek to %v left the breakpoint set", tr[i])
	}
}

// TestStepRandomTargets seeks random programs to hundreds of random
// positions, forward on one guest as a replay does, and each from the
// start on a fresh guest, under several skids and with kicks.
func TestStepRandomTargets(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	configs := []struct {
		name      string
		skid      uint64 // the guest's real bound
		minPeriod uint64
		kick      float64
	}{
		{name: "skid 0", skid: 0},
		{name: "skid 5", skid: 5},
		{name: "skid 100", skid: 100},
		{name: "skid 20, min period 32", skid: 20, minPeriod: 32},
		{name: "skid 10, kicks", skid: 10, kick: 0.01},
	}
	for _, c := range configs {
		t.Run(c.name, func(t *testing.T) {
			arms, seeks := 0, 0
			for progN := range 8 {
				p := randomProg(rng)
				tr := trace(p)
				if len(tr) < 50 {
					continue
				}
				idx := make([]int, 120)
				for k := range idx {
					idx[k] = rng.IntN(len(tr))
				}
				slices.Sort(idx)
				g := newSim(p, uint64(progN)+100)
				g.skidMax, g.kickProb = c.skid, c.kick
				skid := c.skid
				if skid == 0 {
					skid = 1 // Seeker's 0 means the default
				}
				sk := &Seeker{Counter: g, Stepper: g, Skid: skid, MinPeriod: c.minPeriod}
				for _, i := range idx {
					seekTo(t, sk, g, tr, i)
					seeks++
				}
				arms += g.arms
				for _, i := range idx[:30] {
					g := newSim(p, uint64(i))
					g.skidMax, g.kickProb = c.skid, c.kick
					sk := &Seeker{Counter: g, Stepper: g, Skid: skid, MinPeriod: c.minPeriod}
					seekTo(t, sk, g, tr, i)
					seeks++
					arms += g.arms
				}
			}
			if seeks < 500 {
				t.Fatalf("only %d seeks", seeks)
			}
			if arms == 0 {
				t.Errorf("no overflow armed in %d seeks: the far path went untested", seeks)
			}
			t.Logf("%d seeks, %d overflows armed", seeks, arms)
		})
	}
}

// repProg is "r0 = 20; L: rcx = 30; rep; nop; dec r0; jnz L".
func repProg() []inst {
	p := &prog{}
	p.loop(0, 20, func() {
		p.emit(opSetRCX, 0, 30)
		p.emit(opRep, 0, 0)
		p.emit(opNop, 0, 0)
	})
	return p.finish()
}

// TestStepInsideRep seeks into the middle of REP instructions: the same
// RIP and branch count, told apart by RCX only.
func TestStepInsideRep(t *testing.T) {
	p := repProg()
	tr := trace(p)
	rep := p[2].rip
	var inRep []int
	for i, x := range tr {
		if x.RIP == rep && x.RCX != 0 && x.RCX != 30 {
			inRep = append(inRep, i)
		}
	}
	if len(inRep) != 20*29 {
		t.Fatalf("%d positions inside the REP, want %d", len(inRep), 20*29)
	}
	g := newSim(p, 3)
	g.skidMax = 3
	sk := &Seeker{Counter: g, Stepper: g, Skid: 3}
	for k := 0; k < len(inRep); k += 7 {
		seekTo(t, sk, g, tr, inRep[k])
	}
	for _, i := range []int{inRep[0], inRep[300], inRep[len(inRep)-1]} {
		g := newSim(p, 4)
		g.skidMax = 3
		seekTo(t, &Seeker{Counter: g, Stepper: g, Skid: 3}, g, tr, i)
	}
}

// TestStepLoopSameRIP seeks to one RIP inside a loop, visited 200 times
// with 200 different branch counts.
func TestStepLoopSameRIP(t *testing.T) {
	p := &prog{}
	p.loop(0, 200, func() {
		p.emit(opNop, 0, 0)
		p.emit(opNop, 0, 0)
	})
	in := p.finish()
	tr := trace(in)
	var visits []int
	for i, x := range tr {
		if x.RIP == in[1].rip {
			visits = append(visits, i)
		}
	}
	if len(visits) != 200 {
		t.Fatalf("%d visits, want 200", len(visits))
	}
	g := newSim(in, 5)
	g.skidMax = 10
	sk := &Seeker{Counter: g, Stepper: g, Skid: 10}
	for _, i := range visits {
		seekTo(t, sk, g, tr, i)
	}
	if g.arms != 0 {
		t.Errorf("%d overflows armed for targets one branch apart", g.arms)
	}
	for _, i := range []int{visits[0], visits[37], visits[150], visits[199]} {
		g := newSim(in, uint64(i))
		g.skidMax = 10
		seekTo(t, &Seeker{Counter: g, Stepper: g, Skid: 10}, g, tr, i)
		if i == visits[150] && g.arms == 0 {
			t.Error("no overflow armed for a target 150 branches ahead")
		}
	}
}

// TestStepWithinSkid: a target less than the skid ahead is reached by
// breakpoints alone.
func TestStepWithinSkid(t *testing.T) {
	p := repProg()
	tr := trace(p)
	i := len(tr) / 3
	if tr[i].Branches == 0 || tr[i].Branches > 100 {
		t.Fatalf("target %v not within the skid", tr[i])
	}
	g := newSim(p, 6)
	g.skidMax = 100
	seekTo(t, &Seeker{Counter: g, Stepper: g}, g, tr, i)
	if g.arms != 0 {
		t.Errorf("%d overflows armed for a target within the skid", g.arms)
	}
}

// TestStepAtTarget: seeking to where the guest stands runs nothing.
func TestStepAtTarget(t *testing.T) {
	p := repProg()
	tr := trace(p)
	g := newSim(p, 6)
	sk := &Seeker{Counter: g, Stepper: g, Skid: 5}
	seekTo(t, sk, g, tr, 500)
	runs, steps := g.runs, g.steps
	seekTo(t, sk, g, tr, 500)
	if g.runs != runs || g.steps != steps {
		t.Errorf("seeking to the current position ran the guest (%d runs, %d steps)", g.runs-runs, g.steps-steps)
	}
}

// TestStepOvershoot: an overflow that lands beyond the declared skid is
// reported, not taken for the target, whether it lands past the target's
// branch count or on it (where the guest may be past the target's RIP).
func TestStepOvershoot(t *testing.T) {
	p := &prog{}
	p.loop(0, 200, func() {
		p.emit(opNop, 0, 0)
		p.emit(opNop, 0, 0)
	})
	in := p.finish()
	target := Target{Branches: 100, RIP: in[2].rip}
	for _, realSkid := range []uint64{12, 3} {
		g := newSim(in, 8)
		g.skidMin, g.skidMax = realSkid, realSkid
		err := (&Seeker{Counter: g, Stepper: g, Skid: 2}).Seek(target)
		if !errors.Is(err, ErrOvershoot) {
			t.Fatalf("seek with a skid of %d declared as 2: %v, want ErrOvershoot", realSkid, err)
		}
		if g.arms != 1 {
			t.Errorf("%d overflows armed, want 1", g.arms)
		}
		t.Log(err)
	}
}

// TestStepBehind: a target behind the guest is refused.
func TestStepBehind(t *testing.T) {
	p := repProg()
	tr := trace(p)
	g := newSim(p, 9)
	sk := &Seeker{Counter: g, Stepper: g, Skid: 5}
	seekTo(t, sk, g, tr, len(tr)/2)
	err := sk.Seek(tr[10])
	if !errors.Is(err, ErrBehind) {
		t.Fatalf("seek back to %v from %v: %v, want ErrBehind", tr[10], g.where(), err)
	}
}

// TestStepCounterBackwards: a counter that goes back is reported.
func TestStepCounterBackwards(t *testing.T) {
	p := repProg()
	tr := trace(p)
	g := newSim(p, 10)
	g.backwardsAt = 3
	err := (&Seeker{Counter: g, Stepper: g, Skid: 5}).Seek(tr[len(tr)-2])
	if !errors.Is(err, ErrBackwards) {
		t.Fatalf("seek: %v, want ErrBackwards", err)
	}
}

// TestStepStuck: a stepper that stops without the guest moving is given
// up on after MaxStops.
func TestStepStuck(t *testing.T) {
	p := repProg()
	tr := trace(p)
	for _, far := range []bool{false, true} {
		g := newSim(p, 11)
		g.noProgress = true
		i := 40
		if far {
			i = len(tr) - 2
		}
		err := (&Seeker{Counter: g, Stepper: g, Skid: 5, MaxStops: 1000}).Seek(tr[i])
		if !errors.Is(err, ErrStuck) {
			t.Fatalf("seek to %v with a stuck stepper: %v, want ErrStuck", tr[i], err)
		}
		if g.runs+g.steps > 1001 {
			t.Errorf("%d stops, bound 1000", g.runs+g.steps)
		}
	}
}

// TestStepInertDebug: with breakpoints and single steps that do nothing
// (as on this development host), a seek fails instead of stopping
// somewhere wrong.
func TestStepInertDebug(t *testing.T) {
	p := repProg()
	tr := trace(p)
	i := firstAt(tr, 0, Target{Branches: 3, RIP: p[2].rip, RCX: 10})
	g := newSim(p, 12)
	g.inertBP, g.inertStep = true, true
	err := (&Seeker{Counter: g, Stepper: g, Skid: 5, MaxStops: 1000}).Seek(tr[i])
	if !errors.Is(err, ErrOvershoot) && !errors.Is(err, ErrStuck) {
		t.Fatalf("seek with inert debugging: %v, want ErrOvershoot or ErrStuck", err)
	}
	t.Log(err)
}

// TestStepRecordReplay records positions with Current wherever kicks stop
// a guest and replays them on a fresh one: each lands where the recording
// stood.
func TestStepRecordReplay(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for n := range 5 {
		p := randomProg(rng)
		rec := newSim(p, uint64(n))
		rec.kickProb = 0.02
		type stop struct {
			at       Target
			executed int
		}
		var log []stop
		for !rec.halted() {
			why, err := rec.Run()
			if err != nil {
				t.Fatal(err)
			}
			if why != StopOther {
				t.Fatalf("recording stopped by %v", why)
			}
			at, err := Current(rec, rec)
			if err != nil {
				t.Fatal(err)
			}
			if at != rec.where() {
				t.Fatalf("Current %v, guest at %v", at, rec.where())
			}
			log = append(log, stop{at, rec.executed})
		}
		rep := newSim(p, uint64(n)+50)
		rep.skidMax = 8
		sk := &Seeker{Counter: rep, Stepper: rep, Skid: 8}
		for _, s := range log {
			if err := sk.Seek(s.at); err != nil {
				t.Fatalf("replay to %v: %v", s.at, err)
			}
			if rep.executed != s.executed {
				t.Fatalf("replay to %v: after %d instructions, the recording after %d", s.at, rep.executed, s.executed)
			}
		}
		t.Logf("program %d: %d positions replayed", n, len(log))
	}
}
