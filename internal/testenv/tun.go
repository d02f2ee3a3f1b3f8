package testenv

import (
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

// The tests of every package that need /dev/net/tun 0666 (go test runs
// packages in parallel) coordinate through two lock files: each holds a
// shared lock on tunUsers while it runs; tunMutex serializes setting up
// and cleaning up. The first to change the mode records the original in
// tunUsers, and the last to finish (no other shared holder) restores it.
// A test that dies releases its lock with its process; the recorded mode
// stays for the next run to restore.
const (
	tunUsers = "/tmp/hpcproxy-test-tun.users"
	tunMutex = "/tmp/hpcproxy-test-tun.mutex"
)

// TunLikeANode makes /dev/net/tun mode 0666 for t, as most distributions
// ship it and a compute node has it (some machines, this project's among
// them, have it 0600), and restores the original mode once no test of any
// package needs it any more. A device already 0666 needs nothing; else it
// needs root.
func TunLikeANode(t testing.TB) {
	t.Helper()
	fi, err := os.Stat("/dev/net/tun")
	Require(t, err == nil, "no /dev/net/tun (modprobe tun): %v", err)
	if os.Geteuid() != 0 {
		Require(t, fi.Mode().Perm()&0o006 == 0o006, "/dev/net/tun is mode %#o and only root can make it 0666 as a node has it", fi.Mode().Perm())
		return
	}
	unlock := lockFile(t, tunMutex)
	defer unlock()
	users, err := os.OpenFile(tunUsers, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 16)
	n, _ := users.ReadAt(b, 0)
	if strings.TrimSpace(string(b[:n])) == "" {
		// The first user: the mode now is the original.
		fi, err := os.Stat("/dev/net/tun")
		if err == nil {
			_, err = users.WriteAt([]byte(strconv.FormatUint(uint64(fi.Mode().Perm()), 8)+"\n"), 0)
		}
		if err != nil {
			users.Close()
			t.Fatal(err)
		}
	}
	if err := os.Chmod("/dev/net/tun", 0o666); err != nil {
		users.Close()
		t.Fatal(err)
	}
	if err := syscall.Flock(int(users.Fd()), syscall.LOCK_SH); err != nil {
		users.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		unlock := lockFile(t, tunMutex)
		defer unlock()
		defer users.Close()
		// Exclusive only if no other test holds it shared: the last one.
		if syscall.Flock(int(users.Fd()), syscall.LOCK_EX|syscall.LOCK_NB) != nil {
			return
		}
		n, _ := users.ReadAt(b, 0)
		if mode, err := strconv.ParseUint(strings.TrimSpace(string(b[:n])), 8, 32); err == nil {
			_ = os.Chmod("/dev/net/tun", os.FileMode(mode))
		}
		_ = users.Truncate(0)
	})
}

// lockFile takes an exclusive lock on path and returns its release.
func lockFile(t testing.TB, path string) func() {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		f.Close()
		t.Fatal(err)
	}
	return func() { f.Close() }
}
