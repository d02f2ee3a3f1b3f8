package cli

import (
	"net"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/hpcproxy/hpcproxy"
	"github.com/hpcproxy/hpcproxy/internal/sshtest"
)

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
