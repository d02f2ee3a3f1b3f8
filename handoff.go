package hpcproxy

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Handing a client's socket to an OpenSSH ControlMaster.
//
// A controlmaster connection normally passes the master two socket pairs
// (controlstdio.go) and relays between them and the client: every byte
// crosses the daemon twice (socket pair, pipe, socket). After the proxy
// handshake, the Server can instead give the master the client's own
// socket, in one of two ways ([HandoffMode]):
//
//   - HandoffPipe (the default): the client's socket is the stdio
//     forward's stdin, so uploads go from the client to the master without
//     the daemon, and a pipe is its stdout, which the daemon splices to the
//     client after writing the reply: one splice per chunk for downloads
//     instead of two, and the refusal codes stay precise.
//   - HandoffOptimistic: the daemon writes the success reply first, as
//     `ssh -D` does (channels.c channel_decode_socks5 queues it before the
//     channel is even opened), and then gives the master the client's
//     socket as stdin and stdout: no byte passes the daemon. A destination
//     that cannot be reached is, as with `ssh -D`, a connection closed
//     without a word instead of a refusal code.
//
// Why the reply must be written before the socket is handed over as
// stdout, never after the master's answer: mux.c sends
// MUX_S_SESSION_OPENED from the channel's open-confirm callback
// (mux_stdio_confirm), and from then on writes whatever the destination
// sends to its stdout, so a banner (SSH, SMTP, FTP) can reach the client
// before a reply the daemon writes once it has read that answer.
// TestStdioForwardOneSocket measures it.
//
// The master does not read its stdin before the login node has confirmed
// the channel (channels.c has no pre or post handler for an opening
// channel), so when the stdio forward fails the client's socket is
// untouched and the daemon can still open a proxy-mode channel for it.
// What the daemon does not see it does not count: ServerStats.BytesIn
// leaves out a handed-off upload, and BytesOut an optimistic download.

// HandoffMode says whether and how the daemon hands a client's socket to
// an OpenSSH ControlMaster after the proxy handshake (handoff.go).
type HandoffMode int

const (
	// HandoffPipe gives the master the client's socket to read from and a
	// pipe to write to, spliced to the client after the reply.
	HandoffPipe HandoffMode = iota
	// HandoffOptimistic writes the success reply first and gives the
	// master the client's socket both ways, as `ssh -D` answers: no bytes
	// through the daemon, no refusal codes.
	HandoffOptimistic
	// HandoffOff relays every connection through socket pairs.
	HandoffOff
)

var handoffModeNames = [...]string{HandoffPipe: "pipe", HandoffOptimistic: "optimistic", HandoffOff: "off"}

func (m HandoffMode) String() string {
	if m >= 0 && int(m) < len(handoffModeNames) {
		return handoffModeNames[m]
	}
	return fmt.Sprintf("HandoffMode(%d)", int(m))
}

var _ flag.Value = (*HandoffMode)(nil)

// Set implements flag.Value.
func (m *HandoffMode) Set(s string) error {
	for i, n := range handoffModeNames {
		if s == n {
			*m = HandoffMode(i)
			return nil
		}
	}
	return fmt.Errorf("hpcproxy: handoff mode %q: want pipe, optimistic or off", s)
}

// errNoHandoff says that a tunnel cannot take this client's socket; the
// Server dials as usual.
var errNoHandoff = errors.New("hpcproxy: no handoff")

// handoffDialer is implemented by what can connect to a destination and
// read the client's bytes from its socket itself.
type handoffDialer interface {
	// dialHandoff connects to addr for client, whose handshake is done
	// and which has no bytes buffered in the daemon. It returns a
	// *handoff that now reads from client (and, if optimistic, writes to
	// it), or a conn to relay as a DialFunc's, or errNoHandoff to let the
	// caller dial as usual. On any error client has not been read from.
	// ctx governs the setup.
	dialHandoff(ctx context.Context, addr string, client handoffClient, optimistic bool) (*handoff, net.Conn, error)
}

// handoffClient is a client socket that can be handed off: a TCP or unix
// stream socket.
type handoffClient interface {
	net.Conn
	syscall.Conn
	CloseWrite() error
}

// handoff is a stdio forward whose stdin is the client's socket and whose
// stdout is out, a pipe, or the client's socket too when out is nil.
type handoff struct {
	sc  *stdioConn // its control connection keeps the forward open
	out *os.File   // the pipe's read end; nil: optimistic
	// released, if set, runs once when the handoff is closed: a pool
	// counts the forward on its member until then.
	released func()
	once     sync.Once
}

// Close ends the forward and the client's connection at once: its
// stdioConn shuts the client's socket down, which reaches every
// descriptor of it, the master's too, before it closes the control
// connection. (Closing the control connection alone asks the master to
// end the forward, but it sends its EOF to the login node only once it
// reads its stdin's, which the client's socket does not give while the
// client keeps it open: seen, the forward and the destination's
// connection outlived a closed Server by a minute.)
func (h *handoff) Close() error {
	err := h.sc.Close()
	if h.out != nil {
		err = errors.Join(err, h.out.Close())
	}
	if h.released != nil {
		h.once.Do(h.released)
	}
	return err
}

// handoffTracker is what a Server tracks for a handoff, so that its Close
// ends the handoff.
type handoffTracker struct {
	*net.UnixConn // the control connection
	h             *handoff
}

func (t *handoffTracker) Close() error { return t.h.Close() }

// run moves the destination's bytes from the pipe to client until the
// pipe's EOF, adding them to count, then half-closes client and waits for
// the master to end the forward (the client's EOF and the destination's
// both reached the other side, or either failed). Without a pipe it only
// waits. It closes the forward.
func (h *handoff) run(client handoffClient, count *atomic.Int64) (err error) {
	defer h.Close()
	if h.out != nil {
		if err := spliceFromPipe(h.out, client, count); err != nil {
			return fmt.Errorf("hpcproxy: handoff dest->client: %w", err)
		}
		if err := client.CloseWrite(); err != nil {
			return fmt.Errorf("hpcproxy: handoff: half-close: %w", err)
		}
	}
	// The master sends nothing more on the control connection of a stdio
	// forward; it closes it when the channel closes.
	var b [64]byte
	for {
		if _, err := h.sc.ctl.Read(b[:]); err != nil {
			if err == io.EOF || errors.Is(err, net.ErrClosed) {
				return nil
			}
			return fmt.Errorf("hpcproxy: handoff: control connection: %w", err)
		}
	}
}

// dialOrHandoff connects the session to addr: through the server's
// handoff dialer when it has one and the client's socket can be handed
// off, else with dial. After a handoff, or whenever it has written reply
// (the protocol's success answer) itself, it returns a nil conn and nil
// error: the session is over for its caller. Any error is a dial error to
// refuse the client with, as dial's.
func (ss *session) dialOrHandoff(addr string, reply []byte) (net.Conn, error) {
	s := ss.srv
	client, ok := ss.c.raw.(handoffClient)
	if s.handoff == nil || s.handoffMode == HandoffOff || !ok || ss.refuse || s.IdleTimeout > 0 || ss.c.br.Buffered() > 0 {
		return ss.dial(addr)
	}
	if err := ss.c.raw.SetDeadline(time.Time{}); err != nil {
		return nil, fmt.Errorf("hpcproxy: clear handshake deadline: %w", err)
	}
	optimistic := s.handoffMode == HandoffOptimistic
	if optimistic {
		if _, err := client.Write(reply); err != nil {
			ss.fail(fmt.Errorf("hpcproxy: write reply: %w", err))
			ss.log.Debug("write reply", "err", err)
			return nil, nil
		}
	}
	ctx, cancel := context.WithTimeout(s.baseContext(), s.dialTimeout())
	h, c, err := s.handoff.dialHandoff(ctx, addr, client, optimistic)
	cancel()
	if errors.Is(err, errNoHandoff) || errors.Is(err, ErrTunnelDown) {
		// Dial waits for a tunnel that is coming back, or says why not.
		c, err = ss.dial(addr)
	} else if err != nil {
		err = convertOpenChannelError(addr, err)
	} else if c != nil {
		if _, ok := s.trackConn(c); !ok {
			c.Close()
			c, err = nil, ErrServerClosed
		}
	}
	if !optimistic || h == nil {
		if err != nil && optimistic {
			// Replied already: close, as ssh -D does.
			ss.logDialError(addr, classifyDialError(err), err)
			ss.fail(err)
			return nil, nil
		}
		if optimistic {
			ss.logStartRelay(c)
			return nil, nil
		}
		if err != nil || c != nil {
			return c, err
		}
	}
	// Server.Close ends the forward, which ends the client's connection
	// too: the tracker stands in for the client's conn, which closed
	// alone (in any order with the tracker) would leave the forward
	// running with the master's copies of the socket.
	tr := &handoffTracker{UnixConn: h.sc.ctl, h: h}
	if _, ok := s.trackConn(tr); ok {
		s.untrackConn(ss.c.raw)
	} else {
		h.Close()
		if !optimistic {
			return nil, ErrServerClosed
		}
		ss.fail(ErrServerClosed)
		return nil, nil
	}
	if !optimistic {
		if _, err := client.Write(reply); err != nil {
			ss.release(tr)
			ss.fail(err)
			ss.log.Debug("write reply", "err", err)
			return nil, nil
		}
	}
	ss.c.takeBuffered() // drops the reader: nothing is buffered
	finish, log := ss.finish, ss.log
	ss.detached = true
	go func() {
		err := h.run(client, &s.bytesOut)
		s.untrackConn(tr)
		if err != nil {
			log.Debug("connection ended", "err", err)
		}
		finish()
	}()
	return nil, nil
}

// logStartRelay starts the relay to dst after an optimistic reply, and
// logs it if it cannot.
func (ss *session) logStartRelay(dst net.Conn) {
	if err := ss.startRelay(dst); err != nil {
		ss.log.Debug("connection ended", "err", err)
	}
}

// dialHandoff implements handoffDialer for the current tunnel, if any.
func (s *SupervisedTunnel) dialHandoff(ctx context.Context, addr string, client handoffClient, optimistic bool) (*handoff, net.Conn, error) {
	s.mu.Lock()
	cur := s.cur
	s.mu.Unlock()
	if cur == nil {
		return nil, nil, errNoHandoff
	}
	return cur.dialHandoff(ctx, addr, client, optimistic)
}

// dialHandoff implements handoffDialer when the tunnel's method does.
func (t *Tunnel) dialHandoff(ctx context.Context, addr string, client handoffClient, optimistic bool) (*handoff, net.Conn, error) {
	hd, ok := t.impl.(handoffDialer)
	if !ok {
		return nil, nil, errNoHandoff
	}
	select {
	case <-t.impl.Done():
		return nil, nil, errNoHandoff
	default:
	}
	return hd.dialHandoff(ctx, addr, client, optimistic)
}

var (
	_ handoffDialer = (*SupervisedTunnel)(nil)
	_ handoffDialer = (*Tunnel)(nil)
	_ handoffDialer = (*poolTunnel)(nil)
	_ handoffDialer = (*controlMasterTunnel)(nil)
)

// dialHandoff implements handoffDialer: a stdio forward with client as
// its stdin, and as its stdout if optimistic, else a pipe. When the master cannot open one, it opens a proxy-mode
// channel as DialContext does, whose refusal says why.
func (t *controlMasterTunnel) dialHandoff(ctx context.Context, addr string, client handoffClient, optimistic bool) (*handoff, net.Conn, error) {
	t.stdioMu.Lock()
	n, closed := len(t.stdio), t.stdio == nil
	t.stdioMu.Unlock()
	if closed || !stdioRoom(n) {
		return nil, nil, errNoHandoff
	}
	rc, err := client.SyscallConn()
	if err != nil {
		return nil, nil, errNoHandoff
	}
	var out, outPeer *os.File
	if !optimistic {
		if out, outPeer, err = newHandoffPipe(); err != nil {
			return nil, nil, err
		}
	}
	ctl, err := t.stdioForward(ctx, addr, func(send func(stdin, stdout int) error) error {
		var serr error
		if err := rc.Control(func(fd uintptr) {
			stdout := int(fd)
			if outPeer != nil {
				stdout = int(outPeer.Fd())
			}
			serr = send(int(fd), stdout)
		}); err != nil {
			return err
		}
		return serr
	})
	if outPeer != nil {
		outPeer.Close()
	}
	if err != nil {
		if out != nil {
			out.Close()
		}
		if ctx.Err() != nil {
			return nil, nil, t.downError(err)
		}
		t.log.Debug("stdio forward failed; trying a proxy-mode channel", "dest", addr, "err", err)
		c, err := openDirectContext(ctx, t.client, addr)
		if err != nil {
			return nil, nil, t.downError(convertOpenChannelError(addr, err))
		}
		return nil, c, nil
	}
	sc := &stdioConn{ctl: ctl, addr: addr, client: client}
	if _, err := t.trackStdio(sc); err != nil {
		if out != nil {
			out.Close()
		}
		return nil, nil, err
	}
	return &handoff{sc: sc, out: out}, nil, nil
}

// envHandoff names the daemon's HandoffMode when DaemonConfig leaves it
// zero (so that a daemon started by the command line can be switched).
const envHandoff = "HPCPROXY_HANDOFF"
