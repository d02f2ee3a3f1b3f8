package hpcproxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Connections the daemon opens itself
//
// A per-job daemon trusts loopback connections from its owner's UID
// (SO_PEERCRED; for loopback TCP, the socket's owner). A reverse forward breaks that rule's premise: the
// daemon itself connects to the exposed local service, so the connection
// comes from the owner's UID while its bytes come from whoever reached
// the login node's port. Were the exposed service the proxy itself (or
// its control socket, a local forward, or the tunnel's own ssh sockets),
// every user of the login node could relay through the owner's tunnel
// without the token. So the daemon refuses to expose what it serves
// (checkExposeTarget), and, should a connection of its own reach one of
// its servers all the same, never takes it for the owner's: selfDialer
// binds and records the source address of every loopback TCP or unix
// socket connection it opens before connecting (for unix sockets an
// autobound abstract name, which the accepting side sees as the peer's
// address).

// selfDialer dials the local targets of reverse forwards and remembers
// the source address of each loopback TCP or unix connection it opens.
type selfDialer struct {
	mu      sync.Mutex
	conns   map[string]selfConn // by source address
	pruneAt int
}

// selfConn is a connection selfDialer opened, or is opening (conn nil).
type selfConn struct {
	conn  net.Conn
	added time.Time
}

// selfPruneMin is how many remembered conns trigger the first sweep of
// those that have closed.
const selfPruneMin = 256

// selfConnectingMax is how long a connection may stay "connecting" in the
// record before a sweep forgets it (a dial outlives forwardDialTimeout
// only if something is badly wrong).
const selfConnectingMax = 2 * forwardDialTimeout

// DialContext dials like a net.Dialer; to a loopback TCP address it binds
// the source address first and records it before connecting, so that no
// server of this process can accept the conn before it is known.
func (s *selfDialer) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	// A dial may try several addresses, at once (RFC 8305): each attempt
	// records its source; the one that connects is kept.
	var mu sync.Mutex
	var srcs []string
	d := net.Dialer{ControlContext: func(_ context.Context, network, address string, rc syscall.RawConn) error {
		var src string
		var serr error
		switch network {
		case "unix":
			if err := rc.Control(func(fd uintptr) { src, serr = bindAbstractSource(int(fd)) }); err != nil {
				return err
			}
		case "tcp4", "tcp6":
			dst, err := netip.ParseAddrPort(address)
			if err != nil || !dst.Addr().Unmap().IsLoopback() {
				return nil
			}
			if err := rc.Control(func(fd uintptr) { src, serr = bindLoopbackSource(int(fd), dst.Addr().Unmap()) }); err != nil {
				return err
			}
		default:
			return nil
		}
		if serr != nil {
			return fmt.Errorf("hpcproxy: bind source address: %w", serr)
		}
		s.add(src, nil)
		mu.Lock()
		srcs = append(srcs, src)
		mu.Unlock()
		return nil
	}}
	c, err := d.DialContext(ctx, network, addr)
	mine := ""
	if err == nil {
		mine = addrKey(c.LocalAddr())
	}
	mu.Lock()
	defer mu.Unlock()
	for _, src := range srcs {
		if src == mine {
			s.add(src, c)
		} else {
			s.forget(src)
		}
	}
	return c, err
}

// addrKey is how selfDialer records a source address: a unix socket's
// name, or a TCP address with IPv4 unmapped; "" for anything else.
func addrKey(a net.Addr) string {
	switch a := a.(type) {
	case *net.UnixAddr:
		if a != nil {
			return a.Name
		}
	case *net.TCPAddr:
		if a != nil {
			ap := a.AddrPort()
			return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()).String()
		}
	}
	return ""
}

// bindAbstractSource autobinds unix socket fd to an abstract name (Linux,
// unix(7)) and returns that name as the peer's net.UnixAddr shows it.
func bindAbstractSource(fd int) (string, error) {
	if err := syscall.Bind(fd, &syscall.SockaddrUnix{}); err != nil {
		return "", err
	}
	got, err := syscall.Getsockname(fd)
	if err != nil {
		return "", err
	}
	a, ok := got.(*syscall.SockaddrUnix)
	if !ok || a.Name == "" {
		return "", errors.New("no autobound name")
	}
	return a.Name, nil
}

// bindLoopbackSource binds socket fd to an ephemeral port on the loopback
// address of dst's family and returns the address it got.
func bindLoopbackSource(fd int, dst netip.Addr) (string, error) {
	ap, err := bindLoopback(fd, dst)
	return ap.String(), err
}

func bindLoopback(fd int, dst netip.Addr) (netip.AddrPort, error) {
	var sa syscall.Sockaddr = &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}
	if dst.Is6() {
		sa = &syscall.SockaddrInet6{Addr: netip.IPv6Loopback().As16()}
	}
	if err := syscall.Bind(fd, sa); err != nil {
		return netip.AddrPort{}, err
	}
	got, err := syscall.Getsockname(fd)
	if err != nil {
		return netip.AddrPort{}, err
	}
	switch a := got.(type) {
	case *syscall.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(a.Addr), uint16(a.Port)), nil
	case *syscall.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(a.Addr), uint16(a.Port)), nil
	}
	return netip.AddrPort{}, errors.New("unexpected socket address family")
}

func (s *selfDialer) add(src string, c net.Conn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.conns == nil {
		s.conns = make(map[string]selfConn)
	}
	now := time.Now()
	if c == nil && len(s.conns) >= max(s.pruneAt, selfPruneMin) {
		for a, sc := range s.conns {
			if sc.conn != nil && connClosed(sc.conn) || sc.conn == nil && now.Sub(sc.added) > selfConnectingMax {
				delete(s.conns, a)
			}
		}
		s.pruneAt = 2 * len(s.conns)
	}
	s.conns[src] = selfConn{conn: c, added: now}
}

func (s *selfDialer) forget(src string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.conns, src)
}

// opened reports whether c arrives from a connection this dialer opened
// (and that is still open, or still connecting).
func (s *selfDialer) opened(c net.Conn) bool {
	peer := addrKey(c.RemoteAddr())
	if peer == "" {
		return false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	sc, ok := s.conns[peer]
	if ok && sc.conn != nil && connClosed(sc.conn) {
		delete(s.conns, peer)
		return false
	}
	return ok
}

// connClosed reports whether c has been closed.
func connClosed(c net.Conn) bool {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return false
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return true
	}
	return rc.Control(func(uintptr) {}) != nil
}

// ownerConn is the daemon's test for "this connection is its owner's": a
// peer of the owner's UID (SO_PEERCRED; for loopback TCP, the socket's owner) that is not a connection the
// daemon opened itself.
func (r *running) ownerConn(c net.Conn) bool {
	if r.self.opened(c) {
		return false
	}
	return sameUserConn(c)
}

// errExposeSelf is wrapped by the error for an expose of the daemon's own
// listener.
var errExposeSelf = errors.New("hpcproxy: refusing to expose the daemon's own listener: every user of the login node could use it as the owner")

// checkExposeTarget refuses a reverse forward to anything the daemon
// serves: the proxy port, a local forward, the control socket, the
// tunnel's sockets in the runtime directory.
func (r *running) checkExposeTarget(ctx context.Context, local string) error {
	if isSocketPath(local) {
		target := canonicalPath(local)
		var own []string
		if r.runDir != "" {
			rel, err := filepath.Rel(canonicalPath(r.runDir), target)
			if err == nil && rel != ".." && !strings.HasPrefix(rel, ".."+string(filepath.Separator)) {
				return fmt.Errorf("%w (%s is in its runtime directory)", errExposeSelf, local)
			}
		}
		if r.claim != nil {
			own = append(own, ControlSocketPath(r.claim.Path()))
		}
		r.fmu.Lock()
		for _, f := range r.locals {
			if a := f.Addr(); a != nil && a.Network() == "unix" {
				own = append(own, a.String())
			}
		}
		r.fmu.Unlock()
		for _, p := range own {
			if canonicalPath(p) == target {
				return fmt.Errorf("%w (%s)", errExposeSelf, local)
			}
		}
		return nil
	}
	host, portStr, err := net.SplitHostPort(local)
	if err != nil {
		return fmt.Errorf("hpcproxy: expose %q: %w", local, err)
	}
	port, _ := strconv.Atoi(portStr)
	own := map[int]string{}
	if r.ln != nil {
		own[r.ln.Addr().(*net.TCPAddr).Port] = "the proxy port"
	}
	r.fmu.Lock()
	for _, f := range r.locals {
		if ta, ok := f.Addr().(*net.TCPAddr); ok {
			own[ta.Port] = "a local forward"
		}
	}
	r.fmu.Unlock()
	what, ok := own[port]
	if !ok {
		return nil
	}
	if local, err := isLocalHost(ctx, host); err != nil || local {
		return fmt.Errorf("%w (%s is %s)", errExposeSelf, net.JoinHostPort(host, portStr), what)
	}
	return nil
}

// isLocalHost reports whether host names an address of this machine.
func isLocalHost(ctx context.Context, host string) (bool, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	ips, err := net.DefaultResolver.LookupNetIP(ctx, "ip", host)
	if err != nil {
		return false, err
	}
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return false, err
	}
	for _, ip := range ips {
		ip = ip.Unmap()
		if ip.IsLoopback() || ip.IsUnspecified() {
			return true, nil
		}
		for _, a := range addrs {
			if p, ok := a.(*net.IPNet); ok && p.IP.Equal(ip.AsSlice()) {
				return true, nil
			}
		}
	}
	return false, nil
}

// canonicalPath is path made absolute with the symbolic links of its
// directory resolved (the socket itself may not exist yet).
func canonicalPath(path string) string {
	abs, err := filepath.Abs(path)
	if err != nil {
		return filepath.Clean(path)
	}
	if dir, err := filepath.EvalSymlinks(filepath.Dir(abs)); err == nil {
		return filepath.Join(dir, filepath.Base(abs))
	}
	return abs
}
