package hpcproxy

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"sync"
	"time"
)

// TunnelStatus is the condition of a [SupervisedTunnel].
type TunnelStatus int

const (
	// TunnelUp: a tunnel is established and carries connections.
	TunnelUp TunnelStatus = iota + 1
	// TunnelReconnecting: the tunnel dropped and is being re-established.
	TunnelReconnecting
	// TunnelClosed: the supervisor was closed.
	TunnelClosed
)

// String returns "up", "reconnecting" or "closed".
func (s TunnelStatus) String() string {
	switch s {
	case TunnelUp:
		return "up"
	case TunnelReconnecting:
		return "reconnecting"
	case TunnelClosed:
		return "closed"
	}
	return fmt.Sprintf("TunnelStatus(%d)", int(s))
}

// TunnelState is a snapshot of a [SupervisedTunnel].
type TunnelState struct {
	Status     TunnelStatus
	Method     Method    // the method of the current (or last) tunnel
	Login      string    // the login node of the current (or last) tunnel
	Since      time.Time // when Status last changed
	Reconnects int       // tunnels re-established after a drop
	Attempts   int       // failed attempts since the tunnel dropped
	LastError  error     // why the tunnel last dropped or last failed to come back
}

// SupervisorConfig configures [SuperviseTunnel].
type SupervisorConfig struct {
	// Tunnel is how each tunnel is established, first and after a drop.
	Tunnel TunnelConfig

	// MinBackoff optionally specifies the longest wait after the first
	// failed reconnect attempt; it doubles after each failure up to
	// MaxBackoff, and each wait is a random draw below it (full jitter),
	// so that the daemons of a job array that lost their login node at the
	// same moment do not come back in lockstep. If zero, 500ms.
	MinBackoff time.Duration
	// MaxBackoff optionally caps the wait between attempts. If zero, 30s.
	MaxBackoff time.Duration

	// DialGrace optionally specifies how long a dial made while the tunnel
	// is down waits for it to come back before failing with an error that
	// wraps ErrTunnelDown. If zero, 10s. Negative fails at once.
	DialGrace time.Duration

	// OnChange optionally receives each new state, and the tunnel that is
	// up (nil unless Status is TunnelUp). It is called from the supervisor's
	// goroutine, one call at a time; it must not block for long.
	OnChange func(TunnelState, *Tunnel)

	// establish replaces EstablishTunnel, and sleep the wait between
	// attempts, in tests of the state machine.
	establish func(context.Context, TunnelConfig) (*Tunnel, error)
	sleep     func(context.Context, time.Duration) bool
}

// SupervisedTunnel keeps a tunnel to the login node up: when the current
// tunnel's Done fires it re-establishes one, going through the method chain
// again, with exponential backoff and jitter between attempts. With several
// login nodes (TunnelConfig.Destinations) it tries the one after the login
// node it lost first, and that one last. It never gives
// up on its own; Close stops it. Its Dial is a [DialFunc].
type SupervisedTunnel struct {
	cfg    SupervisorConfig
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu    sync.Mutex
	cur   *Tunnel       // nil while down
	up    chan struct{} // closed when cur is set; replaced when it drops
	state TunnelState
}

var _ ContextDialer = (*SupervisedTunnel)(nil)

// SuperviseTunnel establishes the first tunnel (failing if that fails, so a
// daemon can report a broken configuration at start) and then supervises it
// until Close. ctx bounds only the first establishment.
func SuperviseTunnel(ctx context.Context, cfg SupervisorConfig) (*SupervisedTunnel, error) {
	if cfg.MinBackoff <= 0 {
		cfg.MinBackoff = 500 * time.Millisecond
	}
	if cfg.MaxBackoff <= 0 {
		cfg.MaxBackoff = 30 * time.Second
	}
	if cfg.MaxBackoff < cfg.MinBackoff {
		cfg.MaxBackoff = cfg.MinBackoff
	}
	if cfg.DialGrace == 0 {
		cfg.DialGrace = 10 * time.Second
	}
	if cfg.establish == nil {
		cfg.establish = EstablishTunnel
	}
	if cfg.sleep == nil {
		cfg.sleep = sleepCtx
	}
	t, err := cfg.establish(ctx, cfg.Tunnel)
	if err != nil {
		return nil, err
	}
	runCtx, cancel := context.WithCancel(context.Background())
	s := &SupervisedTunnel{cfg: cfg, cancel: cancel, up: make(chan struct{})}
	s.setUp(t, false)
	s.wg.Add(1)
	go s.run(runCtx, t)
	return s, nil
}

// run watches the current tunnel and replaces it when it drops.
func (s *SupervisedTunnel) run(ctx context.Context, t *Tunnel) {
	defer s.wg.Done()
	log := s.cfg.Tunnel.logger()
	for {
		select {
		case <-ctx.Done():
			t.Close()
			return
		case <-t.Done():
		}
		why := t.Err()
		if why == nil {
			why = errors.New("tunnel closed")
		}
		t.Close()
		log.Warn("tunnel dropped; reconnecting", "method", t.Method(), "dest", t.Destination(), "err", why)
		s.setDown(why)

		backoff := s.cfg.MinBackoff
		tc := s.reconnectConfig(t.Destination())
		for {
			nt, err := s.cfg.establish(ctx, tc)
			if err == nil {
				t = nt
				s.setUp(t, true)
				log.Info("tunnel re-established", "method", t.Method(), "dest", t.Destination())
				break
			}
			if ctx.Err() != nil {
				return
			}
			s.noteFailure(err)
			// Full jitter keeps a job array's daemons from reconnecting
			// in lockstep (sshd's MaxStartups).
			wait := rand.N(backoff + 1)
			log.Debug("reconnect failed", "err", err, "retry_in", wait)
			if !s.cfg.sleep(ctx, wait) {
				return
			}
			backoff = min(backoff*2, s.cfg.MaxBackoff)
		}
	}
}

// reconnectConfig is the tunnel configuration for reconnecting after the
// tunnel to login lost: with several login nodes, in this node's order
// from the one after login on, login itself last.
func (s *SupervisedTunnel) reconnectConfig(login string) TunnelConfig {
	tc := s.cfg.Tunnel
	logins := tc.logins()
	if len(logins) < 2 {
		return tc
	}
	tc.Destinations = rotateAfter(OrderLogins(logins, tc.nodeName()), login)
	tc.Destination, tc.ordered = "", true
	return tc
}

// sleepCtx waits for d; it reports false if ctx ended first.
func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

func (s *SupervisedTunnel) setUp(t *Tunnel, reconnected bool) {
	s.mu.Lock()
	s.cur = t
	close(s.up)
	s.state.Status = TunnelUp
	s.state.Method = t.Method()
	s.state.Login = t.Destination()
	s.state.Since = time.Now()
	s.state.Attempts = 0
	if reconnected {
		s.state.Reconnects++
	}
	st := s.state
	s.mu.Unlock()
	s.notify(st, t)
}

func (s *SupervisedTunnel) setDown(why error) {
	s.mu.Lock()
	s.cur = nil
	s.up = make(chan struct{})
	s.state.Status = TunnelReconnecting
	s.state.Since = time.Now()
	s.state.LastError = why
	st := s.state
	s.mu.Unlock()
	s.notify(st, nil)
}

func (s *SupervisedTunnel) noteFailure(err error) {
	s.mu.Lock()
	s.state.Attempts++
	s.state.LastError = err
	st := s.state
	s.mu.Unlock()
	s.notify(st, nil)
}

func (s *SupervisedTunnel) notify(st TunnelState, t *Tunnel) {
	if s.cfg.OnChange != nil {
		s.cfg.OnChange(st, t)
	}
}

// State returns a snapshot of the supervisor's state.
func (s *SupervisedTunnel) State() TunnelState {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.state
}

// Dial opens a connection through the current tunnel. While the tunnel is
// down it waits up to DialGrace (and no longer than ctx allows) for it to
// come back, then fails with an error that wraps ErrTunnelDown and says
// that the tunnel is reconnecting. ctx governs the setup only.
func (s *SupervisedTunnel) Dial(ctx context.Context, network, addr string) (net.Conn, error) {
	var grace <-chan time.Time
	for {
		s.mu.Lock()
		cur, up, st := s.cur, s.up, s.state
		s.mu.Unlock()
		if st.Status == TunnelClosed {
			return nil, ErrTunnelDown
		}
		if cur != nil {
			c, err := cur.Dial(ctx, network, addr)
			if err == nil || !errors.Is(err, ErrTunnelDown) {
				return c, err
			}
			// It dropped under us: wait for the next one like any dial
			// that finds the tunnel down.
			s.waitDropNoticed(cur)
			continue
		}
		if grace == nil {
			if s.cfg.DialGrace < 0 {
				return nil, s.downError(st)
			}
			timer := time.NewTimer(s.cfg.DialGrace)
			defer timer.Stop()
			grace = timer.C
		}
		select {
		case <-up:
		case <-grace:
			return nil, s.downError(s.State())
		case <-ctx.Done():
			return nil, fmt.Errorf("%w (%w)", s.downError(s.State()), ctx.Err())
		}
	}
}

// waitDropNoticed waits briefly until the supervisor has replaced cur (it
// saw Done fire), so Dial does not spin on a dead tunnel.
func (s *SupervisedTunnel) waitDropNoticed(cur *Tunnel) {
	deadline := time.Now().Add(time.Second)
	for time.Now().Before(deadline) {
		s.mu.Lock()
		changed := s.cur != cur
		s.mu.Unlock()
		if changed {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func (s *SupervisedTunnel) downError(st TunnelState) error {
	if st.Status == TunnelClosed {
		return ErrTunnelDown
	}
	msg := fmt.Sprintf("reconnecting to %s since %s", s.cfg.Tunnel.Destination, st.Since.Format(time.RFC3339))
	if st.Attempts > 0 {
		msg += fmt.Sprintf(" (%d failed attempts)", st.Attempts)
	}
	if st.LastError != nil {
		return fmt.Errorf("%w: %s: %w", ErrTunnelDown, msg, st.LastError)
	}
	return fmt.Errorf("%w: %s", ErrTunnelDown, msg)
}

// DialContext is Dial; it makes SupervisedTunnel a [ContextDialer].
func (s *SupervisedTunnel) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	return s.Dial(ctx, network, addr)
}

// Current returns the tunnel that is up, or nil while reconnecting.
func (s *SupervisedTunnel) Current() *Tunnel {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cur
}

// Close stops supervising and closes the current tunnel. Dials waiting for
// a reconnect fail with ErrTunnelDown. Close is idempotent.
func (s *SupervisedTunnel) Close() error {
	s.cancel()
	s.wg.Wait()
	s.mu.Lock()
	changed := s.state.Status != TunnelClosed
	if changed {
		s.state.Status = TunnelClosed
		s.state.Since = time.Now()
		s.cur = nil
		select {
		case <-s.up:
		default:
			close(s.up) // wake waiting dials; they see TunnelClosed
		}
	}
	st := s.state
	s.mu.Unlock()
	if changed {
		s.notify(st, nil)
	}
	return nil
}

// WaitTunnel returns the tunnel that is up, waiting (as long as ctx allows)
// while the supervisor reconnects. After Close it fails with
// ErrTunnelDown. It makes SupervisedTunnel a [TunnelSource]: a
// [ReverseForward] uses it to re-request its remote listener on each new
// tunnel.
func (s *SupervisedTunnel) WaitTunnel(ctx context.Context) (*Tunnel, error) {
	for {
		s.mu.Lock()
		cur, up, st := s.cur, s.up, s.state
		s.mu.Unlock()
		if st.Status == TunnelClosed {
			return nil, ErrTunnelDown
		}
		if cur != nil {
			select {
			case <-cur.Done():
				// Dropped, and the supervisor has not noticed yet.
				if !sleepCtx(ctx, 5*time.Millisecond) {
					return nil, ctx.Err()
				}
				continue
			default:
				return cur, nil
			}
		}
		select {
		case <-up:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}
