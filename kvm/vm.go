package kvm

import (
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"
)

// VM is a KVM virtual machine.
type VM struct {
	fd       int
	sys      *System
	mmapSize int
}

// Close closes the VM. Its vCPUs must be closed first.
func (vm *VM) Close() error {
	if vm.fd < 0 {
		return nil
	}
	err := unix.Close(vm.fd)
	vm.fd = -1
	return err
}

// CheckExtension asks the VM (some capabilities are per VM).
func (vm *VM) CheckExtension(c Cap) int {
	r, err := ioctl(vm.fd, ioCheckExtension, uintptr(c))
	if err != nil {
		return 0
	}
	return int(r)
}

// SetUserMemoryRegion installs, changes or (with size 0) deletes a slot.
func (vm *VM) SetUserMemoryRegion(r UserMemoryRegion) error {
	return wrap(fmt.Sprintf("KVM_SET_USER_MEMORY_REGION slot %d", r.Slot), ioctlPtr(vm.fd, ioSetUserMemRegion, &r))
}

// SetTSSAddr places the three pages Intel VMX needs for real-mode emulation.
func (vm *VM) SetTSSAddr(addr uint32) error {
	_, err := ioctl(vm.fd, ioSetTSSAddr, uintptr(addr))
	return wrap("KVM_SET_TSS_ADDR", err)
}

// SetIdentityMapAddr places the identity-map page Intel VMX needs.
func (vm *VM) SetIdentityMapAddr(addr uint64) error {
	return wrap("KVM_SET_IDENTITY_MAP_ADDR", ioctlPtr(vm.fd, ioSetIdentityMapAddr, &addr))
}

// GetDirtyLog fetches and clears KVM's dirty bitmap for a slot into bitmap,
// one bit per 4 KiB page, which must have room for the whole slot (rounded up
// to 64 pages).
func (vm *VM) GetDirtyLog(slot uint32, bitmap []uint64) error {
	if len(bitmap) == 0 {
		return fmt.Errorf("kvm: KVM_GET_DIRTY_LOG slot %d: empty bitmap", slot)
	}
	d := dirtyLog{Slot: slot, Bitmap: uint64(uintptr(unsafe.Pointer(&bitmap[0])))}
	return wrap(fmt.Sprintf("KVM_GET_DIRTY_LOG slot %d", slot), ioctlPtr(vm.fd, ioGetDirtyLog, &d))
}

// CreateVCPU creates vCPU id and maps its kvm_run page.
func (vm *VM) CreateVCPU(id int) (*VCPU, error) {
	fd, err := ioctl(vm.fd, ioCreateVCPU, uintptr(id))
	if err != nil {
		return nil, wrap("KVM_CREATE_VCPU", err)
	}
	if vm.mmapSize < int(unsafe.Sizeof(runHeader{}))+runExitOffset {
		unix.Close(int(fd))
		return nil, fmt.Errorf("kvm: kvm_run mapping of %d bytes is too small", vm.mmapSize)
	}
	mem, err := unix.Mmap(int(fd), 0, vm.mmapSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		unix.Close(int(fd))
		return nil, fmt.Errorf("kvm: mmap kvm_run: %w", err)
	}
	return &VCPU{fd: int(fd), run: mem, hdr: (*runHeader)(unsafe.Pointer(&mem[0]))}, nil
}
