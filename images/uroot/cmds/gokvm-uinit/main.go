// gokvm-uinit is the gokvm-ft guest's setup step: u-root's init runs it as
// /bin/uinit before the shell, which starts when it exits.
//
// It reads the kernel command line (/proc/cmdline):
//
//	gokvm.ip=ADDR/PREFIX[,GATEWAY]  e.g. gokvm.ip=10.0.2.15/24,10.0.2.2
//	gokvm.counter=PORT|off          default 7777 when gokvm.ip is given
//	gokvm.bulk=PORT|off             bulk-transfer service, default off
//
// With gokvm.ip it waits up to 5 s for eth0, brings lo and eth0 up, adds
// the address and, with a gateway, the default route, and prints one line
// saying what it configured (or why it did not). With a counter or bulk
// port it starts gokvm-counter (which serves both) in the background (its
// own session, so it outlives the shell) and prints the ports once it
// listens. Without any of these parameters it does nothing and prints
// nothing. It always exits 0 and returns within a few seconds, so the
// shell always starts. It first gives up the console
// as its controlling terminal, so that its exit does not hang the console
// up under the shell (see releaseTTY).
package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"time"
)

const (
	linkWait    = 5 * time.Second  // how long to wait for eth0 to appear
	counterWait = 15 * time.Second // how long to wait for the counter to listen (lab: ~4 s)
)

func main() {
	releaseTTY()
	defer func() {
		if p := recover(); p != nil {
			fmt.Fprintf(os.Stderr, "gokvm: setup failed: %v\n", p)
		}
	}()
	b, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		fmt.Fprintf(os.Stderr, "gokvm: reading the kernel command line: %v\n", err)
		return
	}
	run(Parse(string(b)), os.Stdout)
}

func run(c Config, out io.Writer) {
	switch {
	case c.NetErr != nil:
		fmt.Fprintf(out, "gokvm: bad gokvm.ip=%q: %v (want ADDR/PREFIX[,GATEWAY]); network not configured\n", c.IPParam, c.NetErr)
	case c.Net != nil:
		if err := configure(c.Net, linkWait); err != nil {
			fmt.Fprintf(out, "gokvm: network not configured: %v\n", err)
		} else {
			fmt.Fprintf(out, "gokvm: network configured: %v\n", c.Net)
		}
	}
	if c.CounterErr != nil {
		fmt.Fprintf(out, "gokvm: bad gokvm.counter: %v; counter service not started\n", c.CounterErr)
	}
	if c.BulkErr != nil {
		fmt.Fprintf(out, "gokvm: bad gokvm.bulk: %v; bulk service not started\n", c.BulkErr)
	}
	if c.Counter == 0 && c.Bulk == 0 {
		return
	}
	// Both services run in one gokvm-counter process.
	var names []string
	if c.Counter != 0 {
		names = append(names, fmt.Sprintf("counter service listening on tcp port %d", c.Counter))
	}
	if c.Bulk != 0 {
		names = append(names, fmt.Sprintf("bulk service listening on tcp port %d", c.Bulk))
	}
	if _, err := startCounter(c.Counter, c.Bulk, counterWait); err != nil {
		what := "counter service"
		switch {
		case c.Counter == 0:
			what = "bulk service"
		case c.Bulk != 0:
			what = "counter and bulk services"
		}
		fmt.Fprintf(out, "gokvm: %s not started: %v\n", what, err)
		return
	}
	for _, n := range names {
		fmt.Fprintf(out, "gokvm: %s\n", n)
	}
}

// startCounter starts gokvm-counter with the counter service on port and
// the bulk service on bulkPort (0: without that service) in its own
// session (no controlling terminal: no SIGHUP when this session ends),
// does not wait for it, and returns once it reports that it listens (on
// fd 3), or with its error. It returns the counter's process ID.
func startCounter(port, bulkPort int, wait time.Duration) (pid int, err error) {
	bin, err := exec.LookPath("gokvm-counter")
	if err != nil {
		// Beside this program: /bbin/gokvm-counter in a busybox build.
		self, serr := os.Executable()
		if serr != nil {
			return 0, err
		}
		bin = filepath.Join(filepath.Dir(self), "gokvm-counter")
	}
	r, w, err := os.Pipe()
	if err != nil {
		return 0, err
	}
	defer r.Close()
	null, err := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	if err != nil {
		w.Close()
		return 0, err
	}
	defer null.Close()
	cmd := exec.Command(bin, "-port", strconv.Itoa(port), "-bulk-port", strconv.Itoa(bulkPort), "-ready-fd", "3")
	cmd.Stdin, cmd.Stdout = null, null
	cmd.Stderr = os.Stderr // the console: its later errors
	cmd.ExtraFiles = []*os.File{w}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	err = cmd.Start()
	w.Close()
	if err != nil {
		return 0, err
	}
	// Not waited for: it is init's child once this process exits.
	pid = cmd.Process.Pid
	defer cmd.Process.Release()
	r.SetReadDeadline(time.Now().Add(wait))
	line, err := bufio.NewReader(r).ReadString('\n')
	switch {
	case line == "ok\n":
		return pid, nil
	case errors.Is(err, os.ErrDeadlineExceeded):
		return pid, fmt.Errorf("%s: not listening after %v", bin, wait)
	case line != "":
		return pid, fmt.Errorf("%s", line[:len(line)-1])
	default:
		return pid, fmt.Errorf("%s exited (see above)", bin)
	}
}
