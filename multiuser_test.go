package hpcproxy

import (
	"context"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/hpcproxy/hpcproxy/internal/daemonproc"
	"github.com/hpcproxy/hpcproxy/internal/sshtest"
	"github.com/hpcproxy/hpcproxy/internal/testenv"
)

// The multi-user suite: a second real, non-root user of this machine tries
// every way into a daemon (every protocol, every tunnel method, every
// feature) and is refused each time, while the owner gets through each
// time. It needs root, to create that user and act as it.

// otherUser is a second real account on this machine.
type otherUser struct {
	name     string
	home     string
	uid, gid uint32
}

// newOtherUser creates a throwaway non-root account, deleted when the test
// ends.
func newOtherUser(t *testing.T) otherUser {
	t.Helper()
	testenv.RequireRoot(t)
	for _, p := range []string{"useradd", "usermod", "userdel"} {
		testenv.LookPath(t, p)
	}
	name, home := throwawayUser(t)
	u, err := user.Lookup(name)
	require.NoError(t, err)
	uid, err := strconv.ParseUint(u.Uid, 10, 32)
	require.NoError(t, err)
	gid, err := strconv.ParseUint(u.Gid, 10, 32)
	require.NoError(t, err)
	require.NotZero(t, uid)
	return otherUser{name: name, home: home, uid: uint32(uid), gid: uint32(gid)}
}

// command returns cmd run as the user, with an environment of its own (no
// proxy variables, nothing of the owner's).
func (u otherUser) command(name string, args ...string) *exec.Cmd {
	cmd := exec.Command(name, args...)
	cmd.Env = []string{"HOME=" + u.home, "PATH=/usr/bin:/bin", "USER=" + u.name}
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: u.uid, Gid: u.gid}}
	return cmd
}

// proxyProtocols are the ways curl can use the proxy: SOCKS5 (names
// resolved by the proxy), SOCKS4a, HTTP CONNECT and plain HTTP.
var proxyProtocols = []struct {
	name   string
	scheme string
	args   []string
}{
	{"socks5", "socks5h", nil},
	{"socks4", "socks4a", nil},
	{"connect", "http", []string{"--proxytunnel"}},
	{"plain-http", "http", nil},
}

// curlVia fetches target through proxyURL with curl, as the user (nil:
// as this process), and reports whether the backend's answer came back.
func curlVia(t *testing.T, as *otherUser, proxyURL, target string, extra ...string) (bool, string) {
	t.Helper()
	args := append([]string{"-sS", "--max-time", "15", "--noproxy", "", "-x", proxyURL}, extra...)
	args = append(args, target)
	var cmd *exec.Cmd
	if as != nil {
		cmd = as.command("curl", args...)
	} else {
		cmd = exec.Command("curl", args...)
		cmd.Env = []string{"PATH=/usr/bin:/bin", "HOME=" + t.TempDir()}
	}
	out, err := cmd.CombinedOutput()
	return err == nil && strings.Contains(string(out), "hello from /secret"), string(out)
}

// requireProtocols checks every protocol against a proxy at addr: the
// owner (this process, with ownerAuth userinfo, "" for none) gets the
// backend's answer, the other user (with otherAuth) never does.
//
// SOCKS4 has no password: curl sends the URL's user name as the user ID,
// so the owner's SOCKS4 credentials are ownerToken alone.
func requireProtocols(t *testing.T, other otherUser, addr, ownerAuth, ownerToken, otherAuth, target string) {
	t.Helper()
	for _, p := range proxyProtocols {
		t.Run(p.name, func(t *testing.T) {
			auth := ownerAuth
			if p.name == "socks4" && ownerToken != "" {
				auth = ownerToken + "@"
			}
			ok, out := curlVia(t, nil, p.scheme+"://"+auth+addr, target, p.args...)
			assert.True(t, ok, "the owner was refused: %s", out)
			ok, out = curlVia(t, &other, p.scheme+"://"+otherAuth+addr, target, p.args...)
			assert.False(t, ok, "another user got through: %s", out)
			assert.NotContains(t, out, "hello from")
		})
	}
}

// secretBackend is the destination every test tries to reach.
func secretBackend(t *testing.T) string {
	return startBackend(t).URL + "/secret"
}

// TestMultiUserMethods: for every tunnel method, a per-job daemon lets its
// owner in on every protocol and refuses another user on every protocol.
// socks-tcp, whose `ssh -D` port any user could use, never starts.
func TestMultiUserMethods(t *testing.T) {
	other := newOtherUser(t)
	testenv.LookPath(t, "curl")
	sshd := sshtest.StartSSHD(t, sshtest.Options{})
	target := secretBackend(t)
	for _, m := range []Method{MethodGoSSH, MethodControlMaster, MethodSOCKSUnix, MethodExec} {
		t.Run(m.String(), func(t *testing.T) {
			statePath := filepath.Join(sshtest.PrivateTempDir(t), "proxy.json")
			r := startTestDaemon(t, &Daemon{
				Mode:      ModePerJob,
				Tunnel:    TunnelConfig{Destination: "sshtest", SSHConfigFile: sshd.SSHConfigFile, Methods: []Method{m}},
				StatePath: statePath,
			})
			requireProtocols(t, other, r.addr, "", "", "", target)
			// Nor can the other user read the token.
			out, err := other.command("cat", statePath).CombinedOutput()
			assert.Error(t, err, "another user read the state file: %s", out)
			assert.NotContains(t, string(out), "token")
		})
	}
	t.Run("socks-tcp", func(t *testing.T) {
		statePath := filepath.Join(sshtest.PrivateTempDir(t), "proxy.json")
		r := runTestDaemon(t, &Daemon{
			Mode:      ModePerJob,
			Tunnel:    TunnelConfig{Destination: "sshtest", SSHConfigFile: sshd.SSHConfigFile, Methods: []Method{MethodSOCKSTCP}},
			StatePath: statePath,
		})
		select {
		case <-r.exited:
		case <-time.After(60 * time.Second):
			t.Fatal("the daemon did not give up")
		}
		require.ErrorIs(t, r.err, ErrUnsafeMethod)
		assert.Contains(t, <-r.report, "no authentication")
		_, err := EstablishTunnel(context.Background(), TunnelConfig{Destination: "sshtest", SSHConfigFile: sshd.SSHConfigFile, Methods: []Method{MethodSOCKSTCP}})
		require.ErrorIs(t, err, ErrUnsafeMethod)
		assert.NotContains(t, DefaultMethods, MethodSOCKSTCP)
	})
}

// TestMultiUserShared: a shared daemon (reachable from the cluster, so it
// wants the token from everyone) lets its owner in with the token and
// refuses another user with none, a wrong one, or the user name alone.
func TestMultiUserShared(t *testing.T) {
	other := newOtherUser(t)
	testenv.LookPath(t, "curl")
	sshd := sshtest.StartSSHD(t, sshtest.Options{})
	target := secretBackend(t)
	statePath := filepath.Join(sshtest.PrivateTempDir(t), "proxy.json")
	r := startTestDaemon(t, &Daemon{
		Mode:       ModeShared,
		ListenHost: "127.0.0.1",
		Tunnel:     TunnelConfig{Destination: "sshtest", SSHConfigFile: sshd.SSHConfigFile, Methods: []Method{MethodGoSSH}},
		StatePath:  statePath,
	})
	st, err := ReadPidFileAt(statePath)
	require.NoError(t, err)
	c := st.Credentials
	require.NotNil(t, c)
	for name, auth := range map[string]string{
		"no token":    "",
		"wrong token": c.User + ":" + strings.Repeat("x", len(c.Token)) + "@",
		"user only":   c.User + "@",
	} {
		t.Run(name, func(t *testing.T) {
			requireProtocols(t, other, r.addr, c.User+":"+c.Token+"@", c.Token, auth, target)
		})
	}
	out, err := other.command("cat", statePath).CombinedOutput()
	assert.Error(t, err, "another user read the state file: %s", out)
	assert.NotContains(t, string(out), c.Token)
}

// TestMultiUserFeatures: a per-job daemon's local forward and control
// socket refuse another user (even where a socket's mode would let it
// in), and the daemon refuses to expose anything it serves itself, so
// that no user of the login node can reach it as its owner.
func TestMultiUserFeatures(t *testing.T) {
	other := newOtherUser(t)
	socat := testenv.LookPath(t, "socat")
	sshd := sshtest.StartSSHD(t, sshtest.Options{})
	echo := startEchoServer(t)
	web := startWebServer(t)
	statePath := filepath.Join(sshtest.PrivateTempDir(t), "proxy.json")
	require.NoError(t, os.Chmod(filepath.Dir(statePath), 0o711)) // the sockets' own modes and checks guard them
	r := startTestDaemon(t, &Daemon{
		Mode:          ModePerJob,
		Tunnel:        TunnelConfig{Destination: "sshtest", SSHConfigFile: sshd.SSHConfigFile, Methods: []Method{MethodGoSSH}},
		StatePath:     statePath,
		StatsInterval: 50 * time.Millisecond,
		Forwards:      []ForwardSpec{{Listen: "127.0.0.1:0", Remote: echo}},
	})
	st, err := ReadPidFileAt(statePath)
	require.NoError(t, err)
	require.Len(t, st.Forwards, 1)
	fwd := st.Forwards[0].Listen

	t.Run("forward", func(t *testing.T) {
		assert.Equal(t, "owner", fwdEcho(t, "tcp", fwd, "owner"))
		cmd := other.command(socat, "-t", "5", "-T", "10", "-", "TCP:"+fwd)
		cmd.Stdin = strings.NewReader("intruder")
		out, err := cmd.Output()
		assert.Empty(t, string(out), "another user's connection was forwarded (socat: %v)", err)
	})

	ctl := ControlSocketPath(statePath)
	t.Run("control socket", func(t *testing.T) {
		// Only the peer check stands in the way: the socket (which may sit
		// in a private directory behind a link) is opened up.
		// The daemon makes its state directory 0700 again whenever it
		// writes its state file (its counters change after the subtests
		// above), so the directory is opened up again and the connection
		// retried if a write came in between.
		real, err := filepath.EvalSymlinks(ctl)
		require.NoError(t, err)
		var out []byte
		var stderr strings.Builder
		for range 5 {
			require.NoError(t, os.Chmod(filepath.Dir(real), 0o711))
			require.NoError(t, os.Chmod(real, 0o666))
			cmd := other.command(socat, "-t", "5", "-T", "10", "-", "UNIX-CONNECT:"+ctl)
			cmd.Stdin = strings.NewReader(`{"op":"forward","spec":"127.0.0.1:0=` + echo + `"}` + "\n")
			stderr.Reset()
			cmd.Stderr = &stderr
			out, err = cmd.Output()
			if !strings.Contains(stderr.String(), "ermission denied") {
				break
			}
		}
		assert.NotContains(t, stderr.String(), "ermission denied", "socat could not connect: %v", err)
		assert.Empty(t, string(out), "another user got an answer from the control socket")
		st, err := ReadPidFileAt(statePath)
		require.NoError(t, err)
		assert.Len(t, st.Forwards, 1, "another user added a forward")
	})

	t.Run("expose", func(t *testing.T) {
		_, proxyPort, _ := net.SplitHostPort(r.addr)
		_, fwdPort, _ := net.SplitHostPort(fwd)
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		for _, local := range []string{
			"127.0.0.1:" + proxyPort, "localhost:" + proxyPort, "0.0.0.0:" + proxyPort,
			"127.0.0.1:" + fwdPort, ctl,
		} {
			_, err := AddExpose(ctx, statePath, ExposeSpec{Local: local})
			assert.ErrorContains(t, err, "refusing to expose the daemon's own listener", local)
		}
		// An ordinary service is exposed; what reaches the login node's
		// port is that service, not the proxy.
		fi, err := AddExpose(ctx, statePath, ExposeSpec{Local: strings.TrimPrefix(web.URL, "http://")})
		require.NoError(t, err)
		assert.Equal(t, "hello /lab", httpGet(t, "http://"+fi.Listen+"/lab"))
		require.Eventually(t, func() bool {
			st, err := ReadPidFileAt(statePath)
			return err == nil && len(st.Forwards) == 2
		}, 10*time.Second, 20*time.Millisecond, "the state file does not show exactly the forward and the one expose")
	})
}

// TestSelfDialedConnNotOwner: a connection the daemon opens itself (as a
// reverse forward does) comes from the owner's UID but is never trusted
// as the owner's: through a per-job daemon's trust check it must present
// the token like anyone else, while a connection of the same process
// opened otherwise is trusted.
func TestSelfDialedConnNotOwner(t *testing.T) {
	backend := startBackend(t)
	r := &running{}
	srv := &Server{Credentials: map[string]string{"u": "tok"}, TrustConn: r.ownerConn}
	addr := startServer(t, srv)
	req := "GET " + backend.URL + "/ok HTTP/1.1\r\n\r\n"

	resp := httpExchange(t, addr, req)
	require.Equal(t, 200, resp.code, "the owner's own connection: %s", resp.body)

	sock := filepath.Join(sshtest.PrivateTempDir(t), "s")
	uln, err := net.Listen("unix", sock)
	require.NoError(t, err)
	uDone := make(chan error, 1)
	go func() { uDone <- srv.Serve(uln) }()
	t.Cleanup(func() { srv.Close(); <-uDone })
	uc, err := net.Dial("unix", sock)
	require.NoError(t, err)
	_, err = uc.Write([]byte(req))
	require.NoError(t, err)
	require.Equal(t, 200, readResponse(t, uc).code, "the owner's own unix connection")
	uc.Close()

	for _, target := range []string{addr, "localhost:" + portString(t, addr), sock} {
		network := "tcp"
		if target == sock {
			network = "unix"
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		c, err := r.self.DialContext(ctx, network, target)
		cancel()
		require.NoError(t, err)
		_, err = c.Write([]byte(req))
		require.NoError(t, err)
		got := readResponse(t, c)
		c.Close()
		require.Equal(t, 407, got.code, "a connection the daemon opened itself was trusted (%s)", target)
	}
	// Closed conns are forgotten: their ports may be reused by the owner.
	require.Eventually(t, func() bool {
		r.self.mu.Lock()
		defer r.self.mu.Unlock()
		for a, sc := range r.self.conns {
			if sc.conn == nil || !connClosed(sc.conn) {
				t.Logf("still open: %v", a)
				return false
			}
		}
		return true
	}, 5*time.Second, 10*time.Millisecond)
}

func portString(t *testing.T, addr string) string {
	t.Helper()
	_, p, err := net.SplitHostPort(addr)
	require.NoError(t, err)
	return p
}

// TestSquattedStateDir: another user who creates hpcproxy-UID in the
// node's tmp dir first (or a look-alike fallback) does not stop a per-job
// daemon: it runs in a private hpcproxy-UID.XXXXXXXX beside it, where
// status finds it again.
func TestSquattedStateDir(t *testing.T) {
	other := newOtherUser(t)
	sshd := sshtest.StartSSHD(t, sshtest.Options{})
	tmp, err := os.MkdirTemp("", "squat") // reachable by the other user
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(tmp) })
	require.NoError(t, os.Chmod(tmp, 0o1777))
	t.Setenv(EnvTmpDir, tmp)
	primary := filepath.Join(tmp, "hpcproxy-"+strconv.Itoa(os.Getuid()))
	for _, p := range []string{primary, primary + ".0000"} {
		out, err := other.command("mkdir", "-m", "0700", p).CombinedOutput()
		require.NoError(t, err, "%s", out)
	}

	dir := localStateDir()
	require.NotEqual(t, primary, dir)
	require.True(t, strings.HasPrefix(dir, primary+"."), dir)
	require.NotEqual(t, primary+".0000", dir, "took the other user's look-alike")
	fi, err := os.Lstat(dir)
	require.NoError(t, err)
	require.True(t, fi.IsDir())
	require.Equal(t, os.FileMode(0o700), fi.Mode().Perm())
	require.Equal(t, dir, localStateDir(), "a second call made another directory")

	r := startTestDaemon(t, &Daemon{
		Mode:      ModePerJob,
		Tunnel:    TunnelConfig{Destination: "sshtest", SSHConfigFile: sshd.SSHConfigFile, Methods: []Method{MethodGoSSH}},
		StatePath: LocalPidFilePath(), // as perjob start finds it
	})
	st, err := ReadLocalPidFile()
	require.NoError(t, err)
	require.Equal(t, r.addr, st.Addr())
	require.True(t, strings.HasPrefix(LocalPidFilePath(), dir+"/"))
}

// TestDaemonErrorUnsafePath: a daemon that reports an unsafe state path
// gives an error that says so (errors.Is), so that the command line can
// point at this node rather than at the login node.
func TestDaemonErrorUnsafePath(t *testing.T) {
	err := error(&daemonproc.Error{Known: []error{ErrUnsafePath}, Reported: "hpcproxy: create state file: hpcproxy: unsafe state path: /tmp/x is owned by uid 5, not 0"})
	assert.ErrorIs(t, err, ErrUnsafePath)
	assert.NotErrorIs(t, &daemonproc.Error{Known: []error{ErrUnsafePath}, Reported: "hpcproxy: ssh: connection refused"}, ErrUnsafePath)
}
