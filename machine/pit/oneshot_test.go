package pit

import (
	"math/rand"
	"testing"
	"time"
)

// TestLinuxOneShotPattern drives channel 0 as Linux's one-shot clockevent
// does (mode 4 set once, then LSB/MSB per event) with Advance called at
// random times: each event gives exactly one IRQ0 rising edge, and until
// then Advance reports one stable deadline.
func TestLinuxOneShotPattern(t *testing.T) {
	clk := &oneShotClock{}
	rises := 0
	var lvl bool
	p := New(clk, func(l bool) {
		if l && !lvl {
			rises++
		}
		lvl = l
	})
	p.WritePort(0x43, []byte{0x38})
	r := rand.New(rand.NewSource(1))
	for i := 0; i < 20000; i++ {
		n := 1 + r.Intn(60000)
		p.WritePort(0x40, []byte{byte(n)})
		p.WritePort(0x40, []byte{byte(n >> 8)})
		before := rises
		start := clk.t
		// Advance in random steps until the edge.
		deadline := time.Duration(-1)
		for k := 0; k < 1000 && rises == before; k++ {
			next, ok := p.Advance(clk.t)
			if rises != before {
				break
			}
			if !ok {
				t.Fatalf("iter %d: count %d written at %v: no deadline at %v (rises %d)", i, n, start, clk.t, rises)
			}
			if deadline >= 0 && next != deadline {
				t.Fatalf("iter %d: deadline moved %v -> %v", i, deadline, next)
			}
			deadline = next
			if r.Intn(3) == 0 {
				clk.t = next
			} else {
				clk.t += time.Duration(r.Int63n(int64(next-clk.t) + 1))
			}
			if r.Intn(5) == 0 { // a port access in between, as Linux does
				p.ReadPort(0x61, []byte{0})
			}

		}
		if rises != before+1 {
			t.Fatalf("iter %d: %d rises for one shot of %d written at %v, now %v", i, rises-before, n, start, clk.t)
		}
		clk.t += time.Duration(r.Int63n(100000))
		if nx, ok := p.Advance(clk.t); ok {
			t.Fatalf("iter %d: deadline %v after the one shot of %d fired (written %v, now %v, rises %d) state %+v", i, nx, n, start, clk.t, rises-before, p.Save().Channels[0])
		}
	}
}

type oneShotClock struct{ t time.Duration }

func (c *oneShotClock) Now() time.Duration { return c.t }
