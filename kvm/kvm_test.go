package kvm

import (
	"errors"
	"os"
	"runtime"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// openOrSkip opens /dev/kvm; tests that need it skip where there is none,
// except in CI, which must run them.
func openOrSkip(t *testing.T) *System {
	t.Helper()
	s, err := Open()
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("CI needs /dev/kvm: %v", err)
		}
		t.Skipf("no KVM: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// realModeVM makes a VM with one page of memory at 0 holding code, and a
// vCPU in real mode about to run it at 0:0.
func realModeVM(t *testing.T, code []byte) (*VM, *VCPU, []byte) {
	t.Helper()
	s := openOrSkip(t)
	vm, err := s.CreateVM()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { vm.Close() })
	if vm.CheckExtension(CapSetTSSAddr) != 0 {
		if err := vm.SetTSSAddr(0xfffbd000); err != nil {
			t.Fatal(err)
		}
	}
	mem, err := unix.Mmap(-1, 0, 0x10000, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(mem) })
	copy(mem, code)
	if err := vm.SetUserMemoryRegion(UserMemoryRegion{Slot: 0, Flags: MemLogDirtyPages, MemorySize: uint64(len(mem)), UserspaceAddr: uint64(addrOf(mem))}); err != nil {
		t.Fatal(err)
	}
	cpu, err := vm.CreateVCPU(0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cpu.Close() })
	sr, err := cpu.GetSregs()
	if err != nil {
		t.Fatal(err)
	}
	sr.CS.Base, sr.CS.Selector = 0, 0
	if err := cpu.SetSregs(sr); err != nil {
		t.Fatal(err)
	}
	if err := cpu.SetRegs(Regs{RIP: 0, RFLAGS: 2}); err != nil {
		t.Fatal(err)
	}
	return vm, cpu, mem
}

func TestCapabilities(t *testing.T) {
	s := openOrSkip(t)
	for _, c := range []Cap{CapUserMemory, CapImmediateExit, CapVCPUEvents, CapExtCPUID, CapMPState} {
		if s.CheckExtension(c) == 0 {
			t.Errorf("capability %d missing", c)
		}
	}
	if s.CheckExtension(Cap(1<<20)) != 0 {
		t.Error("nonsense capability reported present")
	}
	ids, err := s.SupportedCPUID()
	if err != nil || len(ids) == 0 {
		t.Fatalf("SupportedCPUID: %d entries, %v", len(ids), err)
	}
	msrs, err := s.MSRIndexList()
	if err != nil || len(msrs) == 0 {
		t.Fatalf("MSRIndexList: %d entries, %v", len(msrs), err)
	}
}

func TestRunIOAndHLT(t *testing.T) {
	// mov al,0x42; out 0x10,al; in al,0x11; mov [0x100],al; hlt
	code := []byte{0xb0, 0x42, 0xe6, 0x10, 0xe4, 0x11, 0xa2, 0x00, 0x01, 0xf4}
	vm, cpu, mem := realModeVM(t, code)
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	next := func() ExitReason {
		t.Helper()
		for {
			if err := cpu.Run(); err != nil {
				t.Fatal(err)
			}
			if r := cpu.ExitReason(); r != ExitIntr {
				return r
			}
		}
	}
	if r := next(); r != ExitIO {
		t.Fatalf("exit %v, want IO", r)
	}
	io := cpu.IO()
	data, err := cpu.IOData()
	if err != nil || io.Direction != IOOut || io.Port != 0x10 || io.Size != 1 || data[0] != 0x42 {
		t.Fatalf("out exit: %+v data %v err %v", *io, data, err)
	}
	if r := next(); r != ExitIO || cpu.IO().Direction != IOIn || cpu.IO().Port != 0x11 {
		t.Fatalf("exit %v %+v, want IN 0x11", r, *cpu.IO())
	}
	data, _ = cpu.IOData()
	data[0] = 0x99
	if r := next(); r != ExitHLT {
		t.Fatalf("exit %v, want HLT", r)
	}
	if mem[0x100] != 0x99 {
		t.Errorf("guest stored %#x, want the 0x99 we returned", mem[0x100])
	}
	regs, err := cpu.GetRegs()
	if err != nil || regs.RIP != uint64(len(code)) {
		t.Errorf("RIP %#x after HLT, want %#x (%v)", regs.RIP, len(code), err)
	}
	bm := make([]uint64, 1)
	if err := vm.GetDirtyLog(0, bm); err != nil {
		t.Fatal(err)
	}
	if bm[0]&1 == 0 {
		t.Errorf("dirty log %#x misses page 0 written by the guest", bm[0])
	}
	for _, get := range []func() error{
		func() error { _, err := cpu.GetFPU(); return err },
		func() error { _, err := cpu.GetVCPUEvents(); return err },
		func() error { _, err := cpu.GetDebugRegs(); return err },
		func() error { _, err := cpu.GetMPState(); return err },
		func() error { _, err := cpu.GetCPUID2(); return err },
		func() error { return cpu.GetMSRs([]MSR{{Index: 0x10}}) },
	} {
		if err := get(); err != nil {
			t.Error(err)
		}
	}
}

func TestKick(t *testing.T) {
	vm, cpu, _ := realModeVM(t, []byte{0xeb, 0xfe}) // jmp $
	_ = vm
	done := make(chan ExitReason)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		cpu.BindThread()
		defer cpu.UnbindThread()
		err := cpu.Run()
		if err != nil {
			t.Error(err)
		}
		done <- cpu.ExitReason()
	}()
	time.Sleep(50 * time.Millisecond)
	cpu.Kick()
	select {
	case r := <-done:
		if r != ExitIntr {
			t.Errorf("exit %v after kick, want INTR", r)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("kick did not stop KVM_RUN")
	}
	if !cpu.ClearImmediateExit() {
		t.Error("immediate_exit was not set by Kick")
	}
	// With immediate_exit set before entry, KVM_RUN returns at once.
	cpu.SetImmediateExit(true)
	if err := cpu.Run(); err != nil || cpu.ExitReason() != ExitIntr {
		t.Errorf("immediate exit: %v %v", cpu.ExitReason(), err)
	}
	cpu.SetImmediateExit(false)
}

func TestErrorsNameTheIoctl(t *testing.T) {
	_, cpu, _ := realModeVM(t, nil)
	err := cpu.SetMSRs([]MSR{{Index: 0xdeadbeef, Data: 1}})
	if err == nil {
		t.Fatal("bogus MSR accepted")
	}
	var kerr *Error
	if errors.As(err, &kerr) {
		t.Logf("%v", err)
	}
	if _, err := OpenPath("/nonexistent/kvm"); err == nil {
		t.Error("opening a missing device succeeded")
	}
}
