package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"time"

	"github.com/gokvm-ft/gokvm-ft/ft"
	"github.com/gokvm-ft/gokvm-ft/machine"
	"github.com/gokvm-ft/gokvm-ft/migrate"
)

// recordedVM is the configuration a recording writes first in its log: what
// a replay needs to build the same machine, started the same way.
type recordedVM struct {
	Mem     uint64
	Host    string
	Kernel  string `json:",omitempty"`
	Initrd  string `json:",omitempty"`
	Cmdline string `json:",omitempty"`
	Restore string `json:",omitempty"` // a snapshot directory the recording started from
	Disk    string `json:",omitempty"` // the disk's image at the start (a copy beside the log)
	// DiskName is the recorded disk's file name, which the guest sees as
	// the disk's serial: the replay's scratch copy takes it too.
	DiskName string `json:",omitempty"`
	DiskRO   bool   `json:",omitempty"`
	NetMAC   string `json:",omitempty"`
	// WallTime is the RTC's time at the start: an input like any other.
	WallTime time.Time
	// HostCPU is the host CPU the recording's vCPU ran on, where CPUID
	// depends on it (the replay runs there too).
	HostCPU *int `json:",omitempty"`
	// SyncPoints: the log has sync points (state deltas, digest checks),
	// so the replay tracks dirty pages and hashes memory as the
	// recording did.
	SyncPoints bool `json:",omitempty"`
	// Positions names the position source (a branch counter makes branch
	// points, which a replay reaches only with the same kind of counter).
	Positions string `json:",omitempty"`
}

// recording is a `gokvm-ft record` run.
type recording struct {
	o   *options
	f   *os.File
	rec *ft.Recorder

	wallTime time.Time
	hostCPU  machine.HostCPU

	syncPoints bool
	positions  string
}

func startRecording(o *options, cfg *machine.Config) (*recording, error) {
	f, err := os.OpenFile(o.ftLog, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return nil, err
	}
	// No buffer of ours: the recorder's own is flushed every FlushEvery,
	// so a replay can follow the file as it grows.
	rec, err := ft.NewRecorder(f, nil)
	if err != nil {
		f.Close()
		return nil, err
	}
	cfg.Journal = rec
	pos := hostPositions(o.positions, cfg.Logger)
	cfg.Positions = pos.new
	cfg.SyncPoints = o.deltaAfter > 0 || o.digestEvery > 0
	cfg.DeltaAfter, cfg.DigestEvery = o.deltaAfter, o.digestEvery
	if cfg.Host == machine.HostLabPVM && !cfg.HostCPU.Pinned {
		// The lab host's CPUID reports the host CPU's APIC ID, which the
		// guest reads without an exit: the replay must run on the same CPU.
		cfg.HostCPU = machine.HostCPU{Pinned: true, CPU: 0}
	}
	// The RTC's starting time is an input: fix it so the log can carry it.
	cfg.WallTime = time.Now().UTC().Truncate(time.Second)
	r := &recording{o: o, f: f, rec: rec, wallTime: cfg.WallTime, hostCPU: cfg.HostCPU, syncPoints: cfg.SyncPoints, positions: pos.name}
	if o.disk != "" && o.restore == "" {
		// Replay must start from the disk as it is now, not as the
		// recording will leave it.
		start := o.ftLog + ".disk"
		os.Remove(start)
		if _, _, err := migrate.CopyImage(start, o.disk); err != nil {
			f.Close()
			return nil, fmt.Errorf("copying the starting disk: %w", err)
		}
	}
	return r, nil
}

// writeConfig records how the machine was built; call it once the guest is
// loaded and before it runs.
func (r *recording) writeConfig(m *machine.Machine) error {
	o := r.o
	vm := recordedVM{Mem: m.Memory().Size(), Host: m.Policy().Host.String(), DiskRO: o.diskRO, WallTime: r.wallTime}
	if r.hostCPU.Pinned {
		vm.HostCPU = &r.hostCPU.CPU
	}
	vm.SyncPoints, vm.Positions = r.syncPoints, r.positions
	if o.restore != "" {
		vm.Restore, _ = filepath.Abs(o.restore)
	} else {
		vm.Kernel, _ = filepath.Abs(o.kernel)
		if o.initrd != "" {
			vm.Initrd, _ = filepath.Abs(o.initrd)
		}
		vm.Cmdline = o.cmdline
	}
	if o.disk != "" {
		vm.Disk, _ = filepath.Abs(o.ftLog + ".disk")
		vm.DiskName = filepath.Base(o.disk)
		if o.restore != "" {
			vm.Disk = "" // the snapshot carries the starting disk
		}
	}
	if o.net != nil {
		vm.NetMAC = o.net.mac.String()
	}
	b, _ := json.Marshal(vm)
	return r.rec.WriteConfig(b)
}

func (r *recording) finish(m *machine.Machine, stderr io.Writer) error {
	if err := r.rec.Finish(m); err != nil {
		return err
	}
	if err := r.f.Sync(); err != nil {
		return err
	}
	st := m.Stats()
	fmt.Fprintf(stderr, "\r\ngokvm-ft: recorded %d entries, %d bytes, %d deterministic exits, %d state deltas, %d branch points, %d digest checks into %s\n",
		r.rec.Entries(), r.rec.Bytes(), m.Exits(), st.Deltas, st.BranchPoints, st.SyncChecks, r.o.ftLog)
	return nil
}

func (r *recording) close() { r.rec.Flush(); r.f.Close() }

// runReplay is `gokvm-ft replay -log FILE [-verify]`.
func runReplay(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("gokvm-ft replay", flag.ContinueOnError)
	fs.SetOutput(stderr)
	logFile := fs.String("log", "", "the log a `gokvm-ft record` wrote (required)")
	verify := fs.Bool("verify", false, "print only the verdict (the guest's console output is discarded)")
	level := fs.String("log-level", "info", "log level: debug, info, warn or error")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return exitOK
		}
		return exitUsage
	}
	var lv slog.Level
	if *logFile == "" || fs.NArg() != 0 || lv.UnmarshalText([]byte(*level)) != nil {
		fmt.Fprintf(stderr, "usage: gokvm-ft replay -log FILE [-verify] [-log-level LEVEL]\n")
		return exitUsage
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: lv}))
	if err := replay(*logFile, *verify, stdout, stderr, log); err != nil {
		fmt.Fprintf(stderr, "\r\ngokvm-ft replay: %v\n", err)
		return exitError
	}
	return exitOK
}

func replay(logFile string, verify bool, stdout, stderr io.Writer, log *slog.Logger) error {
	f, err := os.Open(logFile)
	if err != nil {
		return err
	}
	defer f.Close()
	rep, err := ft.NewReplayer(bufio.NewReaderSize(f, 1<<20))
	if err != nil {
		return fmt.Errorf("%s: %w", logFile, err)
	}
	raw, err := rep.Config()
	if err != nil {
		return fmt.Errorf("%s: %w", logFile, err)
	}
	var vm recordedVM
	if err := json.Unmarshal(raw, &vm); err != nil {
		return fmt.Errorf("%s: the machine configuration: %w", logFile, err)
	}
	host, err := machine.ParseHostKind(vm.Host)
	if err != nil {
		return err
	}
	console := stdout
	if verify {
		console = io.Discard
	}
	o := &options{mem: vm.Mem, host: host, kernel: vm.Kernel, initrd: vm.Initrd, cmdline: vm.Cmdline, diskRO: vm.DiskRO, restore: vm.Restore, noTap: true}
	// The guest writes its disk during replay too: it gets a scratch copy
	// of the starting image, never the recorded one.
	tmp, err := os.MkdirTemp("", "gokvm-ft-replay")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	if vm.Disk != "" {
		name := filepath.Base(vm.DiskName) // never a path out of tmp
		if name == "." || name == ".." || name == "/" || name == "" {
			name = "disk.img"
		}
		o.disk = filepath.Join(tmp, name)
		if _, _, err := migrate.CopyImage(o.disk, vm.Disk); err != nil {
			return fmt.Errorf("the starting disk: %w", err)
		}
	} else if vm.Restore != "" {
		o.restoreDisk = filepath.Join(tmp, "disk.img")
	}
	if vm.NetMAC != "" {
		// Frames come from the log; the guest's frames go nowhere.
		if o.net, err = parseNet("tap=replay,mac=" + vm.NetMAC); err != nil {
			return err
		}
	}
	cfg := machine.Config{MemorySize: vm.Mem, Host: host, Console: console, Logger: log, Journal: rep, WallTime: vm.WallTime, SyncPoints: vm.SyncPoints}
	pos, err := replayPositions(vm.Positions, log)
	if err != nil {
		return fmt.Errorf("%s: %w", logFile, err)
	}
	cfg.Positions = pos.new
	if vm.HostCPU != nil {
		if *vm.HostCPU < 0 || *vm.HostCPU >= runtime.NumCPU() {
			return fmt.Errorf("%s: recorded on host CPU %d, which this host does not have", logFile, *vm.HostCPU)
		}
		cfg.HostCPU = machine.HostCPU{Pinned: true, CPU: *vm.HostCPU}
	}
	var m *machine.Machine
	var devs *devices
	if vm.Restore != "" {
		m, devs, err = restoreMachine(o, cfg, log)
	} else {
		m, devs, err = bootMachine(o, cfg, log)
	}
	if devs != nil {
		defer devs.close()
	}
	if m != nil {
		defer m.Close()
	}
	if err != nil {
		return err
	}
	start := time.Now()
	stop, err := m.Run(context.Background())
	if err != nil {
		return err
	}
	if err := rep.Verify(m); err != nil {
		return err
	}
	st := m.Stats()
	fmt.Fprintf(stderr, "\r\ngokvm-ft replay: the replay matched the recording: %d log entries, %d deterministic exits, %d state deltas applied, %d branch points reached, %d digest checks passed, guest stopped with %v, same state digest (%v)\n",
		rep.Entries, m.Exits(), st.Deltas, st.BranchPoints, st.SyncChecks, stop, time.Since(start).Round(time.Millisecond))
	return nil
}
