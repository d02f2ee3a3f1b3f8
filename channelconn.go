package hpcproxy

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"strconv"
	"time"

	"golang.org/x/crypto/ssh"
)

// openDirect opens a direct-tcpip channel to addr ("host:port"; the name
// is resolved by the SSH server) on c, as c.Dial does, but lighter. For
// each channel c.Dial starts a goroutine that drains the channel's stderr
// through an 8 KiB buffer it holds for the channel's life, although a
// direct-tcpip channel never carries stderr (sshd sends none), and another
// goroutine that answers the channel's requests, of which sshd sends none
// either: at 10,000 held connections those were 20,000 goroutines and
// 80 MiB of buffers. A channelConn answers requests itself, whenever it is
// read or written (x/crypto queues 16 per channel before it stalls the
// connection: a server that sends more to an idle channel can stall the
// tunnel, as it could by dropping it).
func openDirect(c *ssh.Client, addr string) (net.Conn, error) {
	host, portStr, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, err
	}
	port, err := strconv.ParseUint(portStr, 10, 16)
	if err != nil {
		return nil, fmt.Errorf("bad port %q", portStr)
	}
	// RFC 4254, 7.2: host and port to connect, originator address and
	// port (we have none to give: x/crypto sends 0.0.0.0:0 too).
	ch, reqs, err := c.OpenChannel("direct-tcpip", directTCPIPPayload(host, uint32(port)))
	if err != nil {
		return nil, err
	}
	return &channelConn{Channel: ch, reqs: reqs, remote: channelAddr(addr)}, nil
}

// directTCPIPPayload encodes a direct-tcpip channel's type-specific data
// (RFC 4254, 7.2) as ssh.Marshal would, without its reflection: host,
// port, then the originator's address and port, 0.0.0.0:0 (we have none
// to give; x/crypto's Client.Dial sends the same).
func directTCPIPPayload(host string, port uint32) []byte {
	const orig = "0.0.0.0"
	b := make([]byte, 0, 4+len(host)+4+4+len(orig)+4)
	b = binary.BigEndian.AppendUint32(b, uint32(len(host)))
	b = append(b, host...)
	b = binary.BigEndian.AppendUint32(b, port)
	b = binary.BigEndian.AppendUint32(b, uint32(len(orig)))
	b = append(b, orig...)
	return binary.BigEndian.AppendUint32(b, 0)
}

// openDirectContext is openDirect bounded by ctx: a channel that opens
// after ctx ended is closed, never leaked.
func openDirectContext(ctx context.Context, c *ssh.Client, addr string) (net.Conn, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	type result struct {
		c   net.Conn
		err error
	}
	ch := make(chan result)
	go func() {
		conn, err := openDirect(c, addr)
		select {
		case ch <- result{conn, err}:
		case <-ctx.Done():
			if conn != nil {
				_ = conn.Close()
			}
		}
	}()
	select {
	case r := <-ch:
		return r.c, r.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// channelConn is a direct-tcpip channel as a net.Conn.
type channelConn struct {
	ssh.Channel
	reqs   <-chan *ssh.Request
	remote net.Addr
}

// Read reads from the channel, then answers the requests it received.
func (c *channelConn) Read(p []byte) (int, error) {
	n, err := c.Channel.Read(p)
	c.answerRequests()
	return n, err
}

// Write writes to the channel, then answers the requests it received.
func (c *channelConn) Write(p []byte) (int, error) {
	n, err := c.Channel.Write(p)
	c.answerRequests()
	return n, err
}

// answerRequests refuses the requests queued on the channel (as
// ssh.DiscardRequests does), without waiting for more.
func (c *channelConn) answerRequests() {
	for {
		select {
		case r, ok := <-c.reqs:
			if !ok {
				return
			}
			if r.WantReply {
				_ = r.Reply(false, nil)
			}
		default:
			return
		}
	}
}

var errChannelDeadline = errors.New("hpcproxy: an SSH channel does not support deadlines")

// LocalAddr returns the zero TCP address: the channel has no local end of
// its own.
func (c *channelConn) LocalAddr() net.Addr { return &net.TCPAddr{IP: net.IPv4zero} }

// RemoteAddr returns the address the channel was opened to, as given
// (a name is not resolved here).
func (c *channelConn) RemoteAddr() net.Addr { return c.remote }

// SetDeadline and its kin fail: an SSH channel has no deadlines (x/crypto's
// own channel conns have none either).
func (c *channelConn) SetDeadline(time.Time) error      { return errChannelDeadline }
func (c *channelConn) SetReadDeadline(time.Time) error  { return errChannelDeadline }
func (c *channelConn) SetWriteDeadline(time.Time) error { return errChannelDeadline }

// channelAddr is the "host:port" a channel was opened to.
type channelAddr string

func (a channelAddr) Network() string { return "tcp" }
func (a channelAddr) String() string  { return string(a) }
