package hpcproxy

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/hpcproxy/hpcproxy/internal/daemonproc"
	"github.com/hpcproxy/hpcproxy/internal/testenv"
)

func init() {
	// claim: claim HELPER_STATE, say "won" or "lost: ERR" on stdout, hold
	// the claim for HELPER_HOLD (default: until killed), release, exit.
	helpers["claim"] = func() int {
		c, err := claimStateFile(os.Getenv("HELPER_STATE"), ProxyState{Port: 1, Mode: ModePerJob})
		if err != nil {
			fmt.Printf("lost: %v\n", err)
			return 0
		}
		fmt.Println("won")
		if d, err := time.ParseDuration(os.Getenv("HELPER_HOLD")); err == nil {
			time.Sleep(d)
			c.Release()
			return 0
		}
		select {}
	}
}

func TestProxyStateJSON(t *testing.T) {
	creds, err := newProxyCredentials()
	require.NoError(t, err)
	ps := ProxyState{
		Host: "login1", Via: "alice@login1", Port: 8080, PID: 42,
		Mode: ModeShared, Method: "gossh", Status: StatusUp,
		Started:     time.Date(2026, 1, 2, 3, 4, 5, 6, time.UTC),
		Credentials: &creds,
	}
	b, err := json.Marshal(ps)
	require.NoError(t, err)
	var m map[string]any
	require.NoError(t, json.Unmarshal(b, &m))
	for _, k := range []string{"host", "via", "port", "pid", "mode", "method", "started", "status", "credentials"} {
		assert.Contains(t, m, k)
	}
	assert.NotContains(t, m, "status_since", "zero times are omitted")

	// Unknown fields (a newer daemon) are ignored.
	path := filepath.Join(t.TempDir(), "proxy.json")
	require.NoError(t, os.WriteFile(path, []byte(`{"host":"h","port":1,"pid":2,"future":{"x":1}}`), 0o600))
	got, err := ReadPidFileAt(path)
	require.NoError(t, err)
	assert.Equal(t, ProxyState{Host: "h", Port: 1, PID: 2}, *got)
}

func TestProxyStateURL(t *testing.T) {
	c := &ProxyCredentials{User: "hpcproxy", Token: "tok-EN_1"}
	for _, tc := range []struct {
		ps   ProxyState
		want string
	}{
		{ProxyState{Host: "login1", Port: 8080, Mode: ModeShared, Credentials: c}, "http://hpcproxy:tok-EN_1@login1:8080"},
		{ProxyState{Host: "node7", Port: 9000, Mode: ModePerJob, Credentials: c}, "http://hpcproxy:tok-EN_1@127.0.0.1:9000"},
		{ProxyState{Host: "login1", Port: 8080, AdvertiseHost: "10.0.0.1"}, "http://10.0.0.1:8080"},
		{ProxyState{Host: "::1", Port: 8080}, "http://[::1]:8080"},
	} {
		assert.Equal(t, tc.want, tc.ps.URL("http"))
	}
}

func TestProxyCredentials(t *testing.T) {
	a, err := newProxyCredentials()
	require.NoError(t, err)
	b, err := newProxyCredentials()
	require.NoError(t, err)
	assert.NotEqual(t, a.Token, b.Token)
	assert.Len(t, a.Token, 43)
	assert.Equal(t, credentialsUser, a.User)
	assert.True(t, a.Match(a.User, a.Token))
	assert.False(t, a.Match(a.User, b.Token))
	assert.False(t, a.Match("x", a.Token))
	assert.False(t, ProxyCredentials{}.Match("", ""), "empty credentials match nothing")
}

func TestWritePidFileAt(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "a", "hpcproxy")
	path := filepath.Join(dir, "proxy.json")
	ps := ProxyState{Host: "h", Via: "v", Port: 1234, PID: 99, Credentials: &ProxyCredentials{User: "u", Token: "t"}}
	require.NoError(t, WritePidFileAt(path, ps))

	fi, err := os.Stat(path)
	require.NoError(t, err)
	assert.Equal(t, fs.FileMode(0o600), fi.Mode().Perm(), "state file mode")
	di, err := os.Stat(dir)
	require.NoError(t, err)
	assert.Equal(t, fs.FileMode(0o700), di.Mode().Perm(), "state dir mode")

	got, err := ReadPidFileAt(path)
	require.NoError(t, err)
	assert.Equal(t, ps, *got)

	// Rewrites replace the file whole; no temporary files remain.
	ps.Port = 4321
	require.NoError(t, WritePidFileAt(path, ps))
	got, err = ReadPidFileAt(path)
	require.NoError(t, err)
	assert.Equal(t, 4321, got.Port)
	ents, _ := os.ReadDir(dir)
	assert.Len(t, ents, 1, "only proxy.json in %s", dir)

	_, err = ReadPidFileAt(filepath.Join(dir, "missing.json"))
	assert.ErrorIs(t, err, fs.ErrNotExist)
}

func TestReadPidFileAtUnsafe(t *testing.T) {
	dir := t.TempDir()
	target := filepath.Join(dir, "real.json")
	require.NoError(t, WritePidFileAt(target, ProxyState{Host: "h"}))
	link := filepath.Join(dir, "link.json")
	require.NoError(t, os.Symlink(target, link))
	_, err := ReadPidFileAt(link)
	assert.ErrorIs(t, err, ErrUnsafePath, "symlink")

	t.Run("foreign owner", func(t *testing.T) {
		testenv.RequireRoot(t)
		require.NoError(t, os.Chown(target, 4242, 4242))
		_, err := ReadPidFileAt(target)
		assert.ErrorIs(t, err, ErrUnsafePath)
	})
}

func TestEnsurePrivateDir(t *testing.T) {
	base := t.TempDir()

	t.Run("tightens readable", func(t *testing.T) {
		d := filepath.Join(base, "readable")
		require.NoError(t, os.Mkdir(d, 0o755))
		require.NoError(t, os.Chmod(d, 0o755))
		require.NoError(t, ensurePrivateDir(d))
		fi, _ := os.Stat(d)
		assert.Equal(t, fs.FileMode(0o700), fi.Mode().Perm())
	})
	t.Run("refuses writable by others", func(t *testing.T) {
		d := filepath.Join(base, "open")
		require.NoError(t, os.Mkdir(d, 0o777))
		require.NoError(t, os.Chmod(d, 0o777))
		err := ensurePrivateDir(d)
		assert.ErrorIs(t, err, ErrUnsafePath)
		assert.ErrorContains(t, err, "writable by others")
		require.NoError(t, WritePidFileAt(filepath.Join(base, "ok", "p.json"), ProxyState{}))
		assert.ErrorIs(t, WritePidFileAt(filepath.Join(d, "p.json"), ProxyState{}), ErrUnsafePath)
	})
	t.Run("refuses a file", func(t *testing.T) {
		f := filepath.Join(base, "file")
		require.NoError(t, os.WriteFile(f, nil, 0o600))
		assert.ErrorIs(t, ensurePrivateDir(f), ErrUnsafePath)
	})
	t.Run("accepts own symlink", func(t *testing.T) {
		real := filepath.Join(base, "real")
		require.NoError(t, os.Mkdir(real, 0o700))
		link := filepath.Join(base, "mine")
		require.NoError(t, os.Symlink(real, link))
		assert.NoError(t, ensurePrivateDir(link))
	})
	t.Run("refuses foreign owner", func(t *testing.T) {
		// An attacker pre-creates /tmp/hpcproxy-UID for us.
		testenv.RequireRoot(t)
		d := filepath.Join(base, "hpcproxy-0")
		require.NoError(t, os.Mkdir(d, 0o700))
		require.NoError(t, os.Chown(d, 4242, 4242))
		err := ensurePrivateDir(d)
		assert.ErrorIs(t, err, ErrUnsafePath)
		assert.ErrorContains(t, err, "owned by uid 4242")

		_, err = claimStateFile(filepath.Join(d, "proxy.json"), ProxyState{})
		assert.ErrorIs(t, err, ErrUnsafePath)
	})
	t.Run("refuses foreign symlink", func(t *testing.T) {
		testenv.RequireRoot(t)
		real := filepath.Join(base, "real2")
		require.NoError(t, os.Mkdir(real, 0o700))
		link := filepath.Join(base, "theirs")
		require.NoError(t, os.Symlink(real, link))
		require.NoError(t, os.Lchown(link, 4242, 4242))
		assert.ErrorIs(t, ensurePrivateDir(link), ErrUnsafePath)
	})
}

func TestStatePaths(t *testing.T) {
	tmp := t.TempDir()
	clearJobEnv(t)
	t.Setenv(EnvStateDir, "")
	t.Setenv("XDG_DATA_HOME", "/xdg")
	t.Setenv("HOME", "/home/alice")
	assert.Equal(t, "/xdg/hpcproxy/proxy.json", PidFilePath())
	t.Setenv("XDG_DATA_HOME", "relative/ignored")
	assert.Equal(t, "/home/alice/.local/share/hpcproxy/proxy.json", PidFilePath())
	t.Setenv(EnvStateDir, "/override")
	assert.Equal(t, "/override/proxy.json", PidFilePath())

	t.Setenv(EnvTmpDir, tmp)
	uid := fmt.Sprint(os.Getuid())
	assert.Equal(t, filepath.Join(tmp, "hpcproxy-"+uid, "proxy.json"), LocalPidFilePath())

	t.Setenv("SLURM_JOB_ID", "1234")
	t.Setenv("SLURMD_NODENAME", "node7")
	assert.Equal(t, filepath.Join(tmp, "hpcproxy-"+uid, "proxy-1234.json"), LocalPidFilePath())
	assert.Equal(t, filepath.Join(tmp, "hpcproxy-"+uid, "proxy-1234.log"), LogFilePath(LocalPidFilePath()))

}

func TestCheckStateVerdicts(t *testing.T) {
	var probes int
	c := stateChecker{
		hostname: func() string { return "here" },
		pidAlive: func(pid int) bool { return pid == 10 },
		probe:    func(host string, port int) bool { probes++; return port == 80 },
		tries:    3,
	}
	for _, tc := range []struct {
		name   string
		ps     ProxyState
		want   StateVerdict
		probes int
	}{
		{"alive", ProxyState{Host: "here", PID: 10, Port: 80, Status: StatusUp}, VerdictAlive, 1},
		{"dead pid", ProxyState{Host: "here", PID: 11, Port: 80}, VerdictDeadPID, 0},
		{"no pid", ProxyState{Host: "here", Port: 80}, VerdictDeadPID, 0},
		{"no answer after retries", ProxyState{Host: "here", PID: 10, Port: 81, Status: StatusUp}, VerdictNoAnswer, 3},
		{"starting, port not bound yet", ProxyState{Host: "here", PID: 10, Port: 81, Status: StatusStarting}, VerdictAlive, 0},
		{"other host answering", ProxyState{Host: "login1", PID: 11, Port: 80}, VerdictForeignAnswering, 1},
		{"other host silent: never stale", ProxyState{Host: "login1", PID: 11, Port: 81}, VerdictForeignUnknown, 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			probes = 0
			v := c.check(&tc.ps)
			assert.Equal(t, tc.want, v, "verdict %v", v)
			assert.Equal(t, tc.probes, probes, "probes")
		})
	}
	assert.True(t, VerdictDeadPID.Stale())
	assert.True(t, VerdictNoAnswer.Stale())
	assert.False(t, VerdictForeignUnknown.Stale())
	assert.False(t, VerdictForeignAnswering.Stale())
	assert.False(t, VerdictAlive.Stale())
}

// deadPID returns the PID of a process that has exited and been reaped.
func deadPID(t *testing.T) int {
	t.Helper()
	cmd := exec.Command("true")
	require.NoError(t, cmd.Run())
	return cmd.Process.Pid
}

// listen returns a loopback listener's port; the listener accepts and
// closes until the test ends.
func listenPort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	return ln.Addr().(*net.TCPAddr).Port
}

func TestCheckStateReal(t *testing.T) {
	port := listenPort(t)
	alive := ProxyState{Host: thisHost(), PID: os.Getpid(), Port: port, Mode: ModePerJob, Status: StatusUp}
	assert.Equal(t, VerdictAlive, CheckState(&alive))
	dead := alive
	dead.PID = deadPID(t)
	assert.Equal(t, VerdictDeadPID, CheckState(&dead))
	assert.True(t, proxyAlive("127.0.0.1", port))
}

// TestPIDAliveZombie: a process that has exited but is not reaped yet
// answers kill -0, yet it is not alive, and its state file is stale.
func TestPIDAliveZombie(t *testing.T) {
	sleeper := exec.Command("sleep", "60")
	require.NoError(t, sleeper.Start())
	pid := sleeper.Process.Pid
	defer sleeper.Wait()
	assert.True(t, daemonproc.PIDAlive(pid))
	require.NoError(t, sleeper.Process.Kill())
	require.Eventually(t, func() bool { return !daemonproc.PIDAlive(pid) }, 5*time.Second, 10*time.Millisecond, "a zombie counts as alive")
	require.NoError(t, syscall.Kill(pid, 0), "not reaped yet: kill -0 still succeeds")
	assert.Equal(t, VerdictDeadPID, CheckState(&ProxyState{Host: thisHost(), PID: pid, Port: 1, Status: StatusUp}))
	assert.True(t, daemonproc.PIDAlive(os.Getpid()))
	assert.False(t, daemonproc.PIDAlive(0))
	assert.False(t, daemonproc.PIDAlive(deadPID(t)))
}

func TestClaimStateFileConcurrent(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state", "proxy.json")
	const n = 8
	var (
		wg     sync.WaitGroup
		mu     sync.Mutex
		claims []*stateClaim
		errs   []error
	)
	start := make(chan struct{})
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			c, err := claimStateFile(path, ProxyState{Port: 1000, Mode: ModePerJob})
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				errs = append(errs, err)
			} else {
				claims = append(claims, c)
			}
		}()
	}
	close(start)
	wg.Wait()
	require.Len(t, claims, 1, "exactly one of %d concurrent claims wins; errors: %v", n, errs)
	for _, err := range errs {
		assert.ErrorIs(t, err, ErrAlreadyRunning)
	}
	c := claims[0]
	ps, err := ReadPidFileAt(path)
	require.NoError(t, err)
	assert.Equal(t, os.Getpid(), ps.PID)
	assert.Equal(t, thisHost(), ps.Host)
	assert.Equal(t, StatusStarting, ps.Status)
	assert.False(t, ps.Started.IsZero())

	// A second start while the first runs reports the running one.
	_, err = claimStateFile(path, ProxyState{})
	var are *AlreadyRunningError
	require.ErrorAs(t, err, &are)
	require.NotNil(t, are.State)
	assert.Equal(t, os.Getpid(), are.State.PID)

	// Update, then Release removes the file and frees the scope.
	up := c.State()
	up.Status, up.Method = StatusUp, "gossh"
	require.NoError(t, c.Update(up))
	ps, err = ReadPidFileAt(path)
	require.NoError(t, err)
	assert.Equal(t, StatusUp, ps.Status)
	assert.True(t, ps.StatusSince.After(up.Started) || ps.StatusSince.Equal(up.Started))
	require.NoError(t, c.Release())
	require.NoError(t, c.Release(), "Release is idempotent")
	assert.Error(t, c.Update(up), "Update after Release")
	_, err = os.Stat(path)
	assert.ErrorIs(t, err, fs.ErrNotExist)

	c2, err := claimStateFile(path, ProxyState{})
	require.NoError(t, err)
	require.NoError(t, c2.Release())
}

// TestStateClaimTakenOver: another daemon has written its state over ours
// (NFS without working locks, or the file and its lock deleted under us):
// Update does not overwrite it, and Release leaves it in place.
func TestStateClaimTakenOver(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state", "proxy.json")
	c, err := claimStateFile(path, ProxyState{Port: 1000, Mode: ModeShared})
	require.NoError(t, err)
	t.Cleanup(func() { c.Release() })

	theirs := ProxyState{Host: "login2", PID: 4242, Port: 2000, Mode: ModeShared, Status: StatusUp, Started: time.Now().UTC()}
	require.NoError(t, WritePidFileAt(path, theirs))
	before, err := os.ReadFile(path)
	require.NoError(t, err)

	up := c.State()
	up.Status = StatusUp
	err = c.Update(up)
	require.ErrorIs(t, err, errStateTakenOver)
	assert.Contains(t, err.Error(), "pid 4242 on login2")
	require.NoError(t, c.Release())
	after, err := os.ReadFile(path)
	require.NoError(t, err, "Release removed another daemon's state file")
	assert.Equal(t, string(before), string(after), "another daemon's state file was changed")

	// The same on this host, with a pid that differs only by its start time.
	c2, err := claimStateFile(filepath.Join(t.TempDir(), "proxy.json"), ProxyState{Port: 1})
	require.NoError(t, err)
	again := c2.State()
	again.Started = again.Started.Add(time.Second)
	require.NoError(t, WritePidFileAt(c2.Path(), again))
	require.ErrorIs(t, c2.Update(c2.State()), errStateTakenOver)
	require.NoError(t, c2.Release())
	_, err = os.Stat(c2.Path())
	assert.NoError(t, err, "a restarted daemon's state file (same pid, later start) was removed")
}

// TestClaimStateFileProcesses races two real processes for one scope.
func TestClaimStateFileProcesses(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state", "proxy.json")
	var cmds []*exec.Cmd
	var outs []*strings.Builder
	for i := 0; i < 2; i++ {
		cmd := helperCommand("claim", "HELPER_STATE="+path, "HELPER_HOLD=1500ms")
		var out strings.Builder
		cmd.Stdout = &out
		cmds, outs = append(cmds, cmd), append(outs, &out)
	}
	for _, c := range cmds {
		require.NoError(t, c.Start())
	}
	won := 0
	for i, c := range cmds {
		require.NoError(t, c.Wait())
		o := strings.TrimSpace(outs[i].String())
		switch {
		case o == "won":
			won++
		case strings.HasPrefix(o, "lost: hpcproxy: proxy already running"):
		default:
			t.Errorf("helper %d: %q", i, o)
		}
	}
	assert.Equal(t, 1, won, "winners")
	_, err := os.Stat(path)
	assert.ErrorIs(t, err, fs.ErrNotExist, "the winner released")
}

// TestClaimStateFileAfterCrash: a daemon killed with SIGKILL leaves its
// state file; the kernel drops its lock, and the next start replaces it.
func TestClaimStateFileAfterCrash(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state", "proxy.json")
	cmd := helperCommand("claim", "HELPER_STATE="+path)
	stdout, err := cmd.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	line, _ := bufio.NewReader(stdout).ReadString('\n')
	require.Equal(t, "won\n", line)

	_, err = claimStateFile(path, ProxyState{})
	require.ErrorIs(t, err, ErrAlreadyRunning, "while the holder lives")

	require.NoError(t, cmd.Process.Kill())
	cmd.Wait()
	ps, err := ReadPidFileAt(path)
	require.NoError(t, err, "a SIGKILLed daemon leaves its state file")
	assert.Equal(t, cmd.Process.Pid, ps.PID)

	c, err := claimStateFile(path, ProxyState{Port: 7})
	require.NoError(t, err)
	defer c.Release()
	ps, err = ReadPidFileAt(path)
	require.NoError(t, err)
	assert.Equal(t, os.Getpid(), ps.PID)
	assert.Equal(t, 7, ps.Port)
}

func TestClaimStateFileForeignHost(t *testing.T) {
	port := listenPort(t)
	for _, tc := range []struct {
		name string
		port int
		want StateVerdict
	}{
		{"answering", port, VerdictForeignAnswering},
		{"silent", 1, VerdictForeignUnknown},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "proxy.json")
			// A shared proxy on another login node, seen through NFS. Its
			// PID means nothing here (and is dead here, to make sure).
			theirs := ProxyState{Host: "other-login-node", AdvertiseHost: "127.0.0.1", PID: deadPID(t), Port: tc.port, Mode: ModeShared, Status: StatusUp}
			require.NoError(t, WritePidFileAt(path, theirs))
			before, _ := os.ReadFile(path)

			_, err := claimStateFile(path, ProxyState{})
			var are *AlreadyRunningError
			require.ErrorAs(t, err, &are)
			assert.Equal(t, tc.want, are.Verdict)
			assert.Contains(t, err.Error(), "on other-login-node")

			v, err := RemoveStaleState(path)
			require.NoError(t, err)
			assert.Equal(t, tc.want, v)

			after, err := os.ReadFile(path)
			require.NoError(t, err, "another host's state file was removed")
			assert.Equal(t, string(before), string(after), "another host's state file was changed")
		})
	}
}

func TestRemovePidFile(t *testing.T) {
	dir := t.TempDir()
	t.Setenv(EnvStateDir, dir)
	path := PidFilePath()

	// Another host's: kept.
	require.NoError(t, WritePidFileAt(path, ProxyState{Host: "other-login-node", PID: 1, Port: 1}))
	RemovePidFile()
	_, err := os.Stat(path)
	require.NoError(t, err)

	// A live process's on this host (not ours): kept.
	port := listenPort(t)
	sleeper := exec.Command("sleep", "30")
	require.NoError(t, sleeper.Start())
	defer func() { sleeper.Process.Kill(); sleeper.Wait() }()
	require.NoError(t, WritePidFileAt(path, ProxyState{Host: thisHost(), PID: sleeper.Process.Pid, Port: port, Status: StatusUp}))
	RemovePidFile()
	_, err = os.Stat(path)
	require.NoError(t, err)

	// A dead process's: removed.
	require.NoError(t, WritePidFileAt(path, ProxyState{Host: thisHost(), PID: deadPID(t), Port: port}))
	RemovePidFile()
	_, err = os.Stat(path)
	assert.ErrorIs(t, err, fs.ErrNotExist)

	// Our own: removed.
	require.NoError(t, WritePidFileAt(path, ProxyState{Host: thisHost(), PID: os.Getpid(), Port: port}))
	RemovePidFile()
	_, err = os.Stat(path)
	assert.ErrorIs(t, err, fs.ErrNotExist)
}

func TestAlreadyRunningError(t *testing.T) {
	err := error(&AlreadyRunningError{Path: "/p", State: &ProxyState{Host: "h", PID: 1, Port: 2, Status: StatusUp}})
	assert.True(t, errors.Is(err, ErrAlreadyRunning))
	assert.Equal(t, "hpcproxy: proxy already running: pid 1 on h, port 2 (up) [/p]", err.Error())
	assert.False(t, errors.Is(err, syscall.ENOENT))
}
