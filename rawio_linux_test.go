package hpcproxy

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// rawPair returns a connected pair of sockets of network ("tcp" over
// loopback, or "unix"), the first wrapped by withRawIO.
func rawPair(t *testing.T, network string) (raw net.Conn, peer net.Conn) {
	t.Helper()
	addr := "127.0.0.1:0"
	if network == "unix" {
		addr = filepath.Join(t.TempDir(), "s")
	}
	ln, err := net.Listen(network, addr)
	require.NoError(t, err)
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		accepted <- c
	}()
	c, err := net.Dial(network, ln.Addr().String())
	require.NoError(t, err)
	p := <-accepted
	require.NotNil(t, p)
	t.Cleanup(func() { c.Close(); p.Close() })
	rc := withRawIO(c)
	require.IsType(t, &rawConn{}, rc)
	return rc, p
}

func TestRawIO(t *testing.T) {
	for _, network := range []string{"tcp", "unix"} {
		t.Run(network, func(t *testing.T) {
			t.Run("both ways, then EOF", func(t *testing.T) {
				c, p := rawPair(t, network)
				_, err := c.Write([]byte("hello"))
				require.NoError(t, err)
				buf := make([]byte, 5)
				_, err = io.ReadFull(p, buf)
				require.NoError(t, err)
				assert.Equal(t, "hello", string(buf))

				_, err = p.Write([]byte("world"))
				require.NoError(t, err)
				_, err = io.ReadFull(c, buf)
				require.NoError(t, err)
				assert.Equal(t, "world", string(buf))

				n, err := c.Read(nil)
				assert.Equal(t, 0, n)
				assert.NoError(t, err, "a zero-length read returns at once")

				require.NoError(t, p.Close())
				_, err = c.Read(buf)
				assert.ErrorIs(t, err, io.EOF)
			})

			t.Run("a large write waits for room", func(t *testing.T) {
				c, p := rawPair(t, network)
				want := bytes.Repeat([]byte("0123456789abcdef"), 1<<18) // 4 MiB: more than the socket buffers
				done := make(chan error, 1)
				go func() {
					_, err := c.Write(want)
					done <- err
				}()
				time.Sleep(50 * time.Millisecond) // let the writer fill the buffers and wait
				got, err := io.ReadAll(io.LimitReader(p, int64(len(want))))
				require.NoError(t, err)
				require.NoError(t, <-done)
				assert.True(t, bytes.Equal(want, got), "every byte, in order")
			})

			t.Run("read deadline", func(t *testing.T) {
				c, _ := rawPair(t, network)
				require.NoError(t, c.SetReadDeadline(time.Now().Add(20*time.Millisecond)))
				_, err := c.Read(make([]byte, 1))
				require.ErrorIs(t, err, os.ErrDeadlineExceeded)
				var ne net.Error
				require.ErrorAs(t, err, &ne)
				assert.True(t, ne.Timeout())
				assert.Contains(t, err.Error(), "read ", "worded as net.Conn's own Read")
				assert.NotContains(t, err.Error(), "raw-read")
			})

			t.Run("close ends a waiting read", func(t *testing.T) {
				c, _ := rawPair(t, network)
				done := make(chan error, 1)
				go func() {
					_, err := c.Read(make([]byte, 1))
					done <- err
				}()
				time.Sleep(20 * time.Millisecond)
				require.NoError(t, c.Close())
				select {
				case err := <-done:
					assert.ErrorIs(t, err, net.ErrClosed)
				case <-time.After(5 * time.Second):
					t.Fatal("Read still waits after Close")
				}
			})

			t.Run("CloseWrite half-closes", func(t *testing.T) {
				c, p := rawPair(t, network)
				_, err := c.Write([]byte("last"))
				require.NoError(t, err)
				require.NoError(t, c.(closeWriter).CloseWrite())
				got, err := io.ReadAll(p)
				require.NoError(t, err)
				assert.Equal(t, "last", string(got), "the bytes, then EOF")
				_, err = p.Write([]byte("back"))
				require.NoError(t, err)
				buf := make([]byte, 4)
				_, err = io.ReadFull(c, buf)
				require.NoError(t, err, "the other direction stays open")
				assert.Equal(t, "back", string(buf))
			})

			t.Run("write to a closed peer", func(t *testing.T) {
				c, p := rawPair(t, network)
				require.NoError(t, p.Close())
				var err error
				for range 100 {
					if _, err = c.Write(make([]byte, 64<<10)); err != nil {
						break
					}
					time.Sleep(time.Millisecond)
				}
				require.Error(t, err)
				assert.True(t, errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNRESET), "%v", err)
				var oe *net.OpError
				require.ErrorAs(t, err, &oe)
				assert.Equal(t, "write", oe.Op)
			})
		})
	}
}

func TestWithRawIOLeavesOtherConns(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	assert.Same(t, a, withRawIO(a), "not a socket: unchanged")
}

func TestQuickAck(t *testing.T) {
	var rearms atomic.Int32
	old := quickAckRearm
	quickAckRearm = func(uintptr) { rearms.Add(1) }
	defer func() { quickAckRearm = old }()

	c, p := rawPair(t, "tcp")
	q := withQuickAck(c)
	require.IsType(t, &quickAckConn{}, q)
	_, err := p.Write([]byte("ack me"))
	require.NoError(t, err)
	_, err = io.ReadFull(q, make([]byte, 6))
	require.NoError(t, err)
	assert.Equal(t, int32(1), rearms.Load(), "a small read re-arms")

	_, err = p.Write(make([]byte, 2*quickAckBelow))
	require.NoError(t, err)
	time.Sleep(20 * time.Millisecond) // all of it queued, so one read takes quickAckBelow or more
	n, err := q.Read(make([]byte, 2*quickAckBelow))
	require.NoError(t, err)
	if n >= quickAckBelow {
		assert.Equal(t, int32(1), rearms.Load(), "bulk reads do not re-arm")
	}
}
