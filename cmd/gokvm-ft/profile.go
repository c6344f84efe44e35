package main

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

// ripProfile is a sampling profile of the guest: the vCPU is kicked at a
// fixed rate and the RIP it was at is counted. With a System.map, kernel
// addresses are shown as symbols. A developer's tool (-profile).
type ripProfile struct {
	mu      sync.Mutex
	samples map[uint64]int
	total   int
}

func newRIPProfile() *ripProfile { return &ripProfile{samples: map[uint64]int{}} }

func (p *ripProfile) add(rip uint64) {
	p.mu.Lock()
	p.samples[rip]++
	p.total++
	p.mu.Unlock()
}

// kicker kicks at rate hz until stop is closed.
func kicker(kick func(), hz int, stop <-chan struct{}) {
	t := time.NewTicker(time.Second / time.Duration(hz))
	defer t.Stop()
	for {
		select {
		case <-t.C:
			kick()
		case <-stop:
			return
		}
	}
}

type symbol struct {
	addr uint64
	name string
}

// loadSystemMap reads "addr type name" lines (nm format).
func loadSystemMap(path string) []symbol {
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	var syms []symbol
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) < 3 || !strings.ContainsAny(fs[1], "tTwW") {
			continue
		}
		a, err := strconv.ParseUint(fs[0], 16, 64)
		if err == nil {
			syms = append(syms, symbol{a, fs[2]})
		}
	}
	sort.Slice(syms, func(i, j int) bool { return syms[i].addr < syms[j].addr })
	return syms
}

func lookup(syms []symbol, rip uint64) string {
	i := sort.Search(len(syms), func(i int) bool { return syms[i].addr > rip }) - 1
	if i < 0 || rip>>63 == 0 {
		if rip>>63 == 0 {
			return "(user)"
		}
		return fmt.Sprintf("%#x", rip)
	}
	return syms[i].name
}

// write prints the profile by symbol, most samples first.
func (p *ripProfile) write(w io.Writer, syms []symbol) {
	p.mu.Lock()
	defer p.mu.Unlock()
	bySym := map[string]int{}
	for rip, n := range p.samples {
		bySym[lookup(syms, rip)] += n
	}
	type row struct {
		name string
		n    int
	}
	var rows []row
	for k, v := range bySym {
		rows = append(rows, row{k, v})
	}
	sort.Slice(rows, func(i, j int) bool { return rows[i].n > rows[j].n })
	fmt.Fprintf(w, "%d samples\n", p.total)
	for _, r := range rows {
		fmt.Fprintf(w, "%6d %5.1f%% %s\n", r.n, 100*float64(r.n)/float64(max(p.total, 1)), r.name)
	}
}
