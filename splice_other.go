//go:build !linux

package hpcproxy

import (
	"io"
	"net"
	"os"
	"sync/atomic"
	"syscall"
)

// spliceCopy copies src to dst; Go splices on Linux only.
func (c *copier) spliceCopy(src net.Conn, dst *net.TCPConn) error {
	n, err := io.Copy(dst, src)
	c.count.Add(n)
	return err
}

// newHandoffPipe fails: handoffs splice, which only Linux has.
func newHandoffPipe() (r, w *os.File, err error) { return nil, nil, errNoHandoff }

// spliceFromPipe is never reached without newHandoffPipe.
func spliceFromPipe(pipe *os.File, dst syscall.Conn, count *atomic.Int64) error {
	return errNoHandoff
}
