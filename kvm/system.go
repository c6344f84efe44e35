package kvm

import (
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"
)

// APIVersion is the only KVM API version there has ever been.
const APIVersion = 12

// Capabilities (KVM_CAP_*) that the VMM checks.
type Cap uintptr

// Capabilities we probe.
const (
	CapUserMemory    Cap = 3
	CapSetTSSAddr    Cap = 4
	CapExtCPUID      Cap = 7
	CapNrMemslots    Cap = 10
	CapMPState       Cap = 14
	CapSetGuestDebug Cap = 23
	CapVCPUEvents    Cap = 41
	CapDebugRegs     Cap = 50
	CapXSAVE         Cap = 55
	CapXCRs          Cap = 56
	CapTSCControl    Cap = 60
	CapGetTSCKHz     Cap = 61
	CapSyncRegs      Cap = 74
	CapImmediateExit Cap = 136
	CapXSAVE2        Cap = 208
)

// System is an open /dev/kvm.
type System struct {
	fd int
}

// Open opens /dev/kvm and checks the API version.
func Open() (*System, error) { return OpenPath("/dev/kvm") }

// OpenPath opens a KVM device node at path.
func OpenPath(path string) (*System, error) {
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("kvm: open %s: %w", path, err)
	}
	s := &System{fd: fd}
	v, err := ioctl(fd, ioGetAPIVersion, 0)
	if err != nil {
		s.Close()
		return nil, wrap("KVM_GET_API_VERSION", err)
	}
	if v != APIVersion {
		s.Close()
		return nil, fmt.Errorf("kvm: %s speaks API version %d, need %d", path, v, APIVersion)
	}
	return s, nil
}

// Close closes the handle. VMs created from it stay valid.
func (s *System) Close() error {
	if s.fd < 0 {
		return nil
	}
	err := unix.Close(s.fd)
	s.fd = -1
	return err
}

// CheckExtension returns KVM_CHECK_EXTENSION's answer for c (0: absent).
func (s *System) CheckExtension(c Cap) int {
	r, err := ioctl(s.fd, ioCheckExtension, uintptr(c))
	if err != nil {
		return 0
	}
	return int(r)
}

// RequireExtensions returns an error naming the first missing capability.
func (s *System) RequireExtensions(caps ...Cap) error {
	for _, c := range caps {
		if s.CheckExtension(c) == 0 {
			return fmt.Errorf("kvm: host lacks required capability %d", c)
		}
	}
	return nil
}

// VCPUMmapSize is the size of a vCPU's kvm_run mapping.
func (s *System) VCPUMmapSize() (int, error) {
	r, err := ioctl(s.fd, ioGetVCPUMmapSize, 0)
	return int(r), wrap("KVM_GET_VCPU_MMAP_SIZE", err)
}

// SupportedCPUID returns the CPUID leaves KVM can expose on this host.
func (s *System) SupportedCPUID() ([]CPUIDEntry, error) {
	for n := 128; n <= 4096; n *= 2 {
		entries, err := getCPUID(s.fd, ioGetSupportedCPUID, n)
		if err == unix.E2BIG {
			continue
		}
		return entries, wrap("KVM_GET_SUPPORTED_CPUID", err)
	}
	return nil, &Error{Op: "KVM_GET_SUPPORTED_CPUID", Err: unix.E2BIG}
}

// MSRIndexList returns the MSRs KVM saves and restores for a vCPU.
func (s *System) MSRIndexList() ([]uint32, error) {
	for n := 256; n <= 8192; n *= 2 {
		buf := make([]uint32, 1+n)
		buf[0] = uint32(n)
		_, err := ioctl(s.fd, ioGetMSRIndexList, uintptr(unsafe.Pointer(&buf[0])))
		if err == unix.E2BIG {
			continue
		}
		if err != nil {
			return nil, wrap("KVM_GET_MSR_INDEX_LIST", err)
		}
		return append([]uint32(nil), buf[1:1+buf[0]]...), nil
	}
	return nil, &Error{Op: "KVM_GET_MSR_INDEX_LIST", Err: unix.E2BIG}
}

// getCPUID runs a kvm_cpuid2-shaped ioctl with room for n entries.
func getCPUID(fd int, req uintptr, n int) ([]CPUIDEntry, error) {
	buf := make([]byte, int(unsafe.Sizeof(cpuidHeader{}))+n*int(unsafe.Sizeof(CPUIDEntry{})))
	hdr := (*cpuidHeader)(unsafe.Pointer(&buf[0]))
	hdr.Nent = uint32(n)
	if _, err := ioctl(fd, req, uintptr(unsafe.Pointer(&buf[0]))); err != nil {
		return nil, err
	}
	all := unsafe.Slice((*CPUIDEntry)(unsafe.Pointer(&buf[unsafe.Sizeof(cpuidHeader{})])), n)
	return append([]CPUIDEntry(nil), all[:hdr.Nent]...), nil
}

// CreateVM creates a virtual machine of the default type.
func (s *System) CreateVM() (*VM, error) {
	fd, err := ioctl(s.fd, ioCreateVM, 0)
	if err != nil {
		return nil, wrap("KVM_CREATE_VM", err)
	}
	mmapSize, err := s.VCPUMmapSize()
	if err != nil {
		unix.Close(int(fd))
		return nil, err
	}
	return &VM{fd: int(fd), sys: s, mmapSize: mmapSize}, nil
}
