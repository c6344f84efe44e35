package boot

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
)

// Offsets into the zero page (struct boot_params) and its setup header.
const (
	offE820Entries    = 0x1e8
	setupHeaderOffset = 0x1f1
	offSetupSects     = 0x1f1
	offBootFlag       = 0x1fe
	offJump           = 0x200
	offHeaderMagic    = 0x202
	offVersion        = 0x206
	offTypeOfLoader   = 0x210
	offLoadFlags      = 0x211
	offRamdiskImage   = 0x218
	offRamdiskSize    = 0x21c
	offCmdLinePtr     = 0x228
	offInitrdAddrMax  = 0x22c
	offKernelAlign    = 0x230
	offRelocatable    = 0x234
	offXLoadFlags     = 0x236
	offCmdlineSize    = 0x238
	offPrefAddress    = 0x258
	offInitSize       = 0x260
	offE820Table      = 0x2d0
	setupHeaderEnd    = 0x268 // end of the 2.15 header

	loadedHigh   = 0x01
	xlfKernel64  = 0x01
	minProtocol  = 0x206
	bootFlag     = 0xaa55
	maxE820Table = 128
)

// segment is a piece of kernel to copy into guest memory.
type segment struct {
	addr  uint64
	data  []byte
	memsz uint64
}

// kernelImage is a parsed kernel, ready to load.
type kernelImage struct {
	format        string
	segments      []segment
	entry         uint64
	start, end    uint64 // guest memory the kernel occupies, including what it needs to run
	header        []byte // setup header to put into the zero page at 0x1f1
	initrdAddrMax uint32
	cmdlineSize   uint32
}

// parseBzImage checks a bzImage's setup header and finds its 64-bit entry.
func parseBzImage(b []byte) (*kernelImage, error) {
	if len(b) < 0x250 {
		return nil, fmt.Errorf("truncated bzImage: %d bytes, the setup header alone needs %d", len(b), 0x250)
	}
	le := binary.LittleEndian
	if le.Uint16(b[offBootFlag:]) != bootFlag {
		return nil, fmt.Errorf("%w: boot flag %#x, want %#x", ErrFormat, le.Uint16(b[offBootFlag:]), bootFlag)
	}
	version := le.Uint16(b[offVersion:])
	if version < minProtocol {
		return nil, fmt.Errorf("boot protocol %d.%02d is older than the 2.06 we need", version>>8, version&0xff)
	}
	if version < 0x20c || b[offXLoadFlags]&xlfKernel64 == 0 {
		return nil, errors.New("kernel has no 64-bit entry point (XLF_KERNEL_64): a 32-bit or pre-2.12 kernel")
	}
	if b[offLoadFlags]&loadedHigh == 0 {
		return nil, errors.New("zImage (loaded low) kernels are not supported")
	}
	setupSects := int(b[offSetupSects])
	if setupSects == 0 {
		setupSects = 4
	}
	pmOffset := (setupSects + 1) * 512
	if pmOffset >= len(b) {
		return nil, fmt.Errorf("truncated bzImage: %d bytes, setup alone takes %d", len(b), pmOffset)
	}
	hdrEnd := min(offJump+2+int(b[offJump+1]), len(b), setupHeaderEnd)
	if hdrEnd <= offHeaderMagic {
		return nil, errors.New("setup header length is corrupt")
	}
	pm := b[pmOffset:]
	initSize := uint64(len(pm))
	if version >= 0x20a {
		initSize = max(initSize, uint64(le.Uint32(b[offInitSize:])))
	}
	k := &kernelImage{
		format:        "bzImage",
		segments:      []segment{{addr: KernelAddr, data: pm, memsz: uint64(len(pm))}},
		entry:         KernelAddr + 0x200, // the 64-bit entry is 512 bytes into the protected-mode code
		start:         KernelAddr,
		end:           KernelAddr + initSize,
		header:        bytes.Clone(b[setupHeaderOffset:hdrEnd]),
		initrdAddrMax: le.Uint32(b[offInitrdAddrMax:]),
		cmdlineSize:   256,
	}
	if version >= 0x206 {
		k.cmdlineSize = le.Uint32(b[offCmdlineSize:])
	}
	if k.cmdlineSize == 0 {
		return nil, errors.New("setup header says the command line may have 0 bytes")
	}
	if b[offRelocatable] == 0 && version >= 0x20a && le.Uint64(b[offPrefAddress:]) != KernelAddr {
		return nil, fmt.Errorf("non-relocatable kernel wants to run at %#x, we load at %#x", le.Uint64(b[offPrefAddress:]), KernelAddr)
	}
	return k, nil
}

// parseELF loads an ELF vmlinux at its physical addresses; its entry point
// (phys_startup_64) is physical too.
func parseELF(b []byte) (*kernelImage, error) {
	f, err := elf.NewFile(bytes.NewReader(b))
	if err != nil {
		return nil, fmt.Errorf("bad ELF: %w", err)
	}
	defer f.Close()
	if f.Class != elf.ELFCLASS64 || f.Machine != elf.EM_X86_64 {
		return nil, fmt.Errorf("ELF is %v %v, want ELFCLASS64 x86-64", f.Class, f.Machine)
	}
	if f.Type != elf.ET_EXEC {
		return nil, fmt.Errorf("ELF type %v, want an executable vmlinux", f.Type)
	}
	k := &kernelImage{format: "ELF vmlinux", start: math.MaxUint64, initrdAddrMax: 0x7fffffff, cmdlineSize: 2048, entry: f.Entry}
	for _, p := range f.Progs {
		if p.Type != elf.PT_LOAD || p.Memsz == 0 {
			continue
		}
		if p.Filesz > p.Memsz || p.Off > uint64(len(b)) || p.Filesz > uint64(len(b))-p.Off {
			return nil, fmt.Errorf("truncated ELF: segment at file offset %#x, %d bytes, file has %d", p.Off, p.Filesz, len(b))
		}
		if p.Paddr+p.Memsz < p.Paddr || p.Paddr < highMemStart {
			return nil, fmt.Errorf("ELF segment at physical %#x (+%#x) is not loadable", p.Paddr, p.Memsz)
		}
		k.segments = append(k.segments, segment{addr: p.Paddr, data: b[p.Off : p.Off+p.Filesz], memsz: p.Memsz})
		k.start = min(k.start, p.Paddr)
		k.end = max(k.end, p.Paddr+p.Memsz)
	}
	if len(k.segments) == 0 {
		return nil, errors.New("ELF has no loadable segments")
	}
	if k.entry < k.start || k.entry >= k.end {
		return nil, fmt.Errorf("ELF entry %#x is outside the loaded kernel [%#x, %#x): not a vmlinux with a physical entry", k.entry, k.start, k.end)
	}
	// A minimal setup header, as a bzImage would have supplied it.
	h := make([]byte, setupHeaderEnd-setupHeaderOffset)
	le := binary.LittleEndian
	le.PutUint16(h[offBootFlag-setupHeaderOffset:], bootFlag)
	copy(h[offHeaderMagic-setupHeaderOffset:], "HdrS")
	le.PutUint16(h[offVersion-setupHeaderOffset:], 0x20f)
	h[offLoadFlags-setupHeaderOffset] = loadedHigh
	le.PutUint32(h[offInitrdAddrMax-setupHeaderOffset:], k.initrdAddrMax)
	le.PutUint32(h[offKernelAlign-setupHeaderOffset:], 0x200000)
	le.PutUint32(h[offCmdlineSize-setupHeaderOffset:], k.cmdlineSize)
	k.header = h
	return k, nil
}
