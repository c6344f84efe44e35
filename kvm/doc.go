// Package kvm is a thin, typed layer over the Linux KVM ioctl API
// (/dev/kvm) for x86-64: System for the /dev/kvm handle, VM for a virtual
// machine, VCPU for a virtual CPU with its mmapped kvm_run page. It holds the
// kernel ABI (ioctl numbers and structs, whose sizes and offsets are checked
// against the kernel headers in tests) and nothing else: no policy, no
// devices. It is the only package besides the guest-memory accessor that uses
// unsafe.
package kvm
