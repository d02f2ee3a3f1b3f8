package hpcproxy

import (
	"fmt"
	"io"
	"net"
	"os"
	"sync/atomic"
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

// newHandoffPipe returns a non-blocking pipe: the read end as a pollable
// file, the write end to pass to the master.
func newHandoffPipe() (r, w *os.File, err error) {
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		return nil, nil, fmt.Errorf("hpcproxy: pipe: %w", err)
	}
	return os.NewFile(uintptr(p[0]), "handoff-out"), os.NewFile(uintptr(p[1]), "handoff-out-peer"), nil
}

// maxSpliceChunk bounds one splice(2) from the pipe, which holds
// defaultPipeSize bytes until a bulk stream grows it to maxSpliceChunk.
const (
	maxSpliceChunk  = 1 << 20
	defaultPipeSize = 64 << 10
)

// spliceFromPipe splices pipe to dst until the pipe's write end is closed
// and it is empty. It waits for the pipe without holding dst's descriptor,
// and holds dst's (through its RawConn) during each splice, so that a
// concurrent Close of dst cannot hand the number to another socket under
// it.
func spliceFromPipe(pipe *os.File, dst syscall.Conn, count *atomic.Int64) error {
	prc, err := pipe.SyscallConn()
	if err != nil {
		return err
	}
	drc, err := dst.SyscallConn()
	if err != nil {
		return err
	}
	grown := false
	for {
		var n int64
		var serr error
		err := prc.Read(func(pfd uintptr) bool {
			// Whether the pipe held bytes before the splice tells an
			// EAGAIN for a full dst from one for an empty pipe: only
			// this loop takes bytes out of it. (Asking after the EAGAIN
			// could count bytes that came since, and wait for room in a
			// dst that has room: a stall, seen.)
			q, qerr := unix.IoctlGetInt(int(pfd), unix.TIOCINQ)
			hadBytes := qerr != nil || q > 0
			if !grown && q >= defaultPipeSize {
				// A full pipe: a bulk stream. A larger pipe lets the
				// master write more per round of its loop, and this
				// loop splice more per wake-up. (Unprivileged users may
				// not grow pipes past pipe-user-pages-soft in all; then
				// it stays as it is.)
				grown = true
				_, _ = unix.FcntlInt(pfd, unix.F_SETPIPE_SZ, maxSpliceChunk)
			}
			empty := false
			werr := drc.Write(func(dfd uintptr) bool {
				for {
					n, serr = unix.Splice(int(pfd), nil, int(dfd), nil, maxSpliceChunk, unix.SPLICE_F_NONBLOCK|unix.SPLICE_F_MOVE)
					if serr != unix.EINTR {
						break
					}
				}
				if serr != unix.EAGAIN {
					return true
				}
				if hadBytes {
					return false // dst is full: wait until it can take more
				}
				empty = true
				return true
			})
			if werr != nil {
				serr = werr
				return true
			}
			return !empty // wait for the pipe
		})
		if err == nil {
			err = serr
		}
		if err != nil {
			return err
		}
		if n == 0 {
			return nil // EOF
		}
		count.Add(n)
	}
}
