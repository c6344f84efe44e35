package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/gokvm-ft/gokvm-ft/ft"
	"github.com/gokvm-ft/gokvm-ft/ft/announce"
	"github.com/gokvm-ft/gokvm-ft/ft/arbiter"
	"github.com/gokvm-ft/gokvm-ft/ft/channel"
	"github.com/gokvm-ft/gokvm-ft/machine"
	"github.com/gokvm-ft/gokvm-ft/migrate"
)

// pairOptions are the FT pair's flags.
type pairOptions struct {
	primary, backup string // the logging channel's address
	serve           string // a backup: where to serve backups once live
	keyFile         string
	arbiter         string
	name            string
	peerTimeout     time.Duration
	maxLag          time.Duration
	guestIPs        []netip.Addr
	joinTimeout     time.Duration
	// diskShared: both VMMs use one -disk image on shared storage.
	diskShared bool
}

// protocolName names what a pair's VMMs must share beyond the channel: the
// machine model and how positions are counted.
const protocolName = "gokvm-ft pair 1"

// pairCompat is what the two VMMs of a pair compare before any guest data
// flows.
type pairCompat struct {
	Protocol string
	Host     string // host kind: the CPU feature masks depend on it
	Position string // the position source
	Memory   uint64
	Devices  []string // virtio devices, in order
	MAC      string   `json:",omitempty"`
	DiskRO   bool     `json:",omitempty"`
	// DiskWanted: a backup without an image of its own at its -disk path
	// (the join copies the primary's there).
	DiskWanted bool `json:",omitempty"`
	// DiskShared: the VMMs share one image (-disk-shared).
	DiskShared bool `json:",omitempty"`
	// DiskFile identifies the image file (host, device, inode): two VMMs
	// of a pair on one host must not share one (each applies the guest's
	// writes to its own).
	DiskFile string `json:",omitempty"`
	// Epoch is the primary's arbiter epoch; Name the sender's.
	Epoch uint64 `json:",omitempty"`
	Name  string
}

// compat is this side's record; position names its position source.
func (o *options) compat(name, position string, epoch uint64) pairCompat {
	c := pairCompat{Protocol: protocolName, Host: o.host.String(), Position: position, Memory: o.mem, DiskRO: o.diskRO, Epoch: epoch, Name: name}
	if o.disk != "" {
		c.Devices = append(c.Devices, "disk")
		c.DiskShared = o.pair.diskShared
		st, err := os.Stat(o.disk)
		if o.pair.backup != "" && errors.Is(err, os.ErrNotExist) && !c.DiskShared {
			c.DiskWanted = true
		}
		if err == nil {
			if sys, ok := st.Sys().(*syscall.Stat_t); ok {
				host, _ := os.Hostname()
				c.DiskFile = fmt.Sprintf("%s:%d:%d", host, sys.Dev, sys.Ino)
			}
		}
	}
	if o.net != nil {
		c.Devices = append(c.Devices, "net")
		c.MAC = o.net.mac.String()
	}
	return c
}

// check says how the peer's record differs from this side's, in words.
func (c pairCompat) check(peer pairCompat) error {
	var diffs []string
	differ := func(what string, here, there any) {
		diffs = append(diffs, fmt.Sprintf("%s: %v here, %v on %s", what, here, there, peer.Name))
	}
	if c.Protocol != peer.Protocol {
		differ("protocol", c.Protocol, peer.Protocol)
	}
	if c.Host != peer.Host {
		differ("host kind (-host)", c.Host, peer.Host)
	}
	if c.Position != peer.Position {
		differ("position source", c.Position, peer.Position)
	}
	if c.Memory != peer.Memory {
		differ("guest memory (-mem)", fmt.Sprintf("%dM", c.Memory>>20), fmt.Sprintf("%dM", peer.Memory>>20))
	}
	if !slices.Equal(c.Devices, peer.Devices) {
		differ("devices (-disk, -net)", c.Devices, peer.Devices)
	}
	if c.MAC != peer.MAC {
		differ("guest MAC (-net mac=)", c.MAC, peer.MAC)
	}
	if c.DiskRO != peer.DiskRO {
		differ("-disk-ro", c.DiskRO, peer.DiskRO)
	}
	if c.DiskShared != peer.DiskShared {
		differ("-disk-shared", c.DiskShared, peer.DiskShared)
	}
	if c.DiskFile != "" && c.DiskFile == peer.DiskFile && !c.DiskShared {
		diffs = append(diffs, "both VMMs use the same disk image file: each needs its own copy (give the backup a -disk path that does not exist, and the join copies the primary's there)")
	}
	if len(diffs) > 0 {
		return errors.New(strings.Join(diffs, "; "))
	}
	return nil
}

// readKey reads the shared key file.
func readKey(path string) ([]byte, error) {
	st, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("-key: %w", err)
	}
	if st.Size() > 1<<16 {
		return nil, fmt.Errorf("-key: %s has %d bytes: a key file holds a secret, not data", path, st.Size())
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("-key: %w", err)
	}
	b = bytes.TrimSpace(b)
	if len(b) < channel.MinKey {
		return nil, fmt.Errorf("-key: %s holds %d bytes, fewer than %d (make one with: head -c 32 /dev/urandom | base64 > %s)", path, len(b), channel.MinKey, path)
	}
	return b, nil
}

// pairVMM is one VMM of a pair, either role.
type pairVMM struct {
	o    *options
	log  *slog.Logger
	key  []byte
	arb  arbiter.Arbiter
	name string
	// positions: the position source both VMMs of the pair must share.
	positions positions
	node      *ft.Node
	runner    *machine.Runner
	devs      *devices
	learn     *announce.Learner
	stderr    io.Writer
	// createdDisk is the disk image a join copied from the primary (a
	// resynchronization copies it again).
	createdDisk string
}

// channelConfig is the channel's configuration for this VMM in role; once
// the handshake has checked the peer's compatibility record, it is in
// *peer.
func (p *pairVMM) channelConfig(role channel.Role, epoch uint64) (channel.Config, *pairCompat) {
	hb := min(max(p.o.pair.peerTimeout/10, 5*time.Millisecond), 50*time.Millisecond)
	compat := p.o.compat(p.name, p.positions.name, epoch)
	raw, _ := json.Marshal(compat)
	peer := &pairCompat{}
	return channel.Config{
		Key: p.key, Role: role, Compat: raw, Heartbeat: hb, Timeout: p.o.pair.peerTimeout, MaxLag: p.o.pair.maxLag,
		Logger: p.log,
		Check: func(rec []byte) error {
			if err := json.Unmarshal(rec, peer); err != nil {
				return fmt.Errorf("the peer's compatibility record: %v", err)
			}
			if role == channel.Backup && peer.Epoch == 0 {
				return errors.New("the primary's compatibility record has no arbiter epoch")
			}
			return compat.check(*peer)
		},
	}, peer
}

// machineConfig is the configuration of a pair's machine: a Switch journal
// and sync points (state deltas for guests that do not exit).
func (p *pairVMM) machineConfig(sw *ft.Switch, stdout io.Writer) machine.Config {
	o := p.o
	cfg := machine.Config{MemorySize: o.mem, Host: o.host, Console: stdout, Logger: p.log, Journal: sw,
		SyncPoints: true, DeltaAfter: 10 * time.Millisecond, DigestEvery: time.Second, Positions: p.positions.new}
	switch {
	case o.hostCPU >= 0:
		cfg.HostCPU = machine.HostCPU{Pinned: true, CPU: o.hostCPU}
	case o.host == machine.HostLabPVM:
		// The lab host's CPUID reports the host CPU's APIC ID without an
		// exit: both VMMs run their vCPU on the same CPU number.
		cfg.HostCPU = machine.HostCPU{Pinned: true, CPU: 0}
	}
	return cfg
}

// newNode makes m a node of the pair, learning the guest's addresses from
// its frames and announcing them when it goes live.
func (p *pairVMM) newNode(m *machine.Machine, sw *ft.Switch) {
	p.node = ft.NewNode(m, sw, p.arb, p.name, p.log)
	p.node.OnLive = p.onLive
	p.runner = &machine.Runner{M: m}
	if p.o.net == nil {
		return
	}
	p.learn = announce.NewLearner(p.o.net.mac)
	p.node.Observe = func(out machine.Output) {
		if out.Port.Name() == "net" && out.Data.Size() <= 256 {
			p.learn.Observe(out.Data.Flatten())
		}
	}
}

// onLive is what a backup does when it has gone live: the guest gets its
// tap and is announced, and backups may join at -serve.
func (p *pairVMM) onLive() {
	if p.o.net != nil {
		p.goLive()
	}
	if p.o.pair.serve == "" {
		return
	}
	ln, err := net.Listen("tcp", p.o.pair.serve)
	if err != nil {
		p.log.Error("-serve: the guest runs unprotected", "err", err)
		return
	}
	p.log.Info("serving backups", "listen", ln.Addr().String())
	go p.serveBackups(ln)
}

// goLive lets the tap's frames in and announces the guest's addresses.
func (p *pairVMM) goLive() {
	if p.devs == nil || p.devs.net == nil {
		return
	}
	p.devs.net.goLive()
	p.announce()
}

// announce sends gratuitous ARP, RARP and unsolicited NA for the guest: a
// few times, since a switch may miss the first frames while links settle.
func (p *pairVMM) announce() {
	addrs := append(p.learn.Addrs(), p.o.pair.guestIPs...)
	frames, err := announce.Frames(p.o.net.mac, addrs)
	if err != nil {
		p.log.Warn("announcing the guest", "err", err)
		return
	}
	p.devs.net.announce(frames)
	p.log.Info("announced the guest", "mac", p.o.net.mac, "addresses", addrs, "frames", len(frames))
	go func() {
		for _, d := range []time.Duration{50 * time.Millisecond, 150 * time.Millisecond, 300 * time.Millisecond} {
			time.Sleep(d)
			p.devs.net.announce(frames)
		}
	}()
}

// runPair is `gokvm-ft -primary ADDR` and `gokvm-ft -backup ADDR`.
func runPair(o *options, stdin *os.File, stdout, stderr io.Writer, log *slog.Logger) int {
	fail := func(err error) int {
		fmt.Fprintf(stderr, "\r\ngokvm-ft: %v\n", err)
		return exitError
	}
	p := &pairVMM{o: o, log: log, stderr: stderr}
	var err error
	if p.key, err = readKey(o.pair.keyFile); err != nil {
		return fail(err)
	}
	if p.arb, err = arbiter.Open(o.pair.arbiter); err != nil {
		return fail(fmt.Errorf("-arbiter: %w", err))
	}
	defer p.arb.Close()
	p.positions = hostPositions(o.positions, log)
	p.name = o.pair.name
	if p.name == "" {
		host, _ := os.Hostname()
		p.name = fmt.Sprintf("%s/%d", host, os.Getpid())
	}
	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer cancel()
	// Console input goes to the machine of the moment (a backup that
	// resynchronizes gets a new one).
	var mu sync.Mutex
	var cur *machine.Machine
	restore := consoleInput(stdin, func(b []byte) bool {
		mu.Lock()
		m := cur
		mu.Unlock()
		return m == nil || m.DeliverSerial(b)
	}, cancel)
	defer restore()
	for resyncs := 0; ; resyncs++ {
		sw := ft.NewSwitch(nil)
		cfg := p.machineConfig(sw, stdout)
		var m *machine.Machine
		if o.pair.backup != "" {
			m, err = p.join(ctx, sw, cfg)
		} else {
			m, err = p.startPrimary(ctx, sw, cfg)
		}
		mu.Lock()
		cur = m
		mu.Unlock()
		stop, err := p.runMachine(ctx, m, err)
		if p.devs != nil {
			p.devs.close()
			p.devs = nil
		}
		if m != nil {
			m.Close()
		}
		if o.pair.backup != "" && ft.IsDivergence(err) && resyncs < maxResyncs && ctx.Err() == nil {
			// A diverged backup never goes live with a state the world
			// has not seen: it starts again from the primary's.
			log.Warn("the backup diverged: resynchronizing by state transfer", "err", err, "resync", resyncs+1)
			if p.createdDisk != "" {
				os.Remove(p.createdDisk) // copied again, with the rest
				p.createdDisk = ""
			}
			continue
		}
		if err != nil {
			return fail(err)
		}
		if stop.Kind == machine.StopMoved {
			fmt.Fprintf(stderr, "\r\ngokvm-ft: switched over: the backup runs the guest now\n")
			return exitOK
		}
		return stopStatus(stop, stderr)
	}
}

// maxResyncs bounds how often a backup starts again after diverging.
const maxResyncs = 5

// runMachine runs the node's machine, built (or not, with err) by join or
// startPrimary, and serves the control socket while it runs.
func (p *pairVMM) runMachine(ctx context.Context, m *machine.Machine, err error) (machine.Stop, error) {
	if err != nil {
		return machine.Stop{}, err
	}
	o := p.o
	if o.control != "" {
		ctl, err := serveControl(o.control, p.runner, p.devs, p.log)
		if err != nil {
			return machine.Stop{}, fmt.Errorf("-control: %w", err)
		}
		ctl.node = p.node
		defer ctl.Close()
	}
	stop, err := p.node.Run(ctx, p.runner)
	if o.stats {
		m.Stats().Write(p.stderr)
	}
	return stop, err
}

// startPrimary boots (or restores) the guest, claims the arbiter and serves
// the logging channel: the guest runs unprotected until a backup joins.
func (p *pairVMM) startPrimary(ctx context.Context, sw *ft.Switch, cfg machine.Config) (*machine.Machine, error) {
	o := p.o
	if o.restore == "" {
		if err := checkImages(o); err != nil {
			return nil, err
		}
	}
	ln, err := net.Listen("tcp", o.pair.primary)
	if err != nil {
		return nil, fmt.Errorf("-primary: %w", err)
	}
	var m *machine.Machine
	if o.restore != "" {
		m, p.devs, err = restoreMachine(o, cfg, p.log)
	} else {
		m, p.devs, err = bootMachine(o, cfg, p.log)
	}
	if err != nil {
		ln.Close()
		return m, err
	}
	p.newNode(m, sw)
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	res, err := p.node.Claim(cctx, 0)
	cancel()
	if err != nil {
		ln.Close()
		return m, fmt.Errorf("-arbiter: %w", err)
	}
	if !res.Won {
		ln.Close()
		return m, fmt.Errorf("-arbiter: %v took epoch %d first: another VMM went live at the same moment", res.Holder, res.Holder.Epoch)
	}
	p.log.Info("primary: running unprotected until a backup joins", "listen", ln.Addr().String(), "epoch", p.node.Epoch())
	go p.serveBackups(ln)
	context.AfterFunc(ctx, func() { ln.Close() })
	return m, nil
}

// serveBackups takes backups on ln, one at a time.
func (p *pairVMM) serveBackups(ln net.Listener) {
	defer ln.Close()
	var mu sync.Mutex // one join at a time
	for {
		nc, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			mu.Lock()
			defer mu.Unlock()
			p.acceptBackup(nc)
		}()
	}
}

func (p *pairVMM) acceptBackup(nc net.Conn) {
	log := p.log.With("peer", nc.RemoteAddr().String())
	cfg, peer := p.channelConfig(channel.Primary, p.node.Epoch())
	check := cfg.Check
	cfg.Check = func(peer []byte) error {
		if st := p.node.Status(); st.Role != ft.RoleAlone {
			return fmt.Errorf("this primary is %v (it already has a backup)", st.Role)
		}
		return check(peer)
	}
	conn, err := channel.Establish(nc, cfg)
	if err != nil {
		log.Warn("backup refused", "err", err)
		return
	}
	log.Info("backup authenticated: copying the guest to it", "with the disk", peer.DiskWanted)
	start := time.Now()
	res, err := p.node.AcceptBackup(conn, p.runner, migrate.SendOptions{
		Disks:     p.devs.disks,
		CopyDisks: peer.DiskWanted,
		Progress:  func(pr migrate.Progress) { log.Debug("joining", "progress", pr.String()) },
	})
	if err != nil {
		conn.Close("the join failed: " + err.Error())
		log.Warn("backup join failed", "err", err)
		return
	}
	log.Info("joined: the guest is protected", "copied MiB", fmt.Sprintf("%.1f", float64(res.Bytes)/(1<<20)), "rounds", res.Rounds,
		"paused", res.Downtime.Round(time.Microsecond), "took", time.Since(start).Round(time.Millisecond))
}

// join connects to the primary and becomes its backup: a copy of the
// running guest, then the replay of its log.
func (p *pairVMM) join(ctx context.Context, sw *ft.Switch, cfg machine.Config) (*machine.Machine, error) {
	o := p.o
	addr := o.pair.backup
	deadline := time.Now().Add(o.pair.joinTimeout)
	var conn *channel.Conn
	var pc *pairCompat // the primary's record
	for {
		dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		ccfg, peer := p.channelConfig(channel.Backup, 0)
		c, err := channel.Dial(dctx, addr, ccfg)
		cancel()
		if err == nil {
			conn, pc = c, peer
			break
		}
		if errors.Is(err, channel.ErrRefused) || ctx.Err() != nil || time.Now().After(deadline) {
			return nil, fmt.Errorf("-backup %s: %w", addr, err)
		}
		p.log.Info("waiting for the primary", "addr", addr, "err", err)
		select {
		case <-time.After(500 * time.Millisecond):
		case <-ctx.Done():
		}
	}
	p.log.Info("primary authenticated: receiving the guest", "primary", pc.Name, "epoch", pc.Epoch)
	start := time.Now()
	created := "" // a disk image this join made: removed if it fails
	m, res, err := ft.Join(conn, migrate.ReceiveOptions{
		Build: func(mf migrate.Manifest) (*machine.Machine, error) {
			cfg.MemorySize = mf.MemorySize
			for _, d := range mf.CopiedDisks {
				if d.Name != "disk" || o.disk == "" {
					return nil, fmt.Errorf("the primary sends disk %q, which this side has no -disk for", d.Name)
				}
				if err := createImage(o.disk, d.Size); err != nil {
					return nil, err
				}
				created = o.disk
			}
			m, err := machine.New(cfg)
			if err != nil {
				return nil, err
			}
			devs, err := attachDevices(m, o, "", true, p.log)
			p.devs = devs
			if err != nil {
				m.Close()
				return nil, err
			}
			return m, nil
		},
		DiskPath: o.diskPath,
		Progress: func(pr migrate.Progress) { p.log.Debug("joining", "progress", pr.String()) },
	})
	if err != nil {
		conn.Close("the join failed: " + err.Error())
		if p.devs != nil {
			p.devs.close()
			p.devs = nil
		}
		if created != "" {
			os.Remove(created)
		}
		return nil, fmt.Errorf("-backup %s: %w", addr, err)
	}
	if created != "" {
		p.createdDisk = created
		p.log.Info("the primary's disk image was copied", "path", created)
	}
	p.newNode(m, sw)
	if p.devs.net != nil {
		// The bridge floods frames to this tap too: they are drained and
		// dropped until this VMM goes live.
		if err := p.devs.net.startDraining(); err != nil {
			conn.Close("the backup's tap: " + err.Error())
			return m, fmt.Errorf("-net: %w", err)
		}
	}
	if err := p.node.Follow(conn, pc.Epoch); err != nil {
		conn.Close(err.Error())
		return m, err
	}
	p.log.Info("joined: following the primary", "copied MiB", fmt.Sprintf("%.1f", float64(res.Bytes)/(1<<20)), "took", time.Since(start).Round(time.Millisecond))
	return m, nil
}

// createImage makes an empty image of size bytes at path, which must not
// exist: a backup never overwrites an image it was given.
func createImage(path string, size int64) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("-disk: %w", err)
	}
	err = f.Truncate(size)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(path)
		return fmt.Errorf("-disk: %w", err)
	}
	return nil
}

// statusLine describes a node's status for `gokvm-ft status`.
func statusLine(st ft.Status) string {
	var b strings.Builder
	fmt.Fprintf(&b, "role %v, epoch %d", st.Role, st.Epoch)
	switch {
	case st.Role == ft.RolePrimary:
		fmt.Fprintf(&b, ", protected by %s, lag %v, log %d bytes (%d acknowledged), %d outputs held", st.Peer, st.Lag.Round(time.Millisecond), st.LogBytes, st.Acked, st.Held)
	case st.Role == ft.RoleBackup:
		fmt.Fprintf(&b, ", following %s, %d log bytes received", st.Peer, st.LogBytes)
	case st.Role == ft.RoleAlone:
		b.WriteString(", unprotected (no backup)")
	}
	return b.String()
}

// parsePair checks the FT pair's flags.
func (o *options) parsePair(primary, backup, serve, keyFile, arb, name, guestIP string, peerTimeout, maxLag, joinTimeout time.Duration, diskShared bool) error {
	p := pairOptions{primary: primary, backup: backup, serve: serve, keyFile: keyFile, arbiter: arb, name: name, peerTimeout: peerTimeout, maxLag: maxLag, joinTimeout: joinTimeout, diskShared: diskShared}
	if primary == "" && backup == "" {
		if keyFile != "" || arb != "" || guestIP != "" || serve != "" || diskShared {
			return errors.New("-key, -arbiter, -serve, -guest-ip and -disk-shared belong to an FT pair: add -primary or -backup")
		}
		return nil
	}
	if diskShared && o.disk == "" {
		return errors.New("-disk-shared needs -disk: the image both VMMs share")
	}
	if serve != "" {
		if backup == "" {
			return errors.New("-serve is for a backup (a primary serves at -primary)")
		}
		if _, _, err := net.SplitHostPort(serve); err != nil {
			return fmt.Errorf("-serve: %q is not host:port: %v", serve, err)
		}
	}
	role := "-primary"
	addr := primary
	switch {
	case primary != "" && backup != "":
		return errors.New("-primary and -backup exclude each other: a VMM has one role at a time")
	case backup != "":
		role, addr = "-backup", backup
		if o.restore != "" {
			return errors.New("-backup takes the guest from the primary: no -restore")
		}
	}
	if _, _, err := net.SplitHostPort(addr); err != nil {
		return fmt.Errorf("%s: %q is not host:port: %v", role, addr, err)
	}
	if o.incoming != "" {
		return fmt.Errorf("%s and -incoming exclude each other", role)
	}
	if keyFile == "" {
		return fmt.Errorf("%s needs -key FILE: the pair authenticates with a shared secret", role)
	}
	if arb == "" {
		return fmt.Errorf("%s needs -arbiter file:DIR: a directory both hosts share decides who is live", role)
	}
	if peerTimeout < 10*time.Millisecond {
		return fmt.Errorf("-peer-timeout %v: at least 10ms", peerTimeout)
	}
	if maxLag == 0 || maxLag < -1 {
		return fmt.Errorf("-max-lag %v: positive", maxLag)
	}
	if len(name) > arbiter.MaxOwner {
		return fmt.Errorf("-name: longer than %d bytes", arbiter.MaxOwner)
	}
	for _, s := range strings.Split(guestIP, ",") {
		if s = strings.TrimSpace(s); s == "" {
			continue
		}
		a, err := netip.ParseAddr(s)
		if err != nil {
			return fmt.Errorf("-guest-ip: %v", err)
		}
		if o.net == nil {
			return errors.New("-guest-ip needs -net: the addresses are announced on the guest's tap")
		}
		p.guestIPs = append(p.guestIPs, a.Unmap())
	}
	o.pair = p
	return nil
}
