package hpcproxy

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/hpcproxy/hpcproxy/internal/daemonproc"
	"github.com/hpcproxy/hpcproxy/internal/jobenv"
)

// The node tunnel: one tunnel per user per compute node.
//
// A per-job [Daemon] that is not Private also serves its node's tunnel to
// the user's other jobs on the node (array tasks, job steps, other jobs):
// it listens on an abstract unix socket, [NodeSocketName], named after the
// user and the tunnel settings. A later job's start finds it there
// ([Daemon.Attach]) instead of opening another SSH connection, and the daemon
// serves that job from then on: its own listener and port, its own
// credentials and UID check, its own state file (in the job's own tmp dir),
// its own forwards and control socket, its own log. The jobs share only
// the SSH connection(s) to the login node.
//
// Abstract sockets live in the network namespace, not the file system, so
// jobs that Slurm's job_container/tmpfs gives each a private /tmp still
// find each other. Anyone on the node can connect to one, so both sides
// check the other with SO_PEERCRED: the daemon serves only its own UID,
// and Daemon.Attach refuses a socket held by another UID (a squatter), with an
// error wrapping [ErrNodeTunnelForeign].
//
// The attach request is one JSON line sent with up to six descriptors
// (SCM_RIGHTS): the job's state directory, which the daemon, living in
// another job's mount namespace, uses through /proc/self/fd to write the
// state file and bind the control socket; the job's log file; a pidfd of
// the process whose end ends the job's attachment (the job script);
// optionally the read end of an exit pipe; and optionally the job's
// listener and the write end of its stand-by's pipe, with which the job's
// port outlives the daemon (internal/daemonproc/standby.go). The daemon waits on the pidfd
// and the pipe in its netpoller: when the process exits, the pipe reaches
// EOF, or `perjob stop` asks on the job's control socket ([DetachJob]),
// it closes that job's listener, forwards and state file, and tells the
// stand-by to exit. The last job to go ends the daemon, and with it the
// tunnel. A daemon that dies instead (killed with the job it lives in)
// leaves the stand-bys to restore the tunnel.

// ErrNodeTunnelRunning is reported by a daemon that could not serve the
// node tunnel because another daemon of the user already does (the
// starter attaches to that one instead).
var ErrNodeTunnelRunning = errors.New("hpcproxy: a node tunnel with these settings already runs")

// ErrNoNodeTunnel is wrapped by Daemon.Attach's error when no daemon serves
// the node tunnel (nothing listens on the socket, or it is ending).
var ErrNoNodeTunnel = errors.New("hpcproxy: no node tunnel to attach to")

// ErrNodeTunnelForeign is wrapped by Daemon.Attach's error when the node
// tunnel's socket belongs to another user: it is refused, never used.
var ErrNodeTunnelForeign = errors.New("hpcproxy: node tunnel socket held by another user")

// NodeSocketName returns the abstract unix socket ("@" first, as Go's net
// package writes abstract names) on which the node tunnel of user uid
// with tunnel settings t is served: "@hpcproxy-node-UID-HASH", HASH
// covering the destination and every setting that makes two tunnels
// differ (methods, ssh config file and options, connections, host-key
// policy, ssh binary). Jobs started with other settings get a tunnel of
// their own.
func NodeSocketName(uid int, t TunnelConfig) string {
	cfg := t.SSHConfigFile
	if cfg != "" {
		if abs, err := filepath.Abs(cfg); err == nil {
			cfg = abs
		}
	}
	h := sha256.New()
	fmt.Fprintf(h, "%q\n%q\n%q\n%q\n%d\n%d\n%q\n", t.Destination, Methods(t.Methods).String(), cfg,
		t.SSHOptions, max(t.Connections, 1), t.HostKeyPolicy, t.SSHBinary)
	if len(t.Destinations) > 0 || t.MaxConnections != 0 {
		// Only when set, so that the names of older settings stay.
		fmt.Fprintf(h, "%q\n%d\n", t.Destinations, t.MaxConnections)
	}
	return fmt.Sprintf("@hpcproxy-node-%d-%x", uid, h.Sum(nil)[:8])
}

// NodeTunnelInfo is the node tunnel's part of a state file.
type NodeTunnelInfo struct {
	// Socket is the abstract socket the node tunnel is served on.
	Socket string `json:"socket"`
	// Jobs counts the jobs using the tunnel now, this one included.
	Jobs int `json:"jobs"`
	// Attached is true for a job that attached to a tunnel another job's
	// start opened, false for the job whose start opened it.
	Attached bool `json:"attached"`
}

// attachOptions configures attachJob.
type attachOptions struct {
	// Tunnel names the node tunnel: its settings, as the daemon that
	// serves it was given them ([NodeSocketName]).
	Tunnel TunnelConfig

	// StatePath optionally specifies the job's state file. If empty,
	// LocalPidFilePath(). Its log is LogFilePath(StatePath).
	StatePath string

	// Port optionally specifies the job's listening port. If zero, a free
	// one.
	Port int

	// WatchPID optionally names the process whose exit detaches the job
	// (the job script). If <= 0, none.
	WatchPID int

	// ExitFd optionally names the read end of an exit pipe, as
	// Daemon.ExitFd: the job detaches when the pipe reaches EOF (every
	// write end closed). The daemon gets a copy; the caller keeps fd. If
	// <= 0, none. Without WatchPID and ExitFd the job stays attached
	// until [DetachJob] (or the daemon ends).
	ExitFd int

	// Forwards and Exposes optionally list the job's forwards, as
	// Daemon.Forwards and Daemon.Exposes.
	Forwards []ForwardSpec
	Exposes  []ExposeSpec

	// ListenerFd and StandbyFd optionally name the job's listener and the
	// write end of its stand-by's pipe, as Daemon.ListenerFd and
	// Daemon.StandbyFd (see the package doc's "Node tunnel"): the daemon gets copies and
	// serves the job on that listener (Port is then ignored). If <= 0,
	// the daemon binds a listener itself and there is no stand-by.
	ListenerFd, StandbyFd int

	// Credentials optionally fixes the job's proxy credentials, as
	// Daemon.Credentials: a stand-by's start passes those of the daemon
	// that died, so the job's clients keep working. If nil, fresh ones.
	Credentials *ProxyCredentials
}

// Attach protocol.
const (
	attachOp     = "attach"
	attachFdDir  = "dir"
	attachFdLog  = "log"
	attachFdPid  = "pidfd"
	attachFdExit = "exit"
	attachFdLn   = "listener"
	attachFdSby  = "standby"
	attachMaxReq = 64 << 10
	attachMaxFds = 6
)

type attachRequest struct {
	Op        string   `json:"op"`
	StateName string   `json:"state_name"`           // the state file's name in the passed directory
	StatePath string   `json:"state_path,omitempty"` // the state file as the job sees it
	Port      int      `json:"port,omitempty"`
	JobID     string   `json:"job_id,omitempty"`
	Scheduler string   `json:"scheduler,omitempty"`
	WatchPID  int      `json:"watch_pid,omitempty"` // when no pidfd could be passed
	Forwards  []string `json:"forwards,omitempty"`
	Exposes   []string `json:"exposes,omitempty"`
	User      string   `json:"user,omitempty"`  // the job's credentials, if fixed
	Token     string   `json:"token,omitempty"` // (both or neither)
	Fds       []string `json:"fds"`             // what each passed descriptor is, in order
}

type attachReply struct {
	Port  int    `json:"port,omitempty"`
	PID   int    `json:"pid,omitempty"`
	Error string `json:"error,omitempty"`
}

// attachCommand is a parsed, valid attach request.
type attachCommand struct {
	req      attachRequest
	forwards []ForwardSpec
	exposes  []ExposeSpec
	fdIndex  map[string]int // kind to index among the passed fds
}

// parseAttachRequest parses an attach request line that came with nfds
// descriptors.
func parseAttachRequest(line []byte, nfds int) (attachCommand, error) {
	var c attachCommand
	dec := json.NewDecoder(bytes.NewReader(line))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&c.req); err != nil {
		return c, fmt.Errorf("hpcproxy: attach request: %w", err)
	}
	if dec.More() {
		return c, errors.New("hpcproxy: attach request: more than one JSON value")
	}
	r := &c.req
	switch {
	case r.Op != attachOp:
		return c, fmt.Errorf("hpcproxy: attach request: unknown op %q", r.Op)
	case r.StateName == "" || r.StateName != filepath.Base(r.StateName) || r.StateName == "." ||
		r.StateName == ".." || !strings.HasSuffix(r.StateName, ".json") || strings.ContainsRune(r.StateName, 0):
		return c, fmt.Errorf("hpcproxy: attach request: bad state file name %q", r.StateName)
	case r.Port < 0 || r.Port > 65535:
		return c, fmt.Errorf("hpcproxy: attach request: bad port %d", r.Port)
	case r.WatchPID < 0:
		return c, fmt.Errorf("hpcproxy: attach request: bad pid %d", r.WatchPID)
	case (r.User == "") != (r.Token == "") || len(r.Token) > 256 || strings.ContainsAny(r.User+r.Token, ":@/\x00\r\n"):
		return c, errors.New("hpcproxy: attach request: bad credentials")
	case len(r.Fds) != nfds:
		return c, fmt.Errorf("hpcproxy: attach request names %d descriptors, %d came", len(r.Fds), nfds)
	}
	c.fdIndex = map[string]int{}
	for i, k := range r.Fds {
		switch k {
		case attachFdDir, attachFdLog, attachFdPid, attachFdExit, attachFdLn, attachFdSby:
		default:
			return c, fmt.Errorf("hpcproxy: attach request: unknown descriptor %q", k)
		}
		if _, dup := c.fdIndex[k]; dup {
			return c, fmt.Errorf("hpcproxy: attach request: descriptor %q twice", k)
		}
		c.fdIndex[k] = i
	}
	if _, ok := c.fdIndex[attachFdDir]; !ok {
		return c, errors.New("hpcproxy: attach request without the state directory")
	}
	for _, s := range r.Forwards {
		spec, err := ParseForwardSpec(s)
		if err != nil {
			return c, err
		}
		c.forwards = append(c.forwards, spec)
	}
	for _, s := range r.Exposes {
		spec, err := ParseExposeSpec(s)
		if err != nil {
			return c, err
		}
		c.exposes = append(c.exposes, spec)
	}
	return c, nil
}

// Attach attaches this job to the node tunnel that a per-job daemon of
// the same user on this node already serves for d.Tunnel's settings
// ([NodeSocketName]), instead of opening a tunnel of its own as Run does:
// that daemon starts a proxy for the job (d's Port or ListenerFd,
// StandbyFd, Credentials, StatePath, Forwards and Exposes; it stops the
// job's proxy when ExitFd reaches EOF or WatchPID exits), and Attach
// returns the state it wrote, once the job's proxy is ready. It returns
// an error wrapping ErrNoNodeTunnel when no daemon serves that tunnel
// (Run one), and one wrapping ErrNodeTunnelForeign when another user holds
// the socket. ctx bounds the whole exchange. Only the fields named here
// are used.
func (d *Daemon) Attach(ctx context.Context) (*ProxyState, error) {
	return attachJob(ctx, attachOptions{
		Tunnel: d.Tunnel, StatePath: d.StatePath, Port: d.Port, WatchPID: d.WatchPID, ExitFd: d.ExitFd,
		Forwards: d.Forwards, Exposes: d.Exposes, ListenerFd: d.ListenerFd, StandbyFd: d.StandbyFd,
		Credentials: d.Credentials,
	})
}

// attachJob is Daemon.Attach with its settings in o.
func attachJob(ctx context.Context, o attachOptions) (*ProxyState, error) {
	statePath := o.StatePath
	if statePath == "" {
		statePath = LocalPidFilePath()
	}
	if ps, err := ReadPidFileAt(statePath); err == nil && CheckState(ps).Usable() {
		return nil, &AlreadyRunningError{Path: statePath, State: ps, Verdict: VerdictAlive}
	}
	name := NodeSocketName(os.Getuid(), o.Tunnel)
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", name)
	if err != nil {
		if errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ENOENT) {
			return nil, fmt.Errorf("%w (%s)", ErrNoNodeTunnel, name)
		}
		return nil, fmt.Errorf("hpcproxy: node tunnel %s: %w", name, err)
	}
	uc := conn.(*net.UnixConn)
	defer uc.Close()
	uid, err := unixPeerUID(uc)
	if err != nil {
		return nil, err
	}
	if uid != os.Getuid() {
		return nil, fmt.Errorf("%w: %s belongs to uid %d, not %d; refused",
			ErrNodeTunnelForeign, name, uid, os.Getuid())
	}
	if dl, ok := ctx.Deadline(); ok {
		_ = uc.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { _ = uc.SetDeadline(time.Unix(1, 0)) })
	defer stop()

	dir := filepath.Dir(statePath)
	if err := ensurePrivateDir(dir); err != nil {
		return nil, err
	}
	dirf, err := os.Open(dir)
	if err != nil {
		return nil, fmt.Errorf("hpcproxy: state directory: %w", err)
	}
	defer dirf.Close()
	logf, err := daemonproc.OpenLog(LogFilePath(statePath), []string{"attach", name})
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	job := jobenv.Detect()
	req := attachRequest{
		Op: attachOp, StateName: filepath.Base(statePath), StatePath: statePath, Port: o.Port,
		Fds: []string{attachFdDir, attachFdLog},
	}
	if job.InJob {
		req.JobID, req.Scheduler = job.JobID, string(job.Scheduler)
	}
	if c := o.Credentials; c != nil {
		req.User, req.Token = c.User, c.Token
	}
	fds := []int{int(dirf.Fd()), int(logf.Fd())}
	if o.WatchPID > 0 {
		pfd, err := unix.PidfdOpen(o.WatchPID, 0)
		switch {
		case err == nil:
			defer unix.Close(pfd)
			fds = append(fds, pfd)
			req.Fds = append(req.Fds, attachFdPid)
		case errors.Is(err, syscall.ESRCH):
			return nil, fmt.Errorf("hpcproxy: process %d to watch is gone", o.WatchPID)
		default:
			req.WatchPID = o.WatchPID // no pidfd (kernel < 5.3): the daemon polls the pid
		}
	}
	for _, x := range []struct {
		fd   int
		kind string
	}{{o.ExitFd, attachFdExit}, {o.ListenerFd, attachFdLn}, {o.StandbyFd, attachFdSby}} {
		if x.fd > 0 {
			fds = append(fds, x.fd)
			req.Fds = append(req.Fds, x.kind)
		}
	}
	for _, f := range o.Forwards {
		req.Forwards = append(req.Forwards, f.String())
	}
	for _, e := range o.Exposes {
		req.Exposes = append(req.Exposes, e.String())
	}
	line, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	if _, _, err := uc.WriteMsgUnix(append(line, '\n'), unix.UnixRights(fds...), nil); err != nil {
		return nil, fmt.Errorf("hpcproxy: attach request: %w", err)
	}
	var reply attachReply
	if err := json.NewDecoder(io.LimitReader(uc, attachMaxReq)).Decode(&reply); err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		// The daemon is ending (its last job went) or died: start anew.
		return nil, fmt.Errorf("%w: %s closed without an answer: %v", ErrNoNodeTunnel, name, err)
	}
	if reply.Error != "" {
		if strings.HasPrefix(reply.Error, ErrNoNodeTunnel.Error()) {
			return nil, fmt.Errorf("%w: %s", ErrNoNodeTunnel, strings.TrimPrefix(reply.Error, ErrNoNodeTunnel.Error()))
		}
		return nil, errors.New(reply.Error)
	}
	return ReadPidFileAt(statePath)
}

// DetachJob detaches the job whose state file is statePath from its node
// tunnel, through the job's control socket: the daemon closes that job's
// proxy and removes its state file, and ends when it was the last job.
// ctx bounds the request.
func DetachJob(ctx context.Context, statePath string) error {
	_, err := controlCall(ctx, statePath, controlRequest{Op: controlOpDetach})
	return err
}

// nodeHub serves a daemon's node tunnel: the abstract socket, and the
// jobs attached through it.
type nodeHub struct {
	d      *Daemon
	name   string
	ln     *net.UnixListener
	log    *slog.Logger
	cancel context.CancelCauseFunc // ends Run: the last job went

	mu      sync.Mutex
	jobs    int  // jobs served, the daemon's own included while it is
	closing bool // no more attachments: the daemon is ending
	ownGone bool // its own job has ended or detached
	own     *running
	ownDown chan struct{} // asks Run to detach its own job; buffered
	fronts  map[*running]struct{}

	ctx    context.Context // ends attached jobs at shutdown
	stopFn context.CancelFunc
	wg     sync.WaitGroup
}

// listen binds the node socket. Another daemon holding it gives an error
// wrapping ErrNodeTunnelRunning.
func (h *nodeHub) listen() error {
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: h.name, Net: "unix"})
	if errors.Is(err, syscall.EADDRINUSE) {
		return fmt.Errorf("%w (%s): attach to it", ErrNodeTunnelRunning, h.name)
	}
	if err != nil {
		return fmt.Errorf("hpcproxy: node tunnel socket %s: %w", h.name, err)
	}
	h.ln = ln
	return nil
}

func newNodeHub(d *Daemon, name string, log *slog.Logger, cancel context.CancelCauseFunc) *nodeHub {
	ctx, stop := context.WithCancel(context.Background())
	return &nodeHub{
		d: d, name: name, log: log, cancel: cancel, jobs: 1,
		ownDown: make(chan struct{}, 1), fronts: map[*running]struct{}{}, ctx: ctx, stopFn: stop,
	}
}

// serve starts accepting attachments to the daemon's tunnel once own, the
// daemon's own job, is ready.
func (h *nodeHub) serve(own *running) {
	h.mu.Lock()
	h.own = own
	h.mu.Unlock()
	h.wg.Add(1)
	go func() {
		defer h.wg.Done()
		for {
			c, err := h.ln.AcceptUnix()
			if err != nil {
				return
			}
			h.wg.Add(1)
			go func() {
				defer h.wg.Done()
				h.serveConn(c)
			}()
		}
	}()
}

// ownStop is called when the daemon's own job ends (its exit pipe, its
// watched process, or a detach request): with other jobs attached the
// daemon goes on without it, else it ends. It reports whether the daemon
// ends.
func (h *nodeHub) ownStop(cause error) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.ownGone {
		return false // detached before, and then its script exited (say)
	}
	h.ownGone = true
	if h.own == nil || h.jobs <= 1 || h.closing {
		h.closing = true
		h.cancel(cause)
		return true
	}
	h.log.Info("own job detached; serving the attached jobs", "cause", cause, "jobs", h.jobs-1)
	select {
	case h.ownDown <- struct{}{}:
	default:
	}
	return false
}

// ownDetached records that the daemon's own job is gone.
func (h *nodeHub) ownDetached() { h.release(nil) }

// release counts one job less; the last one ends the daemon.
func (h *nodeHub) release(r *running) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if r != nil {
		delete(h.fronts, r)
	}
	h.jobs--
	if h.jobs <= 0 && !h.closing {
		h.closing = true
		h.log.Info("last job detached: stopping")
		h.cancel(fmt.Errorf("%w: last job detached", errStopRequested))
	}
}

// jobCount returns the jobs served now.
func (h *nodeHub) jobCount() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.jobs
}

// close stops accepting and ends every attached job (not the own one).
func (h *nodeHub) close() {
	h.mu.Lock()
	h.closing = true
	h.mu.Unlock()
	if h.ln != nil {
		_ = h.ln.Close()
	}
	h.stopFn()
	h.wg.Wait()
}

func (h *nodeHub) serveConn(c *net.UnixConn) {
	defer c.Close()
	if uid, err := unixPeerUID(c); err != nil || uid != selfUID() {
		h.log.Warn("node tunnel: connection from another user refused", "uid", uid, "err", err)
		return
	}
	_ = c.SetDeadline(time.Now().Add(controlTimeout + 10*time.Second))
	reply := func(rep attachReply) {
		if err := json.NewEncoder(c).Encode(rep); err != nil {
			h.log.Debug("node tunnel: write reply", "err", err)
		}
	}
	line, fds, err := readAttachRequest(c)
	var cmd attachCommand
	if err == nil {
		cmd, err = parseAttachRequest(line, len(fds))
	}
	if err != nil {
		for _, fd := range fds {
			_ = unix.Close(fd)
		}
		h.log.Warn("node tunnel: bad attach request", "err", err)
		reply(attachReply{Error: err.Error()})
		return
	}
	// The exit pipe stays a bare descriptor, for watchExitFd, which takes
	// it over; the others become files.
	files := make([]*os.File, len(fds))
	exitFd := -1
	for i, fd := range fds {
		switch cmd.req.Fds[i] {
		case attachFdExit:
			exitFd = fd
			continue
		case attachFdPid:
			// Nonblocking before os.NewFile: then the file is registered
			// with the netpoller, and waiting for the exit takes no thread.
			_ = unix.SetNonblock(fd, true)
		}
		files[i] = os.NewFile(uintptr(fd), "attach-"+cmd.req.Fds[i])
	}
	closeAll := func() {
		for _, f := range files {
			if f != nil {
				_ = f.Close()
			}
		}
		if exitFd >= 0 {
			_ = unix.Close(exitFd)
		}
	}
	h.mu.Lock()
	if h.closing {
		h.mu.Unlock()
		closeAll()
		reply(attachReply{Error: ErrNoNodeTunnel.Error() + ": the daemon is stopping"})
		return
	}
	h.jobs++
	h.mu.Unlock()
	r, err := h.attach(cmd, files, fds[cmd.fdIndex[attachFdDir]], &exitFd)
	if err != nil {
		closeAll()
		h.release(nil)
		h.log.Warn("node tunnel: attach failed", "job", cmd.req.JobID, "err", err)
		reply(attachReply{Error: err.Error()})
		return
	}
	reply(attachReply{Port: r.ln.Addr().(*net.TCPAddr).Port, PID: os.Getpid()})
}

// readAttachRequest reads one request line and the descriptors sent with
// it.
func readAttachRequest(c *net.UnixConn) ([]byte, []int, error) {
	var line []byte
	var fds []int
	buf := make([]byte, 4096)
	oob := make([]byte, unix.CmsgSpace(attachMaxFds*4))
	for {
		n, oobn, _, _, err := c.ReadMsgUnix(buf, oob)
		if oobn > 0 {
			got, perr := parseRights(oob[:oobn])
			fds = append(fds, got...)
			if perr != nil {
				return nil, fds, perr
			}
		}
		line = append(line, buf[:n]...)
		if i := bytes.IndexByte(line, '\n'); i >= 0 {
			if i != len(line)-1 {
				return nil, fds, errors.New("hpcproxy: attach request: bytes after the request")
			}
			if len(fds) > attachMaxFds {
				return nil, fds, fmt.Errorf("hpcproxy: attach request: %d descriptors", len(fds))
			}
			return line, fds, nil
		}
		if len(line) > attachMaxReq {
			return nil, fds, errors.New("hpcproxy: attach request too long")
		}
		if err != nil {
			return nil, fds, fmt.Errorf("hpcproxy: attach request: %w", err)
		}
	}
}

// parseRights returns the descriptors in socket control messages.
func parseRights(oob []byte) ([]int, error) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, fmt.Errorf("hpcproxy: attach request: control message: %w", err)
	}
	var fds []int
	for _, m := range msgs {
		got, err := unix.ParseUnixRights(&m)
		if err != nil {
			continue
		}
		fds = append(fds, got...)
	}
	return fds, nil
}

// attach starts a proxy for an attaching job on the shared tunnel. It
// takes over *exitFd (setting it to -1) once it watches it.
func (h *nodeHub) attach(cmd attachCommand, files []*os.File, dirfd int, exitFd *int) (*running, error) {
	d, own := h.d, h.own
	req := cmd.req
	var st unix.Stat_t
	if err := unix.Fstat(dirfd, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFDIR ||
		int(st.Uid) != selfUID() || st.Mode&0o077 != 0 {
		return nil, errors.New("hpcproxy: attach: the state directory is not a private directory of this user")
	}
	statePath := fmt.Sprintf("/proc/self/fd/%d/%s", dirfd, req.StateName)

	log := h.log
	if i, ok := cmd.fdIndex[attachFdLog]; ok {
		level := slog.LevelInfo
		if h.log.Enabled(context.Background(), slog.LevelDebug) {
			level = slog.LevelDebug
		}
		log = slog.New(slog.NewTextHandler(files[i], &slog.HandlerOptions{Level: level}))
	}
	creds, err := newProxyCredentials()
	if err != nil {
		return nil, err
	}
	if req.Token != "" {
		creds = ProxyCredentials{User: req.User, Token: req.Token}
	}
	logFile := ""
	if req.StatePath != "" {
		logFile = LogFilePath(req.StatePath)
	}
	initial := ProxyState{
		Via: own.claim.State().Via, Port: req.Port, Mode: ModePerJob, Credentials: &creds,
		LogFile: logFile, JobID: req.JobID, Scheduler: req.Scheduler,
		Node: &NodeTunnelInfo{Socket: h.name, Attached: true},
	}
	r, err := newFront(statePath, initial, log)
	if err != nil {
		return nil, err
	}
	r.sup, r.sharedTunnel, r.hub, r.tcfg, r.handoff = own.sup, true, h, own.tcfg, own.handoff
	// Set before the control socket listens (startForwards).
	detach := make(chan struct{}, 1)
	r.onDetach = func(error) bool {
		select {
		case detach <- struct{}{}:
		default:
		}
		return false
	}
	if i, ok := cmd.fdIndex[attachFdLn]; ok {
		f := files[i]
		files[i] = nil
		err = r.adopt(f)
	} else {
		err = r.listen("127.0.0.1", req.Port, ModePerJob)
	}
	if err != nil {
		r.shutdown(log)
		return nil, err
	}
	r.serve(creds, ModePerJob, nil)
	if err := r.startForwards(h.ctx, cmd.forwards, cmd.exposes, ModePerJob); err != nil {
		r.shutdown(log)
		return nil, err
	}
	if err := r.markReady(); err != nil {
		r.shutdown(log)
		return nil, err
	}

	// The job's watches end with its attachment.
	wctx, wcancel := context.WithCancel(h.ctx)
	var watch, exited <-chan struct{}
	switch i, ok := cmd.fdIndex[attachFdPid]; {
	case ok:
		watch = watchPidfd(wctx, files[i])
	case req.WatchPID > 0:
		watch = watchPID(wctx, req.WatchPID, 0)
	}
	if *exitFd >= 0 {
		ch, err := daemonproc.WatchExitFd(wctx, *exitFd)
		if err != nil {
			wcancel()
			r.shutdown(log)
			return nil, err
		}
		*exitFd, exited = -1, ch
	}
	if i, ok := cmd.fdIndex[attachFdSby]; ok {
		// Only now: a failed attachment leaves the stand-by to the starter.
		r.standby, files[i] = files[i], nil
	}
	h.mu.Lock()
	h.fronts[r] = struct{}{}
	h.mu.Unlock()
	log.Info("attached to the node tunnel", "node", h.name, "addr", r.ln.Addr(), "pid", os.Getpid(), "job", req.JobID)
	h.log.Info("job attached", "job", req.JobID, "addr", r.ln.Addr(), "state", req.StatePath, "jobs", h.jobCount())

	interval := d.statsInterval()
	h.wg.Add(1)
	go func() {
		defer h.wg.Done()
		tick := time.NewTicker(interval)
		defer tick.Stop()
		why := "daemon stopping"
	loop:
		for {
			select {
			case <-h.ctx.Done():
				r.handover.Store(true) // the job goes on: its stand-by takes over
				break loop
			case <-watch:
				why = "the job's watched process exited"
				break loop
			case <-exited:
				why = "the job's exit pipe closed"
				break loop
			case <-detach:
				why = "detach requested"
				break loop
			case err := <-r.serveErr:
				why = "listener failed: " + err.Error()
				break loop
			case <-tick.C:
				r.refreshStats(log, false)
			case <-r.rebound:
				r.refreshStats(log, true)
			}
		}
		wcancel()
		log.Info("detaching from the node tunnel: " + why)
		h.log.Info("job detached: "+why, "job", req.JobID, "state", req.StatePath)
		r.shutdown(log)
		for _, f := range files {
			if f != nil {
				_ = f.Close()
			}
		}
		h.release(r)
	}()
	return r, nil
}

// watchPidfd returns a channel closed when the process behind the pidfd
// f (nonblocking when f was made, so the netpoller waits for it: no
// thread per watched job) has exited, or ctx ends.
func watchPidfd(ctx context.Context, f *os.File) <-chan struct{} {
	ch := make(chan struct{})
	rc, err := f.SyscallConn()
	if err != nil || f.SetReadDeadline(time.Time{}) != nil {
		// Not in the netpoller: poll it from a thread of its own.
		go func() {
			defer close(ch)
			for ctx.Err() == nil {
				p := []unix.PollFd{{Fd: int32(f.Fd()), Events: unix.POLLIN}}
				if n, err := unix.Poll(p, 1000); (err != nil && err != unix.EINTR) || n > 0 {
					return
				}
			}
		}()
		return ch
	}
	stop := context.AfterFunc(ctx, func() { _ = f.SetReadDeadline(time.Unix(1, 0)) })
	go func() {
		defer close(ch)
		defer stop()
		// Read calls the function, and again each time the pidfd polls
		// readable, until it reports the exit (or the deadline ends it).
		_ = rc.Read(func(fd uintptr) bool {
			p := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
			n, err := unix.Poll(p, 0)
			return err != nil || n > 0
		})
	}()
	return ch
}

// loginNodeStats sums what the login node carries for every job this
// daemon serves: the open and total channels (proxied connections and
// forwarded ones) and their bytes, with the tunnel's SSH connections.
func (r *running) loginNodeStats() []LoginNodeStats {
	fronts := []*running{r}
	if h := r.hub; h != nil {
		fronts = fronts[:0]
		h.mu.Lock()
		if h.own != nil && !h.own.frontDown.Load() {
			fronts = append(fronts, h.own)
		}
		for f := range h.fronts {
			fronts = append(fronts, f)
		}
		h.mu.Unlock()
	}
	if r.sup == nil {
		return nil
	}
	ts := r.sup.State()
	ln := LoginNodeStats{Host: ts.Login, InUse: true, Status: StatusReconnecting, Method: ts.Method.String(), Jobs: len(fronts)}
	if ln.Host == "" {
		ln.Host = r.tcfg.Destination
	}
	if ln.Host == "" {
		ln.Host = "direct"
	}
	if ts.Status == TunnelUp {
		ln.Status = StatusUp
		if t := r.sup.Current(); t != nil {
			ln.Connections = t.connections()
		}
	}
	for _, f := range fronts {
		if f.srv != nil {
			s := f.srv.Stats()
			ln.Channels += s.Active
			ln.ChannelsTotal += s.Total
			ln.BytesIn += s.BytesIn
			ln.BytesOut += s.BytesOut
		}
		for _, fi := range f.forwardInfos() {
			ln.Channels += fi.Active
			ln.ChannelsTotal += fi.Total
			ln.BytesIn += fi.BytesIn
			ln.BytesOut += fi.BytesOut
		}
	}
	return []LoginNodeStats{ln}
}
