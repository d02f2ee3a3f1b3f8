package hpcproxy

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/hpcproxy/hpcproxy/internal/sshtest"
)

// conformanceMethods lists every tunnel method with what the suite may
// expect of it.
var conformanceMethods = []struct {
	method Method
	// refusedKnown: the method can tell "connection refused" apart from
	// other failures. `ssh -D` closes the SOCKS socket without a reply code
	// when a channel open fails; the SOCKS methods read the reason from
	// ssh's log.
	refusedKnown bool
	// closesConns: Close also ends connections already dialled.
	closesConns bool
}{
	{MethodGoSSH, true, true},
	{MethodControlMaster, true, true},
	{MethodSOCKSUnix, true, false},
	{MethodExec, true, false},
	{MethodDirect, true, false},
}

// TestTunnelConformance runs one suite against every tunnel method, each
// tunnelling through a real OpenSSH sshd (MethodDirect dials itself).
func TestTunnelConformance(t *testing.T) {
	// DEBUG1: sshd logs each direct-tcpip request's target as received.
	sshd := sshtest.StartSSHD(t, sshtest.Options{Config: []string{"LogLevel=DEBUG1"}})
	for _, tc := range conformanceMethods {
		t.Run(tc.method.String(), func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			tun, err := EstablishTunnel(ctx, TunnelConfig{
				Destination:   "sshtest",
				SSHConfigFile: sshd.SSHConfigFile,
				Methods:       []Method{tc.method},
				RuntimeDir:    sshtest.PrivateTempDir(t),
			})
			require.NoError(t, err, "sshd log:\n%s", sshd.Log())
			defer tun.Close()
			require.Equal(t, tc.method, tun.Method())
			echo := startEchoServer(t)
			_, port, _ := net.SplitHostPort(echo)

			t.Run("echo", func(t *testing.T) {
				c, err := tun.Dial(ctx, "tcp", echo)
				require.NoError(t, err)
				defer c.Close()
				_, err = c.Write([]byte("ping"))
				require.NoError(t, err)
				buf := make([]byte, 4)
				_, err = io.ReadFull(c, buf)
				require.NoError(t, err)
				require.Equal(t, "ping", string(buf))
			})
			t.Run("name resolved far side", func(t *testing.T) {
				// "localhost" resolves the same on both sides here, so the
				// echo alone proves nothing: sshd's log must show that it
				// received the name, not an address.
				c, err := tun.Dial(ctx, "tcp", net.JoinHostPort("localhost", port))
				require.NoError(t, err)
				defer c.Close()
				_, err = c.Write([]byte("x"))
				require.NoError(t, err)
				buf := make([]byte, 1)
				_, err = io.ReadFull(c, buf)
				require.NoError(t, err)
				if tc.method == MethodDirect {
					return // no login node: the name is resolved here
				}
				want := "server_request_direct_tcpip: originator "
				target := "target localhost port " + port
				found := func() bool {
					for line := range strings.Lines(sshd.Log()) {
						if strings.Contains(line, want) && strings.Contains(line, target) {
							return true
						}
					}
					return false
				}
				require.Eventually(t, found, 5*time.Second, 10*time.Millisecond,
					"sshd did not log a direct-tcpip request for %q; its requests:\n%s", target, directTCPIPLines(sshd.Log()))
			})
			t.Run("half-close", func(t *testing.T) {
				c, err := tun.Dial(ctx, "tcp", echo)
				require.NoError(t, err)
				defer c.Close()
				cw, ok := c.(interface{ CloseWrite() error })
				require.True(t, ok, "%T has no CloseWrite", c)
				msg := []byte("half-closed but still reading")
				_, err = c.Write(msg)
				require.NoError(t, err)
				require.NoError(t, cw.CloseWrite())
				got, err := io.ReadAll(c)
				require.NoError(t, err)
				require.Equal(t, msg, got)
			})
			t.Run("large transfer", func(t *testing.T) {
				c, err := tun.Dial(ctx, "tcp", echo)
				require.NoError(t, err)
				defer c.Close()
				payload := make([]byte, 8<<20)
				_, _ = rand.Read(payload)
				go func() {
					_, _ = c.Write(payload)
					_ = c.(interface{ CloseWrite() error }).CloseWrite()
				}()
				h := sha256.New()
				n, err := io.Copy(h, c)
				require.NoError(t, err)
				require.Equal(t, int64(len(payload)), n)
				want := sha256.Sum256(payload)
				require.Equal(t, want[:], h.Sum(nil), "payload corrupted")
			})
			t.Run("refused", func(t *testing.T) {
				closed := closedPort(t)
				c, err := tun.Dial(ctx, "tcp", closed)
				if err == nil {
					// A SOCKS method may accept first and fail on use.
					_, err = c.Read(make([]byte, 1))
					c.Close()
				}
				require.Error(t, err)
				if tc.refusedKnown {
					require.True(t, errors.Is(err, syscall.ECONNREFUSED), "got %v (%T), want ECONNREFUSED", err, err)
				}
			})
			t.Run("concurrent", func(t *testing.T) {
				var wg sync.WaitGroup
				errs := make(chan error, 16)
				for i := range 16 {
					wg.Add(1)
					go func() {
						defer wg.Done()
						errs <- echoOnce(ctx, tun, echo, []byte("conn "+strconv.Itoa(i)))
					}()
				}
				wg.Wait()
				close(errs)
				for err := range errs {
					require.NoError(t, err)
				}
			})
			t.Run("cancelled ctx", func(t *testing.T) {
				cctx, ccancel := context.WithCancel(ctx)
				ccancel()
				c, err := tun.Dial(cctx, "tcp", echo)
				if err == nil {
					c.Close()
				}
				require.Error(t, err)
			})
			t.Run("close", func(t *testing.T) {
				c, err := tun.Dial(ctx, "tcp", echo)
				require.NoError(t, err)
				defer c.Close()
				require.NoError(t, tun.Close())
				select {
				case <-tun.Done():
				case <-time.After(10 * time.Second):
					t.Fatal("Done did not fire after Close")
				}
				require.NoError(t, tun.Err())
				_, err = tun.Dial(ctx, "tcp", echo)
				require.ErrorIs(t, err, ErrTunnelDown)
				if tc.closesConns {
					_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
					_, err = c.Read(make([]byte, 1))
					require.Error(t, err, "conn outlived its tunnel")
				}
			})
		})
	}
}

// directTCPIPLines returns the direct-tcpip requests in an sshd log.
func directTCPIPLines(log string) string {
	var b strings.Builder
	for line := range strings.Lines(log) {
		if strings.Contains(line, "server_request_direct_tcpip") {
			b.WriteString(line)
		}
	}
	return b.String()
}

func echoOnce(ctx context.Context, tun *Tunnel, addr string, msg []byte) error {
	c, err := tun.Dial(ctx, "tcp", addr)
	if err != nil {
		return err
	}
	defer c.Close()
	if _, err := c.Write(msg); err != nil {
		return err
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil {
		return err
	}
	if !bytes.Equal(got, msg) {
		return fmt.Errorf("got %q, want %q", got, msg)
	}
	return nil
}

// serveTCP listens on addr ("127.0.0.1:0", "[::1]:0") and runs handle for
// each accepted conn, closing it afterwards, until the test ends; cleanup
// waits for every handler. It returns the listening address.
func serveTCP(t testing.TB, addr string, handle func(net.Conn)) string {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	require.NoError(t, err)
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				handle(c)
			}()
		}
	}()
	return ln.Addr().String()
}

// startEchoServer serves TCP echo on 127.0.0.1 until the test ends; it
// half-closes its side when the client does.
func startEchoServer(t testing.TB) string {
	t.Helper()
	return serveTCP(t, "127.0.0.1:0", func(c net.Conn) {
		_, _ = io.Copy(c, c)
		_ = c.(*net.TCPConn).CloseWrite()
	})
}

// startStreamSource serves an endless stream of bytes (a fixed pattern,
// not zeros, so nothing on the path can shortcut it) to every connection on
// 127.0.0.1, for throughput benchmarks.
func startStreamSource(b testing.TB) string {
	b.Helper()
	buf := make([]byte, 256<<10)
	for i := range buf {
		buf[i] = byte(i * 7)
	}
	return serveTCP(b, "127.0.0.1:0", func(c net.Conn) {
		for {
			if _, err := c.Write(buf); err != nil {
				return
			}
		}
	})
}

// closedPort returns 127.0.0.1:PORT where nothing listens.
func closedPort(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := ln.Addr().String()
	ln.Close()
	return addr
}
