package machine

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"github.com/gokvm-ft/gokvm-ft/kvm"
	"github.com/gokvm-ft/gokvm-ft/machine/pic"
	"github.com/gokvm-ft/gokvm-ft/machine/pit"
	"github.com/gokvm-ft/gokvm-ft/machine/rtc"
	"github.com/gokvm-ft/gokvm-ft/machine/uart"
	"github.com/gokvm-ft/gokvm-ft/virtio"
)

// StateVersion is the version of State. It changes whenever a field's
// meaning changes; a snapshot of another version is refused, not guessed at.
const StateVersion = 1

// ModelVersion names the machine model: the devices, their addresses and
// IRQs, the boot path. Caches of booted guests (snapshots) are keyed by it.
const ModelVersion = "gokvm-ft-pc-1"

// State is the whole guest-visible state of a machine except its memory,
// which travels beside it (package snapshot). It records enough about the
// machine's make-up (memory size, CPU policy, virtio devices) to refuse a
// restore onto a different machine.
type State struct {
	Version    int
	Model      string
	MemorySize uint64
	// CPUID is a digest of the CPUID table the vCPU was given: a snapshot
	// taken under another CPU policy or on a host of another kind is
	// refused (the guest kernel chose its code paths by it).
	CPUID string
	Host  string
	// Clock is guest time at the snapshot: the restored machine's clock
	// continues from it, and the PIT and RTC keep their phase.
	Clock time.Duration
	// Exits is the deterministic exit count: positions continue.
	Exits uint64
	// ReadyForInterrupt is whether the vCPU could take an interrupt at
	// the snapshot, as KVM said at the last exit. A restored vCPU has not
	// exited yet, so KVM's flag is stale there: the first injection
	// decision uses this one, as the source's would have (a replica then
	// injects where its primary does).
	ReadyForInterrupt bool `json:",omitempty"`
	VCPU              VCPUState
	PIC               pic.State
	PIT               pit.State
	UART              uart.State
	RTC               rtc.State
	I8042             I8042State
	SysCtl            SysCtlState
	Virtio            []VirtioState
}

// SysCtlState is the guest-visible state of ports 0x92 and 0xCF9.
type SysCtlState struct {
	PortA, CF9 uint8
}

// VirtioState is one virtio device's transport and device state, with the
// slot it sits in.
type VirtioState struct {
	Name      string
	Base      uint64
	IRQ       int
	Transport virtio.MMIOState
}

// IncompatibleError says why a state cannot be restored onto this machine.
type IncompatibleError struct{ Reason string }

func (e *IncompatibleError) Error() string { return "incompatible machine state: " + e.Reason }

// ErrRestoreFailed marks a machine whose restore failed part-way: it must
// not run (Run refuses) and should be closed.
var ErrRestoreFailed = errors.New("machine state restore failed part-way; the machine cannot run")

func cpuidDigest(t []kvm.CPUIDEntry) string {
	h := sha256.New()
	for _, e := range t {
		binary.Write(h, binary.LittleEndian, [7]uint32{e.Function, e.Index, e.Flags, e.EAX, e.EBX, e.ECX, e.EDX})
	}
	return fmt.Sprintf("%x", h.Sum(nil)[:12])
}

// Save returns the machine's state at a consistent point (a pending "in"
// exit is completed first). Call it only while the machine is not running.
// Memory is not part of it: read Memory(), and mark the point with
// DirtySets if pages written afterwards matter.
func (m *Machine) Save() (*State, error) {
	if m.restoreFailed {
		return nil, ErrRestoreFailed
	}
	v, err := m.SaveVCPU()
	if err != nil {
		return nil, err
	}
	s := m.saveDevices()
	s.VCPU = *v
	s.ReadyForInterrupt = m.cpu.ReadyForInterruptInjection() && m.cpu.IFFlag()
	return s, nil
}

// saveDevices is Save without the vCPU: the machine's make-up, guest time,
// the exit count and every device.
func (m *Machine) saveDevices() *State {
	s := &State{
		Version:    StateVersion,
		Model:      ModelVersion,
		MemorySize: m.mem.Size(),
		CPUID:      m.cpuidDigest,
		Host:       m.policy.Host.String(),
		Clock:      m.clock.Now(),
		Exits:      m.exits,
		PIC:        m.PIC.Save(),
		PIT:        m.PIT.Save(),
		UART:       m.UART.Save(),
		RTC:        m.RTC.Save(),
		I8042:      m.kbc.s,
		SysCtl:     SysCtlState{PortA: m.sysc.portA, CF9: m.sysc.cf9},
	}
	for _, slot := range m.virtio {
		s.Virtio = append(s.Virtio, VirtioState{Name: slot.Name, Base: slot.Base, IRQ: slot.IRQ, Transport: slot.Transport.Save()})
	}
	return s
}

// CheckCompatible reports whether s can be restored onto this machine: same
// state version and model, memory size, CPU policy and virtio devices (by
// name, slot and type).
func (m *Machine) CheckCompatible(s *State) error {
	bad := func(f string, a ...any) error { return &IncompatibleError{Reason: fmt.Sprintf(f, a...)} }
	switch {
	case s == nil:
		return bad("no state")
	case s.Version != StateVersion:
		return bad("state version %d, this build reads version %d", s.Version, StateVersion)
	case s.Model != ModelVersion:
		return bad("machine model %q, this build is %q", s.Model, ModelVersion)
	case s.MemorySize != m.mem.Size():
		return bad("memory size %d MiB, this machine has %d MiB", s.MemorySize>>20, m.mem.Size()>>20)
	case s.Host != m.policy.Host.String():
		return bad("taken on a %s host, this is a %s host", s.Host, m.policy.Host)
	case s.CPUID != m.cpuidDigest:
		return bad("taken under another CPUID table (%s, here %s): another CPU or CPU policy", s.CPUID, m.cpuidDigest)
	case len(s.Virtio) != len(m.virtio):
		return bad("%d virtio devices, this machine has %d", len(s.Virtio), len(m.virtio))
	case s.Clock < 0:
		return bad("negative guest time %v", s.Clock)
	}
	for i, v := range s.Virtio {
		slot := m.virtio[i]
		if v.Name != slot.Name || v.Base != slot.Base || v.IRQ != slot.IRQ {
			return bad("virtio device %d is %q at %#x irq %d, here %q at %#x irq %d", i, v.Name, v.Base, v.IRQ, slot.Name, slot.Base, slot.IRQ)
		}
		if want := slot.Transport.Save().DeviceType; v.Transport.DeviceType != want {
			return bad("virtio device %q has type %d, here %d", v.Name, v.Transport.DeviceType, want)
		}
	}
	return nil
}

// Restore puts the machine in state s. Call it on a machine that is not
// running, with the same make-up as the one saved (CheckCompatible), before
// or after loading its memory. Everything is validated before anything is
// changed where that can be done; if applying still fails part-way the
// machine is marked unusable (ErrRestoreFailed), never left to run
// half-restored.
func (m *Machine) Restore(s *State) error {
	if m.restoreFailed {
		return ErrRestoreFailed
	}
	if err := m.CheckCompatible(s); err != nil {
		return err
	}
	if m.sync != nil {
		m.sync.inited = false // sync points start again from the restored state
	}
	// Dry runs on scratch devices: a bad device state fails here, with
	// nothing changed.
	clk := &ManualClock{}
	clk.Set(s.Clock)
	checks := []struct {
		name string
		err  error
	}{
		{"PIC", pic.New().Restore(s.PIC)},
		{"PIT", pit.New(clk, func(bool) {}).Restore(s.PIT)},
		{"UART", uart.New(COM1Base, func(bool) {}, nil).Restore(s.UART)},
		{"RTC", rtc.New(clk, time.Unix(0, 0)).Restore(s.RTC)},
	}
	for _, c := range checks {
		if c.err != nil {
			return fmt.Errorf("restore %s: %w", c.name, c.err)
		}
	}
	if s.SysCtl.PortA&^0x02 != 0 || s.SysCtl.CF9&^0x0a != 0 {
		return fmt.Errorf("restore system control ports: bad values %+v", s.SysCtl)
	}
	m.restoreFailed = true // until everything below has been applied
	if c, ok := m.hostClock.(interface{ Set(time.Duration) }); ok {
		c.Set(s.Clock) // a journal's host time continues from there too
	}
	if c, ok := m.clock.(interface{ Set(time.Duration) }); ok {
		c.Set(s.Clock)
	} else {
		return fmt.Errorf("restore: the machine's clock cannot be set to the saved guest time")
	}
	if err := m.RestoreVCPU(&s.VCPU); err != nil {
		return fmt.Errorf("restore vCPU: %w", err)
	}
	for _, e := range []error{m.PIC.Restore(s.PIC), m.PIT.Restore(s.PIT), m.UART.Restore(s.UART), m.RTC.Restore(s.RTC)} {
		if e != nil {
			return fmt.Errorf("restore: %w", e)
		}
	}
	m.kbc.s = s.I8042
	m.sysc.portA, m.sysc.cf9 = s.SysCtl.PortA, s.SysCtl.CF9
	for i, v := range s.Virtio {
		if err := m.virtio[i].Transport.Restore(v.Transport); err != nil {
			return fmt.Errorf("restore virtio %s: %w", v.Name, err)
		}
	}
	m.exits = s.Exits
	m.restoredReady, m.hasRestoredReady = s.ReadyForInterrupt, true
	m.hasArmed = false // re-arm the PIT wake-up on the restored timeline
	m.restoreFailed = false
	return nil
}
