package machine

import "sync"

// maxQueuedSerial bounds console input waiting for the guest: a producer
// that gets ahead of the guest blocks instead of losing bytes.
const maxQueuedSerial = 64 << 10

// inputQueue holds input from the outside world until the vCPU thread
// takes it at an exit. Producers run on any goroutine.
type inputQueue struct {
	mu     sync.Mutex
	space  *sync.Cond
	serial []byte
	// devices is device input (InputPort.Send) in arrival order; spare
	// is the previous batch's backing array, reused.
	devices, spare []deviceInput
	closed         bool
	wake           chan struct{} // nudges a halted vCPU loop
}

func (q *inputQueue) init() {
	q.space = sync.NewCond(&q.mu)
	q.wake = make(chan struct{}, 1)
}

// pending reports whether input waits that the guest could take now (the
// UART having room for serialRoom more bytes).
func (q *inputQueue) pending(serialRoom int) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.devices) > 0 || (len(q.serial) > 0 && serialRoom > 0)
}

func (q *inputQueue) nudge() {
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

// DeliverSerial queues bytes typed on the console for the UART. It blocks
// while the queue is full and returns false if the machine is closed.
// Safe to call from any goroutine.
func (m *Machine) DeliverSerial(b []byte) bool {
	q := &m.inputs
	q.mu.Lock()
	for len(b) > 0 {
		for len(q.serial) >= maxQueuedSerial && !q.closed {
			q.space.Wait()
		}
		if q.closed {
			q.mu.Unlock()
			return false
		}
		n := min(len(b), maxQueuedSerial-len(q.serial))
		q.serial = append(q.serial, b[:n]...)
		b = b[n:]
		q.nudge()
		q.mu.Unlock()
		m.kick()
		q.mu.Lock()
	}
	q.mu.Unlock()
	return true
}

// CloseInput wakes and refuses producers blocked in DeliverSerial, makes
// InputPort.Send refuse, and drops device input not yet delivered.
func (m *Machine) CloseInput() {
	q := &m.inputs
	q.mu.Lock()
	q.closed = true
	q.releaseDeviceInputs()
	q.space.Broadcast()
	q.mu.Unlock()
}

// drainInputs moves queued input into devices, as much as they accept.
func (m *Machine) drainInputs() {
	m.drainDeviceInputs()
	q := &m.inputs
	q.mu.Lock()
	defer q.mu.Unlock()
	if len(q.serial) == 0 {
		return
	}
	n := m.UART.Receive(q.serial)
	if n > 0 {
		q.serial = append(q.serial[:0], q.serial[n:]...)
		q.space.Broadcast()
	}
}
