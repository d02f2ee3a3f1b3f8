package hpcproxy

// The client side of OpenSSH's control socket protocol (PROTOCOL.mux in
// the OpenSSH sources): the packet framing, the hello exchange and the
// forwarding requests. The controlmaster method uses it for its stdio
// forwards (controlstdio.go) and its reverse forwards
// (dial_controlmaster_fwd.go). Not to be confused with mux.go, which
// sniffs the protocol a proxy client speaks.

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"syscall"
	"time"
)

// Mux protocol constants (PROTOCOL.mux).
const (
	muxMsgHello          = 0x00000001
	muxCOpenFwd          = 0x10000006
	muxCCloseFwd         = 0x10000007
	muxCNewStdioFwd      = 0x10000008
	muxSOK               = 0x80000001
	muxSPermissionDenied = 0x80000002
	muxSFailure          = 0x80000003
	muxSSessionOpened    = 0x80000006
	muxSRemotePort       = 0x80000007
	muxFwdRemote         = 2
	muxPortStreamLocal   = 0xfffffffe // (uint32)-2: host is a unix socket path
	muxVersion           = 4
)

// dialUnix connects to the unix stream socket at path. A listener whose
// backlog is full (an OpenSSH master's control socket has room for 64
// connections, ssh -D's unix socket for 128, and ssh accepts them one poll
// loop at a time) makes Linux fail the connect at once with EAGAIN, which
// net does not wait out as it does on TCP: a burst of client connections
// would be refused while the tunnel is fine. dialUnix tries again after
// 1 ms, doubling to 50 ms, until ctx ends.
func dialUnix(ctx context.Context, path string) (*net.UnixConn, error) {
	var d net.Dialer
	wait := time.Millisecond
	for {
		c, err := d.DialContext(ctx, "unix", path)
		if err == nil {
			return c.(*net.UnixConn), nil
		}
		if !errors.Is(err, syscall.EAGAIN) {
			return nil, err
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, fmt.Errorf("%w (the socket's backlog stayed full)", err)
		case <-t.C:
		}
		wait = min(2*wait, 50*time.Millisecond)
	}
}

// muxHello dials the master's control socket at path and exchanges hello
// messages. ctx bounds the dial and the exchange; the returned conn has no
// deadline.
func muxHello(ctx context.Context, path string) (*net.UnixConn, error) {
	uc, err := dialUnix(ctx, path)
	if err != nil {
		return nil, err
	}
	if err := withConnDeadline(ctx, uc, func() error {
		var hello muxBuf
		hello.u32(muxMsgHello)
		hello.u32(muxVersion)
		if err := hello.send(uc); err != nil {
			return fmt.Errorf("mux hello: %w", err)
		}
		msg, err := muxRead(uc)
		if err != nil {
			return fmt.Errorf("mux hello: %w", err)
		}
		if typ, _ := msg.u32(); typ != muxMsgHello {
			return fmt.Errorf("mux: expected hello, got %#x", typ)
		}
		return nil
	}); err != nil {
		uc.Close()
		return nil, err
	}
	return uc, nil
}

// withConnDeadline runs f with c's deadline set from ctx (and to the past
// when ctx ends), and clears the deadline afterwards.
func withConnDeadline(ctx context.Context, c net.Conn, f func() error) error {
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { _ = c.SetDeadline(time.Unix(1, 0)) })
	err := f()
	if !stop() && err != nil && ctx.Err() != nil {
		err = fmt.Errorf("%w (%w)", ctx.Err(), err)
	}
	_ = c.SetDeadline(time.Time{})
	return err
}

// muxForward is the body of MUX_C_OPEN_FWD / MUX_C_CLOSE_FWD for a remote
// forward to a local unix socket.
type muxForward struct {
	listenHost string
	listenPort uint32
	connectTo  string // unix socket path
}

type muxReply struct {
	port uint32 // MUX_S_REMOTE_PORT: the port sshd chose
}

// muxRequest opens a new control connection to the master at path, says
// hello and sends one forwarding command (open or close), returning the
// master's answer. Refusals wrap ErrProhibited with the master's reason.
func muxRequest(ctx context.Context, path string, typ uint32, fwd muxForward) (muxReply, error) {
	c, err := muxHello(ctx, path)
	if err != nil {
		return muxReply{}, err
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { _ = c.SetDeadline(time.Unix(1, 0)) })
	defer stop()

	const reqID = 1
	var req muxBuf
	req.u32(typ)
	req.u32(reqID)
	req.u32(muxFwdRemote)
	req.str(fwd.listenHost)
	req.u32(fwd.listenPort)
	req.str(fwd.connectTo)
	req.u32(muxPortStreamLocal)
	if err := req.send(c); err != nil {
		return muxReply{}, fmt.Errorf("mux request: %w", err)
	}
	msg, err := muxRead(c)
	if err != nil {
		return muxReply{}, fmt.Errorf("mux reply: %w", err)
	}
	return parseMuxReply(msg, reqID)
}

// parseMuxReply reads the master's answer to request reqID. Refusals wrap
// ErrProhibited with the master's reason.
func parseMuxReply(msg muxMsg, reqID uint32) (muxReply, error) {
	rtyp, _ := msg.u32()
	if id, ok := msg.u32(); !ok || id != reqID {
		return muxReply{}, fmt.Errorf("mux reply %#x for request %d, want %d", rtyp, id, reqID)
	}
	switch rtyp {
	case muxSOK:
		return muxReply{}, nil
	case muxSRemotePort:
		p, ok := msg.u32()
		if !ok {
			return muxReply{}, errors.New("mux: short remote port reply")
		}
		return muxReply{port: p}, nil
	case muxSPermissionDenied, muxSFailure:
		reason, _ := msg.str()
		return muxReply{}, fmt.Errorf("%w: ssh control master: %s", ErrProhibited, reason)
	}
	return muxReply{}, fmt.Errorf("mux: unexpected reply %#x", rtyp)
}

// muxBuf builds one mux packet.
type muxBuf []byte

func (b *muxBuf) u32(v uint32) { *b = binary.BigEndian.AppendUint32(*b, v) }
func (b *muxBuf) str(s string) { b.u32(uint32(len(s))); *b = append(*b, s...) }

func (b muxBuf) send(w io.Writer) error {
	pkt := binary.BigEndian.AppendUint32(make([]byte, 0, 4+len(b)), uint32(len(b)))
	_, err := w.Write(append(pkt, b...))
	return err
}

// muxMsg reads fields off one mux packet.
type muxMsg []byte

func (m *muxMsg) u32() (uint32, bool) {
	if len(*m) < 4 {
		return 0, false
	}
	v := binary.BigEndian.Uint32(*m)
	*m = (*m)[4:]
	return v, true
}

func (m *muxMsg) str() (string, bool) {
	n, ok := m.u32()
	if !ok || uint32(len(*m)) < n {
		return "", false
	}
	s := string((*m)[:n])
	*m = (*m)[n:]
	return s, true
}

// muxRead reads one length-prefixed mux packet (at most 256 KiB).
func muxRead(r io.Reader) (muxMsg, error) {
	var hdr [4]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, err
	}
	n := binary.BigEndian.Uint32(hdr[:])
	if n > 256<<10 {
		return nil, fmt.Errorf("mux: packet of %d bytes", n)
	}
	buf := make([]byte, n)
	if _, err := io.ReadFull(r, buf); err != nil {
		return nil, err
	}
	return muxMsg(buf), nil
}
