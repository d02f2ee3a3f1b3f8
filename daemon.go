package hpcproxy

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hpcproxy/hpcproxy/internal/daemonproc"
	"github.com/hpcproxy/hpcproxy/internal/jobenv"
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
// socket belongs to the same UID (the kernel's socket tables say so). It
// lives until the job ends (see WatchPID) or it is stopped. Unless Private, it also serves its
// tunnel to the user's other jobs on the node, which attach to it
// ([Daemon.Attach]), and then lives until the last of those jobs has ended.
//
// # Sockets
//
// The ssh-based tunnel methods keep unix sockets (an OpenSSH control
// socket, `ssh -D`'s SOCKS socket, reverse forwards' sockets). Unless
// Tunnel.RuntimeDir says otherwise, the daemon keeps them in a private
// directory of its own (mode 0700), created at start, emptied of a killed
// predecessor's leftovers and removed at exit: in per-job mode beside the
// state file (proxy-JOBID.run for proxy-JOBID.json), in shared mode in
// the node-local tmp dir (the shared state dir is usually NFS), and in
// /tmp/hpcproxy-UID where either path would be too long for a unix
// socket. $TMPDIR counts only if it exists: a scheduler may pass it on
// from the submitting host although the node has no such directory.
//
// # Lifecycle
//
// Run claims the state file (failing with an *[AlreadyRunningError] if a
// proxy already serves this scope), binds the listener and records its
// port (status "starting"), brings the tunnel up through the method chain
// and starts the forwards, records status "up" and only then reports
// readiness on ReportFd. If any step fails it writes the error on ReportFd
// instead. Afterwards a dropped tunnel is re-established with backoff
// while the listener stays up; the state file records the status. Run
// returns when ctx ends, ExitFd reaches EOF, or WatchPID exits (during
// start-up too; on a node tunnel with other jobs attached, the last two
// end only its own job's proxy, and Run returns when the last job ends);
// it then stops accepting, closes live connections, closes the tunnel
// and removes the state file if it is still this daemon's.
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

	// AdvertiseHost optionally names the host clients should dial,
	// recorded in the state file (ProxyState.AdvertiseHost) for
	// FindActiveProxy and ProxyEnvList: for a shared proxy, the login
	// node's name or address on the cluster network when its host name
	// does not resolve (or resolves to another interface) on the compute
	// nodes. If empty, clients dial 127.0.0.1 for a per-job proxy and the
	// daemon's host name for a shared one.
	AdvertiseHost string

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
	// the example binaries' start). If <= 0, nothing is reported.
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

	// MaxProcs optionally sets how many threads may run the daemon's Go
	// code at once (runtime.GOMAXPROCS; Run sets it for the whole
	// process and restores it when it returns). If zero: 1 in per-job
	// mode, where the daemon shares the job's cores, and where one thread
	// carries a tunnel's streams with less CPU time than several handing
	// packets to each other (measured: a gossh download took 1.5 CPU
	// seconds per GB at 1, 2.2 at 2 on a 2-core node); Go's default
	// (every core) in shared mode. Negative, or a GOMAXPROCS environment
	// variable, leaves Go's setting alone.
	MaxProcs int

	// Handoff optionally says how connections through a controlmaster
	// tunnel are handed to the master after the proxy handshake
	// ([HandoffMode]). If zero, HandoffPipe, unless the environment
	// variable HPCPROXY_HANDOFF names another mode ("optimistic", "off").
	// HandoffOptimistic moves no bytes through the daemon but answers
	// every request with success, as `ssh -D` does: a destination that
	// cannot be reached closes the client's connection without a reason.
	Handoff HandoffMode

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

	// Private optionally keeps a per-job daemon's tunnel to its own job.
	// If false, a per-job daemon also serves its tunnel to the user's other
	// jobs on the node, on the abstract socket [NodeSocketName] (see
	// [Daemon.Attach]): Run fails at once with an error wrapping
	// [ErrNodeTunnelRunning] when another daemon serves that tunnel
	// already (attach to it instead), and once ready it runs until the
	// last job using the tunnel has ended, its own job being one of them:
	// ExitFd, WatchPID or a detach request end only its own job's proxy
	// while others are attached. Shared mode ignores it.
	Private bool

	// ListenerFd optionally names an inherited listening TCP socket on
	// loopback (made by the job's start) to serve instead of
	// binding one; Port is then ignored. StandbyFd optionally names the
	// write end of the job's stand-by pipe (see the package doc's "Node tunnel"): when the
	// daemon ends its own job's proxy it writes the exit line on it; when
	// it ends otherwise (a signal, or killed) the stand-by takes over. If
	// <= 0, none. Both are marked close-on-exec first thing.
	ListenerFd, StandbyFd int

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
	fds := daemonproc.InheritedFds()
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

// maxProcs returns the GOMAXPROCS Run sets, 0 for none.
func (d *Daemon) maxProcs() int {
	switch {
	case d.MaxProcs < 0 || os.Getenv("GOMAXPROCS") != "":
		return 0
	case d.MaxProcs > 0:
		return d.MaxProcs
	case d.Mode == ModeShared:
		return 0
	}
	return 1
}

// Run runs the daemon until ctx ends (or ExitFd, or WatchPID); see [Daemon].
// It returns nil after a requested stop, and the start-up error (also
// written to ReportFd) when it could not start.
//
// ReportFd and ExitFd are marked close-on-exec first thing, before any ssh
// child starts: a child holding a copy of the report pipe would keep the
// parent from seeing EOF, and one holding the exit pipe would keep the
// daemon from seeing it. The exit pipe and WatchPID are watched from the
// start too: a parent that gives up (or dies) while the tunnel is still
// being established stops the daemon at once, not after a fallback chain
// that can take minutes.
//
// Run raises the process's soft limit on open files to its hard limit,
// for itself and the ssh children it starts: each held connection costs
// descriptors, and a ControlMaster that inherited the usual 1024 would run
// out after a few hundred. Unless GOGC is set, it also runs the garbage
// collector at GOGC=400 while bytes stream through it (a tunnel allocates a
// buffer per SSH packet; at the default 100 a download cost 15% more CPU
// time), and back at 100 once they have stopped for a few seconds.
func (d *Daemon) Run(ctx context.Context) error {
	log := d.Logger
	if log == nil {
		log = discardLogger
	}
	for _, fd := range []int{d.ReportFd, d.ExitFd, d.ListenerFd, d.StandbyFd} {
		if fd > 0 {
			if err := daemonproc.PrepareFds(fd); err != nil {
				log.Warn("inherited fd unusable", "fd", fd, "err", err)
			}
		}
	}
	if n, err := raiseFileLimit(); err != nil {
		log.Debug("cannot raise the open-file limit", "limit", n, "err", err)
	}
	if n := d.maxProcs(); n > 0 {
		defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(n))
	}
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	stopOwn := func(cause error) { cancel(cause) }
	var hub *nodeHub
	if d.sharesNode() {
		hub = newNodeHub(d, NodeSocketName(os.Getuid(), d.Tunnel), log, cancel)
		defer hub.close() // on a failed start; after a good one, before the tunnel closes
		stopOwn = func(cause error) { hub.ownStop(cause) }
	}
	d.watchStops(ctx, stopOwn, log)
	if os.Getenv("GOGC") == "" {
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			tuneGC(ctx, 250*time.Millisecond)
		}()
		defer wg.Wait()
		defer cancel(nil) // runs before the Wait: ends tuneGC
	}

	ready, err := d.start(ctx, log, hub)
	if err != nil {
		if cause := context.Cause(ctx); errors.Is(cause, errStopRequested) {
			log.Info("stopping before ready: " + cause.Error())
			err = fmt.Errorf("hpcproxy: daemon stopped before it was ready: %w", cause)
			_ = daemonproc.ReportError(d.ReportFd, err) // the parent is most likely gone
			return nil
		}
		if rerr := daemonproc.ReportError(d.ReportFd, err); rerr != nil {
			log.Warn("could not report start-up error to parent", "err", rerr)
		}
		return err
	}
	defer func() {
		if hub != nil {
			hub.close()
		}
		ready.shutdown(log)
	}()
	var ownDown chan struct{}
	if hub != nil {
		hub.serve(ready)
		ownDown = hub.ownDown
	}
	if err := daemonproc.ReportReady(d.ReportFd); err != nil {
		log.Warn("could not report readiness to parent", "err", err)
	}
	log.Info("proxy ready", "addr", ready.ln.Addr(), "mode", d.mode(), "method", ready.sup.State().Method,
		"state", ready.claim.Path())
	if d.OnReady != nil {
		d.OnReady(ready.ln.Addr())
	}

	tick := time.NewTicker(d.statsInterval())
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			if cause := context.Cause(ctx); errors.Is(cause, errStopRequested) {
				log.Info("stopping: " + cause.Error())
			} else {
				// Not the job's end: its stand-by (and every attached
				// job's) takes over.
				log.Info("stopping: signalled")
				ready.handover.Store(true)
			}
			return nil
		case err := <-ready.serveErr:
			log.Error("listener failed", "err", err)
			return fmt.Errorf("hpcproxy: listener failed: %w", err)
		case <-ownDown:
			// Its own job is gone; the attached jobs keep the tunnel.
			ownDown = nil
			ready.shutdownFront(log)
			hub.ownDetached()
		case <-tick.C:
			if !ready.frontDown.Load() {
				ready.refreshStats(log, false)
			}
		case <-ready.rebound:
			if !ready.frontDown.Load() {
				ready.refreshStats(log, true)
			}
		}
	}
}

// errStopRequested is the cancel cause when the exit pipe closes or the
// watched process exits.
var errStopRequested = errors.New("stop requested")

// statsInterval returns StatsInterval or its default.
func (d *Daemon) statsInterval() time.Duration {
	if d.StatsInterval <= 0 {
		return 10 * time.Second
	}
	return d.StatsInterval
}

// sharesNode reports whether the daemon serves a node tunnel.
func (d *Daemon) sharesNode() bool {
	return d.mode() == ModePerJob && !d.Private && d.Tunnel.Destination != ""
}

// watchStops calls stop, with a cause wrapping errStopRequested, when
// ExitFd reaches EOF or WatchPID exits. The watches end with ctx.
func (d *Daemon) watchStops(ctx context.Context, stop func(error), log *slog.Logger) {
	var exitCh, pidCh <-chan struct{}
	if d.ExitFd > 0 {
		ch, err := daemonproc.WatchExitFd(ctx, d.ExitFd)
		if err != nil {
			log.Warn("exit fd not watched", "err", err)
		} else {
			exitCh = ch
		}
	}
	if d.WatchPID > 0 {
		pidCh = watchPID(ctx, d.WatchPID, 0)
	}
	if exitCh == nil && pidCh == nil {
		return
	}
	go func() {
		select {
		case <-ctx.Done():
		case <-exitCh:
			if ctx.Err() == nil {
				stop(fmt.Errorf("%w: exit pipe closed", errStopRequested))
			}
		case <-pidCh:
			if ctx.Err() == nil {
				stop(fmt.Errorf("%w: watched process %d exited", errStopRequested, d.WatchPID))
			}
		}
	}()
}

func (d *Daemon) mode() Mode {
	if d.Mode == "" {
		return ModePerJob
	}
	return d.Mode
}

// start claims the state file, listens, brings the tunnel up and starts
// serving. On error everything it did is undone.
func (d *Daemon) start(ctx context.Context, log *slog.Logger, hub *nodeHub) (_ *running, err error) {
	mode := d.mode()
	if mode != ModeShared && mode != ModePerJob {
		return nil, fmt.Errorf("hpcproxy: unknown daemon mode %q", mode)
	}
	tcfg := d.Tunnel
	if tcfg.Logger == nil {
		tcfg.Logger = log
	}
	logins := tcfg.logins()
	if len(logins) == 0 {
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
		c, err := newProxyCredentials()
		if err != nil {
			return nil, err
		}
		creds = &c
	}
	job := jobenv.Detect()
	initial := ProxyState{
		Via:           strings.Join(logins, ","),
		Port:          d.Port,
		Mode:          mode,
		AdvertiseHost: d.AdvertiseHost,
		Credentials:   creds,
		LogFile:       LogFilePath(statePath),
	}
	if job.InJob {
		initial.JobID, initial.Scheduler = job.JobID, string(job.Scheduler)
	}
	if hub != nil {
		initial.Node = &NodeTunnelInfo{Socket: hub.name}
	}
	r, err := newFront(statePath, initial, log)
	if err != nil {
		return nil, err
	}
	r.tcfg, r.hub = tcfg, hub
	defer func() {
		if err != nil {
			r.shutdown(log)
		}
	}()
	if hub != nil {
		// After the claim: a second start of this job is told that its
		// proxy runs; another job's, that the tunnel does.
		if err := hub.listen(); err != nil {
			return nil, err
		}
		r.onDetach = hub.ownStop
	}
	if len(logins) > 0 && tcfg.RuntimeDir == "" {
		dir := daemonRuntimeDir(mode, statePath)
		if err := prepareRuntimeDir(dir); err != nil {
			return nil, err
		}
		r.runDir, tcfg.RuntimeDir = dir, dir
	}

	host := d.ListenHost
	if host == "" && mode == ModePerJob {
		host = "127.0.0.1"
	}
	if d.ListenerFd > 0 {
		err = r.adopt(os.NewFile(uintptr(d.ListenerFd), "listener"))
	} else {
		err = r.listen(host, d.Port, mode)
	}
	if err != nil {
		return nil, err
	}

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
	r.handoff = d.Handoff
	if env := os.Getenv(envHandoff); d.Handoff == HandoffPipe && env != "" {
		if err := r.handoff.Set(env); err != nil {
			log.Warn("ignoring "+envHandoff, "err", err)
		}
	}
	r.serve(*creds, mode, d.AllowNetworks)
	if err := r.startForwards(ctx, d.Forwards, d.Exposes, mode); err != nil {
		return nil, err
	}
	if err := r.markReady(); err != nil {
		return nil, err
	}
	if d.StandbyFd > 0 {
		// Only now: a failed start leaves the stand-by to the starter.
		r.standby = os.NewFile(uintptr(d.StandbyFd), "standby")
	}
	return r, nil
}

// daemonRuntimeDir returns the private directory in which a daemon of
// mode with the state file statePath keeps its tunnel's sockets: in
// per-job mode the state file's name with ".run" for ".json" (beside it,
// node-local like the state file), in shared mode
// localStateDir()/shared-HASH.run (node-local, while the state file is
// usually on NFS), HASH naming the state file. Where that would be too
// long for unix socket paths (sun_path holds 108 bytes), it is
// /tmp/hpcproxy-UID/HASH.run.
func daemonRuntimeDir(mode Mode, statePath string) string {
	abs, err := filepath.Abs(statePath)
	if err != nil {
		abs = statePath
	}
	sum := sha256.Sum256([]byte(abs))
	hash := hex.EncodeToString(sum[:4])
	dir := strings.TrimSuffix(statePath, ".json") + ".run"
	if mode == ModeShared {
		dir = filepath.Join(localStateDir(), "shared-"+hash+".run")
	}
	if len(dir) > maxRuntimeDir {
		dir = filepath.Join(uidTmpDir("/tmp"), hash+".run")
	}
	return dir
}

// prepareRuntimeDir makes dir a fresh private directory in a private
// parent. The caller holds the state file's claim, so no daemon of the
// same scope runs: whatever is in dir was left by one that was killed.
func prepareRuntimeDir(dir string) error {
	if err := ensurePrivateDir(filepath.Dir(dir)); err != nil {
		return err
	}
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("hpcproxy: runtime dir: %w", err)
	}
	return ensurePrivateDir(dir)
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
