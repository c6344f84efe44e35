package main

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// startServer runs serve on 127.0.0.1:0 in this process.
func startServer(t *testing.T) string {
	return startListening(t, "serve", func(l net.Listener) error { return serve(l, new(counter)) })
}

// startListening runs a server on 127.0.0.1:0 in this process and checks,
// at the end of the test, that closing the listener made it return an
// error.
func startListening(t *testing.T, name string, serve func(net.Listener) error) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- serve(l) }()
	t.Cleanup(func() {
		l.Close()
		if err := <-done; err == nil {
			t.Errorf("%s returned nil", name)
		}
	})
	return l.Addr().String()
}

func dial(t *testing.T, addr string) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(30 * time.Second))
	return c
}

// readValue reads one reply line and parses it.
func readValue(r *bufio.Reader) (uint64, error) {
	s, err := r.ReadString('\n')
	if err != nil {
		return 0, err
	}
	return strconv.ParseUint(strings.TrimSuffix(s, "\n"), 10, 64)
}

func TestSequential(t *testing.T) {
	addr := startServer(t)
	for conn := 0; conn < 3; conn++ {
		c := dial(t, addr)
		r := bufio.NewReader(c)
		for i := 1; i <= 3; i++ {
			// Request contents are ignored: empty, text, CRLF.
			if _, err := io.WriteString(c, []string{"\n", "next please\n", "x\r\n"}[i-1]); err != nil {
				t.Fatal(err)
			}
			v, err := readValue(r)
			if want := uint64(conn*3 + i); err != nil || v != want {
				t.Fatalf("connection %d request %d: %d, %v; want %d", conn, i, v, err, want)
			}
		}
		c.Close()
	}
}

// TestConcurrent: many clients at once, each with many requests, some sent
// one at a time and some pipelined; every client sees strictly increasing
// values and all values together are exactly 1..N.
func TestConcurrent(t *testing.T) {
	addr := startServer(t)
	const clients, requests = 16, 200
	var wg sync.WaitGroup
	results := make([][]uint64, clients)
	errs := make(chan error, clients)
	for k := 0; k < clients; k++ {
		wg.Add(1)
		go func(k int) {
			defer wg.Done()
			c, err := net.Dial("tcp", addr)
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(30 * time.Second))
			r := bufio.NewReader(c)
			if k%2 == 1 {
				// Pipelined: all requests in one write, then the replies.
				go io.WriteString(c, strings.Repeat("req\n", requests))
			}
			for i := 0; i < requests; i++ {
				if k%2 == 0 {
					if _, err := fmt.Fprintf(c, "client %d request %d\n", k, i); err != nil {
						errs <- err
						return
					}
				}
				v, err := readValue(r)
				if err != nil {
					errs <- fmt.Errorf("client %d request %d: %w", k, i, err)
					return
				}
				results[k] = append(results[k], v)
			}
		}(k)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	seen := make(map[uint64]int)
	for k, vs := range results {
		for i, v := range vs {
			if i > 0 && v <= vs[i-1] {
				t.Errorf("client %d: reply %d = %d after %d", k, i, v, vs[i-1])
			}
			if prev, dup := seen[v]; dup {
				t.Errorf("value %d sent to clients %d and %d", v, prev, k)
			}
			seen[v] = k
		}
	}
	for v := uint64(1); v <= clients*requests; v++ {
		if _, ok := seen[v]; !ok {
			t.Errorf("value %d never sent", v)
		}
	}
	if len(seen) != clients*requests {
		t.Errorf("%d distinct values, want %d", len(seen), clients*requests)
	}
}

// TestLongLineAndPartial: a line longer than the read buffer is one
// request; a trailing partial line gets no reply; a partial next line does
// not hold back the reply to a complete one.
func TestLongLineAndPartial(t *testing.T) {
	addr := startServer(t)
	c := dial(t, addr)
	r := bufio.NewReader(c)
	if _, err := io.WriteString(c, strings.Repeat("y", 100000)+"\nhalf"); err != nil {
		t.Fatal(err)
	}
	if v, err := readValue(r); err != nil || v != 1 {
		t.Fatalf("long line: %d, %v; want 1", v, err)
	}
	if _, err := io.WriteString(c, " done\nagain"); err != nil {
		t.Fatal(err)
	}
	if v, err := readValue(r); err != nil || v != 2 {
		t.Fatalf("completed line: %d, %v; want 2", v, err)
	}
	c.(*net.TCPConn).CloseWrite()
	if s, err := r.ReadString('\n'); err != io.EOF || s != "" {
		t.Fatalf("after a partial line and EOF: %q, %v; want EOF", s, err)
	}
	c.Close()
	// The partial line did not take a value.
	c = dial(t, addr)
	defer c.Close()
	io.WriteString(c, "\n")
	if v, err := readValue(bufio.NewReader(c)); err != nil || v != 3 {
		t.Fatalf("next connection: %d, %v; want 3", v, err)
	}
}
