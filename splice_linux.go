package hpcproxy

import (
	"io"
	"net"
	"syscall"

	"golang.org/x/sys/unix"
)

// spliceCopy copies src (a TCP or unix socket) to dst with splice(2), in
// the kernel, and only while bytes are waiting. io.Copy between two sockets
// splices too, but it takes a pipe pair from Go's pool for the whole copy
// and holds it while the copy waits for data: an idle relay held two pipes
// (four descriptors) besides its two sockets, so 10,000 quiet connections
// ran a daemon out of descriptors. spliceCopy waits for src to be readable
// without a pipe or a buffer, then splices exactly what is queued.
func (c *copier) spliceCopy(src net.Conn, dst *net.TCPConn) error {
	sc, ok := src.(syscall.Conn)
	if !ok {
		n, err := io.Copy(dst, src)
		c.count.Add(n)
		return err
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return err
	}
	lr := &io.LimitedReader{R: src}
	for {
		queued, err := waitQueued(rc)
		if err != nil {
			return err
		}
		if queued == 0 {
			return nil // EOF
		}
		lr.N = queued
		n, err := dst.ReadFrom(lr) // splices a *io.LimitedReader of a socket
		c.count.Add(n)
		if err != nil {
			return err
		}
		if n == 0 {
			return nil
		}
	}
}

// waitQueued waits until the socket behind rc has bytes to read or has
// reached EOF, and returns how many bytes are queued (0 at EOF).
func waitQueued(rc syscall.RawConn) (int64, error) {
	var queued int64
	var serr error
	err := rc.Read(func(fd uintptr) bool {
		var b [1]byte
		n, _, err := unix.Recvfrom(int(fd), b[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
		switch {
		case err == unix.EAGAIN:
			return false // wait for the poller
		case err == unix.EINTR:
			return false
		case err != nil:
			serr = err
			return true
		case n == 0:
			return true // EOF
		}
		q, err := unix.IoctlGetInt(int(fd), unix.SIOCINQ)
		queued = max(int64(q), 1)
		if err != nil {
			queued = 1
		}
		return true
	})
	if err == nil {
		err = serr
	}
	return queued, err
}
