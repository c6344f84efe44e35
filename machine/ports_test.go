package machine_test

import (
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/buffer"

	"github.com/gokvm-ft/gokvm-ft/internal/tinyguest"
	"github.com/gokvm-ft/gokvm-ft/machine"
)

// emitter is a port device that emits each byte written to it through an
// output port.
type emitter struct{ out *machine.OutputPort }

func (e *emitter) ReadPort(port uint16, data []byte) {}
func (e *emitter) WritePort(port uint16, data []byte) {
	e.out.Emit(buffer.MakeWithData(append([]byte(nil), data...)))
}

// TestInputPorts: input sent before and during a run reaches the device on
// the vCPU thread, in order, between exits; a full queue drops and counts;
// a closed machine refuses.
func TestInputPorts(t *testing.T) {
	g := newGuest(t, `
_start:
	mov $0x510, %dx
	mov $1, %al; out %al, %dx
	mov $2, %al; out %al, %dx
	xor %eax, %eax
`+exitWithEAX, machine.Config{}, tinyguest.Options{})
	type delivery struct {
		data  string
		exits uint64
	}
	var got []delivery
	var a *machine.InputPort
	a = g.m.NewInputPort("a", func(b buffer.Buffer) {
		got = append(got, delivery{string(b.Flatten()), g.m.Exits()})
		b.Release()
	})
	b := g.m.NewInputPort("b", func(b buffer.Buffer) {
		got = append(got, delivery{"b:" + string(b.Flatten()), g.m.Exits()})
		b.Release()
	})
	dev := &testPort{}
	if err := g.m.RegisterPort(0x510, 1, dev); err != nil {
		t.Fatal(err)
	}
	g.m.SetOnExit(func(ex machine.Exit) {
		if ex.Count == 1 {
			a.Send(buffer.MakeWithData([]byte("during")))
		}
	})
	a.Send(buffer.MakeWithData([]byte("one")))
	b.Send(buffer.MakeWithData([]byte("two")))
	a.Send(buffer.MakeWithData([]byte("three")))
	g.wantExit(5*time.Second, 0)
	want := []delivery{{"one", 0}, {"b:two", 0}, {"three", 0}, {"during", 1}}
	if len(got) != len(want) {
		t.Fatalf("deliveries %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("delivery %d = %v, want %v", i, got[i], want[i])
		}
	}

	got = nil
	for i := 0; i < 1024+5; i++ {
		if !a.Send(buffer.MakeWithData([]byte{byte(i)})) {
			t.Fatalf("Send %d refused on an open machine", i)
		}
	}
	if n := a.Dropped(); n != 5 {
		t.Errorf("%d dropped, want 5 beyond the bound", n)
	}
	g.m.CloseInput()
	if a.Send(buffer.MakeWithData([]byte("late"))) {
		t.Error("Send accepted after CloseInput")
	}
}

// TestOutputGate: device output passes the gate with the exit count that
// produced it, and leaves only when the gate sends it.
func TestOutputGate(t *testing.T) {
	g := newGuest(t, `
_start:
	mov $0x510, %dx
	mov $7, %al; out %al, %dx
	mov $8, %al; out %al, %dx
	xor %eax, %eax
`+exitWithEAX, machine.Config{}, tinyguest.Options{})
	var sent []byte
	out := g.m.NewOutputPort("wire", func(b buffer.Buffer) {
		sent = append(sent, b.Flatten()...)
		b.Release()
	})
	if err := g.m.RegisterPort(0x510, 1, &emitter{out}); err != nil {
		t.Fatal(err)
	}
	var held []machine.Output
	g.m.SetOutputGate(func(o machine.Output) { held = append(held, o) })
	g.wantExit(5*time.Second, 0)
	if len(sent) != 0 {
		t.Fatalf("output %v left before the gate let it", sent)
	}
	if len(held) != 2 || held[0].Exit != 0 || held[1].Exit != 1 || held[0].Port != out {
		t.Fatalf("held %+v, want two outputs produced at exits 0 and 1", held)
	}
	for _, o := range held {
		o.Send()
	}
	if string(sent) != "\x07\x08" {
		t.Errorf("sent %q", sent)
	}
}
