package hpcproxy

// LocalForward: a listener in the job, connections to the login side
// (`ssh -L`).

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

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
	// dialled, such as a same-user check on a shared compute node. If nil,
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
// returns nil) or until Accept fails for good: a passing shortage of file
// descriptors or memory is waited out, as Server.Serve does.
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
		c, err := acceptRetrying(ln, f.core.logger())
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
