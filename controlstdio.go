package hpcproxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Connections through an OpenSSH ControlMaster's stdio forwards.
//
// In mux proxy mode every channel's packets pass through the master, which
// decrypts them and appends them to one output buffer per control
// connection. The master writes that buffer to its socket only as fast as
// the socket takes it, but reads from sshd as fast as the channels' windows
// allow, so with several busy channels the buffer grows to megabytes, and
// OpenSSH reallocates (copying and clearing) it for every packet appended:
// measured here with OpenSSH 9.2, four parallel downloads through one proxy
// mode connection fell from 200 MB/s to 6 MB/s each. So each connection
// instead asks the master for a stdio forward (MUX_C_NEW_STDIO_FWD, what
// `ssh -W` does through a master): the master opens the channel itself and
// moves its data to and from a socket pair of ours, with OpenSSH's own flow
// control, as fast as `ssh -D` would; and the relay splices between that
// socket pair and the client's socket without copying through user space.
//
// The master answers a stdio forward that sshd refused with a bare
// "Session open refused by peer", so a failed stdio forward is retried as a
// proxy-mode channel, whose refusal says why (connection refused, no such
// host, prohibited) or which may succeed after all. Each stdio forward
// costs the master two channels (the control connection and the forward)
// and three descriptors (as many here), and OpenSSH exits when a process
// has more than 16,384 channels; beyond stdioCap connections, new ones use
// proxy mode, one channel each.

// stdioSetupDeadline bounds the setup of one stdio forward.
const stdioSetupDeadline = 30 * time.Second

// maxStdioConns caps the stdio forwards open at once through one master
// (a variable for tests): each costs the master two channels.
var maxStdioConns = 4096

// stdioCap returns how many stdio forwards may be open at once in this
// process, over every master (a daemon's pool has up to eight): an eighth
// of the open-file limit, which leaves most of the descriptors to the
// clients' sockets and proxy-mode connections. A variable for tests.
var stdioCap = func() int { return int(openFileLimit() / 8) }

// stdioOpen counts the stdio forwards open in this process.
var stdioOpen atomic.Int64

// stdioRoom reports whether one more stdio forward may open through a
// master that has n open. (Counted per master only, a pool of eight
// masters ran a daemon out of descriptors at 10,000 held connections.)
func stdioRoom(n int) bool {
	return n < maxStdioConns && stdioOpen.Load() < int64(stdioCap())
}

// dialStdio opens a connection to addr through a stdio forward of the
// master at t.ctlPath.
func (t *controlMasterTunnel) dialStdio(ctx context.Context, addr string) (*stdioConn, error) {
	// in: we write, the master reads (its stdin); out: the master writes,
	// we read (its stdout). Two pairs, not one, so that each direction
	// ends by itself: the master closes its stdout at the channel's EOF,
	// and we see EOF on out while still writing to in.
	in, inPeer, err := socketPair()
	if err != nil {
		return nil, err
	}
	out, outPeer, err := socketPair()
	if err != nil {
		in.Close()
		inPeer.Close()
		return nil, err
	}
	ctl, err := t.stdioForward(ctx, addr, func(send func(stdin, stdout int) error) error {
		return send(int(inPeer.Fd()), int(outPeer.Fd()))
	})
	// The master holds its own copies of its ends now (or failed).
	inPeer.Close()
	outPeer.Close()
	if err != nil {
		in.Close()
		out.Close()
		return nil, err
	}
	return &stdioConn{r: out, w: in, ctl: ctl, addr: addr}, nil
}

// stdioForward asks the master at t.ctlPath for a stdio forward to addr
// and returns the control connection that keeps it open once the master
// says the login node opened the channel. withFDs calls send with the
// descriptors the master is to read from (its stdin) and write to (its
// stdout) while they are valid; the master keeps copies of its own.
func (t *controlMasterTunnel) stdioForward(ctx context.Context, addr string,
	withFDs func(send func(stdin, stdout int) error) error) (*net.UnixConn, error) {
	host, portStr, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("hpcproxy: address %q: %w", addr, err)
	}
	port, err := strconv.ParseUint(portStr, 10, 16)
	if err != nil {
		return nil, fmt.Errorf("hpcproxy: address %q: bad port", addr)
	}
	ctx, cancel := context.WithTimeout(ctx, stdioSetupDeadline)
	defer cancel()
	ctl, err := muxHello(ctx, t.ctlPath)
	if err != nil {
		return nil, err
	}
	err = withConnDeadline(ctx, ctl, func() error {
		// (Sending the request before the master's hello has come back
		// saves nothing: measured, it made opens 20 times slower.)
		const reqID = 1
		var req muxBuf
		req.u32(muxCNewStdioFwd)
		req.u32(reqID)
		req.str("") // reserved
		req.str(host)
		req.u32(uint32(port))
		err := req.send(ctl)
		if err == nil {
			err = withFDs(func(stdin, stdout int) error {
				for _, fd := range []int{stdin, stdout} {
					// One byte with each descriptor, as OpenSSH's
					// mm_send_fd sends it.
					if _, _, err := ctl.WriteMsgUnix([]byte{0}, syscall.UnixRights(fd), nil); err != nil {
						return err
					}
				}
				return nil
			})
		}
		if err != nil {
			return fmt.Errorf("mux stdio request: %w", err)
		}
		msg, err := muxRead(ctl)
		if err != nil {
			return fmt.Errorf("mux stdio reply: %w", err)
		}
		rtyp, _ := msg.u32()
		if id, ok := msg.u32(); !ok || id != reqID {
			return fmt.Errorf("mux reply %#x for request %d, want %d", rtyp, id, reqID)
		}
		switch rtyp {
		case muxSSessionOpened:
			return nil
		case muxSPermissionDenied, muxSFailure:
			reason, _ := msg.str()
			return fmt.Errorf("ssh control master: %s", reason)
		}
		return fmt.Errorf("mux: unexpected reply %#x", rtyp)
	})
	if err != nil {
		ctl.Close()
		return nil, err
	}
	return ctl, nil
}

// socketPair returns the two ends of a unix stream socket pair: ours as a
// *net.UnixConn, the master's as an *os.File to pass it.
func socketPair() (*net.UnixConn, *os.File, error) {
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("hpcproxy: socketpair: %w", err)
	}
	ours := os.NewFile(uintptr(fds[0]), "stdio-forward")
	peer := os.NewFile(uintptr(fds[1]), "stdio-forward-peer")
	c, err := net.FileConn(ours) // dups the descriptor
	ours.Close()
	if err != nil {
		peer.Close()
		return nil, nil, fmt.Errorf("hpcproxy: socketpair: %w", err)
	}
	return c.(*net.UnixConn), peer, nil
}

// stdioConn is a connection through a master's stdio forward: we write to
// w, read from r, and hold the control connection that keeps the forward
// open (the master closes the forward when it closes, and closes it when
// the forward ends).
type stdioConn struct {
	r, w *net.UnixConn
	ctl  *net.UnixConn
	// client is a handoff's client socket (r and w are nil then), which
	// the master reads and writes itself: Close shuts it down first.
	client    handoffClient
	addr      string
	closeOnce sync.Once
	onClose   func() // tells the tunnel; nil if untracked
}

var _ splitConn = (*stdioConn)(nil)

func (c *stdioConn) Read(p []byte) (int, error)  { return c.r.Read(p) }
func (c *stdioConn) Write(p []byte) (int, error) { return c.w.Write(p) }

// CloseWrite half-closes: the master reads EOF and sends the channel's
// EOF to the login node.
func (c *stdioConn) CloseWrite() error { return c.w.CloseWrite() }

// Close closes the forward's socket pairs (a handoff's: shuts the client's
// socket down, which reaches the master's copies of it) before the control
// connection. The other order can leave the forward open at the login node
// until the master next wakes (ServerAliveInterval, 60 s): when the master
// sees the control connection end first, it marks the forward's input
// ended from a clean-up callback that runs just before it polls, and then
// has nothing to poll that would make it send the channel's EOF (OpenSSH
// 9.2 mux.c, mux_master_control_cleanup_cb; seen with LogLevel DEBUG3).
// Its own read of our end's EOF, when that comes first, sends it at once.
func (c *stdioConn) Close() error {
	var err error
	c.closeOnce.Do(func() {
		switch {
		case c.r != nil:
			err = errors.Join(c.w.Close(), c.r.Close())
		case c.client != nil:
			if rc, serr := c.client.SyscallConn(); serr == nil {
				_ = rc.Control(func(fd uintptr) { _ = syscall.Shutdown(int(fd), syscall.SHUT_RDWR) })
			}
		}
		err = errors.Join(err, c.ctl.Close())
		if c.onClose != nil {
			c.onClose()
		}
	})
	return err
}

// LocalAddr and RemoteAddr name the forward: a stdio forward has no
// addresses of its own (like an SSH channel).
func (c *stdioConn) LocalAddr() net.Addr  { return stdioAddr("stdio-forward") }
func (c *stdioConn) RemoteAddr() net.Addr { return stdioAddr(c.addr) }

func (c *stdioConn) SetDeadline(t time.Time) error {
	return errors.Join(c.r.SetReadDeadline(t), c.w.SetWriteDeadline(t))
}
func (c *stdioConn) SetReadDeadline(t time.Time) error  { return c.r.SetReadDeadline(t) }
func (c *stdioConn) SetWriteDeadline(t time.Time) error { return c.w.SetWriteDeadline(t) }

func (c *stdioConn) readSide() net.Conn  { return c.r }
func (c *stdioConn) writeSide() net.Conn { return c.w }

// stdioAddr is the address of a stdio forward: the destination it was
// asked for.
type stdioAddr string

func (a stdioAddr) Network() string { return "stdio-forward" }
func (a stdioAddr) String() string  { return string(a) }
