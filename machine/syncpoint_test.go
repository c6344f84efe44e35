package machine

import (
	"bytes"
	"testing"

	"github.com/gokvm-ft/gokvm-ft/kvm"
)

func testDelta() *SyncPoint {
	data := make([]byte, 3*PageSize)
	for i := range PageSize {
		data[i] = byte(i)
	}
	data[2*PageSize+7] = 1 // page 3: one byte; page 2: all zeros
	sp := &SyncPoint{Delta: true, Pages: []uint64{1, 2, 5}, Data: data, VCPU: &VCPUState{Regs: kvm.Regs{RIP: 0x1234}}}
	sp.Digest[0], sp.MemBefore[1] = 9, 7
	return sp
}

func TestSyncPointRoundTrip(t *testing.T) {
	branch := &SyncPoint{Branch: true, Branches: 123456789, Digest: [32]byte{2}, Regs: kvm.Regs{RCX: 77}}
	for _, sp := range []*SyncPoint{testDelta(), {Digest: [32]byte{1}, MemBefore: [2]uint64{3, 4}}, branch} {
		b, err := sp.MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		var got SyncPoint
		if err := got.UnmarshalBinary(b); err != nil {
			t.Fatal(err)
		}
		if got.Delta != sp.Delta || got.Branch != sp.Branch || got.Branches != sp.Branches || got.Regs != sp.Regs || got.Digest != sp.Digest || got.MemBefore != sp.MemBefore || !bytes.Equal(got.Data, sp.Data) || len(got.Pages) != len(sp.Pages) {
			t.Fatalf("round trip: got %+v, want %+v", got, sp)
		}
		if sp.Delta && got.VCPU.Regs.RIP != 0x1234 {
			t.Fatalf("vCPU state lost: %+v", got.VCPU.Regs)
		}
		// Every truncation is an error, never a panic.
		for n := 0; n < len(b); n++ {
			if err := got.UnmarshalBinary(b[:n]); err == nil {
				t.Fatalf("%d of %d bytes decoded", n, len(b))
			}
		}
	}
	if _, err := (&SyncPoint{Delta: true, Branch: true}).MarshalBinary(); err == nil {
		t.Error("a delta that is also a branch point encoded")
	}
	b, _ := testDelta().MarshalBinary()
	if len(b) >= 2*PageSize {
		t.Errorf("a delta of one full page, one zero page and one nearly empty page takes %d bytes", len(b))
	}
}

// FuzzSyncPoint: sync points come from a log file; the decoder must refuse
// bad ones without panicking, and what it accepts must encode back to an
// equivalent point.
func FuzzSyncPoint(f *testing.F) {
	d, _ := testDelta().MarshalBinary()
	c, _ := (&SyncPoint{Digest: [32]byte{1}}).MarshalBinary()
	f.Add(d)
	f.Add(c)
	br, _ := (&SyncPoint{Branch: true, Branches: 5}).MarshalBinary()
	f.Add(br)
	f.Add([]byte{1})
	f.Fuzz(func(t *testing.T, b []byte) {
		var sp SyncPoint
		if err := sp.UnmarshalBinary(b); err != nil {
			return
		}
		again, err := sp.MarshalBinary()
		if err != nil {
			t.Fatalf("decoded point does not encode: %v", err)
		}
		var sp2 SyncPoint
		if err := sp2.UnmarshalBinary(again); err != nil || !bytes.Equal(sp2.Data, sp.Data) || sp2.Digest != sp.Digest || sp2.Branch != sp.Branch || sp2.Branches != sp.Branches {
			t.Fatalf("re-encoded point differs: %v", err)
		}
	})
}
