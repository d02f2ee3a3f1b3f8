package hpcproxy

import (
	"bytes"
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/hpcproxy/hpcproxy/internal/sshtest"
	"github.com/hpcproxy/hpcproxy/internal/testenv"
)

// The fallback chain: EstablishTunnel goes on to the next method when one
// cannot work, and when none can, the *TunnelError names every method's
// reason.

func TestFallbackNoSSHBinary(t *testing.T) {
	cfg := TunnelConfig{
		Destination: "login.invalid",
		SSHBinary:   "/nonexistent/bin/ssh",
		Methods:     []Method{MethodControlMaster, MethodSOCKSUnix, MethodSOCKSTCP, MethodExec, MethodDirect},
	}
	tun, err := EstablishTunnel(context.Background(), cfg)
	require.NoError(t, err)
	require.Equal(t, MethodDirect, tun.Method())
	require.NoError(t, tun.Close())

	cfg.Methods = systemSSHMethods
	_, err = EstablishTunnel(context.Background(), cfg)
	terr := requireTunnelError(t, err, systemSSHMethods)
	for _, a := range terr.Attempts {
		assert.ErrorContains(t, a, `ssh client "/nonexistent/bin/ssh" not usable`)
	}
}

func TestFallbackNoSSHInPath(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	_, err := EstablishTunnel(context.Background(), TunnelConfig{
		Destination: "login.invalid",
		Methods:     systemSSHMethods,
	})
	terr := requireTunnelError(t, err, systemSSHMethods)
	for _, a := range terr.Attempts {
		assert.ErrorIs(t, a, errSSHNotFound)
	}
	assert.Contains(t, err.Error(), "\n  controlmaster: hpcproxy: ssh client not found in PATH: install openssh-client")
}

// No agent and no usable key: every method of the default chain fails, and
// each says why.
func TestFallbackNoKey(t *testing.T) {
	sshd := sshtest.StartSSHD(t, sshtest.Options{})
	t.Setenv("SSH_AUTH_SOCK", "")
	dir := sshtest.PrivateTempDir(t)
	// A key the server does not know, and nothing else.
	stranger := filepath.Join(dir, "id_stranger")
	sshtest.GenerateKeyFile(t, "ed25519", stranger)
	cfgFile := writeClientConfig(t, sshd, dir, map[string]string{sshd.ClientKeyFile: stranger})

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	_, err := EstablishTunnel(ctx, TunnelConfig{
		Destination: "sshtest", SSHConfigFile: cfgFile, RuntimeDir: dir,
	})
	terr := requireTunnelError(t, err, DefaultMethods)
	for _, a := range terr.Attempts {
		require.Error(t, a.Err)
		if a.Method != MethodGoSSH {
			assert.ErrorContains(t, a, "Permission denied", "%s", a.Method)
		}
	}
	t.Logf("%v", err)
}

// oldSSH writes a wrapper around the real ssh that behaves like OpenSSH
// older than 6.7 for -D: a forwarding "port" that is a path is rejected.
func oldSSH(t *testing.T) string {
	t.Helper()
	realSSH := testenv.LookPath(t, "ssh")
	bin := filepath.Join(t.TempDir(), "ssh-6.6")
	script := `#!/bin/sh
# Like OpenSSH < 6.7: -D takes [bind_address:]port, never a unix socket path.
prev=
for a in "$@"; do
	if [ "$prev" = "-D" ]; then
		case "$a" in
		*/*) echo "Bad dynamic forwarding specification '$a'" >&2; exit 255 ;;
		esac
	fi
	prev=$a
done
exec ` + realSSH + ` "$@"
`
	require.NoError(t, os.WriteFile(bin, []byte(script), 0o700))
	return bin
}

func TestFallbackOldOpenSSH(t *testing.T) {
	sshd := sshtest.StartSSHD(t, sshtest.Options{})
	var logs syncBuffer
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	tun, err := EstablishTunnel(ctx, TunnelConfig{
		Destination:   "sshtest",
		SSHConfigFile: sshd.SSHConfigFile,
		SSHBinary:     oldSSH(t),
		RuntimeDir:    sshtest.PrivateTempDir(t),
		Methods:       []Method{MethodSOCKSUnix, MethodSOCKSTCP},
		Logger:        slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	})
	require.NoError(t, err)
	defer tun.Close()
	require.Equal(t, MethodSOCKSTCP, tun.Method())
	require.NoError(t, echoOnce(ctx, tun, startEchoServer(t), []byte("old but working")))
	assert.Contains(t, logs.String(), "method=socks-unix")
	assert.Contains(t, logs.String(), "Bad dynamic forwarding specification")

	// Alone, socks-unix fails with ssh's own words, at once.
	start := time.Now()
	_, err = EstablishTunnel(ctx, TunnelConfig{
		Destination: "sshtest", SSHConfigFile: sshd.SSHConfigFile, SSHBinary: oldSSH(t),
		RuntimeDir: sshtest.PrivateTempDir(t), Methods: []Method{MethodSOCKSUnix},
	})
	requireTunnelError(t, err, []Method{MethodSOCKSUnix})
	require.ErrorContains(t, err, "socks-unix: hpcproxy: ssh exited: exit status 255: Bad dynamic forwarding specification")
	require.Less(t, time.Since(start), 5*time.Second)
}

// An unreachable login node fails every method with ssh's reason.
func TestFallbackUnreachable(t *testing.T) {
	testenv.LookPath(t, "ssh")
	closed := closedPort(t)
	_, port, _ := strings.Cut(closed, ":")
	_, err := EstablishTunnel(context.Background(), TunnelConfig{
		Destination:   "127.0.0.1:" + port,
		SSHConfigFile: "none",
		SSHOptions:    []string{"UserKnownHostsFile=/dev/null", "GlobalKnownHostsFile=/dev/null"},
		RuntimeDir:    sshtest.PrivateTempDir(t),
		Methods:       systemSSHMethods,
	})
	terr := requireTunnelError(t, err, systemSSHMethods)
	for _, a := range terr.Attempts {
		assert.ErrorContains(t, a, "Connection refused")
	}
}

func TestFallbackCancelledContext(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := EstablishTunnel(ctx, TunnelConfig{Destination: "login.invalid", Methods: systemSSHMethods})
	require.ErrorIs(t, err, context.Canceled)
}

// requireTunnelError checks that err is a *TunnelError with one attempt
// per method, in order.
func requireTunnelError(t *testing.T, err error, methods []Method) *TunnelError {
	t.Helper()
	var terr *TunnelError
	require.ErrorAs(t, err, &terr)
	got := make([]Method, len(terr.Attempts))
	for i, a := range terr.Attempts {
		got[i] = a.Method
	}
	require.Equal(t, methods, got, "%v", err)
	return terr
}

// writeClientConfig writes a copy of sshd's client ssh_config with the
// given replacements.
func writeClientConfig(t *testing.T, sshd *sshtest.SSHD, dir string, replace map[string]string) string {
	t.Helper()
	base, err := os.ReadFile(sshd.SSHConfigFile)
	require.NoError(t, err)
	cfg := string(base)
	for old, new := range replace {
		cfg = strings.ReplaceAll(cfg, old, new)
	}
	p := filepath.Join(dir, "ssh_config")
	require.NoError(t, os.WriteFile(p, []byte(cfg), 0o600))
	return p
}

// syncBuffer is a bytes.Buffer safe for concurrent writes (a log sink).
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}
