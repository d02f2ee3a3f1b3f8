package hpcproxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hpcproxy/hpcproxy/internal/daemonproc"
)

// A job's front: its listener, proxy server, forwards, control socket and
// state file, in front of a tunnel of its own or of the node tunnel it
// is attached to.

// running is a started daemon's parts: a front (state file, listener,
// server, forwards, control socket: one job's proxy) and the tunnel,
// which attached jobs' fronts share (sharedTunnel).
type running struct {
	claim    *stateClaim
	ln       net.Listener
	sup      *SupervisedTunnel
	srv      *Server
	serveErr chan error
	serveWG  sync.WaitGroup

	mu        sync.Mutex // serialises state-file writes
	ready     bool       // readiness recorded in the state file; under mu
	lastStats ServerStats
	lastFwd   []ForwardInfo

	runDir   string // the tunnel's sockets; ours to remove
	locals   []*LocalForward
	reverses []*ReverseForward
	rebound  chan struct{} // a reverse forward was (re)bound
	log      *slog.Logger

	fmu sync.Mutex     // guards locals and reverses: the control socket adds to them
	ctl *controlServer // the control socket (daemonctl.go), if it listens

	tcfg         TunnelConfig
	sharedTunnel bool             // an attached job's front: the tunnel is not its to close
	hub          *nodeHub         // the node tunnel this front is part of, if any
	onDetach     func(error) bool // a detach request (control socket); nil: none
	frontDown    atomic.Bool      // the front is shut down (the tunnel may run on)
	standby      *os.File         // the write end of the job's stand-by pipe, if any
	handover     atomic.Bool      // the front ends with the daemon, not the job: the stand-by takes over
	lastNodes    []LoginNodeStats // as last written; under mu

	self    selfDialer  // dials the targets of reverse forwards (selfconn.go)
	handoff HandoffMode // how the server hands conns to a controlmaster (handoff.go)
	unresp  bool        // the tunnel missed a keepalive reply; under mu
}

// newFront claims the state file of a job's proxy (a front).
func newFront(statePath string, initial ProxyState, log *slog.Logger) (*running, error) {
	claim, err := claimStateFile(statePath, initial)
	if err != nil {
		return nil, err
	}
	return &running{claim: claim, serveErr: make(chan error, 1), log: log, rebound: make(chan struct{}, 1)}, nil
}

// listen binds the front's listener and records its port, still
// "starting": a status or stop that reads the file meanwhile finds a
// daemon that is alive, not a stale one.
func (r *running) listen(host string, port int, mode Mode) error {
	// A per-job proxy's clients are on this node: no TCP keepalive for
	// them (Go turns it on for every accepted conn, at four system calls
	// each). A shared proxy keeps it, to notice clients whose node died.
	var lc net.ListenConfig
	if mode == ModePerJob {
		lc.KeepAlive = -1
	}
	ln, err := lc.Listen(context.Background(), "tcp", net.JoinHostPort(host, strconv.Itoa(port)))
	if err != nil {
		return fmt.Errorf("hpcproxy: listen: %w", err)
	}
	r.ln = ln
	bound := ln.Addr().(*net.TCPAddr).Port
	return r.update(func(st *ProxyState) { st.Port = bound })
}

// adopt serves the front on a job's listener f (see daemonproc.StartStandby),
// taking f over, and records its port.
func (r *running) adopt(f *os.File) error {
	ln, err := daemonproc.FileListener(f)
	if err != nil {
		return err
	}
	r.ln = ln
	return r.update(func(st *ProxyState) { st.Port = ln.Addr().(*net.TCPAddr).Port })
}

// serve makes the front's server, dialling through the tunnel.
func (r *running) serve(creds ProxyCredentials, mode Mode, allow []netip.Prefix) {
	r.srv = &Server{
		Dial:        r.sup.Dial,
		Credentials: map[string]string{creds.User: creds.Token},
		Logger:      r.log,

		KeepAliveTimeout: DefaultKeepAliveTimeout,
	}
	if mode == ModePerJob {
		r.srv.TrustConn = r.ownerConn
	}
	r.srv.handoff, r.srv.handoffMode = r.sup, r.handoff
	if len(allow) > 0 {
		r.srv.AllowClient = allowNetworks(allow)
	}
}

// markReady records the front as ready in its state file and starts
// serving.
func (r *running) markReady() error {
	if err := r.update(func(st *ProxyState) {
		// Ready: from now on recordTunnel writes every tunnel change. The
		// tunnel may have dropped during start-up already.
		r.ready = true
		applyTunnel(st, r.sup.State())
	}); err != nil {
		return err
	}
	r.serveWG.Add(1)
	go func() {
		defer r.serveWG.Done()
		if err := r.srv.Serve(r.ln); err != nil && !errors.Is(err, ErrServerClosed) {
			r.serveErr <- err
		}
	}()
	return nil
}

// startForwards starts the daemon's local and reverse forwards, and the
// control socket through which more can be added while it runs.
func (r *running) startForwards(ctx context.Context, fwd []ForwardSpec, exp []ExposeSpec, mode Mode) error {
	for _, fs := range fwd {
		if _, err := r.addLocal(fs, mode); err != nil {
			return err
		}
	}
	for _, es := range exp {
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

// recordTunnel writes a tunnel state change to the state file. Before the
// daemon is ready the status stays "starting" (start writes the tunnel's
// status once it is ready); only the method and counters are recorded.
func (r *running) recordTunnel(ts TunnelState, log *slog.Logger) {
	if ts.Status != TunnelUp && ts.Status != TunnelReconnecting {
		return // closed: the state file is about to go
	}
	if h := r.hub; h != nil {
		// The attached jobs' state files say so too.
		h.mu.Lock()
		for f := range h.fronts {
			f.notifyRebound()
		}
		h.mu.Unlock()
	}
	if r.frontDown.Load() {
		return // its own job is gone; the tunnel serves attached ones
	}
	err := r.update(func(st *ProxyState) {
		if !r.ready {
			st.Method, st.Reconnects, st.ViaInUse = ts.Method.String(), ts.Reconnects, ts.Login
			return
		}
		applyTunnel(st, ts)
	})
	if err != nil {
		log.Warn("state file not updated", "err", err)
	}
}

// applyTunnel sets the tunnel fields of st from ts.
func applyTunnel(st *ProxyState, ts TunnelState) {
	if ts.Status == TunnelUp {
		st.Status, st.LastError = StatusUp, ""
	} else {
		st.Status = StatusReconnecting
		if ts.LastError != nil {
			st.LastError = ts.LastError.Error()
		}
	}
	st.Method, st.Reconnects, st.ViaInUse = ts.Method.String(), ts.Reconnects, ts.Login
}

// refreshStats writes the server's and the forwards' counters to the
// state file when they changed since the last write (or when force).
func (r *running) refreshStats(log *slog.Logger, force bool) {
	s := r.srv.Stats()
	fwd := r.forwardInfos()
	nodes := r.loginNodeStats()
	tun := r.sup.Current()
	unresp := tun != nil && tun.Unresponsive()
	r.mu.Lock()
	same := s == r.lastStats && slices.Equal(fwd, r.lastFwd) && slices.Equal(nodes, r.lastNodes) && unresp == r.unresp
	r.mu.Unlock()
	if same && !force {
		return
	}
	log.Debug("stats", "active", s.Active, "total", s.Total, "bytes_in", s.BytesIn, "bytes_out", s.BytesOut)
	if err := r.update(func(st *ProxyState) {
		if unresp != r.unresp {
			if unresp {
				log.Warn("tunnel unresponsive: a keepalive went unanswered")
			} else {
				log.Info("tunnel responsive again")
			}
		}
		r.unresp = unresp
	}); err != nil {
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
	if r.sharedTunnel && r.ready {
		applyTunnel(&st, r.sup.State())
	}
	switch {
	case r.unresp && st.Status == StatusUp:
		st.Status = StatusUnresponsive
	case !r.unresp && st.Status == StatusUnresponsive:
		st.Status = StatusUp
	}
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
	if r.ready {
		// r.sup is set before ready is: never read while it is written.
		r.lastNodes = r.loginNodeStats()
		st.LoginNodes = r.lastNodes
	}
	if st.Node != nil && r.hub != nil {
		n := *st.Node
		n.Jobs = r.hub.jobCount()
		st.Node = &n
	}
	return r.claim.Update(st)
}

// shutdown stops serving, closes connections and the tunnel (unless it is
// shared), and removes the state file if it is still ours.
func (r *running) shutdown(log *slog.Logger) {
	r.shutdownFront(log)
	if r.sup != nil && !r.sharedTunnel {
		_ = r.sup.Close()
	}
	if r.runDir != "" {
		if err := os.RemoveAll(r.runDir); err != nil {
			log.Warn("runtime dir not removed", "err", err)
		}
	}
}

// shutdownFront stops the front: no more serving, its connections and
// forwards closed, its state file removed if it is still ours. The tunnel
// stays up. It is idempotent.
func (r *running) shutdownFront(log *slog.Logger) {
	if r.frontDown.Swap(true) {
		return
	}
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
	if r.standby != nil && r.handover.Load() {
		// The state file stays, as a killed daemon's would: the stand-by's
		// start takes the job's credentials from it.
		r.claim.Abandon()
	} else if err := r.claim.Release(); err != nil {
		log.Warn("state file not released", "err", err)
	}
	if r.standby != nil {
		// Last: a stand-by taking over finds the state file given up
		// (its start waits for this process to be gone before it reads
		// it), and one told to exit closes the port.
		daemonproc.EndStandby(r.standby, !r.handover.Load())
	}
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
