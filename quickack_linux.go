package hpcproxy

import (
	"net"
	"syscall"
	"unsafe"
)

// withQuickAck returns c with TCP_QUICKACK re-armed after every small read,
// so the kernel acknowledges what the SSH server sent at once instead of
// delaying the ACK. sshd leaves Nagle's algorithm on for non-interactive
// connections, so a small packet (say, a channel-open confirmation) that
// follows an unacknowledged one (a channel close, the host keys it
// announces after authentication) waits for that delayed ACK, up to 40 ms:
// measured here, opening a channel right after closing another took 1-5 ms
// instead of 0.2 ms, and the first channel through a fresh tunnel 42-47 ms
// instead of 2-5. Linux clears TCP_QUICKACK by itself, hence the
// re-arming, which also sends an ACK still pending. A read of
// quickAckBelow bytes or more is bulk data, whose segments are
// acknowledged promptly anyway: skipping the re-arm there saves a system
// call per read.
//
// Re-arming only while an upload waits for window, or only when no packet
// of ours followed a small read within a millisecond, saved nothing
// measurable once the re-arm was a raw system call (CPU per connection
// 1.30x against 1.33x `ssh -D` in one run), and the first policy brought
// the 40 ms stall back: so every small read re-arms.
// c is a conn from withRawIO; one that is not a TCP socket (a jump
// host's SSH channel) is returned unchanged.
func withQuickAck(c net.Conn) net.Conn {
	r, ok := c.(*rawConn)
	if !ok {
		return c
	}
	if _, tcp := r.Conn.(*net.TCPConn); !tcp {
		return c
	}
	return &quickAckConn{Conn: c, rc: r.rc}
}

type quickAckConn struct {
	net.Conn
	rc syscall.RawConn
}

// quickAckBelow is the read size below which TCP_QUICKACK is re-armed.
const quickAckBelow = 16 << 10

func (q *quickAckConn) Read(p []byte) (int, error) {
	n, err := q.Conn.Read(p)
	if n > 0 && n < quickAckBelow {
		_ = q.rc.Control(quickAckRearm)
	}
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
