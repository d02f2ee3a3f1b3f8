// Package sshserver is a small in-process SSH server built on
// golang.org/x/crypto/ssh: public-key logins, direct-tcpip channels served
// by dialling the target, and global requests (keepalive@openssh.com)
// answered as OpenSSH answers them. It stands in for a login node in the
// demo and, wrapped by internal/sshtest, in fault-injection tests. It is
// not a general-purpose sshd: no sessions, no shell.
package sshserver

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/crypto/ssh"
)

// Server is an SSH server for direct-tcpip forwarding. Create it with New.
type Server struct {
	cfg *ssh.ServerConfig

	refuse    atomic.Bool
	stall     atomic.Bool
	openDelay atomic.Int64 // time.Duration before a channel is served
	reqDelay  atomic.Pointer[func(n int) time.Duration]
	chanReqs  atomic.Int64  // requests to send on each channel accepted
	replies   atomic.Int64  // replies to those requests
	accepted  atomic.Int64  // direct-tcpip channels accepted so far
	open      atomic.Int64  // of those, the ones not yet closed
	quit      chan struct{} // closed by Close

	mu         sync.Mutex
	authorized map[string]bool
	targets    []string
	conns      map[net.Conn]struct{}
	lns        map[net.Listener]struct{}
	closed     bool
	wg         sync.WaitGroup
}

// New returns a server with the given host key that accepts the given
// client keys (more can be added with AuthorizeKey).
func New(hostKey ssh.Signer, authorized ...ssh.PublicKey) *Server {
	s := &Server{
		authorized: map[string]bool{},
		conns:      map[net.Conn]struct{}{},
		lns:        map[net.Listener]struct{}{},
		quit:       make(chan struct{}),
	}
	for _, k := range authorized {
		s.AuthorizeKey(k)
	}
	s.cfg = &ssh.ServerConfig{
		PublicKeyCallback: func(_ ssh.ConnMetadata, key ssh.PublicKey) (*ssh.Permissions, error) {
			s.mu.Lock()
			defer s.mu.Unlock()
			if s.authorized[string(key.Marshal())] {
				return nil, nil
			}
			return nil, errors.New("sshserver: key not authorized")
		},
		ServerVersion: "SSH-2.0-hpcproxy-sshserver",
	}
	s.cfg.AddHostKey(hostKey)
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

// DelayChannelOpens makes the server wait d before it serves (dials the
// target, then accepts or rejects) each new direct-tcpip channel, as a slow
// login node would. Zero serves them at once.
func (s *Server) DelayChannelOpens(d time.Duration) { s.openDelay.Store(int64(d)) }

// DelayGlobalRequests makes the server wait delay(n) before it answers the
// n-th global request of a connection (counting from 0), such as a
// keepalive. nil answers at once. StallGlobalRequests takes precedence.
func (s *Server) DelayGlobalRequests(delay func(n int) time.Duration) {
	if delay == nil {
		s.reqDelay.Store(nil)
		return
	}
	s.reqDelay.Store(&delay)
}

// SendChannelRequests makes the server send n channel requests (want
// reply, all at once) on each direct-tcpip channel it accepts, right after
// accepting, as no SSH server does on such channels;
// ChannelRequestReplies counts the replies.
func (s *Server) SendChannelRequests(n int) { s.chanReqs.Store(int64(n)) }

// ChannelRequestReplies reports how many of the requests of
// SendChannelRequests were answered (accepted or refused).
func (s *Server) ChannelRequestReplies() int { return int(s.replies.Load()) }

// Channels reports how many direct-tcpip channels the server has accepted
// so far, and how many of those are still open (not yet closed by both
// sides and done with).
func (s *Server) Channels() (accepted, open int) {
	return int(s.accepted.Load()), int(s.open.Load())
}

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

// Start serves SSH connections on ln in the background until ln fails or
// Close is called; Close waits for that goroutine.
func (s *Server) Start(ln net.Listener) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		_ = ln.Close()
		return
	}
	s.lns[ln] = struct{}{}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		_ = s.serve(ln)
	}()
}

func (s *Server) serve(ln net.Listener) error {
	for {
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			_ = c.Close()
			return net.ErrClosed
		}
		s.conns[c] = struct{}{}
		s.wg.Add(1)
		s.mu.Unlock()
		go s.handle(c)
	}
}

// Close stops the server, drops its connections and waits for its
// goroutines. It is idempotent.
func (s *Server) Close() error {
	s.mu.Lock()
	if !s.closed {
		close(s.quit)
	}
	s.closed = true
	for ln := range s.lns {
		_ = ln.Close()
	}
	s.mu.Unlock()
	s.DropConnections()
	s.wg.Wait()
	return nil
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
		n := 0
		for req := range reqs {
			if s.stall.Load() {
				continue // never answered
			}
			if delay := s.reqDelay.Load(); delay != nil {
				s.sleep((*delay)(n))
			}
			n++
			if req.WantReply {
				_ = req.Reply(false, nil)
			}
		}
	}()
	for nc := range chans {
		if nc.ChannelType() != "direct-tcpip" {
			_ = nc.Reject(ssh.UnknownChannelType, "sshserver: only direct-tcpip")
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
			s.sleep(time.Duration(s.openDelay.Load()))
			s.serveDirectTCPIP(nc, target)
		}()
	}
}

// sleep waits d, or less if the server is closed.
func (s *Server) sleep(d time.Duration) {
	if d <= 0 {
		return
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-s.quit:
	}
}

// parseDirectTCPIP decodes RFC 4254 7.2's payload: host, port, originator
// host and port.
func parseDirectTCPIP(b []byte) (string, error) {
	host, rest, ok := sshString(b)
	if !ok || len(rest) < 4 {
		return "", errors.New("sshserver: bad direct-tcpip payload")
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

func (s *Server) serveDirectTCPIP(nc ssh.NewChannel, target string) {
	c, err := net.DialTimeout("tcp", target, 5*time.Second)
	if err != nil {
		// The message follows OpenSSH's ("connect failed: Connection refused").
		_ = nc.Reject(ssh.ConnectionFailed, fmt.Sprintf("connect failed: %v", err))
		return
	}
	defer c.Close()
	// Counted before the confirmation goes out, so that a client that has
	// its channel sees it counted.
	s.accepted.Add(1)
	s.open.Add(1)
	defer s.open.Add(-1) // runs last: after the channel is closed
	ch, reqs, err := nc.Accept()
	if err != nil {
		s.accepted.Add(-1)
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
	var sent sync.WaitGroup
	defer sent.Wait()
	for range s.chanReqs.Load() {
		sent.Add(1)
		go func() {
			defer sent.Done()
			if _, err := ch.SendRequest("test@hpcproxy", true, nil); err == nil {
				s.replies.Add(1)
			}
		}()
	}
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
