package migrate

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/gokvm-ft/gokvm-ft/machine"
	"github.com/gokvm-ft/gokvm-ft/snapshot"
)

// SnapshotFile is the snapshot's file inside its directory; disk images
// sit beside it as disk-NAME.img.
const SnapshotFile = "snapshot.gkft"

// Save writes a snapshot of m, which must not be running, into dir
// (created; it must not hold a snapshot already): the machine state and
// memory, and a copy of each disk image, so the directory is complete on
// its own.
func Save(dir string, m *machine.Machine, disks []DiskSource) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	path := filepath.Join(dir, SnapshotFile)
	if _, err := os.Stat(path); err == nil {
		return fmt.Errorf("%s already holds a snapshot", dir)
	}
	st, err := m.Save()
	if err != nil {
		return err
	}
	var ds []Disk
	for _, d := range disks {
		file := "disk-" + d.Name + ".img"
		size, sum, err := CopyImage(filepath.Join(dir, file), d.Path)
		if err != nil {
			return fmt.Errorf("copy disk %s: %w", d.Name, err)
		}
		ds = append(ds, Disk{Name: d.Name, File: file, Size: size, SHA256: sum, ReadOnly: d.ReadOnly})
	}
	sections := []snapshot.Section{
		{Name: sectionManifest, Data: marshal(ManifestOf(m))},
		{Name: sectionDisks, Data: marshal(ds)},
		{Name: sectionState, Data: marshal(st)},
	}
	return snapshot.WriteFile(path, sections, m.Memory().Size(), m.Memory())
}

// Snapshot is a snapshot directory being restored: Open reads its manifest
// and disks, the caller builds a machine to match (disks from DiskPath),
// then Load fills it.
type Snapshot struct {
	Dir      string
	Manifest Manifest
	Disks    []Disk

	f   *os.File
	dec *snapshot.Decoder
}

// Open reads the manifest and disk list of the snapshot in dir.
func Open(dir string) (*Snapshot, error) {
	f, err := os.Open(filepath.Join(dir, SnapshotFile))
	if err != nil {
		return nil, err
	}
	s := &Snapshot{Dir: dir, f: f}
	if err := s.open(); err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: %w", f.Name(), err)
	}
	return s, nil
}

func (s *Snapshot) open() error {
	var err error
	if s.dec, err = snapshot.NewDecoder(bufio.NewReaderSize(s.f, 1<<20)); err != nil {
		return err
	}
	for _, want := range []string{sectionManifest, sectionDisks} {
		rec, err := s.dec.Next()
		if err != nil {
			return err
		}
		if rec.Kind != snapshot.SectionRecord || rec.Name != want {
			return fmt.Errorf("expected section %q, found %v %q", want, rec.Kind, rec.Name)
		}
		v := any(&s.Manifest)
		if want == sectionDisks {
			v = &s.Disks
		}
		if err := unmarshal(want, rec.Data, v); err != nil {
			return err
		}
	}
	if s.Manifest.MemorySize != s.dec.MemorySize() {
		return fmt.Errorf("manifest says %d bytes of memory, the stream %d", s.Manifest.MemorySize, s.dec.MemorySize())
	}
	return nil
}

// Close releases the snapshot file.
func (s *Snapshot) Close() error { return s.f.Close() }

// Disk returns the disk of the given virtio device name, if any.
func (s *Snapshot) Disk(name string) (Disk, bool) {
	for _, d := range s.Disks {
		if d.Name == name {
			return d, true
		}
	}
	return Disk{}, false
}

// PrepareDisk returns the image path to use for disk d: target if given,
// else the image in the snapshot directory. A target that does not exist
// is created as a copy of the snapshot's image. Either way the image must
// have the contents the snapshot recorded (a guest that ran on since has
// changed it: restore then into a fresh target).
func (s *Snapshot) PrepareDisk(d Disk, target string) (string, error) {
	src := filepath.Join(s.Dir, d.File)
	if target == "" {
		target = src
	} else if _, err := os.Stat(target); errors.Is(err, os.ErrNotExist) {
		if _, _, err := CopyImage(target, src); err != nil {
			return "", fmt.Errorf("copy disk %s: %w", d.Name, err)
		}
	}
	size, sum, err := hashFile(target)
	if err != nil {
		return "", err
	}
	if size != d.Size || sum != d.SHA256 {
		return "", fmt.Errorf("disk %s: %s: %w (the snapshot's has %d bytes, SHA-256 %.16s; this one %d bytes, %.16s); restore into a new -disk path to get a fresh copy",
			d.Name, target, ErrDiskMismatch, d.Size, d.SHA256, size, sum)
	}
	return target, nil
}

// Load fills m (built to the manifest, not yet run) with the snapshot's
// memory and state. On error m must not be used.
func (s *Snapshot) Load(m *machine.Machine) error {
	if err := s.Manifest.Check(m); err != nil {
		return err
	}
	mem, err := m.Memory().MutableSlice(0, m.Memory().Size())
	if err != nil {
		return err
	}
	if err := s.dec.SetMemory(mem); err != nil {
		return err
	}
	var st *machine.State
	for {
		rec, err := s.dec.Next()
		if err != nil {
			return fmt.Errorf("%s: %w", s.f.Name(), err)
		}
		switch {
		case rec.Kind == snapshot.SectionRecord && rec.Name == sectionState:
			st = &machine.State{}
			if err := unmarshal(rec.Name, rec.Data, st); err != nil {
				return err
			}
		case rec.Kind == snapshot.EndRecord:
			if st == nil {
				return fmt.Errorf("%s: no machine state in the snapshot", s.f.Name())
			}
			return m.Restore(st)
		}
	}
}
