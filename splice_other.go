//go:build !linux

package hpcproxy

import (
	"io"
	"net"
)

// spliceCopy copies src to dst; Go splices on Linux only.
func (c *copier) spliceCopy(src net.Conn, dst *net.TCPConn) error {
	n, err := io.Copy(dst, src)
	c.count.Add(n)
	return err
}
