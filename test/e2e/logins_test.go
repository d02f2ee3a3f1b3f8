package e2e

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hpcproxy/hpcproxy"
	"github.com/hpcproxy/hpcproxy/internal/sshtest"
)

// login2Addr is a second login node: a second sshd, with a host key of its
// own, on a second address of the login namespace's cluster side.
const login2Addr = "10.231.1.3"

// twoLogins is the scenario of a cluster with two login nodes: a job's
// proxy started with --via login,login2 tunnels through the login node
// that the compute node prefers (rendezvous order by node name), and when
// that one's sshd dies mid-job, with every session it serves, downloads go
// on through the other; perjob status names the one in use.
func (c *cluster) twoLogins(t *testing.T) {
	sshd2 := c.startSecondLogin(t)
	logins := []string{"login", "login2"}
	order := hpcproxy.OrderLogins(logins, "compute")
	first, second := order[0], order[1]
	t.Logf("compute prefers %s, then %s", first, second)

	h := c.holdJob(t, "--via", strings.Join(logins, ","), "--method", "gossh")
	if ps := c.readState(t, h.state); ps.ViaInUse != first || ps.Via != "login,login2" {
		t.Fatalf("state: via %q, in use %q; want login,login2 and %s", ps.Via, ps.ViaInUse, first)
	}
	env := c.env(c.user)
	download := func() result {
		return c.runOn(c.compute, c.user, env, 20*time.Second, "perjob", "run", "--state", h.state, "--",
			"curl", "-sS", "--fail", "--max-time", "10", "-o", "/dev/null",
			"-w", "%{size_download}", "https://www.internet.test/files/big.bin")
	}
	if r := download(); r.code != 0 {
		t.Fatalf("download through %s: %s", first, r)
	}

	// A download in flight when the login node dies.
	slowURL := "https://www.internet.test/slow?bytes=" + itoa(4<<20) + "&chunk=65536&delay=100ms"
	inFlight := make(chan result, 1)
	go func() {
		inFlight <- c.runOn(c.compute, c.user, env, 40*time.Second, "perjob", "run", "--state", h.state, "--",
			"curl", "-sS", "--fail", "--max-time", "30", "-o", "/dev/null", slowURL)
	}()
	time.Sleep(1500 * time.Millisecond)
	died := time.Now()
	if first == "login" {
		c.sshdDown()
		t.Cleanup(func() { c.sshdUp(t) }) // for the scenarios after this one
	} else {
		c.kill(sshd2)
	}
	for {
		c.checkTime(t)
		r := download()
		if r.code == 0 && strings.TrimSpace(r.out) == itoa(c.bigSize) {
			// The target is 10 s; logged here, measured again
			// in the unit test of failover.
			t.Logf("first successful download through %s %s after %s died", second, time.Since(died).Round(time.Millisecond), first)
			break
		}
		if time.Since(died) > 45*time.Second {
			t.Fatalf("no download through %s within 45s of %s dying; last: %s", second, first, r)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if r := <-inFlight; r.code == 0 {
		t.Logf("the download in flight survived (it had not reached the dead node?): %s", r)
	} else {
		t.Logf("the download in flight failed cleanly: %s", r)
	}
	ps := c.readState(t, h.state)
	if ps.ViaInUse != second || ps.Status != hpcproxy.StatusUp || ps.Reconnects < 1 {
		t.Errorf("after %s died: in use %q, status %s, reconnects %d; want %s, up, >= 1", first, ps.ViaInUse, ps.Status, ps.Reconnects, second)
	}
	r := c.runOn(c.compute, c.user, env, 10*time.Second, "perjob", "status", "--state", h.state)
	if !strings.Contains(r.out, "login node:  "+second) {
		t.Errorf("perjob status does not name %s as the login node in use:\n%s", second, r.out)
	}
	h.finish()
}

// startSecondLogin starts login2's sshd and makes it known on compute
// (hosts file, the user's ssh config and known_hosts).
func (c *cluster) startSecondLogin(t *testing.T) *proc {
	t.Helper()
	dev := "e2l" + strings.TrimPrefix(c.computeDev, "e2c")
	run(t, "ip", "-n", c.login.ns, "addr", "add", login2Addr+"/24", "dev", dev)

	dir := filepath.Join(c.dir, "sshd2")
	mkdir(t, dir, 0o700)
	hostKey := filepath.Join(dir, "ssh_host_ed25519_key")
	signer := sshtest.GenerateKeyFile(t, "ed25519", hostKey)
	cfg, err := os.ReadFile(c.sshdCfg)
	if err != nil {
		t.Fatal(err)
	}
	conf := string(cfg)
	for _, r := range [][2]string{
		{"ListenAddress " + loginAddr, "ListenAddress " + login2Addr},
		{"HostKey " + filepath.Join(c.sshdDir, "ssh_host_ed25519_key"), "HostKey " + hostKey},
		{"PidFile " + filepath.Join(c.sshdDir, "sshd.pid"), "PidFile " + filepath.Join(dir, "sshd.pid")},
	} {
		conf = strings.Replace(conf, r[0], r[1], 1)
	}
	cfgFile := filepath.Join(dir, "sshd_config")
	writeFile(t, cfgFile, conf, 0o600)

	// Appended in place: the hosts file is bind-mounted over /etc/hosts.
	appendFile(t, c.compute.hosts, login2Addr+" login2\n")
	dotSSH := filepath.Join(c.user.home, ".ssh")
	appendFile(t, filepath.Join(dotSSH, "known_hosts"), knownHostsLine([]string{"login2", login2Addr}, signer.PublicKey()))
	appendFile(t, filepath.Join(dotSSH, "config"), "Host login2\n  HostName login2\n  IdentityFile ~/.ssh/id_ed25519\n  IdentitiesOnly yes\n")

	p := c.spawn("sshd2", c.login, c.slurmEnv(), sshtest.SSHDPath, "-D", "-f", cfgFile, "-E", filepath.Join(dir, "sshd.log"))
	t.Cleanup(func() { c.kill(p) })
	c.waitFor(t, "sshd on login2", 15*time.Second, p, func() bool {
		return c.runOn(c.compute, c.user, c.env(c.user), 5*time.Second, "ssh", "login2", "true").code == 0
	})
	return p
}

// appendFile appends s to the file at path, keeping its inode.
func appendFile(t *testing.T, path, s string) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteString(s); err != nil {
		t.Fatal(err)
	}
}
