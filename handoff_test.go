package hpcproxy

import (
	"bytes"
	"context"
	"io"
	"net"
	"path/filepath"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/hpcproxy/hpcproxy/internal/sshtest"
	"github.com/hpcproxy/hpcproxy/internal/testenv"
)

// socks5Open does a SOCKS5 handshake for target on c (the request and
// then extra in one write) and returns the reply code.
func socks5Open(t *testing.T, c net.Conn, target string, extra []byte) byte {
	t.Helper()
	require.NoError(t, c.SetDeadline(time.Now().Add(10*time.Second)))
	_, err := c.Write([]byte{5, 1, 0})
	require.NoError(t, err)
	var b [10]byte
	_, err = io.ReadFull(c, b[:2])
	require.NoError(t, err)
	_, err = c.Write(append(socks5Connect([4]byte{127, 0, 0, 1}, portOf(t, target)), extra...))
	require.NoError(t, err)
	n, err := io.ReadFull(c, b[:])
	require.NoError(t, err, "reply %x", b[:n])
	require.Equal(t, byte(5), b[0])
	require.NoError(t, c.SetDeadline(time.Time{}))
	return b[1]
}

// TestControlMasterHandoff checks the Server handing clients' sockets to
// a real OpenSSH master, in both modes, and relaying as before (off): bytes and half-closes both ways, a
// banner the destination sends on accept arriving after the reply,
// refusals (with their precise code, or, optimistic, a close after the
// success reply), and a client whose first bytes came with its request
// (relayed as before).
func TestControlMasterHandoff(t *testing.T) {
	testenv.LookPath(t, "ssh")
	sshd := sshtest.StartSSHD(t, sshtest.Options{})
	tun := testTunnel(t, sshd, MethodControlMaster)
	for _, mode := range []HandoffMode{HandoffOff, HandoffPipe, HandoffOptimistic} {
		t.Run(mode.String(), func(t *testing.T) { testHandoff(t, tun, mode) })
	}
	// A daemon's tunnel is a pool (MaxConnections 8 by default): the
	// handoff goes through it to a member.
	t.Run("pool", func(t *testing.T) {
		pool := pooledTunnel(t, sshd, MethodControlMaster, 2)
		require.IsType(t, &poolTunnel{}, pool.impl)
		for _, mode := range []HandoffMode{HandoffPipe, HandoffOptimistic} {
			t.Run(mode.String(), func(t *testing.T) { testHandoff(t, pool, mode) })
		}
		p := pool.impl.(*poolTunnel)
		require.Eventually(t, func() bool {
			p.mu.Lock()
			defer p.mu.Unlock()
			for _, m := range p.members {
				if m.active.Load() != 0 {
					return false
				}
			}
			return true
		}, 10*time.Second, 10*time.Millisecond, "closed handoffs are released from their member")
	})
}

func testHandoff(t *testing.T, tun *Tunnel, mode HandoffMode) {
	srv := &Server{Dial: tun.Dial, handoff: tun, handoffMode: mode}
	proxyAddr := startServer(t, srv)
	dial := func(t *testing.T) net.Conn {
		c, err := net.DialTimeout("tcp", proxyAddr, 5*time.Second)
		require.NoError(t, err)
		t.Cleanup(func() { c.Close() })
		return c
	}

	after := make(chan int, 1)
	halfClose := serveTCP(t, "127.0.0.1:0", func(c net.Conn) {
		buf := make([]byte, 5)
		if _, err := io.ReadFull(c, buf); err != nil {
			return
		}
		_, _ = c.Write(bytes.Repeat(buf, 100000)) // 500 KB: several pipefuls
		_ = c.(*net.TCPConn).CloseWrite()
		n, _ := io.Copy(io.Discard, c)
		after <- int(n)
	})
	var echoLive atomic.Int64 // the echo server's open connections
	echo := serveTCP(t, "127.0.0.1:0", func(c net.Conn) {
		echoLive.Add(1)
		defer echoLive.Add(-1)
		_, _ = io.Copy(c, c)
		_ = c.(*net.TCPConn).CloseWrite()
	})
	const banner = "SSH-2.0-banner-first\r\n"
	bannerFirst := serveTCP(t, "127.0.0.1:0", func(c net.Conn) {
		_, _ = io.WriteString(c, banner)
		_, _ = io.Copy(io.Discard, c)
	})

	t.Run("half-close", func(t *testing.T) {
		in0, out0 := srv.bytesIn.Load(), srv.bytesOut.Load()
		c := dial(t)
		require.Equal(t, byte(socks5Succeeded), socks5Open(t, c, halfClose, nil))
		_, err := c.Write([]byte("hello"))
		require.NoError(t, err)
		require.NoError(t, c.SetDeadline(time.Now().Add(10*time.Second)))
		got, err := io.ReadAll(c) // EOF: the destination half-closed
		require.NoError(t, err)
		require.Equal(t, bytes.Repeat([]byte("hello"), 100000), got)
		// A stdio forward's master stops reading at the far side's EOF
		// (as ssh -W does): the destination gets nothing more.
		// (The master ends the forward at the destination's EOF, and the
		// daemon closes the client then: the late bytes may reset it.)
		_, _ = c.Write([]byte("more bytes"))
		_ = c.(*net.TCPConn).CloseWrite()
		select {
		case n := <-after:
			require.Equal(t, 0, n)
		case <-time.After(10 * time.Second):
			t.Fatal("the destination's connection never ended")
		}
		// Handed off: the upload went from the client to the master, and
		// so did the download if optimistic.
		if mode == HandoffOff {
			return
		}
		require.Equal(t, in0, srv.bytesIn.Load())
		if mode == HandoffOptimistic {
			require.Equal(t, out0, srv.bytesOut.Load())
		} else {
			require.Equal(t, out0+500000, srv.bytesOut.Load())
		}
	})
	t.Run("client half-closes first", func(t *testing.T) {
		c := dial(t)
		require.Equal(t, byte(socks5Succeeded), socks5Open(t, c, echo, nil))
		msg := bytes.Repeat([]byte("0123456789abcdef"), 512<<10) // 8 MiB
		go func() {
			_, _ = c.Write(msg)
			_ = c.(*net.TCPConn).CloseWrite()
		}()
		require.NoError(t, c.SetDeadline(time.Now().Add(20*time.Second)))
		got, err := io.ReadAll(c)
		require.NoError(t, err)
		require.Equal(t, len(msg), len(got))
		require.True(t, bytes.Equal(msg, got))
	})
	t.Run("banner after the reply", func(t *testing.T) {
		for range 20 {
			c := dial(t)
			require.Equal(t, byte(socks5Succeeded), socks5Open(t, c, bannerFirst, nil))
			got := make([]byte, len(banner))
			_, err := io.ReadFull(c, got)
			require.NoError(t, err)
			require.Equal(t, banner, string(got))
			c.Close()
		}
	})
	t.Run("refused", func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		require.NoError(t, err)
		closed := ln.Addr().String()
		ln.Close()
		c := dial(t)
		if mode != HandoffOptimistic {
			require.Equal(t, byte(socks5ConnectionRefused), socks5Open(t, c, closed, nil))
			return
		}
		// Optimistic: success, then closed without a byte, as ssh -D does.
		require.Equal(t, byte(socks5Succeeded), socks5Open(t, c, closed, nil))
		require.NoError(t, c.SetDeadline(time.Now().Add(10*time.Second)))
		got, err := io.ReadAll(c)
		require.NoError(t, err)
		require.Empty(t, got)
	})
	t.Run("early data", func(t *testing.T) {
		in0 := srv.bytesIn.Load()
		c := dial(t)
		require.Equal(t, byte(socks5Succeeded), socks5Open(t, c, echo, []byte("early")))
		got := make([]byte, 5)
		_, err := io.ReadFull(c, got)
		require.NoError(t, err)
		require.Equal(t, "early", string(got))
		echoCheck(t, c, "later")
		require.NoError(t, c.(*net.TCPConn).CloseWrite())
		_, err = io.ReadAll(c)
		require.NoError(t, err)
		// Relayed, not handed off: the daemon counted the upload.
		require.Eventually(t, func() bool { return srv.bytesIn.Load() == in0+10 }, 5*time.Second, 10*time.Millisecond)
	})
	t.Run("HTTP CONNECT", func(t *testing.T) {
		c := dial(t)
		require.NoError(t, c.SetDeadline(time.Now().Add(10*time.Second)))
		_, err := io.WriteString(c, "CONNECT "+bannerFirst+" HTTP/1.1\r\nHost: "+bannerFirst+"\r\n\r\n")
		require.NoError(t, err)
		want := "HTTP/1.1 200 Connection established\r\n\r\n" + banner
		got := make([]byte, len(want))
		_, err = io.ReadFull(c, got)
		require.NoError(t, err)
		require.Equal(t, want, string(got))
	})
	t.Run("unix socket client", func(t *testing.T) {
		ln, err := net.Listen("unix", filepath.Join(t.TempDir(), "proxy.sock"))
		require.NoError(t, err)
		go func() { _ = srv.Serve(ln) }()
		c, err := net.DialTimeout("unix", ln.Addr().String(), 5*time.Second)
		require.NoError(t, err)
		defer c.Close()
		in0 := srv.bytesIn.Load()
		require.Equal(t, byte(socks5Succeeded), socks5Open(t, c, echo, nil))
		echoCheck(t, c, "through a unix socket")
		require.NoError(t, c.(*net.UnixConn).CloseWrite())
		got, err := io.ReadAll(c)
		require.NoError(t, err)
		require.Empty(t, got)
		if mode != HandoffOff {
			require.Equal(t, in0, srv.bytesIn.Load(), "handed off: the daemon saw no upload")
		}
	})
	t.Run("client close ends the handoff", func(t *testing.T) {
		c := dial(t)
		require.Equal(t, byte(socks5Succeeded), socks5Open(t, c, echo, nil))
		echoCheck(t, c, "x")
		require.Eventually(t, func() bool { return srv.Stats().Active == 1 }, 5*time.Second, 10*time.Millisecond)
		c.Close()
		require.Eventually(t, func() bool { return srv.Stats().Active == 0 }, 10*time.Second, 10*time.Millisecond)
	})
	t.Run("server close ends handoffs", func(t *testing.T) {
		// The master holds copies of the client's socket: closing ours
		// is not enough, the forward must end, and with it the
		// destination's connection (relayed, the order in which the
		// forward's sockets close decides whether the master tells the
		// login node at once or at its next keepalive, a minute later).
		var cs []net.Conn
		for range 4 {
			c := dial(t)
			require.Equal(t, byte(socks5Succeeded), socks5Open(t, c, echo, nil))
			echoCheck(t, c, "x")
			cs = append(cs, c)
		}
		require.NoError(t, srv.Close())
		for _, c := range cs {
			require.NoError(t, c.SetDeadline(time.Now().Add(10*time.Second)))
			_, err := io.ReadAll(c)
			if err != nil {
				require.ErrorIs(t, err, syscall.ECONNRESET)
			}
		}
		require.Eventually(t, func() bool { return echoLive.Load() == 0 }, 10*time.Second, 10*time.Millisecond,
			"the destination's connections outlive the closed server")
	})
}

func TestHandoffModeFlag(t *testing.T) {
	for _, m := range []HandoffMode{HandoffPipe, HandoffOptimistic, HandoffOff} {
		var got HandoffMode = -1
		require.NoError(t, got.Set(m.String()))
		require.Equal(t, m, got)
	}
	var m HandoffMode
	require.Error(t, m.Set("fast"))
	require.Equal(t, "HandoffMode(7)", HandoffMode(7).String())
}

// TestStdioForwardOneSocket gives a real master the same socket as a
// stdio forward's stdin and stdout, the way an optimistic handoff does,
// and checks that the destination's EOF reaches the client (OpenSSH closes
// the whole forward then, and with it the socket). It also measures, for
// the log, the race that makes the daemon write the reply before handing
// the socket over, never after: the master sends MUX_S_SESSION_OPENED from
// the open-confirm callback and writes what the destination sends at once
// (a banner) in the same loop, so a reply written after that message can
// come second; pause stands for the daemon being descheduled between the
// two (a busy login or compute node).
func TestStdioForwardOneSocket(t *testing.T) {
	testenv.LookPath(t, "ssh")
	sshd := sshtest.StartSSHD(t, sshtest.Options{})
	tun := testTunnel(t, sshd, MethodControlMaster)
	cm := tun.impl.(*controlMasterTunnel)
	const banner = "220 banner\r\n"
	dest := serveTCP(t, "127.0.0.1:0", func(c net.Conn) {
		_, _ = io.WriteString(c, banner)
		_ = c.(*net.TCPConn).CloseWrite()
		_, _ = io.Copy(io.Discard, c)
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()

	// round opens one forward and writes the reply after the master's
	// answer (and pause); it reports whether the banner came first.
	round := func(pause time.Duration) (bannerFirst bool) {
		client, err := net.Dial("tcp", ln.Addr().String())
		require.NoError(t, err)
		defer client.Close()
		server, err := ln.Accept()
		require.NoError(t, err)
		rc, err := server.(*net.TCPConn).SyscallConn()
		require.NoError(t, err)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		ctl, err := cm.stdioForward(ctx, dest, func(send func(stdin, stdout int) error) error {
			var serr error
			require.NoError(t, rc.Control(func(fd uintptr) { serr = send(int(fd), int(fd)) }))
			return serr
		})
		cancel()
		require.NoError(t, err)
		defer ctl.Close()
		time.Sleep(pause)
		_, err = server.Write([]byte("REPLY"))
		require.NoError(t, err)
		server.Close() // the master holds the socket now
		require.NoError(t, client.SetReadDeadline(time.Now().Add(10*time.Second)))
		got, err := io.ReadAll(client)
		require.NoError(t, err, "no EOF after the destination's")
		require.ElementsMatch(t, []byte("REPLY"+banner), got)
		return !bytes.HasPrefix(got, []byte("REPLY"))
	}
	const rounds = 50
	for _, pause := range []time.Duration{0, 5 * time.Millisecond, 50 * time.Millisecond} {
		n := 0
		for range rounds {
			if round(pause) {
				n++
			}
		}
		t.Logf("reply written %v after MUX_S_SESSION_OPENED: the banner came first in %d of %d rounds", pause, n, rounds)
	}
}

// TestHandoffTunnelCloseUsersMaster: a tunnel attached to the user's own
// ControlMaster (which outlives it) is closed while handoffs run through
// it: each forward must end at the login node then, and with it the
// destination's connection, not at the master's next keepalive a minute
// later.
func TestHandoffTunnelCloseUsersMaster(t *testing.T) {
	sshd := sshtest.StartSSHD(t, sshtest.Options{})
	cfgFile, _ := usersMaster(t, sshd)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	tun := attachUsersMaster(ctx, t, cfgFile)

	var live atomic.Int64
	echo := serveTCP(t, "127.0.0.1:0", func(c net.Conn) {
		live.Add(1)
		defer live.Add(-1)
		_, _ = io.Copy(c, c)
	})
	for _, mode := range []HandoffMode{HandoffPipe, HandoffOptimistic} {
		srv := &Server{Dial: tun.Dial, handoff: tun, handoffMode: mode}
		proxyAddr := startServer(t, srv)
		for range 8 {
			c, err := net.DialTimeout("tcp", proxyAddr, 5*time.Second)
			require.NoError(t, err)
			defer c.Close()
			require.Equal(t, byte(socks5Succeeded), socks5Open(t, c, echo, nil))
			echoCheck(t, c, "x")
		}
	}
	require.Equal(t, int64(16), live.Load())
	require.NoError(t, tun.Close())
	require.Eventually(t, func() bool { return live.Load() == 0 }, 10*time.Second, 10*time.Millisecond,
		"%d destination connections outlive the closed tunnel", live.Load())
}
