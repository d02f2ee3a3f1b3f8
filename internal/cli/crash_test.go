package cli

import (
	"net"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/hpcproxy/hpcproxy"
	"github.com/hpcproxy/hpcproxy/internal/sshtest"
)

// TestCLIKilledDaemon kills the daemon with SIGKILL: its state file stays
// behind, status calls it stale, and the next start replaces it.
func TestCLIKilledDaemon(t *testing.T) {
	state := filepath.Join(sshtest.PrivateTempDir(t), "proxy.json")
	r := run(t, "shared", "", "start", "--state", state)
	require.Equal(t, 0, r.code, r.stderr)
	t.Cleanup(func() { run(t, "shared", "", "stop", "--state", state) })
	first, err := hpcproxy.ReadPidFileAt(state)
	require.NoError(t, err)

	require.NoError(t, syscall.Kill(first.PID, syscall.SIGKILL))
	require.Eventually(t, func() bool { return syscall.Kill(first.PID, 0) != nil }, 10*time.Second, 20*time.Millisecond)
	left, err := hpcproxy.ReadPidFileAt(state)
	require.NoError(t, err, "a killed daemon cannot remove its state file")
	assert.Equal(t, first.PID, left.PID)

	r = run(t, "shared", "", "status", "--state", state)
	assert.Equal(t, 1, r.code)
	assert.Contains(t, r.stdout, "state:       stale")

	r = run(t, "shared", "", "start", "--state", state)
	require.Equal(t, 0, r.code, r.stderr)
	second, err := hpcproxy.ReadPidFileAt(state)
	require.NoError(t, err)
	assert.NotEqual(t, first.PID, second.PID, "the stale state was replaced by the new daemon's")
	c, err := net.DialTimeout("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(second.Port)), 500*time.Millisecond)
	require.NoError(t, err, "the second proxy accepts connections")
	c.Close()
}
