package e2e

import (
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/hpcproxy/hpcproxy"
)

// downloadsScript defines downloads PREFIX: every client a user would
// point at the proxy fetches through it, each a step of its own, with the
// sha256 of what it got printed as "SHA PREFIX.STEP HEX".
const downloadsScript = `
downloads() {
	p=$1
	step $p.curl-https curl -sS --fail --max-time 60 -o $p.curl-https.bin https://www.internet.test/files/big.bin
	echo "SHA $p.curl-https $(sha $p.curl-https.bin)"
	step $p.curl-socks5h sh -c 'curl -sS --fail --max-time 60 --proxy "$ALL_PROXY" -o "$0" https://www.internet.test/files/big.bin' $p.curl-socks5h.bin
	echo "SHA $p.curl-socks5h $(sha $p.curl-socks5h.bin)"
	step $p.wget-http wget -q -T 60 -t 1 -O $p.wget-http.bin http://www.internet.test/files/big.bin
	echo "SHA $p.wget-http $(sha $p.wget-http.bin)"
	step $p.git-https git clone -q https://www.internet.test/repo.git $p.repo
	echo "GIT $p.git-https $(git -C $p.repo log -1 --format=%s 2>/dev/null)"
	step $p.go-fetch e2efetch https://www.internet.test/files/big.bin
	echo "SHA $p.go-fetch $(sed -n 's/.*sha256=//p' "$scratch/$p.go-fetch.stdout")"
}
`

// downloadSteps are the step names downloads PREFIX reports.
var downloadSteps = []string{"curl-https", "curl-socks5h", "wget-http", "git-https", "go-fetch"}

// checkDownloads asserts that every download of prefix succeeded and
// brought the right bytes (or the right commit).
func (c *cluster) checkDownloads(t *testing.T, output, prefix string) {
	t.Helper()
	for _, s := range downloadSteps {
		name := prefix + "." + s
		wantOK(t, output, name)
		if s == "git-https" {
			if got := field(output, `(?m)^GIT `+regexp.QuoteMeta(name)+` (.*)$`); got != c.repoCommit {
				t.Errorf("%s: cloned commit %q, want %q", name, got, c.repoCommit)
			}
			continue
		}
		if got := field(output, `(?m)^SHA `+regexp.QuoteMeta(name)+` (\S*)$`); got != c.bigSHA {
			t.Errorf("%s: sha256 %q, want %q", name, got, c.bigSHA)
		}
	}
}

func TestCluster(t *testing.T) {
	c := newCluster(t)
	// Each scenario first checks the suite's time limit (see suiteLimit).
	scenario := func(name string, f func(*testing.T)) {
		t.Run(name, func(t *testing.T) {
			c.checkTime(t)
			f(t)
		})
	}

	// Scenario 1: a per-job proxy inside a batch job, its login node named
	// by HPCPROXY_VIA (by address, which the user's known_hosts lists too,
	// so it cannot be mistaken for the submit host), or else found as the
	// job's submit host.
	for _, v := range []struct {
		name, via string
		env       []string
	}{
		{"PerJob/ViaEnv", loginAddr, []string{"HPCPROXY_VIA=" + loginAddr}},
		{"PerJob/ViaSubmitHost", "login", nil},
	} {
		scenario(v.name, func(t *testing.T) { c.perJobJob(t, v.env, v.via) })
	}
	scenario("SiteIntegration", c.siteIntegration)
	scenario("JobStarter", c.jobStarter)
	scenario("Shared", c.sharedMode)
	scenario("Methods", c.methods)
	scenario("OtherUser", c.otherUser)
	scenario("Expose", c.expose)
	scenario("Faults", c.faults)
	scenario("JobArray", c.jobArray)
	scenario("Transparent", c.transparent)
	scenario("Transparent/OtherUser", c.transparentOtherUser)
	scenario("TwoLogins", c.twoLogins)
}

// perJobJob is scenario 1: perjob status in the job must show via as the
// login node the tunnel goes through.
func (c *cluster) perJobJob(t *testing.T, env []string, via string) {
	j := c.sbatch(t, downloadsScript+`
step no-dns sh -c '! getent hosts www.internet.test'
step no-route sh -c '! curl -sS --noproxy "*" --max-time 5 -o /dev/null https://10.231.2.2/'
if perjob start -v; then echo "RESULT start ok"; else echo "RESULT start FAIL"; exit 1; fi
perjob status
eval "$(perjob env)"
downloads perjob
`, env, 2*time.Minute)
	if j.state != "COMPLETED" {
		t.Errorf("job %s ended %s, want COMPLETED", j.id, j.state)
	}
	if !strings.Contains(j.output, "submitted from login") {
		t.Errorf("job was not submitted from login")
	}
	wantOK(t, j.output, "no-dns", "no-route", "start")
	if got := field(j.output, `(?m)^via:\s+(\S+)$`); got != via {
		t.Errorf("perjob status: via %q, want %q", got, via)
	}
	c.checkDownloads(t, j.output, "perjob")

	// The daemon ends with the job and takes its state file along.
	pid := atoi(field(j.output, `pid:\s+(\d+) on compute`))
	state := field(j.output, `state file:\s+(\S+)`)
	if pid <= 0 || state == "" {
		t.Fatalf("perjob status did not show the daemon's pid and state file")
	}
	if want := filepath.Join(c.nodeTmp, "hpcproxy-"+itoa(c.user.uid), "proxy-"+j.id+".json"); state != want {
		t.Errorf("state file %s, want %s (node-local TMPDIR, per job)", state, want)
	}
	c.waitFor(t, "daemon gone after the job", 15*time.Second, nil, func() bool {
		_, err := os.Stat(state)
		return !pidAlive(pid) && os.IsNotExist(err)
	})
}

// sharedMode is scenario 2: a shared proxy on login relaying directly, its
// state file in the user's home (shared with compute, as over NFS), found
// by a job on compute with FindActiveProxy and used with its token; the
// same requests without the token are refused.
func (c *cluster) sharedMode(t *testing.T) {
	r := c.runOn(c.login, c.user, c.env(c.user), time.Minute, "shared", "start", "-v")
	if r.code != 0 {
		t.Fatalf("shared start on login: %s", r)
	}
	t.Logf("shared start: %s", r.out)
	t.Cleanup(func() {
		if r := c.runOn(c.login, c.user, c.env(c.user), 30*time.Second, "shared", "stop", "-v"); r.code != 0 {
			t.Errorf("shared stop: %s", r)
		}
	})
	ps := c.readState(t, filepath.Join(c.user.home, ".local", "share", "hpcproxy", "proxy.json"))
	if ps.Mode != hpcproxy.ModeShared || ps.Host != "login" || ps.Credentials == nil || ps.Credentials.Token == "" {
		t.Fatalf("shared state file: mode %q host %q credentials %v; want shared on login with a token", ps.Mode, ps.Host, ps.Credentials != nil)
	}

	j := c.sbatch(t, downloadsScript+`
step find e2efetch -find
url=$(cat "$scratch/find.stdout")
echo "FOUND $(echo "$url" | sed 's#:[^:@/]*@#:TOKEN@#')"
step find-fetch e2efetch -find https://www.internet.test/files/big.bin
echo "SHA find-fetch $(sed -n 's/.*sha256=//p' "$scratch/find-fetch.stdout")"
eval "$(shared env)"
downloads shared
bare=$(echo "$url" | sed 's#//[^@]*@#//#')
echo "NOTOKEN-CONNECT $(curl -s -o /dev/null --max-time 10 --proxy "$bare" -w '%{http_connect}' https://www.internet.test/files/hello.txt)"
echo "NOTOKEN-GET $(curl -s -o /dev/null --max-time 10 --proxy "$bare" -w '%{http_code}' http://www.internet.test/files/hello.txt)"
curl -sS --max-time 10 --proxy "socks5h://${bare#http://}" -o /dev/null https://www.internet.test/files/hello.txt 2>"$scratch/notoken-socks.stderr"
echo "NOTOKEN-SOCKS exit $? $(head -c 300 "$scratch/notoken-socks.stderr" | tr '\n' ' ')"
`, nil, 2*time.Minute)
	if j.state != "COMPLETED" {
		t.Errorf("job %s ended %s, want COMPLETED", j.id, j.state)
	}
	wantOK(t, j.output, "find", "find-fetch")
	if got, want := field(j.output, `FOUND (\S+)`), "http://hpcproxy:TOKEN@login:"+itoa(ps.Port); got != want {
		t.Errorf("FindActiveProxy in the job: %q, want %q", got, want)
	}
	if got := field(j.output, `(?m)^SHA find-fetch (\S*)$`); got != c.bigSHA {
		t.Errorf("fetch through the found proxy: sha256 %q, want %q", got, c.bigSHA)
	}
	c.checkDownloads(t, j.output, "shared")
	for _, k := range []string{"NOTOKEN-CONNECT", "NOTOKEN-GET"} {
		if got := field(j.output, k+` (\S*)`); got != "407" {
			t.Errorf("%s without the token: status %q, want 407", k, got)
		}
	}
	// Refused by the proxy itself, not failing for any other reason.
	if m := regexp.MustCompile(`(?m)^NOTOKEN-SOCKS exit (\d+) (.*)$`).FindStringSubmatch(j.output); m == nil {
		t.Errorf("SOCKS5 without the token: no result")
	} else if m[1] != curlProxyError || !strings.Contains(m[2], curlNoAuthMethod) {
		t.Errorf("SOCKS5 without the token: curl exit %s (%s), want %s (CURLE_PROXY) and %q", m[1], m[2], curlProxyError, curlNoAuthMethod)
	}
}

// How curl (>= 7.73) fails when a SOCKS5 proxy accepts none of the
// authentication methods it offers: the proxy's refusal, not a network
// error.
const (
	curlProxyError   = "97" // CURLE_PROXY
	curlNoAuthMethod = "No authentication method was acceptable"
)

// methods is scenario 3: each tunnel method forced in turn carries the
// same downloads, in one job. socks-tcp, whose `ssh -D` port any user of
// the node could use, is refused with its reason and nothing listens.
func (c *cluster) methods(t *testing.T) {
	methods := []string{"gossh", "controlmaster", "socks-unix", "exec"}
	j := c.sbatch(t, downloadsScript+`
for m in `+strings.Join(methods, " ")+`; do
	if perjob start --via login --method $m; then echo "RESULT $m.start ok"; else echo "RESULT $m.start FAIL"; continue; fi
	echo "METHOD $m $(perjob status | sed -n 's/^method: *//p')"
	eval "$(perjob env)"
	downloads $m
	step $m.stop perjob stop
done
if perjob start --via login --method socks-tcp 2>"$scratch/socks-tcp.err"; then
	echo "RESULT socks-tcp.refused FAIL (it started)"; perjob stop
elif grep -q "no authentication" "$scratch/socks-tcp.err" && ! pgrep -u "$(id -u)" -f "ssh.* -D 127.0.0.1:" >/dev/null; then
	echo "RESULT socks-tcp.refused ok"
else
	echo "RESULT socks-tcp.refused FAIL"; cat "$scratch/socks-tcp.err"
fi
`, nil, 3*time.Minute)
	if j.state != "COMPLETED" {
		t.Errorf("job %s ended %s, want COMPLETED", j.id, j.state)
	}
	t.Run("socks-tcp", func(t *testing.T) { wantOK(t, j.output, "socks-tcp.refused") })
	for _, m := range methods {
		t.Run(m, func(t *testing.T) {
			wantOK(t, j.output, m+".start", m+".stop")
			if got := field(j.output, `METHOD `+m+` (\S*)`); got != m {
				t.Errorf("perjob status shows method %q, want %q", got, m)
			}
			c.checkDownloads(t, j.output, m)
		})
	}
}

// heldJob is a batch job that started a per-job proxy and holds it, doing
// nothing, until the test releases it: the test acts on the node as the
// job's user (as with srun --overlap or ssh to the node) and injects
// faults meanwhile.
type heldJob struct {
	id, out string
	state   string // the proxy's state file
	pid     int    // the daemon's
	release string // the file whose creation ends the job
	// finish releases the job, waits for it to end and checks that the
	// daemon and its state file are gone.
	finish func()
}

// holdJob submits a held job whose proxy is started with perjob start
// ARGS... and returns once the proxy is up. If t fails before release,
// the job is cancelled.
func (c *cluster) holdJob(t *testing.T, args ...string) *heldJob {
	t.Helper()
	return c.holdJobAfter(t, "", args...)
}

// holdJobAfter is holdJob with setup, a piece of job script, run before
// perjob start (a step of it that prints RESULT NAME FAIL fails t).
func (c *cluster) holdJobAfter(t *testing.T, setup string, args ...string) *heldJob {
	t.Helper()
	h := &heldJob{}
	h.id, h.out = c.submit(t, setup+`
if perjob start -v `+strings.Join(args, " ")+`; then echo "RESULT start ok"; else echo "RESULT start FAIL"; exit 1; fi
perjob status
touch "$HOME/ready-$SLURM_JOB_ID"
while [ ! -e "$HOME/release-$SLURM_JOB_ID" ]; do sleep 0.2; done
echo "RESULT held ok"
`, []string{"HPCPROXY_VIA=login"}, 3*time.Minute)
	ready := filepath.Join(c.user.home, "ready-"+h.id)
	h.release = filepath.Join(c.user.home, "release-"+h.id)
	released := false
	t.Cleanup(func() {
		if !released {
			writeFile(t, h.release, "", 0o644)
			c.cleanupOn(c.login, nil, c.slurmEnv(), 10*time.Second, "scancel", h.id)
		}
	})
	c.waitFor(t, "job "+h.id+" holding its proxy", time.Minute, nil, func() bool {
		if _, err := os.Stat(ready); err == nil {
			return true
		}
		b, _ := os.ReadFile(h.out)
		if failed := regexp.MustCompile(`(?m)^RESULT (\S+) FAIL`).FindStringSubmatch(string(b)); failed != nil {
			t.Fatalf("job %s: step %s failed:\n%s", h.id, failed[1], b)
		}
		return false
	})
	b, _ := os.ReadFile(h.out)
	h.state = field(string(b), `state file:\s+(\S+)`)
	h.pid = atoi(field(string(b), `pid:\s+(\d+) on compute`))
	if h.state == "" || h.pid <= 0 {
		t.Fatalf("job %s: perjob status shows no state file or pid:\n%s", h.id, b)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("daemon log:\n%s", tail(hpcproxy.LogFilePath(h.state), 100))
		}
	})
	h.finish = func() {
		t.Helper()
		released = true
		writeFile(t, h.release, "", 0o644)
		j := c.wait(t, h.id, h.out, time.Minute)
		wantOK(t, j.output, "start", "held")
		c.waitFor(t, "daemon gone after the job", 15*time.Second, nil, func() bool {
			_, err := os.Stat(h.state)
			return !pidAlive(h.pid) && os.IsNotExist(err)
		})
	}
	return h
}

func (c *cluster) readState(t *testing.T, path string) *hpcproxy.ProxyState {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("state file: %v", err)
	}
	var ps hpcproxy.ProxyState
	if err := json.Unmarshal(b, &ps); err != nil {
		t.Fatalf("state file %s: %v\n%s", path, err, b)
	}
	return &ps
}

// otherUser is scenario 5: another user of the compute node can neither
// read the per-job proxy's state nor use the proxy, while its owner can
// even without the token.
func (c *cluster) otherUser(t *testing.T) {
	h := c.holdJob(t)
	state := h.state
	ps := c.readState(t, state)
	addr := "127.0.0.1:" + itoa(ps.Port)
	const url = "https://www.internet.test/files/hello.txt"
	curl := func(u *testUser, proxy, w string) result {
		return c.runOn(c.compute, u, c.env(u), 20*time.Second,
			"curl", "-sS", "--max-time", "10", "-o", "/dev/null", "--proxy", proxy, "-w", w, url)
	}
	if r := c.runOn(c.compute, c.other, c.env(c.other), 10*time.Second, "cat", state); r.code == 0 {
		t.Errorf("another user read the state file (and its token):\n%s", r.out)
	}
	if r := curl(c.other, "http://"+addr, "%{http_connect}"); r.code == 0 || r.out != "407" {
		t.Errorf("another user, HTTP CONNECT: want refused with 407, got %s", r)
	}
	if r := c.runOn(c.compute, c.other, c.env(c.other), 20*time.Second, "curl", "-sS", "--max-time", "10", "-o", "/dev/null",
		"--proxy", "http://"+addr, "-w", "%{http_code}", "http://www.internet.test/files/hello.txt"); r.out != "407" {
		t.Errorf("another user, plain HTTP: want 407, got %s", r)
	}
	if r := curl(c.other, "socks5h://"+addr, ""); itoa(r.code) != curlProxyError || !strings.Contains(r.err, curlNoAuthMethod) {
		t.Errorf("another user, SOCKS5: want curl exit %s (CURLE_PROXY), %q; got %s", curlProxyError, curlNoAuthMethod, r)
	}
	// The owner's own processes need no token.
	if r := curl(c.user, "http://"+addr, "%{http_connect}"); r.code != 0 || r.out != "200" {
		t.Errorf("owner without the token, HTTP CONNECT: want 200, got %s", r)
	}
	if r := curl(c.user, "socks5h://"+addr, ""); r.code != 0 {
		t.Errorf("owner without the token, SOCKS5: %s", r)
	}
	h.finish()
}

// faults is scenario 4: sshd on login killed and restarted, then (gossh
// only) the compute-login link down for longer than the keepalive window.
// Downloads in flight fail cleanly within their timeout; the daemon
// notices, reconnects, and later downloads succeed. gossh holds the SSH
// connection in process, controlmaster through an ssh child.
func (c *cluster) faults(t *testing.T) {
	t.Run("gossh", func(t *testing.T) { c.faultsWith(t, "gossh", true) })
	t.Run("controlmaster", func(t *testing.T) { c.faultsWith(t, "controlmaster", false) })
}

func (c *cluster) faultsWith(t *testing.T, method string, linkDown bool) {
	// Keepalive every second, two misses: a dead link is noticed in ~3 s.
	h := c.holdJob(t, "--method", method, "-o", "ServerAliveInterval=1", "-o", "ServerAliveCountMax=2")
	state := h.state
	env := c.env(c.user)
	download := func(timeout time.Duration) result {
		return c.runOn(c.compute, c.user, env, timeout+10*time.Second, "perjob", "run", "--state", state, "--",
			"curl", "-sS", "--fail", "--max-time", itoa(int(timeout/time.Second)), "-o", "/dev/null",
			"-w", "%{size_download}", "https://www.internet.test/files/big.bin")
	}
	// A download that takes ~6 s: in flight when the fault comes.
	const slowBytes = 4 << 20
	slowURL := "https://www.internet.test/slow?bytes=" + itoa(slowBytes) + "&chunk=65536&delay=100ms"
	inFlight := func(cmd ...string) <-chan result {
		ch := make(chan result, 1)
		go func() {
			ch <- c.runOn(c.compute, c.user, env, 40*time.Second, append([]string{"perjob", "run", "--state", state, "--"}, cmd...)...)
		}()
		return ch
	}
	const flightTimeout = 30 * time.Second
	startInFlight := func() (curl, goFetch <-chan result) {
		curl = inFlight("curl", "-sS", "--fail", "--max-time", itoa(int(flightTimeout/time.Second)), "-o", "/dev/null", "-w", "%{size_download}", slowURL)
		goFetch = inFlight("e2efetch", "-timeout", flightTimeout.String(), slowURL)
		time.Sleep(1500 * time.Millisecond) // both are receiving
		return curl, goFetch
	}
	checkFailedCleanly := func(what string, curl, goFetch <-chan result) {
		t.Helper()
		for _, ch := range []<-chan result{curl, goFetch} {
			r := <-ch
			switch {
			case r.code == 0:
				t.Errorf("%s: a download in flight reported success: %s", what, r)
			case r.elapsed > flightTimeout+5*time.Second:
				t.Errorf("%s: a download in flight hung past its %s timeout: %s", what, flightTimeout, r)
			default:
				t.Logf("%s: download in flight failed cleanly: %s", what, r)
			}
			if n := atoi(strings.TrimSpace(r.out)); n >= slowBytes {
				t.Errorf("%s: got all %d bytes yet failed?", what, n)
			}
		}
	}
	recovered := func(what string, within time.Duration) {
		t.Helper()
		start := time.Now()
		for {
			c.checkTime(t)
			r := download(10 * time.Second)
			if r.code == 0 && strings.TrimSpace(r.out) == itoa(c.bigSize) {
				t.Logf("%s: download succeeded %s after recovery began", what, time.Since(start).Round(time.Millisecond))
				return
			}
			if time.Since(start) > within {
				t.Fatalf("%s: no successful download within %s; last: %s", what, within, r)
			}
			time.Sleep(500 * time.Millisecond)
		}
	}

	if r := download(20 * time.Second); r.code != 0 {
		t.Fatalf("download before any fault: %s", r)
	}

	// sshd killed (with its sessions) mid-download, then restarted.
	curl, goFetch := startInFlight()
	c.sshdDown()
	checkFailedCleanly("sshd killed", curl, goFetch)
	c.sshdUp(t)
	recovered("sshd restarted", 45*time.Second)
	ps := c.readState(t, state)
	if ps.Reconnects < 1 || ps.Method != method {
		t.Errorf("after the sshd restart: reconnects %d, method %s; want >= 1, %s", ps.Reconnects, ps.Method, method)
	}
	if !linkDown {
		h.finish()
		return
	}
	before := ps.Reconnects

	// The compute-login link down for longer than the keepalive window.
	curl, goFetch = startInFlight()
	run(t, "ip", "-n", c.compute.ns, "link", "set", c.computeDev, "down")
	down := time.Now()
	linkUp := func() { run(t, "ip", "-n", c.compute.ns, "link", "set", c.computeDev, "up") }
	noticed := false
	for time.Since(down) < 15*time.Second {
		if ps := c.readState(t, state); ps.Status != hpcproxy.StatusUp {
			t.Logf("link down: the daemon noticed after %s (status %s: %s)", time.Since(down).Round(time.Millisecond), ps.Status, ps.LastError)
			noticed = true
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if !noticed {
		linkUp()
		t.Fatalf("link down for 15s: the state file still says the tunnel is up")
	}
	checkFailedCleanly("link down", curl, goFetch)
	time.Sleep(time.Until(down.Add(6 * time.Second)))
	linkUp()
	recovered("link up again", 60*time.Second)
	if ps := c.readState(t, state); ps.Reconnects <= before || ps.Status != hpcproxy.StatusUp {
		t.Errorf("after the link came back: status %s, reconnects %d, want up and > %d", ps.Status, ps.Reconnects, before)
	}
	h.finish()
}
