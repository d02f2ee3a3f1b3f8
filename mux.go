package hpcproxy

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"math"
	"net"
	"sync"
)

// protocol is what the first byte of a connection says the client speaks.
type protocol byte

const (
	protoHTTP   protocol = 0
	protoSOCKS4 protocol = 4
	protoSOCKS5 protocol = 5
)

func (p protocol) String() string {
	switch p {
	case protoSOCKS4:
		return "socks4"
	case protoSOCKS5:
		return "socks5"
	}
	return "http"
}

// sniffProtocol maps the first byte of a connection to its protocol: 0x05
// SOCKS5, 0x04 SOCKS4/4a, anything else HTTP (a request line starts with
// a letter).
func sniffProtocol(b byte) protocol {
	switch b {
	case 0x05:
		return protoSOCKS5
	case 0x04:
		return protoSOCKS4
	}
	return protoHTTP
}

// maxHeaderBytes bounds one HTTP request's header block, request line
// included: Squid's request_header_max_size (64 KiB). A longer one gets
// 431.
const maxHeaderBytes = 64 << 10

// maxSOCKSHandshake bounds what a SOCKS handshake may read: the largest
// valid SOCKS5 one (greeting, RFC 1929 username/password, request with a
// 255-byte name) is 1,032 bytes, a SOCKS4a one 777.
const maxSOCKSHandshake = 4 << 10

// clientConn is an accepted connection while its handshake is read: the
// raw conn, and a buffered reader over it that may hold bytes the client
// sent after its request (the start of the tunnelled stream, or the next
// pipelined HTTP request). The relay writes those first, then copies from
// the raw conn, so that nothing wraps the raw conn on the hot path. The
// handshake reads and writes through io: the raw conn with raw-system-call
// I/O (rawio_linux.go).
type clientConn struct {
	raw net.Conn
	io  net.Conn
	lr  limitedReader
	br  *bufio.Reader
}

func newClientConn(raw net.Conn) *clientConn {
	c := &clientConn{raw: raw, io: withRawIO(raw)}
	c.lr = limitedReader{r: c.io, n: maxHeaderBytes}
	c.br = readerPool.Get().(*bufio.Reader)
	c.br.Reset(&c.lr)
	return c
}

// readerPool holds the handshake readers that takeBuffered gave back: a
// relay starts without one, so each connection need not allocate its own
// 4 KiB buffer.
var readerPool = sync.Pool{New: func() any { return bufio.NewReader(nil) }}

// sniff waits for the first byte and says which protocol it starts.
func (c *clientConn) sniff() (protocol, error) {
	b, err := c.br.Peek(1)
	if err != nil {
		return 0, fmt.Errorf("hpcproxy: read first byte: %w", err)
	}
	return sniffProtocol(b[0]), nil
}

// limitHeader allows n more bytes to be read from the raw conn (for a
// header block); unlimit lifts the limit (for bodies and relays).
func (c *clientConn) limitHeader() { c.lr.n = maxHeaderBytes }
func (c *clientConn) unlimit()     { c.lr.n = math.MaxInt64 }

// limitSOCKS bounds the rest of a SOCKS handshake, counting what sniff
// has buffered already.
func (c *clientConn) limitSOCKS() {
	c.lr.n = max(0, maxSOCKSHandshake-int64(c.br.Buffered()))
}

// takeBuffered returns the bytes read from the client but not yet
// consumed, and drops the reader: afterwards only the raw conn is read.
func (c *clientConn) takeBuffered() []byte {
	if c.br == nil {
		return nil
	}
	n := c.br.Buffered()
	var b []byte
	if n > 0 {
		b, _ = c.br.Peek(n) // cannot fail: n bytes are buffered
		b = bytes.Clone(b)  // the reader goes back to the pool
	}
	c.br.Reset(nil)
	readerPool.Put(c.br)
	c.br = nil
	return b
}

// limitedReader is io.LimitedReader with a settable limit that reports
// running out as an error (a header block that is too long), not EOF.
type limitedReader struct {
	r io.Reader
	n int64
}

var errHeaderTooLong = fmt.Errorf("hpcproxy: request header longer than %d bytes", maxHeaderBytes)

func (l *limitedReader) Read(p []byte) (int, error) {
	if l.n <= 0 {
		return 0, errHeaderTooLong
	}
	if int64(len(p)) > l.n {
		p = p[:l.n]
	}
	n, err := l.r.Read(p)
	l.n -= int64(n)
	return n, err
}
