package boot

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"strings"
	"testing"
)

// fakeMem is guest RAM in a byte slice.
type fakeMem []byte

func (m fakeMem) Size() uint64 { return uint64(len(m)) }
func (m fakeMem) WriteAt(p []byte, gpa uint64) error {
	if gpa > uint64(len(m)) || uint64(len(p)) > uint64(len(m))-gpa {
		return errors.New("out of range")
	}
	copy(m[gpa:], p)
	return nil
}

// fakeBzImage builds a minimal bzImage: 4 setup sectors plus the boot
// sector, then pmSize bytes of "kernel".
func fakeBzImage(pmSize int) []byte {
	b := make([]byte, 5*512+pmSize)
	le := binary.LittleEndian
	b[offSetupSects] = 4
	le.PutUint16(b[offBootFlag:], bootFlag)
	b[offJump], b[offJump+1] = 0xeb, byte(setupHeaderEnd-offJump-2)
	copy(b[offHeaderMagic:], "HdrS")
	le.PutUint16(b[offVersion:], 0x20f)
	b[offLoadFlags] = loadedHigh
	le.PutUint32(b[offInitrdAddrMax:], 0x7fffffff)
	le.PutUint32(b[offKernelAlign:], 0x200000)
	b[offRelocatable] = 1
	le.PutUint16(b[offXLoadFlags:], xlfKernel64)
	le.PutUint32(b[offCmdlineSize:], 2047)
	le.PutUint64(b[offPrefAddress:], KernelAddr)
	le.PutUint32(b[offInitSize:], uint32(pmSize)+0x100000)
	for i := 0; i < pmSize; i++ {
		b[5*512+i] = byte(i)
	}
	return b
}

// fakeELF builds a minimal x86-64 ELF executable with one PT_LOAD segment
// at physical paddr holding data plus bss bytes, entry at paddr.
func fakeELF(paddr uint64, data []byte, bss uint64) []byte {
	var b bytes.Buffer
	le := binary.LittleEndian
	w := func(v any) { binary.Write(&b, le, v) }
	b.Write([]byte{0x7f, 'E', 'L', 'F', 2, 1, 1, 0})
	b.Write(make([]byte, 8))
	w(uint16(2))                  // ET_EXEC
	w(uint16(62))                 // EM_X86_64
	w(uint32(1))                  // version
	w(paddr)                      // entry
	w(uint64(64))                 // phoff
	w(uint64(0))                  // shoff
	w(uint32(0))                  // flags
	w(uint16(64))                 // ehsize
	w(uint16(56))                 // phentsize
	w(uint16(1))                  // phnum
	w(uint16(64))                 // shentsize
	w(uint16(0))                  // shnum
	w(uint16(0))                  // shstrndx
	w(uint32(1))                  // PT_LOAD
	w(uint32(5))                  // flags
	w(uint64(0x1000))             // offset
	w(paddr | 0xffffffff80000000) // vaddr
	w(paddr)                      // paddr
	w(uint64(len(data)))          // filesz
	w(uint64(len(data)) + bss)
	w(uint64(0x1000))
	b.Write(make([]byte, 0x1000-b.Len()))
	b.Write(data)
	return b.Bytes()
}

func TestLoadBzImage(t *testing.T) {
	mem := make(fakeMem, 64<<20)
	k := fakeBzImage(8192)
	initrd := bytes.Repeat([]byte("initrd"), 1000)
	res, err := Load(mem, Config{KernelName: "bz", Kernel: k, Initrd: initrd, Cmdline: "console=ttyS0"})
	if err != nil {
		t.Fatal(err)
	}
	if res.Format != "bzImage" || res.Entry != KernelAddr+0x200 || res.Regs.RIP != res.Entry || res.Regs.RSI != ZeroPageAddr {
		t.Errorf("result %+v", res)
	}
	if !bytes.Equal(mem[KernelAddr:KernelAddr+8192], k[5*512:]) {
		t.Error("protected-mode code not at 16 MiB")
	}
	zp := mem[ZeroPageAddr : ZeroPageAddr+4096]
	le := binary.LittleEndian
	if string(zp[offHeaderMagic:offHeaderMagic+4]) != "HdrS" || zp[offTypeOfLoader] != 0xff {
		t.Error("setup header not copied into the zero page")
	}
	if le.Uint32(zp[offCmdLinePtr:]) != CmdlineAddr || string(mem[CmdlineAddr:CmdlineAddr+14]) != "console=ttyS0\x00" {
		t.Error("command line missing")
	}
	ia, is := le.Uint32(zp[offRamdiskImage:]), le.Uint32(zp[offRamdiskSize:])
	if is != uint32(len(initrd)) || ia%4096 != 0 || uint64(ia) != res.InitrdAddr || !bytes.Equal(mem[ia:ia+is], initrd) {
		t.Errorf("initrd at %#x+%d", ia, is)
	}
	if uint64(ia)+uint64(is) > mem.Size() || uint64(ia) < res.KernelEnd {
		t.Errorf("initrd at %#x overlaps kernel end %#x or memory end", ia, res.KernelEnd)
	}
	n := int(zp[offE820Entries])
	if n != 4 {
		t.Fatalf("%d e820 entries", n)
	}
	var ram uint64
	for i := 0; i < n; i++ {
		e := zp[offE820Table+20*i:]
		if le.Uint32(e[16:]) == E820RAM {
			ram += le.Uint64(e[8:])
		}
	}
	if ram != mem.Size()-(0x100000-ebdaStart) {
		t.Errorf("e820 RAM %#x", ram)
	}
	// Page tables map 2 MiB pages, GDT holds the boot code segment.
	if le.Uint64(mem[pml4Addr:])&^0xfff != pdptAddr || le.Uint64(mem[pdAddr+8:]) != 1<<21|0x83 {
		t.Error("page tables wrong")
	}
	if le.Uint64(mem[gdtAddr+bootCS:]) != gdtEntries[2] {
		t.Error("GDT wrong")
	}
}

// TestMPTable: the floating pointer is where Linux looks second (the last
// KiB of base memory, inside the e820 reserved range), both structures
// check out as Linux checks them (signature, length, revision, checksum),
// and the table lists one enabled bootstrap processor and an ISA bus.
func TestMPTable(t *testing.T) {
	mem := make(fakeMem, 64<<20)
	if _, err := Load(mem, Config{KernelName: "bz", Kernel: fakeBzImage(8192)}); err != nil {
		t.Fatal(err)
	}
	le := binary.LittleEndian
	sum := func(b []byte) (s byte) {
		for _, c := range b {
			s += c
		}
		return s
	}
	f := mem[0x9fc00 : 0x9fc00+16]
	if string(f[:4]) != "_MP_" || f[8] != 1 || (f[9] != 1 && f[9] != 4) || sum(f) != 0 || f[11] != 0 {
		t.Fatalf("floating pointer % x", f)
	}
	inReserved := false
	for _, e := range E820Map(mem.Size()) {
		if e.Type == E820Reserved && e.Addr <= 0x9fc00 && 0x9fc00+16+64 <= e.Addr+e.Size {
			inReserved = true
		}
	}
	if !inReserved {
		t.Error("the MP tables are not in reserved memory")
	}
	at := le.Uint32(f[4:])
	hdr := mem[at : at+44]
	n := le.Uint16(hdr[4:])
	c := mem[at : at+uint32(n)]
	if string(hdr[:4]) != "PCMP" || hdr[6] != 4 || sum(c) != 0 || le.Uint32(hdr[36:]) != 0xfee00000 || le.Uint16(hdr[34:]) != 2 {
		t.Fatalf("configuration table % x", c)
	}
	proc, bus := c[44:64], c[64:72]
	if proc[0] != 0 || proc[3] != 3 || bus[0] != 1 || string(bus[2:8]) != "ISA   " {
		t.Fatalf("entries % x / % x", proc, bus)
	}
}

func TestLoadELF(t *testing.T) {
	mem := make(fakeMem, 64<<20)
	code := []byte{0xf4, 0xeb, 0xfd}
	res, err := Load(mem, Config{Kernel: fakeELF(KernelAddr, code, 0x5000), Cmdline: "x"})
	if err != nil {
		t.Fatal(err)
	}
	if res.Format != "ELF vmlinux" || res.Entry != KernelAddr || res.KernelEnd != KernelAddr+3+0x5000 {
		t.Errorf("result %+v", res)
	}
	if !bytes.Equal(mem[KernelAddr:KernelAddr+3], code) {
		t.Error("segment not loaded at its physical address")
	}
	zp := mem[ZeroPageAddr:]
	if string(zp[offHeaderMagic:offHeaderMagic+4]) != "HdrS" || binary.LittleEndian.Uint16(zp[offBootFlag:]) != bootFlag {
		t.Error("no synthesized setup header")
	}
}

func TestBadImages(t *testing.T) {
	good := fakeBzImage(4096)
	mod := func(f func(b []byte) []byte) []byte { return f(bytes.Clone(good)) }
	cases := []struct {
		name   string
		kernel []byte
		initrd []byte
		mem    int
		cmd    string
		want   string
	}{
		{"empty", nil, nil, 64 << 20, "", "not a bzImage"},
		{"text file", []byte("#!/bin/sh\necho hi\n"), nil, 64 << 20, "", "not a bzImage"},
		{"truncated before magic", good[:0x204], nil, 64 << 20, "", "not a bzImage"},
		{"truncated header", good[:0x210], nil, 64 << 20, "", "truncated"},
		{"truncated setup", good[:0x300], nil, 64 << 20, "", "truncated"},
		{"bad boot flag", mod(func(b []byte) []byte { b[offBootFlag] = 0; return b }), nil, 64 << 20, "", "boot flag"},
		{"old protocol", mod(func(b []byte) []byte { b[offVersion] = 0x02; return b }), nil, 64 << 20, "", "older than the 2.06"},
		{"32-bit kernel", mod(func(b []byte) []byte { b[offXLoadFlags] = 0; return b }), nil, 64 << 20, "", "64-bit entry"},
		{"zImage", mod(func(b []byte) []byte { b[offLoadFlags] = 0; return b }), nil, 64 << 20, "", "zImage"},
		{"too big", mod(func(b []byte) []byte { binary.LittleEndian.PutUint32(b[offInitSize:], 60<<20); return b }), nil, 64 << 20, "", "kernel needs memory"},
		{"tiny memory", good, nil, 1 << 20, "", "too small"},
		{"initrd overlaps", good, make([]byte, 50<<20), 64 << 20, "", "overlap the kernel"},
		{"initrd empty", good, []byte{}, 64 << 20, "", "initrd is empty"},
		{"command line too long", good, nil, 64 << 20, strings.Repeat("a", 3000), "command line"},
		{"ELF truncated", fakeELF(KernelAddr, []byte{1, 2, 3}, 0)[:0x1001], nil, 64 << 20, "", "ELF"},
		{"ELF in low memory", fakeELF(0x1000, []byte{1}, 0), nil, 64 << 20, "", "not loadable"},
		{"ELF beyond memory", fakeELF(63<<20, make([]byte, 16), 2<<20), nil, 64 << 20, "", "kernel needs memory"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			mem := make(fakeMem, c.mem)
			_, err := Load(mem, Config{KernelName: "/k/" + c.name, Kernel: c.kernel, InitrdName: "/i/rd", Initrd: c.initrd, Cmdline: c.cmd})
			if err == nil {
				t.Fatal("accepted")
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Errorf("error %q does not say %q", err, c.want)
			}
			var fe *FileError
			if errors.As(err, &fe) && !strings.HasPrefix(err.Error(), "/k/") && !strings.HasPrefix(err.Error(), "/i/") {
				t.Errorf("error %q does not start with the file name", err)
			}
		})
	}
}

// FuzzLoad throws arbitrary kernels at the loader: errors are fine,
// panics and writes outside memory are not.
func FuzzLoad(f *testing.F) {
	f.Add(fakeBzImage(1024))
	f.Add(fakeELF(KernelAddr, []byte{1, 2, 3}, 10))
	mem := make(fakeMem, MinMemory) // one buffer: allocating per input would dominate
	f.Fuzz(func(t *testing.T, k []byte) {
		Load(mem, Config{Kernel: k, Initrd: []byte{1}, Cmdline: "c"})
	})
}

// TestRealImages loads the bundled images when they have been built.
func TestRealImages(t *testing.T) {
	for _, name := range []string{"../images/out/bzImage", "../images/out/vmlinux"} {
		k, err := os.ReadFile(name)
		if err != nil {
			t.Logf("skipping %s: %v", name, err)
			continue
		}
		initrd, _ := os.ReadFile("../images/out/initramfs.cpio")
		mem := make(fakeMem, 256<<20)
		res, err := Load(mem, Config{KernelName: name, Kernel: k, Initrd: initrd, Cmdline: "console=ttyS0"})
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("%s: %s entry %#x kernel [%#x, %#x) initrd at %#x", name, res.Format, res.Entry, res.KernelStart, res.KernelEnd, res.InitrdAddr)
	}
}
