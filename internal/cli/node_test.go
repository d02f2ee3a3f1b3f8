package cli

import (
	"bytes"
	"encoding/json"
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
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/hpcproxy/hpcproxy"
	"github.com/hpcproxy/hpcproxy/internal/daemonproc"
	"github.com/hpcproxy/hpcproxy/internal/sshtest"
	"github.com/hpcproxy/hpcproxy/internal/testenv"
)

// A simulated job: its own private state directory (as Slurm's
// job_container/tmpfs gives each job its own /tmp) and a process standing
// for its job script, whose exit ends the job.
type simJob struct {
	state  string
	script *exec.Cmd
}

func newSimJob(t testing.TB) *simJob {
	t.Helper()
	cmd := exec.Command("sleep", "600")
	require.NoError(t, cmd.Start())
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	t.Cleanup(func() { _ = cmd.Process.Kill(); <-done })
	return &simJob{state: filepath.Join(sshtest.PrivateTempDir(t), "proxy.json"), script: cmd}
}

// end ends the job: its script exits.
func (j *simJob) end(t *testing.T) {
	t.Helper()
	require.NoError(t, j.script.Process.Kill())
}

func (j *simJob) start(t *testing.T, sshd *sshtest.SSHD, extra ...string) result {
	t.Helper()
	args := append([]string{"start", "--via", "sshtest", "--ssh-config", sshd.SSHConfigFile, "--state", j.state,
		"--watch-pid", strconv.Itoa(j.script.Process.Pid), "-v"}, extra...)
	r := run(t, "perjob", "", args...)
	require.Equal(t, 0, r.code, "start: %s\nlog:\n%s", r.stderr, readFile(j.state, ".log"))
	return r
}

func (j *simJob) proxyState(t *testing.T) *hpcproxy.ProxyState {
	t.Helper()
	ps, err := hpcproxy.ReadPidFileAt(j.state)
	require.NoError(t, err)
	return ps
}

// statusJSON runs status --json for the job.
func (j *simJob) statusJSON(t *testing.T) StatusReport {
	t.Helper()
	r := run(t, "perjob", "", "status", "--json", "--state", j.state)
	var rep StatusReport
	require.NoError(t, json.Unmarshal([]byte(r.stdout), &rep), "status --json: %q %s", r.stdout, r.stderr)
	return rep
}

// sshSessions counts the client connections sshd serves now.
func sshSessions(sshd *sshtest.SSHD) int { return len(sshtest.Children(sshd.PID())) }

// bigServer serves /big: size bytes of a known pattern, in slices over
// about a second, so that a download is in flight while a test changes
// things.
func bigServer(t *testing.T, size int) string {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", strconv.Itoa(size))
		const slices = 40
		chunk := bigPattern(size / slices)
		for i := range slices {
			n := len(chunk)
			if i == slices-1 {
				n = size - i*len(chunk)
				chunk = bigPattern(n)
			}
			if _, err := w.Write(chunk[:n]); err != nil {
				return
			}
			w.(http.Flusher).Flush()
			time.Sleep(25 * time.Millisecond)
		}
	}))
	t.Cleanup(srv.Close)
	return srv.Listener.Addr().String()
}

// bigURL is bigServer's /big, by a host name the proxy resolves.
func bigURL(t *testing.T, size int) string {
	_, port, _ := strings.Cut(bigServer(t, size), ":")
	return "http://" + loopbackHostname(t) + ":" + port + "/big"
}

func bigPattern(n int) []byte { return bytes.Repeat([]byte("hpcproxy"), n/8+1)[:n] }

// download fetches url through the job's proxy (HTTP CONNECT-less plain
// GET with the job's credentials) and returns the body's length, checking
// its content.
func download(ps *hpcproxy.ProxyState, target string, size int) error {
	pu, err := url.Parse(ps.URL("http"))
	if err != nil {
		return err
	}
	c := &http.Client{Transport: &http.Transport{Proxy: http.ProxyURL(pu)}, Timeout: 60 * time.Second}
	defer c.CloseIdleConnections()
	resp, err := c.Get(target)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("after %d bytes: %w", len(b), err)
	}
	chunk := bigPattern(size / 40)
	if len(b) != size || !bytes.HasPrefix(b, chunk[:min(len(chunk), len(b))]) {
		return fmt.Errorf("got %d bytes, want %d of the pattern", len(b), size)
	}
	return nil
}

// TestCLINodeTunnelJobs: three jobs of one user on one node share one SSH
// connection; each has its own port, credentials and state; one ending,
// one stopped, the others download on; the last one ends the daemon.
func TestCLINodeTunnelJobs(t *testing.T) {
	sshd := sshtest.StartSSHD(t, sshtest.Options{})
	const size = 4 << 20
	target := bigURL(t, size)

	jobs := []*simJob{newSimJob(t), newSimJob(t), newSimJob(t)}
	r := jobs[0].start(t, sshd)
	assert.Contains(t, r.stdout, "started: pid")
	for _, j := range jobs[1:] {
		r = j.start(t, sshd)
		assert.Contains(t, r.stdout, "attached to the node tunnel @hpcproxy-node-")
	}
	t.Cleanup(func() {
		for _, j := range jobs {
			run(t, "perjob", "", "stop", "--state", j.state)
		}
	})
	ps := []*hpcproxy.ProxyState{jobs[0].proxyState(t), jobs[1].proxyState(t), jobs[2].proxyState(t)}
	daemon := ps[0].PID
	for i, p := range ps {
		require.NotNil(t, p.Node, "job %d: no node tunnel in its state", i)
		assert.Equal(t, daemon, p.PID, "job %d is served by another daemon", i)
		assert.Equal(t, i > 0, p.Node.Attached, "job %d", i)
		for _, q := range ps[:i] {
			assert.NotEqual(t, q.Port, p.Port, "two jobs share a port")
			assert.NotEqual(t, q.Credentials.Token, p.Credentials.Token, "two jobs share credentials")
		}
	}
	assert.Equal(t, 1, sshSessions(sshd), "one SSH connection for three jobs")

	rep := jobs[2].statusJSON(t)
	assert.Equal(t, "alive", rep.State)
	require.NotNil(t, rep.Node)
	assert.Equal(t, 3, rep.Node.Jobs)
	require.Len(t, rep.LoginNodes, 1)
	assert.Equal(t, "sshtest", rep.LoginNodes[0].Host)
	assert.Equal(t, 1, rep.LoginNodes[0].Connections)

	// Downloads through jobs 1 and 2 while job 0, which opened the
	// tunnel, ends.
	var wg sync.WaitGroup
	errs := make([]error, 2)
	for i := range 2 {
		wg.Go(func() { errs[i] = download(ps[i+1], target, size) })
	}
	time.Sleep(300 * time.Millisecond)
	jobs[0].end(t)
	require.Eventually(t, func() bool { _, err := os.Stat(jobs[0].state); return os.IsNotExist(err) },
		10*time.Second, 50*time.Millisecond, "job 0's state file stays after its end")
	wg.Wait()
	for i, err := range errs {
		assert.NoError(t, err, "download through job %d while job 0 ended", i+1)
	}
	assert.True(t, daemonproc.PIDAlive(daemon), "the daemon ended with the job that started it")
	assert.Equal(t, 1, sshSessions(sshd))

	// The figures: jobs 1 and 2 are left, two downloads went through.
	require.Eventually(t, func() bool {
		rep = jobs[1].statusJSON(t)
		return len(rep.LoginNodes) == 1 && rep.LoginNodes[0].ChannelsTotal >= 2 && rep.Node != nil && rep.Node.Jobs == 2
	}, 15*time.Second, 200*time.Millisecond, "status --json: %+v", rep)
	assert.GreaterOrEqual(t, rep.LoginNodes[0].BytesOut, int64(2*size))

	// Another user cannot attach: the daemon answers nothing and serves
	// the same jobs.
	t.Run("other user", func(t *testing.T) {
		testenv.RequireRoot(t)
		socat := testenv.LookPath(t, "socat")
		cmd := exec.Command(socat, "-t", "5", "-T", "10", "-", "ABSTRACT-CONNECT:"+strings.TrimPrefix(ps[1].Node.Socket, "@"))
		cmd.Env = []string{}
		cmd.Stdin = strings.NewReader(`{"op":"attach","state_name":"proxy.json","fds":[]}` + "\n")
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 48213, Gid: 48213}}
		var stdout, stderr strings.Builder
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		err := cmd.Run()
		assert.NotContains(t, stderr.String(), "refused", "socat could not connect: %v", err)
		assert.Empty(t, stdout.String(), "another user got an answer")
		assert.Contains(t, readFile(jobs[0].state, ".log"), "connection from another user refused")
	})

	// stop detaches job 1 alone.
	r = run(t, "perjob", "", "stop", "--state", jobs[1].state, "-v")
	require.Equal(t, 0, r.code, r.stderr)
	assert.Contains(t, r.stdout, "detached from the node tunnel")
	_, err := os.Stat(jobs[1].state)
	assert.True(t, os.IsNotExist(err), "job 1's state file stays after stop")
	assert.True(t, daemonproc.PIDAlive(daemon), "stop of one job ended the daemon")
	assert.NoError(t, download(ps[2], target, size), "job 2 after job 1 stopped")
	assert.Error(t, download(ps[1], target, size), "job 1's port still serves after stop")

	// The last job's end ends the daemon and its SSH connection.
	jobs[2].end(t)
	require.Eventually(t, func() bool { return !daemonproc.PIDAlive(daemon) }, 15*time.Second, 50*time.Millisecond,
		"the daemon outlives its last job")
	require.Eventually(t, func() bool { return sshSessions(sshd) == 0 }, 10*time.Second, 50*time.Millisecond)
	_, err = os.Stat(jobs[2].state)
	assert.True(t, os.IsNotExist(err), "job 2's state file stays")
	for i, j := range jobs {
		assert.Eventually(t, func() bool { return len(jobProcs(j.state)) == 0 }, 5*time.Second, 50*time.Millisecond,
			"job %d's processes (stand-by) outlive it", i)
	}
}

// TestCLINodeTunnelPrivate: --private keeps a job's tunnel to itself.
func TestCLINodeTunnelPrivate(t *testing.T) {
	sshd := sshtest.StartSSHD(t, sshtest.Options{})
	a, b := newSimJob(t), newSimJob(t)
	a.start(t, sshd)
	t.Cleanup(func() { run(t, "perjob", "", "stop", "--state", a.state) })
	r := b.start(t, sshd, "--private")
	t.Cleanup(func() { run(t, "perjob", "", "stop", "--state", b.state) })
	assert.Contains(t, r.stdout, "started: pid")
	pa, pb := a.proxyState(t), b.proxyState(t)
	assert.NotEqual(t, pa.PID, pb.PID)
	assert.Nil(t, pb.Node)
	assert.Equal(t, 2, sshSessions(sshd))
	// And a third job attaches to the shared one, not the private one.
	c := newSimJob(t)
	c.start(t, sshd)
	t.Cleanup(func() { run(t, "perjob", "", "stop", "--state", c.state) })
	assert.Equal(t, pa.PID, c.proxyState(t).PID)
	assert.Equal(t, 2, sshSessions(sshd))
}

// BenchmarkNodeTunnelRSS measures what an attached job costs: the node
// daemon's resident memory with 1 job and with 50 (one SSH connection
// for all; each job with its own listener, state file, control socket and
// watched process), sshd's sessions on the login side, and each job's
// stand-by (resident, proportional and private memory).
//
//	go test -run XXX -bench NodeTunnelRSS ./internal/cli/
func BenchmarkNodeTunnelRSS(b *testing.B) {
	const jobs = 50
	sshd := sshtest.StartSSHD(b, sshtest.Options{})
	var all []*simJob
	newJob := func() *simJob {
		j := newSimJob(b)
		r := run(b, "perjob", "", "start", "--via", "sshtest", "--ssh-config", sshd.SSHConfigFile, "--state", j.state,
			"--watch-pid", strconv.Itoa(j.script.Process.Pid))
		if r.code != 0 {
			b.Fatalf("start: %s\nlog:\n%s", r.stderr, readFile(j.state, ".log"))
		}
		all = append(all, j)
		return j
	}
	b.Cleanup(func() {
		for _, j := range all {
			run(b, "perjob", "", "stop", "--state", j.state)
		}
	})
	for range b.N {
		// One measurement below; the benchmark's time is not the point.
	}
	first := newJob()
	ps, err := hpcproxy.ReadPidFileAt(first.state)
	if err != nil {
		b.Fatal(err)
	}
	time.Sleep(2 * time.Second)
	rss1 := rssKiB(ps.PID)
	for range jobs - 1 {
		newJob()
	}
	time.Sleep(2 * time.Second)
	rssN := rssKiB(ps.PID)
	if n := len(all); n != jobs {
		b.Fatalf("%d jobs", n)
	}
	b.ReportMetric(float64(rss1), "KiB-rss-1job")
	b.ReportMetric(float64(rssN), "KiB-rss-50jobs")
	b.ReportMetric(float64(rssN-rss1)/float64(jobs-1), "KiB/attached-job")
	b.ReportMetric(float64(sshSessions(sshd)), "sshd-sessions")
	// What each job keeps in itself: its stand-by.
	var sum procMem
	n := 0
	for i, j := range all {
		sbs := standbysOf(j.state)
		if len(sbs) != 1 {
			var procs []string
			for _, pid := range jobProcs(j.state) {
				cmd, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
				procs = append(procs, fmt.Sprintf("%d %q", pid, cmd))
			}
			b.Errorf("job %d: %d stand-bys; its processes: %v\nlog:\n%s", i, len(sbs), procs, readFile(j.state, ".log"))
		}
		for _, pid := range sbs {
			m := memKiB(pid)
			sum.rss, sum.pss, sum.uss = sum.rss+m.rss, sum.pss+m.pss, sum.uss+m.uss
			n++
		}
	}
	if n != jobs {
		b.Fatalf("%d stand-bys for %d jobs", n, jobs)
	}
	b.ReportMetric(float64(sum.rss)/float64(n), "KiB-rss/standby")
	b.ReportMetric(float64(sum.pss)/float64(n), "KiB-pss/standby")
	b.ReportMetric(float64(sum.uss)/float64(n), "KiB-uss/standby")
}

// rssKiB returns a process's resident set size (VmRSS) in KiB, 0 if
// unknown.
func rssKiB(pid int) int64 {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0
	}
	for line := range strings.Lines(string(b)) {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			n, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return n
		}
	}
	return 0
}

// TestCLINodeTunnelPrivateTmp: a job whose /tmp is its own (Slurm's
// job_container/tmpfs: a mount namespace with a tmpfs no other job sees)
// attaches to the node tunnel another job opened, and its state file,
// log and control socket are in its own tmp dir, where its perjob
// commands find them.
func TestCLINodeTunnelPrivateTmp(t *testing.T) {
	testenv.RequireRoot(t)
	unshare := testenv.LookPath(t, "unshare")
	curl := testenv.LookPath(t, "curl")
	sshd := sshtest.StartSSHD(t, sshtest.Options{})
	host := loopbackHostname(t)
	target := "http://" + host + ":" + webServer(t) + "/private"

	a := newSimJob(t)
	a.start(t, sshd)
	t.Cleanup(func() { run(t, "perjob", "", "stop", "--state", a.state) })

	// Job b: its tmp dir is a fresh tmpfs in a mount namespace of its own.
	tmp := sshtest.PrivateTempDir(t)
	state := filepath.Join(tmp, "hpcproxy", "proxy.json")
	script := `set -e
mount -t tmpfs -o mode=0700 jobtmp "$TMP"
"$EXE" start --via sshtest --ssh-config "$CFG" --state "$STATE" --watch-pid -1 -v
"$EXE" status --json --state "$STATE"
"$EXE" run --state "$STATE" -- "$CURL" -sS --max-time 20 "$TARGET"
echo
"$EXE" stop --state "$STATE" -v
test ! -e "$STATE"
`
	cmd := exec.Command(unshare, "-m", "--propagation", "private", "sh", "-c", script)
	cmd.Env = append(cleanEnv(), envApp+"=perjob", "EXE="+os.Args[0], "TMP="+tmp, "STATE="+state,
		"CFG="+sshd.SSHConfigFile, "CURL="+curl, "TARGET="+target)
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "%s\ndaemon log:\n%s", out, readFile(a.state, ".log"))
	assert.Contains(t, string(out), "attached to the node tunnel")
	assert.Contains(t, string(out), `"attached": true`)
	assert.Contains(t, string(out), "path=/private via=1.1 hpcproxy")
	assert.Contains(t, string(out), "detached from the node tunnel")
	_, err = os.Stat(state)
	assert.True(t, os.IsNotExist(err), "job b's state file is visible outside its namespace: %v", err)
	assert.Equal(t, 1, sshSessions(sshd))
	assert.Contains(t, readFile(a.state, ".log"), "job detached")
}

// TestCLINodeTunnelStartStorm: jobs that start at the same moment (a job
// array) end up on one daemon and one SSH connection: the starts that
// lose the race for the node socket attach to the winner.
func TestCLINodeTunnelStartStorm(t *testing.T) {
	const n = 12
	sshd := sshtest.StartSSHD(t, sshtest.Options{})
	jobs := make([]*simJob, n)
	for i := range jobs {
		jobs[i] = newSimJob(t)
	}
	t.Cleanup(func() {
		for _, j := range jobs {
			run(t, "perjob", "", "stop", "--state", j.state)
		}
	})
	results := make([]result, n)
	var wg sync.WaitGroup
	for i, j := range jobs {
		wg.Go(func() {
			results[i] = run(t, "perjob", "", "start", "--via", "sshtest", "--ssh-config", sshd.SSHConfigFile,
				"--state", j.state, "--watch-pid", strconv.Itoa(j.script.Process.Pid), "-v")
		})
	}
	wg.Wait()
	pids := map[int]int{}
	for i, r := range results {
		require.Equal(t, 0, r.code, "job %d: %s", i, r.stderr)
		pids[jobs[i].proxyState(t).PID]++
	}
	assert.Len(t, pids, 1, "jobs per daemon: %v", pids)
	assert.Equal(t, 1, sshSessions(sshd), "SSH connections for %d jobs started at once", n)
}

// TestCLINodeTunnelSquatter: another user holding the node socket's name
// gets nothing from a start, which warns and opens a private tunnel.
func TestCLINodeTunnelSquatter(t *testing.T) {
	testenv.RequireRoot(t)
	socat := testenv.LookPath(t, "socat")
	sshd := sshtest.StartSSHD(t, sshtest.Options{})
	name := hpcproxy.NodeSocketName(os.Getuid(), hpcproxy.TunnelConfig{Destination: "sshtest", SSHConfigFile: sshd.SSHConfigFile})
	got := filepath.Join(t.TempDir(), "got")
	require.NoError(t, os.Chmod(filepath.Dir(got), 0o777))
	sq := exec.Command(socat, "-u", "ABSTRACT-LISTEN:"+strings.TrimPrefix(name, "@")+",fork", "OPEN:"+got+",creat,append")
	sq.Env = []string{}
	sq.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 48213, Gid: 48213}}
	require.NoError(t, sq.Start())
	t.Cleanup(func() { _ = sq.Process.Kill(); _ = sq.Wait() })
	require.Eventually(t, func() bool {
		b, _ := os.ReadFile("/proc/net/unix")
		return strings.Contains(string(b), name)
	}, 5*time.Second, 20*time.Millisecond, "socat does not listen on %s", name)

	j := newSimJob(t)
	r := j.start(t, sshd)
	t.Cleanup(func() { run(t, "perjob", "", "stop", "--state", j.state) })
	assert.Contains(t, r.stderr, "belongs to uid 48213")
	assert.Contains(t, r.stderr, "starting a tunnel of this job's own")
	assert.Contains(t, r.stdout, "started: pid")
	assert.Nil(t, j.proxyState(t).Node, "a private tunnel")
	b, _ := os.ReadFile(got)
	assert.Empty(t, string(b), "the squatter got a request")
}

// TestCLIStatusJSONShared: a shared daemon reports its login node in
// status --json too (relaying directly here: "direct", no SSH
// connection), and status --json of nothing is "not running", exit 3.
func TestCLIStatusJSONShared(t *testing.T) {
	state := filepath.Join(sshtest.PrivateTempDir(t), "proxy.json")
	r := run(t, "shared", "", "status", "--json", "--state", state)
	assert.Equal(t, 3, r.code)
	var rep StatusReport
	require.NoError(t, json.Unmarshal([]byte(r.stdout), &rep), r.stdout)
	assert.Equal(t, "not running", rep.State)
	assert.False(t, rep.Usable)

	r = run(t, "shared", "", "start", "--state", state)
	require.Equal(t, 0, r.code, r.stderr)
	t.Cleanup(func() { run(t, "shared", "", "stop", "--state", state) })
	r = run(t, "shared", "", "status", "--json", "--state", state)
	require.Equal(t, 0, r.code, r.stderr)
	rep = StatusReport{}
	require.NoError(t, json.Unmarshal([]byte(r.stdout), &rep), r.stdout)
	assert.Equal(t, StatusSchema, rep.Schema)
	assert.Equal(t, "alive", rep.State)
	assert.Equal(t, hpcproxy.ModeShared, rep.Mode)
	assert.Nil(t, rep.Node, "a shared proxy is no node tunnel")
	require.Len(t, rep.LoginNodes, 1)
	assert.Equal(t, "direct", rep.LoginNodes[0].Host)
	assert.Equal(t, hpcproxy.StatusUp, rep.LoginNodes[0].Status)
	assert.Equal(t, 0, rep.LoginNodes[0].Connections)
	assert.NotContains(t, r.stdout, "token", "status --json shows the credentials")
}

// TestCLINodeTunnelTakeover: the node daemon is killed with the job that
// opened the tunnel (SIGKILL to the daemon, the job script and, as a
// scheduler's cgroup kill does, its stand-by; or, as proctrack/linuxproc
// would leave it, not the stand-by, which must then exit by itself); the
// attached jobs' ports stay open, a download started right after the
// kill completes through each, one of their stand-bys starts the new
// daemon and the other job attaches to it: one SSH connection again. A
// SIGTERM to the new daemon hands over the same way. The last job's end
// leaves no process behind.
func TestCLINodeTunnelTakeover(t *testing.T) {
	t.Run("cgroup", func(t *testing.T) { testNodeTunnelTakeover(t, true) })
	t.Run("linuxproc", func(t *testing.T) { testNodeTunnelTakeover(t, false) })
}

func testNodeTunnelTakeover(t *testing.T, killStandby bool) {
	sshd := sshtest.StartSSHD(t, sshtest.Options{})
	const size = 1 << 20
	target := bigURL(t, size)

	jobs := []*simJob{newSimJob(t), newSimJob(t), newSimJob(t)}
	for _, j := range jobs {
		j.start(t, sshd)
	}
	t.Cleanup(func() {
		for i, j := range jobs {
			if t.Failed() || os.Getenv("NODE_TEST_LOGS") != "" {
				t.Logf("job %d's log:\n%s", i, readFile(j.state, ".log"))
			}
			run(t, "perjob", "", "stop", "--state", j.state)
		}
	})
	ps := []*hpcproxy.ProxyState{jobs[0].proxyState(t), jobs[1].proxyState(t), jobs[2].proxyState(t)}
	daemon := ps[0].PID
	for i, j := range jobs {
		require.Equal(t, daemon, ps[i].PID)
		sb := standbysOf(j.state)
		require.Len(t, sb, 1, "job %d: stand-bys", i)
		mem := memKiB(sb[0])
		t.Logf("job %d's stand-by (pid %d): Rss %d KiB, Pss %d KiB, private (USS) %d KiB", i, sb[0], mem.rss, mem.pss, mem.uss)
	}
	assert.Equal(t, 1, sshSessions(sshd))

	// Job 0's end as a cgroup kill: every process of it at once.
	sb0 := standbysOf(jobs[0].state)
	require.NoError(t, syscall.Kill(daemon, syscall.SIGKILL))
	if killStandby {
		require.NoError(t, syscall.Kill(sb0[0], syscall.SIGKILL))
	}
	jobs[0].end(t)

	// Downloads right away: their connections wait in the ports' backlogs
	// until a new daemon serves them.
	var wg sync.WaitGroup
	errs := make([]error, 2)
	for i := range 2 {
		wg.Go(func() { errs[i] = download(ps[i+1], target, size) })
	}
	wg.Wait()
	for i, err := range errs {
		assert.NoError(t, err, "download through job %d after the daemon's kill\nlog:\n%s", i+1, readFile(jobs[i+1].state, ".log"))
	}
	var now [2]*hpcproxy.ProxyState
	require.Eventually(t, func() bool {
		for i := range now {
			p, err := hpcproxy.ReadPidFileAt(jobs[i+1].state)
			if err != nil || !hpcproxy.CheckState(p).Usable() || p.Status != hpcproxy.StatusUp {
				return false
			}
			now[i] = p
		}
		return now[0].PID == now[1].PID
	}, 20*time.Second, 100*time.Millisecond, "the jobs' state after the takeover")
	for i, p := range now {
		assert.Equal(t, ps[i+1].Port, p.Port, "job %d's port changed", i+1)
		assert.Equal(t, ps[i+1].Credentials.Token, p.Credentials.Token, "job %d's credentials changed", i+1)
		assert.Len(t, standbysOf(jobs[i+1].state), 1, "job %d: stand-bys after the takeover", i+1)
	}
	assert.NotEqual(t, daemon, now[0].PID)
	assert.True(t, now[0].Node.Attached != now[1].Node.Attached, "one job's stand-by opened the tunnel, the other attached")
	require.Eventually(t, func() bool { return sshSessions(sshd) == 1 }, 10*time.Second, 50*time.Millisecond,
		"SSH connections after the takeover: %d", sshSessions(sshd))
	assert.Eventually(t, func() bool { return len(jobProcs(jobs[0].state)) == 0 }, 10*time.Second, 50*time.Millisecond,
		"job 0's processes (its stand-by) outlive it")

	// A plain SIGTERM to the new daemon hands over as well (the
	// connections it serves at that moment end with it).
	require.NoError(t, syscall.Kill(now[0].PID, syscall.SIGTERM))
	require.Eventually(t, func() bool { return !daemonproc.PIDAlive(now[0].PID) }, 15*time.Second, 20*time.Millisecond)
	for i := range 2 {
		assert.NoError(t, download(ps[i+1], target, size), "download through job %d after SIGTERM", i+1)
	}

	// The jobs end: nothing of them is left.
	for _, j := range jobs[1:] {
		j.end(t)
	}
	require.Eventually(t, func() bool {
		return len(jobProcs(jobs[1].state))+len(jobProcs(jobs[2].state)) == 0
	}, 15*time.Second, 50*time.Millisecond, "processes left after the jobs' end")
	require.Eventually(t, func() bool { return sshSessions(sshd) == 0 }, 10*time.Second, 50*time.Millisecond)
}

// standbysOf returns the stand-bys of the job whose state file is state.
func standbysOf(state string) []int {
	var out []int
	for _, pid := range jobProcs(state) {
		if b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline"); err == nil && bytes.HasPrefix(b, []byte("/bin/sh\x00-c\x00")) {
			out = append(out, pid)
		}
	}
	return out
}

// jobProcs returns the live processes started for the job whose state
// file is state: its stand-by, its daemon, a start a stand-by execs.
func jobProcs(state string) []int {
	ents, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if err != nil || !bytes.Contains(b, []byte("\x00--state\x00"+state+"\x00")) {
			continue
		}
		if st, err := os.ReadFile("/proc/" + e.Name() + "/stat"); err == nil {
			if i := bytes.LastIndexByte(st, ')'); i > 0 && len(st) > i+2 && st[i+2] == 'Z' {
				continue // a zombie: gone, not reaped yet
			}
		}
		out = append(out, pid)
	}
	return out
}

type procMem struct{ rss, pss, uss int64 }

// memKiB returns a process's resident (Rss), proportional (Pss) and
// private (Private_Clean + Private_Dirty: USS) memory in KiB, from
// /proc/PID/smaps_rollup.
func memKiB(pid int) procMem {
	var m procMem
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/smaps_rollup")
	if err != nil {
		return m
	}
	for line := range strings.Lines(string(b)) {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		n, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		switch k {
		case "Rss":
			m.rss = n
		case "Pss":
			m.pss = n
		case "Private_Clean", "Private_Dirty":
			m.uss += n
		}
	}
	return m
}

// TestCLINodeTunnelOutOfDescriptors: a node daemon that runs out of file
// descriptors for a moment (a job's clients hold many connections) takes
// the next job's attachment once they are let go; its attach socket must
// not stop at the shortage.
func TestCLINodeTunnelOutOfDescriptors(t *testing.T) {
	sshd := sshtest.StartSSHD(t, sshtest.Options{})
	a, b := newSimJob(t), newSimJob(t)
	a.start(t, sshd)
	t.Cleanup(func() { run(t, "perjob", "", "stop", "--state", a.state) })
	pa := a.proxyState(t)

	// Leave the daemon four descriptors, and take them with connections
	// to job a's proxy (they wait in their handshake: 10 s at most).
	fds, err := os.ReadDir("/proc/" + strconv.Itoa(pa.PID) + "/fd")
	require.NoError(t, err)
	var lim unix.Rlimit
	require.NoError(t, unix.Prlimit(pa.PID, unix.RLIMIT_NOFILE, nil, &lim))
	low := unix.Rlimit{Cur: uint64(len(fds) + 4), Max: lim.Max}
	require.NoError(t, unix.Prlimit(pa.PID, unix.RLIMIT_NOFILE, &low, nil))
	var held []net.Conn
	release := func() {
		for _, c := range held {
			c.Close()
		}
		held = nil
	}
	t.Cleanup(release)
	for range 12 {
		c, err := net.DialTimeout("tcp", pa.Addr(), 5*time.Second)
		require.NoError(t, err)
		held = append(held, c)
	}
	daemonLog := func() string { return readFile(a.state, ".log") }
	require.Eventually(t, func() bool { return strings.Contains(daemonLog(), "too many open files") },
		5*time.Second, 20*time.Millisecond, "the daemon never ran out of descriptors; its log:\n%s", daemonLog())

	// Job b attaches meanwhile: its request waits in the attach socket's
	// backlog while the daemon has no descriptor to accept it with.
	started := make(chan result, 1)
	go func() {
		started <- run(t, "perjob", "", "start", "--via", "sshtest", "--ssh-config", sshd.SSHConfigFile,
			"--state", b.state, "--watch-pid", strconv.Itoa(b.script.Process.Pid), "--timeout", "30s")
	}()
	t.Cleanup(func() { run(t, "perjob", "", "stop", "--state", b.state) })
	ss := testenv.LookPath(t, "ss")
	waiting := func() bool { // a connection in the attach socket's backlog
		out, _ := exec.Command(ss, "-xlH").Output()
		for line := range strings.Lines(string(out)) {
			if f := strings.Fields(line); len(f) > 4 && f[4] == pa.Node.Socket {
				return f[2] != "0"
			}
		}
		return false
	}
	require.Eventually(t, waiting, 10*time.Second, 20*time.Millisecond, "job b's attachment never reached the attach socket")
	time.Sleep(100 * time.Millisecond) // the daemon tries to accept it, and cannot
	release()
	require.NoError(t, unix.Prlimit(pa.PID, unix.RLIMIT_NOFILE, &lim, nil))
	r := <-started
	require.Equal(t, 0, r.code, "start: %s\nlog:\n%s\ndaemon's log:\n%s", r.stderr, readFile(b.state, ".log"), daemonLog())
	assert.Equal(t, pa.PID, b.proxyState(t).PID, "job b attached to the node daemon")
	assert.Contains(t, daemonLog(), `accept failed; retrying" addr=`+pa.Node.Socket, "the attach socket never ran short")
}
