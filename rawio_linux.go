package hpcproxy

import (
	"errors"
	"io"
	"net"
	"os"
	"syscall"
	"unsafe"
)

// Socket I/O without the scheduler's system-call hand-off
//
// Go enters every system call through the scheduler (entersyscall), so that
// a call that blocks does not hold the thread's P. The runtime's monitor
// thread (sysmon) takes the P away from a call that has lasted a tick
// (20 µs or more) and hands it to another thread, and while it keeps finding
// such calls it wakes every 20 µs. A write to a loopback socket runs the
// receiver's whole TCP input path before it returns, often longer than a
// tick: in a per-job daemon (GOMAXPROCS 1), profiled during a run of short
// connections, sysmon's wake-ups and the hand-offs that followed were a
// fifth of the daemon's CPU time.
//
// rawConn does a socket's reads and writes as raw system calls (RawSyscall)
// from within syscall.RawConn's Read and Write, which wait for readiness
// through the netpoller as net.Conn does, with deadlines and Close
// honoured. The socket is non-blocking, so a call never blocks; it only
// runs for as long as the kernel's work for the bytes takes, during which
// no other goroutine needs this P in a daemon that has one.

// rawConn is a TCP or unix stream socket whose Read and Write are raw
// system calls.
type rawConn struct {
	net.Conn
	rc syscall.RawConn
}

// withRawIO returns c with raw-system-call reads and writes if it is a TCP
// or unix socket, else c unchanged.
func withRawIO(c net.Conn) net.Conn {
	var rc syscall.RawConn
	var err error
	switch s := c.(type) {
	case *net.TCPConn:
		rc, err = s.SyscallConn()
	case *net.UnixConn:
		rc, err = s.SyscallConn()
	default:
		return c
	}
	if err != nil {
		return c
	}
	return &rawConn{Conn: c, rc: rc}
}

func (c *rawConn) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	var n int
	var errno syscall.Errno
	err := c.rc.Read(func(fd uintptr) bool {
		for {
			r, _, e := syscall.RawSyscall(syscall.SYS_READ, fd, uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)))
			switch e {
			case 0:
				n = int(r)
				return true
			case syscall.EINTR:
				continue
			case syscall.EAGAIN:
				return false
			default:
				errno = e
				return true
			}
		}
	})
	switch {
	case err != nil:
		return 0, c.opError("read", err)
	case errno != 0:
		return 0, c.opError("read", os.NewSyscallError("read", errno))
	case n == 0:
		return 0, io.EOF
	}
	return n, nil
}

func (c *rawConn) Write(p []byte) (int, error) {
	var n int
	var errno syscall.Errno
	err := c.rc.Write(func(fd uintptr) bool {
		for n < len(p) {
			r, _, e := syscall.RawSyscall(syscall.SYS_WRITE, fd, uintptr(unsafe.Pointer(&p[n])), uintptr(len(p)-n))
			switch e {
			case 0:
				n += int(r)
			case syscall.EINTR:
			case syscall.EAGAIN:
				return false
			default:
				errno = e
				return true
			}
		}
		return true
	})
	switch {
	case err != nil:
		return n, c.opError("write", err)
	case errno != 0:
		return n, c.opError("write", os.NewSyscallError("write", errno))
	}
	return n, nil
}

// opError words err as net.Conn's own Read and Write would: RawConn's
// errors say "raw-read" and "raw-write".
func (c *rawConn) opError(op string, err error) error {
	var oe *net.OpError
	if errors.As(err, &oe) {
		err = oe.Err
	}
	return &net.OpError{Op: op, Net: c.LocalAddr().Network(), Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: err}
}

// CloseWrite half-closes the socket, as the wrapped conn's would.
func (c *rawConn) CloseWrite() error {
	var errno syscall.Errno
	err := c.rc.Control(func(fd uintptr) {
		_, _, errno = syscall.RawSyscall(syscall.SYS_SHUTDOWN, fd, syscall.SHUT_WR, 0)
	})
	switch {
	case err != nil:
		return c.opError("close", err)
	case errno != 0:
		return c.opError("close", os.NewSyscallError("shutdown", errno))
	}
	return nil
}

// SyscallConn returns the socket's RawConn.
func (c *rawConn) SyscallConn() (syscall.RawConn, error) { return c.rc, nil }
