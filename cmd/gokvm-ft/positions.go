package main

import (
	"fmt"
	"log/slog"
	"strings"

	"github.com/gokvm-ft/gokvm-ft/ft/pmu"
	"github.com/gokvm-ft/gokvm-ft/kvm"
	"github.com/gokvm-ft/gokvm-ft/machine"
)

// positionsExits names positions without a branch counter: asynchronous
// events wait for a deterministic exit, or go in with a state delta.
const positionsExits = "deterministic exits + state deltas"

// positionsCounterPrefix starts the name of positions that a branch
// counter places (branch points instead of state deltas).
const positionsCounterPrefix = "branch counter "

// positions is the position source of a recording or a pair: its name
// (the pair's compatibility record and a recording's configuration carry
// it) and the machine's factory (nil: exits and state deltas).
type positions struct {
	name string
	new  func(*kvm.VCPU) (machine.PositionSource, error)
}

// hostPositions probes this host for an exact branch counter (experimental:
// off unless the probe passes, and never with -positions exits).
func hostPositions(mode string, log *slog.Logger) positions {
	if mode == "exits" {
		log.Info("position source: "+positionsExits, "why", "-positions exits")
		return positions{name: positionsExits}
	}
	p := pmu.ProbeHost(3)
	if !p.Usable {
		log.Info("position source: "+positionsExits, "pmu", p.Reason)
		return positions{name: positionsExits}
	}
	ev, err := pmu.HostEvent()
	if err != nil {
		log.Info("position source: "+positionsExits, "pmu", err)
		return positions{name: positionsExits}
	}
	name := positionsCounterPrefix + "(" + ev.Uarch + ") + deterministic exits"
	log.Info("position source: "+name+" (experimental)", "probe", p.Reason)
	return positions{name: name, new: func(cpu *kvm.VCPU) (machine.PositionSource, error) { return pmu.HostSource(cpu, ev), nil }}
}

// replayPositions is the position source a replay of a log recorded with
// positions named recorded needs: none for exits and state deltas, else
// this host's counter, which must be the same kind and pass the probe.
func replayPositions(recorded string, log *slog.Logger) (positions, error) {
	if !strings.HasPrefix(recorded, positionsCounterPrefix) {
		return positions{name: positionsExits}, nil
	}
	here := hostPositions("auto", log)
	if here.name != recorded {
		return positions{}, fmt.Errorf("the log was recorded with positions from a %s; this host has %s", recorded, here.name)
	}
	return here, nil
}

// parsePositionsMode checks a -positions value.
func parsePositionsMode(s string) (string, error) {
	switch s {
	case "auto", "exits":
		return s, nil
	}
	return "", fmt.Errorf("-positions: %q: want auto (a branch counter where the host has an exact one) or exits", s)
}
