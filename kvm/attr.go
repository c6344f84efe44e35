package kvm

import "unsafe"

// deviceAttr is struct kvm_device_attr.
type deviceAttr struct {
	Flags uint32
	Group uint32
	Attr  uint64
	Addr  uint64
}

var (
	ioSetDeviceAttr = iowT[deviceAttr](0xe1)
	ioGetDeviceAttr = iowT[deviceAttr](0xe2)
	ioHasDeviceAttr = iowT[deviceAttr](0xe3)
)

// CapVCPUAttributes says vCPUs take KVM_{GET,SET,HAS}_DEVICE_ATTR.
const CapVCPUAttributes Cap = 127

// vCPU attribute group and attribute of the TSC offset.
const (
	vcpuTSCCtrl   = 0
	vcpuTSCOffset = 0
)

// HasTSCOffset reports whether the TSC offset attribute is available.
func (c *VCPU) HasTSCOffset() bool {
	a := deviceAttr{Group: vcpuTSCCtrl, Attr: vcpuTSCOffset}
	return ioctlPtr(c.fd, ioHasDeviceAttr, &a) == nil
}

// TSCOffset reads the guest TSC offset: guest TSC = host TSC + offset.
func (c *VCPU) TSCOffset() (int64, error) {
	var v int64
	a := deviceAttr{Group: vcpuTSCCtrl, Attr: vcpuTSCOffset, Addr: uint64(uintptr(unsafe.Pointer(&v)))}
	return v, wrap("KVM_GET_DEVICE_ATTR(TSC offset)", ioctlPtr(c.fd, ioGetDeviceAttr, &a))
}

// SetTSCOffset sets the guest TSC offset.
func (c *VCPU) SetTSCOffset(off int64) error {
	a := deviceAttr{Group: vcpuTSCCtrl, Attr: vcpuTSCOffset, Addr: uint64(uintptr(unsafe.Pointer(&off)))}
	return wrap("KVM_SET_DEVICE_ATTR(TSC offset)", ioctlPtr(c.fd, ioSetDeviceAttr, &a))
}
