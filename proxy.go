package hpcproxy

import (
	"container/list"
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// DialFunc dials a network connection to addr. Compatible with
// net.Dialer.DialContext and http.Transport.DialContext.
//
// The proxy server calls it with network "tcp" and addr "host:port", where
// host is an IP literal or a name that the DialFunc resolves (on the far
// side of a tunnel). ctx governs the dial only, never the returned conn.
type DialFunc func(ctx context.Context, network, addr string) (net.Conn, error)

// Defaults for the [Server] timeouts and limits.
const (
	DefaultHandshakeTimeout = 10 * time.Second
	DefaultDialTimeout      = 30 * time.Second

	// DefaultMaxHandshakes is how many connections may be in their
	// handshake, not yet authenticated, at once (see
	// [Server.MaxHandshakes]). At the HTTP header limit of 64 KiB a
	// hostile handshake costs at most about 130 KiB: 128 of them, 17 MiB.
	DefaultMaxHandshakes = 128

	// DefaultKeepAliveTimeout is how long the daemons let an HTTP client
	// connection wait for its next request (see
	// [Server.KeepAliveTimeout]), as Squid's client_idle_pconn_timeout.
	DefaultKeepAliveTimeout = 2 * time.Minute
)

// ErrServerClosed is returned by [Server.Serve] after [Server.Close] or
// [Server.Shutdown].
var ErrServerClosed = errors.New("hpcproxy: server closed")

// errTooManyConns stands in for a dial when the server is at MaxConns; it
// is answered like a dial failure (SOCKS general failure, HTTP 503).
var errTooManyConns = errors.New("hpcproxy: too many connections")

// Server is a proxy server that speaks SOCKS5 (RFC 1928, with RFC 1929
// username/password), SOCKS4 and SOCKS4a, HTTP CONNECT and absolute-form
// HTTP forwarding, all on one listener: the first byte of a connection
// picks the protocol. Every outgoing connection is opened with Dial.
//
// The zero value is a usable server that dials directly. Set the fields
// before calling Serve and do not change them afterwards. A Server must not
// be copied after first use.
type Server struct {
	// Dial optionally specifies how to reach destinations. It is called
	// with network "tcp" and "host:port"; domain names are passed
	// unresolved. If nil, a [net.Dialer]'s DialContext is used.
	Dial DialFunc

	// Credentials optionally maps user names to passwords that clients must
	// present: RFC 1929 for SOCKS5, Basic Proxy-Authorization for HTTP.
	// SOCKS4 has no password, so a SOCKS4 request is accepted when its user
	// ID field is one of the passwords (a token) or "user:password". If
	// empty, no authentication is required. Comparisons take constant time.
	Credentials map[string]string

	// TrustConn optionally lets a connection in without credentials: when
	// it returns true for an accepted conn, Credentials are not required of
	// it (the daemon trusts same-user loopback peers this way). If nil,
	// every connection must authenticate when Credentials is set.
	TrustConn func(net.Conn) bool

	// AllowClient optionally restricts who may connect: a connection whose
	// remote address it returns false for is closed at once and logged at
	// Warn. The address is nil for an unnamed unix-socket peer. If nil,
	// every client is allowed.
	AllowClient func(net.Addr) bool

	// Logger optionally receives per-connection diagnostics (failed
	// handshakes and dials at Debug, refusals and a down tunnel at Warn).
	// If nil, nothing is logged.
	Logger *slog.Logger

	// HandshakeTimeout optionally bounds protocol sniffing plus the proxy
	// handshake, as a deadline on the client socket that is cleared once
	// the request is read. If zero, DefaultHandshakeTimeout is used.
	HandshakeTimeout time.Duration

	// DialTimeout optionally bounds each call to Dial. If zero,
	// DefaultDialTimeout is used.
	DialTimeout time.Duration

	// IdleTimeout optionally closes a relayed connection after this long
	// with no bytes in either direction, and a keep-alive HTTP connection
	// that waits this long for its next request. If zero (the default),
	// connections may idle forever: long-lived quiet streams are normal.
	// A nonzero IdleTimeout makes relays copy in user space (the server must
	// see bytes to know the conn is not idle), giving up Linux splice.
	IdleTimeout time.Duration

	// KeepAliveTimeout optionally closes a keep-alive HTTP client
	// connection that waits this long for its next request (relays are
	// not affected; see IdleTimeout, which takes precedence when it is
	// shorter). If zero, such a connection may wait forever; the daemons
	// set DefaultKeepAliveTimeout.
	KeepAliveTimeout time.Duration

	// MaxHandshakes optionally bounds how many connections may be in
	// their handshake at once before they have authenticated, as
	// OpenSSH's MaxStartups does, but a new connection beyond it closes
	// the oldest unfinished handshake instead of being refused (logged at
	// Warn, at most once a second), so that a client that authenticates
	// promptly gets through a flood of slow ones. Connections TrustConn
	// admits do not count and are never dropped. After a burst of handshakes subsides, the server
	// returns the memory it freed to the operating system
	// ([runtime/debug.FreeOSMemory], at most every 10 seconds). If zero,
	// DefaultMaxHandshakes is used; negative means no limit.
	MaxHandshakes int

	// MaxConns optionally limits how many connections are served at once.
	// A connection beyond the limit is still accepted and its request read
	// (under HandshakeTimeout), then refused the way its protocol expects:
	// SOCKS5 reply 0x01, SOCKS4 0x5B, HTTP 503. If zero, there is no limit.
	MaxConns int

	// handoff optionally lets the tunnel read a client's bytes from its
	// socket itself after the handshake, as handoffMode says (handoff.go);
	// the daemon sets them.
	handoff     handoffDialer
	handoffMode HandoffMode

	mu        sync.Mutex
	listeners map[net.Listener]struct{}
	conns     map[net.Conn]*atomic.Bool // client and destination conns; true: idle between HTTP requests
	closed    bool
	ctx       context.Context // cancelled by Close: aborts dials in flight
	cancel    context.CancelFunc

	handlers atomic.Int64 // connection goroutines running

	hsMu       sync.Mutex
	pending    list.List     // of pendingHandshake: unauthenticated handshakes, oldest first; under hsMu
	accepted   atomic.Uint64 // connections accepted: each one's sequence number
	handshakes atomic.Int64  // pending.Len(), to read without hsMu
	hsPeak     atomic.Int64  // the most at once since the last release
	lastDrop   atomic.Int64  // unix nanoseconds of the last drop warning
	release    *time.Timer   // pending memory release after a burst; under mu
	dropped    atomic.Int64
	active     atomic.Int64
	total      atomic.Int64
	bytesIn    atomic.Int64
	bytesOut   atomic.Int64
	failed     atomic.Int64
}

// ServerStats is a snapshot of a [Server]'s counters.
type ServerStats struct {
	Active           int64 // connections being served now
	Total            int64 // connections accepted since the server started
	BytesIn          int64 // bytes relayed from clients to destinations, except those a controlmaster read from a handed-off client itself
	BytesOut         int64 // bytes relayed from destinations to clients
	FailedHandshakes int64 // connections that ended before a relay started
	// DroppedHandshakes counts unfinished handshakes closed to make room
	// for a new one beyond MaxHandshakes (also counted in
	// FailedHandshakes).
	DroppedHandshakes int64
}

// Stats returns the server's counters. Byte counts of a spliced relay
// (TCP on both sides, no IdleTimeout) are added when the relay ends.
func (s *Server) Stats() ServerStats {
	return ServerStats{
		Active:           s.active.Load(),
		Total:            s.total.Load(),
		BytesIn:          s.bytesIn.Load(),
		BytesOut:         s.bytesOut.Load(),
		FailedHandshakes: s.failed.Load(),

		DroppedHandshakes: s.dropped.Load(),
	}
}

// RunProxy listens on listenAddr (TCP) and serves SOCKS5, SOCKS4/4a, HTTP
// CONNECT and plain HTTP proxying on that one port, forwarding every
// connection through dial (nil dials directly). Cancelling ctx stops
// accepting and closes live connections; RunProxy returns nil once every
// connection has ended, or the error that stopped it earlier.
//
// RunProxy is a thin wrapper around [Server]; use a Server for credentials,
// timeouts, limits and logging, or to bring your own listener.
func RunProxy(ctx context.Context, listenAddr string, dial DialFunc) error {
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", listenAddr)
	if err != nil {
		return fmt.Errorf("hpcproxy: listen: %w", err)
	}
	srv := &Server{Dial: dial}
	stop := context.AfterFunc(ctx, func() { _ = srv.Close() })
	defer stop()
	err = srv.Serve(ln)
	if errors.Is(err, ErrServerClosed) && ctx.Err() != nil {
		return nil
	}
	_ = srv.Close()
	return err
}

// Serve accepts connections on ln and serves each in its own goroutine. It
// returns once ln has failed or been closed (by Close or Shutdown) and
// every connection it accepted has ended; after Close or Shutdown the error
// is ErrServerClosed. If ln fails by itself (Accept returns an error other
// than a passing shortage of file descriptors or memory), Serve closes the
// whole server as Close does and returns that error. Serve takes ownership of ln. It may be called for
// several listeners (TCP, unix socket) at once.
func (s *Server) Serve(ln net.Listener) error {
	if !s.trackListener(ln, true) {
		ln.Close()
		return ErrServerClosed
	}
	defer s.trackListener(ln, false)
	var wg sync.WaitGroup
	defer wg.Wait()
	// Handshakes run in kept goroutines: the SOCKS parse, the peer-UID
	// lookup and a tunnel's dial need about 8 KiB of stack, which a new
	// goroutine (2 KiB) would grow again for each connection. The relay
	// still starts goroutines of its own, so that idle held connections
	// keep small stacks.
	workers := newKeptGoroutines()
	defer workers.close()
	defer ln.Close()

	for {
		c, err := acceptRetrying(ln, s.logger())
		if err != nil {
			if s.isClosed() {
				return ErrServerClosed
			}
			// Nothing will close the live conns otherwise, and Serve
			// waits for them.
			_ = s.Close()
			return fmt.Errorf("hpcproxy: accept: %w", err)
		}
		idle, ok := s.trackConn(c)
		if !ok {
			c.Close()
			continue
		}
		s.handlers.Add(1)
		wg.Add(1)
		seq := s.accepted.Add(1)
		task := func() {
			s.serveConn(c, seq, idle, func() {
				c.Close()
				s.untrackConn(c)
				s.handlers.Add(-1)
				wg.Done()
			})
		}
		workers.goRun(task)
	}
}

// acceptRetrying accepts a connection on ln. It waits out a passing
// shortage (retryableAccept: out of descriptors, say, while many
// connections are held) and tries again, logging each, after a pause that
// doubles from 5 ms to a second; any other error (a closed listener) it
// returns. Every accept loop of the package uses it (the proxy's, the
// forwards', the control socket's, the node tunnel's attach socket): one
// that ended at the first EMFILE left its port open and never answered
// again.
func acceptRetrying(ln net.Listener, log *slog.Logger) (net.Conn, error) {
	var backoff time.Duration
	for {
		c, err := ln.Accept()
		if err == nil || errors.Is(err, net.ErrClosed) || !retryableAccept(err) {
			return c, err
		}
		backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
		log.Warn("accept failed; retrying", "addr", ln.Addr(), "err", err, "in", backoff)
		time.Sleep(backoff)
	}
}

// retryableAccept reports whether an Accept error is a passing shortage
// (file descriptors, memory) or one connection's failure (an aborted
// handshake; the network errors that Linux passes on from a pending
// connection, which accept(2) says to treat like EAGAIN; EPERM from a
// firewall rule), worth retrying.
func retryableAccept(err error) bool {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return true
	}
	for _, e := range []error{
		syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ENOMEM, syscall.ECONNABORTED, syscall.EINTR,
		syscall.ENETDOWN, syscall.EPROTO, syscall.ENOPROTOOPT, syscall.EHOSTDOWN, syscall.ENONET,
		syscall.EHOSTUNREACH, syscall.EOPNOTSUPP, syscall.ENETUNREACH, syscall.EPERM,
	} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// Close stops every Serve loop and closes all live connections at once,
// aborting dials in flight. It does not wait for the connection goroutines;
// Serve does. Close is idempotent.
func (s *Server) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.initLocked()
	s.closed = true
	s.cancel()
	if s.release != nil {
		s.release.Stop()
	}
	for ln := range s.listeners {
		ln.Close()
	}
	for c := range s.conns {
		c.Close()
	}
	return nil
}

// Shutdown stops accepting, closes HTTP connections that are idle between
// requests, and waits for the other connections (relays, requests in
// progress) to end by themselves. If ctx ends first, Shutdown closes them
// as Close does and returns ctx's error.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.initLocked()
	s.closed = true
	for ln := range s.listeners {
		ln.Close()
	}
	s.mu.Unlock()

	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for s.handlers.Load() > 0 {
		s.closeIdle()
		select {
		case <-ctx.Done():
			_ = s.Close()
			return ctx.Err()
		case <-tick.C:
		}
	}
	_ = s.Close()
	return nil
}

func (s *Server) initLocked() {
	if s.listeners == nil {
		s.listeners = make(map[net.Listener]struct{})
		s.conns = make(map[net.Conn]*atomic.Bool)
		s.ctx, s.cancel = context.WithCancel(context.Background())
	}
}

func (s *Server) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

func (s *Server) baseContext() context.Context {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.initLocked()
	return s.ctx
}

func (s *Server) trackListener(ln net.Listener, add bool) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.initLocked()
	if !add {
		delete(s.listeners, ln)
		return true
	}
	if s.closed {
		return false
	}
	s.listeners[ln] = struct{}{}
	return true
}

// trackConn registers c (a client or a destination conn) so that Close can
// close it, and returns its idle flag, which Shutdown reads. It refuses,
// returning false, once the server is closed.
func (s *Server) trackConn(c net.Conn) (*atomic.Bool, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.initLocked()
	if s.closed {
		return nil, false
	}
	idle := new(atomic.Bool)
	s.conns[c] = idle
	return idle, true
}

func (s *Server) untrackConn(c net.Conn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.conns, c)
}

// closeIdle closes the client conns that wait between HTTP requests.
func (s *Server) closeIdle() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for c, idle := range s.conns {
		if idle.Load() {
			c.Close()
		}
	}
}

func (s *Server) logger() *slog.Logger {
	if s.Logger != nil {
		return s.Logger
	}
	return discardLogger
}

func (s *Server) handshakeTimeout() time.Duration {
	if s.HandshakeTimeout > 0 {
		return s.HandshakeTimeout
	}
	return DefaultHandshakeTimeout
}

// keepAliveTimeout is how long a keep-alive HTTP connection may wait for
// its next request: the shorter of KeepAliveTimeout and IdleTimeout that
// are set; zero if neither is.
func (s *Server) keepAliveTimeout() time.Duration {
	switch d, i := s.KeepAliveTimeout, s.IdleTimeout; {
	case d <= 0:
		return max(i, 0)
	case i <= 0:
		return d
	default:
		return min(d, i)
	}
}

func (s *Server) dialTimeout() time.Duration {
	if s.DialTimeout > 0 {
		return s.DialTimeout
	}
	return DefaultDialTimeout
}

// serveConn serves one accepted connection and calls release once it is
// over: when serveConn returns, or, if a relay started, when the relay
// ends. The relay runs in goroutines of its own, not in this one: the
// handshake and the dial may have grown this goroutine's stack, which it
// would otherwise hold for the life of a connection that is usually idle
// (see startRelay).
func (s *Server) serveConn(raw net.Conn, seq uint64, idle *atomic.Bool, release func()) {
	s.total.Add(1)
	log := discardLogger
	if s.Logger != nil {
		log = slog.New(clientHandler{s.Logger.Handler(), raw.RemoteAddr()})
	}
	ss := &session{srv: s, log: log, idle: idle, finish: release}
	defer func() {
		if !ss.detached {
			ss.finish()
		}
	}()
	if s.AllowClient != nil && !s.AllowClient(raw.RemoteAddr()) {
		log.Warn("client not allowed; closing")
		s.failed.Add(1)
		return
	}
	if n := s.active.Add(1); s.MaxConns > 0 && n > int64(s.MaxConns) {
		s.active.Add(-1)
		ss.refuse = true
	} else {
		ss.finish = func() {
			s.active.Add(-1)
			release()
		}
	}
	ss.trusted = len(s.Credentials) == 0 || (s.TrustConn != nil && s.TrustConn(raw))
	if !ss.trusted {
		ss.slot = s.admitHandshake(raw, seq)
		defer ss.authenticated()
	}
	ss.c = newClientConn(raw)
	if err := raw.SetDeadline(time.Now().Add(s.handshakeTimeout())); err != nil {
		log.Debug("set handshake deadline", "err", err)
		s.failed.Add(1)
		return
	}
	proto, err := ss.c.sniff()
	if err != nil {
		log.Debug("no request", "err", err)
		s.failed.Add(1)
		return
	}
	if proto != protoHTTP {
		ss.c.limitSOCKS()
	}
	switch proto {
	case protoSOCKS5:
		err = ss.serveSOCKS5()
	case protoSOCKS4:
		err = ss.serveSOCKS4()
	default:
		err = ss.serveHTTP()
	}
	if err != nil {
		log.Debug("connection ended", "proto", proto, "err", err)
	}
}

// clientHandler adds a connection's client address to the records it
// handles. Logger.With would format it for every connection, although
// most connections log nothing (measured: 2-4% of the daemon's CPU time
// per connection in the latency benchmark, in slog's attribute cloning).
type clientHandler struct {
	slog.Handler
	addr net.Addr
}

func (h clientHandler) Handle(ctx context.Context, r slog.Record) error {
	r.AddAttrs(slog.String("client", addrString(h.addr)))
	return h.Handler.Handle(ctx, r)
}

func (h clientHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return clientHandler{h.Handler.WithAttrs(as), h.addr}
}

func (h clientHandler) WithGroup(name string) slog.Handler {
	return clientHandler{h.Handler.WithGroup(name), h.addr}
}

// addrString is a.String(), or "" for a nil address (an unnamed unix
// socket peer).
func addrString(a net.Addr) string {
	if a == nil {
		return ""
	}
	return a.String()
}

// checkPassword reports, in constant time for the password, whether
// user/pass is one of the server's credentials.
func (s *Server) checkPassword(user, pass string) bool {
	want, ok := s.Credentials[user]
	if !ok {
		// Compare anyway so that unknown users take as long as known ones.
		want = "\x00unknown user"
	}
	return subtle.ConstantTimeCompare([]byte(want), []byte(pass)) == 1 && ok
}

// checkToken reports whether tok is one of the passwords, or
// "user:password", comparing against every credential in constant time.
func (s *Server) checkToken(tok string) bool {
	match := 0
	for user, pass := range s.Credentials {
		match |= subtle.ConstantTimeCompare([]byte(pass), []byte(tok))
		match |= subtle.ConstantTimeCompare([]byte(user+":"+pass), []byte(tok))
	}
	return match == 1
}

// Pre-authentication cost (MaxHandshakes)

// burstHandshakes is how many handshakes at once make a burst after which
// the freed memory is returned to the operating system.
const burstHandshakes = 32

// releaseEvery spaces memory releases apart.
const releaseEvery = 10 * time.Second

func (s *Server) maxHandshakes() int {
	if s.MaxHandshakes == 0 {
		return DefaultMaxHandshakes
	}
	return s.MaxHandshakes
}

// admitHandshake gives a connection that must authenticate a handshake
// slot. When all MaxHandshakes slots are taken, the oldest handshake still
// in progress is closed to make room: a client that authenticates promptly
// (the owner's, from another node, with the token) always gets its turn,
// while one that lingers (slowloris) or sends a huge header is the first
// to go. sshd's MaxStartups refuses the new connection instead, which lets
// a flood of unfinished handshakes shut everyone else out.
//
// Oldest means first accepted (seq, from Serve's accept loop), not first
// to get here: the goroutines of a burst of connections do not start in
// the order they were accepted (Go runs the newest first).
func (s *Server) admitHandshake(raw net.Conn, seq uint64) *list.Element {
	full := s.maxHandshakes()
	s.hsMu.Lock()
	at := s.pending.Back()
	for at != nil && at.Value.(pendingHandshake).seq > seq {
		at = at.Prev()
	}
	var e *list.Element
	if at == nil {
		e = s.pending.PushFront(pendingHandshake{raw, seq})
	} else {
		e = s.pending.InsertAfter(pendingHandshake{raw, seq}, at)
	}
	var evict net.Conn
	if full >= 0 && s.pending.Len() > full {
		evict = s.pending.Remove(s.pending.Front()).(pendingHandshake).conn
	}
	n := int64(s.pending.Len())
	s.handshakes.Store(n)
	s.hsMu.Unlock()
	for {
		p := s.hsPeak.Load()
		if n <= p || s.hsPeak.CompareAndSwap(p, n) {
			break
		}
	}
	if evict != nil {
		// Its session sees the read fail and ends (counted as failed).
		evict.Close()
		s.dropped.Add(1)
		s.warnDrop()
	}
	return e
}

// pendingHandshake is an unauthenticated connection in Server.pending.
type pendingHandshake struct {
	conn net.Conn
	seq  uint64 // in accept order
}

// endHandshake gives a slot back (a no-op if it was taken by eviction);
// once a burst has subsided, it has the freed memory returned to the
// operating system.
func (s *Server) endHandshake(e *list.Element) {
	s.hsMu.Lock()
	s.pending.Remove(e)
	n := int64(s.pending.Len())
	s.handshakes.Store(n)
	s.hsMu.Unlock()
	if n > burstHandshakes/4 || s.hsPeak.Load() < burstHandshakes {
		return
	}
	s.hsPeak.Store(n)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed || s.release != nil {
		return
	}
	// Not at once: the goroutines of the burst are still ending and
	// their buffers become garbage only then.
	s.release = time.AfterFunc(time.Second, func() {
		debug.FreeOSMemory()
		s.mu.Lock()
		defer s.mu.Unlock()
		if !s.closed {
			s.release = time.AfterFunc(releaseEvery, func() {
				s.mu.Lock()
				defer s.mu.Unlock()
				s.release = nil
			})
		}
	})
}

// warnDrop logs a dropped handshake, at most once a second.
func (s *Server) warnDrop() {
	now := time.Now().UnixNano()
	last := s.lastDrop.Load()
	if now-last < int64(time.Second) || !s.lastDrop.CompareAndSwap(last, now) {
		return
	}
	s.logger().Warn("too many unauthenticated handshakes at once; closing the oldest",
		"in_progress", s.handshakes.Load(), "max", s.maxHandshakes(), "dropped", s.dropped.Load())
}
