package hpcproxy

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
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
