package hpcproxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"math"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Port forwarding: LocalForward carries connections made in the job to a
// service on the login side (`ssh -L`); ReverseForward has the login node's
// sshd listen and carries its connections back to a service in the job
// (`ssh -R`). Both relay with the package's one relay function and count
// bytes like the proxy server.

// ForwardKind says which way a forward goes.
type ForwardKind string

const (
	// ForwardLocal listens in the job and connects on the login side.
	ForwardLocal ForwardKind = "local"
	// ForwardReverse listens on the login node and connects in the job.
	ForwardReverse ForwardKind = "reverse"
)

// Forward statuses, as ForwardInfo.Status reports them.
const (
	ForwardUp      = "up"      // listening and serving
	ForwardWaiting = "waiting" // reverse: the tunnel is down or the remote listener is being re-requested
	ForwardClosed  = "closed"  // closed, or never started
)

// ForwardInfo is a snapshot of a forward, as the daemon's state file
// records it. BytesIn counts bytes from the connecting side (the client of
// the listener) to the target, BytesOut the reverse; both grow while
// connections are open, not only when they end.
type ForwardInfo struct {
	Kind ForwardKind `json:"kind"`
	// Listen is where the forward listens: a local "host:port" or socket
	// path for a local forward; the address sshd bound on the login node
	// (with the port it chose) for a reverse forward.
	Listen string `json:"listen"`
	// Target is where accepted connections go: "host:port" as the login
	// node resolves it (local), or the service in the job (reverse).
	Target    string `json:"target"`
	Status    string `json:"status"`
	LastError string `json:"last_error,omitempty"`
	Active    int64  `json:"active"`
	Total     int64  `json:"total"`
	BytesIn   int64  `json:"bytes_in"`
	BytesOut  int64  `json:"bytes_out"`
	Failed    int64  `json:"failed"` // connections whose target could not be reached
}

// forwardCore is what both forwards share: counters, live conns, handler
// goroutines.
type forwardCore struct {
	log                   *slog.Logger
	active, total, failed atomic.Int64
	in, out               atomic.Int64

	mu      sync.Mutex
	conns   map[net.Conn]struct{}
	closed  bool
	lastErr string
	wg      sync.WaitGroup
	// dialCtx is the parent of every target dial; shut cancels it, so a
	// dial waiting for a tunnel that is down does not hold up Close.
	dialCtx    context.Context
	cancelDial context.CancelFunc
}

// forwardDialTimeout bounds one dial of a forward's target.
const forwardDialTimeout = 30 * time.Second

// forwardRelayIdle is the relay's idle timeout for forwards: in effect
// never. It is set because a relay with an idle timeout copies through
// user space and counts bytes as they flow, also between two kernel
// sockets (a controlmaster expose's unix conn and a TCP service in the
// job; a local forward over the socks or direct methods), where it would
// otherwise splice and count only once the connection ends, so that a
// long-lived session (a notebook's websocket) would show 0 bytes in status
// for hours. Apart from the direct method, ssh is the bottleneck of every
// forward, not this copy.
const forwardRelayIdle = time.Duration(math.MaxInt64)

func (c *forwardCore) logger() *slog.Logger {
	if c.log == nil {
		return discardLogger
	}
	return c.log
}

// handle relays conn to the target that dial opens, in a tracked goroutine.
// It reports false (and closes conn) once the forward is closed.
func (c *forwardCore) handle(conn net.Conn, target string, dial func(ctx context.Context) (net.Conn, error)) bool {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		conn.Close()
		return false
	}
	if c.conns == nil {
		c.conns = map[net.Conn]struct{}{}
	}
	if c.dialCtx == nil {
		c.dialCtx, c.cancelDial = context.WithCancel(context.Background())
	}
	parent := c.dialCtx
	c.conns[conn] = struct{}{}
	c.wg.Add(1)
	c.mu.Unlock()
	c.total.Add(1)
	c.active.Add(1)
	go func() {
		defer c.wg.Done()
		defer c.active.Add(-1)
		defer func() {
			c.mu.Lock()
			delete(c.conns, conn)
			c.mu.Unlock()
		}()
		ctx, cancel := context.WithTimeout(parent, forwardDialTimeout)
		dst, err := dial(ctx)
		cancel()
		if err != nil && parent.Err() != nil {
			// Closed while dialling: not the target's failure.
			conn.Close()
			return
		}
		if err != nil {
			c.failed.Add(1)
			c.setErr(err)
			c.logger().Warn("forward: target unreachable", "target", target, "err", err)
			conn.Close()
			return
		}
		c.mu.Lock()
		closed := c.closed
		if !closed {
			c.conns[dst] = struct{}{}
		}
		c.mu.Unlock()
		if closed {
			conn.Close()
			dst.Close()
			return
		}
		err = relay(conn, dst, relayConfig{idle: forwardRelayIdle, in: &c.in, out: &c.out})
		c.mu.Lock()
		delete(c.conns, dst)
		c.mu.Unlock()
		if err != nil {
			c.logger().Debug("forward: relay ended", "target", target, "err", err)
		}
	}()
	return true
}

func (c *forwardCore) setErr(err error) {
	c.mu.Lock()
	c.lastErr = err.Error()
	c.mu.Unlock()
}

// shut marks the core closed, cancels dials in flight, closes live conns
// and waits for handlers.
func (c *forwardCore) shut() {
	c.mu.Lock()
	c.closed = true
	if c.cancelDial != nil {
		c.cancelDial()
	}
	for conn := range c.conns {
		conn.Close()
	}
	c.mu.Unlock()
	c.wg.Wait()
}

func (c *forwardCore) info(kind ForwardKind, listen, target, status string) ForwardInfo {
	c.mu.Lock()
	lastErr := c.lastErr
	c.mu.Unlock()
	return ForwardInfo{
		Kind: kind, Listen: listen, Target: target, Status: status, LastError: lastErr,
		Active: c.active.Load(), Total: c.total.Load(), Failed: c.failed.Load(),
		BytesIn: c.in.Load(), BytesOut: c.out.Load(),
	}
}

// isSocketPath reports whether addr names a unix socket: it contains '/'.
func isSocketPath(addr string) bool { return strings.Contains(addr, "/") }

// LocalForward listens in the job and carries each connection through a
// tunnel to a fixed host:port on the login side, like `ssh -L`. Set the
// fields and call Start (or Serve with a listener of your own); Close
// stops it. A LocalForward over a [SupervisedTunnel]'s Dial survives
// reconnects: connections made while the tunnel is down wait for it as any
// dial does.
type LocalForward struct {
	// Listen is where to listen: "host:port", a bare port (on 127.0.0.1),
	// or a unix socket path (anything with a '/'; created mode 0600).
	Listen string
	// Remote is the destination, "host:port" as the login node resolves it.
	Remote string
	// Dial opens connections through the tunnel, such as
	// SupervisedTunnel.Dial or Tunnel.Dial.
	Dial DialFunc
	// AllowConn optionally vets each accepted connection before anything is
	// dialled, such as [SameUserConn] on a shared compute node. If nil,
	// every connection is served.
	AllowConn func(net.Conn) bool
	// Logger optionally receives per-connection diagnostics. If nil,
	// nothing is logged.
	Logger *slog.Logger

	core     forwardCore
	ln       net.Listener
	serveErr chan error
	started  atomic.Bool
	closing  atomic.Bool
}

// ListenAddr turns a forward's listen spec into network and address: a
// path (with '/') is "unix", a bare port means 127.0.0.1:PORT, anything
// else is "tcp" host:port.
func ListenAddr(spec string) (network, addr string, err error) {
	switch {
	case spec == "":
		return "", "", errors.New("hpcproxy: empty listen address")
	case isSocketPath(spec):
		return "unix", spec, nil
	}
	if p, err := strconv.Atoi(spec); err == nil {
		if p < 0 || p > 65535 {
			return "", "", fmt.Errorf("hpcproxy: port %d out of range", p)
		}
		return "tcp", net.JoinHostPort("127.0.0.1", spec), nil
	}
	if _, _, err := net.SplitHostPort(spec); err != nil {
		return "", "", fmt.Errorf("hpcproxy: listen address %q: want PORT, HOST:PORT or a socket path: %w", spec, err)
	}
	return "tcp", spec, nil
}

// Start listens on f.Listen and serves in the background until Close.
func (f *LocalForward) Start() error {
	network, addr, err := ListenAddr(f.Listen)
	if err != nil {
		return err
	}
	var ln net.Listener
	if network == "unix" {
		ln, err = listenUnixPrivate(addr)
	} else {
		ln, err = net.Listen(network, addr)
	}
	if err != nil {
		return fmt.Errorf("hpcproxy: local forward: listen: %w", err)
	}
	if err := f.attach(ln); err != nil {
		return err
	}
	f.serveErr = make(chan error, 1)
	go func() { f.serveErr <- f.serve(ln) }()
	return nil
}

// listenUnixPrivate listens on a unix socket at path that only the user
// can connect to (mode 0600), without touching the process-wide umask and
// without a moment in which the socket is reachable with a wider mode: it
// binds in a fresh 0700 directory beside path, sets the mode there, and
// only then links the socket into place. link(2) never replaces a file;
// a stale socket at path (nothing listens on it) is replaced, a live one
// or a file that is not a socket is an error (EADDRINUSE). Closing the
// listener removes path if it is still this socket.
func listenUnixPrivate(path string) (net.Listener, error) {
	dir, err := os.MkdirTemp(filepath.Dir(path), ".hpcproxy-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	tmp := filepath.Join(dir, "s")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: tmp, Net: "unix"})
	if err != nil {
		return nil, err
	}
	ln.SetUnlinkOnClose(false) // it will not be at tmp; Close removes path
	if err := os.Chmod(tmp, 0o600); err != nil {
		ln.Close()
		return nil, err
	}
	if err := placeSocket(tmp, path); err != nil {
		ln.Close()
		return nil, err
	}
	fi, err := os.Lstat(path)
	if err != nil {
		ln.Close()
		return nil, err
	}
	return &privateUnixListener{UnixListener: ln, addr: &net.UnixAddr{Name: path, Net: "unix"}, file: fi}, nil
}

// placeSocket gives the socket at tmp the name path: a hard link where
// nothing is at path, else a rename over a stale socket.
func placeSocket(tmp, path string) error {
	err := os.Link(tmp, path)
	if err == nil {
		return nil
	}
	fi, serr := os.Lstat(path)
	if errors.Is(serr, fs.ErrNotExist) {
		// No hard links on this file system, and nothing in the way.
		return os.Rename(tmp, path)
	}
	if !errors.Is(err, fs.ErrExist) {
		return err
	}
	if serr != nil {
		return serr
	}
	inUse := &os.PathError{Op: "listen", Path: path, Err: syscall.EADDRINUSE}
	if fi.Mode()&os.ModeSocket == 0 {
		return inUse // not a socket: not ours to replace
	}
	if c, derr := net.DialTimeout("unix", path, time.Second); derr == nil {
		c.Close()
		return inUse
	}
	return os.Rename(tmp, path)
}

// privateUnixListener is a listener made by listenUnixPrivate: it reports
// path as its address and removes path on Close if path is still its
// socket.
type privateUnixListener struct {
	*net.UnixListener
	addr      *net.UnixAddr
	file      fs.FileInfo
	closeOnce sync.Once
}

func (l *privateUnixListener) Addr() net.Addr { return l.addr }

func (l *privateUnixListener) Close() error {
	err := l.UnixListener.Close()
	l.closeOnce.Do(func() {
		if fi, serr := os.Lstat(l.addr.Name); serr == nil && os.SameFile(fi, l.file) {
			_ = os.Remove(l.addr.Name)
		}
	})
	return err
}

// Serve accepts connections on ln and forwards them until Close (then it
// returns nil) or until Accept fails.
func (f *LocalForward) Serve(ln net.Listener) error {
	if err := f.attach(ln); err != nil {
		return err
	}
	return f.serve(ln)
}

// attach makes ln the forward's listener.
func (f *LocalForward) attach(ln net.Listener) error {
	if f.Dial == nil {
		ln.Close()
		return errors.New("hpcproxy: local forward: no Dial")
	}
	if !f.started.CompareAndSwap(false, true) {
		ln.Close()
		return errors.New("hpcproxy: local forward already serving")
	}
	f.core.mu.Lock()
	defer f.core.mu.Unlock()
	f.core.log = f.Logger
	f.ln = ln
	if f.core.closed {
		ln.Close()
	}
	return nil
}

func (f *LocalForward) serve(ln net.Listener) error {
	for {
		c, err := ln.Accept()
		if err != nil {
			if f.closing.Load() {
				return nil
			}
			return fmt.Errorf("hpcproxy: local forward: accept: %w", err)
		}
		if f.AllowConn != nil && !f.AllowConn(c) {
			f.core.logger().Warn("local forward: connection refused by AllowConn", "peer", c.RemoteAddr())
			c.Close()
			continue
		}
		f.core.handle(c, f.Remote, func(ctx context.Context) (net.Conn, error) {
			return f.Dial(ctx, "tcp", f.Remote)
		})
	}
}

// Addr returns the listening address, or nil before Start or Serve.
func (f *LocalForward) Addr() net.Addr {
	f.core.mu.Lock()
	defer f.core.mu.Unlock()
	if f.ln == nil {
		return nil
	}
	return f.ln.Addr()
}

// Info returns the forward's state and counters.
func (f *LocalForward) Info() ForwardInfo {
	listen, status := f.Listen, ForwardUp
	if a := f.Addr(); a != nil {
		listen = a.String()
	}
	f.core.mu.Lock()
	if f.core.closed || f.ln == nil {
		status = ForwardClosed
	}
	f.core.mu.Unlock()
	return f.core.info(ForwardLocal, listen, f.Remote, status)
}

// Close stops listening, cancels dials in flight (such as dials waiting
// for a reconnecting tunnel), closes the forwarded connections and waits
// for their goroutines. It is idempotent.
func (f *LocalForward) Close() error {
	f.closing.Store(true)
	f.core.mu.Lock()
	ln := f.ln
	f.core.mu.Unlock()
	var err error
	if ln != nil {
		err = ln.Close()
		if errors.Is(err, net.ErrClosed) {
			err = nil
		}
	}
	f.core.shut()
	if f.serveErr != nil {
		<-f.serveErr
		f.serveErr = nil
	}
	return err
}

// TunnelSource hands out the tunnel that is up: a [*Tunnel] hands out
// itself while it is up, a [*SupervisedTunnel] waits for the current one.
type TunnelSource interface {
	// WaitTunnel returns a tunnel that is up, waiting as the source allows
	// and ctx permits; an error wrapping ErrTunnelDown means none will come.
	WaitTunnel(ctx context.Context) (*Tunnel, error)
}

var (
	_ TunnelSource = (*Tunnel)(nil)
	_ TunnelSource = (*SupervisedTunnel)(nil)
)

// WaitTunnel returns t while it is up; afterwards an error wrapping
// ErrTunnelDown. It never waits.
func (t *Tunnel) WaitTunnel(ctx context.Context) (*Tunnel, error) {
	select {
	case <-t.impl.Done():
		return nil, ErrTunnelDown
	default:
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		return t, nil
	}
}

// ReverseForward has the login node's sshd listen (tcpip-forward, `ssh -R`
// semantics) and carries each connection it accepts to a service in the
// job, such as a Jupyter server. It needs a tunnel method that can listen
// (gossh or controlmaster; see [Tunnel.Listen]). Started on a
// [SupervisedTunnel] it re-requests the remote listener after every
// reconnect, on the same port it had, so an `ssh -L` hint stays valid;
// only if that port stays taken does it take a new one (reported through
// OnBind and Info).
type ReverseForward struct {
	// Remote optionally specifies where the login node listens:
	// "host:port" (port 0: sshd chooses), a bare port (on 127.0.0.1), or a
	// unix socket path (anything with a '/'; sshd creates it owner-only
	// where AllowStreamLocalForwarding permits). If empty, "127.0.0.1:0".
	Remote string
	// Local is the service in the job that connections go to, "host:port"
	// or a unix socket path.
	Local string
	// DialLocal optionally connects to Local. If nil, a net.Dialer.
	DialLocal DialFunc
	// OnBind optionally is called with the bound address on the login node
	// each time the remote listener is (re)established. It must not block
	// for long.
	OnBind func(remote net.Addr)
	// Logger optionally receives diagnostics. If nil, nothing is logged.
	Logger *slog.Logger

	core    forwardCore
	network string
	want    string // the address to request next: Remote, then the bound port
	cancel  context.CancelFunc
	done    chan struct{}

	smu     sync.Mutex
	bound   net.Addr
	ln      net.Listener
	status  string
	stopped bool // Close has begun: no new listener is taken on
}

// Start requests the remote listener on the tunnel that src hands out and
// serves it in the background until Close. Its error (sshd refused, the
// method cannot listen) is final; once started, the forward rides out
// tunnel reconnects. ctx governs the first request only.
func (f *ReverseForward) Start(ctx context.Context, src TunnelSource) error {
	if f.Local == "" {
		return errors.New("hpcproxy: reverse forward: no Local target")
	}
	f.core.log = f.Logger
	remote := f.Remote
	if remote == "" {
		remote = "127.0.0.1:0"
	}
	network, addr, err := ListenAddr(remote)
	if err != nil {
		return err
	}
	f.network, f.want = network, addr
	t, err := src.WaitTunnel(ctx)
	if err != nil {
		return fmt.Errorf("hpcproxy: reverse forward: %w", err)
	}
	ln, err := t.Listen(ctx, network, addr)
	if err != nil {
		return fmt.Errorf("hpcproxy: reverse forward to %s: %w", f.Local, err)
	}
	if !f.bind(ln) {
		return errors.New("hpcproxy: reverse forward closed while starting")
	}
	runCtx, cancel := context.WithCancel(context.Background())
	f.cancel, f.done = cancel, make(chan struct{})
	go f.run(runCtx, src, ln)
	return nil
}

// bind records a new remote listener; a TCP port sshd chose becomes the
// port asked for on the next reconnect. After Close has begun it closes ln
// and reports false.
func (f *ReverseForward) bind(ln net.Listener) bool {
	a := ln.Addr()
	if ta, ok := a.(*net.TCPAddr); ok && f.network == "tcp" {
		host, _, _ := net.SplitHostPort(f.want)
		f.want = net.JoinHostPort(host, strconv.Itoa(ta.Port))
		a = &net.TCPAddr{IP: ta.IP, Port: ta.Port}
		if ta.IP.IsUnspecified() && host != "" {
			// A name such as "localhost": report what was asked for.
			a = hostPortAddr(f.want)
		}
	}
	f.smu.Lock()
	if f.stopped {
		f.smu.Unlock()
		closeListener(ln)
		return false
	}
	f.bound, f.ln, f.status = a, ln, ForwardUp
	f.smu.Unlock()
	f.core.logger().Info("reverse forward listening on the login node", "remote", a, "local", f.Local)
	if f.OnBind != nil {
		f.OnBind(a)
	}
	return true
}

// closeListener closes a remote listener. Cancelling it is a request to
// sshd, which on a silently dead link blocks until the tunnel gives up on
// it: give it a few seconds, then leave it to finish with the tunnel.
func closeListener(ln net.Listener) error {
	errc := make(chan error, 1)
	go func() { errc <- ln.Close() }()
	t := time.NewTimer(5 * time.Second)
	defer t.Stop()
	select {
	case err := <-errc:
		if errors.Is(err, net.ErrClosed) || errors.Is(err, io.EOF) {
			return nil
		}
		return err
	case <-t.C:
		return errors.New("hpcproxy: cancelling the remote listener timed out")
	}
}

// hostPortAddr is a net.Addr for a "host:port" that is not an IP address.
type hostPortAddr string

func (a hostPortAddr) Network() string { return "tcp" }
func (a hostPortAddr) String() string  { return string(a) }

// run serves ln until it fails, then waits for the next tunnel and asks for
// the listener again, until Close.
func (f *ReverseForward) run(ctx context.Context, src TunnelSource, ln net.Listener) {
	defer close(f.done)
	log := f.core.logger()
	for {
		f.serve(ln)
		f.smu.Lock()
		own := f.ln == ln
		if own {
			f.ln = nil
		}
		f.smu.Unlock()
		if own {
			_ = closeListener(ln)
		}
		if ctx.Err() != nil {
			return
		}
		f.setStatus(ForwardWaiting)
		log.Warn("reverse forward lost its remote listener; re-requesting", "remote", f.want)
		var err error
		ln, err = f.rebind(ctx, src)
		if err != nil {
			if ctx.Err() == nil {
				f.core.setErr(err)
				log.Error("reverse forward stopped", "err", err)
			}
			f.setStatus(ForwardClosed)
			return
		}
		if !f.bind(ln) {
			return
		}
	}
}

// rebind asks for the remote listener on the next live tunnel: first the
// address it had; if sshd keeps refusing that (the port taken, or a stale
// session still holding it), a TCP forward falls back to the address first
// asked for (port 0: any free port).
func (f *ReverseForward) rebind(ctx context.Context, src TunnelSource) (net.Listener, error) {
	backoff := 200 * time.Millisecond
	refused := 0
	for {
		t, err := src.WaitTunnel(ctx)
		if err != nil {
			return nil, err
		}
		addr := f.want
		if refused >= 5 && f.network == "tcp" {
			if _, orig, err := ListenAddr(cmpOr(f.Remote, "127.0.0.1:0")); err == nil {
				addr = orig
			}
		}
		lctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		ln, err := t.Listen(lctx, f.network, addr)
		cancel()
		if err == nil {
			if addr != f.want {
				f.core.logger().Warn("reverse forward: previous remote address unavailable; using a new one", "was", f.want)
			}
			return ln, nil
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		if errors.Is(err, ErrReverseUnsupported) {
			return nil, err
		}
		f.core.setErr(err)
		if errors.Is(err, ErrProhibited) {
			refused++
		}
		f.core.logger().Debug("reverse forward: re-request failed", "addr", addr, "err", err, "retry_in", backoff)
		if !sleepCtx(ctx, backoff) {
			return nil, ctx.Err()
		}
		backoff = min(backoff*2, 5*time.Second)
	}
}

func cmpOr(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

// serve accepts on ln until it fails (the tunnel dropped, or Close).
func (f *ReverseForward) serve(ln net.Listener) {
	network, target := "tcp", f.Local
	if isSocketPath(target) {
		network = "unix"
	}
	dial := f.DialLocal
	if dial == nil {
		var d net.Dialer
		dial = d.DialContext
	}
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		if !f.core.handle(c, target, func(ctx context.Context) (net.Conn, error) {
			return dial(ctx, network, target)
		}) {
			return
		}
	}
}

func (f *ReverseForward) setStatus(s string) {
	f.smu.Lock()
	f.status = s
	f.smu.Unlock()
}

// RemoteAddr returns the address the login node listens on (with the port
// sshd chose), or nil before Start.
func (f *ReverseForward) RemoteAddr() net.Addr {
	f.smu.Lock()
	defer f.smu.Unlock()
	return f.bound
}

// Info returns the forward's state and counters.
func (f *ReverseForward) Info() ForwardInfo {
	f.smu.Lock()
	listen, status := f.Remote, f.status
	if f.bound != nil {
		listen = f.bound.String()
	}
	f.smu.Unlock()
	if status == "" {
		status = ForwardClosed
	}
	return f.core.info(ForwardReverse, listen, f.Local, status)
}

// Close cancels the remote listener (if the tunnel is still up), closes
// the forwarded connections and waits for every goroutine of the forward.
// It is idempotent.
func (f *ReverseForward) Close() error {
	if f.cancel == nil {
		f.smu.Lock()
		f.stopped = true
		f.smu.Unlock()
		f.core.shut()
		return nil
	}
	f.cancel()
	f.smu.Lock()
	ln := f.ln
	f.ln, f.stopped = nil, true
	f.smu.Unlock()
	var err error
	if ln != nil {
		err = closeListener(ln)
	}
	<-f.done
	f.core.shut()
	f.setStatus(ForwardClosed)
	return err
}

// ForwardSpec is a local forward of a [Daemon]: Listen in the job (see
// [LocalForward.Listen]) to Remote on the login side.
type ForwardSpec struct {
	Listen string // PORT, HOST:PORT or a unix socket path
	Remote string // HOST:PORT as the login node resolves it
}

// String returns the spec as ParseForwardSpec reads it: "LISTEN=REMOTE".
func (s ForwardSpec) String() string { return s.Listen + "=" + s.Remote }

// ParseForwardSpec parses "LOCAL=REMOTE": LOCAL a port (on 127.0.0.1),
// HOST:PORT or a unix socket path; REMOTE a HOST:PORT resolved on the login
// node.
func ParseForwardSpec(s string) (ForwardSpec, error) {
	local, remote, ok := strings.Cut(s, "=")
	if !ok {
		return ForwardSpec{}, fmt.Errorf("hpcproxy: forward %q: want LOCAL=REMOTE, such as 5432=db.internal:5432", s)
	}
	if _, _, err := ListenAddr(local); err != nil {
		return ForwardSpec{}, fmt.Errorf("hpcproxy: forward %q: %w", s, err)
	}
	if _, port, err := net.SplitHostPort(remote); err != nil || port == "" || port == "0" {
		return ForwardSpec{}, fmt.Errorf("hpcproxy: forward %q: REMOTE must be HOST:PORT", s)
	}
	return ForwardSpec{Listen: local, Remote: remote}, nil
}

// Matches reports whether fi, a forward as a daemon reports it, is the
// local forward s asks for: the same target, listening where s says (on
// any port if s asks for port 0).
func (s ForwardSpec) Matches(fi ForwardInfo) bool {
	if fi.Kind != ForwardLocal || fi.Target != s.Remote {
		return false
	}
	network, addr, err := ListenAddr(s.Listen)
	if err != nil {
		return false
	}
	if network == "unix" {
		return fi.Listen == addr
	}
	return sameHostPort(addr, fi.Listen)
}

// sameHostPort reports whether bound, a listener's "host:port", is what
// want asks for, where port 0 in want stands for any port.
func sameHostPort(want, bound string) bool {
	wh, wp, err := net.SplitHostPort(want)
	if err != nil {
		return false
	}
	bh, bp, err := net.SplitHostPort(bound)
	if err != nil {
		return false
	}
	return wh == bh && (wp == "0" || wp == bp)
}

// ExposeSpec is a reverse forward of a [Daemon]: the login node listens
// on Remote and connections reach Local in the job.
type ExposeSpec struct {
	Local  string // HOST:PORT (or a unix socket path) of the service in the job
	Remote string // where the login node listens; "" is 127.0.0.1 with a port sshd chooses
}

// String returns the spec as ParseExposeSpec reads it.
func (s ExposeSpec) String() string {
	if s.Remote == "" {
		return s.Local
	}
	return s.Local + "=" + s.Remote
}

// Matches reports whether fi, a forward as a daemon reports it, is the
// reverse forward s asks for: the same service in the job, and, if s names
// one, the same address on the login node (any port if s asks for port 0).
func (s ExposeSpec) Matches(fi ForwardInfo) bool {
	if fi.Kind != ForwardReverse || fi.Target != s.Local {
		return false
	}
	switch {
	case s.Remote == "":
		return true
	case isSocketPath(s.Remote):
		return fi.Listen == s.Remote
	}
	return sameHostPort(s.Remote, fi.Listen)
}

// ParseExposeSpec parses "LOCAL[=REMOTE]": LOCAL a port (of 127.0.0.1),
// HOST:PORT or a unix socket path in the job; REMOTE optionally where the
// login node listens: a port (on its 127.0.0.1), HOST:PORT or a socket
// path. Without REMOTE, sshd picks a free port on its 127.0.0.1.
func ParseExposeSpec(s string) (ExposeSpec, error) {
	local, remote, _ := strings.Cut(s, "=")
	var spec ExposeSpec
	if _, addr, err := ListenAddr(local); err != nil {
		return spec, fmt.Errorf("hpcproxy: expose %q: %w", s, err)
	} else {
		spec.Local = addr
	}
	if remote != "" {
		if _, addr, err := ListenAddr(remote); err != nil {
			return spec, fmt.Errorf("hpcproxy: expose %q: %w", s, err)
		} else {
			spec.Remote = addr
		}
	}
	return spec, nil
}

// SSHForwardHint returns the command a user runs on their own machine to
// reach a reverse forward's remote address (as ForwardInfo.Listen records
// it) through the login node via: `ssh -L LOCALPORT:127.0.0.1:PORT HOST`,
// with -p and the user from via when it names them. It returns "" for an
// address it cannot use.
func SSHForwardHint(via, remote string, localPort int) string {
	target := remote
	if !isSocketPath(remote) {
		host, port, err := net.SplitHostPort(remote)
		if err != nil || port == "0" {
			return ""
		}
		if host == "" || host == "0.0.0.0" || host == "::" || host == "localhost" {
			host = "127.0.0.1"
		}
		target = net.JoinHostPort(host, port)
		if localPort <= 0 {
			localPort, _ = strconv.Atoi(port)
		}
	} else if localPort <= 0 {
		return ""
	}
	dest, sshPort := via, ""
	at := strings.LastIndex(dest, "@")
	if h, p, err := net.SplitHostPort(dest[at+1:]); err == nil {
		dest, sshPort = dest[:at+1]+h, p
	}
	cmd := fmt.Sprintf("ssh -N -L %d:%s", localPort, target)
	if sshPort != "" && sshPort != "22" {
		cmd += " -p " + sshPort
	}
	return cmd + " " + dest
}
