package hpcproxy

// The exec tunnel method: one `ssh -W host:port` process per connection
// (DialSystemSSH).

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// DialSystemSSH reaches node with the system ssh client, spawning
// `ssh -W host:port node` for each connection and using the process's
// stdin and stdout as the net.Conn. It is the slow last resort (one ssh
// process and one SSH handshake per connection) for when nothing else
// works, with everything OpenSSH can do (GSSAPI/Kerberos, hostbased, strict
// known_hosts, ProxyJump, ssh_config) at its disposal.
//
// Before returning, DialSystemSSH checks once that node accepts the user
// and forwards (see [MethodExec]). stop ends the tunnel; connections already
// dialled keep their own ssh process until they are closed. The returned
// done channel is closed only by stop, never because a connection dropped:
// there is no persistent link to watch.
//
// DialSystemSSH is [EstablishTunnel] with Methods {[MethodExec]}; use that
// for timeouts, ssh_config files and options, or a logger.
func DialSystemSSH(node string) (DialFunc, func(), <-chan struct{}, error) {
	tun, err := EstablishTunnel(context.Background(), TunnelConfig{
		Destination: node,
		Methods:     []Method{MethodExec},
	})
	if err != nil {
		return nil, nil, nil, err
	}
	return tun.Dial, func() { _ = tun.Close() }, tun.Done(), nil
}

// execTunnel runs `ssh -W host:port` for every connection. There is no
// persistent link: Done fires only on Close, and connections already
// dialled keep their own ssh process until they are closed.
type execTunnel struct {
	s    *sshCommand
	once sync.Once
	done chan struct{}
}

var _ tunnelImpl = (*execTunnel)(nil)

// startExecTunnel checks once that the destination lets us in and
// forwards: it runs `ssh -W HOST:PORT dest` to the login node's own sshd
// (HostName and Port as `ssh -G` resolves them) and reads its banner. A
// refused or unreachable target still proves login and forwarding work
// (the channel open comes after authentication), so only a login failure
// or forwarding that the login node prohibits fails the method.
func startExecTunnel(ctx context.Context, cfg *TunnelConfig) (tunnelImpl, error) {
	s, err := newSSHCommand(ctx, cfg)
	if err != nil {
		return nil, err
	}
	t := &execTunnel{s: s, done: make(chan struct{})}
	host, port := s.resolved["hostname"], s.resolved["port"]
	if host == "" {
		host = s.dest.Host
	}
	if port == "" {
		port = "22"
		if s.dest.Port != 0 {
			port = strconv.Itoa(s.dest.Port)
		}
	}
	target := net.JoinHostPort(host, port)
	if err := t.probe(ctx, target, s.setupTimeout()); err != nil {
		return nil, err
	}
	return t, nil
}

func (t *execTunnel) probe(ctx context.Context, target string, timeout time.Duration) error {
	c, err := t.DialContext(ctx, "tcp", target)
	if err != nil {
		return err
	}
	defer c.Close()
	deadline := time.Now().Add(timeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	_ = c.SetReadDeadline(deadline)
	stop := context.AfterFunc(ctx, func() { _ = c.SetReadDeadline(time.Unix(1, 0)) })
	defer stop()
	banner := make([]byte, 4)
	_, err = io.ReadFull(c, banner)
	var rde *RemoteDialError
	switch {
	case err == nil && string(banner) == "SSH-":
		return nil
	case err == nil:
		t.s.log.Debug("exec probe: unexpected banner; login and forwarding work", "target", target, "banner", banner)
		return nil
	case errors.As(err, &rde) && !errors.Is(err, ErrProhibited):
		t.s.log.Debug("exec probe: target unreachable; login and forwarding work", "target", target, "err", err)
		return nil
	case errors.As(err, &rde):
		return err
	case errors.Is(err, os.ErrDeadlineExceeded):
		return fmt.Errorf("hpcproxy: ssh -W %s gave no answer within %v: %w", target, timeout, err)
	}
	return err
}

// DialContext implements tunnelImpl: it starts `ssh -W addr` and returns
// its stdio as a conn at once. Whether the login node reached addr shows on
// the first Read: a *RemoteDialError (errors.Is ECONNREFUSED etc.) built
// from ssh's message when it could not.
func (t *execTunnel) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	switch network {
	case "tcp", "tcp4", "tcp6":
	default:
		return nil, fmt.Errorf("hpcproxy: exec method cannot dial network %q", network)
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("hpcproxy: dial %s: %w", addr, err)
	}
	if strings.HasPrefix(host, "-") || strings.ContainsAny(host, " \t\r\n") {
		return nil, fmt.Errorf("hpcproxy: dial %s: invalid host", addr)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	select {
	case <-t.done:
		return nil, ErrTunnelDown
	default:
	}
	// Pipes from os.Pipe are non-blocking on our side: deadlines work.
	inR, inW, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("hpcproxy: %w", err)
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		inR.Close()
		inW.Close()
		return nil, fmt.Errorf("hpcproxy: %w", err)
	}
	// ControlMaster=no: never become a master ourselves. A live master of
	// the user's (ControlPath) makes -W fast, but is used only when
	// userMasterOK: otherwise ControlPath=none, which SSHOptions cannot
	// undo.
	var fixed []string
	if !t.s.userMasterOK() {
		fixed = []string{"ControlPath=none"}
	}
	args := t.s.args(fixed, []string{"ControlMaster=no"}, "-W", net.JoinHostPort(host, port))
	proc, err := t.s.start(args, inR, outW)
	inR.Close()
	outW.Close()
	if err != nil {
		inW.Close()
		outR.Close()
		return nil, err
	}
	return &execConn{proc: proc, r: outR, w: inW, addr: addr, dest: t.s.cfg.Destination}, nil
}

// Close implements tunnelImpl.
func (t *execTunnel) Close() error {
	t.once.Do(func() { close(t.done) })
	return nil
}

// Done implements tunnelImpl; it fires only on Close.
func (t *execTunnel) Done() <-chan struct{} { return t.done }

// Err implements tunnelImpl; it is always nil.
func (t *execTunnel) Err() error { return nil }

// execConn is one `ssh -W` process as a net.Conn: Write feeds its stdin,
// Read drains its stdout, CloseWrite closes stdin (the far side sees EOF),
// Close ends the process. Deadlines work (non-blocking pipes).
//
// Half-close works one way only: after CloseWrite the far side's answer
// still arrives, but once the far side shuts down its write side, ssh -W
// stops forwarding what we write (OpenSSH's stdio forwarding, checked with
// 9.2); the channel methods forward both directions independently.
type execConn struct {
	proc       *sshProcess
	r          *os.File // ssh's stdout
	w          *os.File // ssh's stdin
	addr, dest string
	gotData    atomic.Bool
	closeOnce  sync.Once
}

var _ net.Conn = (*execConn)(nil)

// Read reads from ssh's stdout. At EOF before any data, if ssh failed, the
// error says why: a *RemoteDialError when the login node could not
// connect.
func (c *execConn) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	if n > 0 {
		c.gotData.Store(true)
	}
	// Once data has arrived the channel was open: EOF is the far side's.
	// A failed channel open ends stdout without data, as ssh exits.
	if err == io.EOF && !c.gotData.Load() {
		if e := c.exitError(); e != nil {
			return n, e
		}
	}
	return n, err
}

// exitError waits briefly for ssh to exit after EOF and returns why it
// failed, or nil if it exited cleanly or is still running (the far side
// half-closed without sending anything).
func (c *execConn) exitError() error {
	t := time.NewTimer(stopGrace)
	defer t.Stop()
	select {
	case <-c.proc.exited:
	case <-t.C:
		return nil
	}
	if c.proc.waitErr == nil {
		return nil
	}
	msg := c.proc.stderr.String()
	if _, reason, ok := strings.Cut(msg, "open failed: "); ok {
		reason, _, _ = strings.Cut(reason, "; ")
		return newRemoteDialError(c.addr, reason)
	}
	return c.proc.exitErrorAs(fmt.Sprintf("ssh -W %s via %s", c.addr, c.dest))
}

// Write writes to ssh's stdin.
func (c *execConn) Write(p []byte) (int, error) { return c.w.Write(p) }

// CloseWrite closes ssh's stdin: ssh sends EOF on the channel.
func (c *execConn) CloseWrite() error { return c.w.Close() }

// Close closes both pipes and ends the ssh process.
func (c *execConn) Close() error {
	c.closeOnce.Do(func() {
		_ = c.w.Close()
		_ = c.r.Close()
		c.proc.stop()
	})
	return nil
}

// LocalAddr returns the destination the ssh process logs in to.
func (c *execConn) LocalAddr() net.Addr { return execAddr(c.dest) }

// RemoteAddr returns the address ssh -W connects to.
func (c *execConn) RemoteAddr() net.Addr { return execAddr(c.addr) }

// SetDeadline sets the read and write deadlines.
func (c *execConn) SetDeadline(t time.Time) error {
	return errors.Join(c.r.SetReadDeadline(t), c.w.SetWriteDeadline(t))
}

// SetReadDeadline sets the deadline for Read.
func (c *execConn) SetReadDeadline(t time.Time) error { return c.r.SetReadDeadline(t) }

// SetWriteDeadline sets the deadline for Write.
func (c *execConn) SetWriteDeadline(t time.Time) error { return c.w.SetWriteDeadline(t) }

// execAddr is an address on the far side of an `ssh -W` process.
type execAddr string

// Network returns "ssh-exec".
func (execAddr) Network() string { return "ssh-exec" }

func (a execAddr) String() string { return string(a) }
