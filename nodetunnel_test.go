package hpcproxy

import (
	"context"
	"errors"
	"net/http"
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

func TestNodeSocketName(t *testing.T) {
	base := TunnelConfig{Destination: "login1", SSHConfigFile: "/etc/x", SSHOptions: []string{"A=b"}}
	name := NodeSocketName(1000, base)
	assert.Regexp(t, `^@hpcproxy-node-1000-[0-9a-f]{16}$`, name)
	assert.Equal(t, name, NodeSocketName(1000, base), "not stable")
	same := base
	same.Connections = 1 // 0 and 1 are one connection
	same.Logger = discardLogger
	assert.Equal(t, name, NodeSocketName(1000, same), "settings that do not change the tunnel changed the name")
	for what, c := range map[string]TunnelConfig{
		"destination": {Destination: "login2", SSHConfigFile: "/etc/x", SSHOptions: []string{"A=b"}},
		"config":      {Destination: "login1", SSHConfigFile: "/etc/y", SSHOptions: []string{"A=b"}},
		"options":     {Destination: "login1", SSHConfigFile: "/etc/x", SSHOptions: []string{"A=c"}},
		"connections": {Destination: "login1", SSHConfigFile: "/etc/x", SSHOptions: []string{"A=b"}, Connections: 4},
		"methods":     {Destination: "login1", SSHConfigFile: "/etc/x", SSHOptions: []string{"A=b"}, Methods: []Method{MethodExec}},
		"host keys":   {Destination: "login1", SSHConfigFile: "/etc/x", SSHOptions: []string{"A=b"}, HostKeyPolicy: HostKeyAcceptNew},
	} {
		assert.NotEqual(t, name, NodeSocketName(1000, c), what)
	}
	assert.NotEqual(t, name, NodeSocketName(1001, base), "another user's tunnel has the same name")
}

func TestParseAttachRequest(t *testing.T) {
	ok := `{"op":"attach","state_name":"proxy-7.json","port":0,"fds":["dir","log","pidfd"],"forwards":["5432=db:5432"],"exposes":["8888"]}`
	c, err := parseAttachRequest([]byte(ok), 3)
	require.NoError(t, err)
	assert.Equal(t, map[string]int{"dir": 0, "log": 1, "pidfd": 2}, c.fdIndex)
	assert.Len(t, c.forwards, 1)
	assert.Len(t, c.exposes, 1)
	ok = `{"op":"attach","state_name":"p.json","user":"hpcproxy","token":"abc_-9","fds":["dir","listener","standby"]}`
	c, err = parseAttachRequest([]byte(ok), 3)
	require.NoError(t, err)
	assert.Equal(t, map[string]int{"dir": 0, "listener": 1, "standby": 2}, c.fdIndex)
	assert.Equal(t, "abc_-9", c.req.Token)

	for name, tc := range map[string]struct {
		line string
		nfds int
	}{
		"not json":      {`attach`, 1},
		"two values":    {`{"op":"attach","state_name":"p.json","fds":["dir"]} {}`, 1},
		"unknown field": {`{"op":"attach","state_name":"p.json","fds":["dir"],"x":1}`, 1},
		"op":            {`{"op":"forward","state_name":"p.json","fds":["dir"]}`, 1},
		"path":          {`{"op":"attach","state_name":"../p.json","fds":["dir"]}`, 1},
		"dotdot":        {`{"op":"attach","state_name":"..","fds":["dir"]}`, 1},
		"not json name": {`{"op":"attach","state_name":"p.sock","fds":["dir"]}`, 1},
		"port":          {`{"op":"attach","state_name":"p.json","port":70000,"fds":["dir"]}`, 1},
		"pid":           {`{"op":"attach","state_name":"p.json","watch_pid":-4,"fds":["dir"]}`, 1},
		"fd count":      {`{"op":"attach","state_name":"p.json","fds":["dir"]}`, 2},
		"fd kind":       {`{"op":"attach","state_name":"p.json","fds":["dir","tty"]}`, 2},
		"fd twice":      {`{"op":"attach","state_name":"p.json","fds":["dir","dir"]}`, 2},
		"no dir":        {`{"op":"attach","state_name":"p.json","fds":["log"]}`, 1},
		"bad forward":   {`{"op":"attach","state_name":"p.json","fds":["dir"],"forwards":["x"]}`, 1},
		"bad expose":    {`{"op":"attach","state_name":"p.json","fds":["dir"],"exposes":["x=y=z"]}`, 1},
		"token alone":   {`{"op":"attach","state_name":"p.json","token":"t","fds":["dir"]}`, 1},
		"user alone":    {`{"op":"attach","state_name":"p.json","user":"u","fds":["dir"]}`, 1},
		"token colon":   {`{"op":"attach","state_name":"p.json","user":"u","token":"a:b","fds":["dir"]}`, 1},
	} {
		_, err := parseAttachRequest([]byte(tc.line), tc.nfds)
		assert.Error(t, err, name)
	}
}

func FuzzAttachRequest(f *testing.F) {
	f.Add([]byte(`{"op":"attach","state_name":"proxy-7.json","fds":["dir","log","pidfd"],"forwards":["5432=db:5432"]}`), 3)
	f.Add([]byte(`{"op":"attach","state_name":"p.json","fds":["dir"],"watch_pid":12}`), 1)
	f.Add([]byte(`{"op":"attach","state_name":"p.json","fds":["dir","exit"]}`), 2)
	f.Add([]byte(`{"op":"attach","state_name":"p.json","user":"hpcproxy","token":"t","fds":["dir","listener","standby"]}`), 3)
	f.Add([]byte(`{}`), 0)
	f.Fuzz(func(t *testing.T, line []byte, nfds int) {
		c, err := parseAttachRequest(line, nfds)
		if err != nil {
			return
		}
		if c.req.StateName != filepath.Base(c.req.StateName) || !strings.HasSuffix(c.req.StateName, ".json") {
			t.Fatalf("accepted state name %q", c.req.StateName)
		}
		if len(c.req.Fds) != nfds {
			t.Fatalf("accepted %d fd names for %d fds", len(c.req.Fds), nfds)
		}
		if _, ok := c.fdIndex[attachFdDir]; !ok {
			t.Fatal("accepted a request without the state directory")
		}
		if (c.req.User == "") != (c.req.Token == "") || strings.ContainsAny(c.req.User+c.req.Token, ":\n") {
			t.Fatalf("accepted credentials %q %q", c.req.User, c.req.Token)
		}
	})
}

// TestAttachJobNoTunnel: with no daemon, AttachJob says so (the starter
// then starts one).
func TestAttachJobNoTunnel(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	state := filepath.Join(t.TempDir(), "st", "proxy.json")
	_, err := attachJob(ctx, attachOptions{Tunnel: TunnelConfig{Destination: "nowhere-" + strconv.Itoa(os.Getpid())}, StatePath: state})
	assert.ErrorIs(t, err, ErrNoNodeTunnel)
}

// TestAttachJobSquatter: a socket of the tunnel's name held by another
// user is refused, and nothing is sent to it.
func TestAttachJobSquatter(t *testing.T) {
	testenv.RequireRoot(t)
	socat := testenv.LookPath(t, "socat")
	tc := TunnelConfig{Destination: "squatted-" + strconv.Itoa(os.Getpid())}
	name := NodeSocketName(os.Getuid(), tc)
	out := filepath.Join(t.TempDir(), "got")
	require.NoError(t, os.Chmod(filepath.Dir(out), 0o777))
	cmd := exec.Command(socat, "-u", "ABSTRACT-LISTEN:"+strings.TrimPrefix(name, "@")+",fork", "OPEN:"+out+",creat,append")
	cmd.Env = []string{}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 48213, Gid: 48213}}
	errf, err := os.Create(filepath.Join(t.TempDir(), "socat.err"))
	require.NoError(t, err)
	defer errf.Close()
	cmd.Stderr = errf
	require.NoError(t, cmd.Start())
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	state := filepath.Join(t.TempDir(), "st", "proxy.json")
	require.Eventually(t, func() bool {
		_, err = attachJob(ctx, attachOptions{Tunnel: tc, StatePath: state})
		return !errors.Is(err, ErrNoNodeTunnel) // socat is listening
	}, 5*time.Second, 20*time.Millisecond, "socat did not listen")
	assert.ErrorIs(t, err, ErrNodeTunnelForeign)
	assert.ErrorContains(t, err, "uid 48213")
	time.Sleep(100 * time.Millisecond)
	b, _ := os.ReadFile(out)
	assert.Empty(t, string(b), "the squatter got the attach request")
}

// sleeper starts a process standing for a job script; kill ends the job.
func sleeper(t *testing.T) *exec.Cmd {
	t.Helper()
	cmd := exec.Command("sleep", "600")
	require.NoError(t, cmd.Start())
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	t.Cleanup(func() { _ = cmd.Process.Kill(); <-done })
	return cmd
}

// TestDaemonNodeTunnel runs the library's side in process: a per-job
// Daemon serves its node tunnel, two jobs attach with AttachJob (one with
// a forward of its own), the daemon's own job ends and the others go on,
// DetachJob detaches one, and the last job's end returns Run.
func TestDaemonNodeTunnel(t *testing.T) {
	sshd := sshtest.StartSSHD(t, sshtest.Options{})
	web := startWebServer(t)
	tc := TunnelConfig{Destination: "sshtest", SSHConfigFile: sshd.SSHConfigFile, Methods: []Method{MethodGoSSH}}
	own := sleeper(t)
	r := startTestDaemon(t, &Daemon{
		Mode: ModePerJob, Tunnel: tc, StatePath: filepath.Join(sshtest.PrivateTempDir(t), "proxy.json"),
		WatchPID: own.Process.Pid, StatsInterval: 50 * time.Millisecond,
	})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	type job struct {
		state  string
		script *exec.Cmd
		ps     *ProxyState
	}
	lport := sshtest.FreePort(t)
	var jobs []*job
	for i := range 2 {
		j := &job{state: filepath.Join(sshtest.PrivateTempDir(t), "proxy-"+itoa(i)+".json"), script: sleeper(t)}
		o := attachOptions{Tunnel: tc, StatePath: j.state, WatchPID: j.script.Process.Pid}
		if i == 0 {
			o.Forwards = []ForwardSpec{{Listen: "127.0.0.1:" + itoa(lport), Remote: strings.TrimPrefix(web.URL, "http://")}}
		}
		ps, err := attachJob(ctx, o)
		require.NoError(t, err, "attach %d", i)
		require.NotNil(t, ps.Node)
		assert.True(t, ps.Node.Attached)
		assert.Equal(t, os.Getpid(), ps.PID, "served by this process's daemon")
		j.ps = ps
		jobs = append(jobs, j)
	}
	_, err := attachJob(ctx, attachOptions{Tunnel: tc, StatePath: jobs[0].state})
	assert.ErrorIs(t, err, ErrAlreadyRunning, "a second attach of the same job")

	// A job watched by an exit pipe detaches when its write end closes.
	pr, pw, err := os.Pipe()
	require.NoError(t, err)
	piped := filepath.Join(sshtest.PrivateTempDir(t), "proxy-pipe.json")
	_, err = attachJob(ctx, attachOptions{Tunnel: tc, StatePath: piped, ExitFd: int(pr.Fd())})
	require.NoError(t, err)
	pr.Close()
	ps, err := ReadPidFileAt(piped)
	require.NoError(t, err)
	assert.Equal(t, 4, ps.Node.Jobs)
	pw.Close()
	require.Eventually(t, func() bool { _, err := os.Stat(piped); return os.IsNotExist(err) },
		10*time.Second, 20*time.Millisecond, "the exit pipe's job stays attached after EOF")

	for i, j := range jobs {
		code, body := getVia(t, j.ps.URL("http"), web.URL+"/job"+itoa(i))
		assert.Equal(t, 200, code)
		assert.Equal(t, "hello /job"+itoa(i), body)
	}
	assert.Equal(t, "hello /fwd", httpGet(t, "http://127.0.0.1:"+itoa(lport)+"/fwd"), "the attached job's forward")
	require.Eventually(t, func() bool {
		ps, err := ReadPidFileAt(jobs[1].state)
		return err == nil && ps.Node.Jobs == 3 && len(ps.LoginNodes) == 1 && ps.LoginNodes[0].ChannelsTotal >= 3
	}, 10*time.Second, 20*time.Millisecond, "the login-node figures count every job's channels")

	// Detach job 0; its forward goes with it.
	require.NoError(t, DetachJob(ctx, jobs[0].state))
	require.Eventually(t, func() bool { _, err := os.Stat(jobs[0].state); return os.IsNotExist(err) },
		10*time.Second, 20*time.Millisecond)
	_, err = (&http.Client{Timeout: 2 * time.Second}).Get("http://127.0.0.1:" + itoa(lport) + "/gone")
	assert.Error(t, err, "a detached job's forward still listens")

	// The daemon's own job detaches, and then its script ends: the
	// attached ones go on.
	require.NoError(t, DetachJob(ctx, r.d.StatePath))
	require.Eventually(t, func() bool { _, err := os.Stat(r.d.StatePath); return os.IsNotExist(err) },
		10*time.Second, 20*time.Millisecond, "own state file after its job detached")
	require.NoError(t, own.Process.Kill())
	time.Sleep(1500 * time.Millisecond) // WatchPID looks once a second
	select {
	case <-r.exited:
		t.Fatalf("Run returned with a job attached: %v", r.err)
	default:
	}
	code, _ := getVia(t, jobs[1].ps.URL("http"), web.URL+"/after")
	assert.Equal(t, 200, code)

	// The last job ends: Run returns.
	require.NoError(t, jobs[1].script.Process.Kill())
	select {
	case <-r.exited:
		assert.NoError(t, r.err)
	case <-time.After(15 * time.Second):
		t.Fatal("Run did not return after the last job ended")
	}
	_, err = os.Stat(jobs[1].state)
	assert.True(t, os.IsNotExist(err), "last job's state file")
}
