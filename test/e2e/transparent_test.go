package e2e

import (
	"context"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hpcproxy/hpcproxy/internal/sshtest"
	"github.com/hpcproxy/hpcproxy/internal/testenv"
)

// javaMain is a Java program that knows nothing of proxies: it resolves
// the URL's host, prints the address it got, and downloads the URL with
// Proxy.NO_PROXY (no proxy whatever the system properties say), printing
// the size and sha256 of what it got.
const javaMain = `import java.io.InputStream;
import java.net.InetAddress;
import java.net.Proxy;
import java.net.URL;
import java.security.MessageDigest;
import java.util.HexFormat;

public class Main {
	public static void main(String[] args) throws Exception {
		URL url = new URL(args[0]);
		System.out.println("resolved=" + InetAddress.getByName(url.getHost()).getHostAddress());
		MessageDigest md = MessageDigest.getInstance("SHA-256");
		long n = 0;
		try (InputStream in = url.openConnection(Proxy.NO_PROXY).getInputStream()) {
			byte[] buf = new byte[65536];
			for (int k; (k = in.read(buf)) > 0; n += k) {
				md.update(buf, 0, k);
			}
		}
		System.out.println("bytes=" + n + " sha256=" + HexFormat.of().formatHex(md.digest()));
	}
}
`

// transparent is the scenario of perjob run --transparent: inside a batch
// job on compute (no route, no DNS for the internet), programs that ignore
// every proxy setting reach the internet by name through the job's
// proxy: a Go client whose transport has Proxy nil, a Java program with
// Proxy.NO_PROXY, plain ssh and git over ssh to an sshd on the internet
// side. Each resolves the internet's name to a fake address (198.18.0.0/15)
// that leads nowhere but back to the name, which the login node resolves.
// A service on the compute node sees a transparent client come from the
// login node through the tunnel, and from compute itself with the cluster
// network --exclude'd.
//
// /dev/net/tun is 0600 on this machine; most distributions ship it 0666,
// as a compute node has it: the scenario sets 0666 and restores the mode.
func (c *cluster) transparent(t *testing.T) {
	java := testenv.LookPath(t, "java")
	keytool := testenv.LookPath(t, "keytool")
	testenv.TunLikeANode(t)

	// The Java program, and the test CA as a Java trust store.
	jdir := filepath.Join(c.dir, "java")
	mkdir(t, jdir, 0o755)
	writeFile(t, filepath.Join(jdir, "Main.java"), javaMain, 0o644)
	trust := filepath.Join(jdir, "ca.p12")
	if out, err := exec.Command(keytool, "-importcert", "-noprompt", "-alias", "e2e", "-file", c.caFile,
		"-keystore", trust, "-storetype", "PKCS12", "-storepass", "changeit").CombinedOutput(); err != nil {
		t.Fatalf("keytool: %v\n%s", err, out)
	}
	chmod(t, trust, 0o644)

	c.startInternetSSHD(t)
	repo := filepath.Join(c.dir, "internet", "git", "repo.git")
	j := c.sbatch(t, `
step no-dns sh -c '! getent hosts www.internet.test'
step no-route sh -c '! curl -sS --noproxy "*" --max-time 5 -o /dev/null https://10.231.2.2/'
if perjob start -v; then echo "RESULT start ok"; else echo "RESULT start FAIL"; exit 1; fi
t() { name=$1; shift; step "$name" perjob run --transparent -- "$@"; sed "s/^/OUT $name /" "$scratch/$name.stdout"; }
t getent getent hosts www.internet.test
t go e2efetch -noproxy https://www.internet.test/files/big.bin
t java `+java+` -Djavax.net.ssl.trustStore=`+trust+` -Djavax.net.ssl.trustStorePassword=changeit `+filepath.Join(jdir, "Main.java")+` https://www.internet.test/files/big.bin
t ssh ssh www.internet.test 'echo ssh to $(hostname)'
t git-ssh git clone -q --upload-pack='git -c safe.directory=* upload-pack' ssh://www.internet.test`+repo+` ssh.repo
echo "GIT git-ssh $(git -C ssh.repo log -1 --format=%s 2>/dev/null)"
perjob run --transparent -- sh -c 'exit 3'
echo "RESULT exit-status $?"
# A service of the compute node that tells each client its address: through
# the tunnel it comes from login, with the cluster network excluded from
# compute itself.
socat TCP-LISTEN:7777,bind=`+computeAddr+`,fork,reuseaddr SYSTEM:'echo peer=$SOCAT_PEERADDR' &
peer=$!
sleep 0.3
t via-tunnel socat -T5 - TCP:`+computeAddr+`:7777
step excluded perjob run --transparent --exclude 10.231.1.0/24 -- socat -T5 - TCP:`+computeAddr+`:7777
sed "s/^/OUT excluded /" "$scratch/excluded.stdout"
kill $peer
`, []string{"HPCPROXY_VIA=login"}, 3*time.Minute)
	if j.state != "COMPLETED" {
		t.Errorf("job %s ended %s, want COMPLETED", j.id, j.state)
	}
	wantOK(t, j.output, "no-dns", "no-route", "start", "getent", "go", "java", "ssh", "git-ssh", "via-tunnel", "excluded")

	fakes := netip.MustParsePrefix("198.18.0.0/15")
	isFake := func(what, s string) {
		t.Helper()
		a, err := netip.ParseAddr(s)
		if err != nil {
			if ap, err2 := netip.ParseAddrPort(s); err2 == nil {
				a, err = ap.Addr(), nil
			}
		}
		if err != nil || !fakes.Contains(a) {
			t.Errorf("%s: %q, want a fake address of %s: the name must be resolved on the login node, not here", what, s, fakes)
		}
	}
	isFake("getent", field(j.output, `(?m)^OUT getent (\S+)\s+www\.internet\.test`))
	isFake("Go client's connection", field(j.output, `(?m)^OUT go remote=(\S+)$`))
	isFake("Java's InetAddress", field(j.output, `(?m)^OUT java resolved=(\S+)$`))
	for _, p := range []string{"go", "java"} {
		if got := field(j.output, `(?m)^OUT `+p+` bytes=\d+ sha256=(\S+)$`); got != c.bigSHA {
			t.Errorf("%s: sha256 %q, want %q", p, got, c.bigSHA)
		}
	}
	if got := field(j.output, `(?m)^OUT ssh (.*)$`); got != "ssh to internet" {
		t.Errorf("ssh: got %q, want %q", got, "ssh to internet")
	}
	if got := field(j.output, `(?m)^GIT git-ssh (.*)$`); got != c.repoCommit {
		t.Errorf("git over ssh: cloned %q, want %q", got, c.repoCommit)
	}
	if got := field(j.output, `(?m)^OUT via-tunnel peer=(\S+)$`); got != loginAddr {
		t.Errorf("a cluster address through the tunnel: the server saw %q, want the login node %s", got, loginAddr)
	}
	if got := field(j.output, `(?m)^OUT excluded peer=(\S+)$`); got != computeAddr {
		t.Errorf("an excluded cluster address: the server saw %q, want the compute node itself %s", got, computeAddr)
	}
	if got := field(j.output, `(?m)^RESULT exit-status (\d+)$`); got != "3" {
		t.Errorf("exit status %q, want the command's 3", got)
	}
	// The fake address leads nowhere from the login node either: the
	// connection reached the internet because the login node was given
	// the name.
	if r := c.runOn(c.login, nil, nil, 10*time.Second, "ip", "route", "get", "198.18.0.16"); r.code == 0 {
		t.Errorf("the login node has a route to the fake address 198.18.0.16: %s", r)
	}
	// The internet's servers saw the downloads come from the login node.
	b, _ := os.ReadFile(filepath.Join(c.dir, "logs", "internet.out"))
	if n := len(regexp.MustCompile(regexp.QuoteMeta(loginUpAddr)+`:\d+ GET /files/big.bin`).FindAll(b, -1)); n < 2 {
		t.Errorf("internet server logged %d downloads of big.bin from the login node, want at least 2 (Go, Java)", n)
	}
}

// startInternetSSHD runs an OpenSSH sshd on the internet node (port 22 of
// www.internet.test) that the test user can log in to, and adds its host
// key to the user's known_hosts under that name.
func (c *cluster) startInternetSSHD(t *testing.T) {
	t.Helper()
	dir := filepath.Join(c.dir, "sshd-internet")
	mkdir(t, dir, 0o700)
	hostKey := filepath.Join(dir, "ssh_host_ed25519_key")
	signer := sshtest.GenerateKeyFile(t, "ed25519", hostKey)
	cfg := filepath.Join(dir, "sshd_config")
	writeFile(t, cfg, strings.Join([]string{
		"Port 22",
		"ListenAddress " + internetAddr,
		"HostKey " + hostKey,
		"PidFile " + filepath.Join(dir, "sshd.pid"),
		"UsePAM no",
		"PasswordAuthentication no",
		"KbdInteractiveAuthentication no",
		"PubkeyAuthentication yes",
		"PermitRootLogin no",
		"StrictModes no",
		"PrintMotd no",
		"LogLevel VERBOSE",
		"",
	}, "\n"), 0o600)
	kh := filepath.Join(c.user.home, ".ssh", "known_hosts")
	f, err := os.OpenFile(kh, os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	_, err = f.WriteString(knownHostsLine([]string{internetHost}, signer.PublicKey()))
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	p := c.spawn("sshd-internet", c.internet, nil, sshtest.SSHDPath, "-D", "-f", cfg, "-E", filepath.Join(dir, "sshd.log"))
	c.waitFor(t, "internet sshd", 15*time.Second, p, func() bool {
		b, _ := os.ReadFile(filepath.Join(dir, "sshd.log"))
		return strings.Contains(string(b), "Server listening")
	})
}

// transparentOtherUser: another user of the compute node cannot enter a
// transparent command's namespaces (and so cannot use its way out): the
// user namespace belongs to the job's user, and joining its network
// namespace needs capabilities there.
func (c *cluster) transparentOtherUser(t *testing.T) {
	testenv.TunLikeANode(t)
	h := c.holdJob(t)
	pidFile := filepath.Join(c.user.home, "transparent.pid")
	ctx, cancel := context.WithTimeout(context.Background(), c.bounded(time.Minute))
	defer cancel()
	cmd := c.command(ctx, c.compute, c.user, c.env(c.user), "perjob", "run", "--state", h.state, "--transparent", "--",
		"sh", "-c", `echo $$ >"$0.tmp" && mv "$0.tmp" "$0" && exec sleep 60`, pidFile)
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var pid string
	c.waitFor(t, "the transparent command", 20*time.Second, nil, func() bool {
		b, err := os.ReadFile(pidFile)
		pid = strings.TrimSpace(string(b))
		return err == nil && pid != ""
	})
	// The owner can look at the namespace (the test's control) ...
	if r := c.runOn(c.compute, c.user, c.env(c.user), 10*time.Second, "nsenter", "-t", pid, "-U", "-n", "--preserve-credentials", "ip", "-o", "addr", "show", "tun0"); r.code != 0 || !strings.Contains(r.out, "198.18.0.1") {
		t.Errorf("the owner entering the namespace: want tun0 with 198.18.0.1, got %s\nperjob run: %s", r, out.String())
	}
	// ... another user cannot enter it, in either order of namespaces.
	for _, args := range [][]string{{"-U", "-n"}, {"-n"}} {
		argv := append(append([]string{"nsenter", "-t", pid}, args...), "true")
		r := c.runOn(c.compute, c.other, c.env(c.other), 10*time.Second, argv...)
		if r.code == 0 || !(strings.Contains(r.err, "Permission denied") || strings.Contains(r.err, "Operation not permitted")) {
			t.Errorf("another user entering the transparent namespace with %v: want refused by the kernel, got %s", args, r)
		}
	}
	// The command ends, and perjob run with it.
	if n, err := strconv.Atoi(pid); err == nil {
		_ = syscall.Kill(n, syscall.SIGTERM)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Errorf("perjob run --transparent did not end within 10s of its command")
	}
	h.finish()
}
