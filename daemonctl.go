package hpcproxy

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"time"
)

// The control socket: adding forwards to a running daemon.
//
// A running [Daemon] listens on a unix socket beside its state file
// ([ControlSocketPath]): mode 0600, in the state directory that only the
// user can enter, and every peer is checked once more with SO_PEERCRED
// (SO_PEERCRED; for loopback TCP, the socket's owner), so only the daemon's owner can ask anything of it. The
// protocol is one request per connection: a JSON object on one line,
//
//	{"op":"forward","spec":"5432=db.internal:5432"}
//	{"op":"expose","spec":"8888"}
//	{"op":"detach"}
//
// with specs as [ParseForwardSpec] and [ParseExposeSpec] read them,
// answered by one JSON line: {"forward":{...}} with the [ForwardInfo] of
// the forward, or {"error":"..."}. A request for a forward that the daemon
// already has ([ForwardSpec.Matches], [ExposeSpec.Matches]) returns that
// one. "detach" ends the job's proxy on a node tunnel (see [Daemon.Attach])
// and is answered {"detached":true}. [AddForward], [AddExpose] and
// [DetachJob] are the client side.

// ControlSocketPath returns the control socket of the daemon whose state
// file is statePath: the same name with ".sock" for ".json".
func ControlSocketPath(statePath string) string {
	return strings.TrimSuffix(statePath, ".json") + ".sock"
}

// Control operations.
const (
	controlOpForward = "forward"
	controlOpExpose  = "expose"
	controlOpDetach  = "detach"
)

// controlRequestMax bounds a request line.
const controlRequestMax = 16 << 10

// controlTimeout bounds one request on the daemon's side: an expose waits
// for a tunnel that is reconnecting and for sshd's answer.
const controlTimeout = 90 * time.Second

type controlRequest struct {
	Op   string `json:"op"`
	Spec string `json:"spec,omitempty"`
}

type controlReply struct {
	Forward  *ForwardInfo `json:"forward,omitempty"`
	Detached bool         `json:"detached,omitempty"`
	Error    string       `json:"error,omitempty"`
}

// controlCommand is a parsed, valid request: exactly one of the specs, or
// detach.
type controlCommand struct {
	forward *ForwardSpec
	expose  *ExposeSpec
	detach  bool
}

// parseControlRequest parses one request line from a control client.
func parseControlRequest(line []byte) (controlCommand, error) {
	var req controlRequest
	dec := json.NewDecoder(bytes.NewReader(line))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		return controlCommand{}, fmt.Errorf("hpcproxy: control request: %w", err)
	}
	if dec.More() {
		return controlCommand{}, errors.New("hpcproxy: control request: more than one JSON value")
	}
	switch req.Op {
	case controlOpForward:
		spec, err := ParseForwardSpec(req.Spec)
		if err != nil {
			return controlCommand{}, err
		}
		return controlCommand{forward: &spec}, nil
	case controlOpExpose:
		spec, err := ParseExposeSpec(req.Spec)
		if err != nil {
			return controlCommand{}, err
		}
		return controlCommand{expose: &spec}, nil
	case controlOpDetach:
		if req.Spec != "" {
			return controlCommand{}, errors.New("hpcproxy: control request: detach takes no spec")
		}
		return controlCommand{detach: true}, nil
	}
	return controlCommand{}, fmt.Errorf("hpcproxy: control request: unknown op %q", req.Op)
}

// controlServer serves a daemon's control socket.
type controlServer struct {
	r      *running
	mode   Mode
	ln     net.Listener
	ctx    context.Context // cancelled at shutdown: ends requests in flight
	cancel context.CancelFunc
	reqMu  sync.Mutex // one request at a time
	wg     sync.WaitGroup
}

// startControl listens on the daemon's control socket and serves it in
// the background. Without it the daemon still runs: forwards just cannot
// be added while it runs, and the log says why.
func (r *running) startControl(mode Mode) {
	path := ControlSocketPath(r.claim.Path())
	ln, err := listenUnixPrivate(path)
	if err != nil {
		r.log.Warn("no control socket: forwards cannot be added to this daemon while it runs", "path", path, "err", err)
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &controlServer{r: r, mode: mode, ln: ln, ctx: ctx, cancel: cancel}
	r.ctl = s
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := acceptRetrying(ln, r.log)
			if err != nil {
				return
			}
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				s.serveConn(c)
			}()
		}
	}()
}

// stopControl closes the control socket and waits for requests in flight
// (cancelling them), so that no forward is added after it returns.
func (r *running) stopControl() {
	s := r.ctl
	if s == nil {
		return
	}
	s.cancel()
	_ = s.ln.Close()
	s.wg.Wait()
}

func (s *controlServer) serveConn(c net.Conn) {
	defer c.Close()
	if !s.r.ownerConn(c) {
		s.r.log.Warn("control socket: connection from another user refused")
		return
	}
	_ = c.SetDeadline(time.Now().Add(controlTimeout + 10*time.Second))
	line, err := bufio.NewReader(io.LimitReader(c, controlRequestMax)).ReadBytes('\n')
	if err != nil {
		s.r.log.Debug("control socket: no request", "err", err)
		return
	}
	var reply controlReply
	cmd, err := parseControlRequest(line)
	if err == nil && cmd.detach {
		// Answered before the front goes: shutting it down waits for this
		// connection's handler.
		if s.r.onDetach == nil {
			err = errors.New("hpcproxy: this proxy has no node tunnel to detach from: stop it instead")
		} else {
			s.r.log.Info("control socket: detach requested")
			s.r.onDetach(fmt.Errorf("%w: detach requested", errStopRequested))
			reply.Detached = true
		}
	} else if err == nil {
		var fi ForwardInfo
		fi, err = s.do(cmd)
		reply.Forward = &fi
	}
	if err != nil {
		reply = controlReply{Error: err.Error()}
		s.r.log.Warn("control socket: request failed", "err", err)
	}
	if err := json.NewEncoder(c).Encode(reply); err != nil {
		s.r.log.Debug("control socket: write reply", "err", err)
	}
}

// do carries out one command and records the change in the state file.
func (s *controlServer) do(cmd controlCommand) (ForwardInfo, error) {
	s.reqMu.Lock()
	defer s.reqMu.Unlock()
	if err := s.ctx.Err(); err != nil {
		return ForwardInfo{}, errors.New("hpcproxy: the daemon is stopping")
	}
	r := s.r
	r.fmu.Lock()
	existing := r.forwardInfosLocked()
	r.fmu.Unlock()
	var fi ForwardInfo
	switch {
	case cmd.forward != nil:
		for _, e := range existing {
			if cmd.forward.Matches(e) {
				return e, nil
			}
		}
		f, err := r.addLocal(*cmd.forward, s.mode)
		if err != nil {
			return ForwardInfo{}, err
		}
		fi = f.Info()
	case cmd.expose != nil:
		for _, e := range existing {
			if cmd.expose.Matches(e) {
				return e, nil
			}
		}
		ctx, cancel := context.WithTimeout(s.ctx, controlTimeout)
		defer cancel()
		f, err := r.addExpose(ctx, *cmd.expose)
		if err != nil {
			return ForwardInfo{}, err
		}
		fi = f.Info()
	}
	// Written before the reply: a client that reads the state file
	// after its request finds the forward there.
	r.refreshStats(r.log, true)
	return fi, nil
}

// addLocal starts a local forward and adds it to the daemon's. In per-job
// mode it admits only the owner's connections.
func (r *running) addLocal(fs ForwardSpec, mode Mode) (*LocalForward, error) {
	f := &LocalForward{Listen: fs.Listen, Remote: fs.Remote, Dial: r.sup.Dial, Logger: r.log}
	if mode == ModePerJob {
		f.AllowConn = r.ownerConn
	}
	if err := f.Start(); err != nil {
		return nil, fmt.Errorf("hpcproxy: forward %s: %w", fs, err)
	}
	r.fmu.Lock()
	r.locals = append(r.locals, f)
	r.fmu.Unlock()
	r.log.Info("local forward listening", "listen", f.Addr(), "remote", fs.Remote)
	return f, nil
}

// addExpose starts a reverse forward and adds it to the daemon's. ctx
// governs the first request to sshd only.
func (r *running) addExpose(ctx context.Context, es ExposeSpec) (*ReverseForward, error) {
	if err := r.checkExposeTarget(ctx, es.Local); err != nil {
		return nil, err
	}
	f := &ReverseForward{Remote: es.Remote, Local: es.Local, Logger: r.log, DialLocal: r.self.DialContext}
	// A re-bind, possibly on a new port: Run records it at once.
	f.OnBind = func(net.Addr) { r.notifyRebound() }
	if err := f.Start(ctx, r.sup); err != nil {
		return nil, fmt.Errorf("hpcproxy: expose %s: %w", es, err)
	}
	r.fmu.Lock()
	r.reverses = append(r.reverses, f)
	r.fmu.Unlock()
	return f, nil
}

// notifyRebound has Run write the forwards to the state file at once.
func (r *running) notifyRebound() {
	select {
	case r.rebound <- struct{}{}:
	default:
	}
}

// forwardInfosLocked snapshots every forward; r.fmu is held.
func (r *running) forwardInfosLocked() []ForwardInfo {
	var out []ForwardInfo
	for _, f := range r.locals {
		out = append(out, f.Info())
	}
	for _, f := range r.reverses {
		out = append(out, f.Info())
	}
	return out
}

// AddForward asks the daemon whose state file is statePath, running on
// this host, to start the local forward spec through its control socket,
// and returns the forward as the daemon reports it. If the daemon already
// has a forward that satisfies spec, that one is returned. ctx bounds the
// whole request.
func AddForward(ctx context.Context, statePath string, spec ForwardSpec) (ForwardInfo, error) {
	return controlCall(ctx, statePath, controlRequest{Op: controlOpForward, Spec: spec.String()})
}

// AddExpose asks the daemon whose state file is statePath, running on this
// host, to start the reverse forward spec through its control socket, and
// returns the forward with the address the login node bound
// ([ForwardInfo].Listen, which `ssh -L` on the user's machine can reach
// through the login node). If the daemon already has an expose that satisfies
// spec, that one is returned. ctx bounds the whole request, sshd's answer
// included.
func AddExpose(ctx context.Context, statePath string, spec ExposeSpec) (ForwardInfo, error) {
	return controlCall(ctx, statePath, controlRequest{Op: controlOpExpose, Spec: spec.String()})
}

func controlCall(ctx context.Context, statePath string, req controlRequest) (ForwardInfo, error) {
	path := ControlSocketPath(statePath)
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return ForwardInfo{}, fmt.Errorf("hpcproxy: the daemon's control socket: %w", err)
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { _ = c.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if err := json.NewEncoder(c).Encode(req); err != nil {
		return ForwardInfo{}, fmt.Errorf("hpcproxy: control request: %w", err)
	}
	var reply controlReply
	if err := json.NewDecoder(io.LimitReader(c, 1<<20)).Decode(&reply); err != nil {
		if ctx.Err() != nil {
			err = ctx.Err()
		} else if errors.Is(err, io.EOF) {
			err = errors.New("the daemon closed the connection without an answer (see its log)")
		}
		return ForwardInfo{}, fmt.Errorf("hpcproxy: control reply: %w", err)
	}
	if reply.Error != "" {
		return ForwardInfo{}, errors.New(reply.Error)
	}
	if req.Op == controlOpDetach {
		if !reply.Detached {
			return ForwardInfo{}, errors.New("hpcproxy: control reply: not detached")
		}
		return ForwardInfo{}, nil
	}
	if reply.Forward == nil {
		return ForwardInfo{}, errors.New("hpcproxy: control reply without a forward")
	}
	return *reply.Forward, nil
}
