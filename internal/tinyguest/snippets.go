package tinyguest

import "fmt"

// Assembly snippets the tests' guests share.
const (
	// ExitWithEAX writes %eax to the test-exit port (0x501).
	ExitWithEAX = `
	mov $0x501, %dx
	out %eax, %dx
`
	// PIT1kHz programs PIT channel 0 as a 1 kHz rate generator (IRQ0).
	PIT1kHz = `
	mov $0x34, %al; out %al, $0x43
	mov $1193, %ax; out %al, $0x40; mov %ah, %al; out %al, $0x40
`
	// CountTicks is an IRQ0 handler (vector 32, as PICInit sets) that
	// counts ticks at 0x90008 and acknowledges them at the PIC.
	CountTicks = `
vec_32:
	push %rax
	incq 0x90008
	mov $0x20, %al
	out %al, $0x20
	pop %rax
	iretq
`
	// ToUser drops to CPL3 at label user with IF=1 and the user stack.
	ToUser = `
	pushq $0x1b
	pushq $0x80000
	pushq $0x202
	pushq $0x23
	lea user(%rip), %rax
	push %rax
	iretq
`
)

// PICInit programs both 8259s as Linux does (vectors 0x20 and 0x28) and
// sets the master's mask (the slave's: all masked). Bit n clear unmasks
// IRQ n; keep IRQ2 (the cascade) clear for the slave's lines.
func PICInit(masterMask uint8) string {
	return fmt.Sprintf(`
	mov $0x11, %%al; out %%al, $0x20; out %%al, $0xa0
	mov $0x20, %%al; out %%al, $0x21
	mov $0x28, %%al; out %%al, $0xa1
	mov $0x04, %%al; out %%al, $0x21
	mov $0x02, %%al; out %%al, $0xa1
	mov $0x01, %%al; out %%al, $0x21; out %%al, $0xa1
	mov $%#x, %%al; out %%al, $0x21
	mov $0xff, %%al; out %%al, $0xa1
`, masterMask)
}
