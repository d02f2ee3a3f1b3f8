package hpcproxy

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"time"

	"golang.org/x/crypto/ssh"
)

// Method is a way of reaching the login node. Methods are tried in the order
// of [TunnelConfig.Methods]; the first that works carries the tunnel.
//
// Method implements [flag.Value], so a command line can pick one:
//
//	var m hpcproxy.Method
//	flag.Var(&m, "method", "tunnel method")
type Method int

// The tunnel methods, in the default order of the fallback chain.
const (
	// MethodGoSSH runs an SSH client in process (golang.org/x/crypto/ssh)
	// and opens one direct-tcpip channel per connection. Non-interactive
	// auth only: ssh-agent, key files, OpenSSH certificates.
	MethodGoSSH Method = iota + 1
	// MethodControlMaster starts (or attaches to) an OpenSSH ControlMaster
	// and asks it for one stdio forward per connection (as `ssh -W` does
	// through a master), whose bytes the relay splices; past 4096 open
	// forwards, and to learn why a destination refused, it opens channels
	// over the control socket in mux proxy mode instead
	// ([golang.org/x/crypto/ssh.NewControlClientConn]). OpenSSH does all of
	// the authentication, so hostbased (ssh-keysign), GSSAPI, MFA done
	// earlier in a persistent master, ProxyJump and the user's ssh_config
	// all work. As with `ssh -W`, once a destination half-closes its side
	// of a stdio forward, the master stops sending it what the client
	// sends.
	//
	// It attaches to the user's own live master (ssh_config's ControlPath)
	// only when `ssh -G` shows that ssh_config (with SSHOptions) leaves host
	// key checking on for the destination: a master started under
	// StrictHostKeyChecking=no may sit on an unverified host key. Otherwise
	// it starts its own master, with hpcproxy's host key checking.
	MethodControlMaster
	// MethodSOCKSUnix runs `ssh -N -D /path/sock` (OpenSSH >= 6.7) and
	// speaks SOCKS5 to it over the unix socket.
	MethodSOCKSUnix
	// MethodSOCKSTCP would run `ssh -N -D 127.0.0.1:PORT`, for OpenSSH
	// older than 6.7. It is always refused, with an error wrapping
	// [ErrUnsafeMethod]: ssh's SOCKS server has no authentication, and a
	// loopback TCP port is open to every user of the node (and listed by
	// ss and ps), so any of them could ride the owner's tunnel. It is not
	// in DefaultMethods; an OpenSSH older than 6.7 falls through to
	// MethodExec. The name stays so that a command line naming it gets
	// that explanation rather than "unknown method".
	MethodSOCKSTCP
	// MethodExec runs `ssh -W host:port` once per connection: the slow last
	// resort, one ssh process and one SSH handshake per connection. Like
	// MethodControlMaster, it hands off to the user's live ControlMaster
	// only when ssh_config leaves host key checking on for the destination
	// (otherwise it runs ssh with ControlPath=none).
	MethodExec
	// MethodDirect dials with a [net.Dialer]: for a login node that relays
	// its own traffic. It involves no SSH at all.
	MethodDirect
)

var methodNames = map[Method]string{
	MethodGoSSH:         "gossh",
	MethodControlMaster: "controlmaster",
	MethodSOCKSUnix:     "socks-unix",
	MethodSOCKSTCP:      "socks-tcp",
	MethodExec:          "exec",
	MethodDirect:        "direct",
}

// Method, Methods and HostKeyPolicy are command-line flags.
var (
	_ flag.Value = (*Method)(nil)
	_ flag.Value = (*Methods)(nil)
	_ flag.Value = (*HostKeyPolicy)(nil)
)

// DefaultMethods is the fallback chain used when [TunnelConfig.Methods] is
// empty. MethodDirect is not in it: relaying without a tunnel is a choice
// the caller makes explicitly. Nor is MethodSOCKSTCP, which is refused.
var DefaultMethods = []Method{MethodGoSSH, MethodControlMaster, MethodSOCKSUnix, MethodExec}

// ErrUnsafeMethod is wrapped by the error of a tunnel method that would
// open a listener other users of the node could use ([MethodSOCKSTCP]).
var ErrUnsafeMethod = errors.New("hpcproxy: tunnel method would listen where other users can connect")

// String returns the method's name as [Method.Set] accepts it.
func (m Method) String() string {
	if s, ok := methodNames[m]; ok {
		return s
	}
	return fmt.Sprintf("Method(%d)", int(m))
}

// Set parses a method name ("gossh", "controlmaster", "socks-unix",
// "socks-tcp", "exec", "direct"); it implements [flag.Value].
func (m *Method) Set(s string) error {
	v, err := ParseMethod(s)
	if err != nil {
		return err
	}
	*m = v
	return nil
}

// ParseMethod returns the Method named s. Matching ignores case.
func ParseMethod(s string) (Method, error) {
	for m, name := range methodNames {
		if strings.EqualFold(s, name) {
			return m, nil
		}
	}
	return 0, fmt.Errorf("hpcproxy: unknown tunnel method %q (want one of %s)", s, methodList())
}

func methodList() string {
	names := make([]string, 0, len(methodNames))
	for m := MethodGoSSH; m <= MethodDirect; m++ {
		names = append(names, m.String())
	}
	return strings.Join(names, ", ")
}

// Methods is a list of tunnel methods; it implements [flag.Value] as a
// comma-separated list ("gossh,controlmaster").
type Methods []Method

// String returns the methods as a comma-separated list.
func (ms Methods) String() string {
	names := make([]string, len(ms))
	for i, m := range ms {
		names[i] = m.String()
	}
	return strings.Join(names, ",")
}

// Set parses a comma-separated list of method names, replacing the list.
func (ms *Methods) Set(s string) error {
	var out Methods
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		m, err := ParseMethod(f)
		if err != nil {
			return err
		}
		out = append(out, m)
	}
	if len(out) == 0 {
		return errors.New("hpcproxy: empty tunnel method list")
	}
	*ms = out
	return nil
}

// HostKeyPolicy says what to do with a host key that known_hosts does not
// vouch for. Keys are always checked; no policy ignores them.
type HostKeyPolicy int

const (
	// HostKeyStrict refuses unknown hosts and changed keys (OpenSSH's
	// StrictHostKeyChecking=yes). It is the zero value.
	HostKeyStrict HostKeyPolicy = iota
	// HostKeyAcceptNew records the key of a host seen for the first time in
	// the user's known_hosts and refuses changed keys (OpenSSH's
	// StrictHostKeyChecking=accept-new).
	HostKeyAcceptNew
)

// String returns "strict" or "accept-new".
func (p HostKeyPolicy) String() string {
	switch p {
	case HostKeyStrict:
		return "strict"
	case HostKeyAcceptNew:
		return "accept-new"
	}
	return fmt.Sprintf("HostKeyPolicy(%d)", int(p))
}

// Set parses "strict" (or "yes") and "accept-new"; it implements
// [flag.Value].
func (p *HostKeyPolicy) Set(s string) error {
	switch strings.ToLower(s) {
	case "strict", "yes":
		*p = HostKeyStrict
	case "accept-new":
		*p = HostKeyAcceptNew
	default:
		return fmt.Errorf("hpcproxy: unknown host key policy %q (want strict or accept-new)", s)
	}
	return nil
}

// TunnelConfig configures [EstablishTunnel]. Only Destination is required
// (and not even that for MethodDirect); every other field has a default.
type TunnelConfig struct {
	// Destination is the login node: "host", "user@host", "host:port",
	// "user@host:port", "[v6addr]:port" or an ssh_config Host alias.
	Destination string

	// Methods optionally specifies the methods to try, in order. If empty,
	// DefaultMethods is used.
	Methods []Method

	// ConnectTimeout optionally bounds the setup of one method: resolving
	// the destination's configuration (`ssh -G`, which runs ssh_config's
	// Match exec commands), TCP connect, SSH handshake and authentication,
	// or the start of an ssh child process. If zero, the destination's
	// ConnectTimeout from ssh_config is used, and 30 seconds if that is
	// unset too.
	ConnectTimeout time.Duration

	// KeepaliveInterval optionally specifies how often an idle tunnel is
	// probed (keepalive@openssh.com, or ServerAliveInterval for ssh child
	// processes). If zero, ssh_config's ServerAliveInterval is used, and
	// 60 seconds if that is unset. Negative disables keepalives.
	KeepaliveInterval time.Duration

	// KeepaliveCountMax optionally specifies how many probes in a row may go
	// unanswered before the tunnel is declared dead. If zero,
	// ssh_config's ServerAliveCountMax is used (OpenSSH's default is 3).
	KeepaliveCountMax int

	// HostKeyPolicy optionally relaxes what happens to an unknown host.
	// The zero value, HostKeyStrict, refuses it.
	HostKeyPolicy HostKeyPolicy

	// SSHConfigFile optionally specifies an ssh_config file used instead of
	// ~/.ssh/config (like `ssh -F`). Use "none" to read no user config.
	SSHConfigFile string

	// SSHOptions optionally adds ssh_config options ("Key=Value") given to
	// every ssh invocation as -o and applied to the in-process client's
	// resolved configuration, taking precedence over the config files.
	SSHOptions []string

	// SSHBinary optionally specifies the ssh client program. If empty, "ssh"
	// is looked up in PATH.
	SSHBinary string

	// RuntimeDir optionally specifies a directory for control, SOCKS and
	// reverse-forward sockets. It must be owned by the user and not
	// accessible to others, and short enough for unix socket paths (about
	// 60 bytes). If empty, a private directory is created in the node-local
	// tmp dir (see [EnvTmpDir]; /tmp where that path would be too long) and
	// removed when the tunnel closes. A [Daemon] sets it to a directory
	// beside its state file.
	RuntimeDir string

	// Destinations optionally lists several login nodes, used instead of
	// Destination (which may also hold them, separated by commas: the
	// syntax of --via login1,login2). Each node tries them in its own
	// order, by rendezvous hashing of NodeName: the nodes of a cluster
	// spread over the login nodes, each keeps its login node from start to
	// start, and removing one login node moves only the nodes that
	// preferred it. The method chain is tried on each login node in turn,
	// and a [SupervisedTunnel] whose login node drops reconnects to the
	// next one in the order.
	Destinations []string

	// NodeName optionally names this node for the spreading over
	// Destinations. If empty, the host name up to its first dot.
	NodeName string

	// StartRetryTimeout optionally bounds how long a start retries
	// connections that a login node drops before its SSH banner (sshd's
	// MaxStartups, when a job array starts many tunnels at once). Retries
	// wait a random time up to 200ms, doubling to at most 8s (full
	// jitter), so that many starting tunnels spread out. Other failures
	// (authentication refused, a host key mismatch, nothing listening) are
	// never retried. If zero, DefaultStartRetryTimeout (90s); negative
	// disables the retries.
	StartRetryTimeout time.Duration

	// Connections optionally specifies how many SSH connections carry the
	// tunnel at least, for the methods that multiplex channels over one
	// connection (gossh, controlmaster; the others ignore it). Each
	// connection is served by its own sshd process on the login node. If
	// zero or one, one connection.
	//
	// Beyond it the tunnel grows a pool of connections with the number of
	// open channels: when every connection carries ChannelsPerConnection
	// channels or more, it opens one more, up to MaxConnections, and closes
	// the added ones again once they have carried no channel for a while.
	// New channels go to the connection that carries the fewest. If one of
	// the first Connections drops, the whole tunnel is down (Done fires);
	// an added one that drops is just removed. A controlmaster tunnel that
	// attaches to the user's own master shares that one connection.
	Connections int

	// MaxConnections optionally caps the pool of SSH connections (see
	// Connections): the most sshd processes one tunnel keeps busy on the
	// login node. If zero, DefaultMaxConnections; it is never below
	// Connections. 1 turns growing off.
	MaxConnections int

	// ChannelsPerConnection optionally specifies how many open channels
	// one SSH connection carries before the pool grows. If zero,
	// DefaultChannelsPerConnection, the knee measured in BENCHMARKS.md.
	ChannelsPerConnection int

	// Logger optionally receives the tunnel's diagnostics. If nil, nothing
	// is logged.
	Logger *slog.Logger

	// ordered says that the login nodes are already in the order to try
	// (a supervisor's reconnect); poolIdle replaces defaultPoolIdle in
	// tests.
	ordered  bool
	poolIdle time.Duration
}

// ErrTunnelDown is returned by dials while the tunnel is down (closed, or
// reconnecting in a daemon). Proxy servers answer it with a general SOCKS
// failure or HTTP 503.
var ErrTunnelDown = errors.New("hpcproxy: tunnel is down")

// MethodError records why one method of the fallback chain failed.
type MethodError struct {
	Method Method
	Err    error
}

func (e *MethodError) Error() string { return e.Method.String() + ": " + e.Err.Error() }
func (e *MethodError) Unwrap() error { return e.Err }

// TunnelError is returned by [EstablishTunnel] when every method failed. It
// says for each method why.
type TunnelError struct {
	Destination string
	Attempts    []*MethodError
}

func (e *TunnelError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "hpcproxy: no tunnel method reached %q", e.Destination)
	for _, a := range e.Attempts {
		b.WriteString("\n  ")
		b.WriteString(a.Error())
	}
	return b.String()
}

// Unwrap returns the per-method errors, so errors.Is and errors.As look
// into each of them.
func (e *TunnelError) Unwrap() []error {
	errs := make([]error, len(e.Attempts))
	for i, a := range e.Attempts {
		errs[i] = a
	}
	return errs
}

// tunnelImpl is what each method provides.
type tunnelImpl interface {
	// DialContext opens a connection to addr through the tunnel. ctx
	// governs only the setup.
	DialContext(ctx context.Context, network, addr string) (net.Conn, error)
	// Close tears the tunnel down (killing child processes, closing the SSH
	// client) and makes Done fire.
	Close() error
	// Done is closed when the tunnel can no longer carry new connections.
	Done() <-chan struct{}
	// Err says why Done fired; nil while the tunnel is up and after a
	// plain Close.
	Err() error
}

// Tunnel is an established path to the login node. Its Dial method is a
// [DialFunc]. A Tunnel is safe for concurrent use.
type Tunnel struct {
	method Method
	dest   string // the login node it reached
	impl   tunnelImpl
}

var _ ContextDialer = (*Tunnel)(nil)

// ContextDialer is implemented by anything with a DialContext method, such
// as [net.Dialer], [golang.org/x/net/proxy.ContextDialer] and [Tunnel].
type ContextDialer interface {
	DialContext(ctx context.Context, network, addr string) (net.Conn, error)
}

// Dial opens a connection to addr ("host:port"; names are resolved on the
// far side) through the tunnel. ctx governs the setup only: once Dial has
// returned a conn, cancelling ctx does not affect it. After the tunnel is
// down, Dial fails with an error that wraps ErrTunnelDown.
func (t *Tunnel) Dial(ctx context.Context, network, addr string) (net.Conn, error) {
	select {
	case <-t.impl.Done():
		if err := t.impl.Err(); err != nil {
			return nil, fmt.Errorf("%w: %w", ErrTunnelDown, err)
		}
		return nil, ErrTunnelDown
	default:
	}
	return t.impl.DialContext(ctx, network, addr)
}

// DialContext is Dial; it makes Tunnel a [ContextDialer].
func (t *Tunnel) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	return t.Dial(ctx, network, addr)
}

// Close tears the tunnel down. For the SSH methods that multiplex channels
// (gossh, controlmaster) connections already dialled through it end with it;
// with the others they may outlive it. Close is idempotent.
func (t *Tunnel) Close() error { return t.impl.Close() }

// Done is closed when the tunnel can no longer carry new connections,
// because it was closed or because the link to the login node dropped.
func (t *Tunnel) Done() <-chan struct{} { return t.impl.Done() }

// Err reports why Done fired. It is nil while the tunnel is up and after a
// plain Close.
func (t *Tunnel) Err() error { return t.impl.Err() }

// Method reports which method carries the tunnel.
func (t *Tunnel) Method() Method { return t.method }

// Unresponsive reports whether the login node has let a keepalive go
// unanswered for a whole keepalive interval, and has not answered one
// since: the link may be hung (sshd stopped, a network partition) though
// not yet given up for dead (KeepaliveCountMax). Only MethodGoSSH, on one
// connection, can tell; the ssh children of the other methods keep their
// keepalives to themselves (ServerAliveInterval), so they report false.
func (t *Tunnel) Unresponsive() bool {
	h, ok := t.impl.(interface{ unresponsive() bool })
	return ok && h.unresponsive()
}

// connections counts the SSH connections the tunnel holds open: a pool's
// members, none for MethodDirect, else one.
func (t *Tunnel) connections() int {
	switch impl := t.impl.(type) {
	case *poolTunnel:
		return impl.size()
	}
	if t.method == MethodDirect {
		return 0
	}
	return 1
}

// Destination reports the login node the tunnel reached: one of
// TunnelConfig's Destinations, or its Destination.
func (t *Tunnel) Destination() string { return t.dest }

// EstablishTunnel tries cfg.Methods in order (DefaultMethods if empty) on
// each login node in turn (see TunnelConfig.Destinations) and returns the
// first tunnel that comes up. Starts that the login node drops before its
// SSH banner are retried until the start deadline
// (TunnelConfig.StartRetryTimeout). ctx bounds the whole attempt; each
// method is further bounded by the connect timeout. If every method fails,
// the error is a *[TunnelError] naming each method's reason (one for each
// login node, joined, if there are several).
func EstablishTunnel(ctx context.Context, cfg TunnelConfig) (*Tunnel, error) {
	return establishChain(ctx, cfg, startMethod)
}

// establishChain is EstablishTunnel with the start of one method replaced,
// for tests of the chain.
func establishChain(ctx context.Context, cfg TunnelConfig, start startFunc) (*Tunnel, error) {
	order := cfg.logins()
	if len(order) > 1 && !cfg.ordered {
		order = OrderLogins(order, cfg.nodeName())
	}
	if len(order) == 0 {
		order = []string{""} // MethodDirect needs none
	}
	return establishAcross(ctx, cfg, order, start)
}

func startMethod(ctx context.Context, cfg *TunnelConfig, m Method) (tunnelImpl, error) {
	switch m {
	case MethodDirect:
		return newDirectTunnel(), nil
	case MethodGoSSH:
		return startGoSSH(ctx, cfg)
	case MethodControlMaster:
		return startControlMaster(ctx, cfg)
	case MethodSOCKSUnix:
		return startSOCKSTunnel(ctx, cfg)
	case MethodSOCKSTCP:
		return nil, fmt.Errorf("%w: `ssh -D 127.0.0.1:PORT` has no authentication, so every user of this node could use the port; "+
			"use socks-unix (OpenSSH >= 6.7), exec or another method", ErrUnsafeMethod)
	case MethodExec:
		return startExecTunnel(ctx, cfg)
	}
	return nil, fmt.Errorf("hpcproxy: unknown tunnel method %d", int(m))
}

func (cfg *TunnelConfig) logger() *slog.Logger {
	if cfg.Logger != nil {
		return cfg.Logger
	}
	return discardLogger
}

var discardLogger = slog.New(slog.DiscardHandler)

// directTunnel dials with a net.Dialer: a login node relaying itself.
type directTunnel struct {
	d    net.Dialer
	once sync.Once
	done chan struct{}
}

func newDirectTunnel() *directTunnel { return &directTunnel{done: make(chan struct{})} }

func (t *directTunnel) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	return t.d.DialContext(ctx, network, addr)
}

func (t *directTunnel) Close() error {
	t.once.Do(func() { close(t.done) })
	return nil
}

func (t *directTunnel) Done() <-chan struct{} { return t.done }
func (t *directTunnel) Err() error            { return nil }

// ErrReverseUnsupported is wrapped by [Tunnel.Listen] when the tunnel's
// method cannot ask the login node to listen: only the methods that hold an
// SSH connection in process (gossh, controlmaster) can send the
// tcpip-forward request; the others talk to an ssh child through SOCKS or
// stdio, or involve no SSH at all.
var ErrReverseUnsupported = errors.New("hpcproxy: tunnel method cannot listen on the login node")

// remoteListener is implemented by the tunnels that can ask sshd to
// listen (gossh, controlmaster). ctx governs the request only.
type remoteListener interface {
	listenRemote(ctx context.Context, network, addr string) (net.Listener, error)
}

// Listen asks the login node's sshd to listen on addr and returns a
// listener whose Accept yields the connections it receives, as `ssh -R`
// does. network is "tcp" (addr "host:port"; port 0 lets sshd choose, and
// Addr reports the port it chose) or "unix" (addr a socket path on the
// login node, created by sshd with its StreamLocalBindMask, owner-only by
// default; it needs AllowStreamLocalForwarding). sshd binds "127.0.0.1"
// and "localhost" on the loopback interface; other hosts only where its
// GatewayPorts allows.
//
// ctx governs the request only. A refusal by sshd (AllowTcpForwarding,
// PermitListen, a port in use) wraps ErrProhibited; a method that cannot
// listen at all (socks-unix, exec, direct) fails with an error
// wrapping ErrReverseUnsupported. The listener ends with the tunnel:
// Accept then fails. Closing it cancels the remote listener.
func (t *Tunnel) Listen(ctx context.Context, network, addr string) (net.Listener, error) {
	rl, ok := t.impl.(remoteListener)
	if !ok {
		return nil, fmt.Errorf("%w: %s (use gossh or controlmaster)", ErrReverseUnsupported, t.method)
	}
	select {
	case <-t.impl.Done():
		if err := t.impl.Err(); err != nil {
			return nil, fmt.Errorf("%w: %w", ErrTunnelDown, err)
		}
		return nil, ErrTunnelDown
	default:
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	return rl.listenRemote(ctx, network, addr)
}

// listenSSH sends tcpip-forward (or streamlocal-forward@openssh.com) on
// client. A request on a dead link blocks until the client is closed, so it
// is raced against ctx and done (closed when the tunnel goes down), and a
// listener that comes late is closed.
func listenSSH(ctx context.Context, client *ssh.Client, done <-chan struct{}, network, addr string) (net.Listener, error) {
	type result struct {
		ln  net.Listener
		err error
	}
	ch := make(chan result, 1)
	go func() {
		ln, err := client.Listen(network, addr)
		ch <- result{ln, err}
	}()
	closeLate := func() {
		go func() {
			if r := <-ch; r.ln != nil {
				_ = r.ln.Close()
			}
		}()
	}
	var r result
	select {
	case r = <-ch:
	case <-ctx.Done():
		closeLate()
		return nil, fmt.Errorf("hpcproxy: listen on the login node at %s: %w", addr, ctx.Err())
	case <-done:
		closeLate()
		return nil, fmt.Errorf("%w: listen on %s", ErrTunnelDown, addr)
	}
	if r.err != nil {
		select {
		case <-done:
			return nil, fmt.Errorf("%w: listen on %s: %w", ErrTunnelDown, addr, r.err)
		default:
		}
		if strings.Contains(r.err.Error(), "denied by peer") {
			// sshd answers every refusal the same way, a request failure
			// without a reason: forwarding disallowed, PermitListen, or
			// the address in use.
			return nil, fmt.Errorf("hpcproxy: login node refused to listen on %s (sshd's AllowTcpForwarding, "+
				"AllowStreamLocalForwarding or PermitListen, or the address is in use): %w: %w", addr, ErrProhibited, r.err)
		}
		return nil, fmt.Errorf("hpcproxy: listen on the login node at %s: %w", addr, r.err)
	}
	return r.ln, nil
}

// WaitTunnel returns t while it is up; afterwards an error wrapping
// ErrTunnelDown. It never waits.
func (t *Tunnel) WaitTunnel(ctx context.Context) (*Tunnel, error) {
	select {
	case <-t.impl.Done():
		return nil, ErrTunnelDown
	default:
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		return t, nil
	}
}
