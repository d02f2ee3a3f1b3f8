package hpcproxy

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// relayConfig is what a relay needs besides its two conns.
type relayConfig struct {
	// early holds bytes the client sent after its request that were read
	// into the handshake buffer; they reach the destination first.
	early []byte
	// idle closes both conns after this long without a byte either way;
	// zero means never.
	idle time.Duration
	// in and out count bytes client->dest and dest->client.
	in, out *atomic.Int64
}

// errIdle reports a relay closed by the idle timeout.
var errIdle = errors.New("hpcproxy: relay idle timeout")

// relay copies between client and dst in both directions until both
// directions have ended, then closes both conns. It is the one relay of
// the package: two named copiers, each io.Copy then CloseWrite, so that a
// half-close on either side reaches the other. When one copier fails, both
// conns are closed at once, which ends the other copier too.
//
// Between two kernel sockets (TCP, or a unix-socket client) the copiers hand
// the raw conns to io.Copy so that Linux splices without copying through
// user space. Other conns (SSH channels) are copied through pooled buffers
// that a copier holds only while data flows.
func relay(client, dst net.Conn, cfg relayConfig) error {
	var once sync.Once
	closeBoth := func() {
		once.Do(func() {
			client.Close()
			dst.Close()
		})
	}
	defer closeBoth()

	if len(cfg.early) > 0 {
		n, err := dst.Write(cfg.early)
		cfg.in.Add(int64(n))
		if err != nil {
			return fmt.Errorf("hpcproxy: relay early bytes: %w", err)
		}
	}

	var activity *atomic.Int64
	var idled atomic.Bool
	if cfg.idle > 0 {
		activity = new(atomic.Int64)
		activity.Store(time.Now().UnixNano())
		// The callback re-arms its own timer: t is published under mu
		// so that it never reads the variable before it is set.
		var mu sync.Mutex
		var t *time.Timer
		mu.Lock()
		t = time.AfterFunc(cfg.idle, func() {
			since := time.Since(time.Unix(0, activity.Load()))
			if since >= cfg.idle {
				idled.Store(true)
				closeBoth()
				return
			}
			mu.Lock()
			defer mu.Unlock()
			t.Reset(cfg.idle - since)
		})
		mu.Unlock()
		defer func() {
			mu.Lock()
			defer mu.Unlock()
			t.Stop()
		}()
	}

	up := &copier{name: "client->dest", dst: dst, src: client, count: cfg.in, activity: activity}
	down := &copier{name: "dest->client", dst: client, src: dst, count: cfg.out, activity: activity}
	errc := make(chan error, 1)
	go func() {
		err := down.run()
		if err != nil {
			closeBoth()
		}
		errc <- err
	}()
	err := up.run()
	if err != nil {
		closeBoth()
	}
	if derr := <-errc; err == nil {
		err = derr
	}
	if idled.Load() {
		return errIdle
	}
	return err
}

// copier copies one direction of a relay.
type copier struct {
	name     string
	dst, src net.Conn
	count    *atomic.Int64
	activity *atomic.Int64 // last byte's time in unix ns; nil: not watched
}

type closeWriter interface{ CloseWrite() error }

// run copies until src ends, then half-closes dst. A dst that cannot
// half-close is closed, which ends the relay.
func (c *copier) run() error {
	var err error
	src, dst := readSide(c.src), writeSide(c.dst)
	closeDst := c.dst
	if tcp, ok := dst.(*net.TCPConn); ok && c.activity == nil && kernelConn(src) {
		// The splice path: a raw socket to a raw TCP socket. (Go also
		// splices from TCP to a unix socket, but only without a limit,
		// which spliceCopy needs.)
		err = c.spliceCopy(src, tcp)
	} else {
		// Sockets read and written with raw system calls (rawio_linux.go).
		rdst := withRawIO(dst)
		if dst == c.dst {
			closeDst = rdst
		}
		err = c.copyBuffered(withRawIO(src), rdst)
	}
	if err != nil {
		return fmt.Errorf("hpcproxy: relay %s: %w", c.name, err)
	}
	cw, ok := closeDst.(closeWriter)
	if !ok {
		c.dst.Close()
		return nil
	}
	if err := cw.CloseWrite(); err != nil {
		return fmt.Errorf("hpcproxy: relay %s: half-close: %w", c.name, err)
	}
	return nil
}

// splitConn is a connection made of two sockets, one for each direction
// (a stdio forward of an OpenSSH master): the relay reads from one and
// writes to the other directly, so that it can splice.
type splitConn interface {
	readSide() net.Conn
	writeSide() net.Conn
}

// netConner is a wrapper that can say what it wraps (like tls.Conn).
type netConner interface{ NetConn() net.Conn }

// readSide returns what to read c's bytes from: the socket under wrappers
// and split connections that have one.
func readSide(c net.Conn) net.Conn {
	for {
		switch v := c.(type) {
		case splitConn:
			return v.readSide()
		case netConner:
			c = v.NetConn()
		default:
			return c
		}
	}
}

// writeSide returns what to write c's bytes to, like readSide.
func writeSide(c net.Conn) net.Conn {
	for {
		switch v := c.(type) {
		case splitConn:
			return v.writeSide()
		case netConner:
			c = v.NetConn()
		default:
			return c
		}
	}
}

// kernelConn reports whether c is a socket that Linux can splice from and
// to with io.Copy.
func kernelConn(c net.Conn) bool {
	switch c.(type) {
	case *net.TCPConn, *net.UnixConn:
		return true
	}
	return false
}

// Buffers for user-space copies, in three sizes. A copier takes one per
// read and gives it back once the bytes are written, so an idle relay
// holds no large buffer: it waits in Read with a 512-byte one. Each read picks
// the size that would have held the previous read, one size up when that
// read filled its buffer: a bulk stream climbs to the largest size within
// two reads and stays there while reads keep filling most of it, so it
// moves up to 256 KiB per read and write (an SSH channel returns all it has
// buffered; a socket all it has received), which means fewer system calls
// and, on an SSH channel, fewer window adjustments.
var (
	bufLens  = [...]int{512, 32 << 10, 256 << 10}
	bufPools [len(bufLens)]sync.Pool
)

func init() {
	for i, n := range bufLens {
		bufPools[i].New = func() any { b := make([]byte, n); return &b }
	}
}

// copyBuffered copies src to dst through pooled buffers until EOF, counting
// bytes as they flow.
func (c *copier) copyBuffered(src io.Reader, dst io.Writer) error {
	size := 0
	for {
		pool := &bufPools[size]
		bp := pool.Get().(*[]byte)
		buf := *bp
		nr, rerr := src.Read(buf)
		if nr > 0 {
			if c.activity != nil {
				c.activity.Store(time.Now().UnixNano())
			}
			nw, werr := dst.Write(buf[:nr])
			c.count.Add(int64(nw))
			if werr == nil && nw < nr {
				werr = io.ErrShortWrite
			}
			if werr != nil {
				pool.Put(bp)
				return werr
			}
		}
		pool.Put(bp)
		size = nextSize(size, nr)
		if rerr == io.EOF {
			return nil
		}
		if rerr != nil {
			return rerr
		}
	}
}

// nextSize returns the index of the buffer size for the read after one
// that returned n bytes into a buffer of index cur: one size up when the
// buffer was full, else the smallest size that would have held n.
func nextSize(cur, n int) int {
	if n == bufLens[cur] {
		return min(cur+1, len(bufLens)-1)
	}
	for i, l := range bufLens {
		if n <= l {
			return i
		}
	}
	return len(bufLens) - 1
}
