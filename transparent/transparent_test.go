package transparent

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hpcproxy/hpcproxy/internal/testenv"
)

// The tests run commands in a namespace whose only way out is the test's
// own Dial, which maps the names the command asks for to servers on this
// process's loopback. As root they re-run themselves as a throwaway
// non-root user (asUser), which is what a user on a compute node is, with
// /dev/net/tun made 0666 for the run as most distributions ship it (this
// machine has it 0600) and restored after.

// requireTransparent skips (fails under CI) where this user cannot run a
// transparent command; as root it re-runs the calling test as a non-root
// user and reports true: the caller returns.
func requireTransparent(t *testing.T) (reran bool) {
	t.Helper()
	if os.Geteuid() == 0 {
		asUser(t)
		return true
	}
	err := Check()
	testenv.Require(t, err == nil, "transparent mode unavailable for this user: %v", err)
	return false
}

// testUser is the non-root user the tests re-run as: made once per test
// binary (useradd and userdel lock /etc/passwd, which test/e2e's own
// useradd may hold in a package running beside this one), with a copy
// of the test binary it can execute; TestMain removes both.
var testUser struct {
	sync.Mutex
	name, dir, bin string
	err            error
}

// userTool runs useradd or userdel, retrying while another one holds the
// passwd lock.
func userTool(args ...string) error {
	var out []byte
	var err error
	for range 20 {
		if out, err = exec.Command(args[0], args[1:]...).CombinedOutput(); err == nil || !strings.Contains(string(out), "lock") {
			break
		}
		time.Sleep(250 * time.Millisecond)
	}
	if err != nil {
		return fmt.Errorf("%s: %v: %s", strings.Join(args, " "), err, out)
	}
	return nil
}

// makeTestUser makes testUser once.
func makeTestUser() (name, bin string, err error) {
	testUser.Lock()
	defer testUser.Unlock()
	if testUser.name != "" || testUser.err != nil {
		return testUser.name, testUser.bin, testUser.err
	}
	testUser.err = func() error {
		name := fmt.Sprintf("hptr%d", os.Getpid()%100000)
		_ = exec.Command("userdel", name).Run() // stale from a killed run
		if err := userTool("useradd", "-M", "-U", "-d", "/nonexistent", "-s", "/bin/sh", name); err != nil {
			return err
		}
		testUser.name = name
		dir, err := os.MkdirTemp("", "hptr")
		if err != nil {
			return err
		}
		testUser.dir = dir
		if err := os.Chmod(dir, 0o755); err != nil {
			return err
		}
		self, err := os.Executable()
		if err != nil {
			return err
		}
		b, err := os.ReadFile(self)
		if err != nil {
			return err
		}
		testUser.bin = filepath.Join(dir, "transparent.test")
		return os.WriteFile(testUser.bin, b, 0o755)
	}()
	return testUser.name, testUser.bin, testUser.err
}

// removeTestUser undoes makeTestUser.
func removeTestUser() {
	if testUser.dir != "" {
		os.RemoveAll(testUser.dir)
	}
	if testUser.name != "" {
		if err := userTool("userdel", testUser.name); err != nil {
			fmt.Fprintln(os.Stderr, err)
		}
	}
}

// asUser re-runs t's test as the non-root test user, with /dev/net/tun
// 0666 for the run.
func asUser(t *testing.T) {
	t.Helper()
	testenv.LookPath(t, "useradd")
	testenv.LookPath(t, "setpriv")
	testenv.TunLikeANode(t)
	name, bin, err := makeTestUser()
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Dir(bin)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "setpriv", "--reuid", name, "--regid", name, "--clear-groups",
		bin, "-test.run", "^"+t.Name()+"$", "-test.v")
	cmd.Env = append(os.Environ(), "HOME="+dir)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	t.Logf("as user %s:\n%s", name, out)
	if err != nil {
		t.Fatalf("the test as user %s: %v", name, err)
	}
	if bytes.Contains(out, []byte("--- SKIP")) {
		t.Fatalf("the test skipped as user %s", name)
	}
}

// fakeInternet serves HTTP on loopback and dials names of *.test to it,
// recording every address it was asked to dial.
type fakeInternet struct {
	srv  *http.Server
	addr string
	mu   sync.Mutex
	asks []string
}

func newFakeInternet(t *testing.T) *fakeInternet {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &fakeInternet{addr: ln.Addr().String()}
	f.srv = &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if n, err := strconv.Atoi(r.URL.Query().Get("bytes")); err == nil {
			w.Header().Set("Content-Length", strconv.Itoa(n))
			_, _ = io.CopyN(w, zeros{}, int64(n))
			return
		}
		fmt.Fprintf(w, "hello %s\n", r.Host)
	}), ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = f.srv.Serve(ln) }()
	t.Cleanup(func() { _ = f.srv.Close() })
	return f
}

type zeros struct{}

func (zeros) Read(p []byte) (int, error) { clear(p); return len(p), nil }

func (f *fakeInternet) Dial(ctx context.Context, network, addr string) (net.Conn, error) {
	f.mu.Lock()
	f.asks = append(f.asks, addr)
	f.mu.Unlock()
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, err
	}
	if !strings.HasSuffix(host, ".test") {
		return nil, errors.New("no route to " + addr)
	}
	var d net.Dialer
	return d.DialContext(ctx, network, f.addr)
}

func (f *fakeInternet) asked() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.asks...)
}

// runTransparent runs cmd transparently and returns its output and exit
// code.
func runTransparent(t *testing.T, cfg Config, cmd *exec.Cmd) (string, string, int) {
	t.Helper()
	var so, se bytes.Buffer
	cmd.Stdout, cmd.Stderr = &so, &se
	s, err := Start(cfg, cmd)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	err = cmd.Wait()
	if cerr := s.Close(); cerr != nil {
		t.Errorf("Session.Close: %v", cerr)
	}
	code := 0
	if ee := (*exec.ExitError)(nil); errors.As(err, &ee) {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("Wait: %v", err)
	}
	return so.String(), se.String(), code
}

// TestGoClientWithoutProxy: a Go program whose transport has Proxy nil
// reaches a name that only the far side knows; the dialer is asked for
// the name, not an address.
func TestGoClientWithoutProxy(t *testing.T) {
	if requireTransparent(t) {
		return
	}
	f := newFakeInternet(t)
	self, _ := os.Executable()
	cmd := exec.Command(self, "http://www.far.test/hello")
	cmd.Env = append(os.Environ(), roleEnv+"=fetch", "HTTP_PROXY=http://127.0.0.1:9", "HTTPS_PROXY=http://127.0.0.1:9")
	out, errOut, code := runTransparent(t, Config{Dial: f.Dial}, cmd)
	if code != 0 || out != "hello www.far.test\n" {
		t.Fatalf("fetch: exit %d, stdout %q, stderr %q", code, out, errOut)
	}
	if got := f.asked(); len(got) != 1 || got[0] != "www.far.test:80" {
		t.Errorf("dialled %q, want [www.far.test:80] (the name, resolved at the far side)", got)
	}
}

// TestCommandIsItself: exit status, stdin, working directory, UID and
// the environment are the command's own; the namespace has no
// capabilities and its resolv.conf names the fake resolver.
func TestCommandIsItself(t *testing.T) {
	if requireTransparent(t) {
		return
	}
	f := newFakeInternet(t)
	dir := t.TempDir()
	script := `read line; echo "in=$line"; echo "pwd=$(pwd)"; echo "uid=$(id -u) gid=$(id -g)"; echo "env=$HPT_X"; ` +
		`grep -E '^Cap(Eff|Prm|Amb)' /proc/self/status; grep nameserver /etc/resolv.conf; ` +
		`echo "stage=${` + stageEnv + `:-unset}"; exit 7`
	cmd := exec.Command("sh", "-c", script)
	cmd.Dir = dir
	cmd.Stdin = strings.NewReader("from stdin\n")
	cmd.Env = append(os.Environ(), "HPT_X=kept")
	out, errOut, code := runTransparent(t, Config{Dial: f.Dial}, cmd)
	if code != 7 {
		t.Errorf("exit %d, want 7 (stderr %q)", code, errOut)
	}
	for _, want := range []string{
		"in=from stdin\n",
		"pwd=" + dir + "\n",
		fmt.Sprintf("uid=%d gid=%d\n", os.Getuid(), os.Getgid()),
		"env=kept\n",
		"CapPrm:\t0000000000000000\n",
		"CapEff:\t0000000000000000\n",
		"CapAmb:\t0000000000000000\n",
		"nameserver " + dnsAddr.String() + "\n",
		"stage=unset\n",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
}

// TestRefusedAndExcluded: a destination the tunnel cannot reach is
// refused to the command quickly (RST, not a hang); an excluded network
// is dialled directly, not through Dial.
func TestRefusedAndExcluded(t *testing.T) {
	if requireTransparent(t) {
		return
	}
	f := newFakeInternet(t)
	// The excluded network: a server on loopback, the "cluster" side.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Add(1)
	go func() {
		defer wg.Done()
		c, err := ln.Accept()
		if err != nil {
			return
		}
		// Answer once the request is in (an answer before it is an
		// unsolicited response to Go's client).
		_ = c.SetDeadline(time.Now().Add(15 * time.Second))
		if _, err := http.ReadRequest(bufio.NewReader(c)); err == nil {
			_, _ = c.Write([]byte("HTTP/1.0 200 OK\r\nContent-Length: 7\r\n\r\ndirect\n"))
		}
		_ = c.Close()
	}()
	port := ln.Addr().(*net.TCPAddr).Port
	var directs []string
	var mu sync.Mutex
	cfg := Config{
		Dial:    f.Dial,
		Exclude: []netip.Prefix{netip.MustParsePrefix("10.99.0.0/16")},
		DirectDial: func(ctx context.Context, network, addr string) (net.Conn, error) {
			mu.Lock()
			directs = append(directs, addr)
			mu.Unlock()
			var d net.Dialer
			return d.DialContext(ctx, network, ln.Addr().String())
		},
	}
	self, _ := os.Executable()
	// The Go client: a name the dialer refuses, then the excluded address.
	cmd := exec.Command("sh", "-c", `"$0" http://nowhere.invalid/ ; echo "refused=$?"; "$0" http://10.99.1.2:`+strconv.Itoa(port)+`/ ; echo "excluded=$?"`, self)
	cmd.Env = append(os.Environ(), roleEnv+"=fetch")
	start := time.Now()
	out, errOut, _ := runTransparent(t, cfg, cmd)
	if !strings.Contains(out, "refused=1") || !strings.Contains(errOut, "connection refused") {
		t.Errorf("refused destination: stdout %q stderr %q, want a refused connection", out, errOut)
	}
	if elapsed := time.Since(start); elapsed > 15*time.Second {
		t.Errorf("took %s: a refused dial must fail fast", elapsed)
	}
	if !strings.Contains(out, "direct\nexcluded=0") {
		t.Errorf("excluded network: stdout %q stderr %q, want the direct server's answer", out, errOut)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(directs) != 1 || directs[0] != "10.99.1.2:"+strconv.Itoa(port) {
		t.Errorf("direct dials %q, want the excluded address", directs)
	}
	for _, a := range f.asked() {
		if strings.HasPrefix(a, "10.99.") {
			t.Errorf("excluded address %s went through Dial", a)
		}
	}
}

// TestHalfClose: the command's half-close reaches the server, whose
// answer, sent after it saw EOF, still reaches the command.
func TestHalfClose(t *testing.T) {
	if requireTransparent(t) {
		return
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Add(1)
	go func() {
		defer wg.Done()
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(15 * time.Second))
		n, _ := io.Copy(io.Discard, c) // until the command's EOF
		fmt.Fprintf(c, "got %d bytes, then EOF\n", n)
	}()
	dial := func(ctx context.Context, network, addr string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, network, ln.Addr().String())
	}
	self, _ := os.Executable()
	cmd := exec.Command(self, "eof.test:7")
	cmd.Env = append(os.Environ(), roleEnv+"=halfclose")
	out, errOut, code := runTransparent(t, Config{Dial: dial}, cmd)
	if code != 0 || out != "got 100000 bytes, then EOF\n" {
		t.Errorf("half-close: exit %d, stdout %q, stderr %q", code, out, errOut)
	}
}

// TestMissingTMPDIR: a TMPDIR that does not exist on the node (inherited
// from the submit host) does not stop a transparent command.
func TestMissingTMPDIR(t *testing.T) {
	if requireTransparent(t) {
		return
	}
	t.Setenv("TMPDIR", "/nonexistent/hpcproxy-test")
	f := newFakeInternet(t)
	out, errOut, code := runTransparent(t, Config{Dial: f.Dial}, exec.Command("sh", "-c", "grep -c nameserver /etc/resolv.conf"))
	if code != 0 || out != "1\n" {
		t.Errorf("exit %d, stdout %q, stderr %q; want the namespace's resolv.conf", code, out, errOut)
	}
}

// TestCheckTun: a TUN device that is missing or that the user may not open
// is an ErrUnavailable error naming what to change.
func TestCheckTun(t *testing.T) {
	if requireTransparent(t) {
		return
	}
	missing := filepath.Join(t.TempDir(), "tun")
	err := checkTun(missing)
	if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "modprobe tun") {
		t.Errorf("missing device: %v, want ErrUnavailable saying modprobe tun", err)
	}
	// A file this (non-root) user may not open stands for a 0600 device.
	closed := filepath.Join(t.TempDir(), "tun")
	if err := os.WriteFile(closed, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(closed, 0); err != nil {
		t.Fatal(err)
	}
	err = checkTun(closed)
	var se *SetupError
	if !errors.As(err, &se) || !errors.Is(err, ErrUnavailable) || !strings.Contains(se.Setting, "is mode 0; most distributions ship it 0666") {
		t.Errorf("closed device: %v, want a SetupError naming its mode and 0666", err)
	}
}

// TestDNSOverUDPAndTCP: the namespace's resolver answers over UDP and TCP,
// with the same fake address for the same name and IPv4 only.
func TestDNSOverUDPAndTCP(t *testing.T) {
	if requireTransparent(t) {
		return
	}
	f := newFakeInternet(t)
	self, _ := os.Executable()
	cmd := exec.Command(self, "Mirror.Example.org")
	cmd.Env = append(os.Environ(), roleEnv+"=resolve")
	out, errOut, code := runTransparent(t, Config{Dial: f.Dial}, cmd)
	if code != 0 {
		t.Fatalf("resolve: exit %d, stderr %q", code, errOut)
	}
	want := "udp " + firstFake.String() + "\ntcp " + firstFake.String() + "\n"
	if out != want {
		t.Errorf("got %q, want %q", out, want)
	}
}
