package sshtest

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/hpcproxy/hpcproxy/internal/testenv"
)

// TestSSHDLogin checks the helper itself with the real ssh client: the
// generated client config logs in, host key checked strictly.
func TestSSHDLogin(t *testing.T) {
	s := StartSSHD(t, Options{HostKeyTypes: []string{"ed25519", "ecdsa"}})
	sshBin := testenv.LookPath(t, "ssh")
	out, err := exec.Command(sshBin, "-F", s.SSHConfigFile, "sshtest", "echo", "hello").CombinedOutput()
	if err != nil {
		t.Fatalf("ssh: %v\n%s\nsshd log:\n%s", err, out, s.Log())
	}
	if got := strings.TrimSpace(string(out)); got != "hello" {
		t.Fatalf("got %q, want hello", got)
	}
	// PID is the pid sshd itself records.
	b, err := os.ReadFile(filepath.Join(s.Dir, "sshd.pid"))
	if err != nil {
		t.Fatal(err)
	}
	if want, _ := strconv.Atoi(strings.TrimSpace(string(b))); s.PID() != want {
		t.Errorf("PID() = %d, sshd.pid says %d", s.PID(), want)
	}
	s.Stop()
	if bannerOK(s.Addr) {
		t.Fatalf("sshd still answers after Stop")
	}
	if pid := s.PID(); pid != 0 {
		t.Errorf("PID() = %d after Stop, want 0", pid)
	}
	s.Start(t)
	out, err = exec.Command(sshBin, "-F", s.SSHConfigFile, "sshtest", "true").CombinedOutput()
	if err != nil {
		t.Fatalf("ssh after restart: %v\n%s", err, out)
	}
}
