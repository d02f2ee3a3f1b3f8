package hpcproxy

import (
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"slices"
	"strings"
	"syscall"
	"time"
)

// Many login nodes, and start storms
//
// A cluster has a few login nodes and many compute nodes. A tunnel given
// several ([TunnelConfig.Destinations], or a comma-separated Destination,
// as `--via login1,login2`) orders them for this node by rendezvous
// (highest-random-weight) hashing of the node's name: each login node
// scores hash(login, node), and the highest score comes first. Every node
// thus has a preferred login node of its own, the nodes of a cluster spread
// evenly over the login nodes, and the order is stable: a node keeps its
// login node from job to job, and removing one login node from the list
// moves only the nodes that preferred it (to their second choice). The
// method chain is tried on each login node in turn; a supervisor that loses
// its login node reconnects to the next one in the order.
//
// A job array starts hundreds of tunnels at once against the same sshd,
// whose MaxStartups (default 10:30:100) drops connections that are not yet
// authenticated: the client sees the connection reset or closed before
// sshd's banner. Those attempts are retried with full-jitter exponential
// backoff until the start deadline (TunnelConfig.StartRetryTimeout), so
// that the daemons of a job array spread out instead of failing or
// retrying in lockstep. Any other failure (authentication refused, a host
// key mismatch, nothing listening) is not retried: it moves on down the
// chain at once, as before.

// Defaults for retrying starts that sshd dropped.
const (
	// DefaultStartRetryTimeout is how long a start retries connections
	// that the login node dropped before its SSH banner, when
	// TunnelConfig.StartRetryTimeout is zero. It is below the two minutes
	// that `perjob start` waits for its daemon by default.
	DefaultStartRetryTimeout = 90 * time.Second

	startRetryBase = 200 * time.Millisecond // the first retry waits up to this
	startRetryMax  = 8 * time.Second        // and no retry longer than this
)

// ParseDestinations splits a comma-separated list of login nodes
// ("login1,user@login2:2222"), dropping empty entries and duplicates. It is
// the syntax of --via and $HPCPROXY_VIA.
func ParseDestinations(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" && !slices.Contains(out, f) {
			out = append(out, f)
		}
	}
	return out
}

// logins returns the login nodes the configuration names: Destinations if
// set, else Destination split at commas.
func (cfg *TunnelConfig) logins() []string {
	if len(cfg.Destinations) > 0 {
		var out []string
		for _, d := range cfg.Destinations {
			out = append(out, ParseDestinations(d)...)
		}
		return out
	}
	return ParseDestinations(cfg.Destination)
}

// nodeName is the name this node is known by for the spreading: the
// configured NodeName, else the host name up to its first dot (so that
// "node01" and "node01.cluster" agree).
func (cfg *TunnelConfig) nodeName() string {
	if cfg.NodeName != "" {
		return cfg.NodeName
	}
	h, _ := os.Hostname()
	h, _, _ = strings.Cut(h, ".")
	return h
}

// OrderLogins returns logins in the order a node named node tries them:
// by descending rendezvous score sha256(login NUL node). The result is a
// new slice; ties (only between equal names) keep the input order.
func OrderLogins(logins []string, node string) []string {
	type scored struct {
		login string
		score uint64
	}
	s := make([]scored, len(logins))
	for i, l := range logins {
		h := sha256.Sum256([]byte(l + "\x00" + node))
		s[i] = scored{l, binary.BigEndian.Uint64(h[:8])}
	}
	slices.SortStableFunc(s, func(a, b scored) int { return cmp.Compare(b.score, a.score) })
	out := make([]string, len(s))
	for i, x := range s {
		out[i] = x.login
	}
	return out
}

// rotateAfter returns order starting with the login node after cur, so
// that cur comes last: where a supervisor goes when cur has dropped.
func rotateAfter(order []string, cur string) []string {
	i := slices.Index(order, cur)
	if i < 0 {
		return order
	}
	return append(slices.Clone(order[i+1:]), order[:i+1]...)
}

// errDroppedAtStart marks a connection that the login node closed or reset
// before or right after it sent its SSH banner.
var errDroppedAtStart = errors.New("the login node dropped the connection at its SSH banner (sshd's MaxStartups throttling a start storm?)")

// isStartDrop reports whether err is a start that sshd dropped before the
// SSH version exchange (MaxStartups), which is worth retrying: the
// in-process client marks it with errDroppedAtStart, and so does an ssh
// child's error whose stderr says so (sshDroppedAtStart). Authentication
// and host key failures never are.
func isStartDrop(err error) bool {
	if err == nil {
		return false
	}
	var ae *AuthError
	var ue *UnknownHostError
	var ce *HostKeyChangedError
	if errors.As(err, &ae) || errors.As(err, &ue) || errors.As(err, &ce) {
		return false
	}
	return errors.Is(err, errDroppedAtStart)
}

// droppedBeforeBanner rewrites a handshake error as errDroppedAtStart when
// the connection was reset or closed before the server sent more than its
// version line (read bytes: its key exchange offer alone is over 256):
// what sshd does to a connection over MaxStartups, closing it before or
// right after the banner (OpenSSH 9.2 at MaxStartups 1:100:1 sends the
// banner, then closes).
func droppedBeforeBanner(err error, read int64) error {
	if read < maxBannerOnly && (errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNRESET)) {
		return fmt.Errorf("%w: %w", errDroppedAtStart, err)
	}
	return err
}

// maxBannerOnly bounds what a server sends before its key exchange offer:
// the version line is at most 255 bytes (RFC 4253, 4.2).
const maxBannerOnly = 256

// startBackoff returns the wait before retry n (0-based): full jitter, a
// uniform draw from [0, min(max, base*2^n)).
func startBackoff(n int, base, limit time.Duration) time.Duration {
	d := limit
	if n < 30 && base<<n < limit {
		d = base << n
	}
	if d <= 0 {
		return 0
	}
	return rand.N(d)
}

// startRetryTimeout is the start deadline for retries; 0 means none.
func (cfg *TunnelConfig) startRetryTimeout() time.Duration {
	switch {
	case cfg.StartRetryTimeout < 0:
		return 0
	case cfg.StartRetryTimeout == 0:
		return DefaultStartRetryTimeout
	}
	return cfg.StartRetryTimeout
}

// startFunc starts one method's tunnel to cfg.Destination.
type startFunc func(context.Context, *TunnelConfig, Method) (tunnelImpl, error)

// establishAcross tries each login node in order and on each the method
// chain, first success wins. A method that the login node dropped before
// its banner is retried (after the other login nodes had their turn) with
// full-jitter backoff until the start deadline; every other failure takes
// that method off that login node's list. It returns the tunnel and the
// login node it reached.
func establishAcross(ctx context.Context, cfg TunnelConfig, order []string, start startFunc) (*Tunnel, error) {
	methods := cfg.Methods
	if len(methods) == 0 {
		methods = DefaultMethods
	}
	log := cfg.logger()
	// pending[i] are the methods still worth trying on order[i].
	pending := make([][]Method, len(order))
	errs := make([]*TunnelError, len(order))
	for i, d := range order {
		pending[i] = slices.Clone(methods)
		errs[i] = &TunnelError{Destination: d}
	}
	var deadline time.Time
	if t := cfg.startRetryTimeout(); t > 0 {
		deadline = time.Now().Add(t)
	}
	for round := 0; ; round++ {
		dropped := false
		for i, d := range order {
			c := cfg
			c.Destination, c.Destinations = d, nil
			for len(pending[i]) > 0 {
				m := pending[i][0]
				if err := ctx.Err(); err != nil {
					errs[i].Attempts = append(errs[i].Attempts, &MethodError{m, err})
					return nil, failedAcross(order, errs)
				}
				impl, conns, err := startConns(ctx, &c, m, start)
				if err == nil {
					log.Info("tunnel up", "method", m, "dest", d, "connections", conns)
					return &Tunnel{method: m, dest: d, impl: impl}, nil
				}
				if isStartDrop(err) && !deadline.IsZero() {
					// The server is there but busy: the other methods
					// would be dropped alike. Come back to this one.
					log.Debug("start dropped by the login node; will retry", "method", m, "dest", d, "err", err)
					// One entry for the drops of a method: the last.
					a := errs[i].Attempts
					if n := len(a); n > 0 && a[n-1].Method == m && isStartDrop(a[n-1]) {
						a[n-1] = &MethodError{m, err}
					} else {
						errs[i].Attempts = append(a, &MethodError{m, err})
					}
					dropped = true
					break
				}
				log.Debug("tunnel method failed", "method", m, "dest", d, "err", err)
				errs[i].Attempts = append(errs[i].Attempts, &MethodError{m, err})
				pending[i] = pending[i][1:]
			}
		}
		if !dropped {
			return nil, failedAcross(order, errs)
		}
		wait := startBackoff(round, startRetryBase, startRetryMax)
		if time.Now().Add(wait).After(deadline) {
			log.Warn("start deadline reached while the login node kept dropping connections", "timeout", cfg.startRetryTimeout())
			return nil, failedAcross(order, errs)
		}
		if !sleepCtx(ctx, wait) {
			return nil, failedAcross(order, errs)
		}
	}
}

// startConns starts method m, as a pool of connections where the method
// multiplexes channels.
func startConns(ctx context.Context, cfg *TunnelConfig, m Method, start startFunc) (tunnelImpl, int, error) {
	if !poolable(m) {
		impl, err := start(ctx, cfg, m)
		return impl, 1, err
	}
	pc := newPoolConfig(cfg)
	impl, err := startPool(ctx, cfg, m, pc, start)
	return impl, pc.min, err
}

// failedAcross is the error of a start that reached no login node: the
// *TunnelError of the one login node, or all of them joined.
func failedAcross(order []string, errs []*TunnelError) error {
	if len(errs) == 1 {
		return errs[0]
	}
	all := make([]error, len(errs))
	for i, e := range errs {
		all[i] = e
	}
	return fmt.Errorf("hpcproxy: no login node reached (%s): %w", strings.Join(order, ", "), errors.Join(all...))
}
