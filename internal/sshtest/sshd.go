// Package sshtest starts SSH servers for tests: a real, throwaway OpenSSH
// sshd on 127.0.0.1 with its own host key, config and authorized_keys, and
// (server.go) an in-process golang.org/x/crypto/ssh server for fault
// injection.
package sshtest

import (
	"bufio"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/pem"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/knownhosts"

	"github.com/hpcproxy/hpcproxy/internal/testenv"
)

// SSHDPath is where Debian's openssh-server installs sshd. sshd must be
// started by absolute path.
const SSHDPath = "/usr/sbin/sshd"

// Options configures StartSSHD.
type Options struct {
	// Config optionally adds sshd options ("Key=value" or "Key value"),
	// written at the top of the generated sshd_config in place of the
	// defaults for the same keywords. (Passing them as -o would not do:
	// sshd takes the first value of most keywords but the last of some,
	// MaxStartups among them, and `sshd -T -f F -o MaxStartups=10:30:100`
	// keeps the MaxStartups of F.)
	Config []string
	// Port optionally fixes the port. If zero, a free one is picked.
	Port int
	// HostKeyTypes optionally lists host key types to generate ("ed25519",
	// "ecdsa", "rsa"). If empty, only ed25519.
	HostKeyTypes []string
}

// SSHD is a running throwaway OpenSSH server.
type SSHD struct {
	Dir  string // private directory with every file below
	Host string // "127.0.0.1"
	Port int
	Addr string // "127.0.0.1:PORT"
	User string // the user tests log in as (the current user)

	// HostKeys are the server's host keys, by type ("ed25519", "ecdsa", "rsa").
	HostKeys map[string]ssh.Signer

	ClientKeyFile      string     // an ed25519 private key listed in AuthorizedKeysFile
	ClientSigner       ssh.Signer // the same key
	AuthorizedKeysFile string
	KnownHostsFile     string // records every host key for [127.0.0.1]:PORT
	// SSHConfigFile is a client ssh_config for `ssh -F` (and
	// TunnelConfig.SSHConfigFile): Host alias "sshtest" names this server,
	// and every host gets ClientKeyFile, KnownHostsFile, BatchMode and
	// strict host key checking.
	SSHConfigFile string
	ConfigFile    string // the sshd_config
	LogFile       string // sshd's log (-E)

	t    testing.TB
	opts Options
	mu   sync.Mutex
	cmd  *exec.Cmd
	exit chan struct{}
}

// StartSSHD starts an sshd for t and stops it in t.Cleanup. Without sshd
// (or, running as root, without the privilege-separation directory that it
// creates) the test is skipped, and fails under CI.
func StartSSHD(t testing.TB, opts Options) *SSHD {
	t.Helper()
	testenv.RequireFile(t, SSHDPath, "apt-get install openssh-server")
	if os.Geteuid() == 0 {
		if err := os.MkdirAll("/run/sshd", 0o755); err != nil {
			t.Fatalf("sshtest: create /run/sshd: %v", err)
		}
	}
	u, err := user.Current()
	if err != nil {
		t.Fatalf("sshtest: current user: %v", err)
	}
	dir := privateTempDir(t)
	s := &SSHD{
		Dir:                dir,
		Host:               "127.0.0.1",
		User:               u.Username,
		HostKeys:           map[string]ssh.Signer{},
		AuthorizedKeysFile: filepath.Join(dir, "authorized_keys"),
		KnownHostsFile:     filepath.Join(dir, "known_hosts"),
		SSHConfigFile:      filepath.Join(dir, "ssh_config"),
		ConfigFile:         filepath.Join(dir, "sshd_config"),
		LogFile:            filepath.Join(dir, "sshd.log"),
		t:                  t,
		opts:               opts,
	}
	s.Port = opts.Port
	if s.Port == 0 {
		s.Port = FreePort(t)
	}
	s.Addr = net.JoinHostPort(s.Host, strconv.Itoa(s.Port))

	types := opts.HostKeyTypes
	if len(types) == 0 {
		types = []string{"ed25519"}
	}
	var hostKeyLines, knownLines []string
	for _, typ := range types {
		path := filepath.Join(dir, "ssh_host_"+typ+"_key")
		signer := GenerateKeyFile(t, typ, path)
		s.HostKeys[typ] = signer
		hostKeyLines = append(hostKeyLines, "HostKey "+path)
		knownLines = append(knownLines, knownhosts.Line([]string{knownhosts.Normalize(s.Addr)}, signer.PublicKey()))
	}
	writeFile(t, s.KnownHostsFile, strings.Join(knownLines, "\n")+"\n")

	s.ClientKeyFile = filepath.Join(dir, "id_ed25519")
	s.ClientSigner = GenerateKeyFile(t, "ed25519", s.ClientKeyFile)
	s.AuthorizeKey(t, s.ClientSigner.PublicKey())

	defaults := []string{
		"Port " + strconv.Itoa(s.Port),
		"ListenAddress " + s.Host,
		strings.Join(hostKeyLines, "\n"),
		"PidFile " + filepath.Join(dir, "sshd.pid"),
		"AuthorizedKeysFile " + s.AuthorizedKeysFile,
		"UsePAM no",
		"PasswordAuthentication no",
		"KbdInteractiveAuthentication no",
		"PubkeyAuthentication yes",
		"PermitRootLogin prohibit-password",
		"StrictModes no",
		"AllowTcpForwarding yes",
		"AllowStreamLocalForwarding yes",
		"StreamLocalBindUnlink yes",
		"GatewayPorts no",
		"X11Forwarding no",
		"PrintMotd no",
		"MaxStartups 200:30:400",
		"MaxSessions 200",
		"LogLevel VERBOSE",
	}
	cfg := slices.Clone(opts.Config)
	for _, d := range defaults {
		if !slices.ContainsFunc(opts.Config, func(o string) bool { return strings.EqualFold(keyword(o), keyword(d)) }) {
			cfg = append(cfg, d)
		}
	}
	writeFile(t, s.ConfigFile, strings.Join(cfg, "\n")+"\n")

	client := []string{
		"Host sshtest",
		"  HostName " + s.Host,
		"  Port " + strconv.Itoa(s.Port),
		"Host *",
		"  User " + s.User,
		"  IdentityFile " + s.ClientKeyFile,
		"  IdentitiesOnly yes",
		"  UserKnownHostsFile " + s.KnownHostsFile,
		"  GlobalKnownHostsFile /dev/null",
		"  StrictHostKeyChecking yes",
		"  BatchMode yes",
		"  LogLevel ERROR",
	}
	writeFile(t, s.SSHConfigFile, strings.Join(client, "\n")+"\n")

	s.Start(t)
	t.Cleanup(s.Stop)
	return s
}

// keyword returns the keyword of an sshd_config line ("Key value" or
// "Key=value").
func keyword(line string) string {
	k, _, _ := strings.Cut(strings.TrimSpace(line), " ")
	k, _, _ = strings.Cut(k, "=")
	return k
}

// Start starts sshd (again, after Stop) on the same port with the same keys
// and waits until it answers with an SSH banner.
func (s *SSHD) Start(t testing.TB) {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd != nil {
		t.Fatalf("sshtest: sshd already running")
	}
	cmd := exec.Command(SSHDPath, "-D", "-f", s.ConfigFile, "-E", s.LogFile)
	if err := cmd.Start(); err != nil {
		t.Fatalf("sshtest: start sshd: %v", err)
	}
	exit := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exit) }()
	s.cmd, s.exit = cmd, exit

	deadline := time.Now().Add(10 * time.Second)
	for {
		select {
		case <-exit:
			s.cmd = nil
			t.Fatalf("sshtest: sshd exited at start: %s\nlog:\n%s", cmd.ProcessState, s.Log())
		default:
		}
		if bannerOK(s.Addr) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("sshtest: sshd did not answer on %s within 10s\nlog:\n%s", s.Addr, s.Log())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Stop kills sshd (the listener; established sessions have their own
// processes and are killed too, as the process group is signalled) and waits
// for it to exit. Stop is a no-op when sshd is not running.
func (s *SSHD) Stop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd == nil {
		return
	}
	// Per-connection sshd processes outlive the listener; end them too so a
	// "stopped" server really drops its clients. List them first: once the
	// listener is dead they are reparented and no longer look like its
	// children.
	children := Descendants(s.cmd.Process.Pid)
	_ = s.cmd.Process.Kill()
	<-s.exit
	for _, pid := range children {
		if p, err := os.FindProcess(pid); err == nil {
			_ = p.Kill()
		}
	}
	s.cmd = nil
}

// Running reports whether sshd is running.
func (s *SSHD) Running() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cmd != nil
}

// PID returns the listening sshd's process id (its sessions run in
// processes below it), or 0 when sshd is not running.
func (s *SSHD) PID() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd == nil {
		return 0
	}
	return s.cmd.Process.Pid
}

// Log returns sshd's log so far.
func (s *SSHD) Log() string {
	b, _ := os.ReadFile(s.LogFile)
	return string(b)
}

// AuthorizeKey appends pub to the server's authorized_keys, with optional
// authorized_keys options ("cert-authority", "restrict", ...).
func (s *SSHD) AuthorizeKey(t testing.TB, pub ssh.PublicKey, options ...string) {
	t.Helper()
	line := strings.TrimSpace(string(ssh.MarshalAuthorizedKey(pub)))
	if len(options) > 0 {
		line = strings.Join(options, ",") + " " + line
	}
	f, err := os.OpenFile(s.AuthorizedKeysFile, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o600)
	if err != nil {
		t.Fatalf("sshtest: %v", err)
	}
	defer f.Close()
	if _, err := fmt.Fprintln(f, line); err != nil {
		t.Fatalf("sshtest: %v", err)
	}
}

// Descendants returns the processes below pid (sshd's per-session
// children survive the listener), deepest first.
func Descendants(pid int) []int {
	var out []int
	for _, child := range Children(pid) {
		out = append(out, Descendants(child)...)
		out = append(out, child)
	}
	return out
}

// Children returns the processes whose parent is pid. Below a listening
// sshd, each is one client connection (its session's privileged monitor).
func Children(pid int) []int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var out []int
	for _, e := range ents {
		if child, err := strconv.Atoi(e.Name()); err == nil && ppidOf(child) == pid {
			out = append(out, child)
		}
	}
	return out
}

func ppidOf(pid int) int {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
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

func bannerOK(addr string) bool {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return false
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	return err == nil && strings.HasPrefix(line, "SSH-2.0-")
}

// FreePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func FreePort(t testing.TB) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("sshtest: %v", err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// GenerateKeyFile makes a key of the given type ("ed25519", "ecdsa", "rsa"),
// writes it to path in OpenSSH format with mode 0600 (and path+".pub"), and
// returns its signer. RSA keys are 2048 bits (tests only).
func GenerateKeyFile(t testing.TB, typ, path string) ssh.Signer {
	t.Helper()
	priv := GenerateKey(t, typ)
	block, err := ssh.MarshalPrivateKey(priv, "")
	if err != nil {
		t.Fatalf("sshtest: marshal %s key: %v", typ, err)
	}
	writeFile(t, path, string(pem.EncodeToMemory(block)))
	signer, err := ssh.NewSignerFromKey(priv)
	if err != nil {
		t.Fatalf("sshtest: %v", err)
	}
	writeFile(t, path+".pub", string(ssh.MarshalAuthorizedKey(signer.PublicKey())))
	return signer
}

// GenerateKey returns a new private key of the given type ("ed25519",
// "ecdsa", "rsa") as a crypto.Signer-compatible value.
func GenerateKey(t testing.TB, typ string) any {
	t.Helper()
	switch typ {
	case "ed25519":
		_, priv, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			t.Fatalf("sshtest: %v", err)
		}
		return priv
	case "ecdsa":
		return generateECDSA(t)
	case "rsa":
		return generateRSA(t)
	}
	t.Fatalf("sshtest: unknown key type %q", typ)
	return nil
}

func writeFile(t testing.TB, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatalf("sshtest: %v", err)
	}
}

// privateTempDir returns a short 0700 temp dir (unix socket paths must stay
// under ~108 bytes, which t.TempDir's long names can break).
func privateTempDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "sshtest")
	if err != nil {
		t.Fatalf("sshtest: %v", err)
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		t.Fatalf("sshtest: %v", err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	return dir
}

// PrivateTempDir returns a short private (0700) temporary directory removed
// when t ends, for unix sockets whose paths must stay short.
func PrivateTempDir(t testing.TB) string {
	t.Helper()
	return privateTempDir(t)
}
