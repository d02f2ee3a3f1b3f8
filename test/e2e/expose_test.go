package e2e

import (
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/hpcproxy/hpcproxy"
)

// The ports of the expose scenario. Each namespace is the test's own, so
// fixed ports cannot collide with anything outside it.
const (
	jobWebPort   = "18080" // the job's web service, on compute's 127.0.0.1
	loginWebPort = "18081" // a service on login's 127.0.0.1 only
	localFwdPort = "18082" // the job's local forward to it, on compute's 127.0.0.1
)

// forwardLine matches a forward as perjob status lists it.
var forwardLine = regexp.MustCompile(`(?m)^forward:\s+(\S+)\s+(\S+) (<-|->) (\S+) \((\w+)\): (\d+) active, (\d+) total, (\d+) failed, (\d+) bytes in, (\d+) out$`)

// statusForward is one forward from perjob status.
type statusForward struct {
	kind, listen, target, status string
	total, failed, in, out       int
}

func statusForwards(out string) map[string]statusForward {
	m := map[string]statusForward{}
	for _, f := range forwardLine.FindAllStringSubmatch(out, -1) {
		m[f[1]] = statusForward{kind: f[1], listen: f[2], target: f[4], status: f[5],
			total: atoi(f[7]), failed: atoi(f[8]), in: atoi(f[9]), out: atoi(f[10])}
	}
	return m
}

// expose is scenario 6: a job on compute serves HTTP on its own loopback
// and exposes it with perjob start --expose; the login node's sshd listens
// on its loopback and a client there gets the job's page. The same job
// reaches a service only login's loopback has through a local forward
// (--forward). perjob status counts the bytes of both; the daemon and its
// state file end with the job. Both serve again after an sshd restart.
// For each method that can carry reverse forwards.
func (c *cluster) expose(t *testing.T) {
	web := c.spawn("login-web", c.login, []string{"PATH=/usr/bin:/bin"},
		c.bin+"/e2efetch", "-serve", "127.0.0.1:"+loginWebPort, "-body", "served on the login node")
	t.Cleanup(func() { c.kill(web) })
	c.waitFor(t, "web service on login", 15*time.Second, web, func() bool {
		return strings.Contains(tail(web.log, 5), "serving on")
	})
	for _, m := range []string{"gossh", "controlmaster"} {
		t.Run(m, func(t *testing.T) { c.exposeWith(t, m) })
	}
}

func (c *cluster) exposeWith(t *testing.T, method string) {
	// The job's web service, up before the proxy starts, ended with the
	// job.
	setup := `
e2efetch -serve 127.0.0.1:` + jobWebPort + ` -body "served by job $SLURM_JOB_ID on $(hostname)" >"$scratch/web.out" 2>&1 &
web=$!
trap 'kill $web' EXIT
i=0
until grep -qs "serving on" "$scratch/web.out"; do
	i=$((i+1))
	if [ $i -gt 100 ] || ! kill -0 $web; then echo "RESULT web FAIL"; cat "$scratch/web.out"; exit 1; fi
	sleep 0.1
done
echo "RESULT web ok"
`
	h := c.holdJobAfter(t, setup, "--via", "login", "--method", method,
		"--expose", jobWebPort, "--forward", localFwdPort+"=127.0.0.1:"+loginWebPort)
	wantBody := "served by job " + h.id + " on compute\n"

	// The state file records the address sshd bound on login.
	ps := c.readState(t, h.state)
	if ps.Method != method {
		t.Errorf("state file: method %s, want %s", ps.Method, method)
	}
	var remote string
	for _, fi := range ps.Forwards {
		if fi.Kind == hpcproxy.ForwardReverse {
			remote = fi.Listen
			if fi.Status != hpcproxy.ForwardUp || fi.Target != "127.0.0.1:"+jobWebPort {
				t.Errorf("state file: reverse forward %+v, want up to 127.0.0.1:%s", fi, jobWebPort)
			}
		}
	}
	if !regexp.MustCompile(`^127\.0\.0\.1:\d+$`).MatchString(remote) || strings.HasSuffix(remote, ":0") {
		t.Fatalf("state file: reverse forward bound at %q, want a port on login's 127.0.0.1; forwards %+v", remote, ps.Forwards)
	}
	// perjob start said where, and how to get there from a laptop.
	start := tail(h.out, 200)
	if want := "exposed 127.0.0.1:" + jobWebPort + " on login at " + remote; !strings.Contains(start, want) {
		t.Errorf("perjob start did not print %q:\n%s", want, start)
	}
	if !strings.Contains(start, "ssh -N -L ") {
		t.Errorf("perjob start printed no ssh -L hint:\n%s", start)
	}

	// On login, the job's page is at the remote address: for the test
	// user and, as with ssh -R on loopback, for anyone on login.
	for _, u := range []*testUser{c.user, c.other} {
		r := c.runOn(c.login, u, c.env(u), 20*time.Second, "curl", "-sS", "--fail", "--max-time", "10", "http://"+remote+"/")
		if r.code != 0 || r.out != wantBody {
			t.Errorf("on login as %s, GET http://%s/: want %q, got %s", u.name, remote, wantBody, r)
		}
	}

	// In the job, the local forward reaches login's loopback service,
	// which compute's own loopback does not have.
	env := c.env(c.user)
	if r := c.runOn(c.compute, c.user, env, 20*time.Second, "curl", "-sS", "--fail", "--max-time", "10", "http://127.0.0.1:"+localFwdPort+"/"); r.code != 0 || r.out != "served on the login node\n" {
		t.Errorf("on compute, GET through the local forward: want login's page, got %s", r)
	}
	if r := c.runOn(c.compute, c.user, env, 20*time.Second, "curl", "-sS", "--max-time", "5", "http://127.0.0.1:"+loginWebPort+"/"); r.code == 0 {
		t.Errorf("on compute, login's loopback service answered directly: %s", r)
	}

	// perjob status lists both with their bytes (the counters reach the
	// state file at the daemon's stats interval, 10 s).
	var last result
	deadline := time.Now().Add(30 * time.Second)
	for {
		last = c.runOn(c.compute, c.user, env, 10*time.Second, "perjob", "status", "--state", h.state)
		fw := statusForwards(last.out)
		rev, loc := fw[string(hpcproxy.ForwardReverse)], fw[string(hpcproxy.ForwardLocal)]
		if last.code == 0 && rev.listen == remote && rev.target == "127.0.0.1:"+jobWebPort && rev.status == hpcproxy.ForwardUp &&
			rev.total >= 2 && rev.failed == 0 && rev.in > 0 && rev.out >= 2*len(wantBody) &&
			loc.listen == "127.0.0.1:"+localFwdPort && loc.target == "127.0.0.1:"+loginWebPort && loc.status == hpcproxy.ForwardUp &&
			loc.total >= 1 && loc.failed == 0 && loc.in > 0 && loc.out > 0 {
			t.Logf("perjob status:\n%s", last.out)
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("perjob status does not show both forwards up with their bytes within 30s: %s", last)
			break
		}
		time.Sleep(time.Second)
	}

	// Both survive an sshd restart: sshd is killed with its sessions and
	// started again; the daemon reconnects, the expose is re-requested on
	// the port it had (so the ssh -L line printed at start stays valid),
	// and both serve again.
	before := c.readState(t, h.state).Reconnects
	c.sshdDown()
	c.sshdUp(t)
	var rev hpcproxy.ForwardInfo
	deadline = time.Now().Add(60 * time.Second)
	for {
		ps := c.readState(t, h.state)
		for _, fi := range ps.Forwards {
			if fi.Kind == hpcproxy.ForwardReverse {
				rev = fi
			}
		}
		if ps.Status == hpcproxy.StatusUp && ps.Reconnects > before && rev.Status == hpcproxy.ForwardUp {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after the sshd restart: no reconnect with the expose up within 60s: status %s, reconnects %d (before %d), expose %+v",
				ps.Status, ps.Reconnects, before, rev)
		}
		time.Sleep(500 * time.Millisecond)
	}
	if rev.Listen != remote {
		t.Errorf("after the sshd restart the expose listens on %s, not %s as before", rev.Listen, remote)
	}
	if r := c.runOn(c.login, c.user, c.env(c.user), 20*time.Second, "curl", "-sS", "--fail", "--max-time", "10", "http://"+rev.Listen+"/"); r.code != 0 || r.out != wantBody {
		t.Errorf("after the sshd restart, on login GET http://%s/: want %q, got %s", rev.Listen, wantBody, r)
	}
	if r := c.runOn(c.compute, c.user, env, 20*time.Second, "curl", "-sS", "--fail", "--max-time", "10", "http://127.0.0.1:"+localFwdPort+"/"); r.code != 0 || r.out != "served on the login node\n" {
		t.Errorf("after the sshd restart, on compute GET through the local forward: want login's page, got %s", r)
	}

	h.finish()
	if r := c.runOn(c.login, c.user, c.env(c.user), 20*time.Second, "curl", "-sS", "--max-time", "5", "http://"+remote+"/"); r.code == 0 {
		t.Errorf("on login after the job, %s still answers: %s", remote, r)
	}
}
