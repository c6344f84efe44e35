package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/gokvm-ft/gokvm-ft/ft"
	"github.com/gokvm-ft/gokvm-ft/machine"
	"github.com/gokvm-ft/gokvm-ft/migrate"
)

// The control socket speaks JSON lines: one request, then zero or more
// progress lines and one final line with OK or Error.
type controlRequest struct {
	Op  string // "snapshot" or "migrate"
	Dir string `json:",omitempty"` // snapshot: the directory
	To  string `json:",omitempty"` // migrate: the destination host:port
}

type controlReply struct {
	Progress string `json:",omitempty"`
	OK       string `json:",omitempty"`
	Error    string `json:",omitempty"`
}

// controlServer serves one VMM's control socket.
type controlServer struct {
	ln     net.Listener
	path   string
	runner *machine.Runner
	devs   *devices
	log    *slog.Logger
	node   *ft.Node // an FT pair's VMM (status, switchover)
	// busy counts requests being served: Close lets them answer (a
	// migrate's client must hear that the guest moved before this VMM
	// exits).
	busy sync.WaitGroup
}

func serveControl(path string, r *machine.Runner, devs *devices, log *slog.Logger) (*controlServer, error) {
	if st, err := os.Lstat(path); err == nil && st.Mode()&os.ModeSocket != 0 {
		// A socket left by a VMM that died: nobody answers on it.
		if c, err := net.Dial("unix", path); err == nil {
			c.Close()
			return nil, fmt.Errorf("%s: another VMM is listening there", path)
		}
		os.Remove(path)
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, err
	}
	s := &controlServer{ln: ln, path: path, runner: r, devs: devs, log: log}
	go s.serve()
	return s, nil
}

// Close stops serving and removes the socket, after letting requests in
// progress answer (for up to 10 seconds).
func (s *controlServer) Close() error {
	err := s.ln.Close()
	os.Remove(s.path)
	done := make(chan struct{})
	go func() { s.busy.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
	}
	return err
}

func (s *controlServer) serve() {
	for {
		c, err := s.ln.Accept()
		if err != nil {
			return
		}
		s.busy.Add(1)
		go func() {
			defer s.busy.Done()
			s.handle(c)
		}()
	}
}

func (s *controlServer) handle(c net.Conn) {
	defer c.Close()
	enc := json.NewEncoder(c)
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	line, err := bufio.NewReader(io.LimitReader(c, 64<<10)).ReadBytes('\n')
	c.SetReadDeadline(time.Time{})
	var req controlRequest
	if err == nil {
		err = json.Unmarshal(line, &req)
	}
	if err != nil {
		enc.Encode(controlReply{Error: fmt.Sprintf("bad request: %v", err)})
		return
	}
	progress := func(msg string) { enc.Encode(controlReply{Progress: msg}) }
	var ok string
	switch req.Op {
	case "snapshot":
		ok, err = s.snapshot(req.Dir)
	case "migrate":
		if s.node != nil {
			err = errors.New("migrate: this VMM is one of an FT pair: use switchover (the backup takes over)")
			break
		}
		ok, err = s.migrate(req.To, progress)
	case "status":
		if s.node == nil {
			ok = "not part of an FT pair"
			break
		}
		ok = statusLine(s.node.Status())
	case "switchover":
		if s.node == nil {
			err = errors.New("switchover: this VMM is not part of an FT pair")
			break
		}
		if err = s.node.Switchover(s.runner, 10*time.Second); err == nil {
			ok = "switched over: the backup is the primary now"
		}
	default:
		err = fmt.Errorf("unknown operation %q (snapshot, migrate, status, switchover)", req.Op)
	}
	if err != nil {
		s.log.Warn("control", "op", req.Op, "err", err)
		enc.Encode(controlReply{Error: err.Error()})
		return
	}
	s.log.Info("control", "op", req.Op, "result", ok)
	enc.Encode(controlReply{OK: ok})
}

func (s *controlServer) snapshot(dir string) (string, error) {
	if dir == "" {
		return "", errors.New("snapshot: no directory")
	}
	var took time.Duration
	err := s.runner.Pause(func() (bool, error) {
		t := time.Now()
		err := migrate.Save(dir, s.runner.M, s.devs.disks)
		took = time.Since(t)
		return false, err
	})
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("snapshot in %s; the guest was paused for %v", dir, took.Round(time.Millisecond)), nil
}

func (s *controlServer) migrate(to string, progress func(string)) (string, error) {
	c, err := net.DialTimeout("tcp", to, 10*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	res, err := migrate.Send(c, s.runner.M, migrate.SendOptions{
		Disks:    s.devs.disks,
		Pause:    s.runner.Pause,
		Release:  s.devs.releaseNet,
		Progress: func(p migrate.Progress) { progress(p.String()) },
	})
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("moved to %s: %.1f MiB in %d pre-copy rounds, %v in all; downtime %v (%d pages at the end)",
		to, float64(res.Bytes)/(1<<20), res.Rounds, res.Total.Round(time.Millisecond), res.Downtime.Round(time.Microsecond), res.FinalPages), nil
}

// runClient is `gokvm-ft snapshot|migrate -control PATH ARG`.
func runClient(args []string, stdout, stderr io.Writer) int {
	op := args[0]
	fs := flag.NewFlagSet("gokvm-ft "+op, flag.ContinueOnError)
	fs.SetOutput(stderr)
	path := fs.String("control", "", "the VMM's control socket (its -control flag)")
	what := map[string]string{"snapshot": "DIR", "migrate": "HOST:PORT"}[op]
	nargs := 1
	if what == "" {
		nargs = 0 // status, switchover
	}
	fs.Usage = func() {
		fmt.Fprintf(stderr, "usage: gokvm-ft %s -control PATH%s\n", op, strings.TrimRight(" "+what, " "))
		fs.PrintDefaults()
	}
	if err := fs.Parse(args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return exitOK
		}
		return exitUsage
	}
	if *path == "" || fs.NArg() != nargs {
		fs.Usage()
		return exitUsage
	}
	req := controlRequest{Op: op}
	if op == "snapshot" {
		req.Dir = fs.Arg(0)
		if abs, err := filepath.Abs(req.Dir); err == nil { // the VMM may run elsewhere
			req.Dir = abs
		}
	} else if op == "migrate" {
		req.To = fs.Arg(0)
	}
	c, err := net.Dial("unix", *path)
	if err != nil {
		fmt.Fprintf(stderr, "gokvm-ft %s: %v\n", op, err)
		return exitError
	}
	defer c.Close()
	if err := json.NewEncoder(c).Encode(req); err != nil {
		fmt.Fprintf(stderr, "gokvm-ft %s: %v\n", op, err)
		return exitError
	}
	dec := json.NewDecoder(c)
	for {
		var r controlReply
		if err := dec.Decode(&r); err != nil {
			fmt.Fprintf(stderr, "gokvm-ft %s: the VMM hung up: %v\n", op, err)
			return exitError
		}
		switch {
		case r.Progress != "":
			fmt.Fprintln(stdout, r.Progress)
		case r.Error != "":
			fmt.Fprintf(stderr, "gokvm-ft %s: %s\n", op, r.Error)
			return exitError
		default:
			fmt.Fprintln(stdout, r.OK)
			return exitOK
		}
	}
}
