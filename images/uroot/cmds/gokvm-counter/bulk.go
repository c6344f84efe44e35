package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"time"
)

// The bulk-transfer service (-bulk-port, gokvm.bulk=PORT): for throughput
// measurements such as cmd/netbench. Each connection starts with one
// request line:
//
//	sink\n      the client then sends any number of bytes and shuts down
//	            its sending side; the reply is the number of bytes received
//	            after the request line, in decimal, and "\n"
//	source N\n  the reply is N bytes (decimal N, at most MaxBulk), then the
//	            server closes the connection
//
// Anything else, or a line longer than 64 bytes, gets "error: ...\n". The
// server closes the connection after each request.

// MaxBulk is the largest source request (1 TiB).
const MaxBulk = 1 << 40

// bulkBufSize is the size of every read and write: large, because each
// system call is expensive in a guest whose kernel is emulated.
const bulkBufSize = 1 << 20

// bulkRequestWait bounds the wait for the request line.
const bulkRequestWait = time.Minute

// serveBulk accepts connections on l until l is closed and serves one
// bulk request on each.
func serveBulk(l net.Listener) error {
	return acceptLoop(l, handleBulk)
}

func handleBulk(conn net.Conn) {
	defer conn.Close()
	conn.SetReadDeadline(time.Now().Add(bulkRequestWait))
	r := bufio.NewReaderSize(conn, 64)
	line, err := r.ReadSlice('\n')
	if err != nil {
		if errors.Is(err, bufio.ErrBufferFull) {
			replyError(conn, "request line longer than 64 bytes")
		}
		return
	}
	conn.SetReadDeadline(time.Time{})
	req := strings.TrimSuffix(strings.TrimSuffix(string(line), "\n"), "\r")
	cmd, arg, _ := strings.Cut(req, " ")
	switch {
	case req == "sink":
		// Reads through r: what came with the request line counts too.
		n, err := discard(r, make([]byte, bulkBufSize))
		if err != nil {
			fmt.Fprintf(conn, "error: after %d bytes: %v\n", n, err)
			return
		}
		fmt.Fprintf(conn, "%d\n", n)
	case cmd == "source":
		n, err := strconv.ParseUint(arg, 10, 64)
		if err != nil || n > MaxBulk {
			replyError(conn, "bad byte count %q (want 0-%d)", arg, uint64(MaxBulk))
			return
		}
		buf := make([]byte, bulkBufSize)
		for n > 0 {
			k := min(n, uint64(len(buf)))
			if _, err := conn.Write(buf[:k]); err != nil {
				return
			}
			n -= k
		}
	default:
		replyError(conn, "unknown request %q (want \"sink\" or \"source N\")", req)
	}
}

// replyError sends "error: ...\n", then shuts down the sending side and
// drains what the client still sends for a while, so that closing does
// not reset the connection before the client has read the error.
func replyError(conn net.Conn, format string, args ...any) {
	fmt.Fprintf(conn, "error: "+format+"\n", args...)
	if c, ok := conn.(interface{ CloseWrite() error }); ok {
		c.CloseWrite()
	}
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	io.CopyN(io.Discard, conn, 1<<20)
}

// discard reads r to EOF in reads of len(buf) and returns the byte count
// (not io.Copy: io.Discard would read in 8 KiB pieces).
func discard(r io.Reader, buf []byte) (int64, error) {
	var n int64
	for {
		k, err := r.Read(buf)
		n += int64(k)
		if err == io.EOF {
			return n, nil
		}
		if err != nil {
			return n, err
		}
	}
}
