// Package migrate moves a whole machine: into a snapshot directory and back
// (Save, Open), and live to another VMM over a connection, with iterative
// pre-copy of memory while the guest runs and a short stop-and-copy at the
// end (Send, Receive).
//
// Both use the snapshot stream format (package snapshot): a "manifest"
// section first, saying what the destination must build (memory size,
// virtio devices, disks) before it can take the memory; then pages; then
// the machine's state ("state") and the disks' identities ("disks").
package migrate

import (
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/gokvm-ft/gokvm-ft/machine"
)

// Manifest is what a destination builds before it takes memory and state.
type Manifest struct {
	MemorySize uint64
	Host       string
	Model      string
	// Devices are the virtio devices in slot order.
	Devices []Device
	// CopiedDisks are the disks whose contents the live transfer carries
	// (SendOptions.CopyDisks): the destination makes each image of this
	// size before it builds the machine, and the stream fills it.
	CopiedDisks []CopiedDisk `json:",omitempty"`
}

// CopiedDisk is a disk image a live transfer carries.
type CopiedDisk struct {
	Name string
	Size int64
}

// Device is one virtio device of the manifest.
type Device struct {
	Name string
	Type uint32
}

// Disk is a disk image's identity: a restore or a live transfer refuses
// an image whose contents differ.
type Disk struct {
	Name     string // the virtio device's name
	File     string // in a snapshot: the image's file name in the directory
	Size     int64
	SHA256   string
	ReadOnly bool
}

// DiskSource is a disk image of a running machine, by virtio device name.
// TrackWrites (blk.Blk's) lets a live transfer copy the image while the
// guest writes it (SendOptions.CopyDisks).
type DiskSource struct {
	Name        string
	Path        string
	ReadOnly    bool
	TrackWrites func() (take func() []uint64, stop func())
}

// Section names.
const (
	sectionManifest = "manifest"
	sectionState    = "state"
	sectionDisks    = "disks"
	// sectionDiskData, then a sequence number (names are unique in a
	// stream), carries disk contents (CopyDisks): the disk name's length
	// (1 byte), the name, the offset (8 bytes), then the data.
	sectionDiskData = "disk-data-"
)

// ManifestOf describes m's make-up.
func ManifestOf(m *machine.Machine) Manifest {
	mf := Manifest{MemorySize: m.Memory().Size(), Host: m.Policy().Host.String(), Model: machine.ModelVersion}
	for _, s := range m.Virtio() {
		mf.Devices = append(mf.Devices, Device{Name: s.Name, Type: s.Transport.Save().DeviceType})
	}
	return mf
}

// Check reports whether m has the make-up the manifest describes.
func (mf Manifest) Check(m *machine.Machine) error {
	got := ManifestOf(m)
	if got.MemorySize != mf.MemorySize {
		return fmt.Errorf("the snapshot has %d MiB of memory, this machine %d MiB", mf.MemorySize>>20, got.MemorySize>>20)
	}
	if got.Model != mf.Model {
		return fmt.Errorf("the snapshot's machine model is %q, this build's %q", mf.Model, got.Model)
	}
	if len(got.Devices) != len(mf.Devices) {
		return fmt.Errorf("the snapshot has virtio devices %v, this machine %v", mf.Devices, got.Devices)
	}
	for i := range mf.Devices {
		if got.Devices[i] != mf.Devices[i] {
			return fmt.Errorf("the snapshot has virtio devices %v, this machine %v", mf.Devices, got.Devices)
		}
	}
	return nil
}

func marshal(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err) // our own plain structs: cannot fail
	}
	return b
}

func unmarshal(name string, data []byte, v any) error {
	if err := json.Unmarshal(data, v); err != nil {
		return fmt.Errorf("snapshot section %q: %w", name, err)
	}
	return nil
}

// hashFile returns the size and SHA-256 of a file.
func hashFile(path string) (int64, string, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, "", err
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		return 0, "", fmt.Errorf("%s: %w", path, err)
	}
	return n, fmt.Sprintf("%x", h.Sum(nil)), nil
}

// CopyImage copies the disk image src to dst (created, never
// overwritten), leaving holes where src has all-zero blocks, and returns
// the size and SHA-256 of the contents.
func CopyImage(dst, src string) (int64, string, error) {
	in, err := os.Open(src)
	if err != nil {
		return 0, "", err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return 0, "", err
	}
	h := sha256.New()
	buf := make([]byte, 1<<20)
	var off int64
	for {
		n, rerr := io.ReadFull(in, buf)
		if n > 0 {
			h.Write(buf[:n])
			if !allZero(buf[:n]) {
				if _, err := out.WriteAt(buf[:n], off); err != nil {
					out.Close()
					return 0, "", fmt.Errorf("%s: %w", dst, err)
				}
			}
			off += int64(n)
		}
		if rerr == io.EOF || rerr == io.ErrUnexpectedEOF {
			break
		}
		if rerr != nil {
			out.Close()
			return 0, "", fmt.Errorf("%s: %w", src, rerr)
		}
	}
	if err := out.Truncate(off); err != nil {
		out.Close()
		return 0, "", err
	}
	if err := out.Sync(); err != nil {
		out.Close()
		return 0, "", err
	}
	if err := out.Close(); err != nil {
		return 0, "", err
	}
	return off, fmt.Sprintf("%x", h.Sum(nil)), nil
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// ErrDiskMismatch says a disk image is not the one the guest was using.
var ErrDiskMismatch = errors.New("disk image differs from the guest's")
