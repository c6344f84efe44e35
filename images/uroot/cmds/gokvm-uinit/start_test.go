package main

import (
	"bufio"
	"io"
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

	pid, err := startCounter(port, 0, 30*time.Second)
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

	pid2, err := startCounter(port, 0, 30*time.Second)
	if pid2 != 0 {
		var ws syscall.WaitStatus
		syscall.Wait4(pid2, &ws, 0, nil)
	}
	if err == nil || !strings.Contains(err.Error(), "address already in use") {
		t.Fatalf("second counter on port %d: %v, want address already in use", port, err)
	}
}

// TestStartBulk starts gokvm-counter with the bulk service only (counter
// off), as gokvm.counter=off gokvm.bulk=PORT does, and runs one transfer
// each way; then with both services on one pair of ports.
func TestStartBulk(t *testing.T) {
	if testing.Short() {
		t.Skip("builds gokvm-counter")
	}
	dir := t.TempDir()
	if out, err := exec.Command("go", "build", "-o", filepath.Join(dir, "gokvm-counter"), "../gokvm-counter").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	t.Setenv("PATH", dir+string(os.PathListSeparator)+os.Getenv("PATH"))
	ports := freePorts(t, 2)

	start := func(counter, bulk int) {
		t.Helper()
		pid, err := startCounter(counter, bulk, 30*time.Second)
		if pid != 0 {
			t.Cleanup(func() {
				syscall.Kill(pid, syscall.SIGKILL)
				var ws syscall.WaitStatus
				syscall.Wait4(pid, &ws, 0, nil)
			})
		}
		if err != nil {
			t.Fatalf("startCounter(%d, %d): %v", counter, bulk, err)
		}
	}
	dial := func(port int) net.Conn {
		t.Helper()
		c, err := net.Dial("tcp", "127.0.0.1:"+strconv.Itoa(port))
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(30 * time.Second))
		return c
	}

	start(0, ports[0])
	c := dial(ports[0])
	c.Write(append([]byte("sink\n"), make([]byte, 300000)...))
	c.(*net.TCPConn).CloseWrite()
	if b, err := io.ReadAll(c); string(b) != "300000\n" {
		t.Errorf("sink: %q, %v; want \"300000\\n\"", b, err)
	}
	c.Close()
	c = dial(ports[0])
	io.WriteString(c, "source 300001\n")
	if b, err := io.ReadAll(c); len(b) != 300001 || err != nil {
		t.Errorf("source: %d bytes, %v; want 300001", len(b), err)
	}
	c.Close()

	// Counter and bulk in one process (the first one still holds its port:
	// take fresh ones).
	ports = freePorts(t, 2)
	start(ports[0], ports[1])
	c = dial(ports[0])
	io.WriteString(c, "\n")
	if s, err := bufio.NewReader(c).ReadString('\n'); s != "1\n" {
		t.Errorf("counter: %q, %v", s, err)
	}
	c.Close()
	c = dial(ports[1])
	io.WriteString(c, "source 5\n")
	if b, err := io.ReadAll(c); len(b) != 5 || err != nil {
		t.Errorf("source 5: %q, %v", b, err)
	}
	c.Close()
}

// freePorts returns n TCP ports that were free a moment ago.
func freePorts(t *testing.T, n int) []int {
	t.Helper()
	var ports []int
	var ls []net.Listener
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	for _, l := range ls {
		l.Close()
	}
	return ports
}
