package virtio

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
)

// virtio-mmio register offsets, version 2 layout (spec 4.2.2).
const (
	RegMagicValue        = 0x000
	RegVersion           = 0x004
	RegDeviceID          = 0x008
	RegVendorID          = 0x00c
	RegDeviceFeatures    = 0x010
	RegDeviceFeaturesSel = 0x014
	RegDriverFeatures    = 0x020
	RegDriverFeaturesSel = 0x024
	RegQueueSel          = 0x030
	RegQueueNumMax       = 0x034
	RegQueueNum          = 0x038
	RegQueueReady        = 0x044
	RegQueueNotify       = 0x050
	RegInterruptStatus   = 0x060
	RegInterruptACK      = 0x064
	RegStatus            = 0x070
	RegQueueDescLow      = 0x080
	RegQueueDescHigh     = 0x084
	RegQueueDriverLow    = 0x090
	RegQueueDriverHigh   = 0x094
	RegQueueDeviceLow    = 0x0a0
	RegQueueDeviceHigh   = 0x0a4
	RegSHMSel            = 0x0ac
	RegSHMLenLow         = 0x0b0
	RegSHMLenHigh        = 0x0b4
	RegSHMBaseLow        = 0x0b8
	RegSHMBaseHigh       = 0x0bc
	RegConfigGeneration  = 0x0fc
	RegConfig            = 0x100
)

// Values of the identification registers.
const (
	MagicValue = 0x74726976 // "virt"
	Version    = 2
	VendorID   = 0x554d4551 // "QEMU": what Linux and firmware expect of emulated devices
)

// InterruptStatus bits.
const (
	InterruptUsedBuffer   = 1
	InterruptConfigChange = 2
)

// MMIOSize is the size of a virtio-mmio register window.
const MMIOSize = 0x200

// knownStatus is every status bit the spec defines.
const knownStatus = StatusAcknowledge | StatusDriver | StatusDriverOK | StatusFeaturesOK | StatusDeviceNeedsReset | StatusFailed

// MMIO is the virtio-mmio transport (version 2) for one device. It
// implements the machine's MMIODevice interface and the Transport a device
// sees.
type MMIO struct {
	dev     Device
	mem     GuestMemory
	irq     InterruptLine
	log     *slog.Logger
	offered uint64 // device features plus FeatureVersion1
	queues  []*Queue

	status            uint32
	deviceFeaturesSel uint32
	driverFeaturesSel uint32
	driverFeatures    uint64 // as the driver wrote them; negotiated once FEATURES_OK holds
	queueSel          uint32
	interruptStatus   uint32
	configGeneration  uint32

	active  bool  // Activate called since the last reset
	line    bool  // level last driven on irq
	failure error // why the device is broken (host-side diagnostic, not saved)
}

// NewMMIO puts dev behind a virtio-mmio register window. irq is the
// device's interrupt line; mem is guest RAM.
func NewMMIO(dev Device, mem GuestMemory, irq InterruptLine) *MMIO {
	m := &MMIO{dev: dev, mem: mem, irq: irq, log: slog.New(slog.DiscardHandler)}
	m.offered = dev.Features()&(1<<24-1) | FeatureVersion1
	for _, n := range dev.QueueMaxSizes() {
		m.queues = append(m.queues, NewQueue(mem, n))
	}
	return m
}

// SetLogger sets where the transport reports a device going broken.
func (m *MMIO) SetLogger(l *slog.Logger) { m.log = l }

// Queue returns virtqueue i, or nil.
func (m *MMIO) Queue(i int) *Queue {
	if i < 0 || i >= len(m.queues) {
		return nil
	}
	return m.queues[i]
}

// Status is the device status register.
func (m *MMIO) Status() uint32 { return m.status }

// InterruptStatus is the InterruptStatus register.
func (m *MMIO) InterruptStatus() uint32 { return m.interruptStatus }

// Broken returns why the device needs a reset, or nil if it does not.
func (m *MMIO) Broken() error {
	if m.status&StatusDeviceNeedsReset == 0 {
		return nil
	}
	return m.failure
}

// SignalUsed raises the used-buffer interrupt for queue i unless the
// driver suppressed interrupts on it.
func (m *MMIO) SignalUsed(i int) {
	q := m.Queue(i)
	if q == nil || !q.Ready() || !q.WantsInterrupt() {
		return
	}
	m.interruptStatus |= InterruptUsedBuffer
	m.updateLine()
}

// SignalConfigChange bumps ConfigGeneration and raises the configuration
// change interrupt.
func (m *MMIO) SignalConfigChange() {
	m.configGeneration++
	m.interruptStatus |= InterruptConfigChange
	m.updateLine()
}

// Fail marks the device broken (DEVICE_NEEDS_RESET) and stops all queue
// processing until the driver resets it. The driver hears of it through a
// configuration change interrupt if it has set DRIVER_OK (spec 2.1.2).
func (m *MMIO) Fail(reason error) {
	if m.status&StatusDeviceNeedsReset != 0 {
		return
	}
	m.log.Warn("virtio device needs reset", "type", m.dev.Type(), "reason", reason)
	m.failure = reason
	m.status |= StatusDeviceNeedsReset
	m.haltQueues()
	if m.status&StatusDriverOK != 0 {
		m.SignalConfigChange()
	}
}

func (m *MMIO) haltQueues() {
	for _, q := range m.queues {
		q.halted = true
	}
}

func (m *MMIO) updateLine() {
	level := m.interruptStatus != 0
	if level != m.line {
		m.line = level
		if m.irq != nil {
			m.irq(level)
		}
	}
}

// reset is a write of 0 to Status: device and transport back to their
// initial state. ConfigGeneration keeps counting so a driver never sees an
// old value again.
func (m *MMIO) reset() {
	m.dev.Reset()
	for _, q := range m.queues {
		q.reset()
	}
	m.status, m.deviceFeaturesSel, m.driverFeaturesSel, m.driverFeatures = 0, 0, 0, 0
	m.queueSel, m.interruptStatus, m.active, m.failure = 0, 0, false, nil
	m.updateLine()
}

// selected is the queue QueueSel points at, or nil.
func (m *MMIO) selected() *Queue {
	if m.queueSel >= uint32(len(m.queues)) {
		return nil
	}
	return m.queues[m.queueSel]
}

// ReadMMIO handles a guest read of the register window. Registers are
// 32-bit: other widths and unaligned offsets read as zero. The
// configuration space takes 1, 2 and 4-byte reads.
func (m *MMIO) ReadMMIO(offset uint64, data []byte) {
	clear(data)
	if offset >= RegConfig {
		if n := len(data); n == 1 || n == 2 || n == 4 {
			m.dev.ReadConfig(offset-RegConfig, data)
		}
		return
	}
	if len(data) != 4 || offset%4 != 0 {
		return
	}
	binary.LittleEndian.PutUint32(data, m.readReg(offset))
}

func (m *MMIO) readReg(offset uint64) uint32 {
	q := m.selected()
	switch offset {
	case RegMagicValue:
		return MagicValue
	case RegVersion:
		return Version
	case RegDeviceID:
		return m.dev.Type()
	case RegVendorID:
		return VendorID
	case RegDeviceFeatures:
		if m.deviceFeaturesSel > 1 {
			return 0
		}
		return uint32(m.offered >> (32 * m.deviceFeaturesSel))
	case RegQueueNumMax:
		if q == nil {
			return 0
		}
		return uint32(q.maxSize)
	case RegQueueReady:
		if q == nil || !q.ready {
			return 0
		}
		return 1
	case RegInterruptStatus:
		return m.interruptStatus
	case RegStatus:
		return m.status
	case RegSHMLenLow, RegSHMLenHigh:
		return 0xffffffff // no shared memory regions: length -1
	case RegConfigGeneration:
		return m.configGeneration
	}
	return 0
}

// WriteMMIO handles a guest write to the register window. Registers take
// 4-byte aligned writes only; the configuration space takes 1, 2 and 4
// bytes.
func (m *MMIO) WriteMMIO(offset uint64, data []byte) {
	if offset >= RegConfig {
		if n := len(data); n == 1 || n == 2 || n == 4 {
			m.dev.WriteConfig(offset-RegConfig, data)
		}
		return
	}
	if len(data) != 4 || offset%4 != 0 {
		return
	}
	m.writeReg(offset, binary.LittleEndian.Uint32(data))
}

func (m *MMIO) writeReg(offset uint64, v uint32) {
	switch offset {
	case RegDeviceFeaturesSel:
		m.deviceFeaturesSel = v
	case RegDriverFeaturesSel:
		m.driverFeaturesSel = v
	case RegDriverFeatures:
		// Features are fixed once FEATURES_OK is set.
		if m.status&StatusFeaturesOK == 0 && m.driverFeaturesSel <= 1 {
			shift := 32 * m.driverFeaturesSel
			m.driverFeatures = m.driverFeatures&^(0xffffffff<<shift) | uint64(v)<<shift
		}
	case RegQueueSel:
		m.queueSel = v
	case RegQueueNum, RegQueueDescLow, RegQueueDescHigh, RegQueueDriverLow, RegQueueDriverHigh,
		RegQueueDeviceLow, RegQueueDeviceHigh:
		m.writeQueueReg(offset, v)
	case RegQueueReady:
		m.writeQueueReady(v)
	case RegQueueNotify:
		m.notify(v)
	case RegInterruptACK:
		m.interruptStatus &^= v
		m.updateLine()
	case RegStatus:
		m.writeStatus(v)
	}
}

// writeQueueReg sets the selected queue's size or a ring address. The
// driver may change them only while the queue is disabled and before
// DRIVER_OK (spec 4.2.2.3); other writes are ignored.
func (m *MMIO) writeQueueReg(offset uint64, v uint32) {
	q := m.selected()
	if q == nil || q.ready || m.status&StatusDriverOK != 0 {
		return
	}
	setLow := func(p *uint64) { *p = *p&^0xffffffff | uint64(v) }
	setHigh := func(p *uint64) { *p = *p&0xffffffff | uint64(v)<<32 }
	switch offset {
	case RegQueueNum:
		q.size = uint16(v)
		if v > 0xffff {
			q.size = 0 // never valid: enabling the queue will fail
		}
	case RegQueueDescLow:
		setLow(&q.desc)
	case RegQueueDescHigh:
		setHigh(&q.desc)
	case RegQueueDriverLow:
		setLow(&q.driver)
	case RegQueueDriverHigh:
		setHigh(&q.driver)
	case RegQueueDeviceLow:
		setLow(&q.device)
	case RegQueueDeviceHigh:
		setHigh(&q.device)
	}
}

// writeQueueReady enables or disables the selected queue. Enabling checks
// the size and rings; a driver that got them wrong gets a broken device
// rather than a queue that silently never works.
func (m *MMIO) writeQueueReady(v uint32) {
	q := m.selected()
	if q == nil {
		return
	}
	if v&1 == 0 {
		q.ready = false
		return
	}
	if q.ready || m.status&StatusDriverOK != 0 {
		return
	}
	if err := q.enable(); err != nil {
		m.Fail(fmt.Errorf("queue %d: %w", m.queueSel, err))
	}
}

func (m *MMIO) notify(v uint32) {
	q := m.Queue(int(v & 0xffff))
	if q == nil || !m.active || !q.Ready() {
		return
	}
	m.dev.Notify(int(v & 0xffff))
}

// ErrFeatures is why FEATURES_OK was refused.
var ErrFeatures = errors.New("virtio: driver accepted features the device does not offer, or not VIRTIO_F_VERSION_1")

func (m *MMIO) featuresAcceptable() bool {
	return m.driverFeatures&^m.offered == 0 && m.driverFeatures&FeatureVersion1 != 0
}

// writeStatus applies a driver write to Status. 0 resets the device.
// Otherwise bits are only ever added (the driver must not clear them), and
// DEVICE_NEEDS_RESET is the device's to set.
func (m *MMIO) writeStatus(v uint32) {
	if v == 0 {
		m.reset()
		return
	}
	old := m.status
	next := old | v&knownStatus&^StatusDeviceNeedsReset
	added := next &^ old
	if added&StatusFeaturesOK != 0 && !m.featuresAcceptable() {
		// Left clear: the driver reads Status back and gives up.
		next &^= StatusFeaturesOK
	}
	m.status = next
	if added&StatusDriverOK != 0 && next&StatusDeviceNeedsReset != 0 {
		// Broken before the driver was listening: tell it now.
		m.SignalConfigChange()
		return
	}
	if added&StatusDriverOK != 0 {
		if next&StatusFeaturesOK == 0 {
			m.Fail(errors.New("DRIVER_OK without FEATURES_OK"))
			return
		}
		m.active = true
		m.dev.Activate(m, m.driverFeatures)
	}
}

// QueueState is the saved state of one virtqueue.
type QueueState struct {
	Size      uint16
	Ready     bool
	Desc      uint64 // descriptor table GPA
	Driver    uint64 // available ring GPA
	Device    uint64 // used ring GPA
	NextAvail uint16 // next available entry the device will consume
	NextUsed  uint16 // used->idx the device last published
}

// MMIOState is the guest-visible state of a transport and its device.
type MMIOState struct {
	DeviceType        uint32
	Status            uint32
	DeviceFeaturesSel uint32
	DriverFeaturesSel uint32
	DriverFeatures    uint64
	QueueSel          uint32
	InterruptStatus   uint32
	ConfigGeneration  uint32
	Queues            []QueueState
	Device            []byte // Device.SaveState
}

// Save returns the transport's and the device's state.
func (m *MMIO) Save() MMIOState {
	s := MMIOState{
		DeviceType: m.dev.Type(), Status: m.status,
		DeviceFeaturesSel: m.deviceFeaturesSel, DriverFeaturesSel: m.driverFeaturesSel,
		DriverFeatures: m.driverFeatures, QueueSel: m.queueSel,
		InterruptStatus: m.interruptStatus, ConfigGeneration: m.configGeneration,
		Device: m.dev.SaveState(),
	}
	for _, q := range m.queues {
		s.Queues = append(s.Queues, QueueState{
			Size: q.size, Ready: q.ready, Desc: q.desc, Driver: q.driver, Device: q.device,
			NextAvail: q.nextAvail, NextUsed: q.nextUsed,
		})
	}
	return s
}

// validate checks s against this transport's device and memory.
func (m *MMIO) validate(s MMIOState) error {
	switch {
	case s.DeviceType != m.dev.Type():
		return fmt.Errorf("device type %d, this device is type %d", s.DeviceType, m.dev.Type())
	case s.Status&^knownStatus != 0:
		return fmt.Errorf("status %#x has undefined bits", s.Status)
	case s.InterruptStatus&^(InterruptUsedBuffer|InterruptConfigChange) != 0:
		return fmt.Errorf("interrupt status %#x has undefined bits", s.InterruptStatus)
	case len(s.Queues) != len(m.queues):
		return fmt.Errorf("%d queues, the device has %d", len(s.Queues), len(m.queues))
	}
	broken := s.Status&StatusDeviceNeedsReset != 0
	if s.Status&StatusFeaturesOK != 0 {
		saved := m.driverFeatures
		m.driverFeatures = s.DriverFeatures
		ok := m.featuresAcceptable()
		m.driverFeatures = saved
		if !ok {
			return fmt.Errorf("FEATURES_OK with features %#x, offered %#x: %w", s.DriverFeatures, m.offered, ErrFeatures)
		}
	}
	if s.Status&StatusDriverOK != 0 && s.Status&StatusFeaturesOK == 0 && !broken {
		return errors.New("DRIVER_OK without FEATURES_OK on a device that is not broken")
	}
	for i, qs := range s.Queues {
		// A disabled queue may hold any size the driver wrote to QueueNum.
		if qs.Ready {
			maxSize := m.queues[i].maxSize
			if err := checkRings(m.mem, maxSize, qs.Size, qs.Desc, qs.Driver, qs.Device); err != nil {
				return fmt.Errorf("queue %d: %w", i, err)
			}
			if pending := qs.NextAvail - qs.NextUsed; pending > qs.Size {
				return fmt.Errorf("queue %d: %d chains in flight (avail %d, used %d), more than the size %d",
					i, pending, qs.NextAvail, qs.NextUsed, qs.Size)
			}
		}
	}
	return nil
}

// Restore replaces the transport's and the device's state with s after
// validating it; on error both are unchanged. A device that was running is
// activated again.
func (m *MMIO) Restore(s MMIOState) error {
	if err := m.validate(s); err != nil {
		return fmt.Errorf("virtio: restore: %w", err)
	}
	if err := m.dev.RestoreState(s.Device); err != nil {
		return fmt.Errorf("virtio: restore device type %d: %w", s.DeviceType, err)
	}
	m.status, m.deviceFeaturesSel, m.driverFeaturesSel = s.Status, s.DeviceFeaturesSel, s.DriverFeaturesSel
	m.driverFeatures, m.queueSel, m.interruptStatus = s.DriverFeatures, s.QueueSel, s.InterruptStatus
	m.configGeneration = s.ConfigGeneration
	broken := s.Status&StatusDeviceNeedsReset != 0
	m.failure = nil
	if broken {
		m.failure = errors.New("virtio: restored a device that needed a reset")
	}
	for i, qs := range s.Queues {
		q := m.queues[i]
		q.size, q.ready, q.desc, q.driver, q.device = qs.Size, qs.Ready, qs.Desc, qs.Driver, qs.Device
		q.nextAvail, q.nextUsed, q.halted = qs.NextAvail, qs.NextUsed, broken
	}
	// Drive the line to the restored level whatever it was before.
	m.line = m.interruptStatus != 0
	if m.irq != nil {
		m.irq(m.line)
	}
	m.active = s.Status&StatusDriverOK != 0 && s.Status&StatusFeaturesOK != 0 && !broken
	if m.active {
		m.dev.Activate(m, m.driverFeatures)
	}
	return nil
}
