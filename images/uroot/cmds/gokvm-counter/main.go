// gokvm-counter is the gokvm-ft guest's counter service: a TCP server on
// which every request line (anything up to "\n") is answered with the
// next value of one process-wide counter, starting at 1, as decimal text
// and "\n". Any number of clients may connect at once; each connection
// may send any number of requests (pipelining included). gokvm-uinit
// starts it at boot (gokvm.counter=PORT, default 7777); try
// `echo | nc GUEST 7777`.
//
//	gokvm-counter [-port 7777] [-bulk-port N] [-ready-fd N]
//
// -port 0 leaves the counter service out. -bulk-port also starts the
// bulk-transfer service (bulk.go, gokvm.bulk=PORT) in the same process.
// With -ready-fd, it writes "ok\n" (or its error and "\n") to that file
// descriptor once it listens on every port, and closes it.
package main

import (
	"bufio"
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"os/signal"
	"strconv"
	"sync/atomic"
	"syscall"
	"time"
)

func main() {
	fs := flag.NewFlagSet("gokvm-counter", flag.ExitOnError)
	port := fs.Int("port", 7777, "TCP port of the counter service (all addresses); 0: none")
	bulkPort := fs.Int("bulk-port", 0, "TCP port of the bulk-transfer service (all addresses); 0: none")
	readyFD := fs.Int("ready-fd", -1, "file descriptor to report readiness on (\"ok\\n\" or the error)")
	fs.Parse(os.Args[1:])
	log.SetFlags(0)
	log.SetPrefix("gokvm-counter: ")
	// Its own session has no terminal, but never die of a hangup.
	signal.Ignore(syscall.SIGHUP, syscall.SIGPIPE)

	var ready io.WriteCloser = nopCloser{}
	if *readyFD >= 0 {
		ready = os.NewFile(uintptr(*readyFD), "ready")
	}
	if *port == 0 && *bulkPort == 0 {
		fmt.Fprintf(ready, "no service: -port and -bulk-port are both 0\n")
		ready.Close()
		log.Fatal("no service: -port and -bulk-port are both 0")
	}
	var services []func() error
	for _, s := range []struct {
		port  int
		serve func(net.Listener) error
	}{
		{*port, func(l net.Listener) error { return serve(l, new(counter)) }},
		{*bulkPort, serveBulk},
	} {
		if s.port == 0 {
			continue
		}
		l, err := net.Listen("tcp", ":"+strconv.Itoa(s.port))
		if err != nil {
			fmt.Fprintf(ready, "%v\n", err)
			ready.Close()
			log.Fatal(err)
		}
		services = append(services, func() error { return s.serve(l) })
	}
	fmt.Fprintf(ready, "ok\n")
	ready.Close()
	errc := make(chan error, len(services))
	for _, serve := range services {
		go func() { errc <- serve() }()
	}
	log.Fatal(<-errc)
}

type nopCloser struct{}

func (nopCloser) Write(p []byte) (int, error) { return len(p), nil }
func (nopCloser) Close() error                { return nil }

// counter is the process-wide counter: next returns 1, 2, 3, ...
type counter struct{ n atomic.Uint64 }

func (c *counter) next() uint64 { return c.n.Add(1) }

// serve accepts connections on l until l is closed, answering each
// connection's requests from c.
func serve(l net.Listener, c *counter) error {
	return acceptLoop(l, func(conn net.Conn) { handle(conn, c) })
}

// acceptLoop accepts connections on l until l is closed and runs handle
// on each in a goroutine of its own.
func acceptLoop(l net.Listener, handle func(net.Conn)) error {
	delay := time.Duration(0)
	for {
		conn, err := l.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return err
			}
			// E.g. EMFILE: back off and keep serving the others.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			log.Printf("accept: %v", err)
			time.Sleep(delay)
			continue
		}
		delay = 0
		go handle(conn)
	}
}

// handle answers every complete line read from conn with the counter's
// next value. Lines of any length are accepted (contents are ignored);
// replies are flushed whenever no further complete request is already
// buffered (pipelined requests get their replies in one write).
func handle(conn net.Conn, c *counter) {
	defer conn.Close()
	r := bufio.NewReader(conn)
	w := bufio.NewWriter(conn)
	var buf [24]byte
	for {
		_, err := r.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			continue // a long line: keep discarding up to its "\n"
		}
		if err != nil {
			return // EOF (a trailing partial line gets no reply) or error
		}
		if _, err := w.Write(append(strconv.AppendUint(buf[:0], c.next(), 10), '\n')); err != nil {
			return
		}
		if !requestBuffered(r) {
			if err := w.Flush(); err != nil {
				return
			}
		}
	}
}

// requestBuffered says whether r already holds a complete line.
func requestBuffered(r *bufio.Reader) bool {
	b, _ := r.Peek(r.Buffered())
	return bytes.IndexByte(b, '\n') >= 0
}
