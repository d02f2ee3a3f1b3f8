package hpcproxy

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/hpcproxy/hpcproxy/internal/daemonproc"
)

// TestStandby: a stand-by holds the job's port open on its own (a
// connection made while only it holds the listener waits in the
// backlog); the exit line ends it, and EOF without it makes it exec the
// takeover command with the listener as fd 3 and envListenFd=3.
func TestStandby(t *testing.T) {
	dir := t.TempDir()
	out := filepath.Join(dir, "out")
	takeover := []string{"/bin/sh", "-c", `readlink /proc/self/fd/3 >"$OUT"; echo "fd=$` + daemonproc.EnvListenFd + `" >>"$OUT"`}
	t.Setenv("OUT", out)
	start := func() (*daemonproc.Standby, int) {
		ln, err := daemonproc.ListenJob(0)
		require.NoError(t, err)
		defer ln.Close()
		l, err := net.FileListener(ln)
		require.NoError(t, err)
		port := l.Addr().(*net.TCPAddr).Port
		l.Close()
		s, err := daemonproc.StartStandby(ln, filepath.Join(dir, "log"), takeover)
		require.NoError(t, err)
		return s, port
	}

	s, port := start()
	// Only the stand-by holds the listener now.
	c, err := net.DialTimeout("tcp", net.JoinHostPort("127.0.0.1", itoa(port)), 5*time.Second)
	require.NoError(t, err, "the stand-by does not hold the port")
	c.Close()
	s.Release()
	require.Eventually(t, func() bool { return !daemonproc.PIDAlive(s.PID()) }, 10*time.Second, 20*time.Millisecond, "the exit line did not end the stand-by")
	_, err = os.Stat(out)
	assert.True(t, os.IsNotExist(err), "the stand-by took over after the exit line")
	_, err = net.DialTimeout("tcp", net.JoinHostPort("127.0.0.1", itoa(port)), 5*time.Second)
	assert.Error(t, err, "the port is open after the stand-by's exit")

	s, _ = start()
	s.Handoff() // no daemon holds the other end: EOF
	require.Eventually(t, func() bool { b, _ := os.ReadFile(out); return strings.Contains(string(b), "fd=3") },
		10*time.Second, 20*time.Millisecond, "the stand-by did not take over on EOF")
	b, _ := os.ReadFile(out)
	assert.True(t, strings.HasPrefix(string(b), "socket:["), "fd 3 of the takeover: %q", b)
}
