// Package virtio implements virtio 1.x devices (VIRTIO_F_VERSION_1) on the
// virtio-mmio transport with split virtqueues.
//
// Devices follow the machine's determinism rules: every read or write of
// guest memory (rings, used index, event index, buffers) happens on the vCPU
// thread, inside the exit that triggered it (a register access or queue
// notify) or inside an input delivery from the machine; every write goes
// through GuestMemory so it is marked dirty. Work from the outside world (a
// received packet) arrives only through the machine's input path; output
// (a transmitted packet) leaves only through an output function the machine
// gives the device, which the FT layer can hold back.
//
// Everything the guest hands a device is validated: descriptor addresses and
// lengths must lie inside guest memory, chains must not loop or exceed the
// queue size, directions must match what the device expects. A bad chain is
// refused (the request fails, or the device enters DEVICE_NEEDS_RESET), never
// a VMM panic and never an access outside guest memory.
package virtio

// GuestMemory is guest RAM as a device sees it. Every access is
// bounds-checked (an error, never a panic, for a range outside RAM) and every
// write marks the pages dirty. *machine.Memory implements it.
type GuestMemory interface {
	Size() uint64
	// Slice is a read-only view of [gpa, gpa+n).
	Slice(gpa, n uint64) ([]byte, error)
	// MutableSlice is a writable view of [gpa, gpa+n); its pages are marked dirty.
	MutableSlice(gpa, n uint64) ([]byte, error)
	ReadAt(p []byte, gpa uint64) error
	WriteAt(p []byte, gpa uint64) error
}

// InterruptLine drives the device's interrupt request line at the
// interrupt controller. The transport keeps it asserted while its
// InterruptStatus register is non-zero.
type InterruptLine func(level bool)

// Feature bits common to all devices (spec 6). Device-specific bits are
// below 24.
const (
	// FeatureVersion1 says the device is a virtio 1.x device; the transport
	// always offers it and requires the driver to accept it.
	FeatureVersion1 = uint64(1) << 32
)

// Device status bits (spec 2.1), as the driver writes them to Status.
const (
	StatusAcknowledge      = 0x01
	StatusDriver           = 0x02
	StatusDriverOK         = 0x04
	StatusFeaturesOK       = 0x08
	StatusDeviceNeedsReset = 0x40
	StatusFailed           = 0x80
)

// Device types (spec 5).
const (
	DeviceNet   = 1
	DeviceBlock = 2
)

// Device is one virtio device (block, network, ...) behind a transport. The
// transport owns the registers, feature negotiation and the virtqueues; the
// device owns its configuration space and what requests mean.
//
// Every method is called on the vCPU thread, inside the exit that caused
// it, and never concurrently.
type Device interface {
	// Type is the virtio device ID (DeviceNet, DeviceBlock, ...).
	Type() uint32
	// Features is the set of device-specific feature bits offered (bits
	// 0-23). The transport adds FeatureVersion1.
	Features() uint64
	// QueueMaxSizes has one entry per virtqueue: its maximum size, a power
	// of two no larger than QueueMax. Its length is the number of queues.
	QueueMaxSizes() []uint16
	// ReadConfig fills data (1, 2 or 4 bytes) from the device configuration
	// space at offset; bytes past the end of the space read as zero.
	ReadConfig(offset uint64, data []byte)
	// WriteConfig is a driver write to the configuration space; devices
	// ignore writes to read-only fields.
	WriteConfig(offset uint64, data []byte)
	// Activate is called when the driver sets DRIVER_OK after a successful
	// feature negotiation (and after a Restore of a running device). From
	// then until Reset the device may use t: pop chains from its queues,
	// push them used and signal interrupts, in Notify or on any later call
	// made on the vCPU thread (a received packet, for instance).
	Activate(t Transport, features uint64)
	// Notify is the driver's notification that queue has new buffers
	// (QueueNotify). Only called while the device is active and not broken.
	Notify(queue int)
	// Reset returns the device to its initial state and makes it forget
	// the transport: the driver wrote 0 to Status.
	Reset()
	// SaveState returns the device's guest-visible state, opaque to the
	// transport. Host-side resources (files, sockets, packets waiting in
	// the host) are not part of it.
	SaveState() []byte
	// RestoreState validates state (from SaveState of a device with the
	// same configuration) and, if it is good, puts the device in that state
	// as if it had just been reset, ready for Activate. On error the device
	// is unchanged.
	RestoreState(state []byte) error
}

// Transport is what an active device sees of its transport.
type Transport interface {
	// Queue returns virtqueue i, or nil if there is no such queue.
	Queue(i int) *Queue
	// SignalUsed tells the driver that queue i has new used buffers: it
	// raises the used-buffer interrupt unless the driver suppressed it.
	SignalUsed(i int)
	// SignalConfigChange tells the driver that the configuration space
	// changed.
	SignalConfigChange()
	// Fail marks the device broken after the driver handed it something it
	// cannot process (a malformed chain, say): DEVICE_NEEDS_RESET, a
	// configuration change interrupt, and no more queue processing until
	// the driver resets the device.
	Fail(reason error)
}
