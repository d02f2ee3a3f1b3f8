package hpcproxy

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/hpcproxy/hpcproxy/internal/sshdest"
	"github.com/hpcproxy/hpcproxy/internal/sshtest"
	"github.com/hpcproxy/hpcproxy/internal/testenv"
)

// TestDaemonForwards runs a per-job daemon with a local forward and an
// expose: both work, both are in the state file with counters, and both
// survive an sshd restart (the expose on the same port).
func TestDaemonForwards(t *testing.T) {
	sshd := sshtest.StartSSHD(t, sshtest.Options{})
	web := startWebServer(t)
	echo := startEchoServer(t)
	_, echoPort, _ := net.SplitHostPort(echo)
	statePath := filepath.Join(sshtest.PrivateTempDir(t), "proxy.json")
	r := startTestDaemon(t, &Daemon{
		Mode: ModePerJob,
		Tunnel: TunnelConfig{
			Destination: "sshtest", SSHConfigFile: sshd.SSHConfigFile,
			Methods:           []Method{MethodGoSSH},
			KeepaliveInterval: 300 * time.Millisecond, KeepaliveCountMax: 2,
			ConnectTimeout: 2 * time.Second,
		},
		StatePath:     statePath,
		MinBackoff:    50 * time.Millisecond,
		MaxBackoff:    500 * time.Millisecond,
		StatsInterval: 50 * time.Millisecond,
		Forwards:      []ForwardSpec{{Listen: "127.0.0.1:0", Remote: "localhost:" + echoPort}},
		Exposes:       []ExposeSpec{{Local: strings.TrimPrefix(web.URL, "http://")}},
	})
	_ = r
	st, err := ReadPidFileAt(statePath)
	require.NoError(t, err)
	require.Len(t, st.Forwards, 2)
	local, expose := st.Forwards[0], st.Forwards[1]
	assert.Equal(t, ForwardLocal, local.Kind)
	assert.Equal(t, ForwardReverse, expose.Kind)
	assert.Equal(t, ForwardUp, expose.Status)
	_, rport, err := net.SplitHostPort(expose.Listen)
	require.NoError(t, err)
	assert.NotEqual(t, "0", rport)
	assert.Equal(t, "ssh -N -L "+rport+":127.0.0.1:"+rport+" sshtest", sshdest.ForwardHint(st.Via, expose.Listen, 0))

	assert.Equal(t, "ping", fwdEcho(t, "tcp", local.Listen, "ping"))
	assert.Equal(t, "hello /lab", httpGet(t, "http://"+expose.Listen+"/lab"))
	require.Eventually(t, func() bool {
		st, err := ReadPidFileAt(statePath)
		return err == nil && len(st.Forwards) == 2 && st.Forwards[0].BytesOut == 4 && st.Forwards[1].BytesOut > 0 &&
			st.Forwards[1].Total == 1
	}, 10*time.Second, 20*time.Millisecond, "counters never reached the state file")

	sshd.Stop()
	require.Eventually(t, func() bool {
		st, err := ReadPidFileAt(statePath)
		return err == nil && st.Status == StatusReconnecting
	}, 20*time.Second, 20*time.Millisecond)
	sshd.Start(t)
	require.Eventually(t, func() bool {
		st, err := ReadPidFileAt(statePath)
		return err == nil && st.Status == StatusUp && len(st.Forwards) == 2 && st.Forwards[1].Status == ForwardUp
	}, 30*time.Second, 20*time.Millisecond, "expose did not come back")
	st, err = ReadPidFileAt(statePath)
	require.NoError(t, err)
	assert.Equal(t, expose.Listen, st.Forwards[1].Listen, "same remote port after the reconnect")
	assert.Equal(t, "hello /again", httpGet(t, "http://"+expose.Listen+"/again"))
	assert.Equal(t, "pong", fwdEcho(t, "tcp", local.Listen, "pong"))
}

// TestDaemonExposeRefused: sshd refusing the remote listener is a start-up
// error, reported to the parent.
func TestDaemonExposeRefused(t *testing.T) {
	sshd := sshtest.StartSSHD(t, sshtest.Options{Config: []string{"AllowTcpForwarding=no"}})
	statePath := filepath.Join(sshtest.PrivateTempDir(t), "proxy.json")
	r := runTestDaemon(t, &Daemon{
		Mode: ModePerJob,
		Tunnel: TunnelConfig{
			Destination: "sshtest", SSHConfigFile: sshd.SSHConfigFile, Methods: []Method{MethodGoSSH},
		},
		StatePath: statePath,
		Exposes:   []ExposeSpec{{Local: "127.0.0.1:8888"}},
	})
	select {
	case msg := <-r.report:
		assert.Contains(t, msg, "refused to listen")
	case <-time.After(30 * time.Second):
		t.Fatal("no report")
	}
	<-r.exited
	require.ErrorIs(t, r.err, ErrProhibited)
}

func TestParseSpecs(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want ForwardSpec
		err  bool
	}{
		{in: "5432=db:5432", want: ForwardSpec{"5432", "db:5432"}},
		{in: "0.0.0.0:5432=db:5432", want: ForwardSpec{"0.0.0.0:5432", "db:5432"}},
		{in: "/tmp/x/db.sock=db:5432", want: ForwardSpec{"/tmp/x/db.sock", "db:5432"}},
		{in: "5432", err: true},
		{in: "5432=db", err: true},
		{in: "x=db:1", err: true},
	} {
		got, err := ParseForwardSpec(tc.in)
		if tc.err {
			assert.Error(t, err, tc.in)
			continue
		}
		require.NoError(t, err, tc.in)
		assert.Equal(t, tc.want, got, tc.in)
	}
	for _, tc := range []struct {
		in   string
		want ExposeSpec
		err  bool
	}{
		{in: "8888", want: ExposeSpec{Local: "127.0.0.1:8888"}},
		{in: "node1:8888=9999", want: ExposeSpec{Local: "node1:8888", Remote: "127.0.0.1:9999"}},
		{in: "8888=/home/u/.jupyter.sock", want: ExposeSpec{Local: "127.0.0.1:8888", Remote: "/home/u/.jupyter.sock"}},
		{in: "jupyter", err: true},
	} {
		got, err := ParseExposeSpec(tc.in)
		if tc.err {
			assert.Error(t, err, tc.in)
			continue
		}
		require.NoError(t, err, tc.in)
		assert.Equal(t, tc.want, got, tc.in)
	}
}

// TestDaemonForwardUnixSocket: a per-job daemon's --forward on a unix
// socket admits its owner (SO_PEERCRED) and refuses another user, even one
// the socket's mode lets in.
func TestDaemonForwardUnixSocket(t *testing.T) {
	sshd := sshtest.StartSSHD(t, sshtest.Options{})
	echo := startEchoServer(t)
	statePath := filepath.Join(sshtest.PrivateTempDir(t), "proxy.json")
	sock := otherUserSocketPath(t)
	startTestDaemon(t, &Daemon{
		Mode: ModePerJob,
		Tunnel: TunnelConfig{
			Destination: "sshtest", SSHConfigFile: sshd.SSHConfigFile, Methods: []Method{MethodGoSSH},
		},
		StatePath:     statePath,
		StatsInterval: 50 * time.Millisecond,
		Forwards:      []ForwardSpec{{Listen: sock, Remote: echo}},
	})
	fi, err := os.Lstat(sock)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm(), "socket mode")

	assert.Equal(t, "owner", fwdEcho(t, "unix", sock, "owner"), "the owner is refused")
	forwardTotal := func() int64 {
		st, err := ReadPidFileAt(statePath)
		if err != nil || len(st.Forwards) != 1 {
			return -1
		}
		return st.Forwards[0].Total
	}
	require.Eventually(t, func() bool { return forwardTotal() == 1 }, 10*time.Second, 20*time.Millisecond)

	t.Run("other user", func(t *testing.T) {
		testenv.RequireRoot(t)
		socat := testenv.LookPath(t, "socat")
		require.NoError(t, os.Chmod(sock, 0o666)) // only the peer check stands in the way
		cmd := exec.Command(socat, "-t", "5", "-T", "10", "-", "UNIX-CONNECT:"+sock)
		cmd.Env = []string{}
		cmd.Stdin = strings.NewReader("intruder")
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 48213, Gid: 48213}}
		var stdout, stderr strings.Builder
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		err := cmd.Run()
		// socat connected (no "Permission denied": the mode let it in), and
		// the echo server never saw it: nothing came back.
		assert.NotContains(t, stderr.String(), "ermission denied", "socat could not connect: %v", err)
		assert.Empty(t, stdout.String(), "another user's connection was forwarded (socat: %v %s)", err, stderr.String())
		time.Sleep(200 * time.Millisecond) // several stats intervals
		assert.Equal(t, int64(1), forwardTotal(), "another user's connection was forwarded")
	})
}
