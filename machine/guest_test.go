package machine_test

import (
	"bytes"
	"context"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/gokvm-ft/gokvm-ft/internal/tinyguest"
	"github.com/gokvm-ft/gokvm-ft/machine"
)

// needKVM skips a test where /dev/kvm is missing, except in CI.
func needKVM(t *testing.T) {
	t.Helper()
	if _, err := os.Stat("/dev/kvm"); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("CI needs /dev/kvm: %v", err)
		}
		t.Skip("no /dev/kvm")
	}
}

// syncBuffer is a goroutine-safe console.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

type guest struct {
	t       *testing.T
	m       *machine.Machine
	prog    *tinyguest.Program
	console *syncBuffer
}

// newGuest assembles src and builds a machine ready to run it.
func newGuest(t *testing.T, src string, cfg machine.Config, opt tinyguest.Options) *guest {
	t.Helper()
	needKVM(t)
	prog, err := tinyguest.Assemble(t.TempDir(), src)
	if err != nil {
		t.Fatal(err)
	}
	console := &syncBuffer{}
	if cfg.MemorySize == 0 {
		cfg.MemorySize = 2 << 20
	}
	if cfg.Console == nil {
		cfg.Console = console
	}
	cfg.TestExit = true
	cfg.Host = machine.DetectHostKind()
	m, err := machine.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	if err := tinyguest.Load(m.Memory(), m.VCPU(), prog, opt); err != nil {
		t.Fatal(err)
	}
	return &guest{t: t, m: m, prog: prog, console: console}
}

// run runs the guest with a timeout and returns how it stopped.
func (g *guest) run(timeout time.Duration) machine.Stop {
	g.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	stop, err := g.m.Run(ctx)
	if err != nil {
		g.t.Fatalf("run: %v", err)
	}
	if stop.Kind == machine.StopCanceled {
		g.t.Fatalf("guest did not finish within %v (console %q)", timeout, g.console.String())
	}
	return stop
}

// wantExit runs the guest and checks it wrote code to the test-exit port.
func (g *guest) wantExit(timeout time.Duration, code uint32) {
	g.t.Helper()
	stop := g.run(timeout)
	if stop.Kind != machine.StopTestExit || stop.Code != code {
		g.t.Fatalf("stopped with %v, want test exit %d (console %q)", stop, code, g.console.String())
	}
}

func (g *guest) read64(addr uint64) uint64 {
	v, err := g.m.Memory().Read64(addr)
	if err != nil {
		g.t.Fatal(err)
	}
	return v
}
