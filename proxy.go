package hpcproxy

import (
	"context"
	"net"
)

// DialFunc dials a network connection to addr. Compatible with
// net.Dialer.DialContext and http.Transport.DialContext.
type DialFunc func(ctx context.Context, network, addr string) (net.Conn, error)
