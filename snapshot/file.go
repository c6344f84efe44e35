package snapshot

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// Section is one named section of a full snapshot.
type Section struct {
	Name string
	Data []byte
}

// Write writes a full snapshot to w: the header, the sections in order, the
// non-zero pages of mem (memSize bytes; mem may be nil when memSize is 0),
// and the end record.
func Write(w io.Writer, sections []Section, memSize uint64, mem Memory) error {
	e, err := NewEncoder(w, memSize)
	if err != nil {
		return err
	}
	for _, s := range sections {
		if err := e.WriteSection(s.Name, s.Data); err != nil {
			return err
		}
	}
	if err := e.WriteMemory(mem); err != nil {
		return err
	}
	return e.WriteEnd()
}

// Read reads a full snapshot from r, which must end with it. Once the header
// is read it calls dest with the declared memory size; dest returns the
// destination, of exactly that size, or an error to refuse the snapshot
// (Read returns that error). dest may be nil for a snapshot without memory.
// Pages not stored are zeroed in the destination. Read returns the sections
// in stream order. On error the destination may hold part of the snapshot.
func Read(r io.Reader, dest func(memSize uint64) ([]byte, error)) ([]Section, error) {
	br := bufio.NewReaderSize(r, 64<<10)
	d, err := NewDecoder(br)
	if err != nil {
		return nil, err
	}
	var dst []byte
	if dest != nil {
		if dst, err = dest(d.MemorySize()); err != nil {
			return nil, err
		}
	}
	if dst == nil && d.MemorySize() == 0 {
		dst = []byte{}
	}
	if err := d.SetMemory(dst); err != nil {
		return nil, err
	}
	var sections []Section
	memory := false
	for {
		start := d.Offset()
		rec, err := d.Next()
		if err != nil {
			return nil, err
		}
		switch rec.Kind {
		case SectionRecord:
			sections = append(sections, Section{Name: rec.Name, Data: rec.Data})
			continue
		case PagesRecord:
			if !rec.Full || memory {
				return nil, d.fail(start, ErrCorrupt, "a full snapshot has exactly one full pages record")
			}
			memory = true
			continue
		}
		// End record.
		if !memory {
			return nil, d.fail(start, ErrCorrupt, "a full snapshot has exactly one full pages record")
		}
		if _, err := br.ReadByte(); err != io.EOF {
			if err != nil {
				return nil, fmt.Errorf("snapshot: read: %w", err)
			}
			return nil, d.fail(d.Offset(), ErrCorrupt, "data after the end record")
		}
		return sections, nil
	}
}

// WriteFile writes a full snapshot (see Write) to path atomically: into a
// temporary file in the same directory, synced, then renamed over path, and
// the directory synced. A crash leaves either the old file or the complete
// new one under path, never a partial snapshot. The file has mode 0600: it
// holds guest memory.
func WriteFile(path string, sections []Section, memSize uint64, mem Memory) (err error) {
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	f, err := os.CreateTemp(dir, "."+base+".tmp-*")
	if err != nil {
		return fmt.Errorf("snapshot: %w", err)
	}
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(f.Name())
		}
	}()
	if err := Write(f, sections, memSize, mem); err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("snapshot: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("snapshot: %w", err)
	}
	if err := os.Rename(f.Name(), path); err != nil {
		return fmt.Errorf("snapshot: %w", err)
	}
	// Make the rename itself durable.
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("snapshot: %w", err)
	}
	serr := d.Sync()
	cerr := d.Close()
	if err := errors.Join(serr, cerr); err != nil {
		return fmt.Errorf("snapshot: sync %s: %w", dir, err)
	}
	return nil
}

// ReadFile reads a full snapshot from the file at path; see Read.
func ReadFile(path string, dest func(memSize uint64) ([]byte, error)) ([]Section, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("snapshot: %w", err)
	}
	defer f.Close()
	return Read(f, dest)
}
