package hpcproxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
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

func init() {
	helpers["daemon"] = daemonProcessHelper
}

// daemonProcessHelper is a real Daemon in a process of its own, as
// StartDaemon starts one: the fds it inherited, SIGTERM to stop. Without
// HELPER_VIA it is a shared daemon relaying directly; with it a per-job
// daemon tunnelling through HELPER_VIA (HELPER_SSH_CONFIG, HELPER_METHODS).
// Its state file is HELPER_STATE.
func daemonProcessHelper() int {
	fds := daemonproc.InheritedFds()
	d := &Daemon{
		Mode:       ModeShared,
		ListenHost: "127.0.0.1",
		StatePath:  os.Getenv("HELPER_STATE"),
		ReportFd:   fds.Report,
		ExitFd:     fds.Exit,
		Logger:     slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
	if via := os.Getenv("HELPER_VIA"); via != "" {
		d.Mode = ModePerJob
		d.Tunnel = TunnelConfig{Destination: via, SSHConfigFile: os.Getenv("HELPER_SSH_CONFIG")}
		if m := os.Getenv("HELPER_METHODS"); m != "" {
			var ms Methods
			if err := ms.Set(m); err != nil {
				_ = daemonproc.ReportError(fds.Report, err)
				return 1
			}
			d.Tunnel.Methods = ms
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	if err := d.Run(ctx); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Fprintln(os.Stderr, "daemon helper: clean exit")
	return 0
}

// startDaemonProcess starts daemonProcessHelper with StartDaemon and
// returns it with its state file, once it is ready.
func startDaemonProcess(t *testing.T, exitPipe bool, env ...string) (*daemonproc.Process, string) {
	t.Helper()
	state := filepath.Join(sshtest.PrivateTempDir(t), "proxy.json")
	d, err := daemonproc.Start(context.Background(), daemonproc.Options{
		Cmd:      helperCommand("daemon", append(env, "HELPER_STATE="+state)...),
		LogFile:  LogFilePath(state),
		Timeout:  60 * time.Second,
		ExitPipe: exitPipe,
	})
	require.NoError(t, err, "daemonproc.Start")
	t.Cleanup(func() {
		_ = d.Stop(2 * time.Second)
		if t.Failed() {
			b, _ := os.ReadFile(d.LogFile())
			t.Logf("daemon log:\n%s", b)
		}
	})
	ps, err := ReadPidFileAt(state)
	require.NoError(t, err, "state file of a ready daemon")
	require.Equal(t, d.PID(), ps.PID)
	require.Equal(t, StatusUp, ps.Status)
	return d, state
}

// waitExit waits up to 10s for d to exit and returns its exit error.
func waitExit(t *testing.T, d *daemonproc.Process, why string) error {
	t.Helper()
	select {
	case <-d.Done():
		return d.Wait()
	case <-time.After(10 * time.Second):
		t.Fatalf("daemon still running 10s after %s", why)
		return nil
	}
}

// TestDaemonProcessExitPipe runs the real Daemon in a process of its own
// with an exit pipe: closing the pipe stops it cleanly and its state file
// goes with it.
func TestDaemonProcessExitPipe(t *testing.T) {
	d, state := startDaemonProcess(t, true)
	select {
	case <-d.Done():
		t.Fatal("daemon exited with its exit pipe still open")
	case <-time.After(200 * time.Millisecond):
	}
	require.NoError(t, d.CloseExit())
	require.NoError(t, waitExit(t, d, "its exit pipe closed"), "exit status")
	_, err := os.Stat(state)
	assert.True(t, errors.Is(err, os.ErrNotExist), "state file left behind: %v", err)
	b, _ := os.ReadFile(d.LogFile())
	assert.Contains(t, string(b), "exit pipe closed")
}

// pipeFd returns the read end of a new pipe as a bare descriptor (as a
// daemon inherits it, owned by no *os.File) and the write end.
func pipeFd(t *testing.T) (int, *os.File) {
	t.Helper()
	r, w, err := os.Pipe()
	require.NoError(t, err)
	fd, err := syscall.Dup(int(r.Fd()))
	r.Close()
	require.NoError(t, err)
	t.Cleanup(func() { w.Close() })
	return fd, w
}

// TestDaemonStartingState holds a daemon between its tunnel coming up and
// readiness: its expose waits for a login node that never answers the
// tcpip-forward request. Meanwhile the state file already names the bound
// port and says "starting", so status and stop find a live daemon rather
// than a stale one. Closing the exit pipe then stops the daemon at once,
// before it was ever ready, and its state file goes.
func TestDaemonStartingState(t *testing.T) {
	srv := sshtest.StartServer(t)
	srv.StallGlobalRequests(true)
	statePath := filepath.Join(sshtest.PrivateTempDir(t), "proxy.json")
	exitFd, exitW := pipeFd(t)
	r := runTestDaemon(t, &Daemon{
		Mode: ModePerJob,
		Tunnel: TunnelConfig{
			Destination: "sshtest", SSHConfigFile: srv.SSHConfigFile,
			Methods: []Method{MethodGoSSH}, KeepaliveInterval: -1,
		},
		StatePath: statePath,
		Exposes:   []ExposeSpec{{Local: "127.0.0.1:9"}},
		ExitFd:    exitFd,
	})

	// The tunnel is up (its method is recorded); the expose hangs.
	var st *ProxyState
	require.Eventually(t, func() bool {
		var err error
		st, err = ReadPidFileAt(statePath)
		return err == nil && st.Method == "gossh"
	}, 20*time.Second, 10*time.Millisecond, "the tunnel never came up")
	assert.Equal(t, StatusStarting, st.Status, "not ready yet")
	require.NotZero(t, st.Port, "the bound port is recorded before readiness")
	assert.True(t, proxyAlive("127.0.0.1", st.Port), "the recorded port is the listener's")
	assert.Equal(t, VerdictAlive, CheckState(st))
	v, err := RemoveStaleState(statePath)
	require.NoError(t, err)
	assert.Equal(t, VerdictAlive, v)
	_, err = os.Stat(statePath)
	require.NoError(t, err, "a starting daemon's state file was removed as stale")
	select {
	case msg := <-r.report:
		t.Fatalf("reported %q before the expose was up", msg)
	default:
	}

	start := time.Now()
	require.NoError(t, exitW.Close())
	select {
	case <-r.exited:
	case <-time.After(10 * time.Second):
		t.Fatal("daemon still starting 10s after its exit pipe closed")
	}
	assert.Less(t, time.Since(start), 5*time.Second)
	assert.NoError(t, r.err, "a requested stop is not an error")
	assert.Contains(t, <-r.report, "stopped before it was ready")
	_, err = os.Stat(statePath)
	assert.True(t, errors.Is(err, os.ErrNotExist), "state file left behind: %v", err)
}

// sshWrapper returns an ssh client program like a site's wrapper script:
// it runs ssh as its child instead of exec'ing it, so it holds every
// descriptor it inherited for as long as ssh runs (ssh itself closes
// them).
func sshWrapper(t *testing.T) string {
	t.Helper()
	realSSH := testenv.LookPath(t, "ssh")
	bin := filepath.Join(t.TempDir(), "ssh-wrapper")
	script := `#!/bin/sh
` + realSSH + ` "$@" &
pid=$!
trap 'kill -TERM $pid' TERM INT
wait $pid
st=$?
[ $st -gt 128 ] && wait $pid
exit $st
`
	require.NoError(t, os.WriteFile(bin, []byte(script), 0o700))
	return bin
}

// TestDaemonReportFdNotInherited gives the daemon a report fd that is not
// close-on-exec, as a daemon given --report-fd inherits it, and a tunnel
// that keeps an ssh child (through a wrapper that holds its descriptors)
// running: the parent still sees EOF on the pipe once the daemon is
// ready, because the child did not inherit it.
func TestDaemonReportFdNotInherited(t *testing.T) {
	sshd := sshtest.StartSSHD(t, sshtest.Options{})
	statePath := filepath.Join(sshtest.PrivateTempDir(t), "proxy.json")
	r := runTestDaemon(t, &Daemon{
		Mode: ModePerJob,
		Tunnel: TunnelConfig{
			Destination: "sshtest", SSHConfigFile: sshd.SSHConfigFile,
			Methods: []Method{MethodSOCKSUnix}, SSHBinary: sshWrapper(t),
		},
		StatePath: statePath,
	})
	select {
	case msg := <-r.report:
		require.Equal(t, daemonproc.ReadyLine, msg)
	case <-r.exited:
		t.Fatalf("daemon exited: %v", r.err)
	case <-time.After(20 * time.Second):
		st, _ := ReadPidFileAt(statePath)
		t.Fatalf("no EOF on the report pipe within 20s (state %+v): the ssh child holds it", st)
	}
	st, err := ReadPidFileAt(statePath)
	require.NoError(t, err)
	assert.Equal(t, StatusUp, st.Status)
	assert.Equal(t, "socks-unix", st.Method, "an ssh child runs")
}

func TestDaemonRuntimeDirPaths(t *testing.T) {
	uidDir := "/tmp/hpcproxy-" + strconv.Itoa(os.Getuid())
	long := "/scratch/" + strings.Repeat("x", 60) + "/proxy-7.json"
	for _, tc := range []struct {
		name, state string
		mode        Mode
		wantPrefix  string
	}{
		{"per-job beside the state file", "/tmp/hpcproxy-1000/proxy-7.json", ModePerJob, "/tmp/hpcproxy-1000/proxy-7.run"},
		{"shared node-local", "/home/u/.local/share/hpcproxy/proxy.json", ModeShared, filepath.Join(localStateDir(), "shared-")},
		{"too long", long, ModePerJob, uidDir + "/"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := daemonRuntimeDir(tc.mode, tc.state)
			assert.True(t, strings.HasPrefix(got, tc.wantPrefix), "got %s, want %s...", got, tc.wantPrefix)
			assert.LessOrEqual(t, len(got), maxRuntimeDir, "%s too long for sockets", got)
			assert.Equal(t, got, daemonRuntimeDir(tc.mode, tc.state), "stable")
		})
	}
	assert.NotEqual(t, daemonRuntimeDir(ModeShared, "/a/proxy.json"), daemonRuntimeDir(ModeShared, "/b/proxy.json"),
		"two shared daemons with different state files share no socket dir")
}

// TestDaemonSocketsBesideState runs per-job daemons whose tunnel methods
// keep unix sockets, in a job whose TMPDIR does not exist on the node (as
// Slurm passes the submitter's on): the sockets live in a private
// directory beside the state file (or under /tmp/hpcproxy-UID when that
// path would be too long for a socket), which goes when the daemon stops.
func TestDaemonSocketsBesideState(t *testing.T) {
	sshd := sshtest.StartSSHD(t, sshtest.Options{})
	web := startWebServer(t)
	for _, tc := range []struct {
		name   string
		method Method
		long   bool
	}{
		{"socks-unix", MethodSOCKSUnix, false},
		{"controlmaster", MethodControlMaster, false},
		{"socks-unix long state path", MethodSOCKSUnix, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := sshtest.PrivateTempDir(t)
			if tc.long {
				dir = filepath.Join(dir, strings.Repeat("d", 70))
			}
			statePath := filepath.Join(dir, "proxy-42.json")
			runDir := daemonRuntimeDir(ModePerJob, statePath)
			if tc.long {
				require.True(t, strings.HasPrefix(runDir, "/tmp/hpcproxy-"), "fallback %s", runDir)
			} else {
				require.Equal(t, filepath.Join(dir, "proxy-42.run"), runDir)
			}
			t.Setenv("TMPDIR", "/nonexistent/submit-host-tmp")
			r := startTestDaemon(t, &Daemon{
				Mode: ModePerJob,
				Tunnel: TunnelConfig{
					Destination: "sshtest", SSHConfigFile: sshd.SSHConfigFile,
					Methods: []Method{tc.method},
				},
				StatePath: statePath,
			})
			code, _ := getVia(t, "http://"+r.addr, web.URL+"/x")
			assert.Equal(t, 200, code)
			fi, err := os.Stat(runDir)
			require.NoError(t, err, "runtime dir")
			assert.Equal(t, os.FileMode(0o700), fi.Mode().Perm())
			socks, _ := filepath.Glob(filepath.Join(runDir, "*.sock"))
			assert.Len(t, socks, 1, "the tunnel's socket is in the runtime dir")

			r.stop(t)
			require.NoError(t, r.err)
			_, err = os.Stat(runDir)
			assert.True(t, errors.Is(err, os.ErrNotExist), "runtime dir left behind: %v", err)
		})
	}
}

// processGone reports whether pid has exited (no process, or a zombie).
func processGone(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return true
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i >= 0 && i+2 < len(s) && s[i+2] == 'Z'
}

// TestDaemonProcessSIGTERM stops a real daemon process whose tunnel runs an
// ssh child and keeps sockets (controlmaster, socks-unix) with SIGTERM: it
// exits cleanly, its ssh child is gone, and so are its state file and its
// runtime socket dir.
func TestDaemonProcessSIGTERM(t *testing.T) {
	sshd := sshtest.StartSSHD(t, sshtest.Options{})
	for _, method := range []string{"controlmaster", "socks-unix"} {
		t.Run(method, func(t *testing.T) {
			d, state := startDaemonProcess(t, false,
				"HELPER_VIA=sshtest", "HELPER_SSH_CONFIG="+sshd.SSHConfigFile, "HELPER_METHODS="+method)
			ps, err := ReadPidFileAt(state)
			require.NoError(t, err)
			require.Equal(t, method, ps.Method)
			runDir := daemonRuntimeDir(ModePerJob, state)
			socks, _ := filepath.Glob(filepath.Join(runDir, "*.sock"))
			require.Len(t, socks, 1, "the tunnel's socket in %s", runDir)
			children := sshtest.Descendants(d.PID())
			require.NotEmpty(t, children, "an ssh child runs")

			require.NoError(t, syscall.Kill(d.PID(), syscall.SIGTERM))
			require.NoError(t, waitExit(t, d, "SIGTERM"), "exit status after SIGTERM")
			for _, pid := range children {
				assert.True(t, processGone(pid), "child %d outlived the daemon", pid)
			}
			_, err = os.Stat(state)
			assert.True(t, errors.Is(err, os.ErrNotExist), "state file left behind: %v", err)
			_, err = os.Stat(runDir)
			assert.True(t, errors.Is(err, os.ErrNotExist), "runtime dir left behind: %v", err)
		})
	}
}

// TestDaemonLeavesTakenOverState: while a daemon runs, another daemon
// writes its own state over the file (NFS without working locks, or the
// file and its lock deleted). The first neither overwrites it with its
// counters nor removes it when it stops.
func TestDaemonLeavesTakenOverState(t *testing.T) {
	statePath := filepath.Join(sshtest.PrivateTempDir(t), "proxy.json")
	r := startTestDaemon(t, &Daemon{
		Mode: ModeShared, ListenHost: "127.0.0.1", StatePath: statePath, StatsInterval: 20 * time.Millisecond,
	})
	ours, err := ReadPidFileAt(statePath)
	require.NoError(t, err)
	theirs := ProxyState{Host: "login2", PID: 4242, Port: 2000, Mode: ModeShared, Status: StatusUp, Started: time.Now().UTC()}
	require.NoError(t, WritePidFileAt(statePath, theirs))
	before, err := os.ReadFile(statePath)
	require.NoError(t, err)

	// Traffic changes the counters, which the daemon would write.
	web := startWebServer(t)
	code, _ := getVia(t, ours.URL("http"), web.URL+"/")
	require.Equal(t, 200, code)
	time.Sleep(200 * time.Millisecond) // ten stats intervals
	after, err := os.ReadFile(statePath)
	require.NoError(t, err)
	assert.Equal(t, string(before), string(after), "the daemon overwrote another daemon's state")

	r.stop(t)
	require.NoError(t, r.err)
	after, err = os.ReadFile(statePath)
	require.NoError(t, err, "the daemon removed another daemon's state file")
	assert.Equal(t, string(before), string(after))
}
