package sshtest

import (
	"net"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/knownhosts"

	"github.com/hpcproxy/hpcproxy/internal/sshserver"
)

// Server is an in-process SSH server (internal/sshserver) on 127.0.0.1 for
// fault injection, with files for clients: it accepts public-key logins
// with ClientKeyFile (and keys added with AuthorizeKey), serves
// direct-tcpip channels by dialling the target itself, and answers every
// global request (such as keepalive@openssh.com) with a failure reply, as
// OpenSSH does. The embedded sshserver.Server's switches make it refuse
// channels, open them late, stop answering global requests or answer them
// late, or drop every connection; it counts the channels it has open.
type Server struct {
	*sshserver.Server

	Host string // "127.0.0.1"
	Port int
	Addr string // "127.0.0.1:PORT"
	User string // any user name is accepted; this one is in SSHConfigFile

	HostKey        ssh.Signer // ed25519
	ClientKeyFile  string     // an ed25519 private key the server accepts
	ClientSigner   ssh.Signer
	KnownHostsFile string // records HostKey for [127.0.0.1]:PORT
	// SSHConfigFile is a client ssh_config like SSHD's: Host alias
	// "sshtest" names this server.
	SSHConfigFile string
}

// StartServer starts a Server for t and closes it in t.Cleanup, waiting for
// all of its goroutines.
func StartServer(t testing.TB) *Server {
	t.Helper()
	dir := privateTempDir(t)
	s := &Server{
		Host:           "127.0.0.1",
		User:           "sshtest",
		KnownHostsFile: filepath.Join(dir, "known_hosts"),
		SSHConfigFile:  filepath.Join(dir, "ssh_config"),
		ClientKeyFile:  filepath.Join(dir, "id_ed25519"),
	}
	s.HostKey = GenerateKeyFile(t, "ed25519", filepath.Join(dir, "ssh_host_ed25519_key"))
	s.ClientSigner = GenerateKeyFile(t, "ed25519", s.ClientKeyFile)
	s.Server = sshserver.New(s.HostKey, s.ClientSigner.PublicKey())

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("sshtest: %v", err)
	}
	s.Port = ln.Addr().(*net.TCPAddr).Port
	s.Addr = ln.Addr().String()
	writeFile(t, s.KnownHostsFile, knownhosts.Line([]string{knownhosts.Normalize(s.Addr)}, s.HostKey.PublicKey())+"\n")
	writeFile(t, s.SSHConfigFile, strings.Join([]string{
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
	}, "\n")+"\n")

	s.Start(ln)
	t.Cleanup(func() { _ = s.Server.Close() })
	return s
}
