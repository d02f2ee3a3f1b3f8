//go:build !linux

package hpcproxy

import "net"

// withQuickAck returns c: TCP_QUICKACK is Linux-only.
func withQuickAck(c net.Conn) net.Conn { return c }
