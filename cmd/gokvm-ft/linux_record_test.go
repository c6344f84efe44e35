package main

import (
	"bufio"
	"crypto/sha256"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// journalGuestSnapshot returns a snapshot of the shared guest configuration
// booted under a journal (`gokvm-ft record`, so with the journal's kernel
// command line: no TSC, jiffies clock) and stopped at its shell prompt,
// with the counter service running. It is cached like the shared guest's
// snapshot, its key also covering the journal command line's source.
func journalGuestSnapshot(t *testing.T, ns *netns) string {
	t.Helper()
	kernel, initrd := linuxImages(t)
	src, err := os.ReadFile("../../machine/cmdline.go")
	if err != nil {
		t.Fatal(err)
	}
	cache := snapshotCacheDir(t, kernel, initrd) + fmt.Sprintf("-journal-%x", sha256.Sum256(src))[:len("-journal-")+16]
	if _, err := os.Stat(filepath.Join(cache, "snapshot.gkft")); err == nil {
		return cache
	}
	tmp := t.TempDir()
	disk := filepath.Join(tmp, "disk.img")
	newExt4Disk(t, disk)
	ctl := filepath.Join(tmp, "vm.sock")
	v := startVMM(t, ns, append([]string{"record", "-log", filepath.Join(tmp, "boot.ftlog"),
		"-kernel", kernel, "-initrd", initrd, "-disk", disk, "-control", ctl}, sharedGuestFlags...)...)
	pos := v.waitFor(t, "Welcome to u-root", 0, 15*time.Minute)
	pos = v.waitFor(t, "gokvm: counter service listening", pos, 5*time.Minute)
	v.waitFor(t, "$ ", pos, 5*time.Minute)
	t.Logf("journal guest booted (recording) in %v", time.Since(v.start).Round(time.Millisecond))
	tmpSnap := cache + fmt.Sprintf(".tmp%d", os.Getpid())
	os.RemoveAll(tmpSnap)
	if err := os.MkdirAll(filepath.Dir(cache), 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := runSelf("snapshot", "-control", ctl, tmpSnap); err != nil {
		t.Fatalf("snapshot of the journal guest: %v: %s; stderr %s", err, out, v.stderr.String())
	}
	v.cmd.Process.Kill()
	<-v.done
	if err := os.Rename(tmpSnap, cache); err != nil {
		t.Fatal(err)
	}
	return cache
}

// linuxWorkload is what TestLinuxRecordReplay records: ten requests to
// the counter service over one TCP connection from the test's namespace,
// made while the shell runs a CPU-bound pipeline (dd from /dev/zero into
// gzip: guest kernel and user code that runs long without exits), then
// two more shell commands. It returns the console position and how long
// the workload took.
func linuxWorkload(t *testing.T, v *vmm, ns *netns, pos int) (int, time.Duration) {
	t.Helper()
	start := time.Now()
	c, err := ns.dial("10.0.2.15:7777", time.Minute)
	if err != nil {
		t.Fatalf("TCP to the counter: %v", err)
	}
	defer c.Close()
	client := make(chan error, 1)
	go func() {
		r := bufio.NewReader(c)
		last := 0
		for i := 0; i < 10; i++ {
			c.SetDeadline(time.Now().Add(2 * time.Minute))
			if _, err := fmt.Fprintf(c, "next\n"); err != nil {
				client <- err
				return
			}
			line, err := r.ReadString('\n')
			if err != nil {
				client <- fmt.Errorf("counter reply %d: %w", i+1, err)
				return
			}
			var n int
			if _, err := fmt.Sscan(line, &n); err != nil || (last != 0 && n != last+1) {
				client <- fmt.Errorf("counter reply %q after %d", line, last)
				return
			}
			last = n
		}
		client <- nil
	}()
	pos = v.shell(t, "dd if=/dev/zero bs=64k count=32 | gzip -c | wc -c; echo spun-$((6*7))", "spun-42", pos)
	if err := <-client; err != nil {
		t.Fatal(err)
	}
	pos = v.shell(t, "ls /bin | wc -l; echo sum-$((20+22))", "sum-42", pos)
	pos = v.shell(t, "cat /proc/uptime; echo listed-$((3*5))", "listed-15", pos)
	return pos, time.Since(start)
}

// restoreJournalGuest starts the journal guest from snap (under `record
// -log logFile` if logFile is set) and waits for its shell to answer.
func restoreJournalGuest(t *testing.T, ns *netns, snap, logFile string, extra ...string) (*vmm, int) {
	t.Helper()
	args := []string{"-restore", snap, "-disk", filepath.Join(t.TempDir(), "disk.img")}
	if logFile != "" {
		args = append([]string{"record", "-log", logFile}, args...)
	}
	v := startVMM(t, ns, append(append(args, extra...), sharedGuestFlags...)...)
	if _, err := io.WriteString(v.stdin, "echo restored-$((6*7))\n"); err != nil {
		t.Fatal(err)
	}
	pos := v.waitFor(t, "restored-42", len("echo restored-"), 2*time.Minute)
	return v, v.waitFor(t, "$ ", pos, 2*time.Minute)
}

// TestLinuxRecordReplay records Linux, started from a snapshot taken under
// a journal, while it serves the counter service to a client over TCP and
// runs shell commands, then idles, until `poweroff`; `gokvm-ft replay` of
// the log then prints the same console output byte for byte and ends at
// the same exit with the same state digest (registers and all of memory).
// The same workload run without recording, from the same snapshot, gives
// the recording overhead (logged, with the log's rate busy and idle).
func TestLinuxRecordReplay(t *testing.T) {
	linuxImages(t)
	need(t, "ip", "mkfs.ext4")
	ns := sharedNetns(t)
	snap := journalGuestSnapshot(t, ns)

	plain, pos := restoreJournalGuest(t, ns, snap, "")
	pos, plainTook := linuxWorkload(t, plain, ns, pos)
	plain.powerOff(t, pos)

	logFile := filepath.Join(t.TempDir(), "run.ftlog")
	v, pos := restoreJournalGuest(t, ns, snap, logFile, "-stats")
	size := func() int64 {
		st, err := os.Stat(logFile)
		if err != nil {
			t.Fatal(err)
		}
		return st.Size()
	}
	before := size()
	pos, recTook := linuxWorkload(t, v, ns, pos)
	busy := size() - before
	time.Sleep(200 * time.Millisecond) // the recorder's flush interval
	before = size()
	const idle = 5 * time.Second
	time.Sleep(idle)
	idleBytes := size() - before
	v.powerOff(t, pos)
	recorded := time.Since(v.start)
	recConsole := v.console.String()
	t.Logf("workload (10 counter requests beside dd | gzip, 2 shell commands): plain %v, recording %v: ratio %.2f",
		plainTook.Round(time.Millisecond), recTook.Round(time.Millisecond), recTook.Seconds()/plainTook.Seconds())
	t.Logf("log: %d bytes in all; busy %.1f KiB/s, idle %.2f KiB/s", size(), float64(busy)/1024/recTook.Seconds(), float64(idleBytes)/1024/idle.Seconds())
	for _, line := range strings.Split(v.stderr.String(), "\n") {
		if strings.Contains(line, "interrupt waits") || strings.Contains(line, "sync points") || strings.Contains(line, "recorded") {
			t.Log(strings.TrimSpace(line))
		}
	}

	rp := startVMM(t, nil, "replay", "-log", logFile)
	select {
	case code := <-rp.done:
		if code != 0 {
			kept := filepath.Join(os.TempDir(), fmt.Sprintf("gokvm-ft-failed-replay-%d.ftlog", os.Getpid()))
			if err := os.Rename(logFile, kept); err == nil {
				t.Logf("the log is kept for study: gokvm-ft replay -log %s", kept)
			}
			t.Fatalf("replay: exit status %d: %s", code, rp.stderr.String())
		}
	case <-time.After(15 * time.Minute):
		t.Fatalf("replay did not end; stderr %s", rp.stderr.String())
	}
	t.Logf("replayed in %v (recording: %v): %s", time.Since(rp.start).Round(time.Millisecond), recorded.Round(time.Millisecond), strings.TrimSpace(rp.stderr.String()))
	if got := rp.console.String(); got != recConsole {
		t.Fatalf("replay console output differs from the recording's:\nrecorded %q\nreplayed %q", recConsole, got)
	}
	if !strings.Contains(rp.stderr.String(), "same state digest") {
		t.Fatalf("replay did not report the same state digest: %s", rp.stderr.String())
	}
}
