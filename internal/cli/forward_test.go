package cli

import (
	"io"
	"net"
	"net/http"
	"os"
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

// TestCLIExposeForwardRunning: a plain start, then expose and forward add
// to the running daemon (the README's sequence); a second start asking for
// a forward the daemon lacks fails and names the command that adds it,
// one asking for what it has succeeds and prints the hint again.
func TestCLIExposeForwardRunning(t *testing.T) {
	sshd := sshtest.StartSSHD(t, sshtest.Options{})
	state := filepath.Join(sshtest.PrivateTempDir(t), "proxy.json")
	port := webServer(t) // the job's "Jupyter"
	svc := webServer(t)  // a login-side service
	lport := strconv.Itoa(sshtest.FreePort(t))
	get := func(url string) string {
		t.Helper()
		resp, err := (&http.Client{Timeout: 10 * time.Second}).Get(url)
		require.NoError(t, err)
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return string(b)
	}

	r := run(t, "perjob", "", "expose", "--state", state, port)
	assert.Equal(t, 1, r.code, "expose without a proxy")
	assert.Contains(t, r.stderr, "no proxy running")

	// --private: the end removes the control socket, and a node tunnel's
	// job is stopped through it (a SIGTERM would hand the tunnel over to
	// the job's stand-by, see TestCLINodeTunnelTakeover).
	r = run(t, "perjob", "", "start", "--via", "sshtest", "--ssh-config", sshd.SSHConfigFile, "--state", state, "--watch-pid", "-1", "--private")
	require.Equal(t, 0, r.code, "start: %s\nlog:\n%s", r.stderr, readFile(state, ".log"))
	t.Cleanup(func() { run(t, "perjob", "", "stop", "--state", state) })

	r = run(t, "perjob", "", "expose", "--state", state, port)
	require.Equal(t, 0, r.code, "expose: %s\nlog:\n%s", r.stderr, readFile(state, ".log"))
	ps, err := hpcproxy.ReadPidFileAt(state)
	require.NoError(t, err)
	require.Len(t, ps.Forwards, 1)
	remote := ps.Forwards[0].Listen
	_, rport, _ := net.SplitHostPort(remote)
	assert.Contains(t, r.stdout, "exposed 127.0.0.1:"+port+" on sshtest at "+remote)
	assert.Contains(t, r.stdout, "on your machine: ssh -N -L "+port+":127.0.0.1:"+rport+" sshtest")
	assert.Contains(t, get("http://"+remote+"/lab"), "path=/lab")

	r = run(t, "perjob", "", "forward", "--state", state, lport+"=localhost:"+svc)
	require.Equal(t, 0, r.code, "forward: %s", r.stderr)
	assert.Equal(t, "forwarding 127.0.0.1:"+lport+" -> localhost:"+svc+" (resolved on sshtest)\n", r.stdout)
	assert.Contains(t, get("http://127.0.0.1:"+lport+"/license"), "path=/license")

	r = run(t, "perjob", "", "status", "--state", state)
	require.Equal(t, 0, r.code, r.stderr)
	assert.Contains(t, r.stdout, "forward:     reverse "+remote+" <- 127.0.0.1:"+port+" (up)")
	assert.Contains(t, r.stdout, "forward:     local   127.0.0.1:"+lport+" -> localhost:"+svc+" (up)")

	// A second start with what the daemon has: fine, with the hint again.
	r = run(t, "perjob", "", "start", "--via", "sshtest", "--ssh-config", sshd.SSHConfigFile, "--state", state,
		"--watch-pid", "-1", "--expose", port, "--forward", lport+"=localhost:"+svc)
	require.Equal(t, 0, r.code, "second start with the same forwards: %s", r.stderr)
	assert.Contains(t, r.stdout, "on your machine: ssh -N -L "+port+":127.0.0.1:"+rport+" sshtest")

	// With what it lacks: an error that says how to add it.
	other := strconv.Itoa(sshtest.FreePort(t))
	r = run(t, "perjob", "", "start", "--via", "sshtest", "--ssh-config", sshd.SSHConfigFile, "--state", state,
		"--watch-pid", "-1", "--expose", port, "--expose", other, "--forward", other+"=localhost:"+svc)
	assert.Equal(t, 1, r.code, "second start with new forwards: %s", r.stdout)
	assert.Contains(t, r.stderr, "already running")
	assert.Contains(t, r.stderr, "without --forward "+other+"=localhost:"+svc+", --expose "+other+"\n")
	assert.Contains(t, r.stderr, "perjob expose --state "+state+" "+other)
	assert.Contains(t, r.stderr, "perjob forward --state "+state+" "+other+"=localhost:"+svc)
	assert.NotContains(t, r.stderr, "expose --state "+state+" "+port+"\n", "an expose the daemon has is not missing")
	ps, err = hpcproxy.ReadPidFileAt(state)
	require.NoError(t, err)
	assert.Len(t, ps.Forwards, 2, "the failed start changed the daemon")

	// Mistakes, and help.
	for _, cmd := range []string{"expose", "forward"} {
		r = run(t, "perjob", "", cmd, "--help")
		assert.Equal(t, 0, r.code)
		assert.Contains(t, r.stdout, "Usage: perjob "+cmd)
	}
	r = run(t, "perjob", "", "expose", "--state", state)
	assert.Equal(t, 2, r.code)
	assert.Contains(t, r.stderr, "LOCAL[=REMOTE]")
	r = run(t, "perjob", "", "forward", "--state", state, "5432")
	assert.Equal(t, 1, r.code)
	assert.Contains(t, r.stderr, "LOCAL=REMOTE")
	r = run(t, "perjob", "", "forward", "--state", state, lport+"=db.internal:5432")
	assert.Equal(t, 1, r.code)
	assert.Contains(t, r.stderr, "address already in use")

	// A daemon without a control socket says what to do.
	require.NoError(t, os.Remove(hpcproxy.ControlSocketPath(state)))
	r = run(t, "perjob", "", "expose", "--state", state, other)
	assert.Equal(t, 1, r.code)
	assert.Contains(t, r.stderr, "takes no new forwards")
	assert.True(t, strings.Contains(r.stderr, "perjob stop"), r.stderr)
}

// TestCLISharedForward: the shared binary has the same commands; a direct
// shared proxy forwards, and refuses to expose (it has no login node).
func TestCLISharedForward(t *testing.T) {
	state := filepath.Join(sshtest.PrivateTempDir(t), "proxy.json")
	svc := webServer(t)
	lport := strconv.Itoa(sshtest.FreePort(t))
	r := run(t, "shared", "", "start", "--state", state)
	require.Equal(t, 0, r.code, r.stderr)
	t.Cleanup(func() { run(t, "shared", "", "stop", "--state", state) })

	r = run(t, "shared", "", "forward", "--state", state, lport+"=127.0.0.1:"+svc)
	require.Equal(t, 0, r.code, r.stderr)
	assert.Equal(t, "forwarding 127.0.0.1:"+lport+" -> 127.0.0.1:"+svc+" (resolved on direct)\n", r.stdout)
	resp, err := (&http.Client{Timeout: 10 * time.Second}).Get("http://127.0.0.1:" + lport + "/shared")
	require.NoError(t, err)
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	assert.Contains(t, string(b), "path=/shared")

	r = run(t, "shared", "", "expose", "--state", state, "8888")
	assert.Equal(t, 1, r.code)
	assert.Contains(t, r.stderr, "direct")
	ps, err := hpcproxy.ReadPidFileAt(state)
	require.NoError(t, err)
	assert.Len(t, ps.Forwards, 1)
}
