package hpcproxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"sync"
	"syscall"
	"time"
)

// Daemon is the long-lived proxy process: a [Server] in front of a
// [SupervisedTunnel], with its state in a private state file. Set the fields
// and call Run; the zero value of every optional field is a sensible
// default for the chosen Mode.
//
// # Modes
//
// Shared mode (a login node): listens on all interfaces, keeps its state
// in the user's data dir ([PidFilePath]) where compute nodes can read it
// over NFS, and requires credentials from every client. With no tunnel
// destination it relays directly ([MethodDirect]).
//
// Per-job mode (a compute node, inside a job): listens on 127.0.0.1, keeps
// its state in the node-local tmp dir ([LocalPidFilePath]), and admits only
// its owner: a client presenting the token, or a loopback client whose
// socket belongs to the same UID ([SameUserConn]). It lives until the job
// ends (see WatchPID) or it is stopped.
//
// # Lifecycle
//
// Run claims the state file (failing with an *[AlreadyRunningError] if a
// proxy already serves this scope), binds the listener, brings the tunnel
// up through the method chain, writes the state file and only then reports
// readiness on ReportFd. If any step fails it writes the error on ReportFd
// instead. Afterwards a dropped tunnel is re-established with backoff
// while the listener stays up; the state file records the status. Run
// returns when ctx ends, ExitFd reaches EOF, or WatchPID exits; it then
// stops accepting, closes live connections, closes the tunnel and removes
// the state file if it is still this daemon's.
type Daemon struct {
	// Mode is ModeShared or ModePerJob. If empty, ModePerJob.
	Mode Mode

	// Tunnel configures the tunnel to the login node. An empty
	// Tunnel.Destination in shared mode means relaying directly; in
	// per-job mode a destination is required.
	Tunnel TunnelConfig

	// Port optionally specifies the listening port. If zero, a free port
	// is chosen and recorded in the state file.
	Port int

	// ListenHost optionally overrides the listening address: "" (all
	// interfaces) in shared mode, "127.0.0.1" in per-job mode.
	ListenHost string

	// StatePath optionally specifies the state file. If empty,
	// PidFilePath() in shared mode and LocalPidFilePath() in per-job mode.
	StatePath string

	// Credentials optionally fixes the proxy credentials. If nil, a fresh
	// random token is generated; it is kept only in the 0600 state file.
	Credentials *ProxyCredentials

	// AllowNetworks optionally restricts clients to these networks (a
	// shared proxy's cluster networks). Loopback clients are always
	// allowed. If empty, any client that authenticates is served.
	AllowNetworks []netip.Prefix

	// ReportFd optionally names the pipe to the starting parent (see
	// StartDaemon). If <= 0, nothing is reported.
	ReportFd int

	// ExitFd optionally names the exit pipe: Run returns when it reaches
	// EOF. If <= 0, there is none.
	ExitFd int

	// WatchPID optionally names a process (a job script) whose exit ends
	// the daemon, so a per-job proxy ends with its job even where the
	// scheduler does not track detached processes. If zero, none.
	WatchPID int

	// MinBackoff, MaxBackoff and DialGrace optionally tune reconnection;
	// see SupervisorConfig.
	MinBackoff, MaxBackoff, DialGrace time.Duration

	// StatsInterval optionally specifies how often connection and byte
	// counters are written to the state file (when they changed) and
	// logged at Debug. If zero, 10 seconds.
	StatsInterval time.Duration

	// Logger optionally receives the daemon's log. If nil, nothing is
	// logged.
	Logger *slog.Logger

	// Forwards optionally lists local forwards (`ssh -L`): each listens in
	// the job and reaches a service on the login side through the tunnel.
	// They listen before readiness is reported; a bind failure is a
	// start-up error. In per-job mode they admit only the owner's
	// connections, like the proxy. While the daemon runs, [AddForward]
	// adds more through its control socket ([ControlSocketPath]).
	Forwards []ForwardSpec

	// Exposes optionally lists reverse forwards (`ssh -R`): the login
	// node's sshd listens and carries connections to a service in the job.
	// They need a method that can listen (gossh, controlmaster); sshd
	// refusing is a start-up error. After a reconnect each is re-requested
	// on the port it had. The state file records the bound addresses.
	// While the daemon runs, [AddExpose] adds more through its control
	// socket.
	Exposes []ExposeSpec

	// OnReady optionally is called with the listening address once the
	// daemon is ready (after ReportFd is told), for programs that run a
	// Daemon in process. If nil, nothing is called.
	OnReady func(addr net.Addr)
}

// RunDaemon starts a dual-protocol (SOCKS5, SOCKS4a, HTTP CONNECT and plain
// HTTP) proxy on port, in front of an SSH tunnel to sshDest, and serves
// until SIGTERM or SIGINT.
//
// localOnly=false is shared mode: all interfaces, the state file in the
// user's data dir, credentials required; sshDest "" relays directly.
// localOnly=true is per-job mode: 127.0.0.1, the state file in the node-local
// tmp dir, only the owner admitted.
//
// reportFd, if > 0, is the write end of a pipe to the parent: the daemon
// closes it (after "READY=1") once it listens, the tunnel is up and the state
// file is written, or writes an error message before closing it if start-up
// fails. An exit pipe named by HPCPROXY_EXIT_FD is honoured too. Logs go to
// stderr. See [Daemon] for the configurable form.
func RunDaemon(sshDest string, port int, localOnly bool, reportFd int) error {
	fds := InheritedDaemonFds()
	if reportFd <= 0 {
		reportFd = fds.Report
	}
	mode := ModeShared
	if localOnly {
		mode = ModePerJob
	}
	d := &Daemon{
		Mode:     mode,
		Tunnel:   TunnelConfig{Destination: sshDest},
		Port:     port,
		ReportFd: reportFd,
		ExitFd:   fds.Exit,
		Logger:   slog.New(slog.NewTextHandler(os.Stderr, nil)),
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	return d.Run(ctx)
}

// Run runs the daemon until ctx ends (or ExitFd, or WatchPID); see [Daemon].
// It returns nil after a requested stop, and the start-up error (also
// written to ReportFd) when it could not start.
func (d *Daemon) Run(ctx context.Context) error {
	log := d.Logger
	if log == nil {
		log = discardLogger
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	ready, err := d.start(ctx, log)
	if err != nil {
		if rerr := ReportError(d.ReportFd, err); rerr != nil {
			log.Warn("could not report start-up error to parent", "err", rerr)
		}
		return err
	}
	defer ready.shutdown(log)
	if err := ReportReady(d.ReportFd); err != nil {
		log.Warn("could not report readiness to parent", "err", err)
	}
	log.Info("proxy ready", "addr", ready.ln.Addr(), "mode", d.mode(), "method", ready.sup.State().Method,
		"state", ready.claim.Path())
	if d.OnReady != nil {
		d.OnReady(ready.ln.Addr())
	}

	exitCh, err := WatchExitFd(ctx, d.ExitFd)
	if err != nil {
		log.Warn("exit fd not watched", "err", err)
		exitCh = nil
	}
	var pidCh <-chan struct{}
	if d.WatchPID > 0 {
		pidCh = WatchPID(ctx, d.WatchPID, 0)
	}
	interval := d.StatsInterval
	if interval <= 0 {
		interval = 10 * time.Second
	}
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			log.Info("stopping: signalled")
			return nil
		case <-exitCh:
			log.Info("stopping: exit pipe closed")
			return nil
		case <-pidCh:
			log.Info("stopping: watched process exited", "pid", d.WatchPID)
			return nil
		case err := <-ready.serveErr:
			log.Error("listener failed", "err", err)
			return fmt.Errorf("hpcproxy: listener failed: %w", err)
		case <-tick.C:
			ready.refreshStats(log, false)
		case <-ready.rebound:
			ready.refreshStats(log, true)
		}
	}
}

func (d *Daemon) mode() Mode {
	if d.Mode == "" {
		return ModePerJob
	}
	return d.Mode
}

// running is a started daemon's parts.
type running struct {
	claim    *StateClaim
	ln       net.Listener
	sup      *SupervisedTunnel
	srv      *Server
	serveErr chan error
	serveWG  sync.WaitGroup

	mu        sync.Mutex // serialises state-file writes
	lastStats ServerStats
	lastFwd   []ForwardInfo

	locals   []*LocalForward
	reverses []*ReverseForward
	rebound  chan struct{} // a reverse forward was (re)bound
	log      *slog.Logger

	fmu sync.Mutex     // guards locals and reverses: the control socket adds to them
	ctl *controlServer // the control socket (daemonctl.go), if it listens
}

// start claims the state file, listens, brings the tunnel up and starts
// serving. On error everything it did is undone.
func (d *Daemon) start(ctx context.Context, log *slog.Logger) (_ *running, err error) {
	mode := d.mode()
	if mode != ModeShared && mode != ModePerJob {
		return nil, fmt.Errorf("hpcproxy: unknown daemon mode %q", mode)
	}
	tcfg := d.Tunnel
	if tcfg.Logger == nil {
		tcfg.Logger = log
	}
	if tcfg.Destination == "" {
		if mode == ModePerJob {
			return nil, fmt.Errorf("hpcproxy: per-job mode needs a login node to tunnel through: %w", ErrNoViaHost)
		}
		tcfg.Methods = []Method{MethodDirect}
	}
	statePath := d.StatePath
	if statePath == "" {
		statePath = PidFilePath()
		if mode == ModePerJob {
			statePath = LocalPidFilePath()
		}
	}
	creds := d.Credentials
	if creds == nil {
		c, err := NewProxyCredentials()
		if err != nil {
			return nil, err
		}
		creds = &c
	}
	job := DetectJob()
	initial := ProxyState{
		Via:         tcfg.Destination,
		Port:        d.Port,
		Mode:        mode,
		Credentials: creds,
		LogFile:     LogFilePath(statePath),
	}
	if job.InJob {
		initial.JobID, initial.Scheduler = job.JobID, string(job.Scheduler)
	}
	claim, err := ClaimStateFile(statePath, initial)
	if err != nil {
		return nil, err
	}
	r := &running{claim: claim, serveErr: make(chan error, 1), log: log, rebound: make(chan struct{}, 1)}
	defer func() {
		if err != nil {
			r.shutdown(log)
		}
	}()

	host := d.ListenHost
	if host == "" && mode == ModePerJob {
		host = "127.0.0.1"
	}
	r.ln, err = net.Listen("tcp", net.JoinHostPort(host, strconv.Itoa(d.Port)))
	if err != nil {
		return nil, fmt.Errorf("hpcproxy: listen: %w", err)
	}
	port := r.ln.Addr().(*net.TCPAddr).Port

	r.sup, err = SuperviseTunnel(ctx, SupervisorConfig{
		Tunnel:     tcfg,
		MinBackoff: d.MinBackoff,
		MaxBackoff: d.MaxBackoff,
		DialGrace:  d.DialGrace,
		OnChange:   func(st TunnelState, _ *Tunnel) { r.recordTunnel(st, log) },
	})
	if err != nil {
		return nil, err
	}

	r.srv = &Server{
		Dial:        r.sup.Dial,
		Credentials: map[string]string{creds.User: creds.Token},
		Logger:      log,
	}
	if mode == ModePerJob {
		r.srv.TrustConn = SameUserConn
	}
	if len(d.AllowNetworks) > 0 {
		r.srv.AllowClient = allowNetworks(d.AllowNetworks)
	}

	if err := r.startForwards(ctx, d, mode); err != nil {
		return nil, err
	}

	ts := r.sup.State()
	if err := r.update(func(st *ProxyState) {
		st.Port = port
		st.Method, st.Status, st.Reconnects = ts.Method.String(), StatusUp, ts.Reconnects
	}); err != nil {
		return nil, err
	}
	r.serveWG.Add(1)
	go func() {
		defer r.serveWG.Done()
		if err := r.srv.Serve(r.ln); err != nil && !errors.Is(err, ErrServerClosed) {
			r.serveErr <- err
		}
	}()
	return r, nil
}

// startForwards starts the daemon's local and reverse forwards, and the
// control socket through which more can be added while it runs.
func (r *running) startForwards(ctx context.Context, d *Daemon, mode Mode) error {
	for _, fs := range d.Forwards {
		if _, err := r.addLocal(fs, mode); err != nil {
			return err
		}
	}
	for _, es := range d.Exposes {
		if _, err := r.addExpose(ctx, es); err != nil {
			return err
		}
	}
	r.startControl(mode)
	return nil
}

// forwardInfos snapshots every forward.
func (r *running) forwardInfos() []ForwardInfo {
	r.fmu.Lock()
	defer r.fmu.Unlock()
	return r.forwardInfosLocked()
}

// recordTunnel writes a tunnel state change to the state file.
func (r *running) recordTunnel(ts TunnelState, log *slog.Logger) {
	if ts.Status != TunnelUp && ts.Status != TunnelReconnecting {
		return // closed: the state file is about to go
	}
	err := r.update(func(st *ProxyState) {
		if ts.Status == TunnelUp {
			st.Status, st.LastError = StatusUp, ""
		} else {
			st.Status = StatusReconnecting
			if ts.LastError != nil {
				st.LastError = ts.LastError.Error()
			}
		}
		st.Method, st.Reconnects = ts.Method.String(), ts.Reconnects
	})
	if err != nil {
		log.Warn("state file not updated", "err", err)
	}
}

// refreshStats writes the server's and the forwards' counters to the
// state file when they changed since the last write (or when force).
func (r *running) refreshStats(log *slog.Logger, force bool) {
	s := r.srv.Stats()
	fwd := r.forwardInfos()
	r.mu.Lock()
	same := s == r.lastStats && slices.Equal(fwd, r.lastFwd)
	r.mu.Unlock()
	if same && !force {
		return
	}
	log.Debug("stats", "active", s.Active, "total", s.Total, "bytes_in", s.BytesIn, "bytes_out", s.BytesOut)
	if err := r.update(func(*ProxyState) {}); err != nil {
		log.Warn("state file not updated", "err", err)
	}
}

// update rewrites the state file: the current state changed by mutate,
// with the current counters. Reading, changing and writing happen under one
// lock, so the supervisor's status changes and the stats refresh cannot
// overwrite each other.
func (r *running) update(mutate func(*ProxyState)) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	st := r.claim.State()
	mutate(&st)
	if r.srv != nil {
		s := r.srv.Stats()
		r.lastStats = s
		st.Stats = &DaemonStats{
			Active: s.Active, Total: s.Total, BytesIn: s.BytesIn, BytesOut: s.BytesOut,
			FailedHandshakes: s.FailedHandshakes, Updated: time.Now().UTC(),
		}
	}
	r.lastFwd = r.forwardInfos()
	st.Forwards = r.lastFwd
	return r.claim.Update(st)
}

// shutdown stops serving, closes connections and the tunnel, and removes
// the state file if it is still ours.
func (r *running) shutdown(log *slog.Logger) {
	r.stopControl() // no forward is added from here on
	for _, f := range r.reverses {
		if err := f.Close(); err != nil {
			log.Debug("reverse forward close", "err", err)
		}
	}
	for _, f := range r.locals {
		_ = f.Close()
	}
	if r.srv != nil {
		_ = r.srv.Close()
	} else if r.ln != nil {
		_ = r.ln.Close()
	}
	r.serveWG.Wait()
	if r.sup != nil {
		_ = r.sup.Close()
	}
	if err := r.claim.Release(); err != nil {
		log.Warn("state file not released", "err", err)
	}
}

// allowNetworks returns an AllowClient hook admitting loopback and the
// given networks.
func allowNetworks(nets []netip.Prefix) func(net.Addr) bool {
	return func(a net.Addr) bool {
		ta, ok := a.(*net.TCPAddr)
		if !ok {
			return a == nil // unnamed unix-socket peers are local
		}
		ip, ok := netip.AddrFromSlice(ta.IP)
		if !ok {
			return false
		}
		ip = ip.Unmap()
		if ip.IsLoopback() {
			return true
		}
		for _, p := range nets {
			if p.Contains(ip) {
				return true
			}
		}
		return false
	}
}
