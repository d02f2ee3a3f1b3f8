package hpcproxy

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
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
	"golang.org/x/net/proxy"

	"github.com/hpcproxy/hpcproxy/internal/daemonproc"
	"github.com/hpcproxy/hpcproxy/internal/sshtest"
	"github.com/hpcproxy/hpcproxy/internal/testenv"
)

// daemonRun is a Daemon running in a goroutine of the test.
type daemonRun struct {
	d      *Daemon
	cancel context.CancelFunc
	exited chan struct{} // closed when Run returned; err is then set
	err    error
	report chan string // what the daemon wrote on its report pipe
	addr   string
}

// startTestDaemon runs d with a report pipe and waits for its report. It
// fails the test if the daemon does not report ready.
func startTestDaemon(t *testing.T, d *Daemon) *daemonRun {
	t.Helper()
	r := runTestDaemon(t, d)
	select {
	case msg := <-r.report:
		require.Equal(t, daemonproc.ReadyLine, msg, "daemon did not report ready")
	case <-r.exited:
		t.Fatalf("daemon exited before ready: %v", r.err)
	case <-time.After(60 * time.Second):
		t.Fatal("daemon did not report within 60s")
	}
	st, err := ReadPidFileAt(d.StatePath)
	require.NoError(t, err)
	r.addr = st.Addr()
	return r
}

// runTestDaemon starts d and returns at once.
func runTestDaemon(t *testing.T, d *Daemon) *daemonRun {
	t.Helper()
	pr, pw, err := os.Pipe()
	require.NoError(t, err)
	// The daemon closes its report fd itself: give it a descriptor that no
	// *os.File owns, as a daemon process inherits it.
	fd, err := syscall.Dup(int(pw.Fd()))
	require.NoError(t, err)
	pw.Close()
	d.ReportFd = fd
	ctx, cancel := context.WithCancel(context.Background())
	r := &daemonRun{d: d, cancel: cancel, exited: make(chan struct{}), report: make(chan string, 1)}
	go func() {
		b, _ := io.ReadAll(pr)
		pr.Close()
		r.report <- string(b)
	}()
	go func() {
		r.err = d.Run(ctx)
		close(r.exited)
	}()
	t.Cleanup(func() { r.stop(t) })
	return r
}

func (r *daemonRun) stop(t *testing.T) {
	t.Helper()
	r.cancel()
	select {
	case <-r.exited:
	case <-time.After(30 * time.Second):
		t.Error("daemon did not stop within 30s")
	}
}

func startWebServer(t *testing.T) *httptest.Server {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello %s", r.URL.Path)
	}))
	t.Cleanup(srv.Close)
	return srv
}

// getVia fetches target through proxyURL with a fresh Go client.
func getVia(t *testing.T, proxyURL, target string) (int, string) {
	t.Helper()
	pu, err := url.Parse(proxyURL)
	require.NoError(t, err)
	tr := &http.Transport{Proxy: http.ProxyURL(pu)}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr, Timeout: 30 * time.Second}).Get(target)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp.StatusCode, string(b)
}

func TestDaemonPerJob(t *testing.T) {
	sshd := sshtest.StartSSHD(t, sshtest.Options{})
	web := startWebServer(t)
	statePath := filepath.Join(sshtest.PrivateTempDir(t), "proxy.json")
	r := startTestDaemon(t, &Daemon{
		Mode:          ModePerJob,
		Tunnel:        TunnelConfig{Destination: "sshtest", SSHConfigFile: sshd.SSHConfigFile},
		StatePath:     statePath,
		StatsInterval: 100 * time.Millisecond,
	})

	st, err := ReadPidFileAt(statePath)
	require.NoError(t, err)
	assert.Equal(t, StatusUp, st.Status)
	assert.Equal(t, ModePerJob, st.Mode)
	assert.Equal(t, "gossh", st.Method)
	assert.Equal(t, os.Getpid(), st.PID)
	assert.Equal(t, "sshtest", st.Via)
	require.NotNil(t, st.Credentials)
	assert.NotEmpty(t, st.Credentials.Token)
	assert.True(t, strings.HasPrefix(r.addr, "127.0.0.1:"), "per-job listens on loopback, got %s", r.addr)
	fi, err := os.Stat(statePath)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm())

	// The owner gets through with the token, and without it (same UID on
	// loopback), over HTTP and SOCKS5.
	code, body := getVia(t, st.URL("http"), web.URL+"/with-token")
	assert.Equal(t, 200, code)
	assert.Equal(t, "hello /with-token", body)
	code, _ = getVia(t, "http://"+r.addr, web.URL+"/same-uid")
	assert.Equal(t, 200, code)
	code, _ = getVia(t, "socks5://"+r.addr, web.URL+"/socks")
	assert.Equal(t, 200, code)

	// Counters reach the state file (StatsInterval is 100ms here).
	require.Eventually(t, func() bool {
		st, err := ReadPidFileAt(statePath)
		return err == nil && st.Stats != nil && st.Stats.Total >= 3 && st.Stats.BytesOut > 0
	}, 5*time.Second, 50*time.Millisecond, "stats not refreshed in the state file")

	r.stop(t)
	require.NoError(t, r.err)
	_, err = os.Stat(statePath)
	assert.True(t, errors.Is(err, os.ErrNotExist), "state file left behind: %v", err)
}

func TestDaemonPerJobRefusesOtherUser(t *testing.T) {
	testenv.RequireRoot(t)
	curl := testenv.LookPath(t, "curl")
	sshd := sshtest.StartSSHD(t, sshtest.Options{})
	web := startWebServer(t)
	statePath := filepath.Join(sshtest.PrivateTempDir(t), "proxy.json")
	r := startTestDaemon(t, &Daemon{
		Mode:      ModePerJob,
		Tunnel:    TunnelConfig{Destination: "sshtest", SSHConfigFile: sshd.SSHConfigFile},
		StatePath: statePath,
	})
	runCurl := func(uid int, args ...string) string {
		cmd := exec.Command(curl, append([]string{"-q", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "20"}, args...)...)
		cmd.Env = []string{}
		if uid != 0 {
			cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(uid)}}
		}
		out, _ := cmd.Output()
		return string(out)
	}
	const otherUID = 48214
	assert.Equal(t, "200", runCurl(0, "-x", "http://"+r.addr, web.URL+"/"), "owner without token")
	assert.Equal(t, "407", runCurl(otherUID, "-x", "http://"+r.addr, web.URL+"/"), "another user without token")
	// SOCKS5 from another user offering no auth: method 0xFF, curl fails
	// without an HTTP status.
	assert.Equal(t, "000", runCurl(otherUID, "-x", "socks5h://"+r.addr, web.URL+"/"), "another user over SOCKS5")
}

func TestDaemonSharedRequiresToken(t *testing.T) {
	web := startWebServer(t)
	statePath := filepath.Join(sshtest.PrivateTempDir(t), "proxy.json")
	r := startTestDaemon(t, &Daemon{
		Mode:       ModeShared,
		ListenHost: "127.0.0.1",
		StatePath:  statePath,
	})
	st, err := ReadPidFileAt(statePath)
	require.NoError(t, err)
	assert.Equal(t, "direct", st.Method, "shared mode without a destination relays directly")

	code, body := getVia(t, "http://"+r.addr, web.URL+"/")
	assert.Equal(t, http.StatusProxyAuthRequired, code)
	assert.NotEmpty(t, body)
	code, _ = getVia(t, st.URL("http"), web.URL+"/")
	assert.Equal(t, 200, code)

	// SOCKS5 without credentials: no acceptable method (0xFF).
	c, err := net.Dial("tcp", r.addr)
	require.NoError(t, err)
	defer c.Close()
	_, err = c.Write([]byte{5, 1, 0})
	require.NoError(t, err)
	reply := make([]byte, 2)
	_, err = io.ReadFull(c, reply)
	require.NoError(t, err)
	assert.Equal(t, []byte{5, 0xFF}, reply)

	// With the token over SOCKS5 (x/net/proxy, RFC 1929).
	d, err := proxy.SOCKS5("tcp", r.addr, &proxy.Auth{User: st.Credentials.User, Password: st.Credentials.Token}, proxy.Direct)
	require.NoError(t, err)
	wc, err := d.Dial("tcp", strings.TrimPrefix(web.URL, "http://"))
	require.NoError(t, err)
	wc.Close()
}

// TestDaemonAdvertiseHost: a shared daemon told which host clients should
// dial records it, and the URLs handed to clients use it.
func TestDaemonAdvertiseHost(t *testing.T) {
	statePath := filepath.Join(sshtest.PrivateTempDir(t), "proxy.json")
	r := startTestDaemon(t, &Daemon{Mode: ModeShared, ListenHost: "127.0.0.1", StatePath: statePath, AdvertiseHost: "localhost"})
	st, err := ReadPidFileAt(statePath)
	require.NoError(t, err)
	assert.Equal(t, "localhost", st.AdvertiseHost)
	assert.Equal(t, "localhost:"+strconv.Itoa(st.Port), r.addr)
	assert.Contains(t, st.URL("http"), "@localhost:"+strconv.Itoa(st.Port))
	web := startWebServer(t)
	code, _ := getVia(t, st.URL("http"), web.URL+"/")
	assert.Equal(t, 200, code)
}

func TestDaemonSecondStartReportsRunning(t *testing.T) {
	statePath := filepath.Join(sshtest.PrivateTempDir(t), "proxy.json")
	first := startTestDaemon(t, &Daemon{Mode: ModeShared, ListenHost: "127.0.0.1", StatePath: statePath})
	second := runTestDaemon(t, &Daemon{Mode: ModeShared, ListenHost: "127.0.0.1", StatePath: statePath})
	msg := <-second.report
	<-second.exited
	require.ErrorIs(t, second.err, ErrAlreadyRunning)
	assert.Contains(t, msg, "already")
	// The first is untouched.
	st, err := ReadPidFileAt(statePath)
	require.NoError(t, err)
	assert.Equal(t, first.addr, st.Addr())
	assert.True(t, proxyAlive("127.0.0.1", st.Port))
}

func TestDaemonStartFailureReported(t *testing.T) {
	sshd := sshtest.StartSSHD(t, sshtest.Options{})
	sshd.Stop() // a login node that does not answer
	statePath := filepath.Join(sshtest.PrivateTempDir(t), "proxy.json")
	r := runTestDaemon(t, &Daemon{
		Mode: ModePerJob,
		Tunnel: TunnelConfig{
			Destination: "sshtest", SSHConfigFile: sshd.SSHConfigFile,
			Methods: []Method{MethodGoSSH, MethodSOCKSUnix}, ConnectTimeout: 5 * time.Second,
		},
		StatePath: statePath,
	})
	msg := <-r.report
	<-r.exited
	require.Error(t, r.err)
	assert.Contains(t, msg, "gossh")
	assert.Contains(t, msg, "socks-unix")
	assert.NotContains(t, msg, "READY")
	_, err := os.Stat(statePath)
	assert.True(t, errors.Is(err, os.ErrNotExist), "state file left behind after a failed start")
}

// TestDaemonReconnect stops the login node's sshd under a running daemon:
// the daemon stays up, records "reconnecting", answers new requests with
// 503 / SOCKS general failure, and serves again once sshd is back, within
// the backoff cap (plus one connection's setup) of its return.
func TestDaemonReconnect(t *testing.T) {
	sshd := sshtest.StartSSHD(t, sshtest.Options{})
	web := startWebServer(t)
	statePath := filepath.Join(sshtest.PrivateTempDir(t), "proxy.json")
	const (
		maxBackoff     = 500 * time.Millisecond
		connectTimeout = 2 * time.Second
		slack          = 2 * time.Second // a loaded 2-core machine, -race
	)
	r := startTestDaemon(t, &Daemon{
		Mode: ModePerJob,
		Tunnel: TunnelConfig{
			Destination: "sshtest", SSHConfigFile: sshd.SSHConfigFile,
			Methods:           []Method{MethodGoSSH},
			KeepaliveInterval: 300 * time.Millisecond, KeepaliveCountMax: 2,
			ConnectTimeout: connectTimeout,
		},
		StatePath:  statePath,
		MinBackoff: 50 * time.Millisecond,
		MaxBackoff: maxBackoff,
		DialGrace:  200 * time.Millisecond,
	})
	code, _ := getVia(t, "http://"+r.addr, web.URL+"/before")
	require.Equal(t, 200, code)

	sshd.Stop()
	require.Eventually(t, func() bool {
		st, err := ReadPidFileAt(statePath)
		return err == nil && st.Status == StatusReconnecting
	}, 20*time.Second, 50*time.Millisecond, "state file never said reconnecting")
	down := time.Now()

	code, body := getVia(t, "http://"+r.addr, web.URL+"/during")
	assert.Equal(t, http.StatusServiceUnavailable, code)
	assert.Contains(t, body, "reconnecting")

	c, err := net.Dial("tcp", r.addr)
	require.NoError(t, err)
	defer c.Close()
	_, err = c.Write([]byte{5, 1, 0, 5, 1, 0, 1, 127, 0, 0, 1, 0, 80})
	require.NoError(t, err)
	reply := make([]byte, 4)
	_, err = io.ReadFull(bufio.NewReader(c), reply)
	require.NoError(t, err)
	assert.Equal(t, []byte{5, 0, 5, 1}, reply, "SOCKS5: no-auth accepted, then general failure")

	// Long enough down for the backoff to reach its cap (50ms doubling to
	// 500ms takes under a second of failed attempts).
	time.Sleep(time.Until(down.Add(2 * time.Second)))
	sshd.Start(t)
	back := time.Now()
	require.Eventually(t, func() bool {
		st, err := ReadPidFileAt(statePath)
		return err == nil && st.Status == StatusUp && st.Reconnects == 1
	}, 20*time.Second, 10*time.Millisecond, "daemon did not reconnect")
	recovery := time.Since(back)
	t.Logf("reconnected %s after sshd was back", recovery.Round(time.Millisecond))
	assert.Less(t, recovery, maxBackoff+connectTimeout+slack, "reconnect not within the backoff cap")
	code, body = getVia(t, "http://"+r.addr, web.URL+"/after")
	assert.Equal(t, 200, code)
	assert.Equal(t, "hello /after", body)
	select {
	case <-r.exited:
		t.Fatalf("daemon exited during the outage: %v", r.err)
	default:
	}
}

func TestDaemonWatchPID(t *testing.T) {
	sleeper := exec.Command("sleep", "30")
	require.NoError(t, sleeper.Start())
	statePath := filepath.Join(sshtest.PrivateTempDir(t), "proxy.json")
	r := startTestDaemon(t, &Daemon{
		Mode: ModeShared, ListenHost: "127.0.0.1", StatePath: statePath, WatchPID: sleeper.Process.Pid,
	})
	_ = sleeper.Process.Kill()
	_ = sleeper.Wait()
	select {
	case <-r.exited:
		require.NoError(t, r.err)
	case <-time.After(10 * time.Second):
		t.Fatal("daemon outlived the watched process")
	}
	_, err := os.Stat(statePath)
	assert.True(t, errors.Is(err, os.ErrNotExist))
}

// TestDaemonMaxProcs checks the GOMAXPROCS a daemon sets: one thread in
// per-job mode, Go's default in shared mode, what MaxProcs says, and never
// over a GOMAXPROCS the user set.
func TestDaemonMaxProcs(t *testing.T) {
	for _, tc := range []struct {
		mode Mode
		max  int
		env  string
		want int
	}{
		{ModePerJob, 0, "", 1},
		{"", 0, "", 1}, // per-job is the default mode
		{ModeShared, 0, "", 0},
		{ModeShared, 3, "", 3},
		{ModePerJob, 2, "", 2},
		{ModePerJob, -1, "", 0},
		{ModePerJob, 0, "4", 0},
		{ModePerJob, 2, "4", 0},
	} {
		t.Setenv("GOMAXPROCS", tc.env)
		if tc.env == "" {
			os.Unsetenv("GOMAXPROCS")
		}
		d := &Daemon{Mode: tc.mode, MaxProcs: tc.max}
		if got := d.maxProcs(); got != tc.want {
			t.Errorf("mode %q, MaxProcs %d, GOMAXPROCS=%q: maxProcs() = %d, want %d", tc.mode, tc.max, tc.env, got, tc.want)
		}
	}
}
