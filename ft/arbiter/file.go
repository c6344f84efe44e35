package arbiter

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

const (
	epochPrefix = "epoch-"
	claimPrefix = ".claim-" // temporary files of step 2
	probePrefix = ".probe-" // Open's hard-link probe
)

// fileArbiter is the arbiter in a shared directory; see the package
// documentation for the protocol.
type fileArbiter struct {
	dir  string
	excl bool // no hard links: create epoch files with O_CREAT|O_EXCL

	// afterCreate, when set (tests only), runs between step 2 and step 3
	// of a claim.
	afterCreate func()
}

// openFile opens the arbiter in dir. forceExcl skips the hard-link probe
// and uses exclusive create (tests of the fallback).
func openFile(dir string, forceExcl bool) (*fileArbiter, error) {
	dir = filepath.Clean(dir)
	fi, err := os.Stat(dir)
	if err != nil {
		return nil, fmt.Errorf("arbiter: %w", err)
	}
	if !fi.IsDir() {
		return nil, fmt.Errorf("arbiter: %s: not a directory", dir)
	}
	a := &fileArbiter{dir: dir, excl: forceExcl}
	if !forceExcl {
		ok, err := a.probeLink()
		if err != nil {
			return nil, err
		}
		a.excl = !ok
	}
	if _, err := a.scan(); err != nil {
		return nil, err
	}
	return a, nil
}

func (a *fileArbiter) String() string { return "file:" + a.dir }

func (a *fileArbiter) Close() error { return nil }

func (a *fileArbiter) Claim(ctx context.Context, epoch uint64, owner string) (Result, error) {
	if epoch == 0 {
		return Result{}, errors.New("arbiter: claim of epoch 0: epochs start at 1")
	}
	if err := CheckOwner(owner); err != nil {
		return Result{}, err
	}
	return do(ctx, fmt.Sprintf("claim of epoch %d in %s", epoch, a.dir), func() (Result, error) {
		return a.claim(epoch, owner)
	})
}

func (a *fileArbiter) Current(ctx context.Context) (Holder, error) {
	return do(ctx, "reading "+a.dir, func() (Holder, error) {
		n, err := a.scan()
		if err != nil || n == 0 {
			return Holder{}, err
		}
		o, err := a.readOwner(n)
		if err != nil {
			return Holder{}, err
		}
		return Holder{Epoch: n, Owner: o}, nil
	})
}

// claim is steps 1 to 3 of the package documentation.
func (a *fileArbiter) claim(epoch uint64, owner string) (Result, error) {
	top, err := a.scan()
	if err != nil {
		return Result{}, err
	}
	if top > epoch {
		return a.lost(top)
	}
	if top < epoch {
		if err := a.create(epoch, owner); err != nil {
			return Result{}, err
		}
		if a.afterCreate != nil {
			a.afterCreate()
		}
	}
	if top, err = a.scan(); err != nil {
		return Result{}, err
	}
	if top > epoch {
		return a.lost(top)
	}
	if top < epoch {
		return Result{}, fmt.Errorf("arbiter: %s: %w: vanished after it was created (epoch files must never be removed)",
			a.path(epoch), ErrMalformed)
	}
	o, err := a.readOwner(epoch)
	if err != nil {
		return Result{}, err
	}
	return Result{Won: o == owner, Holder: Holder{Epoch: epoch, Owner: o}}, nil
}

func (a *fileArbiter) lost(top uint64) (Result, error) {
	o, err := a.readOwner(top)
	if err != nil {
		return Result{}, err
	}
	return Result{Holder: Holder{Epoch: top, Owner: o}}, nil
}

func (a *fileArbiter) path(epoch uint64) string {
	return filepath.Join(a.dir, epochPrefix+strconv.FormatUint(epoch, 10))
}

// create makes epoch-N hold owner unless it exists (step 2). It returns nil
// whether this call created the file or found it.
func (a *fileArbiter) create(epoch uint64, owner string) error {
	p := a.path(epoch)
	content := owner + "\n"
	if a.excl {
		f, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
		if errors.Is(err, fs.ErrExist) {
			return a.syncDir()
		}
		if err != nil {
			return fmt.Errorf("arbiter: %w", err)
		}
		_, err = f.WriteString(content)
		if err == nil {
			err = f.Sync()
		}
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return fmt.Errorf("arbiter: writing %s: %w", p, err)
		}
		return a.syncDir()
	}
	tmp, err := a.writeTemp(claimPrefix+strconv.FormatUint(epoch, 10)+"-", content, true)
	if err != nil {
		return err
	}
	defer os.Remove(tmp)
	// On NFS a link whose reply was lost may be retried and fail with
	// EEXIST although it succeeded: step 3 reads the owner back, so that
	// case wins as it should.
	if err := os.Link(tmp, p); err != nil && !errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("arbiter: %w", err)
	}
	return a.syncDir()
}

// writeTemp writes content to a new file in dir named prefix plus random
// hex, fsynced if sync, and returns its path.
func (a *fileArbiter) writeTemp(prefix, content string, sync bool) (string, error) {
	var r [8]byte
	if _, err := rand.Read(r[:]); err != nil {
		return "", fmt.Errorf("arbiter: %w", err)
	}
	p := filepath.Join(a.dir, prefix+hex.EncodeToString(r[:]))
	f, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return "", fmt.Errorf("arbiter: %w", err)
	}
	_, err = f.WriteString(content)
	if err == nil && sync {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(p)
		return "", fmt.Errorf("arbiter: writing %s: %w", p, err)
	}
	return p, nil
}

// probeLink reports whether the directory supports hard links.
func (a *fileArbiter) probeLink() (bool, error) {
	tmp, err := a.writeTemp(probePrefix, "probe\n", false)
	if err != nil {
		return false, err
	}
	defer os.Remove(tmp)
	err = os.Link(tmp, tmp+".link")
	switch {
	case err == nil:
		os.Remove(tmp + ".link")
		return true, nil
	case errors.Is(err, syscall.EPERM), errors.Is(err, syscall.EOPNOTSUPP), errors.Is(err, syscall.ENOSYS):
		return false, nil
	default:
		return false, fmt.Errorf("arbiter: probing hard links: %w", err)
	}
}

func (a *fileArbiter) syncDir() error {
	d, err := os.Open(a.dir)
	if err != nil {
		return fmt.Errorf("arbiter: %w", err)
	}
	err = d.Sync()
	d.Close()
	// Some file systems refuse fsync on a directory; NFS commits directory
	// operations before it answers them anyway.
	if err != nil && !errors.Is(err, syscall.EINVAL) && !errors.Is(err, syscall.EOPNOTSUPP) {
		return fmt.Errorf("arbiter: syncing %s: %w", a.dir, err)
	}
	return nil
}

// scan lists the directory and returns the highest epoch, 0 if none.
func (a *fileArbiter) scan() (uint64, error) {
	d, err := os.Open(a.dir)
	if err != nil {
		return 0, fmt.Errorf("arbiter: %w", err)
	}
	ents, err := d.ReadDir(-1)
	d.Close()
	if err != nil {
		return 0, fmt.Errorf("arbiter: listing %s: %w", a.dir, err)
	}
	var top uint64
	for _, e := range ents {
		num, ok := strings.CutPrefix(e.Name(), epochPrefix)
		if !ok {
			continue
		}
		p := filepath.Join(a.dir, e.Name())
		n, ok := parseEpoch(num)
		if !ok {
			return 0, fmt.Errorf("arbiter: %s: %w: not epoch-N with N a positive decimal number without leading zeros",
				p, ErrMalformed)
		}
		if !e.Type().IsRegular() {
			return 0, fmt.Errorf("arbiter: %s: %w: not a regular file (%v)", p, ErrMalformed, e.Type())
		}
		top = max(top, n)
	}
	return top, nil
}

func parseEpoch(s string) (uint64, bool) {
	if s == "" || s[0] == '0' {
		return 0, false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, false
		}
	}
	n, err := strconv.ParseUint(s, 10, 64)
	return n, err == nil
}

// readOwner reads the owner of an epoch file, "" if the file is empty or
// lacks its newline (a claim that crashed while writing it).
func (a *fileArbiter) readOwner(epoch uint64) (string, error) {
	p := a.path(epoch)
	// O_NONBLOCK: a FIFO put there must not hang the open.
	f, err := os.OpenFile(p, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
	if errors.Is(err, syscall.ELOOP) {
		return "", fmt.Errorf("arbiter: %s: %w: a symbolic link", p, ErrMalformed)
	}
	if err != nil {
		return "", fmt.Errorf("arbiter: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return "", fmt.Errorf("arbiter: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return "", fmt.Errorf("arbiter: %s: %w: not a regular file (%v)", p, ErrMalformed, fi.Mode().Type())
	}
	buf := make([]byte, MaxOwner+2) // owner, newline, one more to see excess
	n, err := io.ReadFull(f, buf)
	switch {
	case err == nil:
		return "", fmt.Errorf("arbiter: %s: %w: longer than an owner name (%d bytes) and a newline", p, ErrMalformed, MaxOwner)
	case err != io.EOF && err != io.ErrUnexpectedEOF:
		return "", fmt.Errorf("arbiter: reading %s: %w", p, err)
	}
	b := buf[:n]
	if len(b) == 0 || b[len(b)-1] != '\n' {
		return "", nil // crash-truncated: the epoch is taken, the owner unknown
	}
	o := string(b[:len(b)-1])
	if CheckOwner(o) != nil {
		return "", fmt.Errorf("arbiter: %s: %w: owner %q is not a valid owner name", p, ErrMalformed, o)
	}
	return o, nil
}
