package cli

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/hpcproxy/hpcproxy"
	"github.com/hpcproxy/hpcproxy/internal/sshtest"
)

// TestCLIUsage: usage asked for goes to stdout with status 0; usage as the
// answer to a wrong command line goes to stderr with status 2.
func TestCLIUsage(t *testing.T) {
	r := run(t, "perjob", "")
	assert.Equal(t, 2, r.code, "no command")
	assert.Empty(t, r.stdout, "a usage error prints nothing on stdout")
	assert.Contains(t, r.stderr, "Usage:")

	for _, args := range [][]string{{"--help"}, {"-h"}, {"help"}} {
		r = run(t, "perjob", "", args...)
		assert.Equal(t, 0, r.code, "%v", args)
		assert.Contains(t, r.stdout, "Usage:", "%v", args)
		assert.Empty(t, r.stderr, "%v", args)
	}

	// help CMD is CMD --help.
	r = run(t, "perjob", "", "help", "run")
	assert.Equal(t, 0, r.code)
	assert.Contains(t, r.stdout, "Usage: perjob run [flags] -- CMD [ARG...]")
	assert.Contains(t, r.stdout, "-no-proxy")
	r = run(t, "shared", "", "help", "start")
	assert.Equal(t, 0, r.code)
	assert.Contains(t, r.stdout, "Usage: shared start")
	r = run(t, "perjob", "", "help", "frobnicate")
	assert.Equal(t, 2, r.code)
	assert.Contains(t, r.stderr, "unknown command")
}

// TestCLIErrorPrefix: an error from the library is printed once prefixed,
// "perjob start: ...", not "perjob start: hpcproxy: ...".
func TestCLIErrorPrefix(t *testing.T) {
	dir := sshtest.PrivateTempDir(t)
	state := filepath.Join(dir, "proxy.json")
	require.NoError(t, os.Symlink(filepath.Join(dir, "elsewhere.json"), state)) // refused: a symlink
	r := run(t, "perjob", "", "status", "--state", state)
	assert.Equal(t, 1, r.code)
	assert.True(t, strings.HasPrefix(r.stderr, "perjob status: unsafe state path"), "stderr %q", r.stderr)
	assert.NotContains(t, r.stderr, "hpcproxy: ")
}

// TestCLIStopNothingRunning: stop with no proxy says so, and where to look.
func TestCLIStopNothingRunning(t *testing.T) {
	state := filepath.Join(sshtest.PrivateTempDir(t), "proxy.json")
	for _, app := range []string{"perjob", "shared"} {
		r := run(t, app, "", "stop", "--state", state)
		assert.Equal(t, 1, r.code, app)
		assert.Contains(t, r.stderr, "no proxy running", app)
		assert.Contains(t, r.stderr, "hint: ", app)
		assert.Contains(t, r.stderr, "--state", app)
	}
}

// TestCLIStopZombie: the daemon exits on SIGTERM but nobody reaps it (its
// parent here does not wait, as an init in a container may not): stop
// sees it gone at once instead of waiting out --wait on a zombie, and
// removes the state file it left.
func TestCLIStopZombie(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	fake := exec.Command("sleep", "60") // dies on SIGTERM, leaving its state file
	require.NoError(t, fake.Start())
	defer func() { _ = fake.Process.Kill(); _ = fake.Wait() }()
	host, err := os.Hostname()
	require.NoError(t, err)
	state := filepath.Join(sshtest.PrivateTempDir(t), "proxy.json")
	require.NoError(t, hpcproxy.WritePidFileAt(state, hpcproxy.ProxyState{
		Host: host, PID: fake.Process.Pid, Port: ln.Addr().(*net.TCPAddr).Port,
		Mode: hpcproxy.ModePerJob, Status: hpcproxy.StatusUp, Started: time.Now().UTC(),
	}))

	start := time.Now()
	r := run(t, "perjob", "", "stop", "--state", state, "--wait", "5s", "-v")
	assert.Equal(t, 0, r.code, r.stderr)
	assert.Less(t, time.Since(start), 4*time.Second, "stop waited on a zombie")
	assert.Contains(t, r.stdout, "stopped pid")
	_, err = os.Stat(state)
	assert.True(t, os.IsNotExist(err), "the dead daemon's state file is left: %v", err)
}

// TestCLIEnvNoProxy: env and run honour HPCPROXY_NO_PROXY, as
// ProxyEnvList does, and add --no-proxy entries to it.
func TestCLIEnvNoProxy(t *testing.T) {
	state := filepath.Join(sshtest.PrivateTempDir(t), "proxy.json")
	r := run(t, "shared", "", "start", "--state", state)
	require.Equal(t, 0, r.code, r.stderr)
	t.Cleanup(func() { run(t, "shared", "", "stop", "--state", state) })
	env := []string{hpcproxy.EnvNoProxy + "=cluster.example.edu, 10.0.0.0/8"}
	const want = "localhost,127.0.0.1,127.0.0.0/8,::1,cluster.example.edu,10.0.0.0/8"

	r = runEnv(t, "shared", env, "", "env", "--state", state)
	require.Equal(t, 0, r.code, r.stderr)
	assert.Contains(t, r.stdout, "export no_proxy="+want+"\n")
	assert.Contains(t, r.stdout, "export NO_PROXY="+want+"\n")
	r = runEnv(t, "shared", env, "", "env", "--state", state, "--no-proxy", "hpc.internal")
	assert.Contains(t, r.stdout, "export no_proxy="+want+",hpc.internal\n")

	r = runEnv(t, "shared", env, "", "run", "--state", state, "--", "sh", "-c", `echo "$no_proxy|$NO_PROXY"`)
	require.Equal(t, 0, r.code, r.stderr)
	assert.Equal(t, want+"|"+want+"\n", r.stdout)
}

// TestCLIStartDirectHint: a shared proxy relaying directly that cannot
// start is not blamed on a login node called "direct".
func TestCLIStartDirectHint(t *testing.T) {
	ln, err := net.Listen("tcp", "0.0.0.0:0")
	require.NoError(t, err)
	defer ln.Close()
	port := ln.Addr().(*net.TCPAddr).Port
	state := filepath.Join(sshtest.PrivateTempDir(t), "proxy.json")
	r := run(t, "shared", "", "start", "--state", state, "--port", itoa(port))
	assert.Equal(t, 1, r.code)
	assert.Contains(t, r.stderr, "address already in use")
	assert.Contains(t, r.stderr, "hint: the proxy relays directly from this node: is port "+itoa(port)+" in use here?")
	assert.NotContains(t, r.stderr, "ssh direct")
}

// TestCLIPerJobSecondStartWithoutVia: outside a job, with neither --via nor
// HPCPROXY_VIA, a second start reports the running proxy; it needs no
// login node for that.
func TestCLIPerJobSecondStartWithoutVia(t *testing.T) {
	sshd := sshtest.StartSSHD(t, sshtest.Options{})
	state := filepath.Join(sshtest.PrivateTempDir(t), "proxy.json")
	r := run(t, "perjob", "", "start", "--via", "sshtest", "--ssh-config", sshd.SSHConfigFile, "--state", state, "--watch-pid", "-1")
	require.Equal(t, 0, r.code, r.stderr)
	t.Cleanup(func() { run(t, "perjob", "", "stop", "--state", state) })

	r = run(t, "perjob", "", "start", "--state", state, "-v")
	assert.Equal(t, 0, r.code, r.stderr)
	assert.Contains(t, r.stdout, "already running")
}

func itoa(n int) string { return strconv.Itoa(n) }
