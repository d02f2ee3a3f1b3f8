package hpcproxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
)

// A pool of SSH connections
//
// One SSH connection is one sshd process on the login node, and one
// stream of packets that a single core encrypts and decrypts at each end.
// With TunnelConfig.Connections > 1 a tunnel opens several connections by
// the same method and gives each new channel to the connection that carries
// the fewest, so that parallel downloads use several of the login node's
// cores (and of ours). The pool is one tunnel: if any of its connections
// drops, the whole tunnel is down and a supervisor re-establishes all of
// them, as it would a single connection.

// poolable reports whether a method multiplexes channels over one SSH
// connection, so that several connections can share the load.
func poolable(m Method) bool { return m == MethodGoSSH || m == MethodControlMaster }

// startPool starts n tunnels of method m at once with start and pools
// them. If any fails, the others are closed and its error is returned.
func startPool(ctx context.Context, cfg *TunnelConfig, m Method, n int,
	start func(context.Context, *TunnelConfig, Method) (tunnelImpl, error)) (tunnelImpl, error) {
	impls := make([]tunnelImpl, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			impls[i], errs[i] = start(ctx, cfg, m)
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		for _, t := range impls {
			if t != nil {
				_ = t.Close()
			}
		}
		// The connections fail alike (same config, same server): one
		// reason is enough, with how many failed.
		failed := 0
		var first error
		for _, e := range errs {
			if e != nil {
				failed++
				if first == nil {
					first = e
				}
			}
		}
		if failed > 1 {
			return nil, fmt.Errorf("%d of %d pooled connections failed: %w", failed, n, first)
		}
		return nil, fmt.Errorf("1 of %d pooled connections failed: %w", n, first)
	}
	p := &poolTunnel{done: make(chan struct{}), stop: make(chan struct{})}
	for _, t := range impls {
		p.members = append(p.members, &poolMember{impl: t})
	}
	go p.watch()
	return p, nil
}

// poolTunnel spreads channels over several tunnels of one method.
type poolTunnel struct {
	members []*poolMember
	next    atomic.Uint32 // where the search for the least loaded starts

	stopOnce sync.Once
	stop     chan struct{} // closed by Close
	done     chan struct{} // closed when every member is closed
	mu       sync.Mutex
	err      error
}

type poolMember struct {
	impl   tunnelImpl
	active atomic.Int64 // connections dialled through it and not yet closed
}

var _ remoteListener = (*poolTunnel)(nil)

// watch waits for Close or for any member to go down, then closes every
// member and fires Done with the first member's reason.
func (p *poolTunnel) watch() {
	down := make(chan tunnelImpl, len(p.members))
	for _, m := range p.members {
		go func() {
			select {
			case <-m.impl.Done():
				down <- m.impl
			case <-p.stop:
			}
		}()
	}
	select {
	case t := <-down:
		err := t.Err()
		if err == nil {
			err = errors.New("a pooled connection closed")
		}
		p.mu.Lock()
		p.err = err
		p.mu.Unlock()
	case <-p.stop:
	}
	p.stopOnce.Do(func() { close(p.stop) })
	for _, m := range p.members {
		_ = m.impl.Close()
	}
	close(p.done)
}

// pick returns the member with the fewest active connections, the search
// starting at a rotating index so that ties are spread.
func (p *poolTunnel) pick() *poolMember {
	n := len(p.members)
	start := int(p.next.Add(1)) % n
	best := p.members[start]
	for i := 1; i < n; i++ {
		m := p.members[(start+i)%n]
		if m.active.Load() < best.active.Load() {
			best = m
		}
	}
	return best
}

func (p *poolTunnel) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	m := p.pick()
	m.active.Add(1)
	c, err := m.impl.DialContext(ctx, network, addr)
	if err != nil {
		m.active.Add(-1)
		return nil, err
	}
	return &pooledConn{Conn: c, member: m}, nil
}

func (p *poolTunnel) Close() error {
	p.stopOnce.Do(func() { close(p.stop) })
	<-p.done
	return nil
}

func (p *poolTunnel) Done() <-chan struct{} { return p.done }

func (p *poolTunnel) Err() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.err
}

// listenRemote asks the first connection's sshd to listen: a remote
// listener lives on one connection.
func (p *poolTunnel) listenRemote(ctx context.Context, network, addr string) (net.Listener, error) {
	rl, ok := p.members[0].impl.(remoteListener)
	if !ok {
		return nil, ErrReverseUnsupported
	}
	return rl.listenRemote(ctx, network, addr)
}

// pooledConn is a connection dialled through a pool member; closing it
// tells the member it carries one connection less.
type pooledConn struct {
	net.Conn
	member *poolMember
	once   sync.Once
}

func (c *pooledConn) Close() error {
	c.once.Do(func() { c.member.active.Add(-1) })
	return c.Conn.Close()
}

// CloseWrite half-closes the underlying connection (an SSH channel sends
// EOF).
func (c *pooledConn) CloseWrite() error {
	if cw, ok := c.Conn.(closeWriter); ok {
		return cw.CloseWrite()
	}
	return fmt.Errorf("hpcproxy: %T cannot half-close", c.Conn)
}

// NetConn returns the underlying connection, for the relay's fast paths.
func (c *pooledConn) NetConn() net.Conn { return c.Conn }
