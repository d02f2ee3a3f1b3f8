// Package e2e runs hpcproxy end to end on a simulated cluster built on this
// machine: three network namespaces (compute: no route out; login: an
// OpenSSH sshd and the Slurm controller; internet: HTTP, HTTPS and git
// servers), a non-root test user with its own keys, and a single-node Slurm
// whose node is the compute namespace. It needs root; under CI=true nothing
// here skips.
//
// Every node is a network namespace plus, per process, a private UTS
// namespace (its own hostname, so Slurm's submit host and the state file's
// host name the node) and a private mount namespace in which the node's own
// hosts file is bound over /etc/hosts: compute resolves login and compute,
// login also resolves the internet host, so names of the internet must be
// resolved through the tunnel (socks5h, HTTP CONNECT). Traffic stays inside
// the namespaces the test makes: the root namespace gets no address or
// route toward them.
//
// Run it as root with the rest of the suite (scripts/test-all.sh, which
// .ci/run calls after installing slurm-wlm, munge, git and wget), or alone:
//
//	CI=true go test -v -run TestCluster ./test/e2e/
//
// Every scenario is bounded in time, and the whole suite by suiteLimit (9
// minutes): past it the running scenario fails saying so, the rest fail at
// once, and teardown still runs. A failure prints the job outputs and
// every log: the per-job daemon's, sshd's, slurmctld's, slurmd's, munged's
// and the internet servers'.
// HPCPROXY_E2E_KEEP=1 keeps the cluster's files (not its processes).
package e2e

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"math/big"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/hpcproxy/hpcproxy/internal/sshtest"
	"github.com/hpcproxy/hpcproxy/internal/testenv"
)

// The cluster's names and addresses. The addresses live only on veths
// between the test's own namespaces.
const (
	internetHost = "www.internet.test"

	computeAddr  = "10.231.1.1"
	loginAddr    = "10.231.1.2"
	loginUpAddr  = "10.231.2.1"
	internetAddr = "10.231.2.2"
)

// node is one simulated machine.
type node struct {
	name  string // hostname inside the node: "compute", "login", "internet"
	ns    string // network namespace
	hosts string // hosts file bound over /etc/hosts
}

// testUser is a throwaway account with a home of its own.
type testUser struct {
	name     string
	uid, gid int
	home     string
}

// cluster is the whole simulated cluster.
type cluster struct {
	t   *testing.T
	dir string // root of every file the cluster uses (0755)
	bin string // perjob, shared, e2efetch

	compute, login, internet node
	computeDev               string // compute's veth toward login

	user, other *testUser
	userNames   []string // accounts useradd made, deleted last by teardown

	caFile     string
	bigSHA     string // sha256 of /files/big.bin
	bigSize    int
	repoCommit string // subject of the served repository's commit

	sshdDir  string
	sshdCfg  string
	sshdLog  string
	nodeTmp  string // TMPDIR handed to jobs (node-local tmp)
	slurmDir string
	slurmCfg string
	mungeDir string

	mu    sync.Mutex
	procs []*proc
	sshd  *proc

	deadline time.Time // the suite's time limit (suiteLimit from its start)
}

// suiteLimit bounds the whole suite. Past it every wait and command of the
// cluster gives up and the test fails saying so, with time left for
// teardown and the logs before go test's default -timeout of 10 minutes
// (which would kill the binary without either).
const suiteLimit = 9 * time.Minute

// bounded cuts timeout to what is left of the suite's time.
func (c *cluster) bounded(timeout time.Duration) time.Duration {
	if c.deadline.IsZero() {
		return timeout
	}
	return min(timeout, time.Until(c.deadline))
}

// overTime reports whether the suite's time is up.
func (c *cluster) overTime() bool {
	return !c.deadline.IsZero() && !time.Now().Before(c.deadline)
}

// checkTime fails t if the suite's time is up.
func (c *cluster) checkTime(t testing.TB) {
	t.Helper()
	if c.overTime() {
		t.Fatalf("the e2e suite's time limit of %s is reached", suiteLimit)
	}
}

// proc is a long-running process the cluster started.
type proc struct {
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{}
}

func (p *proc) running() bool {
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

var buildOnce struct {
	sync.Once
	dir string
	err error
	out []byte
}

// newCluster builds the cluster for t and tears it down in t.Cleanup, also
// after a failure: processes in its namespaces and of its users are
// killed, namespaces, users and files removed.
func newCluster(t *testing.T) *cluster {
	t.Helper()
	testenv.RequireRoot(t)
	for _, p := range []string{"ip", "nsenter", "unshare", "setpriv", "curl", "wget", "git", "java", "sbatch", "slurmctld", "slurmd", "munged", "mungekey", "useradd"} {
		testenv.LookPath(t, p)
	}
	testenv.RequireFile(t, sshtest.SSHDPath, "apt-get install openssh-server")
	testenv.RequireFile(t, gitHTTPBackend, "apt-get install git")
	_, err := user.Lookup("munge")
	testenv.Require(t, err == nil, "no munge user (apt-get install munge)")

	dir, err := os.MkdirTemp("", "hpe2e")
	if err != nil {
		t.Fatal(err)
	}
	chmod(t, dir, 0o755)
	id := strconv.Itoa(os.Getpid() % 100000)
	c := &cluster{
		t:        t,
		dir:      dir,
		bin:      filepath.Join(dir, "bin"),
		deadline: time.Now().Add(suiteLimit),
	}
	c.compute = node{name: "compute", ns: "hpe2e-" + id + "-compute", hosts: filepath.Join(dir, "hosts", "compute")}
	c.login = node{name: "login", ns: "hpe2e-" + id + "-login", hosts: filepath.Join(dir, "hosts", "login")}
	c.internet = node{name: "internet", ns: "hpe2e-" + id + "-internet", hosts: filepath.Join(dir, "hosts", "internet")}
	t.Cleanup(c.teardown)

	start := time.Now()
	c.buildBinaries()
	c.network(id)
	c.users()
	c.startInternet()
	c.startSSHD()
	c.startSlurm()
	t.Logf("cluster up in %s (dir %s)", time.Since(start).Round(time.Millisecond), dir)
	return c
}

// buildBinaries compiles the example binaries and the Go client into
// c.bin, readable by the test users.
func (c *cluster) buildBinaries() {
	c.t.Helper()
	mkdir(c.t, c.bin, 0o755)
	cmd := exec.Command("go", "build", "-o", c.bin+"/",
		"github.com/hpcproxy/hpcproxy/examples/perjob",
		"github.com/hpcproxy/hpcproxy/examples/shared",
		"github.com/hpcproxy/hpcproxy/test/e2e/cmd/e2efetch")
	if out, err := cmd.CombinedOutput(); err != nil {
		c.t.Fatalf("go build: %v\n%s", err, out)
	}
}

// network creates the namespaces, veths and hosts files.
func (c *cluster) network(id string) {
	t := c.t
	mkdir(t, filepath.Join(c.dir, "hosts"), 0o755)
	base := "127.0.0.1 localhost\n::1 localhost\n"
	writeFile(t, c.compute.hosts, base+computeAddr+" compute\n"+loginAddr+" login\n", 0o644)
	writeFile(t, c.login.hosts, base+loginAddr+" login\n"+computeAddr+" compute\n"+internetAddr+" "+internetHost+"\n", 0o644)
	writeFile(t, c.internet.hosts, base+internetAddr+" internet "+internetHost+"\n", 0o644)

	for _, n := range []node{c.compute, c.login, c.internet} {
		run(t, "ip", "netns", "add", n.ns)
		run(t, "ip", "-n", n.ns, "link", "set", "lo", "up")
	}
	c.computeDev = "e2c" + id
	loginDown, loginUp, inetDev := "e2l"+id, "e2u"+id, "e2i"+id
	// Veths are created directly inside the namespaces: the root
	// namespace never holds an end, an address or a route.
	run(t, "ip", "link", "add", c.computeDev, "netns", c.compute.ns, "type", "veth", "peer", "name", loginDown, "netns", c.login.ns)
	run(t, "ip", "link", "add", loginUp, "netns", c.login.ns, "type", "veth", "peer", "name", inetDev, "netns", c.internet.ns)
	for _, a := range [][3]string{
		{c.compute.ns, c.computeDev, computeAddr},
		{c.login.ns, loginDown, loginAddr},
		{c.login.ns, loginUp, loginUpAddr},
		{c.internet.ns, inetDev, internetAddr},
	} {
		run(t, "ip", "-n", a[0], "addr", "add", a[2]+"/24", "dev", a[1])
		run(t, "ip", "-n", a[0], "link", "set", a[1], "up")
	}
	// login must not route between its two sides: compute has no way out
	// but the tunnel.
	run(t, "ip", "netns", "exec", c.login.ns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=0")
}

// users creates the test user (keys, known_hosts, ssh config) and another
// user of the same node.
func (c *cluster) users() {
	t := c.t
	homes := filepath.Join(c.dir, "home")
	mkdir(t, homes, 0o755)
	suffix := strconv.Itoa(os.Getpid() % 100000)
	c.user = c.addUser("e2eu"+suffix, homes)
	c.other = c.addUser("e2eo"+suffix, homes)

	dotSSH := filepath.Join(c.user.home, ".ssh")
	mkdir(t, dotSSH, 0o700)
	signer := sshtest.GenerateKeyFile(t, "ed25519", filepath.Join(dotSSH, "id_ed25519"))
	writeFile(t, filepath.Join(dotSSH, "authorized_keys"), string(ssh.MarshalAuthorizedKey(signer.PublicKey())), 0o600)
	// The test user's ~/.ssh/config, found through the passwd home as ssh
	// finds it.
	writeFile(t, filepath.Join(dotSSH, "config"), strings.Join([]string{
		"Host login",
		"  HostName login",
		"  IdentityFile ~/.ssh/id_ed25519",
		"  IdentitiesOnly yes",
		"Host *",
		"  BatchMode yes",
		"  StrictHostKeyChecking yes",
		"  GlobalKnownHostsFile /dev/null",
		"  GSSAPIAuthentication no",
		"",
	}, "\n"), 0o600)

	c.nodeTmp = filepath.Join(c.dir, "nodetmp")
	mkdir(t, c.nodeTmp, os.ModeSticky|0o777)
	chownR(t, c.user.home, c.user)
}

func (c *cluster) addUser(name, homes string) *testUser {
	t := c.t
	home := filepath.Join(homes, name)
	// Stale from a killed run with the same PID: ours by name.
	_ = exec.Command("userdel", name).Run()
	// useradd fails while another holds the passwd lock (another
	// package's tests may add a user beside this one): try again.
	for try := 0; ; try++ {
		out, err := exec.Command("useradd", "-M", "-U", "-d", home, "-s", "/bin/sh", "-p", "*", name).CombinedOutput()
		if err == nil {
			break
		}
		if try == 20 || !strings.Contains(string(out), "lock") {
			t.Fatalf("useradd %s: %v\n%s", name, err, out)
		}
		time.Sleep(250 * time.Millisecond)
	}
	// Deleted by teardown once their processes are gone: a t.Cleanup here
	// would run before teardown (cleanups run last-in first-out), while
	// the users' daemons and jobs still run, and userdel refuses a user
	// with processes.
	c.userNames = append(c.userNames, name)
	u, err := user.Lookup(name)
	if err != nil {
		t.Fatal(err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	tu := &testUser{name: name, uid: uid, gid: gid, home: home}
	mkdir(t, home, 0o700)
	chownR(t, home, tu)
	return tu
}

// env is the clean environment a user's login shell would have on a node.
func (c *cluster) env(u *testUser, extra ...string) []string {
	env := []string{
		"HOME=" + u.home, "USER=" + u.name, "LOGNAME=" + u.name, "SHELL=/bin/sh",
		"PATH=" + c.bin + ":/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
		"LANG=C.UTF-8",
		"SLURM_CONF=" + c.slurmCfg,
		"TMPDIR=" + c.nodeTmp,
		"CURL_CA_BUNDLE=" + c.caFile, "SSL_CERT_FILE=" + c.caFile, "GIT_SSL_CAINFO=" + c.caFile,
	}
	return append(env, extra...)
}

// command returns a command that runs args on node n as user u (root if
// nil) with exactly env.
func (c *cluster) command(ctx context.Context, n node, u *testUser, env []string, args ...string) *exec.Cmd {
	// nsenter keeps the root namespace's /sys (Slurm needs its cgroup
	// mounts; `ip netns exec` would mount a fresh sysfs); unshare gives
	// the process its own hostname and a private mount namespace for the
	// node's hosts file.
	argv := []string{"--net=/run/netns/" + n.ns, "unshare", "--mount", "--uts", "--",
		"/bin/sh", "-c", `hostname "$0" && mount --bind "$1" /etc/hosts && shift && exec "$@"`, n.name, n.hosts}
	if u != nil {
		argv = append(argv, "setpriv", "--reuid", strconv.Itoa(u.uid), "--regid", strconv.Itoa(u.gid), "--init-groups")
	}
	argv = append(argv, "env", "-i")
	argv = append(argv, env...)
	argv = append(argv, args...)
	cmd := exec.CommandContext(ctx, "nsenter", argv...)
	if u != nil {
		cmd.Dir = u.home
	} else {
		cmd.Dir = c.dir
	}
	cmd.WaitDelay = 2 * time.Second
	return cmd
}

// result is what a short command did.
type result struct {
	out, err string
	code     int
	elapsed  time.Duration
}

func (r result) String() string {
	return fmt.Sprintf("exit %d after %s\nstdout:\n%s\nstderr:\n%s", r.code, r.elapsed.Round(time.Millisecond), r.out, r.err)
}

// runOn runs args on n as u, bounded by timeout and the suite's time
// limit.
func (c *cluster) runOn(n node, u *testUser, env []string, timeout time.Duration, args ...string) result {
	return c.runLimited(n, u, env, timeout, true, args...)
}

// cleanupOn is runOn without the suite's time limit, for clean-up that
// must run after it too (scancel).
func (c *cluster) cleanupOn(n node, u *testUser, env []string, timeout time.Duration, args ...string) result {
	return c.runLimited(n, u, env, timeout, false, args...)
}

func (c *cluster) runLimited(n node, u *testUser, env []string, timeout time.Duration, suiteLimited bool, args ...string) result {
	limit := timeout
	if suiteLimited {
		limit = c.bounded(timeout)
	}
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	cmd := c.command(ctx, n, u, env, args...)
	var so, se bytes.Buffer
	cmd.Stdout, cmd.Stderr = &so, &se
	start := time.Now()
	err := cmd.Run()
	r := result{out: so.String(), err: se.String(), elapsed: time.Since(start)}
	if err != nil {
		r.code = -1
		if ee, ok := err.(*exec.ExitError); ok && ee.ExitCode() >= 0 {
			r.code = ee.ExitCode()
		}
		switch {
		case ctx.Err() != nil && suiteLimited && c.overTime():
			r.err += fmt.Sprintf("\n[killed: the e2e suite's time limit of %s is reached]", suiteLimit)
		case ctx.Err() != nil:
			r.err += fmt.Sprintf("\n[killed after the %s timeout]", timeout)
		}
	}
	return r
}

// spawn starts a long-running process on n as root with its output in a
// log file, and registers it for teardown.
func (c *cluster) spawn(name string, n node, env []string, args ...string) *proc {
	p := &proc{name: name, log: filepath.Join(c.dir, "logs", name+".out"), done: make(chan struct{})}
	_ = os.MkdirAll(filepath.Dir(p.log), 0o755)
	f, err := os.OpenFile(p.log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		panic(err) // the cluster's own dir: cannot fail short of a broken machine
	}
	defer f.Close()
	p.cmd = c.command(context.Background(), n, nil, env, args...)
	p.cmd.Stdout, p.cmd.Stderr = f, f
	if err := p.cmd.Start(); err != nil {
		close(p.done)
		fmt.Fprintf(f, "start %s: %v\n", name, err)
		return p
	}
	go func() { _ = p.cmd.Wait(); close(p.done) }()
	c.mu.Lock()
	c.procs = append(c.procs, p)
	c.mu.Unlock()
	return p
}

// kill ends p and every process below it (sshd's session processes,
// slurmstepd) and waits for p.
func (c *cluster) kill(p *proc) {
	if p == nil || p.cmd.Process == nil || !p.running() {
		return
	}
	pids := descendants(p.cmd.Process.Pid)
	_ = p.cmd.Process.Kill()
	for _, pid := range pids {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	select {
	case <-p.done:
	case <-time.After(5 * time.Second):
		c.t.Logf("%s (pid %d) did not exit after SIGKILL", p.name, p.cmd.Process.Pid)
	}
}

// teardown kills everything the cluster started and removes what it made.
func (c *cluster) teardown() {
	t := c.t
	if t.Failed() {
		c.dumpLogs()
	}
	// Processes of the test users (detached daemons included), then every
	// process left in the namespaces, each by PID: all of them are ours.
	for _, u := range []*testUser{c.user, c.other} {
		if u != nil {
			for _, pid := range pidsOfUser(u.uid) {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	}
	c.mu.Lock()
	procs := append([]*proc(nil), c.procs...)
	c.mu.Unlock()
	for _, p := range procs {
		c.kill(p)
	}
	for _, n := range []node{c.compute, c.login, c.internet} {
		if n.ns == "" {
			continue
		}
		if out, err := exec.Command("ip", "netns", "pids", n.ns).Output(); err == nil {
			for _, f := range strings.Fields(string(out)) {
				if pid, err := strconv.Atoi(f); err == nil {
					_ = syscall.Kill(pid, syscall.SIGKILL)
				}
			}
		}
		if _, err := os.Stat("/run/netns/" + n.ns); err == nil {
			if out, err := exec.Command("ip", "netns", "del", n.ns).CombinedOutput(); err != nil {
				t.Errorf("ip netns del %s: %v %s", n.ns, err, out)
			}
		}
	}
	if os.Getenv("HPCPROXY_E2E_KEEP") == "" {
		_ = os.RemoveAll(c.dir)
	} else {
		t.Logf("kept %s (HPCPROXY_E2E_KEEP)", c.dir)
	}
	// Last, once every process of theirs killed above has exited (userdel
	// refuses a user with processes, zombies included).
	deadline := time.Now().Add(5 * time.Second)
	for _, u := range []*testUser{c.user, c.other} {
		for u != nil && len(pidsOfUser(u.uid)) > 0 && time.Now().Before(deadline) {
			for _, pid := range pidsOfUser(u.uid) {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	for _, name := range c.userNames {
		if out, err := exec.Command("userdel", name).CombinedOutput(); err != nil {
			t.Errorf("userdel %s: %v %s", name, err, out)
		}
	}
}

// dumpLogs prints every log the cluster has, for a failure to be
// diagnosed from the test output alone.
func (c *cluster) dumpLogs() {
	var files []string
	_ = filepath.Walk(c.dir, func(p string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() && (strings.HasSuffix(p, ".log") || strings.HasSuffix(p, ".out")) {
			files = append(files, p)
		}
		return nil
	})
	for _, f := range files {
		c.t.Logf("==== %s ====\n%s", f, tail(f, 150))
	}
}

// tail returns the last n lines of a file.
func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = append([]string{fmt.Sprintf("[... %d lines before]", len(lines)-n)}, lines[len(lines)-n:]...)
	}
	return strings.Join(lines, "\n")
}

// pidsOfUser lists the processes whose real UID is uid.
func pidsOfUser(uid int) []int {
	ents, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		var st syscall.Stat_t
		if syscall.Stat("/proc/"+e.Name(), &st) == nil && int(st.Uid) == uid {
			out = append(out, pid)
		}
	}
	return out
}

// descendants returns the processes below pid, deepest first.
func descendants(pid int) []int {
	children := map[int][]int{}
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		p, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		children[ppidOf(p)] = append(children[ppidOf(p)], p)
	}
	var walk func(int) []int
	walk = func(p int) []int {
		var out []int
		for _, ch := range children[p] {
			out = append(out, walk(ch)...)
			out = append(out, ch)
		}
		return out
	}
	return walk(pid)
}

func ppidOf(pid int) int {
	f, err := os.Open("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return -1
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "PPid:"); ok {
			n, _ := strconv.Atoi(strings.TrimSpace(v))
			return n
		}
	}
	return -1
}

func pidAlive(pid int) bool {
	if pid <= 0 {
		return false
	}
	// A zombie is gone for our purposes.
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	s := string(b)
	if i := strings.LastIndexByte(s, ')'); i >= 0 && i+2 < len(s) {
		return s[i+2] != 'Z'
	}
	return true
}

// startInternet runs the internet's servers: the test binary re-executed
// inside the internet namespace (see TestMain and internet_test.go).
func (c *cluster) startInternet() {
	t := c.t
	dir := filepath.Join(c.dir, "internet")
	mkdir(t, dir, 0o755)
	c.caFile = filepath.Join(c.dir, "ca.pem")
	writeTestPKI(t, c.caFile, filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem"), internetHost)

	files := filepath.Join(dir, "www", "files")
	mkdir(t, files, 0o755)
	c.bigSize = 3 << 20
	big := make([]byte, c.bigSize)
	_, _ = rand.Read(big)
	writeFile(t, filepath.Join(files, "big.bin"), string(big), 0o644)
	sum := sha256.Sum256(big)
	c.bigSHA = hex.EncodeToString(sum[:])
	writeFile(t, filepath.Join(files, "hello.txt"), "hello from the internet\n", 0o644)

	// A bare repository with one commit, served by git-http-backend.
	c.repoCommit = "e2e: the repository a job clones"
	work := filepath.Join(dir, "work")
	mkdir(t, work, 0o755)
	writeFile(t, filepath.Join(work, "README"), "cloned through hpcproxy\n", 0o644)
	git := func(args ...string) {
		t.Helper()
		cmd := exec.Command("git", append([]string{"-c", "user.name=e2e", "-c", "user.email=e2e@internet.test", "-c", "init.defaultBranch=main"}, args...)...)
		cmd.Env = append(os.Environ(), "GIT_CONFIG_NOSYSTEM=1", "HOME="+dir)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("git %v: %v\n%s", args, err, out)
		}
	}
	git("-C", work, "init", "-q")
	git("-C", work, "add", "README")
	git("-C", work, "commit", "-q", "-m", c.repoCommit)
	git("clone", "-q", "--bare", work, filepath.Join(dir, "git", "repo.git"))

	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	p := c.spawn("internet", c.internet, []string{roleEnv + "=internet", "HPCPROXY_E2E_DIR=" + dir, "PATH=/usr/bin:/bin"}, exe)
	c.waitFor(c.t, "internet servers", 15*time.Second, p, func() bool {
		b, _ := os.ReadFile(p.log)
		return strings.Contains(string(b), "READY")
	})
}

// startSSHD runs the login node's OpenSSH server on port 22 of login.
func (c *cluster) startSSHD() {
	t := c.t
	c.sshdDir = filepath.Join(c.dir, "sshd")
	mkdir(t, c.sshdDir, 0o700)
	mkdir(t, "/run/sshd", 0o755)
	hostKey := filepath.Join(c.sshdDir, "ssh_host_ed25519_key")
	signer := sshtest.GenerateKeyFile(t, "ed25519", hostKey)
	c.sshdCfg = filepath.Join(c.sshdDir, "sshd_config")
	c.sshdLog = filepath.Join(c.sshdDir, "sshd.log")
	writeFile(t, c.sshdCfg, strings.Join([]string{
		"Port 22",
		"ListenAddress " + loginAddr,
		"HostKey " + hostKey,
		"PidFile " + filepath.Join(c.sshdDir, "sshd.pid"),
		"UsePAM no",
		"PasswordAuthentication no",
		"KbdInteractiveAuthentication no",
		"PubkeyAuthentication yes",
		"PermitRootLogin no",
		"StrictModes no",
		"AllowTcpForwarding yes",
		"AllowStreamLocalForwarding yes",
		"X11Forwarding no",
		"PrintMotd no",
		"MaxStartups 100:30:200",
		"MaxSessions 100",
		"ClientAliveInterval 0",
		"LogLevel VERBOSE",
		"",
	}, "\n"), 0o600)
	// The user knows the login node's host key by name and address.
	writeFile(t, filepath.Join(c.user.home, ".ssh", "known_hosts"),
		knownHostsLine([]string{"login", loginAddr}, signer.PublicKey()), 0o600)
	chownR(t, filepath.Join(c.user.home, ".ssh"), c.user)
	c.sshdUp(t)
}

// sshdUp starts sshd (again) and waits until the user can log in.
func (c *cluster) sshdUp(t testing.TB) {
	t.Helper()
	c.sshd = c.spawn("sshd", c.login, c.slurmEnv(), sshtest.SSHDPath, "-D", "-f", c.sshdCfg, "-E", c.sshdLog)
	c.waitFor(t, "sshd login", 15*time.Second, c.sshd, func() bool {
		r := c.runOn(c.compute, c.user, c.env(c.user), 5*time.Second, "ssh", "login", "true")
		return r.code == 0
	})
}

// sshdDown kills sshd and every session it serves.
func (c *cluster) sshdDown() {
	c.kill(c.sshd)
}

// startSlurm runs munged, slurmctld on login and slurmd on compute, and
// waits for the node to be idle.
func (c *cluster) startSlurm() {
	t := c.t
	c.mungeDir = filepath.Join(c.dir, "munge")
	mungeRun := filepath.Join(c.dir, "munge-run")
	mu, err := user.Lookup("munge")
	if err != nil {
		t.Fatal(err)
	}
	muid, _ := strconv.Atoi(mu.Uid)
	mgid, _ := strconv.Atoi(mu.Gid)
	for _, d := range []struct {
		p    string
		mode os.FileMode
	}{{c.mungeDir, 0o700}, {mungeRun, 0o755}} {
		mkdir(t, d.p, d.mode)
		if err := os.Chown(d.p, muid, mgid); err != nil {
			t.Fatal(err)
		}
	}
	key := filepath.Join(c.mungeDir, "munge.key")
	sock := filepath.Join(mungeRun, "munge.sock")
	asMunge := []string{"setpriv", "--reuid", mu.Uid, "--regid", mu.Gid, "--clear-groups"}
	run(t, append(asMunge, "mungekey", "-c", "-k", key)...)
	// munged serves a unix socket: the same file in every namespace.
	munged := c.spawn("munged", c.login, c.slurmEnv(), append(asMunge, "munged", "-F", "--key-file="+key, "--socket="+sock,
		"--pid-file="+filepath.Join(mungeRun, "munged.pid"), "--log-file="+filepath.Join(c.mungeDir, "munged.log"),
		"--seed-file="+filepath.Join(c.mungeDir, "seed"))...)
	c.waitFor(c.t, "munged", 10*time.Second, munged, func() bool { _, err := os.Stat(sock); return err == nil })

	c.slurmDir = filepath.Join(c.dir, "slurm")
	mkdir(t, c.slurmDir, 0o755)
	mkdir(t, filepath.Join(c.slurmDir, "ctld"), 0o700)
	mkdir(t, filepath.Join(c.slurmDir, "d"), 0o700)
	c.slurmCfg = filepath.Join(c.slurmDir, "slurm.conf")
	s := func(name string) string { return filepath.Join(c.slurmDir, name) }
	prolog, epilog := c.installContrib()
	writeFile(t, c.slurmCfg, strings.Join([]string{
		"ClusterName=e2e",
		"SlurmctldHost=login(" + loginAddr + ")",
		"SlurmUser=root",
		"SlurmdUser=root",
		"AuthType=auth/munge",
		"AuthInfo=socket=" + sock,
		"CredType=cred/munge",
		"StateSaveLocation=" + s("ctld"),
		"SlurmdSpoolDir=" + s("d"),
		"SlurmctldPidFile=" + s("slurmctld.pid"),
		"SlurmdPidFile=" + s("slurmd.pid"),
		"SlurmctldLogFile=" + s("slurmctld.log"),
		"SlurmdLogFile=" + s("slurmd.log"),
		"MailProg=/bin/true",
		"TaskProlog=" + prolog,
		"TaskEpilog=" + epilog,
		"ProctrackType=proctrack/linuxproc",
		"TaskPlugin=task/none",
		"JobAcctGatherType=jobacct_gather/none",
		"AccountingStorageType=accounting_storage/none",
		"JobCompType=jobcomp/none",
		"MpiDefault=none",
		"SchedulerType=sched/builtin",
		"SelectType=select/cons_tres",
		"SelectTypeParameters=CR_Core",
		"ReturnToService=2",
		"KillWait=5",
		"NodeName=compute NodeAddr=" + computeAddr + " CPUs=2 RealMemory=1000 State=UNKNOWN",
		"PartitionName=e2e Nodes=compute Default=YES MaxTime=10 State=UP OverSubscribe=YES",
		"",
	}, "\n"), 0o644)
	env := c.slurmEnv()
	ctld := c.spawn("slurmctld", c.login, env, "slurmctld", "-D", "-c")
	slurmd := c.spawn("slurmd", c.compute, env, "slurmd", "-D")
	c.waitFor(c.t, "slurm node idle", 30*time.Second, nil, func() bool {
		for _, p := range []*proc{ctld, slurmd} {
			if !p.running() {
				c.t.Fatalf("%s exited: %v\n%s", p.name, p.cmd.ProcessState, tail(p.log, 50))
			}
		}
		r := c.runOn(c.login, nil, env, 5*time.Second, "sinfo", "-h", "-n", "compute", "-o", "%t")
		return strings.TrimSpace(r.out) == "idle"
	})
}

// waitFor polls cond until it holds, failing the test after timeout or
// when p (if set) exits first.
func (c *cluster) waitFor(t testing.TB, what string, timeout time.Duration, p *proc, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if p != nil && !p.running() {
			t.Fatalf("%s: %s exited: %v\n%s", what, p.name, p.cmd.ProcessState, tail(p.log, 50))
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not ready within %s", what, timeout)
		}
		if c.overTime() {
			t.Fatalf("%s: the e2e suite's time limit of %s is reached", what, suiteLimit)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// writeTestPKI writes a test CA (caFile) and a server certificate for
// host signed by it.
func writeTestPKI(t *testing.T, caFile, certFile, keyFile, host string) {
	t.Helper()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "hpcproxy e2e test CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, err := x509.ParseCertificate(caDER)
	if err != nil {
		t.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: host},
		DNSNames:     []string{host},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, caFile, string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})), 0o644)
	writeFile(t, certFile, string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})), 0o644)
	writeFile(t, keyFile, string(pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER})), 0o600)
}

func knownHostsLine(names []string, k ssh.PublicKey) string {
	return strings.Join(names, ",") + " " + strings.TrimSpace(string(ssh.MarshalAuthorizedKey(k))) + "\n"
}

func run(t *testing.T, args ...string) {
	t.Helper()
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

func mkdir(t *testing.T, p string, mode os.FileMode) {
	t.Helper()
	if err := os.MkdirAll(p, mode); err != nil {
		t.Fatal(err)
	}
	chmod(t, p, mode)
}

func chmod(t *testing.T, p string, mode os.FileMode) {
	t.Helper()
	if err := os.Chmod(p, mode); err != nil {
		t.Fatal(err)
	}
}

func writeFile(t *testing.T, p, content string, mode os.FileMode) {
	t.Helper()
	if err := os.WriteFile(p, []byte(content), mode); err != nil {
		t.Fatal(err)
	}
	chmod(t, p, mode)
}

func chownR(t *testing.T, root string, u *testUser) {
	t.Helper()
	err := filepath.Walk(root, func(p string, _ os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		return os.Lchown(p, u.uid, u.gid)
	})
	if err != nil {
		t.Fatal(err)
	}
}
