package main

import (
	"bytes"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gokvm-ft/gokvm-ft/machine"
)

// watchedBuffer is a console that can be waited on.
type watchedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (w *watchedBuffer) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}

func (w *watchedBuffer) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.String()
}

// waitFor waits until the console shows s after position from, and returns
// the position after it.
func (w *watchedBuffer) waitFor(t *testing.T, s string, from int, timeout time.Duration, done <-chan int) int {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		out := w.String()
		if i := strings.Index(out[min(from, len(out)):], s); i >= 0 {
			return from + i + len(s)
		}
		select {
		case code := <-done:
			t.Fatalf("gokvm-ft exited with %d while waiting for %q; console:\n%s", code, s, out)
		case <-time.After(50 * time.Millisecond):
		}
	}
	t.Fatalf("no %q on the console within %v; console:\n%s", s, timeout, w.String())
	return 0
}

// TestLinuxShell boots the bundled kernel and u-root initramfs, types a
// command on the serial console, checks its output and powers off.
func TestLinuxShell(t *testing.T) {
	dir := "../../images/out"
	if d := os.Getenv("GOKVM_IMAGES"); d != "" {
		dir = d
	}
	kernel, initrd := dir+"/vmlinux", dir+"/initramfs.cpio"
	for _, f := range []string{kernel, initrd} {
		if _, err := os.Stat(f); err != nil {
			if os.Getenv("CI") != "" {
				t.Fatalf("CI must build the images first (make images): %v", err)
			}
			t.Skipf("images not built (make images): %v", err)
		}
	}
	if _, err := os.Stat("/dev/kvm"); err != nil {
		t.Skip("no /dev/kvm")
	}
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pw.Close()
	var console, stderr watchedBuffer
	done := make(chan int, 1)
	start := time.Now()
	go func() {
		done <- run([]string{"-kernel", kernel, "-initrd", initrd, "-mem", "256M"}, pr, &console, &stderr)
	}()
	// u-root's init greets, then starts the gosh shell, whose prompt is "$ ".
	pos := console.waitFor(t, "Welcome to u-root", 0, 15*time.Minute, done)
	t.Logf("first userspace output after %v", time.Since(start).Round(time.Millisecond))
	pos = console.waitFor(t, "$ ", pos, 5*time.Minute, done)
	t.Logf("shell prompt after %v", time.Since(start).Round(time.Millisecond))
	line := "echo gokvm-$((6*7)) godebug=$GODEBUG"
	if _, err := pw.Write([]byte(line + "\n")); err != nil {
		t.Fatal(err)
	}
	pos = console.waitFor(t, "gokvm-42", pos+len(line), 5*time.Minute, done)
	t.Logf("builtin answered after %v", time.Since(start).Round(time.Millisecond))
	if machine.DetectHostKind() == machine.HostLabPVM {
		// The lab command line keeps Go programs off AVX (see
		// machine.labCmdline): its GODEBUG reaches the shell.
		pos = console.waitFor(t, "godebug=cpu.all=off", pos, time.Minute, done)
	}
	pos = console.waitFor(t, "$ ", pos, 5*time.Minute, done)
	// An external command: fork, exec, tty output.
	if _, err := pw.Write([]byte("ls /bbin\n")); err != nil {
		t.Fatal(err)
	}
	pos = console.waitFor(t, "gosh", pos, 5*time.Minute, done)
	pos = console.waitFor(t, "$ ", pos, 5*time.Minute, done)
	t.Logf("ls answered after %v", time.Since(start).Round(time.Millisecond))
	if _, err := pw.Write([]byte("poweroff\n")); err != nil {
		t.Fatal(err)
	}
	select {
	case code := <-done:
		if code != 0 {
			t.Fatalf("exit status %d after poweroff; stderr %q; console:\n%s", code, stderr.String(), console.String())
		}
	case <-time.After(5 * time.Minute):
		t.Fatalf("no exit after poweroff; console:\n%s", console.String())
	}
	t.Logf("powered off after %v", time.Since(start).Round(time.Millisecond))
}
