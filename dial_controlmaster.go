package hpcproxy

// The controlmaster tunnel method: channels through an OpenSSH
// ControlMaster, as stdio forwards (controlstdio.go) or over the control
// connection in mux proxy mode; its reverse forwards are in
// dial_controlmaster_fwd.go, the PROTOCOL.mux wire format in openssh_mux.go.

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

	"golang.org/x/crypto/ssh"
)

// controlMasterTunnel multiplexes channels in process over an OpenSSH
// ControlMaster's socket in mux proxy mode (OpenSSH >= 7.4). One control
// connection carries every channel.
type controlMasterTunnel struct {
	*childTunnel
	client  *ssh.Client
	ctlPath string // the control socket, for mux commands (openssh_mux.go)
	// sockBase is where reverse forwards make their socket directories:
	// TunnelConfig.RuntimeDir, else socketTempBase().
	sockBase string
	log      *slog.Logger

	// The connections dialled as stdio forwards (controlstdio.go), closed
	// with the tunnel; nil once it is closed.
	stdioMu sync.Mutex
	stdio   map[*stdioConn]struct{}
}

var _ tunnelImpl = (*controlMasterTunnel)(nil)

// startControlMaster attaches to the user's live ControlMaster for the
// destination (ControlPath from ssh_config, as `ssh -G` resolves it) when
// userMasterOK allows it, or starts `ssh -M -S SOCK -N` and attaches to
// that. An attached user master is left running on Close; one we started
// dies with the tunnel.
func startControlMaster(ctx context.Context, cfg *TunnelConfig) (tunnelImpl, error) {
	s, err := newSSHCommand(ctx, cfg)
	if err != nil {
		return nil, err
	}
	timeout := s.setupTimeout()
	if cp := s.resolved["controlpath"]; cp != "" && cp != "none" && s.userMasterOK() {
		t, err := attachControlMaster(ctx, cp, nil, nil, "", min(timeout, 5*time.Second), s.log)
		if err == nil {
			s.log.Info("attached to the user's ssh control master", "dest", cfg.Destination, "path", cp)
			t.sockBase = cfg.RuntimeDir
			if t.sockBase == "" {
				t.sockBase = socketTempBase()
			}
			return t, nil
		}
		s.log.Debug("no usable control master at ControlPath", "path", cp, "err", err)
	} else if cp != "" && cp != "none" {
		s.log.Info("not using the user's ssh control master: ssh_config disables host key checking for the destination",
			"dest", cfg.Destination, "path", cp)
	}

	dir, err := openRuntimeDir(cfg)
	if err != nil {
		return nil, err
	}
	sock, err := dir.socketPath("cm", maxSunPath-controlPathSuffix)
	if err != nil {
		dir.cleanup("")
		return nil, err
	}
	proc, err := s.start(s.args([]string{"ControlPersist=no"}, nil, "-M", "-S", sock, "-N"), nil, nil)
	if err != nil {
		dir.cleanup(sock)
		return nil, err
	}
	// The master creates its socket only once it is logged in.
	conn, err := waitReady(ctx, proc, timeout, "its control socket", func(ctx context.Context) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", sock)
	})
	var t *controlMasterTunnel
	if err == nil {
		t, err = attachControlMaster(ctx, sock, conn, proc, sock, timeout, s.log)
	}
	if err != nil {
		proc.stop()
		dir.cleanup(sock)
		return nil, err
	}
	t.dir, t.sockBase = dir, dir.path
	return t, nil
}

// attachControlMaster speaks mux proxy mode over conn (dialled to path if
// nil) and returns the tunnel. proc is the master when it is ours.
func attachControlMaster(ctx context.Context, path string, conn net.Conn, proc *sshProcess, sock string,
	timeout time.Duration, log *slog.Logger) (*controlMasterTunnel, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if conn == nil {
		c, err := dialUnix(ctx, path)
		if err != nil {
			return nil, fmt.Errorf("hpcproxy: control socket: %w", err)
		}
		conn = c
	}
	deadline, _ := ctx.Deadline()
	_ = conn.SetDeadline(deadline)
	// A cancelled ctx interrupts the handshake through the deadline.
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	c, chans, reqs, err := ssh.NewControlClientConn(newBufferedConn(conn))
	stopped := stop()
	if err != nil || !stopped {
		conn.Close()
		if err == nil {
			err = ctx.Err()
		}
		return nil, fmt.Errorf("hpcproxy: ssh control master at %s (mux proxy mode needs OpenSSH >= 7.4): %w", path, err)
	}
	_ = conn.SetDeadline(time.Time{})
	client := ssh.NewClient(c, chans, reqs)
	t := &controlMasterTunnel{childTunnel: newChildTunnel(proc, nil, sock), client: client, ctlPath: path,
		log: log, stdio: map[*stdioConn]struct{}{}}
	t.wg.Add(1)
	go t.watch()
	return t, nil
}

// watch fires Done when the master exits or the control connection drops.
func (t *controlMasterTunnel) watch() {
	defer t.wg.Done()
	waited := make(chan error, 1)
	go func() { waited <- t.client.Wait() }()
	var exited <-chan struct{}
	if t.proc != nil {
		exited = t.proc.exited
	}
	select {
	case <-exited:
		t.fail(t.proc.exitError())
		_ = t.client.Close()
		<-waited
	case err := <-waited:
		if exited != nil {
			// A dying master closes the socket before it is reaped: its
			// exit status and stderr say more than the EOF.
			timer := time.NewTimer(stopGrace)
			defer timer.Stop()
			select {
			case <-exited:
				t.fail(t.proc.exitError())
				return
			case <-t.closing:
			case <-timer.C:
			}
		}
		if err == nil {
			err = io.EOF
		}
		t.fail(fmt.Errorf("hpcproxy: ssh control connection lost: %w", err))
	}
}

// DialContext implements tunnelImpl: a stdio forward of the master
// (controlstdio.go), or, when that fails or too many are open, one channel
// over the control connection. Failures the login node reports are
// *RemoteDialError.
func (t *controlMasterTunnel) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	switch network {
	case "tcp", "tcp4", "tcp6":
	default:
		return nil, fmt.Errorf("hpcproxy: controlmaster tunnel cannot dial network %q", network)
	}
	t.stdioMu.Lock()
	n, closed := len(t.stdio), t.stdio == nil
	t.stdioMu.Unlock()
	if closed {
		return nil, t.downError(ErrTunnelDown)
	}
	if stdioRoom(n) {
		sc, err := t.dialStdio(ctx, addr)
		if err == nil {
			return t.trackStdio(sc)
		}
		if ctx.Err() != nil {
			return nil, t.downError(err)
		}
		t.log.Debug("stdio forward failed; trying a proxy-mode channel", "dest", addr, "err", err)
	}
	c, err := openDirectContext(ctx, t.client, addr)
	if err != nil {
		return nil, t.downError(convertOpenChannelError(addr, err))
	}
	return c, nil
}

// trackStdio records c so that Close ends it, unless the tunnel is closed
// already.
func (t *controlMasterTunnel) trackStdio(c *stdioConn) (net.Conn, error) {
	t.stdioMu.Lock()
	defer t.stdioMu.Unlock()
	if t.stdio == nil {
		c.Close()
		return nil, t.downError(ErrTunnelDown)
	}
	t.stdio[c] = struct{}{}
	stdioOpen.Add(1)
	c.onClose = func() {
		t.stdioMu.Lock()
		delete(t.stdio, c)
		t.stdioMu.Unlock()
		stdioOpen.Add(-1)
	}
	return c, nil
}

// Close implements tunnelImpl. It ends the connections dialled through the
// tunnel, stdio forwards included (those of a user's master would outlive
// the tunnel otherwise).
func (t *controlMasterTunnel) Close() error {
	t.close(func() {
		_ = t.client.Close()
		t.stdioMu.Lock()
		conns := t.stdio
		t.stdio = nil
		t.stdioMu.Unlock()
		for c := range conns {
			c.Close()
		}
	})
	return nil
}
