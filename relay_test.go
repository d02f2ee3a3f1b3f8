package hpcproxy

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/net/proxy"

	"github.com/hpcproxy/hpcproxy/internal/testenv"
)

// hiddenTCPConn hides the *net.TCPConn type, as an SSH channel would, so the
// relay takes its user-space path. It keeps CloseWrite.
type hiddenTCPConn struct{ net.Conn }

func (c hiddenTCPConn) CloseWrite() error { return c.Conn.(*net.TCPConn).CloseWrite() }

func channelDial(ctx context.Context, network, addr string) (net.Conn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	return hiddenTCPConn{c}, nil
}

// relayPaths are the two ways the relay copies.
var relayPaths = []struct {
	name string
	dial DialFunc
}{
	{"splice", nil},
	{"userspace", channelDial},
}

// connectVia opens a tunnel to target through addr with the named protocol.
func connectVia(t testing.TB, proto, addr, target string) net.Conn {
	t.Helper()
	switch proto {
	case "socks5":
		c, err := socks5Dial(addr, target)
		require.NoError(t, err)
		return c
	case "connect":
		c, err := net.Dial("tcp", addr)
		require.NoError(t, err)
		_, err = io.WriteString(c, "CONNECT "+target+" HTTP/1.1\r\nHost: "+target+"\r\n\r\n")
		require.NoError(t, err)
		want := "HTTP/1.1 200 Connection established\r\n\r\n"
		got := make([]byte, len(want))
		_, err = io.ReadFull(c, got)
		require.NoError(t, err)
		require.Equal(t, want, string(got))
		return c
	}
	t.Fatalf("unknown protocol %s", proto)
	return nil
}

// eachRelayPath runs f in a subtest for each relay path and each of
// SOCKS5 and CONNECT, with a connection to dest through a fresh server.
func eachRelayPath(t *testing.T, dest string, f func(t *testing.T, srv *Server, c net.Conn)) {
	t.Helper()
	for _, path := range relayPaths {
		for _, proto := range []string{"socks5", "connect"} {
			t.Run(path.name+"/"+proto, func(t *testing.T) {
				srv := &Server{Dial: path.dial}
				c := connectVia(t, proto, startServer(t, srv), dest)
				defer c.Close()
				f(t, srv, c)
			})
		}
	}
}

func TestRelayHalfClose(t *testing.T) {
	echo := startEchoServer(t)
	eachRelayPath(t, echo, func(t *testing.T, srv *Server, c net.Conn) {
		msg := "written, then half-closed, then read back"
		_, err := io.WriteString(c, msg)
		require.NoError(t, err)
		require.NoError(t, c.(*net.TCPConn).CloseWrite())
		require.NoError(t, c.SetReadDeadline(time.Now().Add(10*time.Second)))
		got, err := io.ReadAll(c)
		require.NoError(t, err)
		require.Equal(t, msg, string(got))
	})
}

// TestRelayDestinationHalfClose: the destination says goodbye and
// half-closes first; the client sees EOF and keeps sending, and every byte
// it sends after that EOF reaches the destination.
func TestRelayDestinationHalfClose(t *testing.T) {
	received := make(chan string, 8) // never blocks a handler: one conn per subtest
	dest := serveTCP(t, "127.0.0.1:0", func(c net.Conn) {
		_, _ = io.WriteString(c, "bye from the destination")
		_ = c.(*net.TCPConn).CloseWrite()
		_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
		b, _ := io.ReadAll(c)
		received <- string(b)
	})
	eachRelayPath(t, dest, func(t *testing.T, srv *Server, c net.Conn) {
		require.NoError(t, c.SetDeadline(time.Now().Add(10*time.Second)))
		got, err := io.ReadAll(c)
		require.NoError(t, err)
		require.Equal(t, "bye from the destination", string(got))
		var sent strings.Builder
		for i := range 5 {
			msg := "still sending " + strconv.Itoa(i) + "; "
			_, err := io.WriteString(c, msg)
			require.NoError(t, err, "write %d after the destination's EOF", i)
			sent.WriteString(msg)
			time.Sleep(10 * time.Millisecond)
		}
		require.NoError(t, c.(*net.TCPConn).CloseWrite())
		select {
		case got := <-received:
			require.Equal(t, sent.String(), got)
		case <-time.After(10 * time.Second):
			t.Fatal("the destination never saw the client's EOF")
		}
	})
}

// TestRelayReplyAfterEOF: the destination answers only once it has read
// the client's whole request (EOF), like a one-shot RPC; the answer must
// still reach the client after the client half-closed.
func TestRelayReplyAfterEOF(t *testing.T) {
	dest := serveTCP(t, "127.0.0.1:0", func(c net.Conn) {
		_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
		b, err := io.ReadAll(c)
		if err != nil {
			return
		}
		sum := sha256.Sum256(b)
		_, _ = fmt.Fprintf(c, "%d bytes, sha256 %x", len(b), sum)
	})
	req := make([]byte, 1<<20)
	_, _ = rand.Read(req)
	want := fmt.Sprintf("%d bytes, sha256 %x", len(req), sha256.Sum256(req))
	eachRelayPath(t, dest, func(t *testing.T, srv *Server, c net.Conn) {
		require.NoError(t, c.SetDeadline(time.Now().Add(10*time.Second)))
		_, err := c.Write(req)
		require.NoError(t, err)
		require.NoError(t, c.(*net.TCPConn).CloseWrite())
		got, err := io.ReadAll(c)
		require.NoError(t, err)
		require.Equal(t, want, string(got))
		require.Eventually(t, func() bool { return srv.Stats().Active == 0 }, 5*time.Second, 5*time.Millisecond,
			"the relay did not end after both sides closed")
	})
}

// TestRelayEarlyBytes sends the handshake and the first payload bytes in
// one write: bytes that sit in the handshake buffer must reach the
// destination first.
func TestRelayEarlyBytes(t *testing.T) {
	echo := startEchoServer(t)
	port := portOf(t, echo)
	payload := "early bytes, sent with the request"
	socks5 := append([]byte{5, 1, 0}, socks5Connect([4]byte{127, 0, 0, 1}, port)...)
	socks4 := append(binary.BigEndian.AppendUint16([]byte{4, 1}, port), 127, 0, 0, 1, 'u', 0)
	socks4a := append(binary.BigEndian.AppendUint16([]byte{4, 1}, port), 0, 0, 0, 1, 0)
	socks4a = append(socks4a, "localhost\x00"...)
	connect := []byte("CONNECT " + echo + " HTTP/1.1\r\nHost: " + echo + "\r\n\r\n")
	for _, path := range relayPaths {
		for _, tc := range []struct {
			name      string
			handshake []byte
			reply     string
		}{
			{"socks5", socks5, string([]byte{5, 0, 5, 0, 0, 1})},
			{"socks4", socks4, string([]byte{0, 0x5a, 0, 0, 0, 0, 0, 0})},
			{"socks4a", socks4a, string([]byte{0, 0x5a, 0, 0, 0, 0, 0, 0})},
			{"connect", connect, "HTTP/1.1 200 Connection established\r\n\r\n"},
		} {
			t.Run(path.name+"/"+tc.name, func(t *testing.T) {
				addr := startServer(t, &Server{Dial: path.dial})
				got := rawExchange(t, addr, append(append([]byte{}, tc.handshake...), payload...))
				require.True(t, strings.HasPrefix(string(got), tc.reply), "reply %q", got)
				require.True(t, strings.HasSuffix(string(got), payload), "got %q, want it to end in %q", got, payload)
				if tc.name == "socks5" {
					require.Len(t, got, 2+10+len(payload))
				} else {
					require.Len(t, got, len(tc.reply)+len(payload))
				}
			})
		}
	}
}

func TestRelayLargeTransfer(t *testing.T) {
	echo := startEchoServer(t)
	payload := make([]byte, 32<<20)
	_, _ = rand.Read(payload)
	want := sha256.Sum256(payload)
	eachRelayPath(t, echo, func(t *testing.T, srv *Server, c net.Conn) {
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, _ = c.Write(payload)
			_ = c.(*net.TCPConn).CloseWrite()
		}()
		h := sha256.New()
		n, err := io.Copy(h, c)
		wg.Wait()
		require.NoError(t, err)
		require.Equal(t, int64(len(payload)), n)
		require.Equal(t, want[:], h.Sum(nil), "payload corrupted")
		c.Close()
		require.Eventually(t, func() bool { return srv.Stats().Active == 0 }, 5*time.Second, 5*time.Millisecond)
		st := srv.Stats()
		require.Equal(t, int64(len(payload)), st.BytesOut)
		require.GreaterOrEqual(t, st.BytesIn, int64(len(payload)))
	})
}

// ipv6Loopback skips (fails under CI) when [::1] is not usable.
func ipv6Loopback(t testing.TB) {
	t.Helper()
	ln, err := net.Listen("tcp", "[::1]:0")
	if err == nil {
		ln.Close()
	}
	testenv.Require(t, err == nil, "IPv6 loopback [::1] unavailable: %v", err)
}

func TestIPv6(t *testing.T) {
	ipv6Loopback(t)
	echo6 := serveTCP(t, "[::1]:0", func(c net.Conn) { _, _ = io.Copy(c, c) }) // [::1]:PORT

	srv := &Server{}
	pln, err := net.Listen("tcp", "[::1]:0")
	require.NoError(t, err)
	done := make(chan error, 1)
	go func() { done <- srv.Serve(pln) }()
	t.Cleanup(func() { srv.Close(); <-done })
	addr := pln.Addr().String()

	t.Run("socks5 IPv6 address", func(t *testing.T) {
		// x/net/proxy sends an IPv6 literal as address type 4.
		c, err := socks5Dial(addr, echo6)
		require.NoError(t, err)
		defer c.Close()
		echoCheck(t, c, "v6 socks5")
	})
	t.Run("socks5 raw IPv6 request", func(t *testing.T) {
		req := append([]byte{5, 1, 0, 5, 1, 0, 4}, net.IPv6loopback...)
		req = binary.BigEndian.AppendUint16(req, portOf(t, echo6))
		c, err := net.Dial("tcp", addr)
		require.NoError(t, err)
		defer c.Close()
		_, err = c.Write(req)
		require.NoError(t, err)
		reply := make([]byte, 2+4+16+2)
		_, err = io.ReadFull(c, reply)
		require.NoError(t, err)
		require.Equal(t, []byte{5, 0, 5, 0, 0, 4}, reply[:6], "want success with an IPv6 bound address")
		require.Equal(t, []byte(net.IPv6loopback), reply[6:22])
		echoCheck(t, c, "v6 raw")
	})
	t.Run("connect", func(t *testing.T) {
		c := connectVia(t, "connect", addr, echo6)
		defer c.Close()
		echoCheck(t, c, "v6 connect")
	})
	t.Run("forward", func(t *testing.T) {
		backend := startBackend(t)
		_, port, _ := net.SplitHostPort(backend.Listener.Addr().String())
		c := httpClient(t, nil, "http://"+addr)
		code, body := getBody(t, c, "http://127.0.0.1:"+port+"/v6proxy")
		require.Equal(t, 200, code)
		require.Equal(t, "hello from /v6proxy", body)
	})
}

// benchSource serves a download: it reads an 8-byte length and writes that
// many bytes, then closes.
func benchSource(b *testing.B) string {
	b.Helper()
	chunk := make([]byte, 1<<20)
	return serveTCP(b, "127.0.0.1:0", func(c net.Conn) {
		var n [8]byte
		for {
			if _, err := io.ReadFull(c, n[:]); err != nil {
				return
			}
			left := int64(binary.BigEndian.Uint64(n[:]))
			for left > 0 {
				m, err := c.Write(chunk[:min(left, int64(len(chunk)))])
				if err != nil {
					return
				}
				left -= int64(m)
			}
		}
	})
}

// BenchmarkRelay measures single-stream throughput (1 MiB per op,
// destination to client) directly over loopback and through the server,
// so the overhead reads as a ratio of the MB/s columns.
func BenchmarkRelay(b *testing.B) {
	src := benchSource(b)
	const size = 1 << 20
	run := func(b *testing.B, c net.Conn) {
		defer c.Close()
		buf := make([]byte, 256<<10)
		var n [8]byte
		binary.BigEndian.PutUint64(n[:], uint64(b.N)*size)
		b.SetBytes(size)
		b.ResetTimer()
		if _, err := c.Write(n[:]); err != nil {
			b.Fatal(err)
		}
		left := int64(b.N) * size
		for left > 0 {
			m, err := c.Read(buf)
			if err != nil {
				b.Fatal(err)
			}
			left -= int64(m)
		}
	}
	b.Run("direct", func(b *testing.B) {
		c, err := net.Dial("tcp", src)
		require.NoError(b, err)
		run(b, c)
	})
	for _, path := range relayPaths {
		for _, proto := range []string{"socks5", "connect"} {
			b.Run(proto+"/"+path.name, func(b *testing.B) {
				addr := startServer(b, &Server{Dial: path.dial})
				run(b, connectVia(b, proto, addr, src))
			})
		}
	}
}

// BenchmarkConnectLatency measures one connection set up and one byte
// echoed, directly and through each proxy protocol.
func BenchmarkConnectLatency(b *testing.B) {
	echo := startEchoServer(b)
	addr := startServer(b, &Server{})
	one := func(b *testing.B, c net.Conn) {
		if _, err := c.Write([]byte{1}); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
			b.Fatal(err)
		}
		c.Close()
	}
	b.Run("direct", func(b *testing.B) {
		for b.Loop() {
			c, err := net.Dial("tcp", echo)
			if err != nil {
				b.Fatal(err)
			}
			one(b, c)
		}
	})
	b.Run("socks5", func(b *testing.B) {
		d, err := proxy.SOCKS5("tcp", addr, nil, proxy.Direct)
		require.NoError(b, err)
		for b.Loop() {
			c, err := d.Dial("tcp", echo)
			if err != nil {
				b.Fatal(err)
			}
			one(b, c)
		}
	})
	b.Run("connect", func(b *testing.B) {
		for b.Loop() {
			one(b, connectVia(b, "connect", addr, echo))
		}
	})
	b.Run("http-forward", func(b *testing.B) {
		backend := startBackend(b)
		c := httpClient(b, nil, "http://"+addr)
		tr := c.Transport.(*http.Transport)
		tr.DisableKeepAlives = true
		for b.Loop() {
			resp, err := c.Get(backend.URL + "/")
			if err != nil {
				b.Fatal(err)
			}
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
	})
}

// TestRelayBufferSizes checks how the user-space copy picks its buffers:
// one size up after a full read, else the smallest that holds the last
// read, so an idle relay waits with the small one.
func TestRelayBufferSizes(t *testing.T) {
	small, large, huge := 0, 1, 2
	for _, tc := range []struct{ cur, n, want int }{
		{small, 0, small},
		{small, 100, small},
		{small, 512, large},
		{large, 32 << 10, huge},
		{huge, 256 << 10, huge},
		{huge, 100 << 10, huge},
		{huge, 20 << 10, large},
		{huge, 1, small},
		{large, 3 << 10, large},
		{large, 512, small},
	} {
		if got := nextSize(tc.cur, tc.n); got != tc.want {
			t.Errorf("nextSize(%d, %d) = %d, want %d", tc.cur, tc.n, got, tc.want)
		}
	}
}

// openFiles counts this process's open descriptors whose link starts with
// kind ("pipe", "socket").
func openFiles(t *testing.T, kind string) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	require.NoError(t, err)
	n := 0
	for _, e := range ents {
		if l, err := os.Readlink("/proc/self/fd/" + e.Name()); err == nil && strings.HasPrefix(l, kind) {
			n++
		}
	}
	return n
}

// TestIdleRelayCost holds idle connections through the server and checks
// what each costs: two goroutines (the copiers; the session's goroutine
// is gone), and, on the splice path, no pipes (Go's splice holds a pipe
// pair for as long as a copy waits).
func TestIdleRelayCost(t *testing.T) {
	for _, path := range relayPaths {
		t.Run(path.name, func(t *testing.T) {
			// An echo server with a plain buffer: io.Copy(c, c) would
			// splice and hold pipes itself.
			echo := serveTCP(t, "127.0.0.1:0", func(c net.Conn) {
				buf := make([]byte, 64)
				for {
					n, err := c.Read(buf)
					if err != nil {
						return
					}
					if _, err := c.Write(buf[:n]); err != nil {
						return
					}
				}
			})
			srv := &Server{Dial: path.dial}
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			require.NoError(t, err)
			go func() { _ = srv.Serve(ln) }()
			defer srv.Close()

			const n = 40
			settle := func() int {
				time.Sleep(100 * time.Millisecond)
				// Pipes that Go's splice keeps pooled are closed once
				// the pool is collected.
				runtime.GC()
				runtime.GC()
				return runtime.NumGoroutine()
			}
			g0, pipes0 := settle(), openFiles(t, "pipe")
			var conns []net.Conn
			for range n {
				c := connectVia(t, "socks5", ln.Addr().String(), echo)
				_, err := c.Write([]byte("x"))
				require.NoError(t, err)
				_, err = io.ReadFull(c, make([]byte, 1))
				require.NoError(t, err)
				conns = append(conns, c)
			}
			g1 := settle()
			perConn := float64(g1-g0) / n
			// The copiers, and the echo server's goroutine.
			require.InDelta(t, 3, perConn, 0.2, "goroutines per idle connection")
			require.LessOrEqual(t, openFiles(t, "pipe")-pipes0, 4, "pipes held by idle relays")
			for _, c := range conns {
				c.Close()
			}
		})
	}
}
