package hpcproxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// A pool of SSH connections
//
// One SSH connection is one sshd process on the login node, one stream of
// packets that a single core encrypts and decrypts at each end, and one
// poll loop in which sshd serves every channel of the connection: past a
// few dozen busy channels, each new one waits behind all the others
// (measured in BENCHMARKS.md: 1,000 concurrent downloads over one
// connection take ten times as long as over four). So a tunnel of a
// method that multiplexes channels (gossh, controlmaster) is a pool: it
// opens TunnelConfig.Connections connections at start, and one more
// whenever every connection carries ChannelsPerConnection open channels,
// up to MaxConnections; a dial that finds every connection full while
// another is being opened waits for it (a handshake takes milliseconds,
// a channel on a crowded connection seconds). Each new channel goes to the
// connection that carries the fewest. A connection that was added carries
// no channel for poolIdle is closed again.
//
// The first Connections connections are the tunnel: if one of them drops,
// the whole tunnel is down and a supervisor re-establishes it. An added
// connection that drops is only removed (its channels end with it).

// Defaults of the pool.
const (
	// DefaultMaxConnections caps the pool when
	// TunnelConfig.MaxConnections is zero: at most eight sshd sessions on
	// the login node for one tunnel (about 60 MiB there, at 7.6 MiB per
	// session process pair measured here), opened only while hundreds of
	// channels are open at once. Measured in BENCHMARKS.md: 1,000
	// concurrent downloads finish in about 1 s over 8 connections, 1.3-2.2 s
	// over 4, 15-19 s over one.
	DefaultMaxConnections = 8
	// DefaultChannelsPerConnection is how many open channels one
	// connection carries before the pool grows, when
	// TunnelConfig.ChannelsPerConnection is zero: the knee measured in
	// BENCHMARKS.md.
	DefaultChannelsPerConnection = 64

	// defaultPoolIdle is how long an added connection stays open without
	// channels.
	defaultPoolIdle = 30 * time.Second
	// growRetry is how long the pool waits after a failed growth before
	// trying again (the login node may be throttling starts).
	growRetry = 5 * time.Second
	// growWait is how long a dial waits for connections being added
	// before it takes the least loaded one there is (a login node slow to
	// answer must not hold every new channel).
	growWait = 2 * time.Second
)

// poolable reports whether a method multiplexes channels over one SSH
// connection, so that several connections can share the load.
func poolable(m Method) bool { return m == MethodGoSSH || m == MethodControlMaster }

// poolConfig is the pool's part of a TunnelConfig, defaults applied.
type poolConfig struct {
	min, max int           // connections kept, and the cap
	perConn  int           // channels per connection before growing
	idle     time.Duration // an added connection without channels closes after
}

func newPoolConfig(cfg *TunnelConfig) poolConfig {
	pc := poolConfig{min: max(cfg.Connections, 1), max: cfg.MaxConnections, perConn: cfg.ChannelsPerConnection, idle: cfg.poolIdle}
	if pc.max <= 0 {
		pc.max = DefaultMaxConnections
	}
	pc.max = max(pc.max, pc.min)
	if pc.perConn <= 0 {
		pc.perConn = DefaultChannelsPerConnection
	}
	if pc.idle <= 0 {
		pc.idle = defaultPoolIdle
	}
	return pc
}

// startPool starts pc.min tunnels of method m at once with start and pools
// them. If any fails, the others are closed and its error is returned.
func startPool(ctx context.Context, cfg *TunnelConfig, m Method, pc poolConfig, start startFunc) (tunnelImpl, error) {
	n := pc.min
	if n == 1 && pc.max == 1 {
		return start(ctx, cfg, m) // a pool of one is just the connection
	}
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
		if n == 1 {
			return nil, errs[0]
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
	runCtx, cancel := context.WithCancel(context.Background())
	c := *cfg
	p := &poolTunnel{
		cfg: &c, method: m, start: start, pc: pc, log: cfg.logger(),
		ctx: runCtx, cancel: cancel,
		changed: make(chan struct{}), done: make(chan struct{}),
	}
	p.mu.Lock() // a member's watcher may fail the pool at once
	for _, t := range impls {
		p.members = append(p.members, p.newMember(t, false))
	}
	p.mu.Unlock()
	if pc.max > pc.min {
		p.wg.Add(1)
		go p.janitor()
	}
	return p, nil
}

// poolTunnel spreads channels over several tunnels of one method, growing
// and shrinking between pc.min and pc.max of them.
type poolTunnel struct {
	cfg    *TunnelConfig
	method Method
	start  startFunc
	pc     poolConfig
	log    *slog.Logger

	ctx    context.Context // ends when the pool goes down: cancels growth
	cancel context.CancelFunc
	wg     sync.WaitGroup // member watchers, growths, the janitor

	mu       sync.Mutex
	members  []*poolMember // the first pc.min are fixed
	next     int           // where the search for the least loaded starts
	growing  int           // connections being opened
	waiting  int           // dials waiting for them
	failedAt time.Time     // the last growth that failed
	changed  chan struct{} // closed and replaced when members or growing change
	down     bool
	err      error
	done     chan struct{} // closed when every member is closed
}

type poolMember struct {
	impl      tunnelImpl
	extra     bool          // added by growth: may be closed when idle
	active    atomic.Int64  // connections dialled through it and not yet closed
	idleSince time.Time     // when active last fell to 0 (guarded by the pool's mu)
	removed   chan struct{} // closed when the pool takes it out
}

var _ remoteListener = (*poolTunnel)(nil)

// newMember wraps t and watches it: a fixed member that goes down takes
// the pool down; an added one is just removed.
func (p *poolTunnel) newMember(t tunnelImpl, extra bool) *poolMember {
	m := &poolMember{impl: t, extra: extra, idleSince: time.Now(), removed: make(chan struct{})}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		select {
		case <-t.Done():
		case <-m.removed:
			return
		case <-p.ctx.Done():
			return
		}
		err := t.Err()
		if err == nil {
			err = errors.New("a pooled connection closed")
		}
		if extra {
			p.log.Info("an added SSH connection dropped", "err", err)
			p.remove(m)
			return
		}
		p.fail(err)
	}()
	return m
}

// fail takes the pool down with err as the reason (nil for a plain
// Close); the first call wins.
func (p *poolTunnel) fail(err error) {
	p.mu.Lock()
	if p.down {
		p.mu.Unlock()
		return
	}
	p.down, p.err = true, err
	members := p.members
	p.wake()
	p.mu.Unlock()
	p.cancel()
	go func() {
		for _, m := range members {
			_ = m.impl.Close()
		}
		p.wg.Wait()
		close(p.done)
	}()
}

// wake tells waiting dials that members or growths changed; p.mu is held.
func (p *poolTunnel) wake() {
	close(p.changed)
	p.changed = make(chan struct{})
}

// remove takes m out of the pool and closes it.
func (p *poolTunnel) remove(m *poolMember) {
	p.mu.Lock()
	i := slices.Index(p.members, m)
	if i >= 0 {
		p.members = slices.Delete(slices.Clone(p.members), i, i+1)
		close(m.removed)
		p.wake()
	}
	p.mu.Unlock()
	if i >= 0 {
		_ = m.impl.Close()
	}
}

// janitor closes added connections that have carried no channel for
// pc.idle.
func (p *poolTunnel) janitor() {
	defer p.wg.Done()
	tick := time.NewTicker(max(p.pc.idle/4, 10*time.Millisecond))
	defer tick.Stop()
	for {
		select {
		case <-p.ctx.Done():
			return
		case <-tick.C:
		}
		var idle []*poolMember
		p.mu.Lock()
		for _, m := range p.members {
			if m.extra && m.active.Load() == 0 && time.Since(m.idleSince) >= p.pc.idle {
				idle = append(idle, m)
			}
		}
		p.mu.Unlock()
		for _, m := range idle {
			p.log.Debug("closing an idle added SSH connection", "connections", p.size()-1)
			p.remove(m)
		}
	}
}

// size is how many connections the pool holds.
func (p *poolTunnel) size() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.members)
}

// grow opens one more connection in the background; p.mu is held and
// p.growing already counts it.
func (p *poolTunnel) grow() {
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		t, err := p.start(p.ctx, p.cfg, p.method)
		p.mu.Lock()
		p.growing--
		p.wake()
		down := p.down
		switch {
		case err != nil:
			p.failedAt = time.Now()
			if !down {
				p.log.Warn("could not add an SSH connection to the pool", "connections", len(p.members), "err", err)
			}
		case !down:
			p.members = append(slices.Clone(p.members), p.newMember(t, true))
			p.log.Debug("added an SSH connection to the pool", "connections", len(p.members))
		}
		p.mu.Unlock()
		if err == nil && down {
			_ = t.Close()
		}
	}()
}

// pick returns the member with the fewest active connections, the search
// starting at a rotating index so that ties are spread; p.mu is held.
func (p *poolTunnel) pick() *poolMember {
	n := len(p.members)
	p.next++
	start := p.next % n
	best := p.members[start]
	for i := 1; i < n; i++ {
		m := p.members[(start+i)%n]
		if m.active.Load() < best.active.Load() {
			best = m
		}
	}
	return best
}

// acquire picks the member for a new channel and counts the channel on
// it. While every member carries pc.perConn channels or more it opens more
// connections (up to pc.max) and waits for them, as long as ctx allows.
func (p *poolTunnel) acquire(ctx context.Context) (*poolMember, error) {
	var timeout <-chan time.Time // set once the dial starts waiting
	waitedOut := false
	p.mu.Lock()
	defer p.mu.Unlock()
	for {
		if p.down {
			return nil, p.downErr()
		}
		best := p.pick()
		full := best.active.Load() >= int64(p.pc.perConn)
		if full && len(p.members) < p.pc.max && time.Since(p.failedAt) >= growRetry {
			// Open as many as the channels in use and waiting need.
			var total int64
			for _, m := range p.members {
				total += m.active.Load()
			}
			want := min(int((total+int64(p.waiting)+1+int64(p.pc.perConn)-1)/int64(p.pc.perConn)), p.pc.max)
			for len(p.members)+p.growing < want {
				p.growing++
				p.grow()
			}
		}
		if !full || p.growing == 0 || waitedOut {
			best.active.Add(1)
			return best, nil
		}
		if timeout == nil {
			timer := time.NewTimer(growWait)
			defer timer.Stop()
			timeout = timer.C
		}
		changed := p.changed
		p.waiting++
		p.mu.Unlock()
		select {
		case <-changed:
		case <-timeout:
			waitedOut = true
		case <-ctx.Done():
		}
		p.mu.Lock()
		p.waiting--
		if err := ctx.Err(); err != nil {
			return nil, err
		}
	}
}

// release counts a channel of m as closed.
func (p *poolTunnel) release(m *poolMember) {
	if m.active.Add(-1) == 0 && m.extra {
		p.mu.Lock()
		m.idleSince = time.Now()
		p.mu.Unlock()
	}
}

func (p *poolTunnel) downErr() error {
	if p.err != nil {
		return fmt.Errorf("%w: %w", ErrTunnelDown, p.err)
	}
	return ErrTunnelDown
}

func (p *poolTunnel) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	m, err := p.acquire(ctx)
	if err != nil {
		return nil, err
	}
	c, err := m.impl.DialContext(ctx, network, addr)
	if err != nil {
		p.release(m)
		return nil, err
	}
	return &pooledConn{Conn: c, pool: p, member: m}, nil
}

// dialHandoff implements handoffDialer through the least loaded member,
// when its method can take the client's socket (controlmaster): the
// member counts the forward until it is closed, as it counts a dialled
// connection.
func (p *poolTunnel) dialHandoff(ctx context.Context, addr string, client handoffClient, optimistic bool) (*handoff, net.Conn, error) {
	m, err := p.acquire(ctx)
	if err != nil {
		return nil, nil, err
	}
	hd, ok := m.impl.(handoffDialer)
	if !ok {
		p.release(m)
		return nil, nil, errNoHandoff
	}
	h, c, err := hd.dialHandoff(ctx, addr, client, optimistic)
	switch {
	case err != nil:
		p.release(m)
		return nil, nil, err
	case c != nil:
		return nil, &pooledConn{Conn: c, pool: p, member: m}, nil
	case h == nil:
		p.release(m)
		return nil, nil, errNoHandoff
	}
	h.released = func() { p.release(m) }
	return h, nil, nil
}

// Close takes the pool down and waits until every member is closed.
func (p *poolTunnel) Close() error {
	p.fail(nil)
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
// listener lives on one connection, and the first is never closed while
// the pool is up.
func (p *poolTunnel) listenRemote(ctx context.Context, network, addr string) (net.Listener, error) {
	p.mu.Lock()
	first := p.members[0]
	p.mu.Unlock()
	rl, ok := first.impl.(remoteListener)
	if !ok {
		return nil, ErrReverseUnsupported
	}
	return rl.listenRemote(ctx, network, addr)
}

// pooledConn is a connection dialled through a pool member; closing it
// tells the member it carries one connection less.
type pooledConn struct {
	net.Conn
	pool   *poolTunnel
	member *poolMember
	once   sync.Once
}

func (c *pooledConn) Close() error {
	c.once.Do(func() { c.pool.release(c.member) })
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

// unresponsive reports whether a fixed member (one whose drop takes the
// pool down) has let a keepalive go unanswered: see [Tunnel.Unresponsive].
func (p *poolTunnel) unresponsive() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, m := range p.members {
		if h, ok := m.impl.(interface{ unresponsive() bool }); ok && !m.extra && h.unresponsive() {
			return true
		}
	}
	return false
}
