package main

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// startBulk runs serveBulk on 127.0.0.1:0 in this process.
func startBulk(t *testing.T) string { return startListening(t, "serveBulk", serveBulk) }

// sink sends "sink\n", then body in pieces of at most chunk bytes, shuts
// down its side and returns the reply.
func sink(addr string, body []byte, chunk int) (string, error) {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := io.WriteString(c, "sink\n"); err != nil {
		return "", err
	}
	for len(body) > 0 {
		k := min(chunk, len(body))
		if _, err := c.Write(body[:k]); err != nil {
			return "", err
		}
		body = body[k:]
	}
	c.(*net.TCPConn).CloseWrite()
	b, err := io.ReadAll(c)
	return string(b), err
}

// request sends req and returns everything the server sends until it
// closes the connection.
func request(addr, req string) ([]byte, error) {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := io.WriteString(c, req); err != nil {
		return nil, err
	}
	return io.ReadAll(c)
}

func TestBulkSink(t *testing.T) {
	addr := startBulk(t)
	for _, c := range []struct{ size, chunk int }{
		{0, 1}, {1, 1}, {100, 7}, {bulkBufSize + 13, 65536}, {5*bulkBufSize + 1, 3 * bulkBufSize},
	} {
		body := bytes.Repeat([]byte("0123456789abcdef\n"), c.size/17+1)[:c.size]
		got, err := sink(addr, body, c.chunk)
		if want := strconv.Itoa(c.size) + "\n"; err != nil || got != want {
			t.Errorf("sink of %d bytes in pieces of %d: %q, %v; want %q", c.size, c.chunk, got, err, want)
		}
	}
	// The body may arrive in the same segment as the request line, and the
	// request line may end in CRLF.
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	io.WriteString(c, "sink\r\nhello, world")
	c.(*net.TCPConn).CloseWrite()
	if b, err := io.ReadAll(c); err != nil || string(b) != "12\n" {
		t.Errorf("sink with the body in the request's segment: %q, %v; want \"12\\n\"", b, err)
	}
}

func TestBulkSource(t *testing.T) {
	addr := startBulk(t)
	for _, n := range []int{0, 1, 1000, bulkBufSize, 3*bulkBufSize + 5} {
		got, err := request(addr, fmt.Sprintf("source %d\n", n))
		if err != nil || len(got) != n {
			t.Errorf("source %d: %d bytes, %v", n, len(got), err)
		}
	}
}

func TestBulkBadRequests(t *testing.T) {
	addr := startBulk(t)
	for req, want := range map[string]string{
		"\n":                            `error: unknown request ""`,
		"SINK\n":                        `error: unknown request "SINK"`,
		"sink 5\n":                      `error: unknown request "sink 5"`,
		"source\n":                      `error: bad byte count ""`,
		"source -1\n":                   `error: bad byte count "-1"`,
		"source 0x10\n":                 `error: bad byte count "0x10"`,
		"source 1099511627777\n":        `error: bad byte count "1099511627777"`,
		"hello\n":                       `error: unknown request "hello"`,
		strings.Repeat("x", 100) + "\n": "error: request line longer than 64 bytes",
	} {
		got, err := request(addr, req)
		if err != nil || !strings.HasPrefix(string(got), want) || !strings.HasSuffix(string(got), "\n") {
			t.Errorf("%q: %q, %v; want %q...", req, got, err, want)
		}
	}
	// A request line cut short by EOF gets no reply.
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	io.WriteString(c, "sou")
	c.(*net.TCPConn).CloseWrite()
	if b, err := io.ReadAll(c); err != nil || len(b) != 0 {
		t.Errorf("partial request: %q, %v; want nothing", b, err)
	}
}

// TestBulkConcurrent: sinks and sources at the same time on one server.
func TestBulkConcurrent(t *testing.T) {
	addr := startBulk(t)
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for k := 0; k < 8; k++ {
		wg.Add(1)
		go func(k int) {
			defer wg.Done()
			n := (k + 1) * 100003
			if k%2 == 0 {
				got, err := sink(addr, make([]byte, n), 32768)
				if want := strconv.Itoa(n) + "\n"; err != nil || got != want {
					errs <- fmt.Errorf("sink %d: %q, %v", n, got, err)
				}
				return
			}
			got, err := request(addr, fmt.Sprintf("source %d\n", n))
			if err != nil || len(got) != n {
				errs <- fmt.Errorf("source %d: %d bytes, %v", n, len(got), err)
			}
		}(k)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}
