package main

import (
	"fmt"
	"io"
	"log/slog"
	"net"
	"time"

	"github.com/gokvm-ft/gokvm-ft/machine"
	"github.com/gokvm-ft/gokvm-ft/migrate"
)

// bootMachine builds the machine the flags describe and loads the kernel.
func bootMachine(o *options, cfg machine.Config, log *slog.Logger) (*machine.Machine, *devices, error) {
	m, err := machine.New(cfg)
	if err != nil {
		return nil, nil, err
	}
	log.Debug("machine ready", "mem", o.mem, "host", o.host)
	devs, err := attachDevices(m, o, "", o.noTap, log)
	if err != nil {
		return m, devs, err
	}
	return m, devs, loadGuest(m, o, log)
}

// restoreMachine builds the machine a snapshot describes and restores it.
func restoreMachine(o *options, cfg machine.Config, log *slog.Logger) (*machine.Machine, *devices, error) {
	start := time.Now()
	snap, err := migrate.Open(o.restore)
	if err != nil {
		return nil, nil, fmt.Errorf("-restore: %w", err)
	}
	defer snap.Close()
	diskPath := ""
	if d, ok := snap.Disk("disk"); ok {
		target := o.disk
		if target == "" {
			target = o.restoreDisk
		}
		if diskPath, err = snap.PrepareDisk(d, target); err != nil {
			return nil, nil, fmt.Errorf("-restore: %w", err)
		}
		o.diskRO = d.ReadOnly
	} else if o.disk != "" {
		return nil, nil, fmt.Errorf("-restore: the snapshot has no disk, but -disk was given")
	}
	cfg.MemorySize = snap.Manifest.MemorySize
	m, err := machine.New(cfg)
	if err != nil {
		return nil, nil, err
	}
	devs, err := attachDevices(m, o, diskPath, o.noTap, log)
	if err != nil {
		return m, devs, err
	}
	if err := snap.Load(m); err != nil {
		return m, devs, fmt.Errorf("-restore %s: %w", o.restore, err)
	}
	log.Info("restored", "snapshot", o.restore, "took", time.Since(start).Round(time.Millisecond))
	return m, devs, nil
}

// receiveMachine waits for a live transfer on o.incoming and returns the
// machine it brought, with the tap taken over from the source.
func receiveMachine(o *options, cfg machine.Config, log *slog.Logger, stderr io.Writer) (*machine.Machine, *devices, error) {
	ln, err := net.Listen("tcp", o.incoming)
	if err != nil {
		return nil, nil, fmt.Errorf("-incoming: %w", err)
	}
	defer ln.Close()
	log.Info("waiting for a live transfer", "addr", ln.Addr().String())
	c, err := ln.Accept()
	if err != nil {
		return nil, nil, fmt.Errorf("-incoming: %w", err)
	}
	defer c.Close()
	var devs *devices
	m, res, err := migrate.Receive(c, migrate.ReceiveOptions{
		Build: func(mf migrate.Manifest) (*machine.Machine, error) {
			cfg.MemorySize = mf.MemorySize
			m, err := machine.New(cfg)
			if err != nil {
				return nil, err
			}
			if devs, err = attachDevices(m, o, "", true, log); err != nil {
				m.Close()
				return nil, err
			}
			return m, nil
		},
		DiskPath: o.diskPath,
		Progress: func(p migrate.Progress) { log.Debug("incoming", "progress", p.String()) },
	})
	if err != nil {
		return nil, devs, fmt.Errorf("-incoming: %w", err)
	}
	if err := devs.startNet(); err != nil {
		return m, devs, fmt.Errorf("-incoming: taking over the tap: %w", err)
	}
	log.Info("live transfer received", "bytes", res.Bytes, "rounds", res.Rounds, "took", res.Total.Round(time.Millisecond))
	return m, devs, nil
}
