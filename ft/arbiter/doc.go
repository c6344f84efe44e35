// Package arbiter decides which side of a fault-tolerant pair is live.
//
// A primary and its backup cannot tell a dead peer from a broken link, so
// neither may decide alone to run, and an arbiter inside either VMM fails
// with its host. The arbiter is an atomic test-and-set that lives outside
// both (a directory on storage both hosts share; etcd later), and every
// transition to live first wins a Claim on it: a backup going live, a
// primary continuing alone, a primary starting a VM. The loser stops
// itself.
//
// # Epochs
//
// The arbiter holds one Holder, an (epoch, owner) pair, initially (0, "").
// Claim(e, o) wins, and makes (e, o) the holder, iff the held epoch is
// below e, or is e and held by o (a retry of a claim that already won, so a
// claim whose answer was lost can be repeated). Otherwise it loses and
// reports the holder. Epochs only grow, so a claim that lost never wins
// later, and of all claims of one epoch at most one owner wins. An error
// means the outcome is unknown (storage unreachable, ctx done): the claim
// may or may not have been recorded.
//
// # The pair protocol
//
//   - A primary starting a VM reads Current and claims its epoch + 1; it
//     runs at the epoch it won.
//   - A backup joins at the primary's epoch N; the join tells it N.
//   - A side that loses its peer (a dead host, a broken channel) claims N+1
//     under its own owner name. Both sides claim the same epoch, so exactly
//     one of them wins: the backup goes live, or the primary continues
//     alone, at epoch N+1. The loser stops itself and never claims again.
//   - A backup that joins the survivor runs at N+1; the next failure claims
//     N+2.
//   - On an error a side must not go live. It may repeat the same claim
//     (idempotent, so a claim that did win reports it) or stop.
//
// Test-and-set suffices, with no lease, because of the output rule: until
// it has won, a primary that lost its backup releases no output the backup
// has not acknowledged, so nothing of the loser's reaches the world after
// the failure. The arbiter orders transitions; it never tells a holder it
// was superseded, and it does not fence a VMM started outside the protocol.
// The two sides need different owner names (host name plus role, say): a
// claim by the holder's own name counts as a retry and wins.
//
// # The file arbiter
//
// Open("file:DIR") keeps the arbiter in DIR, on storage both hosts share
// (NFS, or any local file system for a pair on one host). Epoch e is held
// by the file DIR/epoch-e (decimal, no leading zeros) holding the owner
// and a newline; the holder is the highest epoch file. Claim(e, o):
//
//  1. lists DIR, and loses if an epoch above e exists;
//  2. unless epoch-e exists, writes "o\n" to a new temporary file, fsyncs
//     it, hard-links it to epoch-e and fsyncs DIR. link fails if the name
//     exists, atomically on a local file system and on NFS (the server
//     decides), so of all contenders for e exactly one creates epoch-e;
//  3. lists DIR again, and wins iff no epoch above e exists and epoch-e
//     names o.
//
// Why the second listing: a contender for e may list before a contender
// for a higher epoch f links epoch-f, and link epoch-e after; without step
// 3 both would win. With it, a claim of e wins only if no higher epoch
// existed when epoch-e was linked (files are never removed, so none at the
// second listing means none then), so it takes effect at its link, when
// the held epoch was below e. A claim that loses at step 3 leaves epoch-e
// behind, harmlessly: a higher epoch exists for good. In the pair protocol
// every epoch from 1 to the held one exists and both sides claim the same
// one, so the link alone decides each race; the listings guard against a
// claim that skips epochs. On NFS a listing may come from the client's
// attribute cache (acdirmin), a link never does; mount with
// lookupcache=none,actimeo=0 if claims may skip epochs.
//
// The directory is append-only: never remove or edit an epoch file while a
// VMM that uses it runs. Other files in it are ignored (temporary files
// start with a dot; a crash may leave one behind). An epoch file that is
// not a regular file, a name after "epoch-" that is not a canonical
// positive number, or an owner that is not valid (see CheckOwner) is an
// error matching ErrMalformed that names the file: the arbiter fails
// closed rather than guess.
//
// Where hard links are not supported (vfat, some FUSE file systems: Open
// probes), step 2 instead creates epoch-e with O_CREAT|O_EXCL, writes
// "o\n" and fsyncs. A crash between create and write leaves epoch-e empty
// or without its newline: the epoch is taken and its owner unknown
// (Owner ""), so every claim of it loses, the creator's retry included.
// That can stop both sides (safety before liveness); a claim of e+1, by
// an operator or a restarted pair, recovers.
package arbiter
