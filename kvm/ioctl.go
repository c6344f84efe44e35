package kvm

import (
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Linux's _IOC encoding for x86.
const (
	iocNone  = 0
	iocWrite = 1
	iocRead  = 2

	kvmio = 0xAE
)

func ioc(dir, nr, size uintptr) uintptr {
	return dir<<30 | size<<16 | kvmio<<8 | nr
}

func io(nr uintptr) uintptr           { return ioc(iocNone, nr, 0) }
func ior(nr, size uintptr) uintptr    { return ioc(iocRead, nr, size) }
func iow(nr, size uintptr) uintptr    { return ioc(iocWrite, nr, size) }
func iowr(nr, size uintptr) uintptr   { return ioc(iocRead|iocWrite, nr, size) }
func sizeOf[T any]() uintptr          { var v T; return unsafe.Sizeof(v) }
func iorT[T any](nr uintptr) uintptr  { return ior(nr, sizeOf[T]()) }
func iowT[T any](nr uintptr) uintptr  { return iow(nr, sizeOf[T]()) }
func iowrT[T any](nr uintptr) uintptr { return iowr(nr, sizeOf[T]()) }

// The ioctl request numbers we use, computed from our struct definitions so
// that a struct of the wrong size shows up as a wrong number in the ABI test.
var (
	ioGetAPIVersion      = io(0x00)
	ioCreateVM           = io(0x01)
	ioGetMSRIndexList    = iowrT[msrList](0x02)
	ioCheckExtension     = io(0x03)
	ioGetVCPUMmapSize    = io(0x04)
	ioGetSupportedCPUID  = iowrT[cpuidHeader](0x05)
	ioCreateVCPU         = io(0x41)
	ioGetDirtyLog        = iowT[dirtyLog](0x42)
	ioSetUserMemRegion   = iowT[UserMemoryRegion](0x46)
	ioSetTSSAddr         = io(0x47)
	ioSetIdentityMapAddr = iowT[uint64](0x48)
	ioRun                = io(0x80)
	ioGetRegs            = iorT[Regs](0x81)
	ioSetRegs            = iowT[Regs](0x82)
	ioGetSregs           = iorT[Sregs](0x83)
	ioSetSregs           = iowT[Sregs](0x84)
	ioTranslate          = iowrT[Translation](0x85)
	ioInterrupt          = iowT[interrupt](0x86)
	ioGetMSRs            = iowrT[msrsHeader](0x88)
	ioSetMSRs            = iowT[msrsHeader](0x89)
	ioGetFPU             = iorT[FPU](0x8c)
	ioSetFPU             = iowT[FPU](0x8d)
	ioSetCPUID2          = iowT[cpuidHeader](0x90)
	ioGetCPUID2          = iowrT[cpuidHeader](0x91)
	ioGetMPState         = iorT[MPState](0x98)
	ioSetMPState         = iowT[MPState](0x99)
	ioSetGuestDebug      = iowT[GuestDebug](0x9b)
	ioGetVCPUEvents      = iorT[VCPUEvents](0x9f)
	ioSetVCPUEvents      = iowT[VCPUEvents](0xa0)
	ioGetDebugRegs       = iorT[DebugRegs](0xa1)
	ioSetDebugRegs       = iowT[DebugRegs](0xa2)
	ioSetTSCKHz          = io(0xa2)
	ioGetTSCKHz          = io(0xa3)
	ioGetXSAVE           = iorT[XSAVE](0xa4)
	ioSetXSAVE           = iowT[XSAVE](0xa5)
	ioGetXCRs            = iorT[XCRs](0xa6)
	ioSetXCRs            = iowT[XCRs](0xa7)
)

// ioctl issues one ioctl, retrying on EINTR except for KVM_RUN (where EINTR
// is the answer to a kick, not a failure).
func ioctl(fd int, req uintptr, arg uintptr) (uintptr, error) {
	for {
		r, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, arg)
		if errno == unix.EINTR && req != ioRun {
			continue
		}
		if errno != 0 {
			return r, errno
		}
		return r, nil
	}
}

// ioctlPtr is ioctl with a pointer argument.
func ioctlPtr[T any](fd int, req uintptr, p *T) error {
	_, err := ioctl(fd, req, uintptr(unsafe.Pointer(p)))
	return err
}

// Error is a failed ioctl, naming it.
type Error struct {
	Op  string
	Err error
}

func (e *Error) Error() string { return fmt.Sprintf("kvm: %s: %v", e.Op, e.Err) }
func (e *Error) Unwrap() error { return e.Err }

func wrap(op string, err error) error {
	if err == nil {
		return nil
	}
	return &Error{Op: op, Err: err}
}
