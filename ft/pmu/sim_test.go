package pmu

import (
	"errors"
	"fmt"
	"math/rand/v2"
)

// A simulated guest for the tests: a program of instructions, a branch
// counter whose overflow lands a bounded random skid late, a hardware
// breakpoint and single steps, each of which can be made faulty.

type op int

const (
	opNop    op = iota
	opSetRCX    // rcx = arg
	opSetR      // r[reg] = arg
	opDec       // r[reg]--
	opJnz       // a conditional branch: if r[reg] != 0, go to instruction arg
	opJmp       // an unconditional jump to instruction arg: not counted
	opRep       // rep stos: one iteration per step while rcx != 0
	opLock      // a locked instruction
	opExit      // a VM exit: Run stops after it
	opHalt      // the end: Run stops here, without moving
)

type inst struct {
	op  op
	reg int
	arg uint64
	rip uint64
}

// prog is a program under construction.
type prog struct {
	in  []inst
	rng *rand.Rand
}

func (p *prog) emit(o op, reg int, arg uint64) int {
	p.in = append(p.in, inst{op: o, reg: reg, arg: arg})
	return len(p.in) - 1
}

// finish appends the halt and lays the instructions out at 0x1000 with
// lengths of 1 to 15 bytes.
func (p *prog) finish() []inst {
	p.emit(opHalt, 0, 0)
	rip := uint64(0x1000)
	for i := range p.in {
		p.in[i].rip = rip
		n := uint64(1)
		if p.rng != nil {
			n = 1 + p.rng.Uint64N(15)
		}
		rip += n
	}
	return p.in
}

// loop emits "r[reg] = n; L: body; dec r[reg]; jnz L".
func (p *prog) loop(reg int, n uint64, body func()) {
	p.emit(opSetR, reg, n)
	top := len(p.in)
	body()
	p.emit(opDec, reg, 0)
	p.emit(opJnz, reg, uint64(top))
}

// randomProg makes a program of nested loops (registers 0-2), REP
// instructions, conditional branches taken and not taken (register 3),
// locked instructions and exits.
func randomProg(rng *rand.Rand) []inst {
	p := &prog{rng: rng}
	var block func(depth int)
	block = func(depth int) {
		for range 1 + rng.IntN(4) {
			switch k := rng.IntN(10); {
			case k < 2:
				for range 1 + rng.IntN(3) {
					p.emit(opNop, 0, 0)
				}
			case k < 4:
				p.emit(opSetRCX, 0, rng.Uint64N(25))
				p.emit(opRep, 0, 0)
			case k < 7 && depth < 3:
				p.loop(depth, 1+rng.Uint64N(12), func() { block(depth + 1) })
			case k < 8:
				// jnz over one nop, taken or not.
				p.emit(opSetR, 3, rng.Uint64N(2))
				j := p.emit(opJnz, 3, 0)
				p.emit(opNop, 0, 0)
				p.in[j].arg = uint64(j + 2)
			case k < 9:
				p.emit(opLock, 0, 0)
			default:
				p.emit(opExit, 0, 0)
			}
		}
	}
	for range 4 {
		block(0)
	}
	return p.finish()
}

// sim is the guest, its counter and its debug unit. It implements Counter
// and Stepper.
type sim struct {
	prog     []inst
	pc       int // the next instruction
	rcx      uint64
	r        [4]uint64
	inRep    bool   // in the middle of the REP at pc
	branches uint64 // retired conditional branches
	executed int    // instructions (REP iterations) executed

	rng     *rand.Rand
	skidMax uint64 // the overflow lands up to this many branches late
	skidMin uint64 // ... and at least this many
	armed   bool
	fireAt  uint64
	fired   bool
	landing uint64
	extra   int // instructions run after the landing before the stop

	bp    uint64
	bpSet bool

	// Faults.
	inertStep   bool    // Step runs on like Run
	inertBP     bool    // breakpoints never fire
	kickProb    float64 // chance of a StopOther at each instruction
	exitBias    float64 // chance that an exit adds a count
	lockBias    bool    // every locked instruction adds a count
	bias        uint64
	backwardsAt int // the read at which the count goes back by one (0: never)
	reads       int
	lastRead    uint64
	noProgress  bool // Run and Step return at once, doing nothing

	// Statistics.
	arms, runs, steps int
}

func newSim(p []inst, seed uint64) *sim {
	return &sim{prog: p, rng: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))}
}

// rewind puts the guest back at its start with the counter at zero.
func (g *sim) rewind() {
	g.pc, g.rcx, g.r, g.inRep, g.branches, g.executed, g.bias = 0, 0, [4]uint64{}, false, 0, 0, 0
	g.armed, g.fired = false, false
}

func (g *sim) halted() bool { return g.prog[g.pc].op == opHalt }

// where is the guest's true position.
func (g *sim) where() Target {
	return Target{Branches: g.branches, RIP: g.prog[g.pc].rip, RCX: g.rcx}
}

// exec runs one instruction or one REP iteration.
func (g *sim) exec() {
	in := g.prog[g.pc]
	g.executed++
	switch in.op {
	case opNop:
		g.pc++
	case opSetRCX:
		g.rcx = in.arg
		g.pc++
	case opSetR:
		g.r[in.reg] = in.arg
		g.pc++
	case opDec:
		g.r[in.reg]--
		g.pc++
	case opJnz:
		g.branches++
		if g.r[in.reg] != 0 {
			g.pc = int(in.arg)
		} else {
			g.pc++
		}
		if g.armed && !g.fired && g.branches >= g.fireAt {
			g.fired = true
			g.landing = g.fireAt + g.skidMin + g.rng.Uint64N(g.skidMax-g.skidMin+1)
			g.extra = g.rng.IntN(6)
		}
	case opJmp:
		g.pc = int(in.arg)
	case opRep:
		g.inRep = false
		if g.rcx != 0 {
			g.rcx--
			g.inRep = g.rcx != 0
		}
		if !g.inRep {
			g.pc++
		}
	case opLock:
		if g.lockBias {
			g.bias++
		}
		g.pc++
	case opExit:
		if g.exitBias > 0 && g.rng.Float64() < g.exitBias {
			g.bias++
		}
		g.pc++
	case opHalt:
		panic("exec at halt")
	}
}

// overflowStop says whether the overflow stops the guest here: it has
// landed, and the guest stops before the next branch retires.
func (g *sim) overflowStop() bool {
	if !g.fired || g.branches < g.landing {
		return false
	}
	if g.extra > 0 && g.prog[g.pc].op != opJnz && !g.halted() {
		g.extra--
		return false
	}
	g.armed, g.fired = false, false
	return true
}

const simBudget = 10_000_000

func (g *sim) Run() (Stop, error) {
	g.runs++
	if g.noProgress {
		return StopOther, nil
	}
	for i := 0; ; i++ {
		if i > simBudget {
			return 0, errors.New("sim: guest ran away")
		}
		if g.overflowStop() {
			return StopOverflow, nil
		}
		if i > 0 {
			if g.kickProb > 0 && g.rng.Float64() < g.kickProb {
				return StopOther, nil
			}
			if g.bpSet && !g.inertBP && !g.inRep && g.prog[g.pc].rip == g.bp {
				return StopBreakpoint, nil
			}
		}
		if g.halted() {
			return StopOther, nil
		}
		exit := g.prog[g.pc].op == opExit
		g.exec()
		if exit {
			return StopOther, nil
		}
	}
}

func (g *sim) Step() (Stop, error) {
	if g.inertStep {
		return g.Run()
	}
	g.steps++
	if g.noProgress || g.halted() {
		return StopOther, nil
	}
	g.exec()
	return StopStep, nil
}

func (g *sim) Regs() (Regs, error) { return Regs{RIP: g.prog[g.pc].rip, RCX: g.rcx}, nil }

func (g *sim) SetBreakpoint(rip uint64) error {
	g.bp, g.bpSet = rip, true
	return nil
}

func (g *sim) ClearBreakpoint() error {
	g.bpSet = false
	return nil
}

func (g *sim) Branches() (uint64, error) {
	g.reads++
	n := g.branches + g.bias
	if g.reads == g.backwardsAt && g.lastRead > 0 {
		n = g.lastRead - 1
	}
	g.lastRead = n
	return n, nil
}

func (g *sim) ArmOverflow(n uint64) error {
	if n == 0 {
		return errors.New("sim: overflow 0 branches ahead")
	}
	g.arms++
	g.armed, g.fired, g.fireAt = true, false, g.branches+n
	return nil
}

func (g *sim) Disarm() error {
	// A landed overflow's stop is still on its way, as a queued signal
	// would be; an armed one that has not fired is gone.
	if !g.fired {
		g.armed = false
	}
	return nil
}

// trace single-steps a fresh copy of p to its end and returns the position
// before every instruction (and REP iteration), the halt included.
func trace(p []inst) []Target {
	g := newSim(p, 1)
	var out []Target
	for {
		out = append(out, g.where())
		if g.halted() {
			return out
		}
		g.exec()
	}
}

// firstAt returns the first index at or after from whose position is t.
func firstAt(tr []Target, from int, t Target) int {
	for i := from; i < len(tr); i++ {
		if tr[i] == t {
			return i
		}
	}
	return -1
}

// simLoop is a Loop on a sim: "r0 = n; L: exit; lock; nop; dec r0; jnz L".
type simLoop struct {
	g       *sim
	n       uint64
	passes  int
	badPass int // the pass (from 1) that counts one too many; 0: none
}

func newSimLoop(n uint64, seed uint64) *simLoop {
	p := &prog{}
	p.loop(0, n, func() {
		p.emit(opExit, 0, 0)
		p.emit(opLock, 0, 0)
		p.emit(opNop, 0, 0)
	})
	return &simLoop{g: newSim(p.finish(), seed), n: n}
}

func (l *simLoop) Want() uint64 { return l.n }

func (l *simLoop) Count() (uint64, error) {
	l.g.rewind()
	l.passes++
	if l.passes == l.badPass {
		l.g.bias++
	}
	for !l.g.halted() {
		if _, err := l.g.Run(); err != nil {
			return 0, err
		}
	}
	return l.g.Branches()
}

func (l *simLoop) Overflow(n uint64) (uint64, error) {
	l.g.rewind()
	if err := l.g.ArmOverflow(n); err != nil {
		return 0, err
	}
	for !l.g.halted() {
		why, err := l.g.Run()
		if err != nil {
			return 0, err
		}
		if why == StopOverflow {
			return l.g.Branches()
		}
	}
	return 0, fmt.Errorf("the pass ended at %d branches without an overflow", l.g.branches)
}

// simDebug is a DebugGuest on a sim: three nops and an exit.
type simDebug struct{ *sim }

func newSimDebug() simDebug {
	p := &prog{}
	for range 3 {
		p.emit(opNop, 0, 0)
	}
	p.emit(opExit, 0, 0)
	in := p.finish()
	for i := range in {
		in[i].rip = 0x7c00 + uint64(3*i)
	}
	return simDebug{newSim(in, 7)}
}

func (d simDebug) Rewind() (next, bp uint64, err error) {
	d.rewind()
	return d.prog[1].rip, d.prog[2].rip, nil
}
