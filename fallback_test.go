package hpcproxy

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
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
		Methods:       []Method{MethodSOCKSUnix, MethodSOCKSTCP, MethodExec},
		Logger:        slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	})
	require.NoError(t, err)
	defer tun.Close()
	// socks-tcp, which old OpenSSH could do, is refused: exec carries it.
	require.Equal(t, MethodExec, tun.Method())
	require.NoError(t, echoOnce(ctx, tun, startEchoServer(t), []byte("old but working")))
	assert.Contains(t, logs.String(), "method=socks-unix")
	assert.Contains(t, logs.String(), "Bad dynamic forwarding specification")
	assert.Contains(t, logs.String(), "method=socks-tcp")
	assert.Contains(t, logs.String(), "no authentication")

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

// Without any ssh binary the default chain still comes up: gossh resolves
// the destination with the ssh_config parser.
func TestFallbackNoSSHBinaryGoSSHUp(t *testing.T) {
	sshd := sshtest.StartSSHD(t, sshtest.Options{})
	t.Setenv("SSH_AUTH_SOCK", "")
	var logs syncBuffer
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	tun, err := EstablishTunnel(ctx, TunnelConfig{
		Destination: "sshtest", SSHConfigFile: sshd.SSHConfigFile, SSHBinary: "/nonexistent/bin/ssh",
		RuntimeDir: sshtest.PrivateTempDir(t), Logger: debugLogger(&logs),
	})
	require.NoError(t, err)
	defer tun.Close()
	require.Equal(t, MethodGoSSH, tun.Method())
	require.NoError(t, echoOnce(ctx, tun, startEchoServer(t), []byte("no ssh binary")))
	assert.Contains(t, logs.String(), `config="ssh_config parser"`)
}

// noGSSH writes a wrapper around the real ssh that refuses -G, as OpenSSH
// older than 6.8 does.
func noGSSH(t *testing.T) string {
	t.Helper()
	realSSH := testenv.LookPath(t, "ssh")
	bin := filepath.Join(t.TempDir(), "ssh-6.7")
	script := `#!/bin/sh
for a; do
	if [ "$a" = -G ]; then
		echo "ssh: illegal option -- G" >&2
		echo "usage: ssh [-1246AaCfgKkMNnqsTtVvXxYy] ..." >&2
		exit 255
	fi
done
exec ` + realSSH + ` "$@"
`
	require.NoError(t, os.WriteFile(bin, []byte(script), 0o700))
	return bin
}

// An ssh without -G: gossh resolves with the parser, and the OpenSSH
// methods still tunnel, with the keepalive default the parser allows.
func TestFallbackNoSSHG(t *testing.T) {
	sshd := sshtest.StartSSHD(t, sshtest.Options{})
	t.Setenv("SSH_AUTH_SOCK", "")
	bin := noGSSH(t)
	for _, methods := range [][]Method{DefaultMethods, systemSSHMethods} {
		t.Run(Methods(methods).String(), func(t *testing.T) {
			var logs syncBuffer
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			tun, err := EstablishTunnel(ctx, TunnelConfig{
				Destination: "sshtest", SSHConfigFile: sshd.SSHConfigFile, SSHBinary: bin,
				RuntimeDir: sshtest.PrivateTempDir(t), Methods: methods, Logger: debugLogger(&logs),
			})
			require.NoError(t, err, "%s", logs.String())
			defer tun.Close()
			require.Equal(t, methods[0], tun.Method())
			require.NoError(t, echoOnce(ctx, tun, startEchoServer(t), []byte("no ssh -G")))
			if methods[0] == MethodGoSSH {
				assert.Contains(t, logs.String(), `config="ssh_config parser"`)
			} else {
				assert.Contains(t, logs.String(), "illegal option -- G")
				assert.Contains(t, logs.String(), "ServerAliveInterval=60")
			}
		})
	}
}

// oldMasterSSH writes a wrapper around the real ssh whose master (-M)
// speaks the mux protocol of OpenSSH older than 7.4: it answers the proxy
// request with "unsupported request". Everything else runs the real ssh.
func oldMasterSSH(t *testing.T) string {
	t.Helper()
	realSSH := testenv.LookPath(t, "ssh")
	self, err := os.Executable()
	require.NoError(t, err)
	bin := filepath.Join(t.TempDir(), "ssh-7.3")
	script := `#!/bin/sh
prev=
master=
for a; do
	[ "$a" = -M ] && master=1
	[ "$prev" = -S ] && sock=$a
	prev=$a
done
if [ -n "$master" ]; then
	exec env ` + helperEnv + `=oldmaster HPCPROXY_OLDMASTER_SOCK="$sock" ` + self + ` -test.run='^TestHelperDaemon$' -test.count=1
fi
exec ` + realSSH + ` "$@"
`
	require.NoError(t, os.WriteFile(bin, []byte(script), 0o700))
	return bin
}

func init() {
	helpers["oldmaster"] = oldMasterHelper
}

// oldMasterHelper plays an OpenSSH 7.3 control master on
// $HPCPROXY_OLDMASTER_SOCK until it is killed.
func oldMasterHelper() int {
	ln, err := net.Listen("unix", os.Getenv("HPCPROXY_OLDMASTER_SOCK"))
	if err != nil {
		fmt.Fprintln(os.Stderr, "oldmaster:", err)
		return 1
	}
	for {
		c, err := ln.Accept()
		if err != nil {
			return 1
		}
		go serveOldMux(c)
	}
}

// serveOldMux answers like OpenSSH 7.3's mux_master_read_cb: hello
// (protocol 4), then MUX_S_FAILURE "unsupported request" for the
// MUX_C_PROXY that came after the client's hello.
func serveOldMux(c net.Conn) {
	defer c.Close()
	packet := func(words []uint32, s string) []byte {
		var body []byte
		for _, w := range words {
			body = binary.BigEndian.AppendUint32(body, w)
		}
		if s != "" {
			body = binary.BigEndian.AppendUint32(body, uint32(len(s)))
			body = append(body, s...)
		}
		return append(binary.BigEndian.AppendUint32(nil, uint32(len(body))), body...)
	}
	read := func() []byte {
		var n [4]byte
		if _, err := io.ReadFull(c, n[:]); err != nil {
			return nil
		}
		b := make([]byte, binary.BigEndian.Uint32(n[:]))
		if _, err := io.ReadFull(c, b); err != nil {
			return nil
		}
		return b
	}
	const muxHello, muxSFailure = 0x00000001, 0x80000003
	_, _ = c.Write(packet([]uint32{muxHello, 4}, ""))
	if read() == nil { // the client's hello
		return
	}
	req := read() // MUX_C_PROXY, request id
	if len(req) < 8 {
		return
	}
	_, _ = c.Write(packet([]uint32{muxSFailure, binary.BigEndian.Uint32(req[4:8])}, "unsupported request"))
	_, _ = io.Copy(io.Discard, c)
}

// A master too old for mux proxy mode fails controlmaster with a clear
// reason, and the chain moves on to socks-unix.
func TestFallbackOldMaster(t *testing.T) {
	sshd := sshtest.StartSSHD(t, sshtest.Options{})
	t.Setenv("SSH_AUTH_SOCK", "")
	var logs syncBuffer
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cfg := TunnelConfig{
		Destination: "sshtest", SSHConfigFile: sshd.SSHConfigFile, SSHBinary: oldMasterSSH(t),
		RuntimeDir: sshtest.PrivateTempDir(t), Methods: []Method{MethodControlMaster, MethodSOCKSUnix},
		Logger: debugLogger(&logs),
	}
	tun, err := EstablishTunnel(ctx, cfg)
	require.NoError(t, err, "%s", logs.String())
	defer tun.Close()
	require.Equal(t, MethodSOCKSUnix, tun.Method())
	require.NoError(t, echoOnce(ctx, tun, startEchoServer(t), []byte("old master")))
	assert.Contains(t, logs.String(), "mux proxy mode needs OpenSSH >= 7.4")

	cfg.Methods, cfg.Logger = []Method{MethodControlMaster}, nil
	_, err = EstablishTunnel(ctx, cfg)
	requireTunnelError(t, err, cfg.Methods)
	require.ErrorContains(t, err, "mux proxy mode needs OpenSSH >= 7.4")
	require.ErrorContains(t, err, "expected server proxy response")
}

// A key that x/crypto cannot use (a DSA key in OpenSSH's format, which
// OpenSSH still reads when allowed to) leaves gossh with no key: its
// reason is an *AuthError, and the chain goes on to controlmaster, where
// OpenSSH logs in with that key. Needs no root.
func TestFallbackNoKeyForGoSSH(t *testing.T) {
	keygen := testenv.LookPath(t, "ssh-keygen")
	dir := sshtest.PrivateTempDir(t)
	dsaKey := filepath.Join(dir, "id_dsa")
	out, err := exec.Command(keygen, "-q", "-t", "dsa", "-N", "", "-f", dsaKey).CombinedOutput()
	testenv.Require(t, err == nil, "ssh-keygen cannot make a DSA key (OpenSSH >= 9.8?): %v: %s", err, out)
	sshd := sshtest.StartSSHD(t, sshtest.Options{Config: []string{"PubkeyAcceptedAlgorithms=+ssh-dss"}})
	pubLine := mustRead(t, dsaKey+".pub")
	f, err := os.OpenFile(sshd.AuthorizedKeysFile, os.O_APPEND|os.O_WRONLY, 0o600)
	require.NoError(t, err)
	_, err = f.Write(pubLine)
	require.NoError(t, err)
	require.NoError(t, f.Close())
	t.Setenv("SSH_AUTH_SOCK", "")
	cfgFile := writeClientConfig(t, sshd, dir, map[string]string{
		sshd.ClientKeyFile: dsaKey + "\n  PubkeyAcceptedAlgorithms +ssh-dss",
	})

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cfg := TunnelConfig{Destination: "sshtest", SSHConfigFile: cfgFile, RuntimeDir: dir, Methods: []Method{MethodGoSSH}}
	_, err = EstablishTunnel(ctx, cfg)
	var ae *AuthError
	require.ErrorAs(t, err, &ae)
	assert.Empty(t, ae.Offered)
	assert.NotEmpty(t, ae.Skipped)

	cfg.Methods = nil // the default chain
	tun, err := EstablishTunnel(ctx, cfg)
	require.NoError(t, err, "sshd log:\n%s", sshd.Log())
	defer tun.Close()
	require.Equal(t, MethodControlMaster, tun.Method())
	require.NoError(t, echoOnce(ctx, tun, startEchoServer(t), []byte("dsa via OpenSSH")))
	assert.Contains(t, sshd.Log(), "Accepted publickey for "+sshd.User)
	assert.Contains(t, sshd.Log(), "DSA SHA256:")
}

func debugLogger(w io.Writer) *slog.Logger {
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug}))
}
