package hpcproxy

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/hpcproxy/hpcproxy/internal/daemonproc"
)

// The node daemon's side of a node tunnel: the abstract socket it serves,
// the jobs attached to it and their ends.

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
			c, err := acceptRetrying(h.ln, h.log)
			if err != nil {
				return
			}
			h.wg.Add(1)
			go func() {
				defer h.wg.Done()
				h.serveConn(c.(*net.UnixConn))
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

	// The job's watches end with its attachment, not with the daemon: a
	// watch closes its channel when its context ends, which the loop below
	// would take for the job's end, were the daemon's stop to end it too
	// (a select with both ready picks either), and then tell the stand-by
	// to exit instead of taking over.
	wctx, wcancel := context.WithCancel(context.Background())
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
		_ = rc.Read(func(fd uintptr) bool { return pidfdExited(int(fd)) })
	}()
	return ch
}

// pidfdExited reports whether the process behind pidfd fd has exited (or
// the pidfd is unusable). A signal that interrupts the check (EINTR: the
// runtime's preemption signal, SIGCHLD) is no answer: the check is made
// again. Taking it for an exit once detached running jobs.
func pidfdExited(fd int) bool {
	p := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	for {
		n, err := unix.Poll(p, 0)
		if err == unix.EINTR {
			continue
		}
		return err != nil || n > 0
	}
}
