package hpcproxy

import (
	"net"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"
)

// withQuickAck returns c with TCP_QUICKACK re-armed after small reads
// while c carries an upload, so that the kernel acknowledges what the SSH
// server sent (its window adjustments) at once instead of delaying the ACK.
// sshd leaves Nagle's algorithm on for non-interactive connections, so a
// small packet that follows an unacknowledged one waits for that delayed
// ACK; while we send bulk data the ACK rides on it anyway, but a sender
// waiting for window sends nothing. Linux clears TCP_QUICKACK by itself,
// hence the re-arming, which also sends an ACK still pending.
//
// Re-arming costs a system call and, mostly, an ACK segment of its own. A
// read of quickAckBelow bytes or more is bulk data, whose segments are
// acknowledged promptly anyway, and without a recent large write (within
// quickAckAfterWrite) nothing waits for window: short connections' channel
// opens, confirmations and closes are acknowledged by our next packet,
// which follows within microseconds. Measured in one run: re-arming after
// every small read cost 8% of a per-job daemon's CPU time in a run of
// short connections, and skipping it during uploads cost throughput.
// Conns other than TCP sockets are returned unchanged.
func withQuickAck(c net.Conn) net.Conn {
	if r, ok := c.(*rawConn); ok {
		if _, tcp := r.Conn.(*net.TCPConn); tcp {
			return &quickAckConn{Conn: c, rc: r.rc}
		}
		return c
	}
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
	// lastBulk is when the last write of quickAckBelow bytes or more
	// began, in nanoseconds since quickAckEpoch (monotonic).
	lastBulk atomic.Int64
}

var quickAckEpoch = time.Now()

const (
	// quickAckBelow is the read size below which TCP_QUICKACK is
	// re-armed, and the write size that counts as an upload.
	quickAckBelow = 16 << 10
	// quickAckAfterWrite is how long after a large write small reads
	// still re-arm TCP_QUICKACK.
	quickAckAfterWrite = 50 * time.Millisecond
)

func (q *quickAckConn) Write(p []byte) (int, error) {
	if len(p) >= quickAckBelow {
		q.lastBulk.Store(int64(time.Since(quickAckEpoch)))
	}
	return q.Conn.Write(p)
}

func (q *quickAckConn) Read(p []byte) (int, error) {
	n, err := q.Conn.Read(p)
	if n >= quickAckBelow || int64(time.Since(quickAckEpoch))-q.lastBulk.Load() > int64(quickAckAfterWrite) {
		return n, err
	}
	_ = q.rc.Control(quickAckRearm)
	return n, err
}

// quickAckRearm sets TCP_QUICKACK on fd; a variable for tests. A raw
// system call, like rawConn's reads: re-arming sends a pending ACK, which
// can take longer than a scheduler tick (rawio_linux.go).
var quickAckRearm = func(fd uintptr) {
	one := int32(1)
	_, _, _ = syscall.RawSyscall6(syscall.SYS_SETSOCKOPT, fd, syscall.IPPROTO_TCP, syscall.TCP_QUICKACK,
		uintptr(unsafe.Pointer(&one)), unsafe.Sizeof(one), 0)
}
