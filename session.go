package hpcproxy

// The session of one accepted client connection: what the SOCKS5, SOCKS4
// and HTTP handlers (socks5.go, socks4.go, httpconnect.go) share to dial,
// answer, count and hand a connection to the relay.

import (
	"container/list"
	"context"
	"fmt"
	"log/slog"
	"net"
	"sync/atomic"
	"time"
)

// session is one accepted client connection.
type session struct {
	srv     *Server
	c       *clientConn
	trusted bool         // no credentials required
	refuse  bool         // over MaxConns: read the request, then refuse it
	idle    *atomic.Bool // set while waiting for the next HTTP request
	// slot: the conn holds one of MaxHandshakes until it has
	// authenticated (authenticated) or ends; nil if trusted.
	slot *list.Element
	log  *slog.Logger
	// finish ends the connection (closing it, and telling the server);
	// startRelay hands it to the relay it starts and sets detached.
	finish   func()
	detached bool
}

// dial opens the destination for a session, bounded by DialTimeout and
// aborted by Close. The conn is tracked so that Close reaches it.
//
// The request has been read by now, so dial first lifts the handshake
// deadline: a dial may take longer than the handshake timeout, and the
// reply must still be written afterwards.
func (ss *session) dial(addr string) (net.Conn, error) {
	if err := ss.c.raw.SetDeadline(time.Time{}); err != nil {
		return nil, fmt.Errorf("hpcproxy: clear handshake deadline: %w", err)
	}
	if ss.refuse {
		return nil, errTooManyConns
	}
	s := ss.srv
	ctx, cancel := context.WithTimeout(s.baseContext(), s.dialTimeout())
	defer cancel()
	dial := s.Dial
	if dial == nil {
		var d net.Dialer
		dial = d.DialContext
	}
	c, err := dial(ctx, "tcp", addr)
	if err != nil {
		return nil, convertOpenChannelError(addr, err)
	}
	if _, ok := s.trackConn(c); !ok {
		c.Close()
		return nil, ErrServerClosed
	}
	return c, nil
}

// release closes a destination conn from dial and forgets it.
func (ss *session) release(c net.Conn) {
	c.Close()
	ss.srv.untrackConn(c)
}

// logDialError logs a failed dial: at Warn when the tunnel is down, at
// Debug otherwise (a refused port is the client's business).
func (ss *session) logDialError(addr string, f dialFailure, err error) {
	if f == failTunnelDown || f == failBusy {
		ss.log.Warn("dial failed", "dest", addr, "reason", f.reason(), "err", err)
		return
	}
	ss.log.Debug("dial failed", "dest", addr, "reason", f.reason(), "err", err)
}

// authenticated gives up the session's handshake slot: its client has
// authenticated, or the handshake is over. Idempotent.
func (ss *session) authenticated() {
	if ss.slot != nil {
		ss.srv.endHandshake(ss.slot)
		ss.slot = nil
	}
}

// writeReply writes a refusal; the conn is closed next, so a failed write
// is only logged.
func (ss *session) writeReply(b []byte) {
	if _, err := ss.c.io.Write(b); err != nil {
		ss.log.Debug("write refusal", "err", err)
	}
}

// fail counts a failed handshake and returns err.
func (ss *session) fail(err error) error {
	ss.srv.failed.Add(1)
	return err
}

// startRelay clears the handshake deadline and starts relaying between the
// client and dst in goroutines of their own, which end the connection when
// both directions are done. The session's goroutine returns at once: an
// idle relay then holds only the small stacks its copiers start with, not
// this goroutine's, which the handshake and the dial may have grown (at
// 10,000 held connections, that was 4 KiB each).
func (ss *session) startRelay(dst net.Conn) error {
	if err := ss.c.raw.SetDeadline(time.Time{}); err != nil {
		ss.release(dst)
		return fmt.Errorf("hpcproxy: clear handshake deadline: %w", err)
	}
	cfg := relayConfig{
		early: ss.c.takeBuffered(),
		idle:  ss.srv.IdleTimeout,
		in:    &ss.srv.bytesIn,
		out:   &ss.srv.bytesOut,
	}
	client, finish, log := ss.c.raw, ss.finish, ss.log
	ss.detached = true
	go func() {
		err := relay(client, dst, cfg)
		ss.release(dst)
		if err != nil {
			log.Debug("connection ended", "err", err)
		}
		finish()
	}()
	return nil
}
