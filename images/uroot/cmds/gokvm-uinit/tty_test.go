package main

import (
	"fmt"
	"os"
	"os/exec"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// TestReleaseTTY runs a helper as init runs uinit (session leader with a
// terminal as its controlling tty: a pty here) and checks that releaseTTY
// leaves it without one, and that the SIGHUP this sends does not kill it.
// (The hang-up at exit that this avoids happens for serial and virtual
// consoles, not for ptys, so it is not reproduced here.)
func TestReleaseTTY(t *testing.T) {
	if os.Getenv("GOKVM_RELEASETTY_HELPER") == "1" {
		releaseTTYHelper()
		return
	}
	ptmx, err := os.OpenFile("/dev/ptmx", os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		t.Skipf("no ptys: %v", err)
	}
	defer ptmx.Close()
	if err := unix.IoctlSetPointerInt(int(ptmx.Fd()), unix.TIOCSPTLCK, 0); err != nil {
		t.Fatal(err)
	}
	n, err := unix.IoctlGetInt(int(ptmx.Fd()), unix.TIOCGPTN)
	if err != nil {
		t.Fatal(err)
	}
	pts, err := os.OpenFile(fmt.Sprintf("/dev/pts/%d", n), os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer pts.Close()
	cmd := exec.Command(os.Args[0], "-test.run=^TestReleaseTTY$", "-test.v")
	cmd.Env = append(os.Environ(), "GOKVM_RELEASETTY_HELPER=1")
	cmd.Stdin = pts
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true, Ctty: 0}
	out, err := cmd.CombinedOutput()
	t.Logf("helper:\n%s", out)
	if err != nil {
		t.Fatalf("helper: %v", err)
	}
}

func releaseTTYHelper() {
	f, err := os.Open("/dev/tty")
	if err != nil {
		fmt.Println("FAIL: no controlling terminal to begin with:", err)
		os.Exit(1)
	}
	f.Close()
	releaseTTY()
	if f, err := os.Open("/dev/tty"); err == nil {
		f.Close()
		fmt.Println("FAIL: still has a controlling terminal")
		os.Exit(1)
	}
	fmt.Println("ok: controlling terminal released")
}
