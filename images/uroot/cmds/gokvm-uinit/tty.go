package main

import (
	"os"
	"os/signal"
	"syscall"

	"golang.org/x/sys/unix"
)

// releaseTTY gives up this process's controlling terminal, if it has one.
//
// u-root v0.16.0 init starts uinit as a session leader with the console as
// its controlling terminal (Setsid, Setctty). When such a process exits,
// Linux hangs up the terminal (disassociate_ctty -> tty_vhangup_session,
// for every tty but a pty), and with console=ttyS0 that kills the
// /dev/ttyS0 files init opened beforehand for the shell's output
// (WithMultiTTY): the shell that follows prints nothing, or dies
// (u-root/u-root#3645). Dropping the terminal with TIOCNOTTY first means
// nothing is hung up at exit. TIOCNOTTY sends SIGHUP (and SIGCONT) to our
// own process group, hence the Ignore.
func releaseTTY() {
	signal.Ignore(syscall.SIGHUP)
	if f, err := os.OpenFile("/dev/tty", os.O_RDWR|unix.O_NOCTTY, 0); err == nil {
		err = unix.IoctlSetInt(int(f.Fd()), unix.TIOCNOTTY, 0)
		f.Close()
		if err == nil {
			return
		}
	}
	// No /dev/tty node? init made stdin (/dev/console) our terminal.
	// TIOCNOTTY fails harmlessly (ENOTTY) on anything else.
	for _, f := range []*os.File{os.Stdin, os.Stdout, os.Stderr} {
		if unix.IoctlSetInt(int(f.Fd()), unix.TIOCNOTTY, 0) == nil {
			return
		}
	}
}
