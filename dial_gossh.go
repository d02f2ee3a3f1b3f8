package hpcproxy

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/crypto/ssh"
)

// Defaults of the gossh method.
const (
	defaultConnectTimeout    = 30 * time.Second
	defaultKeepaliveInterval = 60 * time.Second
	defaultKeepaliveCountMax = 3 // OpenSSH's ServerAliveCountMax
	maxJumpDepth             = 8
	sshReadBuffer            = 256 << 10
)

// DialGoSSH connects to sshDest ("host", "user@host", "host:port",
// "user@host:port" or an ssh_config alias) with the in-process SSH client
// (MethodGoSSH) and returns a DialFunc opening one direct-tcpip channel per
// connection, a stop function that closes the tunnel, and a channel closed
// when the tunnel goes down (stopped, dropped, or keepalives unanswered).
//
// It is EstablishTunnel with Methods {MethodGoSSH} and every other option at
// its default; see TunnelConfig for what that means. The destination is
// resolved like ssh would resolve it (ssh_config, ProxyJump), its host key
// must be in the user's or the global known_hosts, and authentication never
// prompts: ssh-agent keys, unencrypted key files (IdentityFile, else
// ~/.ssh/id_*), and OpenSSH certificates beside them or named by
// CertificateFile. Hostbased authentication is not available in process
// (golang.org/x/crypto/ssh lacks it, and it needs OpenSSH's setuid
// ssh-keysign): MethodControlMaster serves it, through EstablishTunnel's
// default chain.
func DialGoSSH(sshDest string) (DialFunc, func(), <-chan struct{}, error) {
	tun, err := EstablishTunnel(context.Background(), TunnelConfig{
		Destination: sshDest,
		Methods:     []Method{MethodGoSSH},
	})
	if err != nil {
		return nil, nil, nil, err
	}
	return tun.Dial, func() { _ = tun.Close() }, tun.Done(), nil
}

// startGoSSH brings up a MethodGoSSH tunnel.
//
// Authentication is non-interactive only: ssh-agent keys, key files and
// OpenSSH certificates (see gosshSigners). Hostbased authentication is not
// implemented by golang.org/x/crypto/ssh and needs OpenSSH's setuid
// ssh-keysign: MethodControlMaster provides it. A ProxyCommand likewise
// needs OpenSSH, so gossh fails for such a destination and the chain moves
// on; ProxyJump is done in process.
func startGoSSH(ctx context.Context, cfg *TunnelConfig) (tunnelImpl, error) {
	log := cfg.logger().With("method", MethodGoSSH.String())
	d, err := parseDestination(cfg.Destination)
	if err != nil {
		return nil, err
	}
	// The connect timeout bounds the resolution too (`ssh -G` runs Match
	// exec commands, which may hang). ssh_config's ConnectTimeout is known
	// only afterwards: until then the default applies, and then it bounds
	// the setup counted from its start.
	start := time.Now()
	timeout := cfg.ConnectTimeout
	if timeout <= 0 {
		timeout = defaultConnectTimeout
	}
	r := newResolver(cfg)
	resolveCtx, cancelResolve := context.WithTimeout(ctx, timeout)
	target, err := r.resolve(resolveCtx, d)
	if err != nil {
		err = timeoutError(ctx, resolveCtx, timeout, err)
	}
	cancelResolve()
	if err != nil {
		return nil, err
	}
	if target.ProxyCommand != "" {
		return nil, fmt.Errorf("hpcproxy: %s uses ProxyCommand, which only OpenSSH can run (the controlmaster method can)", d.Host)
	}
	if cfg.ConnectTimeout <= 0 && target.ConnectTimeout > 0 {
		timeout = target.ConnectTimeout
	}
	setupCtx, cancel := context.WithDeadline(ctx, start.Add(timeout))
	defer cancel()

	chain, err := r.jumpChain(setupCtx, target, 0)
	if err != nil {
		return nil, err
	}
	var clients []*ssh.Client
	closeAll := func() {
		for _, c := range slices.Backward(clients) {
			_ = c.Close()
		}
	}
	for i, s := range chain {
		var conn net.Conn
		if i == 0 {
			var nd net.Dialer
			conn, err = nd.DialContext(setupCtx, "tcp", s.addr())
			if err != nil {
				err = fmt.Errorf("hpcproxy: connecting to %s (%s): %w", s.Host, s.addr(), err)
			}
		} else {
			conn, err = openDirectContext(setupCtx, clients[i-1], s.addr())
			if err != nil {
				err = fmt.Errorf("hpcproxy: connecting to %s (%s) through %s: %w", s.Host, s.addr(), chain[i-1].Host, err)
			}
		}
		if err != nil {
			closeAll()
			return nil, timeoutError(ctx, setupCtx, timeout, err)
		}
		c, err := sshHandshake(setupCtx, conn, s, cfg.HostKeyPolicy, log)
		if err != nil {
			closeAll()
			return nil, timeoutError(ctx, setupCtx, timeout, err)
		}
		log.Debug("ssh connected", "host", s.Host, "addr", s.addr(), "user", s.User, "config", s.Source)
		clients = append(clients, c)
	}

	interval := cfg.KeepaliveInterval
	if interval == 0 {
		interval = target.ServerAliveInterval
	}
	if interval == 0 {
		interval = defaultKeepaliveInterval
	}
	count := cfg.KeepaliveCountMax
	if count <= 0 {
		count = target.ServerAliveCountMax
	}
	if count <= 0 {
		count = defaultKeepaliveCountMax
	}
	t := &gosshTunnel{
		client:  clients[len(clients)-1],
		hops:    clients[:len(clients)-1],
		log:     log,
		stop:    make(chan struct{}),
		dying:   make(chan struct{}),
		done:    make(chan struct{}),
		openers: newKeptGoroutines(),
	}
	go t.run(interval, count)
	return t, nil
}

// timeoutError rewrites err when the setup ran out of time.
func timeoutError(parent, setup context.Context, timeout time.Duration, err error) error {
	if parent.Err() == nil && (errors.Is(setup.Err(), context.DeadlineExceeded) || errors.Is(err, os.ErrDeadlineExceeded)) {
		return fmt.Errorf("hpcproxy: SSH setup timed out after %s (ConnectTimeout): %w", timeout, err)
	}
	if perr := parent.Err(); perr != nil && !errors.Is(err, perr) {
		return fmt.Errorf("%w: %w", perr, err)
	}
	return err
}

// sshHandshake runs the SSH handshake and authentication for s over conn.
// ctx bounds both: a deadline is put on a TCP conn, and conn is closed if
// ctx ends first (channel conns take no deadlines). conn is consumed.
func sshHandshake(ctx context.Context, conn net.Conn, s *sshSettings, policy HostKeyPolicy, log *slog.Logger) (*ssh.Client, error) {
	verifier, err := newHostKeyVerifier(s, hostKeyPolicy(policy, s, log), log)
	if err != nil {
		conn.Close()
		return nil, err
	}
	keys, err := gosshSigners(s, log)
	if err != nil {
		conn.Close()
		return nil, err
	}
	defer keys.close()
	if len(keys.signers) == 0 {
		conn.Close()
		return nil, &AuthError{User: s.User, Host: s.Host, Skipped: keys.skipped, Tried: keys.tried}
	}
	remote := ""
	if tcp, ok := conn.RemoteAddr().(*net.TCPAddr); ok && tcp.IP != nil && !tcp.IP.IsUnspecified() {
		remote = tcp.String()
	}
	config := &ssh.ClientConfig{
		User:              s.User,
		Auth:              []ssh.AuthMethod{ssh.PublicKeys(keys.signers...)},
		HostKeyCallback:   verifier.callback(),
		HostKeyAlgorithms: verifier.algorithms(remote, s.HostKeyAlgorithms),
		ClientVersion:     "SSH-2.0-hpcproxy",
	}
	config.Ciphers = gosshCiphers(s.Ciphers, log)

	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl) // fails harmlessly on channel conns
	}
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	sock := withQuickAck(withRawIO(conn))
	got := &countingReader{r: sock}
	bc := &bufferedConn{Conn: sock, r: bufio.NewReaderSize(got, sshReadBuffer)}
	c, chans, reqs, err := ssh.NewClientConn(bc, s.addr(), config)
	if !stop() {
		if c != nil {
			c.Close()
		}
		if err == nil {
			err = ctx.Err()
		}
		return nil, fmt.Errorf("hpcproxy: SSH handshake with %s: %w", s.Host, err)
	}
	if err != nil {
		conn.Close()
		if herr := verifier.lastErr(); herr != nil {
			return nil, herr
		}
		if strings.Contains(err.Error(), "unable to authenticate") {
			return nil, &AuthError{User: s.User, Host: s.Host, Offered: keys.offered, Skipped: keys.skipped, Err: err}
		}
		return nil, fmt.Errorf("hpcproxy: SSH handshake with %s (%s): %w", s.Host, s.addr(), droppedBeforeBanner(err, got.n.Load()))
	}
	_ = conn.SetDeadline(time.Time{})
	return ssh.NewClient(c, chans, reqs), nil
}

// countingReader counts the bytes read through it: a handshake that
// failed before the server sent a byte was dropped by sshd (MaxStartups).
// x/crypto's reader goroutine may still read when the handshake fails.
type countingReader struct {
	r io.Reader
	n atomic.Int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n.Add(int64(n))
	return n, err
}

// bufferedConn reads through a large buffer: x/crypto's transport (and its
// control-socket transport) reads each packet with small reads, costing
// several read syscalls per packet.
type bufferedConn struct {
	net.Conn
	r *bufio.Reader
}

// newBufferedConn wraps c with a sshReadBuffer-sized read buffer.
func newBufferedConn(c net.Conn) *bufferedConn {
	return &bufferedConn{Conn: c, r: bufio.NewReaderSize(c, sshReadBuffer)}
}

func (c *bufferedConn) Read(p []byte) (int, error) { return c.r.Read(p) }

// gosshCiphers returns the ciphers to offer: ssh_config's Ciphers when set
// (those x/crypto implements), else AES-GCM first (several GB/s with AES-NI,
// chacha20-poly1305 is ~2.5x slower in Go) and then x/crypto's defaults.
func gosshCiphers(configured []string, log *slog.Logger) []string {
	supported := ssh.SupportedAlgorithms().Ciphers
	if configured != nil {
		var out []string
		for _, c := range configured {
			if slices.Contains(supported, c) {
				out = append(out, c)
			}
		}
		if len(out) > 0 {
			return out
		}
		log.Warn("none of the configured Ciphers is implemented in process; using defaults", "ciphers", strings.Join(configured, ","))
	}
	out := []string{ssh.CipherAES128GCM, ssh.CipherAES256GCM}
	for _, c := range supported {
		if !slices.Contains(out, c) {
			out = append(out, c)
		}
	}
	return out
}

// gosshTunnel is a MethodGoSSH tunnel: an SSH client (possibly reached
// through jump hosts) opening one direct-tcpip channel per connection.
type gosshTunnel struct {
	client *ssh.Client
	hops   []*ssh.Client // jump hosts, in connection order
	log    *slog.Logger

	stopOnce sync.Once
	stop     chan struct{} // closed by Close
	// dying is closed by run as soon as the tunnel goes down, before it
	// closes the clients: from then on dials fail with ErrTunnelDown.
	dying    chan struct{}
	dyingErr error         // why, written before dying is closed; nil after Close
	done     chan struct{} // closed by run when everything is torn down

	missed atomic.Int32 // keepalives unanswered in a row (Tunnel.Unresponsive)

	mu     sync.Mutex
	err    error
	closed bool           // no new dial goroutines once set
	dials  sync.WaitGroup // dial goroutines, waited for before done
	// openers run the channel opens of dials.
	openers *keptGoroutines
}

func (t *gosshTunnel) unresponsive() bool { return t.missed.Load() > 0 }

// run supervises the tunnel until Close, a dropped connection or missed
// keepalives; then it closes the clients and waits for every goroutine of
// the tunnel before closing done.
func (t *gosshTunnel) run(interval time.Duration, countMax int) {
	// Wait on every client: a jump host dropping ends the tunnel too.
	clients := append([]*ssh.Client{t.client}, t.hops...)
	waitc := make(chan error, len(clients))
	for _, c := range clients {
		go func() { waitc <- c.Wait() }()
	}
	waiting := len(clients)
	kaStop, kaDone := make(chan struct{}), make(chan struct{})
	kaFail := make(chan error, 1)
	if interval > 0 {
		go func() {
			defer close(kaDone)
			t.keepalive(interval, countMax, kaStop, kaFail)
		}()
	} else {
		close(kaDone)
	}

	var err error
	select {
	case <-t.stop:
	case werr := <-waitc:
		waiting--
		if werr == nil {
			werr = errors.New("closed by the server")
		}
		err = fmt.Errorf("hpcproxy: SSH connection to the login node dropped: %w", werr)
	case err = <-kaFail:
	}
	if err != nil {
		t.log.Warn("tunnel down", "err", err)
	}
	t.dyingErr = err
	close(t.dying)
	close(kaStop)
	_ = t.client.Close()
	for _, h := range slices.Backward(t.hops) {
		_ = h.Close()
	}
	if testHookGoSSHClientsClosed != nil {
		testHookGoSSHClientsClosed()
	}
	for ; waiting > 0; waiting-- {
		<-waitc
	}
	<-kaDone
	t.mu.Lock()
	t.closed = true
	t.err = err
	t.mu.Unlock()
	t.dials.Wait()
	t.openers.close()
	close(t.done)
}

// testHookGoSSHClientsClosed, when set by a test, runs in run right after
// the clients are closed, while the tunnel is still winding down.
var testHookGoSSHClientsClosed func()

// keepalive sends keepalive@openssh.com (want reply) every interval. A
// SendRequest on a dead link blocks (holding x/crypto's global-request
// lock), so each runs in its own goroutine, raced against the next tick,
// and no new one starts while one is outstanding: every tick that finds the
// last request unanswered counts as a miss. After countMax misses in a row
// it reports on fail: a silent server is detected within
// interval*(countMax+1).
func (t *gosshTunnel) keepalive(interval time.Duration, countMax int, stop <-chan struct{}, fail chan<- error) {
	tick := time.NewTicker(interval)
	defer tick.Stop()
	var pending chan error
	defer func() {
		if pending != nil {
			<-stop
			<-pending // returns once run has closed the client
		}
	}()
	misses := 0
	for {
		select {
		case <-stop:
			return
		case err := <-pending:
			pending = nil
			if err == nil { // any reply, even "request failed", proves life
				misses = 0
				t.missed.Store(0)
			}
			continue
		case <-tick.C:
		}
		if pending != nil {
			misses++
			t.missed.Store(int32(misses))
			t.log.Debug("keepalive unanswered", "misses", misses, "max", countMax)
			if misses >= countMax {
				fail <- fmt.Errorf("hpcproxy: login node stopped answering keepalives after %d x %s", countMax, interval)
				return
			}
			continue
		}
		pending = make(chan error, 1)
		go func(p chan<- error) {
			_, _, err := t.client.SendRequest("keepalive@openssh.com", true, nil)
			p <- err
		}(pending)
	}
}

// DialContext opens a direct-tcpip channel to addr; the name in addr is
// resolved by the login node. ctx governs the channel open only; a channel
// that opens after ctx ended is closed. From the moment the tunnel starts
// going down (before Done fires), dials fail with an error wrapping
// ErrTunnelDown and the reason.
func (t *gosshTunnel) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	switch network {
	case "tcp", "tcp4", "tcp6":
	default:
		return nil, fmt.Errorf("hpcproxy: gossh tunnel cannot dial network %q", network)
	}
	// Checked here so that any other failure of client.Dial is the
	// connection's (see dialError).
	if _, port, err := net.SplitHostPort(addr); err != nil {
		return nil, fmt.Errorf("hpcproxy: dial %s: %w", addr, err)
	} else if _, err := strconv.ParseUint(port, 10, 16); err != nil {
		return nil, fmt.Errorf("hpcproxy: dial %s: bad port", addr)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	select {
	case <-t.dying:
		return nil, t.downError(nil)
	default:
	}
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		return nil, t.downError(nil)
	}
	t.dials.Add(1)
	t.mu.Unlock()

	type result struct {
		c   net.Conn
		err error
	}
	ch := make(chan result)
	// x/crypto's channel open cannot be abandoned: it runs in a goroutine
	// of its own (a kept one, keptgo.go) so that ctx can end the wait.
	t.openers.goRun(func() {
		defer t.dials.Done()
		c, err := openDirect(t.client, addr)
		select {
		case ch <- result{c, err}:
		case <-ctx.Done():
			if c != nil {
				_ = c.Close()
			}
		}
	})
	select {
	case r := <-ch:
		if r.err != nil {
			return nil, t.dialError(ctx, addr, r.err)
		}
		return r.c, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// dialError maps a failed channel open. The server's refusal is a
// *RemoteDialError. Any other failure is the SSH connection's: run notices
// that at once, so dialError waits (a second at most) for dying and
// reports the tunnel down, as it does for any failure once dying.
func (t *gosshTunnel) dialError(ctx context.Context, addr string, err error) error {
	var oce *ssh.OpenChannelError
	if !errors.As(err, &oce) {
		timer := time.NewTimer(time.Second)
		defer timer.Stop()
		select {
		case <-t.dying:
		case <-timer.C:
		case <-ctx.Done():
		}
	}
	select {
	case <-t.dying:
		return t.downError(err)
	default:
	}
	return convertOpenChannelError(addr, err)
}

// downError wraps ErrTunnelDown, the reason the tunnel went down (if not a
// plain Close) and err (if any). Call it only once dying is closed.
func (t *gosshTunnel) downError(err error) error {
	switch {
	case t.dyingErr != nil && err != nil:
		return fmt.Errorf("%w: %w: %w", ErrTunnelDown, t.dyingErr, err)
	case t.dyingErr != nil:
		return fmt.Errorf("%w: %w", ErrTunnelDown, t.dyingErr)
	case err != nil:
		return fmt.Errorf("%w: %w", ErrTunnelDown, err)
	}
	return ErrTunnelDown
}

// Close closes the SSH client (ending every connection dialled through it)
// and the jump hosts, and waits until all of the tunnel's goroutines are
// gone.
func (t *gosshTunnel) Close() error {
	t.stopOnce.Do(func() { close(t.stop) })
	<-t.done
	return nil
}

func (t *gosshTunnel) Done() <-chan struct{} { return t.done }

func (t *gosshTunnel) Err() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.err
}

// listenRemote implements remoteListener with tcpip-forward requests on
// the SSH connection.
func (t *gosshTunnel) listenRemote(ctx context.Context, network, addr string) (net.Listener, error) {
	return listenSSH(ctx, t.client, t.dying, network, addr)
}
