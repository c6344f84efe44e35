// Package boot puts a Linux kernel, its initrd and command line into guest
// memory and returns the vCPU state to start it with, using the 64-bit boot
// protocol (Documentation/arch/x86/boot.rst): the VMM builds the zero page
// (struct boot_params) with an e820 map, writes an MP table for the one
// processor, identity-maps the low 4 GiB and
// enters the kernel in long mode with RSI pointing at the zero page. No
// real-mode or 32-bit code runs, which matters on hosts where those are
// emulated.
//
// Two kernel formats are accepted: a bzImage (whose 64-bit entry still runs
// the decompressor) and an ELF vmlinux (entered at startup_64 directly).
// Every function is pure over a Memory; bad images give errors that name the
// file, never a panic.
package boot

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/gokvm-ft/gokvm-ft/kvm"
)

// Memory is guest RAM as the loader sees it.
type Memory interface {
	WriteAt(p []byte, gpa uint64) error
	Size() uint64
}

// Guest physical layout used by the loader.
const (
	gdtAddr      = 0x500
	ZeroPageAddr = 0x7000
	pml4Addr     = 0x9000
	pdptAddr     = 0xa000
	pdAddr       = 0xb000 // four page directories: 0xb000-0xefff
	stackTop     = 0x8ff0 // scratch stack below the page tables until the kernel sets its own
	CmdlineAddr  = 0x20000
	ebdaStart    = 0x9fc00 // end of low conventional memory
	biosStart    = 0xe0000
	highMemStart = 0x100000
	// KernelAddr is where a kernel is loaded: LOAD_PHYSICAL_ADDR of x86-64
	// kernels (CONFIG_PHYSICAL_START), 16 MiB.
	KernelAddr = 0x1000000
	// MinMemory is the least RAM a kernel is loaded into.
	MinMemory = 32 << 20
)

// Boot segment selectors the boot protocol asks for.
const (
	bootCS = 0x10
	bootDS = 0x18
)

// Config is what to boot.
type Config struct {
	KernelName string // for error messages
	Kernel     []byte
	InitrdName string
	Initrd     []byte // nil: none
	Cmdline    string
}

// Result says where things went and how to start the vCPU.
type Result struct {
	Format      string // "bzImage" or "ELF vmlinux"
	Entry       uint64
	KernelStart uint64
	KernelEnd   uint64
	InitrdAddr  uint64
	Regs        kvm.Regs
	// SetSregs fills the special registers of the initial state into s
	// (segment caches, GDT, CR0/3/4, EFER), keeping the rest.
	SetSregs func(s *kvm.Sregs)
}

// FileError is a problem with one input file.
type FileError struct {
	File string
	Err  error
}

func (e *FileError) Error() string { return e.File + ": " + e.Err.Error() }
func (e *FileError) Unwrap() error { return e.Err }

// ErrFormat is wrapped by errors about a file that is not a kernel we know.
var ErrFormat = errors.New("not a bzImage or ELF vmlinux")

// Load loads cfg into mem.
func Load(mem Memory, cfg Config) (*Result, error) {
	kname := cfg.KernelName
	if kname == "" {
		kname = "kernel"
	}
	if mem.Size() < MinMemory {
		return nil, fmt.Errorf("guest memory of %d MiB is too small for Linux (at least %d MiB)", mem.Size()>>20, MinMemory>>20)
	}
	var (
		k   *kernelImage
		err error
	)
	switch {
	case bytes.HasPrefix(cfg.Kernel, []byte("\x7fELF")):
		k, err = parseELF(cfg.Kernel)
	case len(cfg.Kernel) >= 0x206 && string(cfg.Kernel[0x202:0x206]) == "HdrS":
		k, err = parseBzImage(cfg.Kernel)
	default:
		err = fmt.Errorf("%w (no ELF magic, no \"HdrS\" setup header)", ErrFormat)
	}
	if err != nil {
		return nil, &FileError{kname, err}
	}
	if k.end > mem.Size() {
		return nil, &FileError{kname, fmt.Errorf("kernel needs memory up to %#x (%d MiB) but the guest has %d MiB", k.end, (k.end+1<<20-1)>>20, mem.Size()>>20)}
	}
	if uint64(len(cfg.Cmdline))+1 > uint64(k.cmdlineSize) {
		return nil, fmt.Errorf("kernel command line of %d bytes exceeds the kernel's limit of %d", len(cfg.Cmdline), k.cmdlineSize-1)
	}
	for _, s := range k.segments {
		if err := mem.WriteAt(s.data, s.addr); err != nil {
			return nil, &FileError{kname, err}
		}
		if s.memsz > uint64(len(s.data)) { // .bss: memory is zeroed, but be explicit for reused memory
			if err := mem.WriteAt(make([]byte, s.memsz-uint64(len(s.data))), s.addr+uint64(len(s.data))); err != nil {
				return nil, &FileError{kname, err}
			}
		}
	}

	zp := make([]byte, 4096)
	copy(zp[setupHeaderOffset:], k.header)
	hdr := zp[setupHeaderOffset:]
	hdr[offTypeOfLoader-setupHeaderOffset] = 0xff // undefined loader
	hdr[offLoadFlags-setupHeaderOffset] |= loadedHigh
	put32(hdr, offCmdLinePtr, CmdlineAddr)
	res := &Result{Format: k.format, Entry: k.entry, KernelStart: k.start, KernelEnd: k.end}

	if cfg.Initrd != nil {
		iname := cfg.InitrdName
		if iname == "" {
			iname = "initrd"
		}
		addr, err := placeInitrd(mem.Size(), k, uint64(len(cfg.Initrd)))
		if err != nil {
			return nil, &FileError{iname, err}
		}
		if err := mem.WriteAt(cfg.Initrd, addr); err != nil {
			return nil, &FileError{iname, err}
		}
		put32(hdr, offRamdiskImage, uint32(addr))
		put32(hdr, offRamdiskSize, uint32(len(cfg.Initrd)))
		res.InitrdAddr = addr
	}
	if err := mem.WriteAt(append([]byte(cfg.Cmdline), 0), CmdlineAddr); err != nil {
		return nil, err
	}
	e820 := E820Map(mem.Size())
	zp[offE820Entries] = byte(len(e820))
	for i, e := range e820 {
		b := zp[offE820Table+20*i:]
		binary.LittleEndian.PutUint64(b[0:], e.Addr)
		binary.LittleEndian.PutUint64(b[8:], e.Size)
		binary.LittleEndian.PutUint32(b[16:], e.Type)
	}
	if err := mem.WriteAt(zp, ZeroPageAddr); err != nil {
		return nil, err
	}
	if err := writePageTables(mem); err != nil {
		return nil, err
	}
	if err := writeGDT(mem); err != nil {
		return nil, err
	}
	if err := writeMPTables(mem); err != nil {
		return nil, err
	}
	res.Regs = kvm.Regs{RIP: k.entry, RSI: ZeroPageAddr, RSP: stackTop, RFLAGS: 2}
	res.SetSregs = setLongModeSregs
	return res, nil
}

// placeInitrd puts the initrd as high as the kernel allows, page aligned,
// and checks that it fits above the kernel.
func placeInitrd(memSize uint64, k *kernelImage, size uint64) (uint64, error) {
	if size == 0 {
		return 0, errors.New("initrd is empty")
	}
	top := min(memSize, uint64(k.initrdAddrMax)+1)
	if size > top {
		return 0, fmt.Errorf("initrd of %d MiB does not fit below %#x", size>>20, top)
	}
	addr := (top - size) &^ 0xfff
	if addr < k.end {
		return 0, fmt.Errorf("initrd of %d MiB would overlap the kernel (ends at %#x): %d MiB of guest memory is not enough", size>>20, k.end, memSize>>20)
	}
	return addr, nil
}

// E820Entry is one entry of the BIOS memory map.
type E820Entry struct {
	Addr, Size uint64
	Type       uint32
}

// E820 types.
const (
	E820RAM      = 1
	E820Reserved = 2
)

// E820Map is the memory map the guest is given: low memory up to the EBDA,
// the legacy BIOS area reserved, and the rest of RAM from 1 MiB.
func E820Map(memSize uint64) []E820Entry {
	return []E820Entry{
		{0, ebdaStart, E820RAM},
		{ebdaStart, 0xa0000 - ebdaStart, E820Reserved},
		{biosStart, highMemStart - biosStart, E820Reserved},
		{highMemStart, memSize - highMemStart, E820RAM},
	}
}

// writePageTables identity-maps the low 4 GiB with 2 MiB pages.
func writePageTables(mem Memory) error {
	const pte = 0x3 // present, writable
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], pdptAddr|pte)
	if err := mem.WriteAt(b[:], pml4Addr); err != nil {
		return err
	}
	pdpt := make([]byte, 4096)
	for i := uint64(0); i < 4; i++ {
		binary.LittleEndian.PutUint64(pdpt[8*i:], (pdAddr+0x1000*i)|pte)
	}
	if err := mem.WriteAt(pdpt, pdptAddr); err != nil {
		return err
	}
	pd := make([]byte, 4*4096)
	for i := uint64(0); i < 4*512; i++ {
		binary.LittleEndian.PutUint64(pd[8*i:], i<<21|pte|0x80)
	}
	return mem.WriteAt(pd, pdAddr)
}

// gdtEntries: null, null, __BOOT_CS (64-bit code), __BOOT_DS.
var gdtEntries = []uint64{0, 0, 0x00af9b000000ffff, 0x00cf93000000ffff}

func writeGDT(mem Memory) error {
	b := make([]byte, 8*len(gdtEntries))
	for i, e := range gdtEntries {
		binary.LittleEndian.PutUint64(b[8*i:], e)
	}
	return mem.WriteAt(b, gdtAddr)
}

// setLongModeSregs sets the long-mode state the 64-bit boot protocol asks
// for: paging on with our identity map, __BOOT_CS/__BOOT_DS flat segments.
func setLongModeSregs(s *kvm.Sregs) {
	code := kvm.Segment{Limit: 0xffffffff, Selector: bootCS, Type: 11, Present: 1, S: 1, L: 1, G: 1}
	data := kvm.Segment{Limit: 0xffffffff, Selector: bootDS, Type: 3, Present: 1, S: 1, DB: 1, G: 1}
	s.CS = code
	s.DS, s.ES, s.FS, s.GS, s.SS = data, data, data, data, data
	s.TR = kvm.Segment{Limit: 0xffff, Type: 11, Present: 1}
	s.LDT = kvm.Segment{Type: 2, Present: 1, Unusable: 1}
	s.GDT = kvm.DTable{Base: gdtAddr, Limit: uint16(8*len(gdtEntries) - 1)}
	s.IDT = kvm.DTable{}
	s.CR0 = 0x80050033 // PG, AM, WP, NE, ET, MP, PE
	s.CR3 = pml4Addr
	s.CR4 = 0x20   // PAE
	s.EFER = 0x500 // LMA, LME
}

func put32(b []byte, off int, v uint32) {
	binary.LittleEndian.PutUint32(b[off-setupHeaderOffset:], v)
}
