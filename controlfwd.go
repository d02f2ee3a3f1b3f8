package hpcproxy

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
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

// Mux protocol constants (PROTOCOL.mux).
const (
	muxMsgHello          = 0x00000001
	muxCOpenFwd          = 0x10000006
	muxCCloseFwd         = 0x10000007
	muxSOK               = 0x80000001
	muxSPermissionDenied = 0x80000002
	muxSFailure          = 0x80000003
	muxSRemotePort       = 0x80000007
	muxFwdRemote         = 2
	muxPortStreamLocal   = 0xfffffffe // (uint32)-2: host is a unix socket path
	muxVersion           = 4
)

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

// muxForward is the body of MUX_C_OPEN_FWD / MUX_C_CLOSE_FWD for a remote
// forward to a local unix socket.
type muxForward struct {
	listenHost string
	listenPort uint32
	connectTo  string // unix socket path
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

type muxReply struct {
	port uint32 // MUX_S_REMOTE_PORT: the port sshd chose
}

// muxRequest opens a new control connection to the master at path, says
// hello and sends one forwarding command (open or close), returning the
// master's answer. Refusals wrap ErrProhibited with the master's reason.
func muxRequest(ctx context.Context, path string, typ uint32, fwd muxForward) (muxReply, error) {
	c, err := muxHello(ctx, path)
	if err != nil {
		return muxReply{}, err
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { _ = c.SetDeadline(time.Unix(1, 0)) })
	defer stop()

	const reqID = 1
	var req muxBuf
	req.u32(typ)
	req.u32(reqID)
	req.u32(muxFwdRemote)
	req.str(fwd.listenHost)
	req.u32(fwd.listenPort)
	req.str(fwd.connectTo)
	req.u32(muxPortStreamLocal)
	if err := req.send(c); err != nil {
		return muxReply{}, fmt.Errorf("mux request: %w", err)
	}
	msg, err := muxRead(c)
	if err != nil {
		return muxReply{}, fmt.Errorf("mux reply: %w", err)
	}
	return parseMuxReply(msg, reqID)
}

// parseMuxReply reads the master's answer to request reqID. Refusals wrap
// ErrProhibited with the master's reason.
func parseMuxReply(msg muxMsg, reqID uint32) (muxReply, error) {
	rtyp, _ := msg.u32()
	if id, ok := msg.u32(); !ok || id != reqID {
		return muxReply{}, fmt.Errorf("mux reply %#x for request %d, want %d", rtyp, id, reqID)
	}
	switch rtyp {
	case muxSOK:
		return muxReply{}, nil
	case muxSRemotePort:
		p, ok := msg.u32()
		if !ok {
			return muxReply{}, errors.New("mux: short remote port reply")
		}
		return muxReply{port: p}, nil
	case muxSPermissionDenied, muxSFailure:
		reason, _ := msg.str()
		return muxReply{}, fmt.Errorf("%w: ssh control master: %s", ErrProhibited, reason)
	}
	return muxReply{}, fmt.Errorf("mux: unexpected reply %#x", rtyp)
}

// muxBuf builds one mux packet.
type muxBuf []byte

func (b *muxBuf) u32(v uint32) { *b = binary.BigEndian.AppendUint32(*b, v) }
func (b *muxBuf) str(s string) { b.u32(uint32(len(s))); *b = append(*b, s...) }

func (b muxBuf) send(w io.Writer) error {
	pkt := binary.BigEndian.AppendUint32(make([]byte, 0, 4+len(b)), uint32(len(b)))
	_, err := w.Write(append(pkt, b...))
	return err
}

// muxMsg reads fields off one mux packet.
type muxMsg []byte

func (m *muxMsg) u32() (uint32, bool) {
	if len(*m) < 4 {
		return 0, false
	}
	v := binary.BigEndian.Uint32(*m)
	*m = (*m)[4:]
	return v, true
}

func (m *muxMsg) str() (string, bool) {
	n, ok := m.u32()
	if !ok || uint32(len(*m)) < n {
		return "", false
	}
	s := string((*m)[:n])
	*m = (*m)[n:]
	return s, true
}

// muxRead reads one length-prefixed mux packet (at most 256 KiB).
func muxRead(r io.Reader) (muxMsg, error) {
	var hdr [4]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, err
	}
	n := binary.BigEndian.Uint32(hdr[:])
	if n > 256<<10 {
		return nil, fmt.Errorf("mux: packet of %d bytes", n)
	}
	buf := make([]byte, n)
	if _, err := io.ReadFull(r, buf); err != nil {
		return nil, err
	}
	return muxMsg(buf), nil
}
