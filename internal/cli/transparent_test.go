package cli

import (
	"bufio"
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/hpcproxy/hpcproxy/internal/sshtest"
	"github.com/hpcproxy/hpcproxy/internal/testenv"
	"github.com/hpcproxy/hpcproxy/transparent"
)

// TestRunTransparentUserNamespacesOff: where user namespaces are off, run
// --transparent says so, naming the sysctl, before anything runs, and
// points at the plain run. The test turns them off only for itself: in a
// throwaway user namespace (unshare), where user.max_user_namespaces is
// that namespace's own, set to 0 there.
func TestRunTransparentUserNamespacesOff(t *testing.T) {
	unshare := testenv.LookPath(t, "unshare")
	probe := exec.Command(unshare, "--user", "--map-root-user", "sh", "-c", "echo 0 >/proc/sys/user/max_user_namespaces")
	out, err := probe.CombinedOutput()
	testenv.Require(t, err == nil, "cannot make a throwaway user namespace to turn user namespaces off in: %v %s", err, out)

	dir := t.TempDir()
	marker := filepath.Join(dir, "ran")
	cmd := exec.Command(unshare, "--user", "--map-root-user", "sh", "-c",
		`echo 0 >/proc/sys/user/max_user_namespaces && exec "$@"`, "sh",
		os.Args[0], "run", "--transparent", "--state", filepath.Join(dir, "proxy.json"), "--", "touch", marker)
	cmd.Env = append(cleanEnv(), envApp+"=perjob")
	var stderr strings.Builder
	cmd.Stderr = &stderr
	err = cmd.Run()
	ee, ok := err.(*exec.ExitError)
	if !ok || ee.ExitCode() != 1 {
		t.Fatalf("run --transparent: %v, want exit status 1; stderr:\n%s", err, stderr.String())
	}
	assert.Contains(t, stderr.String(), "perjob run: transparent: user namespaces are disabled on this node (sysctl user.max_user_namespaces=0")
	assert.Contains(t, stderr.String(), "hint: without --transparent, 'perjob run -- CMD'")
	_, err = os.Stat(marker)
	assert.True(t, os.IsNotExist(err), "the command ran: %v", err)
}

func TestRunExcludeNeedsTransparent(t *testing.T) {
	r := run(t, "perjob", "", "run", "--exclude", "10.0.0.0/8", "--state", filepath.Join(t.TempDir(), "p.json"), "--", "true")
	assert.Equal(t, 1, r.code)
	assert.Contains(t, r.stderr, "--exclude needs --transparent")
	r = run(t, "perjob", "", "run", "--transparent", "--exclude", "10.0.0.300/8", "--", "true")
	assert.Equal(t, 1, r.code)
	assert.Contains(t, r.stderr, `--exclude "10.0.0.300/8": want a network like 10.0.0.0/8`)
}

func TestWithoutProxyEnv(t *testing.T) {
	got := withoutProxyEnv([]string{"http_proxy=x", "HTTPS_PROXY=y", "ALL_PROXY=z", "no_proxy=a", "PATH=/bin", "MY_PROXY_HOST=h"})
	assert.Equal(t, []string{"PATH=/bin", "MY_PROXY_HOST=h"}, got)
}

// TestCLIRunTransparentSignals: run --transparent passes the signals it
// gets to CMD and exits with CMD's status. (What CMD reaches is tested in
// package transparent and in test/e2e, where the far side resolves names
// this machine does not.)
func TestCLIRunTransparentSignals(t *testing.T) {
	err := transparent.Check()
	testenv.Require(t, err == nil, "transparent mode unavailable: %v", err)
	sshd := sshtest.StartSSHD(t, sshtest.Options{})
	state := filepath.Join(sshtest.PrivateTempDir(t), "proxy.json")
	r := run(t, "perjob", "", "start", "--via", "sshtest", "--ssh-config", sshd.SSHConfigFile, "--state", state, "--watch-pid", "-1")
	require.Equal(t, 0, r.code, "start: %s\nlog:\n%s", r.stderr, readFile(state, ".log"))
	t.Cleanup(func() { run(t, "perjob", "", "stop", "--state", state) })

	cmd := exec.Command(os.Args[0], "run", "--transparent", "--state", state, "--", "sh", "-c",
		`trap 'echo "got $1"; exit 5' HUP; trap 'echo got TERM; exit 6' TERM; echo ready; while :; do sleep 0.05; done`, "sh", "HUP")
	cmd.Env = append(cleanEnv(), envApp+"=perjob")
	stdout, err := cmd.StdoutPipe()
	require.NoError(t, err)
	var stderr lockedBuffer
	cmd.Stderr = &stderr
	require.NoError(t, cmd.Start())
	lines := bufio.NewScanner(stdout)
	require.True(t, lines.Scan(), "no output from the command; stderr: %s", stderr.String())
	require.Equal(t, "ready", lines.Text())
	require.NoError(t, cmd.Process.Signal(syscall.SIGTERM))
	var rest []string
	for lines.Scan() {
		rest = append(rest, lines.Text())
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err = <-done:
	case <-time.After(20 * time.Second):
		_ = cmd.Process.Kill()
		t.Fatalf("run --transparent did not end after SIGTERM; stderr: %s", stderr.String())
	}
	assert.Equal(t, []string{"got TERM"}, rest, "the command got the SIGTERM sent to run")
	ee, ok := err.(*exec.ExitError)
	require.True(t, ok, "run --transparent: %v", err)
	assert.Equal(t, 6, ee.ExitCode(), "run passes on the command's exit status; stderr: %s", stderr.String())
}

// lockedBuffer is a bytes.Buffer that a command's output goroutine writes
// while the test reads it.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
