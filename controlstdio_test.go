package hpcproxy

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/hpcproxy/hpcproxy/internal/sshtest"
	"github.com/hpcproxy/hpcproxy/internal/testenv"
)

// TestControlMasterStdio checks the connections of the controlmaster
// method: stdio forwards of the master while fewer than maxStdioConns are
// open, proxy-mode channels beyond, both carrying bytes and half-closes in
// both directions.
func TestControlMasterStdio(t *testing.T) {
	testenv.LookPath(t, "ssh")
	sshd := sshtest.StartSSHD(t, sshtest.Options{})
	tun := testTunnel(t, sshd, MethodControlMaster)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	// The destination answers, half-closes, and then reports how many
	// bytes it still received after that.
	after := make(chan int, 4)
	dest := serveTCP(t, "127.0.0.1:0", func(c net.Conn) {
		buf := make([]byte, 5)
		if _, err := io.ReadFull(c, buf); err != nil {
			return
		}
		_, _ = c.Write([]byte("world"))
		_ = c.(*net.TCPConn).CloseWrite()
		n, _ := io.Copy(io.Discard, c)
		after <- int(n)
	})

	// check exchanges "hello"/"world" over c, reads the destination's EOF,
	// then sends more and half-closes. fullDuplex: the destination gets
	// those bytes (an SSH channel); else it gets none (a stdio forward,
	// whose master stops reading at the far side's EOF, as ssh -W does).
	check := func(t *testing.T, c net.Conn, fullDuplex bool) {
		t.Helper()
		defer c.Close()
		_, err := c.Write([]byte("hello"))
		require.NoError(t, err)
		got, err := io.ReadAll(c) // EOF: the destination half-closed
		require.NoError(t, err)
		require.Equal(t, "world", string(got))
		_, _ = c.Write([]byte("more bytes"))
		_ = c.(closeWriter).CloseWrite()
		want := 0
		if fullDuplex {
			want = len("more bytes")
		}
		select {
		case n := <-after:
			require.Equal(t, want, n)
		case <-time.After(10 * time.Second):
			t.Fatal("the destination's connection never ended")
		}
	}

	t.Run("stdio forward", func(t *testing.T) {
		c, err := tun.Dial(ctx, "tcp", dest)
		require.NoError(t, err)
		require.IsType(t, &stdioConn{}, c)
		check(t, c, false)
	})
	t.Run("close ends the destination's connection at once", func(t *testing.T) {
		// Closed mid-connection (a client that went away, a closed
		// Server), with the master idle: the login node must hear of it
		// then, not at the master's next keepalive a minute later.
		ended := make(chan struct{}, 1)
		idle := serveTCP(t, "127.0.0.1:0", func(c net.Conn) {
			_, _ = io.Copy(c, c)
			ended <- struct{}{}
		})
		for i := range 20 {
			c, err := tun.Dial(ctx, "tcp", idle)
			require.NoError(t, err)
			require.IsType(t, &stdioConn{}, c)
			echoCheck(t, c, "x")
			require.NoError(t, c.Close())
			select {
			case <-ended:
			case <-time.After(5 * time.Second):
				t.Fatalf("connection %d: the destination's connection outlived the closed forward", i)
			}
		}
	})
	t.Run("a burst gets stdio forwards", func(t *testing.T) {
		// More connections at once than the master's control socket has
		// backlog for (64): each must wait for room, not fall back to a
		// proxy-mode channel (before dialUnix, 94 of 400 did).
		const n = 300
		conns := make([]net.Conn, n)
		errs := make([]error, n)
		var wg sync.WaitGroup
		start := make(chan struct{})
		for i := range n {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				conns[i], errs[i] = tun.Dial(ctx, "tcp", dest)
			}()
		}
		close(start)
		wg.Wait()
		stdio := 0
		for i, c := range conns {
			require.NoError(t, errs[i], "connection %d", i)
			if _, ok := c.(*stdioConn); ok {
				stdio++
			}
			c.Close()
		}
		assert.Equal(t, n, stdio, "stdio forwards of %d connections at once", n)
	})
	// beyondCap holds a stdio forward through first, checks that second
	// then gets a proxy-mode connection, and returns what second gets
	// once the held forward is closed.
	beyondCap := func(t *testing.T, first, second *Tunnel, beyond, freed string) net.Conn {
		held, err := first.Dial(ctx, "tcp", dest)
		require.NoError(t, err)
		defer held.Close()
		require.IsType(t, &stdioConn{}, held)
		c, err := second.Dial(ctx, "tcp", dest)
		require.NoError(t, err)
		_, isStdio := c.(*stdioConn)
		require.False(t, isStdio, beyond)
		check(t, c, true)
		held.Close()
		c, err = second.Dial(ctx, "tcp", dest)
		require.NoError(t, err)
		require.IsType(t, &stdioConn{}, c, freed)
		return c
	}
	t.Run("proxy mode beyond the cap", func(t *testing.T) {
		old := maxStdioConns
		maxStdioConns = 1
		defer func() { maxStdioConns = old }()
		c := beyondCap(t, tun, tun, "got a stdio forward beyond the cap", "a closed stdio forward must free its slot")
		c.Close()
	})
	t.Run("the cap counts every master of the process", func(t *testing.T) {
		old := stdioCap
		stdioCap = func() int { return 1 }
		defer func() { stdioCap = old }()
		other := testTunnel(t, sshd, MethodControlMaster) // a second master
		c := beyondCap(t, tun, other, "the other master opened a stdio forward beyond the process's cap",
			"a stdio forward closed on one master frees the slot for another")
		check(t, c, false)
	})
	t.Run("refused", func(t *testing.T) {
		// The master only says "refused by peer"; the proxy-mode retry
		// tells why.
		_, err := tun.Dial(ctx, "tcp", closedPort(t))
		require.ErrorIs(t, err, syscall.ECONNREFUSED)
		var rde *RemoteDialError
		require.True(t, errors.As(err, &rde), "got %T", err)
	})
	t.Run("prohibited", func(t *testing.T) {
		sshd := sshtest.StartSSHD(t, sshtest.Options{Config: []string{"PermitOpen 127.0.0.1:1"}})
		tun := testTunnel(t, sshd, MethodControlMaster)
		_, err := tun.Dial(ctx, "tcp", dest)
		require.ErrorIs(t, err, ErrProhibited)
	})
}

// TestRelaySplitConn relays between a TCP client and a connection made of
// two socket pairs, as a stdio forward is, checking both directions and
// both half-closes.
func TestRelaySplitConn(t *testing.T) {
	in, inPeer, err := socketPair()
	require.NoError(t, err)
	out, outPeer, err := socketPair()
	require.NoError(t, err)
	far := &stdioConn{r: out, w: in, ctl: in, addr: "test"}
	farIn, err := net.FileConn(inPeer)
	require.NoError(t, err)
	inPeer.Close()
	farOut, err := net.FileConn(outPeer)
	require.NoError(t, err)
	outPeer.Close()
	defer farIn.Close()
	defer farOut.Close()

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	client, err := net.Dial("tcp", ln.Addr().String())
	require.NoError(t, err)
	defer client.Close()
	server, err := ln.Accept()
	require.NoError(t, err)

	var bytesIn, bytesOut atomic.Int64
	done := make(chan error, 1)
	go func() { done <- relay(server, far, relayConfig{in: &bytesIn, out: &bytesOut}) }()

	payload := make([]byte, 4<<20)
	for i := range payload {
		payload[i] = byte(i)
	}
	go func() {
		_, _ = client.Write(payload)
		_ = client.(*net.TCPConn).CloseWrite()
	}()
	got, err := io.ReadAll(farIn) // what the master would read
	require.NoError(t, err)
	require.Equal(t, payload, got)
	_, err = farOut.Write([]byte("reply"))
	require.NoError(t, err)
	require.NoError(t, farOut.Close()) // the master closes its stdout
	back, err := io.ReadAll(client)
	require.NoError(t, err)
	require.Equal(t, "reply", string(back))
	select {
	case err := <-done:
		require.NoError(t, err)
	case <-time.After(10 * time.Second):
		t.Fatal("relay did not end")
	}
	require.EqualValues(t, len(payload), bytesIn.Load())
	require.EqualValues(t, len("reply"), bytesOut.Load())
}
