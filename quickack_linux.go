package hpcproxy

import (
	"net"
	"syscall"
)

// withQuickAck returns c with TCP_QUICKACK re-armed after every read, so
// the kernel acknowledges what the SSH server sent at once instead of
// delaying the ACK. sshd leaves Nagle's algorithm on for non-interactive
// connections, so a small packet (say, a channel-open confirmation) that
// follows an unacknowledged one (a channel close) waits for that delayed
// ACK: measured here, opening a channel right after closing another took
// 1-5 ms instead of 0.2 ms. Linux clears TCP_QUICKACK by itself, hence the
// re-arming. Conns other than *net.TCPConn are returned unchanged.
func withQuickAck(c net.Conn) net.Conn {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return c
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return c
	}
	return &quickAckConn{Conn: c, rc: rc}
}

type quickAckConn struct {
	net.Conn
	rc syscall.RawConn
}

func (q *quickAckConn) Read(p []byte) (int, error) {
	n, err := q.Conn.Read(p)
	_ = q.rc.Control(func(fd uintptr) {
		_ = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_TCP, syscall.TCP_QUICKACK, 1)
	})
	return n, err
}
