package kvm

import (
	"errors"
	"strings"
	"testing"
)

// TestReadStateRereadsBogusAnswers: an answer that cannot be the vCPU's
// (the lab host's all-zero KVM_GET_REGS/KVM_GET_SREGS) is read again; one
// that stays bogus is an error naming the ioctl, and a failing ioctl's
// error comes through.
func TestReadStateRereadsBogusAnswers(t *testing.T) {
	bogus := func(r *Regs) bool { return r.RFLAGS&rflagsFixed == 0 }
	answers := []Regs{{}, {}, {RIP: 0x1000, RFLAGS: 0x202}}
	calls := 0
	get := func(r *Regs) error { *r = answers[min(calls, len(answers)-1)]; calls++; return nil }
	r, err := readState("KVM_GET_REGS", get, bogus)
	if err != nil || r.RIP != 0x1000 || calls != 3 {
		t.Fatalf("two zero answers, then a real one: %+v, %v after %d reads", r, err, calls)
	}
	calls = 0
	_, err = readState("KVM_GET_REGS", func(r *Regs) error { calls++; return nil }, bogus)
	if err == nil || !strings.Contains(err.Error(), "KVM_GET_REGS") || calls != readStateTries {
		t.Fatalf("always zero: %v after %d reads", err, calls)
	}
	boom := errors.New("boom")
	if _, err := readState("KVM_GET_SREGS", func(*Sregs) error { return boom }, func(s *Sregs) bool { return *s == Sregs{} }); !errors.Is(err, boom) {
		t.Fatalf("failing ioctl: %v", err)
	}
}
