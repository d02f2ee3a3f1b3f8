package hpcproxy

import (
	"context"
	"log/slog"
	"math"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Port forwarding: LocalForward carries connections made in the job to a
// service on the login side (`ssh -L`); ReverseForward has the login node's
// sshd listen and carries its connections back to a service in the job
// (`ssh -R`). Both relay with the package's one relay function and count
// bytes like the proxy server. This file holds what they share; each has a
// file of its own (forward_local.go, forward_reverse.go), and the command
// line's forward specifications are in forward_spec.go.

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
