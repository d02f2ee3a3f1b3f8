package hpcproxy

import (
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/hpcproxy/hpcproxy/internal/sshtest"
	"github.com/hpcproxy/hpcproxy/internal/testenv"
)

// TestDaemonControl starts a per-job daemon with no forwards and adds an
// expose and a local forward through its control socket: both work, are
// recorded in the state file, and asking again returns the same forward.
func TestDaemonControl(t *testing.T) {
	sshd := sshtest.StartSSHD(t, sshtest.Options{})
	web := startWebServer(t)
	echo := startEchoServer(t)
	stateDir := sshtest.PrivateTempDir(t)
	statePath := filepath.Join(stateDir, "proxy.json")
	r := startTestDaemon(t, &Daemon{
		Mode: ModePerJob,
		Tunnel: TunnelConfig{
			Destination: "sshtest", SSHConfigFile: sshd.SSHConfigFile, Methods: []Method{MethodGoSSH},
		},
		StatePath:     statePath,
		StatsInterval: time.Hour, // the state file must be updated by the additions themselves
	})
	sock := ControlSocketPath(statePath)
	assert.Equal(t, filepath.Join(stateDir, "proxy.sock"), sock)
	fi, err := os.Lstat(sock)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm(), "control socket mode")

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	local := strings.TrimPrefix(web.URL, "http://")
	exp, err := AddExpose(ctx, statePath, ExposeSpec{Local: local})
	require.NoError(t, err)
	assert.Equal(t, ForwardReverse, exp.Kind)
	assert.Equal(t, ForwardUp, exp.Status)
	assert.Equal(t, local, exp.Target)
	_, rport, err := net.SplitHostPort(exp.Listen)
	require.NoError(t, err)
	assert.NotEqual(t, "0", rport, "the port sshd chose")
	assert.Equal(t, "hello /added", httpGet(t, "http://"+exp.Listen+"/added"))

	lport := sshtest.FreePort(t)
	fwd, err := AddForward(ctx, statePath, ForwardSpec{Listen: "127.0.0.1:" + itoa(lport), Remote: echo})
	require.NoError(t, err)
	assert.Equal(t, ForwardLocal, fwd.Kind)
	assert.Equal(t, "127.0.0.1:"+itoa(lport), fwd.Listen)
	assert.Equal(t, "added", fwdEcho(t, "tcp", fwd.Listen, "added"))

	// Both are in the state file at once, not at the next stats refresh.
	require.Eventually(t, func() bool {
		st, err := ReadPidFileAt(statePath)
		return err == nil && len(st.Forwards) == 2 && st.Forwards[0].Listen == fwd.Listen && st.Forwards[1].Listen == exp.Listen
	}, 10*time.Second, 20*time.Millisecond, "the additions never reached the state file")

	// Asking again returns the same forwards; a clash is an error.
	again, err := AddExpose(ctx, statePath, ExposeSpec{Local: local})
	require.NoError(t, err)
	assert.Equal(t, exp.Listen, again.Listen)
	againFwd, err := AddForward(ctx, statePath, ForwardSpec{Listen: itoa(lport), Remote: echo})
	require.NoError(t, err)
	assert.Equal(t, fwd.Listen, againFwd.Listen)
	_, err = AddForward(ctx, statePath, ForwardSpec{Listen: itoa(lport), Remote: "db.internal:5432"})
	assert.ErrorContains(t, err, "address already in use")
	st, err := ReadPidFileAt(statePath)
	require.NoError(t, err)
	assert.Len(t, st.Forwards, 2, "a refused or repeated request added a forward")

	// Another user, even one the socket's mode lets in, is refused.
	t.Run("other user", func(t *testing.T) {
		testenv.RequireRoot(t)
		socat := testenv.LookPath(t, "socat")
		require.NoError(t, os.Chmod(stateDir, 0o755))
		require.NoError(t, os.Chmod(sock, 0o666))
		cmd := exec.Command(socat, "-t", "5", "-T", "10", "-", "UNIX-CONNECT:"+sock)
		cmd.Env = []string{}
		cmd.Stdin = strings.NewReader(`{"op":"expose","spec":"127.0.0.1:22"}` + "\n")
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 48213, Gid: 48213}}
		var stdout, stderr strings.Builder
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		err := cmd.Run()
		assert.NotContains(t, stderr.String(), "ermission denied", "socat could not connect: %v", err)
		assert.Empty(t, stdout.String(), "another user got an answer")
		st, err := ReadPidFileAt(statePath)
		require.NoError(t, err)
		assert.Len(t, st.Forwards, 2, "another user added a forward")
		require.NoError(t, os.Chmod(stateDir, 0o700))
	})

	// The socket goes with the daemon.
	r.stop(t)
	_, err = os.Lstat(sock)
	assert.ErrorIs(t, err, os.ErrNotExist, "control socket left behind")
	_, err = AddForward(ctx, statePath, ForwardSpec{Listen: "0", Remote: echo})
	assert.ErrorContains(t, err, "control socket")
}

func itoa(n int) string { return strconv.Itoa(n) }

func TestParseControlRequest(t *testing.T) {
	for _, tc := range []struct {
		in      string
		forward *ForwardSpec
		expose  *ExposeSpec
		err     string
	}{
		{in: `{"op":"forward","spec":"5432=db:5432"}`, forward: &ForwardSpec{Listen: "5432", Remote: "db:5432"}},
		{in: `{"op":"expose","spec":"8888"}` + "\n", expose: &ExposeSpec{Local: "127.0.0.1:8888"}},
		{in: `{"op":"expose","spec":"8888=/home/u/j.sock"}`, expose: &ExposeSpec{Local: "127.0.0.1:8888", Remote: "/home/u/j.sock"}},
		{in: `{"op":"forward","spec":"5432"}`, err: "LOCAL=REMOTE"},
		{in: `{"op":"expose","spec":"jupyter"}`, err: "expose"},
		{in: `{"op":"stop"}`, err: "unknown op"},
		{in: `{"op":"expose","spec":"8888","extra":1}`, err: "unknown field"},
		{in: `{"op":"expose","spec":"8888"} {"op":"expose","spec":"9999"}`, err: "more than one"},
		{in: `not json`, err: "control request"},
		{in: ``, err: "control request"},
	} {
		cmd, err := parseControlRequest([]byte(tc.in))
		if tc.err != "" {
			assert.ErrorContains(t, err, tc.err, tc.in)
			continue
		}
		require.NoError(t, err, tc.in)
		assert.Equal(t, tc.forward, cmd.forward, tc.in)
		assert.Equal(t, tc.expose, cmd.expose, tc.in)
	}
}

// FuzzControlRequest: whatever a control client sends, the parser returns
// an error or exactly one valid spec.
func FuzzControlRequest(f *testing.F) {
	f.Add([]byte(`{"op":"forward","spec":"5432=db:5432"}`))
	f.Add([]byte(`{"op":"expose","spec":"8888=/home/u/j.sock"}` + "\n"))
	f.Add([]byte(`{"op":"expose","spec":"node1:8888=0.0.0.0:0"}`))
	f.Add([]byte(`{"op":"stop"}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		cmd, err := parseControlRequest(b)
		if err != nil {
			return
		}
		switch {
		case cmd.forward != nil && cmd.expose == nil:
			if _, err := ParseForwardSpec(cmd.forward.String()); err != nil {
				t.Fatalf("accepted forward %+v does not parse again: %v", *cmd.forward, err)
			}
		case cmd.expose != nil && cmd.forward == nil:
			if _, err := ParseExposeSpec(cmd.expose.String()); err != nil {
				t.Fatalf("accepted expose %+v does not parse again: %v", *cmd.expose, err)
			}
		default:
			t.Fatalf("parsed %q into %+v", b, cmd)
		}
	})
}

func TestSpecMatches(t *testing.T) {
	local := ForwardInfo{Kind: ForwardLocal, Listen: "127.0.0.1:5432", Target: "db:5432"}
	assert.True(t, ForwardSpec{Listen: "5432", Remote: "db:5432"}.Matches(local))
	assert.True(t, ForwardSpec{Listen: "127.0.0.1:0", Remote: "db:5432"}.Matches(local), "port 0: any port")
	assert.False(t, ForwardSpec{Listen: "5433", Remote: "db:5432"}.Matches(local))
	assert.False(t, ForwardSpec{Listen: "5432", Remote: "db:5433"}.Matches(local))
	assert.False(t, ForwardSpec{Listen: "0.0.0.0:5432", Remote: "db:5432"}.Matches(local))
	sock := ForwardInfo{Kind: ForwardLocal, Listen: "/tmp/x/db.sock", Target: "db:5432"}
	assert.True(t, ForwardSpec{Listen: "/tmp/x/db.sock", Remote: "db:5432"}.Matches(sock))
	assert.False(t, ForwardSpec{Listen: "/tmp/x/db.sock", Remote: "db:5432"}.Matches(local))

	rev := ForwardInfo{Kind: ForwardReverse, Listen: "127.0.0.1:40123", Target: "127.0.0.1:8888"}
	assert.True(t, ExposeSpec{Local: "127.0.0.1:8888"}.Matches(rev))
	assert.True(t, ExposeSpec{Local: "127.0.0.1:8888", Remote: "127.0.0.1:40123"}.Matches(rev))
	assert.True(t, ExposeSpec{Local: "127.0.0.1:8888", Remote: "127.0.0.1:0"}.Matches(rev))
	assert.False(t, ExposeSpec{Local: "127.0.0.1:8888", Remote: "127.0.0.1:9999"}.Matches(rev))
	assert.False(t, ExposeSpec{Local: "127.0.0.1:8889"}.Matches(rev))
	assert.False(t, ExposeSpec{Local: "127.0.0.1:8888"}.Matches(local), "a local forward is no expose")
	assert.False(t, ExposeSpec{Local: "127.0.0.1:8888", Remote: "/home/u/j.sock"}.Matches(rev))
}
