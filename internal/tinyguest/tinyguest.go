// Package tinyguest builds and loads tiny hand-written 64-bit guests for
// tests and benchmarks: it assembles a GNU as source, places the code in
// guest memory, and sets up long mode directly (identity-mapped page tables
// for the low 4 GiB, a GDT with kernel and user segments, a TSS, an IDT
// built from the program's handler symbols) so the guest starts at its
// _start symbol without any 16- or 32-bit code, which this lab's nested KVM
// only emulates slowly.
//
// By default the guest starts at CPL3 with IOPL=3, so its port I/O exits
// straight to the VMM and its code runs natively. Handlers named vec_N run
// at CPL0 (kernel code segment), handlers named uvec_N run at CPL3; a
// handler named vec_N or uvec_N becomes IDT entry N, reachable by software
// INT from CPL3.
package tinyguest

import (
	"debug/elf"
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/gokvm-ft/gokvm-ft/kvm"
)

// Guest physical layout.
const (
	PML4Addr      = 0x1000
	PDPTAddr      = 0x2000
	PDAddr        = 0x3000 // four page directories, 0x3000-0x6fff
	GDTAddr       = 0x7000
	TSSAddr       = 0x7100
	IDTAddr       = 0xa000
	KernelStack   = 0xf000     // top of the CPL0 stack (TSS.RSP0)
	tssLimit      = 104 + 8192 // header, then one I/O permission bit per port
	CodeBase      = 0x10000
	UserStack     = 0x80000 // initial RSP
	DataBase      = 0x90000 // scratch page the programs may use
	MinMemorySize = 0x100000
)

// Segment selectors in the GDT.
const (
	KernelCS = 0x08
	KernelDS = 0x10
	UserDS   = 0x1b
	UserCS   = 0x23
	TSSSel   = 0x28
)

// Program is an assembled guest.
type Program struct {
	Code    []byte
	Symbols map[string]uint64
}

// Assemble assembles src (GNU as, AT&T syntax, .code64) linked at
// CodeBase, in dir (a scratch directory).
func Assemble(dir, src string) (*Program, error) {
	s := filepath.Join(dir, "guest.S")
	o := filepath.Join(dir, "guest.o")
	e := filepath.Join(dir, "guest.elf")
	if err := os.WriteFile(s, []byte(".code64\n.text\n.globl _start\n"+src+"\n"), 0o644); err != nil {
		return nil, err
	}
	if out, err := exec.Command("as", "--64", "-o", o, s).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("as: %v\n%s", err, out)
	}
	if out, err := exec.Command("ld", "-m", "elf_x86_64", "-nostdlib", "-static", "-Ttext", strconv.FormatUint(CodeBase, 16), "-e", "_start", "-o", e, o).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("ld: %v\n%s", err, out)
	}
	f, err := elf.Open(e)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	p := &Program{Symbols: map[string]uint64{}}
	var end uint64
	for _, sec := range f.Sections {
		if sec.Flags&elf.SHF_ALLOC == 0 || sec.Type == elf.SHT_NOBITS || sec.Size == 0 {
			continue
		}
		if sec.Addr < CodeBase || sec.Addr+sec.Size > DataBase {
			return nil, fmt.Errorf("section %s at %#x outside [%#x, %#x)", sec.Name, sec.Addr, CodeBase, DataBase)
		}
		if sec.Addr+sec.Size > end {
			end = sec.Addr + sec.Size
		}
	}
	p.Code = make([]byte, end-CodeBase)
	for _, sec := range f.Sections {
		if sec.Flags&elf.SHF_ALLOC == 0 || sec.Type == elf.SHT_NOBITS || sec.Size == 0 {
			continue
		}
		b, err := sec.Data()
		if err != nil {
			return nil, err
		}
		copy(p.Code[sec.Addr-CodeBase:], b)
	}
	syms, err := f.Symbols()
	if err != nil {
		return nil, err
	}
	for _, s := range syms {
		if s.Name != "" && s.Section != elf.SHN_UNDEF {
			p.Symbols[s.Name] = s.Value
		}
	}
	if _, ok := p.Symbols["_start"]; !ok {
		return nil, fmt.Errorf("program has no _start")
	}
	return p, nil
}

// Memory is where Load writes: guest RAM.
type Memory interface {
	WriteAt(p []byte, gpa uint64) error
	Size() uint64
}

// Options tune the initial state.
type Options struct {
	Kernel bool // start at CPL0 instead of CPL3
	IF     bool // start with interrupts enabled
}

// Load writes the program and the long-mode structures into mem and sets
// the vCPU's registers so that it starts at _start.
func Load(mem Memory, cpu *kvm.VCPU, p *Program, opt Options) error {
	if mem.Size() < MinMemorySize {
		return fmt.Errorf("tiny guests need at least %#x bytes of memory", MinMemorySize)
	}
	w := func(gpa uint64, b []byte) error { return mem.WriteAt(b, gpa) }
	// Page tables: 4 GiB identity map with 2 MiB pages, user-accessible.
	const pte = 0x7 // present, writable, user
	if err := w(PML4Addr, le64(PDPTAddr|pte)); err != nil {
		return err
	}
	for i := uint64(0); i < 4; i++ {
		if err := w(PDPTAddr+8*i, le64((PDAddr+0x1000*i)|pte)); err != nil {
			return err
		}
	}
	pd := make([]byte, 4*4096)
	for i := uint64(0); i < 4*512; i++ {
		binary.LittleEndian.PutUint64(pd[8*i:], i<<21|pte|0x80) // PS: 2 MiB page
	}
	if err := w(PDAddr, pd); err != nil {
		return err
	}
	// GDT.
	gdt := make([]byte, 0x38)
	for i, d := range []uint64{0, 0x00209a0000000000, 0x0000920000000000, 0x0000f20000000000, 0x0020fa0000000000} {
		binary.LittleEndian.PutUint64(gdt[8*i:], d)
	}
	tssDesc := uint64(tssLimit) | (TSSAddr&0xffffff)<<16 | uint64(0x89)<<40 | (TSSAddr>>24&0xff)<<56
	binary.LittleEndian.PutUint64(gdt[0x28:], tssDesc)
	if err := w(GDTAddr, gdt); err != nil {
		return err
	}
	// The TSS carries an all-zero I/O permission bitmap (every port allowed
	// at CPL3) in case the host does not honour IOPL=3 in RFLAGS.
	tss := make([]byte, tssLimit+1)
	binary.LittleEndian.PutUint64(tss[4:], KernelStack) // RSP0
	binary.LittleEndian.PutUint16(tss[102:], 104)       // I/O bitmap offset
	tss[tssLimit] = 0xff                                // bitmap terminator
	if err := w(TSSAddr, tss); err != nil {
		return err
	}
	// IDT from handler symbols.
	idt := make([]byte, 4096)
	for name, addr := range p.Symbols {
		var sel uint16
		var n string
		switch {
		case strings.HasPrefix(name, "uvec_"):
			sel, n = UserCS, strings.TrimPrefix(name, "uvec_")
		case strings.HasPrefix(name, "vec_"):
			sel, n = KernelCS, strings.TrimPrefix(name, "vec_")
		default:
			continue
		}
		v, err := strconv.Atoi(n)
		if err != nil || v < 0 || v > 255 {
			return fmt.Errorf("handler symbol %s: bad vector", name)
		}
		e := idt[16*v:]
		binary.LittleEndian.PutUint16(e[0:], uint16(addr))
		binary.LittleEndian.PutUint16(e[2:], sel)
		e[5] = 0xee // present, DPL3 (reachable by INT from CPL3), 64-bit interrupt gate
		binary.LittleEndian.PutUint16(e[6:], uint16(addr>>16))
		binary.LittleEndian.PutUint32(e[8:], uint32(addr>>32))
	}
	if err := w(IDTAddr, idt); err != nil {
		return err
	}
	if err := w(CodeBase, p.Code); err != nil {
		return err
	}

	sr, err := cpu.GetSregs()
	if err != nil {
		return err
	}
	code := kvm.Segment{Limit: 0xffffffff, Type: 11, Present: 1, S: 1, L: 1, G: 1}
	data := kvm.Segment{Limit: 0xffffffff, Type: 3, Present: 1, S: 1, DB: 1, G: 1}
	if opt.Kernel {
		code.Selector, data.Selector = KernelCS, KernelDS
	} else {
		code.Selector, code.DPL, data.Selector, data.DPL = UserCS, 3, UserDS, 3
	}
	sr.CS = code
	sr.DS, sr.ES, sr.FS, sr.GS, sr.SS = data, data, data, data, data
	sr.TR = kvm.Segment{Base: TSSAddr, Limit: tssLimit, Selector: TSSSel, Type: 11, Present: 1}
	sr.LDT = kvm.Segment{Type: 2, Present: 1, Unusable: 1}
	sr.GDT = kvm.DTable{Base: GDTAddr, Limit: uint16(len(gdt) - 1)}
	sr.IDT = kvm.DTable{Base: IDTAddr, Limit: 0xfff}
	sr.CR0 = 0x80010033 // PG, WP, NE, ET, MP, PE
	sr.CR3 = PML4Addr
	sr.CR4 = 0x620  // OSXMMEXCPT, OSFXSR, PAE
	sr.EFER = 0x501 // LMA, LME, SCE
	if err := cpu.SetSregs(sr); err != nil {
		return err
	}
	rflags := uint64(0x3002) // IOPL=3, reserved bit 1
	if opt.IF {
		rflags |= 0x200
	}
	return cpu.SetRegs(kvm.Regs{RIP: p.Symbols["_start"], RSP: UserStack, RFLAGS: rflags})
}

func le64(v uint64) []byte {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], v)
	return b[:]
}
