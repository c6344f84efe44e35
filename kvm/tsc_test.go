package kvm

import "testing"

func TestTSCOffset(t *testing.T) {
	_, cpu, _ := realModeVM(t, nil)
	if !cpu.HasTSCOffset() {
		t.Skip("no TSC offset attribute")
	}
	off, err := cpu.TSCOffset()
	t.Logf("offset %d, %v", off, err)
	if err := cpu.SetTSCOffset(0); err != nil {
		t.Fatal(err)
	}
	off, err = cpu.TSCOffset()
	if err != nil || off != 0 {
		t.Errorf("offset %d after setting 0, %v", off, err)
	}
}
