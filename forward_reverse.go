package hpcproxy

// ReverseForward: a listener on the login node, connections back to the
// job (`ssh -R`).

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strconv"
	"sync"
	"time"
)

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
		c, err := acceptRetrying(ln, f.core.logger())
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
