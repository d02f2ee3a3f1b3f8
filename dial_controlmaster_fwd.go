package hpcproxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"
)

// Reverse forwarding through an OpenSSH ControlMaster.
//
// In mux proxy mode (the connection that carries the tunnel's channels) the
// master passes a downstream tcpip-forward request on to sshd but never
// routes sshd's reply back (it answers only requests it made itself), and
// it treats any other global request from downstream, cancel-tcpip-forward
// and streamlocal-forward@openssh.com included, as a protocol error that
// closes the whole control connection. Checked with OpenSSH 9.2. So the
// tunnel cannot send those requests itself. Instead it asks the master to
// forward, as `ssh -O forward -R` does (MUX_C_OPEN_FWD, PROTOCOL.mux): the
// master listens on the login node, reports the port sshd chose, and
// connects every accepted connection to a unix socket that the tunnel
// listens on in a private directory; from there the forward relays it like
// any other. Only the user (and the master, running as the user) can reach
// that socket.

// controlListener is the listener of a remote forward set up by the master.
type controlListener struct {
	net.Listener          // the local unix socket the master connects to
	remote       net.Addr // what sshd bound on the login node
	ctlPath      string   // control socket, for the cancel
	fwd          muxForward
	dir          string // private directory holding the socket
	closeOnce    sync.Once
	closeErr     error
}

// Addr reports the address sshd listens on, on the login node.
func (l *controlListener) Addr() net.Addr { return l.remote }

// Close cancels the remote forward in the master (best effort: the master
// may already be gone with the tunnel), then stops listening locally.
func (l *controlListener) Close() error {
	l.closeOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_, cerr := muxRequest(ctx, l.ctlPath, muxCCloseFwd, l.fwd)
		l.closeErr = l.Listener.Close()
		_ = os.RemoveAll(l.dir)
		if cerr != nil && !errors.Is(cerr, net.ErrClosed) && !errors.Is(cerr, os.ErrNotExist) && !isConnRefused(cerr) {
			l.closeErr = errors.Join(l.closeErr, cerr)
		}
	})
	return l.closeErr
}

func isConnRefused(err error) bool {
	var op *net.OpError
	return errors.As(err, &op) && op.Op == "dial"
}

// listenRemote implements remoteListener: it asks the master to listen on addr on the login node and to
// connect what it accepts to a fresh unix socket of ours.
func (t *controlMasterTunnel) listenRemote(ctx context.Context, network, addr string) (net.Listener, error) {
	var fwd muxForward
	switch network {
	case "tcp", "tcp4", "tcp6":
		host, port, err := net.SplitHostPort(addr)
		if err != nil {
			return nil, fmt.Errorf("hpcproxy: listen address %q: %w", addr, err)
		}
		p, err := strconv.ParseUint(port, 10, 16)
		if err != nil {
			return nil, fmt.Errorf("hpcproxy: listen address %q: bad port", addr)
		}
		fwd.listenHost, fwd.listenPort = host, uint32(p)
	case "unix":
		fwd.listenHost, fwd.listenPort = addr, muxPortStreamLocal
	default:
		return nil, fmt.Errorf("hpcproxy: cannot listen on network %q on the login node", network)
	}
	dir, err := os.MkdirTemp(t.sockBase, "hpcproxy-rf-")
	if err != nil {
		return nil, fmt.Errorf("hpcproxy: reverse forward socket dir: %w", err)
	}
	fwd.connectTo = filepath.Join(dir, "s")
	ln, err := net.Listen("unix", fwd.connectTo)
	if err != nil {
		_ = os.RemoveAll(dir)
		return nil, fmt.Errorf("hpcproxy: reverse forward socket: %w", err)
	}
	reply, err := muxRequest(ctx, t.ctlPath, muxCOpenFwd, fwd)
	if err != nil {
		ln.Close()
		_ = os.RemoveAll(dir)
		if errors.Is(err, ErrProhibited) {
			return nil, fmt.Errorf("hpcproxy: login node refused to listen on %s (sshd's AllowTcpForwarding, "+
				"AllowStreamLocalForwarding or PermitListen, or the address is in use): %w", addr, err)
		}
		return nil, t.downError(fmt.Errorf("hpcproxy: listen on the login node at %s (through the ssh control master): %w", addr, err))
	}
	l := &controlListener{Listener: ln, ctlPath: t.ctlPath, fwd: fwd, dir: dir}
	if network == "unix" {
		l.remote = &net.UnixAddr{Name: addr, Net: "unix"}
	} else {
		port := int(fwd.listenPort)
		if reply.port != 0 {
			port = int(reply.port)
		}
		ip := net.ParseIP(fwd.listenHost)
		if ip == nil {
			ip = net.IPv4zero
		}
		l.remote = &net.TCPAddr{IP: ip, Port: port}
	}
	// The listener ends with the tunnel, as gossh's does.
	go func() {
		<-t.Done()
		_ = l.Listener.Close()
	}()
	return l, nil
}
