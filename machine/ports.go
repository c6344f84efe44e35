package machine

import (
	"sync/atomic"

	"gvisor.dev/gvisor/pkg/buffer"
)

// maxQueuedInputs bounds device input (received packets) waiting for the
// vCPU thread. Beyond it input is dropped, as a NIC drops frames it has no
// room for; a slow guest must not make the VMM grow without bound.
const maxQueuedInputs = 1024

// InputPort is where one device's input from the outside world enters the
// machine: a packet read from a tap, say. Producers on any goroutine Send;
// the vCPU thread hands the data to the device between exits, in arrival
// order across all ports. This is the one "deliver input" path that a
// recorder can log and a replayer can feed.
type InputPort struct {
	m       *Machine
	name    string
	index   int // in Machine.inputPorts: how a journal names the port
	deliver func(buffer.Buffer)
	dropped atomic.Uint64
}

type deviceInput struct {
	port *InputPort
	data buffer.Buffer
}

// NewInputPort registers an input port named name. deliver runs on the vCPU
// thread and takes ownership of the buffer. Register ports before Run.
func (m *Machine) NewInputPort(name string, deliver func(buffer.Buffer)) *InputPort {
	p := &InputPort{m: m, name: name, index: len(m.inputPorts), deliver: deliver}
	m.inputPorts = append(m.inputPorts, p)
	return p
}

// Name is the port's name.
func (p *InputPort) Name() string { return p.name }

// Dropped counts input refused because the queue was full.
func (p *InputPort) Dropped() uint64 { return p.dropped.Load() }

// Send queues data for the device and takes ownership of it. It never
// blocks: it returns false, and releases data, when the queue is full (the
// input is dropped and counted) or the machine's input is closed (the
// producer should stop).
func (p *InputPort) Send(data buffer.Buffer) bool {
	q := &p.m.inputs
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		data.Release()
		return false
	}
	if len(q.devices) >= maxQueuedInputs {
		q.mu.Unlock()
		data.Release()
		p.dropped.Add(1)
		return true
	}
	q.devices = append(q.devices, deviceInput{p, data})
	q.nudge()
	q.mu.Unlock()
	p.m.kick()
	return true
}

// drainDeviceInputs delivers queued device input on the vCPU thread.
func (m *Machine) drainDeviceInputs() {
	q := &m.inputs
	q.mu.Lock()
	if len(q.devices) == 0 {
		q.mu.Unlock()
		return
	}
	batch := q.devices
	q.devices = q.spare[:0]
	q.mu.Unlock()
	for i := range batch {
		batch[i].port.deliver(batch[i].data)
		batch[i] = deviceInput{}
	}
	q.mu.Lock()
	q.spare = batch[:0]
	q.mu.Unlock()
}

// releaseDeviceInputs drops input that will never be delivered.
func (q *inputQueue) releaseDeviceInputs() {
	for i := range q.devices {
		q.devices[i].data.Release()
	}
	q.devices = nil
}

// Output is one unit of output leaving the machine: a transmitted frame.
type Output struct {
	Port *OutputPort
	Data buffer.Buffer
	// Exit is the number of deterministic exits completed before the one
	// that produced the output: with that exit, the position the backup
	// must have acknowledged before the output may leave.
	Exit uint64
}

// Send hands the output to its port's sink now, which takes ownership of
// the data. An OutputGate calls it, at once or once the output may leave.
func (o Output) Send() { o.Port.sink(o.Data) }

// Drop discards output that will never leave (an FT backup's, or one
// whose VMM stops): the port's drop function, if it has one, learns of it
// (a disk forgets the write it held for it); the data is released.
func (o Output) Drop() {
	if o.Port.drop != nil {
		o.Port.drop(o.Data)
		return
	}
	o.Data.Release()
}

// OutputGate decides when output leaves the machine. It is called on the
// vCPU thread and must not block; it owns o.Data until it calls o.Send or
// o.Drop.
type OutputGate func(o Output)

// SendNow is the gate of an unprotected machine: output leaves at once.
func SendNow(o Output) { o.Send() }

// OutputPort is the one "emit output" path of one device.
type OutputPort struct {
	m    *Machine
	name string
	sink func(buffer.Buffer)
	drop func(buffer.Buffer)
}

// NewOutputPort registers an output port; sink takes ownership of each
// buffer it is given and must not block for long (it may run on the vCPU
// thread).
func (m *Machine) NewOutputPort(name string, sink func(buffer.Buffer)) *OutputPort {
	return &OutputPort{m: m, name: name, sink: sink}
}

// OnDrop sets what happens to output dropped instead of sent (see
// Output.Drop); drop takes ownership of the buffer. Set it before the
// machine runs.
func (p *OutputPort) OnDrop(drop func(buffer.Buffer)) { p.drop = drop }

// Name is the port's name.
func (p *OutputPort) Name() string { return p.name }

// Emit passes data through the machine's output gate. Devices call it on
// the vCPU thread.
func (p *OutputPort) Emit(data buffer.Buffer) {
	p.m.gate(Output{Port: p, Data: data, Exit: p.m.exits})
}

// SetOutputGate replaces the output gate (SendNow by default). Call it only
// while the machine is not running.
func (m *Machine) SetOutputGate(g OutputGate) {
	if g == nil {
		g = SendNow
	}
	m.gate = g
}
