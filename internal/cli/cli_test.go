package cli

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/hpcproxy/hpcproxy"
	"github.com/hpcproxy/hpcproxy/internal/sshtest"
	"github.com/hpcproxy/hpcproxy/internal/testenv"
)

// The test binary doubles as the example binaries: with envApp set it runs
// App.Main instead of the tests, so `start` can launch it as the daemon.
const envApp = "HPCPROXY_CLI_TEST_APP"

func TestMain(m *testing.M) {
	switch os.Getenv(envApp) {
	case "perjob":
		os.Exit((&App{Name: "perjob", Mode: hpcproxy.ModePerJob}).Main(os.Args[1:]))
	case "shared":
		os.Exit((&App{Name: "shared", Mode: hpcproxy.ModeShared}).Main(os.Args[1:]))
	}
	os.Exit(m.Run())
}

type result struct {
	code           int
	stdout, stderr string
}

// cleanEnv is the environment of the commands: no scheduler, no proxy,
// no via host from the developer's shell.
func cleanEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		switch {
		case strings.HasPrefix(k, "SLURM_"), strings.HasPrefix(k, "PBS_"), strings.HasPrefix(k, "LSB_"),
			strings.HasPrefix(k, "FLUX_"), strings.HasPrefix(k, "_CONDOR"), k == "JOB_ID", k == "SGE_O_HOST",
			strings.HasSuffix(strings.ToLower(k), "_proxy"), k == hpcproxy.EnvVia, k == envApp:
			continue
		}
		env = append(env, kv)
	}
	return env
}

// run runs the test binary as app with args.
func run(t testing.TB, app string, stdin string, args ...string) result {
	t.Helper()
	return runEnv(t, app, nil, stdin, args...)
}

// runEnv is run with env added to the clean environment.
func runEnv(t testing.TB, app string, env []string, stdin string, args ...string) result {
	t.Helper()
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(append(cleanEnv(), env...), envApp+"="+app)
	cmd.Stdin = strings.NewReader(stdin)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("run %s %v: %v", app, args, err)
	}
	return result{code, out.String(), errb.String()}
}

// webServer answers with the request's path and Via header, so a test can
// tell whether a request came through the proxy.
func webServer(t *testing.T) (port string) {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "path=%s via=%s", r.URL.Path, r.Header.Get("Via"))
	}))
	t.Cleanup(srv.Close)
	_, port, _ = net.SplitHostPort(srv.Listener.Addr().String())
	return port
}

// loopbackHostname returns a name for this machine that resolves to
// loopback but is not in no_proxy, so a client sends it to the proxy and
// the far side resolves it.
func loopbackHostname(t *testing.T) string {
	t.Helper()
	h, err := os.Hostname()
	require.NoError(t, err)
	addrs, _ := net.LookupHost(h)
	ok := len(addrs) > 0 && h != "localhost"
	for _, a := range addrs {
		if ip := net.ParseIP(a); ip == nil || !ip.IsLoopback() {
			ok = false
		}
	}
	testenv.Require(t, ok, "hostname %q must resolve to loopback only (got %v); add it to /etc/hosts", h, addrs)
	return h
}

func TestCLIPerJob(t *testing.T) {
	curl := testenv.LookPath(t, "curl")
	sshd := sshtest.StartSSHD(t, sshtest.Options{})
	state := filepath.Join(sshtest.PrivateTempDir(t), "proxy.json")
	host := loopbackHostname(t)
	port := webServer(t)
	target := "http://" + net.JoinHostPort(host, port)

	r := run(t, "perjob", "", "start", "--via", "sshtest", "--ssh-config", sshd.SSHConfigFile, "--state", state, "--watch-pid", "-1")
	require.Equal(t, 0, r.code, "start: %s\nlog:\n%s", r.stderr, readFile(state, ".log"))
	assert.Empty(t, r.stdout, "start is quiet on success")
	t.Cleanup(func() { run(t, "perjob", "", "stop", "--state", state) })

	r = run(t, "perjob", "", "start", "--via", "sshtest", "--ssh-config", sshd.SSHConfigFile, "--state", state)
	require.Equal(t, 0, r.code, "second start: %s", r.stderr)
	assert.Regexp(t, `^already running: pid \d+ on \S+, 127\.0\.0\.1:\d+ via sshtest \(up\)\n$`, r.stdout, "a second start reports the running proxy, also without -v")

	r = run(t, "perjob", "", "status", "--state", state)
	require.Equal(t, 0, r.code, r.stderr)
	assert.Contains(t, r.stdout, "state:       alive")
	assert.Contains(t, r.stdout, "method:      gossh")
	assert.Contains(t, r.stdout, "tunnel:      up")
	assert.Contains(t, r.stdout, "log:         "+strings.TrimSuffix(state, ".json")+".log")

	// env's output, evaluated by sh, sends curl through the proxy (Via).
	r = run(t, "perjob", "", "env", "--state", state)
	require.Equal(t, 0, r.code, r.stderr)
	assert.Contains(t, r.stdout, "export http_proxy=")
	assert.Contains(t, r.stdout, "export ALL_PROXY=socks5h://")
	script := r.stdout + "\nexec " + curl + " -sS --max-time 20 " + target + "/env\n"
	out, err := exec.Command("sh", "-c", script).CombinedOutput()
	require.NoError(t, err, "%s", out)
	assert.Equal(t, "path=/env via=1.1 hpcproxy", string(out))

	// The same through csh and fish syntax, evaluated by those shells as
	// the README says; and the JVM's options, which a per-job proxy gets.
	assert.Contains(t, r.stdout, "export JAVA_TOOL_OPTIONS='-Dhttp.proxyHost=127.0.0.1 -Dhttp.proxyPort=")
	for _, sh := range []struct{ shell, eval string }{
		{"tcsh", "eval \"`cat OUT`\"\n"},
		{"fish", "cat OUT | source\n"},
	} {
		prog := testenv.LookPath(t, sh.shell)
		r := runEnv(t, "perjob", []string{"SHELL=" + prog}, "", "env", "--state", state)
		require.Equal(t, 0, r.code, r.stderr)
		out := filepath.Join(t.TempDir(), "env."+sh.shell)
		require.NoError(t, os.WriteFile(out, []byte(r.stdout), 0o600))
		script := strings.ReplaceAll(sh.eval, "OUT", out) + curl + " -sS --max-time 20 " + target + "/" + sh.shell + "\n"
		got, err := exec.Command(prog, "-c", script).CombinedOutput()
		require.NoError(t, err, "%s: %s\n%s", sh.shell, got, r.stdout)
		assert.Equal(t, "path=/"+sh.shell+" via=1.1 hpcproxy", string(got), "%s from $SHELL, output:\n%s", sh.shell, r.stdout)
	}

	// Run by tcsh itself, env speaks csh whatever $SHELL says.
	tcsh := testenv.LookPath(t, "tcsh")
	self, err := os.Executable()
	require.NoError(t, err)
	cmd := exec.Command(tcsh, "-f", "-c", "eval \"`"+self+" env --state "+state+"`\"\n"+curl+" -sS --max-time 20 "+target+"/parent\n")
	cmd.Env = append(cleanEnv(), envApp+"=perjob", "SHELL=/bin/sh")
	got, err := cmd.CombinedOutput()
	require.NoError(t, err, "%s", got)
	assert.Equal(t, "path=/parent via=1.1 hpcproxy", string(got))

	// run -- CMD gets the same environment.
	r = run(t, "perjob", "", "run", "--state", state, "--", curl, "-sS", "--max-time", "20", target+"/run")
	require.Equal(t, 0, r.code, r.stderr)
	assert.Equal(t, "path=/run via=1.1 hpcproxy", r.stdout)
	r = run(t, "perjob", "", "run", "--state", state, "--", "sh", "-c", "exit 7")
	assert.Equal(t, 7, r.code, "run passes on the command's exit status")

	// connect relays stdio (git's ssh ProxyCommand): an HTTP request typed
	// on stdin comes back on stdout.
	req := "GET /connect HTTP/1.0\r\nHost: x\r\n\r\n"
	r = run(t, "perjob", req, "connect", "--state", state, host, port)
	require.Equal(t, 0, r.code, r.stderr)
	assert.Contains(t, r.stdout, "HTTP/1.0 200 OK")
	assert.Contains(t, r.stdout, "path=/connect via=")

	r = run(t, "perjob", "", "stop", "--state", state)
	require.Equal(t, 0, r.code, r.stderr)
	_, err = os.Stat(state)
	assert.True(t, os.IsNotExist(err), "state file removed by stop: %v", err)
	r = run(t, "perjob", "", "status", "--state", state)
	assert.Equal(t, 3, r.code)
	assert.Contains(t, r.stdout, "not running")
}

func TestCLIShared(t *testing.T) {
	curl := testenv.LookPath(t, "curl")
	state := filepath.Join(sshtest.PrivateTempDir(t), "proxy.json")
	port := webServer(t)
	host := loopbackHostname(t)
	target := "http://" + net.JoinHostPort(host, port) + "/shared"

	r := run(t, "shared", "", "start", "--state", state)
	require.Equal(t, 0, r.code, r.stderr)
	t.Cleanup(func() { run(t, "shared", "", "stop", "--state", state) })
	ps, err := hpcproxy.ReadPidFileAt(state)
	require.NoError(t, err)
	addr := "127.0.0.1:" + strconv.Itoa(ps.Port)

	// Without the token: 407. With env's URLs (token inside): through.
	out, _ := exec.Command(curl, "-s", "-o", "/dev/null", "-w", "%{http_code}", "-x", "http://"+addr, target).Output()
	assert.Equal(t, "407", string(out))
	r = run(t, "shared", "", "run", "--state", state, "--", curl, "-sS", "--max-time", "20", target)
	require.Equal(t, 0, r.code, r.stderr)
	assert.Equal(t, "path=/shared via=1.1 hpcproxy", r.stdout)
	r = run(t, "shared", "", "env", "--state", state)
	assert.Contains(t, r.stdout, ps.Credentials.Token, "env carries the token in the proxy URLs")
	assert.NotContains(t, r.stdout, "JAVA_TOOL_OPTIONS", "no proxy properties a JVM could not authenticate to")
}

// TestCLISharedAdvertise: shared start --advertise HOST records the host
// the compute nodes should dial; status and env use it.
func TestCLISharedAdvertise(t *testing.T) {
	state := filepath.Join(sshtest.PrivateTempDir(t), "proxy.json")
	r := run(t, "shared", "", "start", "--state", state, "--advertise", "127.0.0.1")
	require.Equal(t, 0, r.code, r.stderr)
	t.Cleanup(func() { run(t, "shared", "", "stop", "--state", state) })
	ps, err := hpcproxy.ReadPidFileAt(state)
	require.NoError(t, err)
	assert.Equal(t, "127.0.0.1", ps.AdvertiseHost)
	addr := "127.0.0.1:" + strconv.Itoa(ps.Port)

	r = run(t, "shared", "", "status", "--state", state)
	require.Equal(t, 0, r.code, r.stderr)
	assert.Contains(t, r.stdout, "address:     "+addr+"\n")
	r = run(t, "shared", "", "env", "--state", state)
	require.Equal(t, 0, r.code, r.stderr)
	assert.Contains(t, r.stdout, "export http_proxy=http://hpcproxy:"+ps.Credentials.Token+"@"+addr+"\n")

	r = run(t, "shared", "", "start", "--help")
	assert.Contains(t, r.stdout, "-advertise")
	r = run(t, "perjob", "", "start", "--advertise", "x")
	assert.Equal(t, 2, r.code, "per-job proxies listen on 127.0.0.1: nothing to advertise")
}

func TestCLIErrors(t *testing.T) {
	state := filepath.Join(sshtest.PrivateTempDir(t), "proxy.json")

	r := run(t, "perjob", "", "start", "--state", state)
	assert.Equal(t, 1, r.code)
	assert.Contains(t, r.stderr, "--via")
	assert.Empty(t, r.stdout)

	r = run(t, "perjob", "", "env", "--state", state)
	assert.Equal(t, 1, r.code)
	assert.Empty(t, r.stdout, "nothing for eval to run")
	assert.Contains(t, r.stderr, "hint: start one with")

	r = run(t, "perjob", "", "frobnicate")
	assert.Equal(t, 2, r.code)
	assert.Contains(t, r.stderr, "unknown command")

	r = run(t, "perjob", "", "connect", "--state", state, "onlyhost")
	assert.Equal(t, 2, r.code)
	r = run(t, "perjob", "", "run", "--state", state)
	assert.Equal(t, 2, r.code)
	r = run(t, "perjob", "", "start", "--no-such-flag")
	assert.Equal(t, 2, r.code)
	assert.Contains(t, r.stderr, "no-such-flag")

	for _, app := range []string{"perjob", "shared"} {
		r = run(t, app, "", "--help")
		assert.Equal(t, 0, r.code)
		assert.Contains(t, r.stdout, "Usage:")
		for _, cmd := range []string{"start", "stop", "status", "env", "run", "connect"} {
			r = run(t, app, "", cmd, "--help")
			assert.Equal(t, 0, r.code, "%s %s --help", app, cmd)
			assert.Contains(t, r.stdout, "Usage: "+app+" "+cmd, "%s %s --help", app, cmd)
		}
	}
}

func TestCLIStartFailure(t *testing.T) {
	sshd := sshtest.StartSSHD(t, sshtest.Options{})
	sshd.Stop()
	state := filepath.Join(sshtest.PrivateTempDir(t), "proxy.json")
	r := run(t, "perjob", "", "start", "--via", "sshtest", "--ssh-config", sshd.SSHConfigFile,
		"--state", state, "--method", "gossh,socks-unix", "--watch-pid", "-1", "--timeout", "60s")
	assert.Equal(t, 1, r.code)
	assert.Contains(t, r.stderr, "gossh:")
	assert.Contains(t, r.stderr, "socks-unix:")
	assert.Contains(t, r.stderr, "hint:")
	assert.Empty(t, r.stdout)
	_, err := os.Stat(state)
	assert.True(t, os.IsNotExist(err), "no state file after a failed start")
}

func TestMergeEnv(t *testing.T) {
	got := mergeEnv([]string{"A=1", "http_proxy=old", "B=2"}, []string{"http_proxy=new"})
	assert.Equal(t, []string{"A=1", "B=2", "http_proxy=new"}, got)
}

func readFile(statePath, ext string) string {
	b, _ := os.ReadFile(strings.TrimSuffix(statePath, ".json") + ext)
	return string(b)
}

// TestCLIForwardExpose: one start exposes a web server "in the job" on the
// login node and forwards a local port to a login-side service; start
// prints the ssh -L hint, status shows both with counters.
func TestCLIForwardExpose(t *testing.T) {
	sshd := sshtest.StartSSHD(t, sshtest.Options{})
	state := filepath.Join(sshtest.PrivateTempDir(t), "proxy.json")
	port := webServer(t) // the job's "Jupyter"
	svc := webServer(t)  // a login-side service
	lport := strconv.Itoa(sshtest.FreePort(t))

	r := run(t, "perjob", "", "start", "--via", "sshtest", "--ssh-config", sshd.SSHConfigFile, "--state", state,
		"--watch-pid", "-1", "--expose", port, "--forward", lport+"=localhost:"+svc)
	require.Equal(t, 0, r.code, "start: %s\nlog:\n%s", r.stderr, readFile(state, ".log"))
	t.Cleanup(func() { run(t, "perjob", "", "stop", "--state", state) })
	ps, err := hpcproxy.ReadPidFileAt(state)
	require.NoError(t, err)
	require.Len(t, ps.Forwards, 2)
	remote := ps.Forwards[1].Listen
	_, rport, _ := net.SplitHostPort(remote)
	assert.Contains(t, r.stdout, "exposed 127.0.0.1:"+port+" on sshtest at "+remote)
	assert.Contains(t, r.stdout, "on your machine: ssh -N -L "+port+":127.0.0.1:"+rport+" sshtest")

	// The login node's port reaches the job's server; the local port
	// reaches the login side's.
	resp, err := http.Get("http://" + remote + "/lab")
	require.NoError(t, err)
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	assert.Contains(t, string(b), "path=/lab")
	resp, err = http.Get("http://127.0.0.1:" + lport + "/license")
	require.NoError(t, err)
	b, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	assert.Contains(t, string(b), "path=/license")

	require.Eventually(t, func() bool {
		r = run(t, "perjob", "", "status", "--state", state)
		return r.code == 0 && strings.Contains(r.stdout, "1 total")
	}, 30*time.Second, 200*time.Millisecond, "status: %s", r.stdout)
	assert.Contains(t, r.stdout, "forward:     local   127.0.0.1:"+lport+" -> localhost:"+svc+" (up)")
	assert.Contains(t, r.stdout, "forward:     reverse "+remote+" <- 127.0.0.1:"+port+" (up)")
	assert.Contains(t, r.stdout, "ssh -N -L "+port+":127.0.0.1:"+rport+" sshtest")

	r = run(t, "perjob", "", "start", "--expose", "jupyter")
	assert.Equal(t, 1, r.code)
	assert.Contains(t, r.stderr, "--expose")
}
