package machine

import (
	"context"
	"errors"
	"sync"
)

// Runner runs a machine and lets other goroutines (a control socket, a
// live transfer) pause it at a consistent point to do something there:
// take a snapshot, finish a live transfer.
type Runner struct {
	M *Machine

	mu       sync.Mutex
	cancel   context.CancelFunc // of the current Run
	pending  *pauseRequest
	finished bool
}

type pauseRequest struct {
	// f runs with the vCPU stopped; stopVM ends the session (the guest
	// now runs elsewhere).
	f    func() (stopVM bool, err error)
	done chan error
}

// ErrNotRunning answers a pause request after the guest has stopped.
var ErrNotRunning = errors.New("the guest is not running")

// Run runs the machine until it stops or ctx ends, serving pause requests.
// It returns StopMoved when a pause request said the guest moved.
func (s *Runner) Run(ctx context.Context) (Stop, error) {
	defer func() {
		s.mu.Lock()
		s.finished = true
		p := s.pending
		s.pending = nil
		s.mu.Unlock()
		if p != nil {
			p.done <- ErrNotRunning
		}
	}()
	for {
		s.mu.Lock()
		p := s.pending
		s.pending = nil
		runCtx, cancel := context.WithCancel(ctx)
		s.cancel = cancel
		s.mu.Unlock()
		if p != nil {
			cancel()
			stopVM, err := p.f()
			p.done <- err
			if stopVM && err == nil {
				return Stop{Kind: StopMoved}, nil
			}
			continue
		}
		stop, err := s.M.Run(runCtx)
		cancel()
		if err != nil || stop.Kind != StopCanceled || ctx.Err() != nil {
			return stop, err
		}
		// Cancelled for a pause request: the loop serves it.
	}
}

// Pause stops the guest at a consistent point, runs f there and resumes it
// unless f says the guest has moved (stopVM). It returns f's error, or
// ErrNotRunning once Run has returned.
func (s *Runner) Pause(f func() (stopVM bool, err error)) error {
	p := &pauseRequest{f: f, done: make(chan error, 1)}
	s.mu.Lock()
	switch {
	case s.finished:
		s.mu.Unlock()
		return ErrNotRunning
	case s.pending != nil:
		s.mu.Unlock()
		return errors.New("another operation is pausing the guest")
	}
	s.pending = p
	if s.cancel != nil {
		s.cancel()
	}
	s.mu.Unlock()
	return <-p.done
}
