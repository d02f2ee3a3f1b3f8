package hpcproxy

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/crypto/ssh"
	"golang.org/x/net/proxy"

	"github.com/hpcproxy/hpcproxy/internal/testenv"
)

// startServer serves s on 127.0.0.1:0 until the test ends and returns the
// address.
func startServer(t testing.TB, s *Server) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	done := make(chan error, 1)
	go func() { done <- s.Serve(ln) }()
	t.Cleanup(func() {
		_ = s.Close()
		assert.ErrorIs(t, <-done, ErrServerClosed)
	})
	return ln.Addr().String()
}

// recordingDialer dials directly and remembers the addresses it was given.
type recordingDialer struct {
	mu    sync.Mutex
	addrs []string
}

func (r *recordingDialer) Dial(ctx context.Context, network, addr string) (net.Conn, error) {
	r.mu.Lock()
	r.addrs = append(r.addrs, addr)
	r.mu.Unlock()
	var d net.Dialer
	return d.DialContext(ctx, network, addr)
}

func (r *recordingDialer) last() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.addrs) == 0 {
		return ""
	}
	return r.addrs[len(r.addrs)-1]
}

// startBackend starts an HTTP server on 127.0.0.1 that answers
// "hello from PATH".
func startBackend(t testing.TB) *httptest.Server {
	t.Helper()
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello from %s", r.URL.Path)
	}))
	t.Cleanup(ts.Close)
	return ts
}

// httpClient returns a client whose transport uses proxyURL; its idle
// conns are closed when the test ends.
func httpClient(t testing.TB, base *http.Transport, proxyURL string) *http.Client {
	t.Helper()
	var tr *http.Transport
	if base != nil {
		tr = base.Clone()
	} else {
		tr = &http.Transport{}
	}
	u, err := url.Parse(proxyURL)
	require.NoError(t, err)
	tr.Proxy = http.ProxyURL(u)
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 10 * time.Second}
}

func getBody(t testing.TB, c *http.Client, u string) (int, string) {
	t.Helper()
	resp, err := c.Get(u)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp.StatusCode, string(b)
}

func TestSOCKS5XNetProxy(t *testing.T) {
	backend := startBackend(t)
	_, port, _ := net.SplitHostPort(backend.Listener.Addr().String())
	creds := map[string]string{"alice": "s3cret"}
	for _, tc := range []struct {
		name  string
		creds map[string]string
		auth  *proxy.Auth
		ok    bool
	}{
		{"no auth", nil, nil, true},
		{"client offers auth, none needed", nil, &proxy.Auth{User: "x", Password: "y"}, true},
		{"auth", creds, &proxy.Auth{User: "alice", Password: "s3cret"}, true},
		{"wrong password", creds, &proxy.Auth{User: "alice", Password: "nope"}, false},
		{"unknown user", creds, &proxy.Auth{User: "bob", Password: "s3cret"}, false},
		{"auth required, none offered", creds, nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec := &recordingDialer{}
			addr := startServer(t, &Server{Dial: rec.Dial, Credentials: tc.creds})
			d, err := proxy.SOCKS5("tcp", addr, tc.auth, proxy.Direct)
			require.NoError(t, err)
			tr := &http.Transport{DialContext: d.(proxy.ContextDialer).DialContext}
			t.Cleanup(tr.CloseIdleConnections)
			c := &http.Client{Transport: tr, Timeout: 10 * time.Second}
			// A name: it must reach the DialFunc unresolved.
			resp, err := c.Get("http://localhost:" + port + "/x")
			if !tc.ok {
				require.Error(t, err)
				return
			}
			require.NoError(t, err)
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			require.Equal(t, "hello from /x", string(b))
			require.Equal(t, "localhost:"+port, rec.last(), "name was not passed unresolved")
		})
	}
}

func TestHTTPClientThroughProxy(t *testing.T) {
	backend := startBackend(t)
	tlsBackend := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "secure "+r.URL.Path)
	}))
	t.Cleanup(tlsBackend.Close)
	tlsBase := tlsBackend.Client().Transport.(*http.Transport)

	t.Run("no auth", func(t *testing.T) {
		addr := startServer(t, &Server{})
		c := httpClient(t, nil, "http://"+addr)
		code, body := getBody(t, c, backend.URL+"/plain")
		require.Equal(t, 200, code)
		require.Equal(t, "hello from /plain", body)
		ct := httpClient(t, tlsBase, "http://"+addr)
		code, body = getBody(t, ct, tlsBackend.URL+"/tls")
		require.Equal(t, 200, code)
		require.Equal(t, "secure /tls", body)
	})
	t.Run("auth", func(t *testing.T) {
		addr := startServer(t, &Server{Credentials: map[string]string{"u": "p w"}})
		c := httpClient(t, nil, "http://u:p%20w@"+addr)
		code, body := getBody(t, c, backend.URL+"/a")
		require.Equal(t, 200, code)
		require.Equal(t, "hello from /a", body)
		ct := httpClient(t, tlsBase, "http://u:p%20w@"+addr)
		code, body = getBody(t, ct, tlsBackend.URL+"/b")
		require.Equal(t, 200, code)
		require.Equal(t, "secure /b", body)

		bad := httpClient(t, nil, "http://u:wrong@"+addr)
		resp, err := bad.Get(backend.URL + "/c")
		require.NoError(t, err)
		resp.Body.Close()
		require.Equal(t, http.StatusProxyAuthRequired, resp.StatusCode)
		require.Equal(t, `Basic realm="hpcproxy"`, resp.Header.Get("Proxy-Authenticate"))

		badTLS := httpClient(t, tlsBase, "http://"+addr)
		_, err = badTLS.Get(tlsBackend.URL + "/d")
		require.Error(t, err)
		require.Contains(t, err.Error(), "Proxy Authentication Required")
	})
}

func TestCurl(t *testing.T) {
	curl := testenv.LookPath(t, "curl")
	backend := startBackend(t)
	_, port, _ := net.SplitHostPort(backend.Listener.Addr().String())
	tlsBackend := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "secure "+r.URL.Path)
	}))
	t.Cleanup(tlsBackend.Close)

	run := func(t *testing.T, args ...string) string {
		t.Helper()
		cmd := exec.Command(curl, append([]string{"-sS", "--fail", "--max-time", "10", "--noproxy", ""}, args...)...)
		cmd.Env = []string{"PATH=/usr/bin:/bin", "HOME=" + t.TempDir()}
		out, err := cmd.CombinedOutput()
		require.NoError(t, err, "curl %v: %s", args, out)
		return string(out)
	}
	for _, creds := range []bool{false, true} {
		name, userinfo := "no auth", ""
		var srvCreds map[string]string
		if creds {
			name, userinfo = "auth", "alice:s3cret@"
			srvCreds = map[string]string{"alice": "s3cret"}
		}
		t.Run(name, func(t *testing.T) {
			rec := &recordingDialer{}
			addr := startServer(t, &Server{Dial: rec.Dial, Credentials: srvCreds})
			if !creds {
				// SOCKS4a has no password; curl sends the user as the user ID.
				t.Run("socks4a", func(t *testing.T) {
					require.Equal(t, "hello from /4a", run(t, "-x", "socks4a://"+addr, "http://localhost:"+port+"/4a"))
					require.Equal(t, "localhost:"+port, rec.last())
				})
				t.Run("socks4", func(t *testing.T) {
					require.Equal(t, "hello from /4", run(t, "-x", "socks4://"+addr, "http://127.0.0.1:"+port+"/4"))
				})
			} else {
				t.Run("socks4a token", func(t *testing.T) {
					// curl sends only the user part of the proxy URL as the
					// SOCKS4 user ID: pass the password (a token) there.
					out := run(t, "-x", "socks4a://s3cret@"+addr, "http://localhost:"+port+"/4a")
					require.Equal(t, "hello from /4a", out)
				})
			}
			t.Run("socks5", func(t *testing.T) {
				require.Equal(t, "hello from /5", run(t, "-x", "socks5://"+userinfo+addr, "http://127.0.0.1:"+port+"/5"))
			})
			t.Run("socks5h", func(t *testing.T) {
				require.Equal(t, "hello from /5h", run(t, "-x", "socks5h://"+userinfo+addr, "http://localhost:"+port+"/5h"))
				require.Equal(t, "localhost:"+port, rec.last())
			})
			t.Run("http CONNECT to https", func(t *testing.T) {
				require.Equal(t, "secure /s", run(t, "-k", "-x", "http://"+userinfo+addr, tlsBackend.URL+"/s"))
			})
			t.Run("http CONNECT tunnel to http", func(t *testing.T) {
				require.Equal(t, "hello from /t", run(t, "-p", "-x", "http://"+userinfo+addr, backend.URL+"/t"))
			})
			t.Run("plain http", func(t *testing.T) {
				require.Equal(t, "hello from /p", run(t, "-x", "http://"+userinfo+addr, backend.URL+"/p"))
			})
		})
	}
}

// TestDialErrorMapping checks every protocol's answer to each kind of
// dial failure, including errors from an SSH channel open.
func TestDialErrorMapping(t *testing.T) {
	for _, tc := range []struct {
		name   string
		err    error
		socks5 socks5Reply
		status int
	}{
		{"refused", &net.OpError{Op: "dial", Net: "tcp", Err: syscallErr("connect", errConnRefused)}, socks5ConnectionRefused, 502},
		{"net unreachable", &net.OpError{Op: "dial", Net: "tcp", Err: syscallErr("connect", errNetUnreach)}, socks5NetworkUnreachable, 502},
		{"host unreachable", &net.OpError{Op: "dial", Net: "tcp", Err: syscallErr("connect", errHostUnreach)}, socks5HostUnreachable, 502},
		{"dns", &net.OpError{Op: "dial", Net: "tcp", Err: &net.DNSError{Err: "no such host", Name: "x.invalid", IsNotFound: true}}, socks5HostUnreachable, 502},
		{"deadline", context.DeadlineExceeded, socks5TTLExpired, 504},
		{"net timeout", &net.OpError{Op: "dial", Net: "tcp", Err: timeoutErr{}}, socks5TTLExpired, 504},
		{"prohibited", fmt.Errorf("dial: %w", ErrProhibited), socks5NotAllowed, 403},
		{"tunnel down", fmt.Errorf("%w: ssh: EOF", ErrTunnelDown), socks5GeneralFailure, 503},
		{"other", errors.New("boom"), socks5GeneralFailure, 502},
		{"ssh refused", sshOpenErr(2, "Connection refused"), socks5ConnectionRefused, 502},
		{"ssh prohibited", sshOpenErr(1, "open failed"), socks5NotAllowed, 403},
		{"ssh no route", sshOpenErr(2, "No route to host"), socks5HostUnreachable, 502},
		{"ssh timed out", sshOpenErr(2, "Connection timed out"), socks5TTLExpired, 504},
		{"remote dial error", newRemoteDialError("h:1", "connect failed: Network is unreachable"), socks5NetworkUnreachable, 502},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := &Server{Dial: func(ctx context.Context, network, addr string) (net.Conn, error) {
				return nil, tc.err
			}}
			addr := startServer(t, srv)

			got := rawExchange(t, addr, []byte{5, 1, 0, 5, 1, 0, 1, 127, 0, 0, 1, 0, 80})
			require.Equal(t, []byte{5, 0, 5, byte(tc.socks5), 0, 1, 0, 0, 0, 0, 0, 0}, got)

			got = rawExchange(t, addr, []byte{4, 1, 0, 80, 127, 0, 0, 1, 0})
			require.Equal(t, []byte{0, 0x5b, 0, 0, 0, 0, 0, 0}, got)

			resp := httpExchange(t, addr, "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
			require.Equal(t, tc.status, resp.code, resp.body)
			require.Contains(t, resp.body, "example.com:443")
			resp = httpExchange(t, addr, "GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n")
			require.Equal(t, tc.status, resp.code, resp.body)
		})
	}
}

// rawExchange writes req, half-closes, and returns everything the server
// sends until it closes.
func rawExchange(t testing.TB, addr string, req []byte) []byte {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	require.NoError(t, err)
	defer c.Close()
	require.NoError(t, c.SetDeadline(time.Now().Add(10*time.Second)))
	_, err = c.Write(req)
	require.NoError(t, err)
	require.NoError(t, c.(*net.TCPConn).CloseWrite())
	got, err := io.ReadAll(c)
	require.NoError(t, err)
	return got
}

type httpResult struct {
	code   int
	header http.Header
	body   string
}

// httpExchange writes a raw request and parses the one response.
func httpExchange(t testing.TB, addr, req string) httpResult {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	require.NoError(t, err)
	defer c.Close()
	require.NoError(t, c.SetDeadline(time.Now().Add(10*time.Second)))
	_, err = io.WriteString(c, req)
	require.NoError(t, err)
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return httpResult{resp.StatusCode, resp.Header, string(b)}
}

type timeoutErr struct{}

func (timeoutErr) Error() string   { return "i/o timeout" }
func (timeoutErr) Timeout() bool   { return true }
func (timeoutErr) Temporary() bool { return true }

func TestShutdown(t *testing.T) {
	echo := startEchoServer(t)
	t.Run("RunProxy cancel closes live conns", func(t *testing.T) {
		listen := closedPort(t)
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		done := make(chan error, 1)
		go func() { done <- RunProxy(ctx, listen, nil) }()
		var c net.Conn
		require.Eventually(t, func() bool {
			var err error
			c, err = socks5Dial(listen, echo)
			return err == nil
		}, 5*time.Second, 10*time.Millisecond)
		defer c.Close()
		echoCheck(t, c, "live")
		cancel()
		select {
		case err := <-done:
			require.NoError(t, err)
		case <-time.After(10 * time.Second):
			t.Fatal("RunProxy did not return after cancel")
		}
		require.NoError(t, c.SetReadDeadline(time.Now().Add(5*time.Second)))
		_, err := c.Read(make([]byte, 1))
		require.Error(t, err, "live conn survived shutdown")
		_, err = net.DialTimeout("tcp", listen, time.Second)
		require.Error(t, err, "still listening")
	})
	t.Run("RunProxy listen error", func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		require.NoError(t, err)
		defer ln.Close()
		err = RunProxy(context.Background(), ln.Addr().String(), nil)
		require.ErrorContains(t, err, "hpcproxy: listen")
	})
	t.Run("Shutdown waits for conns", func(t *testing.T) {
		srv := &Server{}
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		require.NoError(t, err)
		served := make(chan error, 1)
		go func() { served <- srv.Serve(ln) }()
		c, err := socks5Dial(ln.Addr().String(), echo)
		require.NoError(t, err)
		echoCheck(t, c, "before")
		shut := make(chan error, 1)
		go func() { shut <- srv.Shutdown(context.Background()) }()
		time.Sleep(50 * time.Millisecond)
		echoCheck(t, c, "during graceful shutdown")
		select {
		case <-shut:
			t.Fatal("Shutdown returned with a live conn")
		default:
		}
		c.Close()
		require.NoError(t, <-shut)
		require.ErrorIs(t, <-served, ErrServerClosed)
	})
	t.Run("Shutdown closes idle keep-alive conns", func(t *testing.T) {
		backend := startBackend(t)
		srv := &Server{}
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		require.NoError(t, err)
		served := make(chan error, 1)
		go func() { served <- srv.Serve(ln) }()
		c := httpClient(t, nil, "http://"+ln.Addr().String())
		code, _ := getBody(t, c, backend.URL+"/keep")
		require.Equal(t, 200, code)
		require.Equal(t, int64(1), srv.Stats().Active, "the client conn should be kept alive")
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		require.NoError(t, srv.Shutdown(ctx))
		require.ErrorIs(t, <-served, ErrServerClosed)
	})
	t.Run("Shutdown deadline closes conns", func(t *testing.T) {
		srv := &Server{}
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		require.NoError(t, err)
		served := make(chan error, 1)
		go func() { served <- srv.Serve(ln) }()
		c, err := socks5Dial(ln.Addr().String(), echo)
		require.NoError(t, err)
		defer c.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		defer cancel()
		require.ErrorIs(t, srv.Shutdown(ctx), context.DeadlineExceeded)
		require.ErrorIs(t, <-served, ErrServerClosed)
		require.NoError(t, c.SetReadDeadline(time.Now().Add(5*time.Second)))
		_, err = c.Read(make([]byte, 1))
		require.Error(t, err)
	})
	t.Run("Serve after Close", func(t *testing.T) {
		srv := &Server{}
		require.NoError(t, srv.Close())
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		require.NoError(t, err)
		require.ErrorIs(t, srv.Serve(ln), ErrServerClosed)
	})
}

// socks5Dial connects to target through the SOCKS5 proxy at addr.
func socks5Dial(addr, target string) (net.Conn, error) {
	d, err := proxy.SOCKS5("tcp", addr, nil, &net.Dialer{Timeout: 5 * time.Second})
	if err != nil {
		return nil, err
	}
	return d.Dial("tcp", target)
}

// echoCheck sends msg over c (to an echo server) and expects it back.
func echoCheck(t testing.TB, c net.Conn, msg string) {
	t.Helper()
	require.NoError(t, c.SetDeadline(time.Now().Add(10*time.Second)))
	_, err := io.WriteString(c, msg)
	require.NoError(t, err)
	got := make([]byte, len(msg))
	_, err = io.ReadFull(c, got)
	require.NoError(t, err)
	require.Equal(t, msg, string(got))
	require.NoError(t, c.SetDeadline(time.Time{}))
}

func TestServerLimits(t *testing.T) {
	echo := startEchoServer(t)
	t.Run("MaxConns", func(t *testing.T) {
		srv := &Server{MaxConns: 1}
		addr := startServer(t, srv)
		c, err := socks5Dial(addr, echo)
		require.NoError(t, err)
		echoCheck(t, c, "one")

		got := rawExchange(t, addr, []byte{5, 1, 0, 5, 1, 0, 1, 127, 0, 0, 1, 0, 80})
		require.Equal(t, []byte{5, 0, 5, 1, 0, 1, 0, 0, 0, 0, 0, 0}, got)
		got = rawExchange(t, addr, []byte{4, 1, 0, 80, 127, 0, 0, 1, 0})
		require.Equal(t, []byte{0, 0x5b, 0, 0, 0, 0, 0, 0}, got)
		resp := httpExchange(t, addr, "CONNECT "+echo+" HTTP/1.1\r\n\r\n")
		require.Equal(t, http.StatusServiceUnavailable, resp.code)
		require.Contains(t, resp.body, "too many connections")

		c.Close()
		require.Eventually(t, func() bool { return srv.Stats().Active == 0 }, 5*time.Second, 5*time.Millisecond)
		c, err = socks5Dial(addr, echo)
		require.NoError(t, err)
		echoCheck(t, c, "two")
		c.Close()
	})
	t.Run("AllowClient", func(t *testing.T) {
		var logs strings.Builder
		var mu sync.Mutex
		srv := &Server{
			AllowClient: func(a net.Addr) bool { return false },
			Logger:      slog.New(slog.NewTextHandler(lockedWriter{&mu, &logs}, nil)),
		}
		addr := startServer(t, srv)
		c, err := net.Dial("tcp", addr)
		require.NoError(t, err)
		defer c.Close()
		require.NoError(t, c.SetReadDeadline(time.Now().Add(5*time.Second)))
		_, err = c.Read(make([]byte, 1))
		require.ErrorIs(t, err, io.EOF)
		require.Eventually(t, func() bool { return srv.Stats().FailedHandshakes == 1 }, 5*time.Second, 5*time.Millisecond)
		mu.Lock()
		defer mu.Unlock()
		require.Contains(t, logs.String(), "level=WARN msg=\"client not allowed; closing\" client=127.0.0.1:")
	})
	t.Run("TrustConn", func(t *testing.T) {
		srv := &Server{
			Credentials: map[string]string{"u": "p"},
			TrustConn:   func(c net.Conn) bool { return c.RemoteAddr().(*net.TCPAddr).IP.IsLoopback() },
		}
		addr := startServer(t, srv)
		c, err := socks5Dial(addr, echo)
		require.NoError(t, err)
		echoCheck(t, c, "trusted")
		c.Close()
		resp := httpExchange(t, addr, "GET http://"+closedPort(t)+"/ HTTP/1.1\r\n\r\n")
		require.Equal(t, http.StatusBadGateway, resp.code, "trusted conn was asked for credentials")
	})
	t.Run("IdleTimeout", func(t *testing.T) {
		srv := &Server{IdleTimeout: 200 * time.Millisecond}
		addr := startServer(t, srv)
		c, err := socks5Dial(addr, echo)
		require.NoError(t, err)
		defer c.Close()
		for range 3 { // activity keeps it open past the timeout
			echoCheck(t, c, "busy")
			time.Sleep(100 * time.Millisecond)
		}
		start := time.Now()
		require.NoError(t, c.SetReadDeadline(time.Now().Add(5*time.Second)))
		_, err = c.Read(make([]byte, 1))
		require.ErrorIs(t, err, io.EOF)
		require.Less(t, time.Since(start), 2*time.Second)
	})
	t.Run("HandshakeTimeout", func(t *testing.T) {
		srv := &Server{HandshakeTimeout: 100 * time.Millisecond}
		addr := startServer(t, srv)
		c, err := net.Dial("tcp", addr)
		require.NoError(t, err)
		defer c.Close()
		_, err = c.Write([]byte{5, 1}) // an incomplete greeting
		require.NoError(t, err)
		require.NoError(t, c.SetReadDeadline(time.Now().Add(5*time.Second)))
		_, err = c.Read(make([]byte, 1))
		require.ErrorIs(t, err, io.EOF)
		require.Equal(t, int64(1), srv.Stats().FailedHandshakes)
	})
	t.Run("slow dial outlives HandshakeTimeout", func(t *testing.T) {
		srv := &Server{HandshakeTimeout: 100 * time.Millisecond, Dial: func(ctx context.Context, network, addr string) (net.Conn, error) {
			time.Sleep(300 * time.Millisecond)
			var d net.Dialer
			return d.DialContext(ctx, network, addr)
		}}
		addr := startServer(t, srv)
		c, err := socks5Dial(addr, echo)
		require.NoError(t, err)
		defer c.Close()
		echoCheck(t, c, "slow but fine")
		resp := httpExchange(t, addr, "GET http://"+closedPort(t)+"/ HTTP/1.1\r\n\r\n")
		require.Equal(t, http.StatusBadGateway, resp.code)
	})
	t.Run("DialTimeout", func(t *testing.T) {
		srv := &Server{DialTimeout: 50 * time.Millisecond, Dial: func(ctx context.Context, _, _ string) (net.Conn, error) {
			<-ctx.Done()
			return nil, ctx.Err()
		}}
		addr := startServer(t, srv)
		resp := httpExchange(t, addr, "CONNECT example.com:443 HTTP/1.1\r\n\r\n")
		require.Equal(t, http.StatusGatewayTimeout, resp.code)
		require.Contains(t, resp.body, "timed out")
	})
}

// TestUnixListener serves on a unix socket, as Serve allows.
func TestUnixListener(t *testing.T) {
	echo := startEchoServer(t)
	sock := t.TempDir() + "/proxy.sock"
	ln, err := net.Listen("unix", sock)
	require.NoError(t, err)
	srv := &Server{}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ln) }()
	t.Cleanup(func() { srv.Close(); <-done })
	d, err := proxy.SOCKS5("unix", sock, nil, proxy.Direct)
	require.NoError(t, err)
	c, err := d.Dial("tcp", echo)
	require.NoError(t, err)
	defer c.Close()
	echoCheck(t, c, "over a unix socket")
	msg := strings.Repeat("u", 1<<20)
	go func() {
		_, _ = io.WriteString(c, msg)
		_ = c.(*net.UnixConn).CloseWrite()
	}()
	got, err := io.ReadAll(c)
	require.NoError(t, err)
	require.Equal(t, len(msg), len(got))
}

func TestStats(t *testing.T) {
	echo := startEchoServer(t)
	srv := &Server{}
	addr := startServer(t, srv)
	c, err := socks5Dial(addr, echo)
	require.NoError(t, err)
	msg := strings.Repeat("x", 100000)
	_, err = io.WriteString(c, msg)
	require.NoError(t, err)
	require.NoError(t, c.(*net.TCPConn).CloseWrite())
	got, err := io.ReadAll(c)
	require.NoError(t, err)
	require.Len(t, got, len(msg))
	c.Close()
	require.Eventually(t, func() bool { return srv.Stats().Active == 0 }, 5*time.Second, 5*time.Millisecond)
	st := srv.Stats()
	require.Equal(t, ServerStats{Active: 0, Total: 1, BytesIn: 100000, BytesOut: 100000}, st)
}

var (
	errConnRefused = syscall.ECONNREFUSED
	errNetUnreach  = syscall.ENETUNREACH
	errHostUnreach = syscall.EHOSTUNREACH
)

func syscallErr(op string, e syscall.Errno) error { return os.NewSyscallError(op, e) }

// sshOpenErr is what x/crypto/ssh returns when sshd refuses a channel.
func sshOpenErr(reason ssh.RejectionReason, msg string) error {
	return &ssh.OpenChannelError{Reason: reason, Message: msg}
}

// lockedWriter serializes writes to w.
type lockedWriter struct {
	mu *sync.Mutex
	w  io.Writer
}

func (l lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}
