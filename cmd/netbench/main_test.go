package main

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"
)

// fakeBulk serves the guest's bulk protocol (images/uroot/cmds/gokvm-counter
// bulk.go) on 127.0.0.1, miscounting by lie bytes.
func fakeBulk(t *testing.T, lie int64) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				r := bufio.NewReader(c)
				line, _ := r.ReadString('\n')
				switch cmd, arg, _ := strings.Cut(strings.TrimSpace(line), " "); cmd {
				case "sink":
					n, _ := io.Copy(io.Discard, r)
					fmt.Fprintf(c, "%d\n", n+lie)
				case "source":
					n, _ := strconv.ParseInt(arg, 10, 64)
					io.CopyN(c, zeros{}, n+lie)
				}
			}()
		}
	}()
	return l.Addr().String()
}

type zeros struct{}

func (zeros) Read(p []byte) (int, error) { clear(p); return len(p), nil }

func dial(t *testing.T, addr string) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(30 * time.Second))
	t.Cleanup(func() { c.Close() })
	return c
}

func TestTransfers(t *testing.T) {
	addr := fakeBulk(t, 0)
	for _, n := range []int64{1, 1 << 20, 3<<20 + 7} {
		if d, err := sinkTo(dial(t, addr), n); err != nil || d <= 0 {
			t.Errorf("sinkTo %d: %v, %v", n, d, err)
		}
		if d, err := sourceFrom(dial(t, addr), n); err != nil || d <= 0 {
			t.Errorf("sourceFrom %d: %v, %v", n, d, err)
		}
	}
}

func TestTransfersCountWrong(t *testing.T) {
	for _, lie := range []int64{-1, 1} {
		addr := fakeBulk(t, lie)
		if _, err := sinkTo(dial(t, addr), 1000); err == nil {
			t.Errorf("sinkTo with a count off by %d: no error", lie)
		}
		if _, err := sourceFrom(dial(t, addr), 1000); err == nil {
			t.Errorf("sourceFrom with %d bytes too many: no error", lie)
		}
	}
}

func TestMedianTail(t *testing.T) {
	for _, c := range []struct {
		in   []float64
		want float64
	}{{nil, 0}, {[]float64{3}, 3}, {[]float64{5, 1, 3}, 3}, {[]float64{4, 1, 3, 2}, 2.5}} {
		if got := median(c.in); got != c.want {
			t.Errorf("median(%v) = %v, want %v", c.in, got, c.want)
		}
	}
	tl := tail{max: 4}
	tl.write([]byte("ab"))
	tl.write([]byte("cdef\n"))
	if got := tl.String(); got != "def" {
		t.Errorf("tail = %q, want %q", got, "def")
	}
}
