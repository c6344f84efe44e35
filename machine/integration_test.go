package machine_test

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/gokvm-ft/gokvm-ft/internal/tinyguest"
	"github.com/gokvm-ft/gokvm-ft/kvm"
	"github.com/gokvm-ft/gokvm-ft/machine"
)

// Assembly building blocks for the tiny guests. Kernel-mode code is emulated
// (slowly) on the lab host, so it is kept to set-up and handlers; loops that
// wait run in user mode where possible. On that host user-mode IN/OUT is
// allowed through the TSS I/O bitmap (IOPL is forced to 0), user mode always
// runs with IF=1, and INT n from user mode raises #UD: so IF is toggled and
// HLT executed in kernel mode.
var (
	exitWithEAX = tinyguest.ExitWithEAX
	toUser      = tinyguest.ToUser
	// picInit: IRQ0 (timer), IRQ2 (cascade) and IRQ4 (COM1) unmasked.
	picInit = tinyguest.PICInit(0xea)
	// timerHandler counts ticks at 0x90000 and acknowledges the master
	// PIC, preserving %rax.
	timerHandler = `
vec_32:
	push %rax
	incq 0x90000
	mov $0x20, %al
	out %al, $0x20
	pop %rax
	iretq
`
)

// pitPeriodic programs PIT channel 0 in mode 2 with count n.
func pitPeriodic(n int) string {
	return fmt.Sprintf(`
	mov $0x34, %%al; out %%al, $0x43
	mov $%d, %%ax; out %%al, $0x40; mov %%ah, %%al; out %%al, $0x40
`, n)
}

// testPort is a port device that logs writes and answers reads.
type testPort struct {
	writes []string
	reads  int
}

func (p *testPort) ReadPort(port uint16, data []byte) {
	for i := range data {
		data[i] = byte(0x10*len(data) + i + p.reads)
	}
	p.reads++
}

func (p *testPort) WritePort(port uint16, data []byte) {
	p.writes = append(p.writes, fmt.Sprintf("%#x:%x", port, data))
}

func TestPIOExits(t *testing.T) {
	g := newGuest(t, `
_start:
	mov $0x500, %dx
	mov $0x11, %al; out %al, %dx
	mov $0x2233, %ax; out %ax, %dx
	mov $0x44556677, %eax; out %eax, %dx
	xor %eax, %eax
	in %dx, %al; mov %eax, 0x90000
	in %dx, %ax; mov %eax, 0x90004
	in %dx, %eax; mov %eax, 0x90008
	lea msg(%rip), %rsi
	mov $3, %ecx
	rep outsb
	mov $0x2f8, %dx     /* COM2: nobody there */
	in %dx, %al
	mov %eax, 0x9000c
	xor %eax, %eax
`+exitWithEAX+`
msg: .ascii "abc"
`, machine.Config{}, tinyguest.Options{})
	dev := &testPort{}
	if err := g.m.RegisterPort(0x500, 1, dev); err != nil {
		t.Fatal(err)
	}
	g.wantExit(5*time.Second, 0)
	want := []string{"0x500:11", "0x500:3322", "0x500:77665544", "0x500:61", "0x500:62", "0x500:63"}
	if strings.Join(dev.writes, " ") != strings.Join(want, " ") {
		t.Errorf("writes %v, want %v", dev.writes, want)
	}
	if got := g.read64(0x90000) & 0xffffffff; got != 0x10 {
		t.Errorf("inb = %#x", got)
	}
	if got := g.read64(0x90004) & 0xffffffff; got != 0x2221 {
		t.Errorf("inw = %#x", got)
	}
	if got := g.read64(0x90008) & 0xffffffff; got != 0x45444342 {
		t.Errorf("inl = %#x", got)
	}
	if got := g.read64(0x9000c) & 0xff; got != 0xff {
		t.Errorf("unclaimed port read %#x, want 0xff", got)
	}
	st := g.m.Stats()
	if n := st.PortExits(0x500, false); n != 3 {
		t.Errorf("stats: %d exits for in 0x500, want 3", n)
	}
	if n := st.PortExits(0x2f8, false); n != 1 {
		t.Errorf("stats: %d exits for in 0x2f8, want 1", n)
	}
	if st.ByReason[kvm.ExitIO] < 8 || st.InGuest <= 0 {
		t.Errorf("stats: %d IO exits, %v in the guest", st.ByReason[kvm.ExitIO], st.InGuest)
	}
}

// testMMIO is a 16-byte register file.
type testMMIO struct {
	regs [16]byte
	log  []string
}

func (d *testMMIO) ReadMMIO(off uint64, data []byte) {
	if off+uint64(len(data)) > uint64(len(d.regs)) {
		for i := range data {
			data[i] = 0xee
		}
		return
	}
	copy(data, d.regs[off:])
}

func (d *testMMIO) WriteMMIO(off uint64, data []byte) {
	d.log = append(d.log, fmt.Sprintf("%d:%x", off, data))
	if off+uint64(len(data)) <= uint64(len(d.regs)) {
		copy(d.regs[off:], data)
	}
}

func TestMMIOExits(t *testing.T) {
	g := newGuest(t, `
_start:
	mov $0xd0000000, %rbx
	movb $0x11, (%rbx)
	movw $0x2233, 2(%rbx)
	movl $0x44556677, 4(%rbx)
	mov $0x8899aabbccddeeff, %rax
	mov %rax, 8(%rbx)
	mov (%rbx), %rax;   mov %rax, 0x90000
	mov 8(%rbx), %rax;  mov %rax, 0x90008
	movzwl 2(%rbx), %eax; mov %rax, 0x90010
	mov $0xd1000000, %rcx
	mov (%rcx), %rax;   mov %rax, 0x90018   /* unclaimed */
	xor %eax, %eax
`+exitWithEAX, machine.Config{}, tinyguest.Options{})
	dev := &testMMIO{}
	if err := g.m.RegisterMMIO(machine.MMIOBase, 0x1000, dev); err != nil {
		t.Fatal(err)
	}
	if err := g.m.RegisterMMIO(0x1000, 0x1000, dev); err == nil {
		t.Error("MMIO range inside RAM accepted")
	}
	g.wantExit(5*time.Second, 0)
	if got, want := strings.Join(dev.log, " "), "0:11 2:3322 4:77665544 8:ffeeddccbbaa9988"; got != want {
		t.Errorf("writes %q, want %q", got, want)
	}
	for addr, want := range map[uint64]uint64{0x90000: 0x4455667722330011, 0x90008: 0x8899aabbccddeeff, 0x90010: 0x2233, 0x90018: ^uint64(0)} {
		if got := g.read64(addr); got != want {
			t.Errorf("[%#x] = %#x, want %#x", addr, got, want)
		}
	}
}

func TestUARTOutput(t *testing.T) {
	g := newGuest(t, `
_start:
	lea msg(%rip), %rsi
1:	mov $0x3fd, %dx          /* LSR */
2:	in %dx, %al
	test $0x20, %al          /* THRE */
	jz 2b
	lodsb
	test %al, %al
	jz 3f
	mov $0x3f8, %dx
	out %al, %dx
	jmp 1b
3:	xor %eax, %eax
`+exitWithEAX+`
msg: .asciz "hello from CPL3\n"
`, machine.Config{}, tinyguest.Options{})
	g.wantExit(5*time.Second, 0)
	if got := g.console.String(); got != "hello from CPL3\n" {
		t.Errorf("console %q", got)
	}
}

// TestPITInterrupts runs user-mode code that is interrupted by PIT ticks
// through the PIC and a kernel-mode handler, with no exits of its own.
func TestPITInterrupts(t *testing.T) {
	g := newGuest(t, `
_start:
`+picInit+pitPeriodic(1193)+toUser+`
user:
	cmpq $20, 0x90000
	jb user
	mov $20, %eax
`+exitWithEAX+timerHandler, machine.Config{}, tinyguest.Options{Kernel: true})
	var vectors []int
	g.m.SetOnExit(func(e machine.Exit) {
		if e.Vector >= 0 {
			vectors = append(vectors, e.Vector)
		}
	})
	start := time.Now()
	g.wantExit(20*time.Second, 20)
	t.Logf("20 ticks of 1 ms in %v; %d injections seen at exits", time.Since(start), len(vectors))
	for _, v := range vectors {
		if v != 0x20 {
			t.Errorf("injected vector %#x, want 0x20", v)
		}
	}
}

// TestIFToggle checks that no interrupt is delivered while the guest runs
// with IF=0, even when the timer fired meanwhile, and that one is delivered
// inside a long IF=1 window. It logs where in the window it landed.
func TestIFToggle(t *testing.T) {
	g := newGuest(t, `
_start:
`+picInit+pitPeriodic(1193)+`
	mov $1000, %ebx
1:	mov $20000, %ecx        /* ~10 ms of emulated kernel code, IF=0 */
2:	dec %ecx
	jnz 2b
	mov 0x90000, %rax
	mov %rax, 0x90008       /* ticks seen while IF=0 */
	cmp $0, %rax
	jne fail
	sti
window:
	mov $2000, %ecx
3:	cmpq $0, 0x90000
	jne 4f
	dec %ecx
	jnz 3b
4:	cli
	mov %rcx, 0x90010       /* iterations left when the tick came */
	mov 0x90000, %eax
`+exitWithEAX+`
fail:
	mov $99, %eax
`+exitWithEAX+`
vec_32:
	push %rax
	incq 0x90000
	mov 8(%rsp), %rax
	mov %rax, 0x90018       /* interrupted RIP */
	mov $0x20, %al
	out %al, $0x20
	pop %rax
	iretq
`, machine.Config{}, tinyguest.Options{Kernel: true})
	windows := 0
	g.m.SetOnExit(func(e machine.Exit) {
		if e.Reason == kvm.ExitIRQWindowOpen {
			windows++
		}
	})
	g.wantExit(20*time.Second, 1)
	left := g.read64(0x90010)
	rip := g.read64(0x90018)
	t.Logf("interrupt delivered after %d of 2000 loop iterations with IF=1, at RIP %#x (window starts at %#x); %d interrupt-window exits",
		2000-left, rip, g.prog.Symbols["window"], windows)
	if left == 0 {
		t.Error("no interrupt inside a 2000-iteration IF=1 window")
	}
}

// TestHLTWakeup halts the guest repeatedly; the PIT in one-shot mode 4,
// re-armed by the handler as Linux's clockevent does, wakes it.
func TestHLTWakeup(t *testing.T) {
	g := newGuest(t, `
_start:
`+picInit+`
	mov $0x38, %al; out %al, $0x43      /* ch0, lo/hi, mode 4 */
	call arm
1:	sti
	hlt
	cli
	cmpq $10, 0x90000
	jb 1b
	mov 0x90000, %eax
`+exitWithEAX+`
arm:
	mov $2386, %ax; out %al, $0x40; mov %ah, %al; out %al, $0x40   /* 2 ms */
	ret
vec_32:
	push %rax
	incq 0x90000
	call arm
	mov $0x20, %al
	out %al, $0x20
	pop %rax
	iretq
`, machine.Config{}, tinyguest.Options{Kernel: true})
	halts := 0
	g.m.SetOnExit(func(e machine.Exit) {
		if e.Reason == kvm.ExitHLT {
			halts++
		}
	})
	start := time.Now()
	g.wantExit(20*time.Second, 10)
	el := time.Since(start)
	t.Logf("10 wake-ups from HLT in %v (%d HLT exits)", el, halts)
	if halts < 10 {
		t.Errorf("%d HLT exits, want at least 10", halts)
	}
	if el < 20*time.Millisecond {
		t.Errorf("10 one-shot periods of 2 ms took only %v", el)
	}
}

// TestUARTInput echoes bytes typed on the console from an interrupt handler.
func TestUARTInput(t *testing.T) {
	g := newGuest(t, `
_start:
`+picInit+`
	mov $0x3f9, %dx; mov $0x01, %al; out %al, %dx   /* IER: received data */
	mov $0x3fc, %dx; mov $0x08, %al; out %al, %dx   /* MCR: OUT2 */
	mov $0x3fa, %dx; mov $0x01, %al; out %al, %dx   /* FCR: FIFO on */
`+toUser+`
user:
	cmpq $6, 0x90000
	jb user
	mov 0x90000, %eax
`+exitWithEAX+`
vec_36:
	push %rax
	push %rdx
1:	mov $0x3fd, %dx
	in %dx, %al
	test $1, %al
	jz 2f
	mov $0x3f8, %dx
	in %dx, %al
	out %al, %dx
	incq 0x90000
	jmp 1b
2:	mov $0x20, %al
	out %al, $0x20
	pop %rdx
	pop %rax
	iretq
`, machine.Config{}, tinyguest.Options{Kernel: true})
	go func() {
		time.Sleep(20 * time.Millisecond)
		g.m.DeliverSerial([]byte("typed!"))
	}()
	g.wantExit(20*time.Second, 6)
	if got := g.console.String(); got != "typed!" {
		t.Errorf("echo %q", got)
	}
}

func TestStops(t *testing.T) {
	for _, tc := range []struct {
		name   string
		src    string
		kernel bool
		want   machine.StopKind
	}{
		{"i8042 reset", "_start:\n mov $0xfe, %al\n out %al, $0x64\n jmp .\n", false, machine.StopReset},
		{"port 0xcf9 reset", "_start:\n mov $0x06, %al\n mov $0xcf9, %dx\n out %al, %dx\n jmp .\n", false, machine.StopReset},
		{"triple fault", "_start:\n ud2\n", false, machine.StopTripleFault},
		{"halt with IF=0", "_start:\n cli\n hlt\n", true, machine.StopHalted},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := newGuest(t, tc.src, machine.Config{}, tinyguest.Options{Kernel: tc.kernel})
			if stop := g.run(5 * time.Second); stop.Kind != tc.want {
				t.Errorf("stop %v, want %v", stop, tc.want)
			}
		})
	}
}

// traceEntry is one deterministic exit as the determinism test sees it.
type traceEntry struct {
	Count  uint64
	Reason kvm.ExitReason
	RIP    uint64
	Vector int
}

// runScripted runs a guest that mixes port I/O, timer interrupts and
// console input, on a manual clock that advances 10 us per exit, with input
// typed at fixed exit counts. It returns the exit trace, the final
// registers and a hash of memory.
func runScripted(t *testing.T) ([]traceEntry, kvm.Regs, [32]byte, string) {
	g := newGuest(t, `
_start:
`+picInit+pitPeriodic(120)+`
	mov $0x3f9, %dx; mov $0x01, %al; out %al, %dx
	mov $0x3fc, %dx; mov $0x08, %al; out %al, %dx
`+toUser+`
user:
	mov $0x500, %dx
1:	in %dx, %al                /* an exit, so time moves */
	add %rax, %r8
	imul $31, %r8
	cmpq $40, 0x90000
	jb 1b
	cmpq $3, 0x90010
	jb 1b
	xor %eax, %eax
`+exitWithEAX+timerHandler+`
vec_36:
	push %rax
	push %rdx
	mov $0x3f8, %dx
	in %dx, %al
	out %al, %dx
	incq 0x90010
	mov $0x20, %al
	out %al, $0x20
	pop %rdx
	pop %rax
	iretq
`, machine.Config{Clock: &machine.ManualClock{}, WallTime: time.Unix(1e9, 0)}, tinyguest.Options{Kernel: true})
	if err := g.m.RegisterPort(0x500, 1, &testPort{}); err != nil {
		t.Fatal(err)
	}
	clock := g.m.Clock().(*machine.ManualClock)
	script := map[uint64]string{100: "x", 250: "y", 400: "z"}
	var trace []traceEntry
	g.m.SetOnExit(func(e machine.Exit) {
		trace = append(trace, traceEntry{e.Count, e.Reason, e.RIP, e.Vector})
		clock.Advance(10 * time.Microsecond)
		if s, ok := script[e.Count]; ok {
			g.m.DeliverSerial([]byte(s))
		}
	})
	g.wantExit(30*time.Second, 0)
	regs, err := g.m.VCPU().GetRegs()
	if err != nil {
		t.Fatal(err)
	}
	mem, _ := g.m.Memory().Slice(0, g.m.Memory().Size())
	return trace, regs, sha256.Sum256(mem), g.console.String()
}

func TestDeterminism(t *testing.T) {
	t1, r1, h1, c1 := runScripted(t)
	t2, r2, h2, c2 := runScripted(t)
	injections := 0
	for _, e := range t1 {
		if e.Vector >= 0 {
			injections++
		}
	}
	t.Logf("%d deterministic exits, %d injections, console %q", len(t1), injections, c1)
	if injections < 40 {
		t.Errorf("only %d injections: the test did not exercise interrupts", injections)
	}
	if len(t1) != len(t2) {
		t.Errorf("trace lengths differ: %d vs %d", len(t1), len(t2))
	}
	for i := range min(len(t1), len(t2)) {
		if t1[i] != t2[i] {
			t.Fatalf("traces diverge at exit %d: %+v vs %+v", i, t1[i], t2[i])
		}
	}
	if r1 != r2 {
		t.Errorf("final registers differ:\n%+v\n%+v", r1, r2)
	}
	if !bytes.Equal(h1[:], h2[:]) {
		t.Error("final memory differs")
	}
	if c1 != "xyz" || c1 != c2 {
		t.Errorf("console %q and %q, want xyz", c1, c2)
	}
}

// TestQueuedInterruptIsVCPUState queues a vector with KVM_INTERRUPT, saves
// the vCPU before the guest ran, and checks that the vector is in the saved
// events and is delivered by a second machine restored from that state.
func TestQueuedInterruptIsVCPUState(t *testing.T) {
	src := `
_start:
	jmp _start
vec_48:
	mov $48, %eax
` + exitWithEAX
	a := newGuest(t, src, machine.Config{}, tinyguest.Options{IF: true})
	if err := a.m.VCPU().Interrupt(48); err != nil {
		t.Fatal(err)
	}
	st, err := a.m.SaveVCPU()
	if err != nil {
		t.Fatal(err)
	}
	if st.Events.Interrupt.Injected != 1 || st.Events.Interrupt.Nr != 48 {
		t.Fatalf("saved events %+v: queued vector 48 missing", st.Events.Interrupt)
	}
	b := newGuest(t, src, machine.Config{}, tinyguest.Options{})
	if err := b.m.RestoreVCPU(st); err != nil {
		t.Fatal(err)
	}
	b.wantExit(5*time.Second, 48)
}
