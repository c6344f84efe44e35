// Package ft is gokvm-ft's fault-tolerance layer, after VMware FT: it
// records a machine's non-determinism into a log (Recorder) and feeds it
// back to a second machine that must reach the same state (Replayer). Both
// are machine.Journal implementations: the machine delivers inputs and
// interrupts only at deterministic exits and asks the journal what to
// deliver; package ftlog is the log's format. The network pair (primary,
// backup, failover) builds on the same two.
package ft
