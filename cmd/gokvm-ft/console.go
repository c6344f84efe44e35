package main

import (
	"bytes"
	"io"
	"os"

	"golang.org/x/term"
)

// escapeKey is Ctrl-A, as in QEMU: Ctrl-A x quits, Ctrl-A Ctrl-A sends a
// literal Ctrl-A to the guest.
const escapeKey = 0x01

// escapeFilter splits console input into guest bytes and the quit request.
type escapeFilter struct {
	pending bool // the previous byte was the escape key
}

// filter returns the bytes for the guest and whether the user asked to quit.
func (f *escapeFilter) filter(in []byte) (out []byte, quit bool) {
	out = make([]byte, 0, len(in))
	for _, b := range in {
		if f.pending {
			f.pending = false
			switch b {
			case 'x', 'X':
				return out, true
			case escapeKey:
				out = append(out, escapeKey)
			default:
				// Unknown escape: pass both through, nothing is lost.
				out = append(out, escapeKey, b)
			}
			continue
		}
		if b == escapeKey {
			f.pending = true
			continue
		}
		out = append(out, b)
	}
	return out, false
}

// consoleInput reads the terminal (raw mode when it is one) and hands the
// bytes to deliver until EOF or the quit escape; quit is then called.
// The returned function restores the terminal.
func consoleInput(in *os.File, deliver func([]byte) bool, quit func()) (restore func()) {
	restore = func() {}
	if term.IsTerminal(int(in.Fd())) {
		if st, err := term.MakeRaw(int(in.Fd())); err == nil {
			restore = func() { term.Restore(int(in.Fd()), st) }
		}
	}
	go func() {
		var f escapeFilter
		buf := make([]byte, 1024)
		for {
			n, err := in.Read(buf)
			if n > 0 {
				out, q := f.filter(buf[:n])
				if len(out) > 0 && !deliver(bytes.Clone(out)) {
					return
				}
				if q {
					quit()
					return
				}
			}
			if err != nil {
				if err != io.EOF {
					quit()
				}
				return
			}
		}
	}()
	return restore
}
