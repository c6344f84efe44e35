package arbiter

import (
	"context"
	"errors"
	"fmt"
	"strings"
)

// MaxOwner is the longest owner name, in bytes.
const MaxOwner = 256

var (
	// ErrMalformed: the arbiter's storage holds something it did not write
	// (an epoch file it cannot read as one). The arbiter fails closed.
	ErrMalformed = errors.New("malformed arbiter state")
	// ErrBadSpec: Open's spec is not one it understands.
	ErrBadSpec = errors.New("bad arbiter spec")
)

// Holder is who holds the arbiter: the highest epoch claimed and its owner.
// The zero Holder means nothing was ever claimed. Owner is "" also when the
// epoch is taken but its owner unknown (a claim that crashed half-written,
// see the package documentation).
type Holder struct {
	Epoch uint64
	Owner string
}

func (h Holder) String() string {
	if h.Owner == "" {
		return fmt.Sprintf("epoch %d (owner unknown)", h.Epoch)
	}
	return fmt.Sprintf("epoch %d (%s)", h.Epoch, h.Owner)
}

// Result is the outcome of a Claim. Holder is the holder after the claim:
// the claim itself when it won, the one that beat it when it lost.
type Result struct {
	Won    bool
	Holder Holder
}

// Arbiter is an atomic test-and-set with an epoch, outside both VMMs. See
// the package documentation for the rule and the protocol. Its methods are
// safe for concurrent use, also from several processes and hosts.
type Arbiter interface {
	// Claim makes (epoch, owner) the holder iff the held epoch is below
	// epoch, or equal and held by owner; it reports whether it did and the
	// holder after. epoch must be positive and owner valid (CheckOwner).
	// On an error the outcome is unknown: do not go live; repeating the
	// same claim is safe. When ctx ends first Claim returns at once, and
	// the claim may still complete in the background.
	Claim(ctx context.Context, epoch uint64, owner string) (Result, error)
	// Current reads the holder.
	Current(ctx context.Context) (Holder, error)
	// Close releases what the Arbiter holds (nothing, for a directory).
	Close() error
}

// CheckOwner reports whether s can be an owner name: 1 to MaxOwner bytes,
// with no '/', NUL or newline.
func CheckOwner(s string) error {
	switch {
	case s == "":
		return errors.New("arbiter: empty owner name")
	case len(s) > MaxOwner:
		return fmt.Errorf("arbiter: owner name is %d bytes, more than %d", len(s), MaxOwner)
	case strings.ContainsAny(s, "/\x00\n"):
		return fmt.Errorf("arbiter: owner name %q contains '/', NUL or newline", s)
	}
	return nil
}

// Open opens the arbiter that spec names:
//
//	file:DIR   a directory both hosts share; it must exist
//	etcd:...   reserved, not built yet
//
// It checks what it can now rather than at the first failover: that DIR is
// a directory the arbiter can write and that what is in it parses.
func Open(spec string) (Arbiter, error) {
	scheme, rest, ok := strings.Cut(spec, ":")
	if !ok {
		return nil, fmt.Errorf("arbiter: %w %q: want file:DIR", ErrBadSpec, spec)
	}
	switch scheme {
	case "file":
		if rest == "" {
			return nil, fmt.Errorf("arbiter: %w %q: empty directory", ErrBadSpec, spec)
		}
		a, err := openFile(rest, false)
		if err != nil {
			return nil, err
		}
		return a, nil
	case "etcd":
		return nil, fmt.Errorf("arbiter: %q: etcd: not built yet (use file:DIR)", spec)
	default:
		return nil, fmt.Errorf("arbiter: %w %q: unknown scheme %q (want file:DIR)", ErrBadSpec, spec, scheme)
	}
}

// do runs f, returning early when ctx ends (f goes on in the background:
// file system calls cannot be interrupted, and a hung NFS mount must not
// hang the side that asks).
func do[T any](ctx context.Context, what string, f func() (T, error)) (T, error) {
	var zero T
	if err := ctx.Err(); err != nil {
		return zero, fmt.Errorf("arbiter: %s: %w", what, err)
	}
	if ctx.Done() == nil {
		return f()
	}
	type answer struct {
		v   T
		err error
	}
	ch := make(chan answer, 1)
	go func() {
		v, err := f()
		ch <- answer{v, err}
	}()
	select {
	case a := <-ch:
		return a.v, a.err
	case <-ctx.Done():
		return zero, fmt.Errorf("arbiter: %s abandoned, outcome unknown: %w", what, ctx.Err())
	}
}
