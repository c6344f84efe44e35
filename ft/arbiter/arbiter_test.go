package arbiter

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// The cross-process test re-executes the test binary as a contender: with
// childEnv set, TestMain runs childMain instead of the tests.
const (
	childEnv      = "GOKVM_FT_ARBITER_CHILD"
	childDirEnv   = "GOKVM_FT_ARBITER_DIR"
	childOwnerEnv = "GOKVM_FT_ARBITER_OWNER"
	childExclEnv  = "GOKVM_FT_ARBITER_EXCL"
)

func TestMain(m *testing.M) {
	if os.Getenv(childEnv) != "" {
		os.Exit(childMain())
	}
	os.Exit(m.Run())
}

// childMain opens the arbiter, then for each epoch read from stdin, one a
// line, claims it and prints "won|lost EPOCH OWNER" (the holder after) or
// "error MESSAGE".
func childMain() int {
	a, err := openFile(os.Getenv(childDirEnv), os.Getenv(childExclEnv) != "")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	owner := os.Getenv(childOwnerEnv)
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		n, err := strconv.ParseUint(sc.Text(), 10, 64)
		if err != nil {
			fmt.Printf("error %v\n", err)
			continue
		}
		r, err := a.Claim(context.Background(), n, owner)
		switch {
		case err != nil:
			fmt.Printf("error %v\n", strings.ReplaceAll(err.Error(), "\n", " "))
		case r.Won:
			fmt.Printf("won %d %s\n", r.Holder.Epoch, r.Holder.Owner)
		default:
			fmt.Printf("lost %d %s\n", r.Holder.Epoch, r.Holder.Owner)
		}
	}
	return 0
}

// modes runs f once with hard links and once with the exclusive-create
// fallback.
func modes(t *testing.T, f func(t *testing.T, excl bool)) {
	t.Run("link", func(t *testing.T) { f(t, false) })
	t.Run("excl", func(t *testing.T) { f(t, true) })
}

func open(t *testing.T, dir string, excl bool) *fileArbiter {
	t.Helper()
	a, err := openFile(dir, excl)
	if err != nil {
		t.Fatal(err)
	}
	if !excl && a.excl {
		t.Fatalf("%s: hard-link probe failed on the test's directory", dir)
	}
	return a
}

func claim(t *testing.T, a Arbiter, epoch uint64, owner string) Result {
	t.Helper()
	r, err := a.Claim(context.Background(), epoch, owner)
	if err != nil {
		t.Fatalf("Claim(%d, %q): %v", epoch, owner, err)
	}
	return r
}

func wantClaim(t *testing.T, a Arbiter, epoch uint64, owner string, want Result) {
	t.Helper()
	if r := claim(t, a, epoch, owner); r != want {
		t.Errorf("Claim(%d, %q) = %+v, want %+v", epoch, owner, r, want)
	}
}

func wantCurrent(t *testing.T, a Arbiter, want Holder) {
	t.Helper()
	h, err := a.Current(context.Background())
	if err != nil {
		t.Fatalf("Current: %v", err)
	}
	if h != want {
		t.Errorf("Current = %+v, want %+v", h, want)
	}
}

func rounds(n, short int) int {
	if testing.Short() {
		return short
	}
	return n
}

// TestRaceGoroutines: two contenders, each with its own Arbiter on the
// directory, claim each fresh epoch at the same moment; exactly one wins,
// and the loser reports the winner.
func TestRaceGoroutines(t *testing.T) {
	modes(t, func(t *testing.T, excl bool) {
		dir := t.TempDir()
		names := []string{"host-a", "host-b"}
		arbs := []*fileArbiter{open(t, dir, excl), open(t, dir, excl)}
		n := uint64(rounds(1000, 100))
		for e := uint64(1); e <= n; e++ {
			var start, done sync.WaitGroup
			start.Add(1)
			res := make([]Result, 2)
			errs := make([]error, 2)
			for i := range arbs {
				done.Add(1)
				go func() {
					defer done.Done()
					start.Wait()
					res[i], errs[i] = arbs[i].Claim(context.Background(), e, names[i])
				}()
			}
			start.Done()
			done.Wait()
			for i, err := range errs {
				if err != nil {
					t.Fatalf("epoch %d, %s: %v", e, names[i], err)
				}
			}
			if res[0].Won == res[1].Won {
				t.Fatalf("epoch %d: won %v and %v, want exactly one winner", e, res[0].Won, res[1].Won)
			}
			w := 0
			if res[1].Won {
				w = 1
			}
			if want := (Holder{e, names[w]}); res[w].Holder != want {
				t.Fatalf("epoch %d: winner's holder %+v, want %+v", e, res[w].Holder, want)
			}
			checkLoser(t, e, res[1-w].Holder, names[w], excl)
		}
		h, err := arbs[0].Current(context.Background())
		if err != nil || h.Epoch != n || (h.Owner != names[0] && h.Owner != names[1]) {
			t.Errorf("Current = %+v, %v; want epoch %d held by a contender", h, err, n)
		}
	})
}

// checkLoser checks what a loser of epoch e reports: the winner. With the
// exclusive-create fallback it may read the epoch file before the winner
// has written it, and report the owner unknown.
func checkLoser(t *testing.T, e uint64, h Holder, winner string, excl bool) {
	t.Helper()
	if h.Epoch != e || (h.Owner != winner && !(excl && h.Owner == "")) {
		t.Fatalf("epoch %d: loser's holder %+v, want epoch %d held by %s", e, h, e, winner)
	}
}

// TestRaceProcesses is the cross-process race: several processes, each
// with its own Arbiter on one directory, are handed each fresh epoch at
// once; exactly one wins it.
func TestRaceProcesses(t *testing.T) {
	modes(t, func(t *testing.T, excl bool) {
		dir := t.TempDir()
		const nproc = 4
		type child struct {
			name   string
			cmd    *exec.Cmd
			in     io.WriteCloser
			out    *bufio.Scanner
			stderr bytes.Buffer
		}
		kids := make([]*child, nproc)
		for i := range kids {
			c := &child{name: fmt.Sprintf("proc-%d", i)}
			c.cmd = exec.Command(os.Args[0], "-test.run=^$")
			c.cmd.Env = append(os.Environ(), childEnv+"=1", childDirEnv+"="+dir, childOwnerEnv+"="+c.name)
			if excl {
				c.cmd.Env = append(c.cmd.Env, childExclEnv+"=1")
			}
			c.cmd.Stderr = &c.stderr
			var err error
			if c.in, err = c.cmd.StdinPipe(); err != nil {
				t.Fatal(err)
			}
			out, err := c.cmd.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			c.out = bufio.NewScanner(out)
			if err := c.cmd.Start(); err != nil {
				t.Fatal(err)
			}
			kids[i] = c
		}
		defer func() {
			for _, c := range kids {
				c.in.Close() // the child's loop ends and it exits
				if err := c.cmd.Wait(); err != nil {
					t.Errorf("%s: %v; stderr: %s", c.name, err, c.stderr.String())
				}
			}
		}()
		n := uint64(rounds(200, 30))
		for e := uint64(1); e <= n; e++ {
			for _, c := range kids {
				if _, err := fmt.Fprintf(c.in, "%d\n", e); err != nil {
					t.Fatalf("%s: %v; stderr: %s", c.name, err, c.stderr.String())
				}
			}
			var winners []string
			var losers []Holder
			for _, c := range kids {
				if !c.out.Scan() {
					t.Fatalf("%s: no answer for epoch %d (%v); stderr: %s", c.name, e, c.out.Err(), c.stderr.String())
				}
				f := strings.Fields(c.out.Text())
				if len(f) < 2 || (f[0] != "won" && f[0] != "lost") {
					t.Fatalf("%s, epoch %d: %s", c.name, e, c.out.Text())
				}
				ep, err := strconv.ParseUint(f[1], 10, 64)
				if err != nil {
					t.Fatalf("%s, epoch %d: %s", c.name, e, c.out.Text())
				}
				h := Holder{Epoch: ep}
				if len(f) > 2 {
					h.Owner = f[2]
				}
				if f[0] == "won" {
					winners = append(winners, c.name)
					if h != (Holder{e, c.name}) {
						t.Fatalf("%s won epoch %d, reports holder %+v", c.name, e, h)
					}
				} else {
					losers = append(losers, h)
				}
			}
			if len(winners) != 1 {
				t.Fatalf("epoch %d: winners %v, want exactly one", e, winners)
			}
			for _, h := range losers {
				checkLoser(t, e, h, winners[0], excl)
			}
		}
	})
}

// TestClimb: contenders claim epochs 1, 2, 3, ... as fast as they can,
// out of step, so that claims of different epochs race (step 3's second
// listing). At most one wins each epoch, a loser's holder is at or above
// its epoch, and the last epoch is won.
func TestClimb(t *testing.T) {
	modes(t, func(t *testing.T, excl bool) {
		dir := t.TempDir()
		const k = 3
		n := uint64(rounds(300, 50))
		won := make([][]bool, k)
		var wg sync.WaitGroup
		errc := make(chan error, k)
		for i := range k {
			a := open(t, dir, excl)
			won[i] = make([]bool, n+1)
			wg.Add(1)
			go func() {
				defer wg.Done()
				owner := fmt.Sprintf("c%d", i)
				for e := uint64(1); e <= n; e++ {
					r, err := a.Claim(context.Background(), e, owner)
					if err != nil {
						errc <- err
						return
					}
					if !r.Won && r.Holder.Epoch < e {
						errc <- fmt.Errorf("%s lost epoch %d to lower holder %+v", owner, e, r.Holder)
						return
					}
					won[i][e] = r.Won
				}
			}()
		}
		wg.Wait()
		close(errc)
		for err := range errc {
			t.Fatal(err)
		}
		for e := uint64(1); e <= n; e++ {
			var who []int
			for i := range k {
				if won[i][e] {
					who = append(who, i)
				}
			}
			if len(who) > 1 {
				t.Fatalf("epoch %d won by %v", e, who)
			}
			if e == n && len(who) != 1 {
				t.Fatalf("last epoch %d won by %v, want one", e, who)
			}
		}
		h, err := open(t, dir, excl).Current(context.Background())
		if err != nil || h.Epoch != n {
			t.Fatalf("Current = %+v, %v; want epoch %d", h, err, n)
		}
		for i := range k {
			if won[i][n] && h.Owner != fmt.Sprintf("c%d", i) {
				t.Errorf("Current = %+v, but c%d won epoch %d", h, i, n)
			}
		}
	})
}

func TestIdempotent(t *testing.T) {
	modes(t, func(t *testing.T, excl bool) {
		a := open(t, t.TempDir(), excl)
		wantCurrent(t, a, Holder{})
		wantClaim(t, a, 5, "a", Result{true, Holder{5, "a"}})
		wantClaim(t, a, 5, "a", Result{true, Holder{5, "a"}})
		wantClaim(t, a, 5, "b", Result{false, Holder{5, "a"}})
		wantClaim(t, a, 5, "a", Result{true, Holder{5, "a"}})
		wantCurrent(t, a, Holder{5, "a"})
		// A second Arbiter on the same directory sees the same.
		b := open(t, a.dir, excl)
		wantClaim(t, b, 5, "a", Result{true, Holder{5, "a"}})
		wantCurrent(t, b, Holder{5, "a"})
	})
}

func TestLowerAfterHigher(t *testing.T) {
	modes(t, func(t *testing.T, excl bool) {
		a := open(t, t.TempDir(), excl)
		wantClaim(t, a, 7, "a", Result{true, Holder{7, "a"}})
		wantClaim(t, a, 3, "b", Result{false, Holder{7, "a"}})
		wantClaim(t, a, 3, "a", Result{false, Holder{7, "a"}}) // the holder's own, lower
		wantClaim(t, a, 7, "b", Result{false, Holder{7, "a"}})
		wantClaim(t, a, 8, "b", Result{true, Holder{8, "b"}})
		wantClaim(t, a, 7, "a", Result{false, Holder{8, "b"}}) // superseded
		wantCurrent(t, a, Holder{8, "b"})
		if _, err := os.Stat(filepath.Join(a.dir, "epoch-3")); !os.IsNotExist(err) {
			t.Errorf("a lost claim of epoch 3 left epoch-3 behind (%v)", err)
		}
	})
}

// TestPairProtocol walks the documented protocol: a pair at epoch N, both
// sides claim N+1 on failure, the survivor is re-protected, the next
// failure claims N+2.
func TestPairProtocol(t *testing.T) {
	dir := t.TempDir()
	p, b := open(t, dir, false), open(t, dir, false)
	h, _ := p.Current(context.Background())
	wantClaim(t, p, h.Epoch+1, "hostA-primary", Result{true, Holder{1, "hostA-primary"}})
	// Failure: the backup claims first and goes live; the primary loses.
	wantClaim(t, b, 2, "hostB-backup", Result{true, Holder{2, "hostB-backup"}})
	wantClaim(t, p, 2, "hostA-primary", Result{false, Holder{2, "hostB-backup"}})
	// hostB, now primary, is re-protected by a new backup on hostA at
	// epoch 2; the next failure claims 3 and the primary keeps going.
	wantClaim(t, b, 3, "hostB-primary", Result{true, Holder{3, "hostB-primary"}})
	wantClaim(t, p, 3, "hostA-backup", Result{false, Holder{3, "hostB-primary"}})
	// A stale process of the first pair, waking up late, loses.
	wantClaim(t, p, 2, "hostA-primary", Result{false, Holder{3, "hostB-primary"}})
}

// TestSupersededDuringClaim: a claim of a higher epoch lands between a
// claim's link and its second listing; the lower claim loses and its
// epoch file stays, harmlessly.
func TestSupersededDuringClaim(t *testing.T) {
	modes(t, func(t *testing.T, excl bool) {
		dir := t.TempDir()
		a, b := open(t, dir, excl), open(t, dir, excl)
		a.afterCreate = func() {
			wantClaim(t, b, 6, "b", Result{true, Holder{6, "b"}})
		}
		wantClaim(t, a, 5, "a", Result{false, Holder{6, "b"}})
		a.afterCreate = nil
		if got, err := os.ReadFile(filepath.Join(dir, "epoch-5")); err != nil || string(got) != "a\n" {
			t.Errorf("epoch-5 = %q, %v; want the loser's claim left behind", got, err)
		}
		wantCurrent(t, a, Holder{6, "b"})
		wantClaim(t, a, 5, "a", Result{false, Holder{6, "b"}})
		wantClaim(t, b, 6, "b", Result{true, Holder{6, "b"}})
	})
}

func TestBadClaims(t *testing.T) {
	a := open(t, t.TempDir(), false)
	for _, c := range []struct {
		epoch uint64
		owner string
	}{
		{0, "a"},
		{1, ""},
		{1, "a/b"},
		{1, "a\x00b"},
		{1, "a\nb"},
		{1, strings.Repeat("x", MaxOwner+1)},
	} {
		if r, err := a.Claim(context.Background(), c.epoch, c.owner); err == nil {
			t.Errorf("Claim(%d, %q) = %+v, want an error", c.epoch, c.owner, r)
		}
	}
	wantClaim(t, a, 1, strings.Repeat("x", MaxOwner), Result{true, Holder{1, strings.Repeat("x", MaxOwner)}})
	wantCurrent(t, a, Holder{1, strings.Repeat("x", MaxOwner)})
}

func TestContext(t *testing.T) {
	a := open(t, t.TempDir(), false)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := a.Claim(ctx, 1, "a"); !errors.Is(err, context.Canceled) {
		t.Errorf("Claim with a canceled context: %v, want context.Canceled", err)
	}
	if _, err := a.Current(ctx); !errors.Is(err, context.Canceled) {
		t.Errorf("Current with a canceled context: %v, want context.Canceled", err)
	}
	wantCurrent(t, a, Holder{})
	ctx, cancel = context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if r, err := a.Claim(ctx, 1, "a"); err != nil || !r.Won {
		t.Errorf("Claim with a live context = %+v, %v; want won", r, err)
	}
}

func TestOpenSpecs(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "plain")
	if err := os.WriteFile(file, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		spec, want string
		bad        bool // errors.Is(err, ErrBadSpec)
	}{
		{"", "want file:DIR", true},
		{"/some/dir", "want file:DIR", true},
		{"file:", "empty directory", true},
		{"nfs:/x", `unknown scheme "nfs"`, true},
		{"etcd:http://127.0.0.1:2379", "etcd: not built yet", false},
		{"file:" + filepath.Join(dir, "missing"), "no such file or directory", false},
		{"file:" + file, file + ": not a directory", false},
	} {
		a, err := Open(c.spec)
		if err == nil {
			t.Errorf("Open(%q) = %v, want an error", c.spec, a)
			continue
		}
		if !strings.Contains(err.Error(), c.want) || errors.Is(err, ErrBadSpec) != c.bad {
			t.Errorf("Open(%q): %v; want %q (ErrBadSpec %v)", c.spec, err, c.want, c.bad)
		}
	}
	a, err := Open("file:" + dir + "/")
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	if s := a.(fmt.Stringer).String(); s != "file:"+dir {
		t.Errorf("String() = %q", s)
	}
	wantClaim(t, a, 1, "a", Result{true, Holder{1, "a"}})
	ents, _ := os.ReadDir(dir)
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	if fmt.Sprint(names) != "[epoch-1 plain]" {
		t.Errorf("directory holds %v, want only epoch-1 besides the test's file (no probe or temporary files)", names)
	}
}

// TestUnrelatedFiles: files that are not epoch files are ignored.
func TestUnrelatedFiles(t *testing.T) {
	dir := t.TempDir()
	for _, name := range []string{"README", ".claim-3-0123456789abcdef", ".probe-x", "epoch", "epochs", "Epoch-9", "x-epoch-9"} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte("garbage\x00\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Mkdir(filepath.Join(dir, "subdir"), 0o755); err != nil {
		t.Fatal(err)
	}
	modes(t, func(t *testing.T, excl bool) {
		a := open(t, dir, excl)
		h, err := a.Current(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		wantClaim(t, a, h.Epoch+1, "a", Result{true, Holder{h.Epoch + 1, "a"}})
		wantCurrent(t, a, Holder{h.Epoch + 1, "a"})
	})
}

// TestMalformedNames: an epoch file the arbiter did not write fails Open,
// Current and Claim with ErrMalformed, naming the file; nothing panics or
// hangs (a FIFO).
func TestMalformedNames(t *testing.T) {
	for _, c := range []struct {
		name string
		make func(p string) error
	}{
		{"epoch-", writeEmpty},
		{"epoch-abc", writeEmpty},
		{"epoch-007", writeEmpty},
		{"epoch-0", writeEmpty},
		{"epoch-1x", writeEmpty},
		{"epoch--1", writeEmpty},
		{"epoch-+1", writeEmpty},
		{"epoch-18446744073709551616", writeEmpty}, // 2^64
		{"epoch-3", func(p string) error { return os.Mkdir(p, 0o755) }},
		{"epoch-4", func(p string) error { return os.Symlink("epoch-1", p) }},
		{"epoch-5", func(p string) error { return syscall.Mkfifo(p, 0o644) }},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			a := open(t, dir, false)
			wantClaim(t, a, 1, "a", Result{true, Holder{1, "a"}})
			p := filepath.Join(dir, c.name)
			if err := c.make(p); err != nil {
				t.Fatal(err)
			}
			check := func(what string, err error) {
				t.Helper()
				if !errors.Is(err, ErrMalformed) || !strings.Contains(err.Error(), p) {
					t.Errorf("%s: %v; want ErrMalformed naming %s", what, err, p)
				}
			}
			_, err := openFile(dir, false)
			check("Open", err)
			_, err = a.Current(context.Background())
			check("Current", err)
			_, err = a.Claim(context.Background(), 9, "a")
			check("Claim", err)
		})
	}
}

func writeEmpty(p string) error { return os.WriteFile(p, nil, 0o644) }

// TestMalformedContent: an epoch file whose owner is not valid fails what
// reads it, naming the file; a claim above it does not read it and works.
func TestMalformedContent(t *testing.T) {
	for _, content := range []string{
		"\n",
		"a/b\n",
		"a\x00b\n",
		"a\nb\n",
		strings.Repeat("x", MaxOwner+1) + "\n",
		strings.Repeat("x", 5000),
	} {
		t.Run(fmt.Sprintf("%.12q", content), func(t *testing.T) {
			dir := t.TempDir()
			p := filepath.Join(dir, "epoch-2")
			if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
				t.Fatal(err)
			}
			a := open(t, dir, false) // the names parse; contents are read when needed
			check := func(what string, err error) {
				t.Helper()
				if !errors.Is(err, ErrMalformed) || !strings.Contains(err.Error(), p) {
					t.Errorf("%s: %v; want ErrMalformed naming %s", what, err, p)
				}
			}
			_, err := a.Current(context.Background())
			check("Current", err)
			_, err = a.Claim(context.Background(), 2, "a")
			check("Claim of the same epoch", err)
			_, err = a.Claim(context.Background(), 1, "a")
			check("Claim of a lower epoch (reports the holder)", err)
			wantClaim(t, a, 3, "a", Result{true, Holder{3, "a"}})
			wantCurrent(t, a, Holder{3, "a"})
		})
	}
}

// TestTruncated: an epoch file left empty or without its newline by a
// crash mid-claim (the exclusive-create fallback) holds the epoch for an
// unknown owner: every claim of it loses, the next epoch can be won.
func TestTruncated(t *testing.T) {
	for _, content := range []string{"", "hos", "\x00\x00\x00\x00\x00\x00"} {
		t.Run(fmt.Sprintf("%q", content), func(t *testing.T) {
			modes(t, func(t *testing.T, excl bool) {
				dir := t.TempDir()
				a := open(t, dir, excl)
				wantClaim(t, a, 3, "host", Result{true, Holder{3, "host"}})
				if err := os.WriteFile(filepath.Join(dir, "epoch-4"), []byte(content), 0o644); err != nil {
					t.Fatal(err)
				}
				wantCurrent(t, a, Holder{4, ""})
				wantClaim(t, a, 4, "host", Result{false, Holder{4, ""}})
				wantClaim(t, a, 4, "other", Result{false, Holder{4, ""}})
				wantClaim(t, a, 2, "other", Result{false, Holder{4, ""}})
				wantClaim(t, a, 5, "other", Result{true, Holder{5, "other"}})
				wantCurrent(t, a, Holder{5, "other"})
			})
		})
	}
}

// TestHolderString covers the form errors and logs print.
func TestHolderString(t *testing.T) {
	if s := (Holder{3, "hostA"}).String(); s != "epoch 3 (hostA)" {
		t.Errorf("got %q", s)
	}
	if s := (Holder{4, ""}).String(); s != "epoch 4 (owner unknown)" {
		t.Errorf("got %q", s)
	}
}
