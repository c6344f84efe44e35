package uroot

import (
	"bytes"
	"io"
	"os"
	"testing"

	"github.com/u-root/u-root/pkg/cpio"
)

// TestInitramfsHasGuestPrograms checks the built images/out/initramfs.cpio
// (or $GOKVM_IMAGES/initramfs.cpio): our two commands are in the busybox
// binary and linked into /bbin, and init's /bin/uinit is gokvm-uinit.
// Skipped when the initramfs is not built, except under CI.
func TestInitramfsHasGuestPrograms(t *testing.T) {
	dir := "../out"
	if d := os.Getenv("GOKVM_IMAGES"); d != "" {
		dir = d
	}
	f, err := os.Open(dir + "/initramfs.cpio")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("CI must build the images first (make images): %v", err)
		}
		t.Skipf("initramfs not built (make images): %v", err)
	}
	defer f.Close()
	recs, err := cpio.ReadAllRecords(cpio.Newc.Reader(f))
	if err != nil {
		t.Fatalf("reading %s: %v", f.Name(), err)
	}
	byName := map[string]cpio.Record{}
	for _, r := range recs {
		byName[r.Name] = r
	}
	link := func(name string) string {
		r, ok := byName[name]
		if !ok {
			t.Errorf("%s: missing", name)
			return ""
		}
		if r.Mode&cpio.S_IFMT != cpio.S_IFLNK {
			t.Errorf("%s: not a symlink (mode %#o)", name, r.Mode)
			return ""
		}
		b, err := io.ReadAll(io.NewSectionReader(r.ReaderAt, 0, int64(r.FileSize)))
		if err != nil {
			t.Errorf("%s: %v", name, err)
		}
		return string(b)
	}
	for name, want := range map[string]string{
		"bbin/gokvm-uinit":   "bb",
		"bbin/gokvm-counter": "bb",
		"bin/uinit":          "../bbin/gokvm-uinit",
		"init":               "bbin/init",
		"bin/defaultsh":      "../bbin/gosh",
	} {
		if got := link(name); got != "" && got != want {
			t.Errorf("%s -> %q, want %q", name, got, want)
		}
	}
	bb, ok := byName["bbin/bb"]
	if !ok {
		t.Fatal("bbin/bb: missing")
	}
	b, err := io.ReadAll(io.NewSectionReader(bb.ReaderAt, 0, int64(bb.FileSize)))
	if err != nil {
		t.Fatalf("bbin/bb: %v", err)
	}
	// Strings only our programs have.
	for _, s := range []string{"gokvm: network configured: ", "gokvm-counter: "} {
		if !bytes.Contains(b, []byte(s)) {
			t.Errorf("bbin/bb (%d bytes) lacks %q: our program is not in the busybox", len(b), s)
		}
	}
	t.Logf("%s: %d records, bbin/bb %d bytes", f.Name(), len(recs), len(b))
}
