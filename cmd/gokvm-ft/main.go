// Command gokvm-ft runs a virtual machine on KVM: by default the bundled
// Linux kernel and u-root initramfs, with the guest's serial console on the
// terminal. Ctrl-A x quits.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/gokvm-ft/gokvm-ft/boot"
	"github.com/gokvm-ft/gokvm-ft/machine"
)

// Exit statuses.
const (
	exitOK          = 0
	exitError       = 1
	exitUsage       = 2
	exitReset       = 3
	exitTripleFault = 4
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
}

// options are the parsed command line.
type options struct {
	mem         uint64
	kernel      string
	initrd      string
	append      string
	host        machine.HostKind
	logLevel    slog.Level
	profile     string
	stats       bool
	disk        string
	diskRO      bool
	net         *netSpec
	control     string        // control socket path
	restore     string        // snapshot directory to start from
	restoreDisk string        // replay: where a restored snapshot's disk is copied, if it has one
	incoming    string        // address to receive a live transfer on
	ftLog       string        // record: the log file to write
	deltaAfter  time.Duration // record: state delta bound (0: exits only)
	digestEvery time.Duration // record: digest checks
	cmdline     string        // the exact kernel command line (replay), instead of building one
	noTap       bool          // a virtio-net card with no tap behind it (replay)
	hostCPU     int           // host CPU to pin the vCPU thread to, -1 for none
	positions   string        // record, pair: -positions (auto or exits)
	pair        pairOptions   // -primary / -backup
}

// parseSize parses a memory size: bytes, or a number with K, M or G.
func parseSize(s string) (uint64, error) {
	mult := uint64(1)
	t := strings.ToUpper(strings.TrimSpace(s))
	t = strings.TrimSuffix(t, "B")
	if t != "" {
		switch t[len(t)-1] {
		case 'K':
			mult, t = 1<<10, t[:len(t)-1]
		case 'M':
			mult, t = 1<<20, t[:len(t)-1]
		case 'G':
			mult, t = 1<<30, t[:len(t)-1]
		}
	}
	n, err := strconv.ParseUint(t, 10, 64)
	if err != nil || n == 0 || n > (1<<62)/mult {
		return 0, fmt.Errorf("bad size %q (want e.g. 256M or 1G)", s)
	}
	return n * mult, nil
}

func parseFlags(args []string, stderr io.Writer) (*options, error) {
	return parseFlagsFor("", args, stderr)
}

// parseFlagsFor parses the VM flags; for the record subcommand -log names
// the log file and -log-level the log level.
func parseFlagsFor(sub string, args []string, stderr io.Writer) (*options, error) {
	fs := flag.NewFlagSet("gokvm-ft", flag.ContinueOnError)
	fs.SetOutput(stderr)
	mem := fs.String("mem", "256M", "guest RAM (K, M or G suffix)")
	kernel := fs.String("kernel", defaultKernel(), "Linux kernel: bzImage or ELF vmlinux")
	initrd := fs.String("initrd", "images/out/initramfs.cpio", "initramfs (empty for none)")
	appendArgs := fs.String("append", "", "extra kernel command-line arguments")
	host := fs.String("host", "auto", "host kind for CPU feature masks: auto, lab or bare-metal")
	levelFlag := "log"
	var ftLog *string
	var deltaAfter, digestEvery *time.Duration
	if sub == "record" {
		levelFlag = "log-level"
		ftLog = fs.String("log", "", "the record/replay log to write (required); a disk's starting image is copied beside it (FILE.disk)")
		deltaAfter = fs.Duration("delta-after", 10*time.Millisecond, "record: a due interrupt waits at most this long for a deterministic exit, then goes in with a state delta (0: wait for the exit)")
		digestEvery = fs.Duration("digest-every", time.Second, "record: log a state digest at a deterministic exit this often, for the replay to check (0: only at the end)")
	}
	logLevel := fs.String(levelFlag, "info", "log level: debug, info, warn or error")
	disk := fs.String("disk", "", "raw disk image for a virtio-blk disk (the guest's /dev/vda)")
	diskRO := fs.Bool("disk-ro", false, "make the -disk read-only")
	netFlag := fs.String("net", "", "virtio-net on a Linux tap device: tap=NAME[,mac=52:54:00:12:34:56]")
	control := fs.String("control", "", "serve a control socket at this path (gokvm-ft snapshot, migrate, status and switchover talk to it)")
	restoreDir := fs.String("restore", "", "start from the snapshot in this directory instead of booting (disk: the snapshot's copy, or -disk PATH, copied there if it does not exist)")
	incoming := fs.String("incoming", "", "wait on this TCP address (host:port) for a live transfer, then run the guest")
	stats := fs.Bool("stats", false, "print exit statistics (exits by reason and port, time in the guest) at exit")
	positionsMode := fs.String("positions", "auto", "record and FT pair: where asynchronous events go: auto (exactly where they fall due, counted by the host's branch counter, where a probe finds an exact one; experimental) or exits (at deterministic exits, with state deltas for guests that make none)")
	hostCPU := fs.Int("host-cpu", -1, "pin the vCPU thread to this host CPU (-1: no pinning, except that a recording on the lab host pins to CPU 0, since its CPUID reports the host CPU)")
	var primary, backup, serve, keyFile, arbSpec, pairName, guestIP *string
	var peerTimeout, maxLag, joinTimeout *time.Duration
	var diskShared *bool
	if sub == "" {
		primary = fs.String("primary", "", "run the guest as an FT primary, serving the logging channel on this address (host:port); unprotected until a backup joins")
		backup = fs.String("backup", "", "join the FT primary at this address (host:port) as its backup: the guest comes from the primary, not from -kernel")
		serve = fs.String("serve", "", "FT backup: once live (after a failover), serve the logging channel on this address (host:port) for a new backup")
		keyFile = fs.String("key", "", "FT pair: file with the secret both VMMs share (at least 16 bytes)")
		arbSpec = fs.String("arbiter", "", "FT pair: where the pair decides who is live: file:DIR on storage both hosts share (one directory per protected guest)")
		pairName = fs.String("name", "", "FT pair: this VMM's name at the arbiter and in logs (default host/pid)")
		guestIP = fs.String("guest-ip", "", "FT pair: the guest's addresses to announce after a failover, comma-separated (besides those learnt from its traffic)")
		peerTimeout = fs.Duration("peer-timeout", 200*time.Millisecond, "FT pair: declare the peer lost after this long without a word from it")
		maxLag = fs.Duration("max-lag", 100*time.Millisecond, "FT pair: slow the primary's guest down when the backup's replay is this far behind")
		joinTimeout = fs.Duration("join-timeout", time.Minute, "FT backup: how long to wait for the primary to answer")
		diskShared = fs.Bool("disk-shared", false, "FT pair: both VMMs use the one -disk image (shared storage): only the live VMM writes it, each write once the backup has the log that produced it; the backup's reads come from the primary's log")
	}
	profile := fs.String("profile", "", "write a sampling profile of guest RIPs to this file at exit (kernel symbols from System.map beside -kernel)")
	fs.Usage = func() {
		fmt.Fprintf(stderr, "usage: gokvm-ft [flags]\n       gokvm-ft -primary HOST:PORT -key FILE -arbiter file:DIR [flags]\n       gokvm-ft -backup HOST:PORT -key FILE -arbiter file:DIR [flags]\n       gokvm-ft snapshot -control PATH DIR\n       gokvm-ft migrate -control PATH HOST:PORT\n       gokvm-ft status|switchover -control PATH\n\nRuns a VM with the guest's serial console on this terminal (Ctrl-A x quits).\n\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	o := &options{kernel: *kernel, initrd: *initrd, append: *appendArgs, profile: *profile, stats: *stats, disk: *disk, diskRO: *diskRO,
		control: *control, restore: *restoreDir, incoming: *incoming, hostCPU: *hostCPU}
	var err error
	if o.restore != "" && o.incoming != "" {
		return nil, fmt.Errorf("-restore and -incoming exclude each other")
	}
	if sub == "record" {
		if o.ftLog = *ftLog; o.ftLog == "" {
			return nil, fmt.Errorf("record: -log FILE is required")
		}
		if o.incoming != "" {
			return nil, fmt.Errorf("record: -incoming is not supported (record on the machine the guest starts on)")
		}
		if o.deltaAfter, o.digestEvery = *deltaAfter, *digestEvery; o.deltaAfter < 0 || o.digestEvery < 0 {
			return nil, fmt.Errorf("record: -delta-after and -digest-every must not be negative")
		}
	}
	if o.positions, err = parsePositionsMode(*positionsMode); err != nil {
		return nil, err
	}
	if o.hostCPU < -1 || o.hostCPU >= runtime.NumCPU() {
		return nil, fmt.Errorf("-host-cpu: %d is not a CPU of this host (0 to %d, or -1)", o.hostCPU, runtime.NumCPU()-1)
	}
	if o.diskRO && o.disk == "" {
		return nil, fmt.Errorf("-disk-ro needs -disk")
	}
	if *netFlag != "" {
		if o.net, err = parseNet(*netFlag); err != nil {
			return nil, fmt.Errorf("-net: %w", err)
		}
	}
	if o.mem, err = parseSize(*mem); err != nil {
		return nil, fmt.Errorf("-mem: %w", err)
	}
	if o.mem%machine.PageSize != 0 || o.mem > machine.MaxMemory {
		return nil, fmt.Errorf("-mem: %s must be a multiple of 4K and at most %dM", *mem, machine.MaxMemory>>20)
	}
	if o.host, err = machine.ParseHostKind(*host); err != nil {
		return nil, fmt.Errorf("-host: %w", err)
	}
	if err := o.logLevel.UnmarshalText([]byte(*logLevel)); err != nil {
		return nil, fmt.Errorf("-%s: %w", levelFlag, err)
	}
	if sub == "" {
		if err := o.parsePair(*primary, *backup, *serve, *keyFile, *arbSpec, *pairName, *guestIP, *peerTimeout, *maxLag, *joinTimeout, *diskShared); err != nil {
			return nil, err
		}
	}
	return o, nil
}

func run(args []string, stdin *os.File, stdout, stderr io.Writer) int {
	sub := ""
	if len(args) > 0 {
		switch args[0] {
		case "snapshot", "migrate", "status", "switchover":
			return runClient(args, stdout, stderr)
		case "replay":
			return runReplay(args[1:], stdout, stderr)
		case "record":
			sub, args = "record", args[1:]
		}
	}
	o, err := parseFlagsFor(sub, args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return exitOK
	}
	if err != nil {
		fmt.Fprintf(stderr, "gokvm-ft: %v\n", err)
		return exitUsage
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: o.logLevel}))
	if o.pair.primary != "" || o.pair.backup != "" {
		return runPair(o, stdin, stdout, stderr, log)
	}
	if o.restore == "" && o.incoming == "" {
		if err := checkImages(o); err != nil {
			fmt.Fprintf(stderr, "gokvm-ft: %v\n", err)
			return exitError
		}
	}
	var prof *ripProfile
	cfg := machine.Config{MemorySize: o.mem, Host: o.host, Console: stdout, Logger: log}
	if o.hostCPU >= 0 {
		cfg.HostCPU = machine.HostCPU{Pinned: true, CPU: o.hostCPU}
	}
	var rec *recording
	if o.ftLog != "" {
		if rec, err = startRecording(o, &cfg); err != nil {
			fmt.Fprintf(stderr, "gokvm-ft: record: %v\n", err)
			return exitError
		}
		defer rec.close()
	}
	if o.profile != "" {
		prof = newRIPProfile()
		cfg.OnHostExit = prof.add
	}
	var m *machine.Machine
	var devs *devices
	switch {
	case o.restore != "":
		m, devs, err = restoreMachine(o, cfg, log)
	case o.incoming != "":
		m, devs, err = receiveMachine(o, cfg, log, stderr)
	default:
		m, devs, err = bootMachine(o, cfg, log)
	}
	if devs != nil {
		defer devs.close()
	}
	if m != nil {
		defer m.Close()
	}
	if err != nil {
		fmt.Fprintf(stderr, "gokvm-ft: %v\n", err)
		return exitError
	}
	if rec != nil {
		if err := rec.writeConfig(m); err != nil {
			fmt.Fprintf(stderr, "gokvm-ft: record: %v\n", err)
			return exitError
		}
	}
	runner := &machine.Runner{M: m}
	if o.control != "" {
		ctl, err := serveControl(o.control, runner, devs, log)
		if err != nil {
			fmt.Fprintf(stderr, "gokvm-ft: -control: %v\n", err)
			return exitError
		}
		defer ctl.Close()
	}

	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer cancel()
	restore := consoleInput(stdin, m.DeliverSerial, cancel)
	stopKick := make(chan struct{})
	if prof != nil {
		go kicker(m.Kick, 200, stopKick)
	}
	stop, err := runner.Run(ctx)
	close(stopKick)
	log.Debug("device state at stop", "pic", fmt.Sprintf("%+v", m.PIC.Save()), "uart", fmt.Sprintf("%+v", m.UART.Save()))
	restore()
	if o.stats {
		m.Stats().Write(stderr)
	}
	if prof != nil {
		if f, ferr := os.Create(o.profile); ferr == nil {
			prof.write(f, loadSystemMap(filepath.Join(filepath.Dir(o.kernel), "System.map")))
			f.Close()
		}
	}
	m.CloseInput()
	if err != nil {
		fmt.Fprintf(stderr, "\r\ngokvm-ft: %v\n", err)
		return exitError
	}
	if rec != nil {
		if err := rec.finish(m, stderr); err != nil {
			fmt.Fprintf(stderr, "\r\ngokvm-ft: record: %v\n", err)
			return exitError
		}
	}
	return stopStatus(stop, stderr)
}

// stopStatus reports how the guest stopped and picks the exit status.
func stopStatus(stop machine.Stop, stderr io.Writer) int {
	switch stop.Kind {
	case machine.StopPowerOff, machine.StopHalted, machine.StopCanceled:
		return exitOK
	case machine.StopMoved:
		fmt.Fprintf(stderr, "\r\ngokvm-ft: the guest moved to another VMM\n")
		return exitOK
	case machine.StopTestExit:
		return int(min(stop.Code, 125))
	case machine.StopReset:
		fmt.Fprintf(stderr, "\r\ngokvm-ft: guest reset (%s): stopping\n", stop.Detail)
		return exitReset
	case machine.StopTripleFault:
		fmt.Fprintf(stderr, "\r\ngokvm-ft: guest triple fault: stopping\n")
		return exitTripleFault
	}
	fmt.Fprintf(stderr, "\r\ngokvm-ft: guest stopped: %v\n", stop)
	return exitError
}

// defaultKernel prefers the bundled ELF vmlinux, which is entered at
// startup_64 directly, over the bzImage, whose decompressor would run first
// (slowly where guest kernel code is emulated).
func defaultKernel() string {
	if _, err := os.Stat("images/out/vmlinux"); err == nil {
		return "images/out/vmlinux"
	}
	return "images/out/bzImage"
}

// checkImages makes sure the kernel and initrd exist before anything else.
func checkImages(o *options) error {
	for _, f := range []struct{ flag, path string }{{"-kernel", o.kernel}, {"-initrd", o.initrd}} {
		if f.path == "" && f.flag == "-initrd" {
			continue
		}
		st, err := os.Stat(f.path)
		if err != nil {
			hint := ""
			if strings.HasPrefix(f.path, "images/out/") {
				hint = " (run `make images` to build the bundled images)"
			}
			return fmt.Errorf("%s %s: %w%s", f.flag, f.path, errors.Unwrap(err), hint)
		}
		if !st.Mode().IsRegular() {
			return fmt.Errorf("%s %s: not a regular file", f.flag, f.path)
		}
	}
	return nil
}

// loadGuest puts the kernel, initrd and command line into the machine and
// sets the vCPU to enter the kernel.
func loadGuest(m *machine.Machine, o *options, log *slog.Logger) error {
	kernel, err := os.ReadFile(o.kernel)
	if err != nil {
		return fmt.Errorf("-kernel: %w", err)
	}
	var initrd []byte
	if o.initrd != "" {
		if initrd, err = os.ReadFile(o.initrd); err != nil {
			return fmt.Errorf("-initrd: %w", err)
		}
	}
	cmdline := o.cmdline
	if cmdline == "" {
		cmdline = m.KernelCmdline(o.append)
	}
	o.cmdline = cmdline
	res, err := boot.Load(m.Memory(), boot.Config{KernelName: o.kernel, Kernel: kernel, InitrdName: o.initrd, Initrd: initrd, Cmdline: cmdline})
	if err != nil {
		return err
	}
	log.Debug("kernel loaded", "format", res.Format, "entry", fmt.Sprintf("%#x", res.Entry), "initrd", fmt.Sprintf("%#x", res.InitrdAddr), "cmdline", cmdline)
	cpu := m.VCPU()
	sregs, err := cpu.GetSregs()
	if err != nil {
		return err
	}
	res.SetSregs(&sregs)
	if err := cpu.SetSregs(sregs); err != nil {
		return err
	}
	return cpu.SetRegs(res.Regs)
}
