package machine

import (
	"strings"
	"testing"
)

func TestStateSummaryDiff(t *testing.T) {
	a := &StateSummary{ChunkSize: PageSize, Chunks: []uint64{1, 2, 3, 4}}
	a.Regs.RIP, a.Control[0] = 0x1000, 0x80000011
	b := &StateSummary{Regs: a.Regs, Control: a.Control, ChunkSize: PageSize, Chunks: []uint64{1, 2, 3, 4}}
	if d := b.Diff(a); d != "" {
		t.Fatalf("equal summaries differ: %s", d)
	}
	b.Regs.RAX, b.Chunks[2] = 7, 9
	d := b.Diff(a)
	for _, want := range []string{"rax 0x7 (want 0x0)", "memory differs in 1 chunks of 4096 bytes, at 0x2000"} {
		if !strings.Contains(d, want) {
			t.Errorf("diff %q lacks %q", d, want)
		}
	}
	enc, _ := b.MarshalBinary()
	var c StateSummary
	if err := c.UnmarshalBinary(enc); err != nil {
		t.Fatal(err)
	}
	if d := c.Diff(b); d != "" {
		t.Fatalf("decoded summary differs: %s", d)
	}
	for _, bad := range [][]byte{enc[:10], enc[:len(enc)-1], append(enc, 0)} {
		if err := c.UnmarshalBinary(bad); err == nil {
			t.Errorf("a %d-byte summary (of %d) decoded", len(bad), len(enc))
		}
	}
}
