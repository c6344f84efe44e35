package main

import (
	"bufio"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestStartCounter builds gokvm-counter, starts it the way the guest does
// (own session, readiness on fd 3) and talks to it; then a second one on
// the same port must report its listen error.
func TestStartCounter(t *testing.T) {
	if testing.Short() {
		t.Skip("builds gokvm-counter")
	}
	dir := t.TempDir()
	if out, err := exec.Command("go", "build", "-o", filepath.Join(dir, "gokvm-counter"), "../gokvm-counter").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	t.Setenv("PATH", dir+string(os.PathListSeparator)+os.Getenv("PATH"))
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()

	pid, err := startCounter(port, 30*time.Second)
	if pid != 0 {
		defer func() {
			syscall.Kill(pid, syscall.SIGKILL)
			var ws syscall.WaitStatus
			syscall.Wait4(pid, &ws, 0, nil)
		}()
	}
	if err != nil {
		t.Fatalf("startCounter: %v", err)
	}
	if sid, _ := unix.Getsid(pid); sid != pid {
		t.Errorf("counter session %d, want its own (%d)", sid, pid)
	}
	c, err := net.Dial("tcp", "127.0.0.1:"+strconv.Itoa(port))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	c.Write([]byte("\n\n"))
	r := bufio.NewReader(c)
	for _, want := range []string{"1\n", "2\n"} {
		if got, err := r.ReadString('\n'); got != want {
			t.Fatalf("reply %q, %v; want %q", got, err, want)
		}
	}

	pid2, err := startCounter(port, 30*time.Second)
	if pid2 != 0 {
		var ws syscall.WaitStatus
		syscall.Wait4(pid2, &ws, 0, nil)
	}
	if err == nil || !strings.Contains(err.Error(), "address already in use") {
		t.Fatalf("second counter on port %d: %v, want address already in use", port, err)
	}
}
