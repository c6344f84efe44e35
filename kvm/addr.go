package kvm

import "unsafe"

// addrOf is the host address of a byte slice, for ioctls that take one.
func addrOf(b []byte) uintptr { return uintptr(unsafe.Pointer(&b[0])) }

// HostAddr returns the address of mem's first byte, for
// UserMemoryRegion.UserspaceAddr. mem must be non-empty and must stay mapped
// (not Go heap memory) while the slot exists.
func HostAddr(mem []byte) uint64 { return uint64(addrOf(mem)) }
