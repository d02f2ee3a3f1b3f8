package sshtest

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/knownhosts"
)

// Server is an in-process golang.org/x/crypto/ssh server on 127.0.0.1 for
// fault injection. It accepts public-key logins with ClientKeyFile (and
// keys added with AuthorizeKey), serves direct-tcpip channels by dialling
// the target itself, and answers every global request (such as
// keepalive@openssh.com) with a failure reply, as OpenSSH does. Switches
// make it refuse channels, stop answering global requests, or drop every
// connection.
type Server struct {
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

	ln  net.Listener
	cfg *ssh.ServerConfig

	refuse atomic.Bool
	stall  atomic.Bool

	mu         sync.Mutex
	authorized map[string]bool
	targets    []string
	conns      map[net.Conn]struct{}
	closed     bool
	wg         sync.WaitGroup
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
		authorized:     map[string]bool{},
		conns:          map[net.Conn]struct{}{},
	}
	s.HostKey = GenerateKeyFile(t, "ed25519", filepath.Join(dir, "ssh_host_ed25519_key"))
	s.ClientSigner = GenerateKeyFile(t, "ed25519", s.ClientKeyFile)
	s.AuthorizeKey(s.ClientSigner.PublicKey())
	s.cfg = &ssh.ServerConfig{
		PublicKeyCallback: func(_ ssh.ConnMetadata, key ssh.PublicKey) (*ssh.Permissions, error) {
			s.mu.Lock()
			defer s.mu.Unlock()
			if s.authorized[string(key.Marshal())] {
				return nil, nil
			}
			return nil, errors.New("sshtest: key not authorized")
		},
		ServerVersion: "SSH-2.0-sshtest",
	}
	s.cfg.AddHostKey(s.HostKey)

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("sshtest: %v", err)
	}
	s.ln = ln
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

	s.wg.Add(1)
	go s.serve()
	t.Cleanup(s.Close)
	return s
}

// AuthorizeKey makes the server accept pub.
func (s *Server) AuthorizeKey(pub ssh.PublicKey) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.authorized[string(pub.Marshal())] = true
}

// RefuseChannels makes the server reject (true) or serve (false) new
// direct-tcpip channels. Rejections say "administratively prohibited".
func (s *Server) RefuseChannels(refuse bool) { s.refuse.Store(refuse) }

// StallGlobalRequests makes the server read global requests (keepalives)
// without ever answering them (true), as a hung login node would, or answer
// them again (false). Channel traffic keeps flowing.
func (s *Server) StallGlobalRequests(stall bool) { s.stall.Store(stall) }

// DropConnections closes every client connection at the TCP level, without
// an SSH disconnect message. The server keeps accepting new ones.
func (s *Server) DropConnections() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for c := range s.conns {
		_ = c.Close()
	}
}

// Targets returns the "host:port" targets of the direct-tcpip channels
// clients asked for, as they were sent (names unresolved).
func (s *Server) Targets() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.targets...)
}

// Close stops the server, drops its connections and waits for its
// goroutines. It is idempotent.
func (s *Server) Close() {
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	_ = s.ln.Close()
	s.DropConnections()
	s.wg.Wait()
}

func (s *Server) serve() {
	defer s.wg.Done()
	for {
		c, err := s.ln.Accept()
		if err != nil {
			return
		}
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			_ = c.Close()
			return
		}
		s.conns[c] = struct{}{}
		s.wg.Add(1)
		s.mu.Unlock()
		go s.handle(c)
	}
}

func (s *Server) handle(c net.Conn) {
	defer s.wg.Done()
	defer func() {
		_ = c.Close()
		s.mu.Lock()
		delete(s.conns, c)
		s.mu.Unlock()
	}()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	sc, chans, reqs, err := ssh.NewServerConn(c, s.cfg)
	if err != nil {
		return
	}
	_ = c.SetDeadline(time.Time{})
	var wg sync.WaitGroup
	defer wg.Wait()
	defer sc.Close()
	wg.Add(1)
	go func() {
		defer wg.Done()
		for req := range reqs {
			if s.stall.Load() {
				continue // never answered
			}
			if req.WantReply {
				_ = req.Reply(false, nil)
			}
		}
	}()
	for nc := range chans {
		if nc.ChannelType() != "direct-tcpip" {
			_ = nc.Reject(ssh.UnknownChannelType, "sshtest: only direct-tcpip")
			continue
		}
		target, err := parseDirectTCPIP(nc.ExtraData())
		if err != nil {
			_ = nc.Reject(ssh.ConnectionFailed, err.Error())
			continue
		}
		s.mu.Lock()
		s.targets = append(s.targets, target)
		s.mu.Unlock()
		if s.refuse.Load() {
			_ = nc.Reject(ssh.Prohibited, "administratively prohibited: open failed")
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			serveDirectTCPIP(nc, target)
		}()
	}
}

// parseDirectTCPIP decodes RFC 4254 7.2's payload: host, port, originator
// host and port.
func parseDirectTCPIP(b []byte) (string, error) {
	host, rest, ok := sshString(b)
	if !ok || len(rest) < 4 {
		return "", errors.New("sshtest: bad direct-tcpip payload")
	}
	port := binary.BigEndian.Uint32(rest)
	return net.JoinHostPort(host, strconv.FormatUint(uint64(port), 10)), nil
}

func sshString(b []byte) (string, []byte, bool) {
	if len(b) < 4 {
		return "", nil, false
	}
	n := binary.BigEndian.Uint32(b)
	if uint64(len(b)-4) < uint64(n) {
		return "", nil, false
	}
	return string(b[4 : 4+n]), b[4+n:], true
}

func serveDirectTCPIP(nc ssh.NewChannel, target string) {
	c, err := net.DialTimeout("tcp", target, 5*time.Second)
	if err != nil {
		// The message follows OpenSSH's ("connect failed: Connection refused").
		_ = nc.Reject(ssh.ConnectionFailed, fmt.Sprintf("connect failed: %v", err))
		return
	}
	defer c.Close()
	ch, reqs, err := nc.Accept()
	if err != nil {
		return
	}
	defer ch.Close()
	reqsDone := make(chan struct{})
	go func() {
		defer close(reqsDone)
		ssh.DiscardRequests(reqs)
	}()
	// Channel requests end when the channel or the connection closes.
	defer func() { <-reqsDone }()
	done := make(chan struct{})
	go func() {
		defer close(done)
		_, _ = io.Copy(c, ch)
		_ = c.(*net.TCPConn).CloseWrite()
	}()
	_, _ = io.Copy(ch, c)
	_ = ch.CloseWrite()
	<-done
}
