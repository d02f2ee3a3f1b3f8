package hpcproxy

// The socks-unix tunnel method (`ssh -N -D /path/sock`); the socks-tcp
// method is refused (MethodSOCKSTCP).

import (
	"context"
	"fmt"
	"net"
	"strings"
	"time"

	"golang.org/x/net/proxy"
)

// socksTunnel speaks SOCKS5 to `ssh -N -D /path/sock` over its unix socket,
// which ssh creates owner-only (StreamLocalBindMask) in the private runtime
// directory. When the login node cannot connect, ssh -D closes the
// socket without a SOCKS reply, but logs the reason ("channel 3: open
// failed: connect failed: Connection refused"; LogLevel INFO is forced, see
// openssh_args.go): a failed dial looks briefly for such a line written
// to ssh's stderr since its handshake began, and its *RemoteDialError
// carries that reason and its cause (ECONNREFUSED, ...). When there is no
// such line, or concurrent failures logged different reasons, the error
// has no cause. The lines do not name the destination, so a failure
// reported at the same moment by another dial with the same reason cannot
// be told apart; that is the heuristic's limit.
//
// There is no TCP variant (`ssh -D 127.0.0.1:PORT`): any local user could
// use that port (MethodSOCKSTCP).
type socksTunnel struct {
	*childTunnel
	network, addr string // the SOCKS server: "unix" and its path
	socks         interface {
		DialWithConn(ctx context.Context, c net.Conn, network, address string) (net.Addr, error)
	}
}

var _ tunnelImpl = (*socksTunnel)(nil)

// startSOCKSTunnel starts `ssh -N -D` on a unix socket in the runtime
// directory and waits until it accepts connections.
func startSOCKSTunnel(ctx context.Context, cfg *TunnelConfig) (tunnelImpl, error) {
	s, err := newSSHCommand(ctx, cfg)
	if err != nil {
		return nil, err
	}
	dir, err := openRuntimeDir(cfg)
	if err != nil {
		return nil, err
	}
	sock, err := dir.socketPath("socks", maxSunPath)
	if err != nil {
		dir.cleanup("")
		return nil, err
	}
	t, err := runSOCKS(ctx, s, "unix", sock)
	if err != nil {
		dir.cleanup(sock)
		return nil, err
	}
	t.dir, t.sock = dir, sock
	return t, nil
}

func runSOCKS(ctx context.Context, s *sshCommand, network, addr string) (*socksTunnel, error) {
	d, err := proxy.SOCKS5(network, addr, nil, proxy.Direct)
	if err != nil {
		return nil, fmt.Errorf("hpcproxy: %w", err)
	}
	sd, ok := d.(interface {
		DialWithConn(ctx context.Context, c net.Conn, network, address string) (net.Addr, error)
	})
	if !ok {
		return nil, fmt.Errorf("hpcproxy: golang.org/x/net/proxy SOCKS5 dialer %T lacks DialWithConn", d)
	}
	// ssh children that must not become, or hand off to, a control master:
	// the forwarding has to live in the process we supervise.
	proc, err := s.start(s.args(nil, []string{"ControlMaster=no", "ControlPath=none"}, "-N", "-D", addr), nil, nil)
	if err != nil {
		return nil, err
	}
	conn, err := waitReady(ctx, proc, s.setupTimeout(), "its SOCKS listener", func(ctx context.Context) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, network, addr)
	})
	if err != nil {
		proc.stop()
		return nil, err
	}
	conn.Close()
	t := &socksTunnel{childTunnel: newChildTunnel(proc, nil, ""), network: network, addr: addr, socks: sd}
	t.wg.Add(1)
	go func() {
		defer t.wg.Done()
		select {
		case <-proc.exited:
			t.fail(proc.exitError())
		case <-t.closing:
		}
	}()
	return t, nil
}

// DialContext implements tunnelImpl: a SOCKS5 CONNECT through ssh -D. The
// returned conn is the raw *net.UnixConn (CloseWrite, splice).
func (t *socksTunnel) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	var c net.Conn
	var err error
	if t.network == "unix" {
		c, err = dialUnix(ctx, t.addr) // its backlog may be full for a moment
	} else {
		var d net.Dialer
		c, err = d.DialContext(ctx, t.network, t.addr)
	}
	if err != nil {
		return nil, t.downError(fmt.Errorf("hpcproxy: ssh -D at %s: %w", t.addr, err))
	}
	logged := t.proc.stderr.offset()
	if _, err := t.socks.DialWithConn(ctx, c, network, addr); err != nil {
		c.Close()
		if ctx.Err() != nil {
			return nil, err
		}
		if t.proc.hasExited() {
			return nil, t.downError(err)
		}
		// ssh -D hangs up without a SOCKS reply when its channel open
		// fails: the login node could not connect, and ssh logged why.
		rde := &RemoteDialError{Addr: addr, Reason: "no reason given by ssh -D"}
		if reason := t.openFailure(ctx, logged); reason != "" {
			rde = newRemoteDialError(addr, reason)
		}
		return nil, fmt.Errorf("%w (%w)", rde, err)
	}
	return c, nil
}

// openFailureWait is how long a failed SOCKS dial waits for ssh's reason to
// reach its stderr (ssh logs it before it closes the socket; our copy of
// its stderr trails a little).
const openFailureWait = 100 * time.Millisecond

// openFailure returns the reason ssh logged for a failed channel open
// after stderr offset off, waiting up to openFailureWait for it; "" if
// none arrives or the reasons logged meanwhile differ.
func (t *socksTunnel) openFailure(ctx context.Context, off int64) string {
	timer := time.NewTimer(openFailureWait)
	defer timer.Stop()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		if r, ok := openFailureReason(t.proc.stderr.since(off)); ok {
			return r
		}
		select {
		case <-tick.C:
		case <-timer.C:
			return ""
		case <-ctx.Done():
			return ""
		}
	}
}

// openFailureReason finds ssh's "channel N: open failed: REASON" lines in
// log. ok is false when there is none; when there are several with
// different reasons, ok is true and reason "" (which one is ours is
// unknown).
func openFailureReason(log string) (reason string, ok bool) {
	for line := range strings.Lines(log) {
		_, r, found := strings.Cut(line, "open failed: ")
		if !found {
			continue
		}
		r = strings.TrimSpace(r)
		if ok && r != reason {
			return "", true
		}
		reason, ok = r, true
	}
	return reason, ok
}

// Close implements tunnelImpl. Connections already dialled are separate
// sockets to ssh; they end when ssh exits.
func (t *socksTunnel) Close() error {
	t.close(nil)
	return nil
}
