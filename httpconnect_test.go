package hpcproxy

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestHTTPBadInput checks the status of every request the proxy refuses,
// and that the server keeps serving afterwards.
func TestHTTPBadInput(t *testing.T) {
	backend := startBackend(t)
	closed := closedPort(t)
	host := backend.Listener.Addr().String()
	basic := func(u, p string) string { return base64.StdEncoding.EncodeToString([]byte(u + ":" + p)) }
	creds := map[string]string{"alice": "s3cret"}
	for _, tc := range []struct {
		name       string
		creds      map[string]string
		req        string
		code       int
		bodyHas    string
		headerName string
		headerVal  string
	}{
		{"origin-form", nil, "GET / HTTP/1.1\r\nHost: x\r\n\r\n", 400, "not a proxy request", "", ""},
		{"origin-form POST", nil, "POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi", 400, "not a proxy request", "", ""},
		{"asterisk", nil, "OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", 400, "not a proxy request", "", ""},
		{"https absolute-form", nil, "GET https://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n", 405, "use CONNECT for https", "Allow", "CONNECT"},
		{"ftp scheme", nil, "GET ftp://example.com/f HTTP/1.1\r\nHost: example.com\r\n\r\n", 400, "unsupported URL scheme", "", ""},
		{"no host", nil, "GET http:///path HTTP/1.1\r\n\r\n", 400, "no host", "", ""},
		{"bad port", nil, "GET http://example.com:99999/ HTTP/1.1\r\n\r\n", 400, "bad port", "", ""},
		{"CONNECT without port", nil, "CONNECT example.com HTTP/1.1\r\nHost: example.com\r\n\r\n", 400, "bad host:port", "", ""},
		{"CONNECT port 0", nil, "CONNECT example.com:0 HTTP/1.1\r\n\r\n", 400, "bad port", "", ""},
		{"CONNECT origin-form", nil, "CONNECT /path HTTP/1.1\r\nHost: x:1\r\n\r\n", 400, "CONNECT needs a host:port", "", ""},
		{"CONNECT absolute-form", nil, "CONNECT http://x:1/ HTTP/1.1\r\n\r\n", 400, "CONNECT needs a host:port", "", ""},
		{"CONNECT bare IPv6", nil, "CONNECT ::1:80 HTTP/1.1\r\nHost: x\r\n\r\n", 400, "malformed request", "", ""},
		{"NUL escape in host", nil, "GET http://h%00.x/ HTTP/1.1\r\nHost: x\r\n\r\n", 400, "malformed request", "", ""},
		{"control byte in URL", nil, "GET http://h\x01.x/ HTTP/1.1\r\nHost: x\r\n\r\n", 400, "malformed request", "", ""},
		{"GET port 0", nil, "GET http://example.com:0/ HTTP/1.1\r\n\r\n", 400, "bad port", "", ""},
		{"bad chunked body", nil, "POST http://" + host + "/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n", 400, "malformed request body", "", ""},
		{"garbage", nil, "hello\r\n\r\n", 400, "malformed request", "", ""},
		{"TLS hello", nil, "\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400, "malformed request", "", ""},
		{"bad version", nil, "GET http://x/ HTTP/9.9\r\n\r\n", 505, "unsupported protocol version", "", ""},
		{"bad header", nil, "GET http://x/ HTTP/1.1\r\nno colon here\r\n\r\n", 400, "malformed request", "", ""},
		{"header too large", nil, "GET http://x/ HTTP/1.1\r\nX: " + strings.Repeat("a", maxHeaderBytes+8<<10) + "\r\n\r\n", 431, "too large", "", ""},
		{"CONNECT refused", nil, "CONNECT " + closed + " HTTP/1.1\r\n\r\n", 502, "connection refused", "", ""},
		{"GET refused", nil, "GET http://" + closed + "/ HTTP/1.1\r\n\r\n", 502, "connection refused", "", ""},
		{"no credentials", creds, "GET http://" + host + "/ HTTP/1.1\r\n\r\n", 407, "authentication required", "Proxy-Authenticate", `Basic realm="hpcproxy"`},
		{"CONNECT no credentials", creds, "CONNECT " + host + " HTTP/1.1\r\n\r\n", 407, "authentication required", "Proxy-Authenticate", `Basic realm="hpcproxy"`},
		{"wrong password", creds, "GET http://" + host + "/ HTTP/1.1\r\nProxy-Authorization: Basic " + basic("alice", "x") + "\r\n\r\n", 407, "authentication required", "", ""},
		{"not basic", creds, "GET http://" + host + "/ HTTP/1.1\r\nProxy-Authorization: Bearer " + basic("alice", "s3cret") + "\r\n\r\n", 407, "authentication required", "", ""},
		{"bad base64", creds, "GET http://" + host + "/ HTTP/1.1\r\nProxy-Authorization: Basic !!!\r\n\r\n", 407, "authentication required", "", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := &Server{Credentials: tc.creds}
			addr := startServer(t, srv)
			resp := httpExchange(t, addr, tc.req)
			require.Equal(t, tc.code, resp.code, resp.body)
			require.Contains(t, resp.body, tc.bodyHas)
			require.True(t, strings.HasPrefix(resp.body, "hpcproxy: "), "body %q", resp.body)
			require.Equal(t, "text/plain; charset=utf-8", resp.header.Get("Content-Type"))
			if tc.headerName != "" {
				require.Equal(t, tc.headerVal, resp.header.Get(tc.headerName))
			}
			require.Equal(t, int64(1), srv.Stats().FailedHandshakes)

			auth := ""
			if tc.creds != nil {
				auth = "Proxy-Authorization: Basic " + basic("alice", "s3cret") + "\r\n"
			}
			resp = httpExchange(t, addr, "GET "+backend.URL+"/ok HTTP/1.1\r\nHost: "+host+"\r\n"+auth+"\r\n")
			require.Equal(t, 200, resp.code)
			require.Equal(t, "hello from /ok", resp.body)
		})
	}
}

// TestHTTPForward checks absolute-form forwarding: keep-alive across
// hosts, hop-by-hop headers, Via, and streamed bodies of both framings.
func TestHTTPForward(t *testing.T) {
	type seen struct {
		header http.Header
		body   []byte
		te     []string
		host   string
		uri    string
	}
	seenc := make(chan seen, 16)
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		seenc <- seen{r.Header.Clone(), b, r.TransferEncoding, r.Host, r.RequestURI}
		switch r.URL.Path {
		case "/chunked":
			w.Header().Set("Connection", "X-Hop")
			w.Header().Set("X-Hop", "secret")
			w.Header().Set("Keep-Alive", "timeout=5")
			for i := range 3 {
				fmt.Fprintf(w, "part%d;", i)
				w.(http.Flusher).Flush()
			}
		case "/echo":
			w.Header().Set("Content-Length", strconv.Itoa(len(b)))
			w.Write(b)
		case "/head":
			w.Header().Set("Content-Length", "1234")
		default:
			io.WriteString(w, "hello from "+r.URL.Path)
		}
	})
	a := httptest.NewServer(handler)
	t.Cleanup(a.Close)
	b := httptest.NewServer(handler)
	t.Cleanup(b.Close)

	srv := &Server{}
	addr := startServer(t, srv)
	c, err := net.Dial("tcp", addr)
	require.NoError(t, err)
	defer c.Close()
	require.NoError(t, c.SetDeadline(time.Now().Add(20*time.Second)))
	br := bufio.NewReader(c)
	roundTrip := func(req string) (*http.Response, string) {
		t.Helper()
		_, err := io.WriteString(c, req)
		require.NoError(t, err)
		resp, err := http.ReadResponse(br, nil)
		require.NoError(t, err)
		body, err := io.ReadAll(resp.Body)
		require.NoError(t, err)
		resp.Body.Close()
		return resp, string(body)
	}

	t.Run("hop-by-hop and Via", func(t *testing.T) {
		resp, body := roundTrip("GET " + a.URL + "/one?q=1 HTTP/1.1\r\nHost: ignored.example\r\n" +
			"Connection: keep-alive, X-Conn-Listed\r\nX-Conn-Listed: 1\r\nProxy-Connection: keep-alive\r\n" +
			"Proxy-Authorization: Basic eDp5\r\nKeep-Alive: 300\r\nTE: trailers\r\nUpgrade: h2c\r\nX-End: kept\r\n\r\n")
		require.Equal(t, 200, resp.StatusCode)
		require.Equal(t, "hello from /one", body)
		require.Equal(t, "1.1 hpcproxy", resp.Header.Get("Via"))
		s := <-seenc
		require.Equal(t, "/one?q=1", s.uri, "request was not sent in origin-form")
		require.Equal(t, a.Listener.Addr().String(), s.host, "Host must come from the absolute URL")
		for _, h := range []string{"X-Conn-Listed", "Proxy-Connection", "Proxy-Authorization", "Keep-Alive", "Te", "Upgrade"} {
			require.Empty(t, s.header.Get(h), "hop-by-hop header %s forwarded", h)
		}
		require.Equal(t, "kept", s.header.Get("X-End"))
		require.Equal(t, "1.1 hpcproxy", s.header.Get("Via"))
		require.Empty(t, s.header.Values("User-Agent"), "the proxy added a User-Agent")
	})
	t.Run("HTTP/1.0 client", func(t *testing.T) {
		resp, body := roundTrip("GET " + a.URL + "/old HTTP/1.0\r\nUser-Agent: old/1\r\nConnection: keep-alive\r\n\r\n")
		require.Equal(t, "hello from /old", body)
		require.False(t, resp.Close)
		s := <-seenc
		require.Equal(t, "1.0 hpcproxy", s.header.Get("Via"))
		require.Equal(t, "old/1", s.header.Get("User-Agent"))
	})
	t.Run("keep-alive to another host, chunked response", func(t *testing.T) {
		resp, body := roundTrip("GET " + b.URL + "/chunked HTTP/1.1\r\nHost: x\r\n\r\n")
		require.Equal(t, "part0;part1;part2;", body)
		require.Equal(t, []string{"chunked"}, resp.TransferEncoding)
		require.Empty(t, resp.Header.Get("X-Hop"))
		require.Empty(t, resp.Header.Get("Keep-Alive"))
		<-seenc
	})
	t.Run("chunked request body", func(t *testing.T) {
		resp, body := roundTrip("POST " + a.URL + "/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" +
			"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
		require.Equal(t, 200, resp.StatusCode)
		require.Equal(t, "hello world", body)
		s := <-seenc
		require.Equal(t, []string{"chunked"}, s.te)
		require.Equal(t, "hello world", string(s.body))
	})
	t.Run("content-length body, expect 100-continue", func(t *testing.T) {
		_, err := io.WriteString(c, "PUT "+b.URL+"/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
		require.NoError(t, err)
		cont, err := http.ReadResponse(br, nil)
		require.NoError(t, err)
		require.Equal(t, 100, cont.StatusCode)
		resp, body := roundTrip("data")
		require.Equal(t, 200, resp.StatusCode)
		require.Equal(t, "data", body)
		require.Equal(t, "4", resp.Header.Get("Content-Length"))
		s := <-seenc
		require.Empty(t, s.header.Get("Expect"))
	})
	t.Run("HEAD", func(t *testing.T) {
		_, err := io.WriteString(c, "HEAD "+b.URL+"/head HTTP/1.1\r\nHost: x\r\n\r\n")
		require.NoError(t, err)
		resp, err := http.ReadResponse(br, &http.Request{Method: "HEAD"})
		require.NoError(t, err)
		require.Equal(t, int64(1234), resp.ContentLength)
		<-seenc
	})
	t.Run("Connection: close", func(t *testing.T) {
		resp, body := roundTrip("GET " + a.URL + "/last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
		require.True(t, resp.Close)
		require.Equal(t, "hello from /last", body)
		_, err := br.ReadByte()
		require.ErrorIs(t, err, io.EOF)
		<-seenc
	})
	require.Equal(t, int64(1), srv.Stats().Total, "requests did not share one client connection")
}

// TestHTTPForwardLarge streams large bodies both ways through the
// forwarding path, checked byte for byte.
func TestHTTPForwardLarge(t *testing.T) {
	payload := make([]byte, 16<<20)
	_, _ = rand.Read(payload)
	want := sha256.Sum256(payload)
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := sha256.New()
		n, err := io.Copy(h, r.Body)
		if err != nil || !bytes.Equal(h.Sum(nil), want[:]) {
			http.Error(w, fmt.Sprintf("upload corrupted: %d bytes, %v", n, err), 500)
			return
		}
		if r.URL.Path == "/chunked" {
			w.Write(payload) // no Content-Length: chunked
			return
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(payload)))
		w.Write(payload)
	}))
	t.Cleanup(backend.Close)
	addr := startServer(t, &Server{})
	client := httpClient(t, nil, "http://"+addr)
	for _, path := range []string{"/length", "/chunked"} {
		resp, err := client.Post(backend.URL+path, "application/octet-stream", bytes.NewReader(payload))
		require.NoError(t, err)
		h := sha256.New()
		n, err := io.Copy(h, resp.Body)
		resp.Body.Close()
		require.NoError(t, err)
		require.Equal(t, 200, resp.StatusCode)
		require.Equal(t, int64(len(payload)), n)
		require.Equal(t, want[:], h.Sum(nil))
	}
}

// TestHTTPForwardStreaming checks that a slowly streamed response reaches
// the client piece by piece, not when the body ends.
func TestHTTPForwardStreaming(t *testing.T) {
	release := make(chan struct{})
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "first\n")
		w.(http.Flusher).Flush()
		<-release
		io.WriteString(w, "second\n")
	}))
	t.Cleanup(backend.Close)
	addr := startServer(t, &Server{})
	client := httpClient(t, nil, "http://"+addr)
	resp, err := client.Get(backend.URL)
	require.NoError(t, err)
	defer resp.Body.Close()
	r := bufio.NewReader(resp.Body)
	line, err := r.ReadString('\n')
	close(release)
	require.NoError(t, err)
	require.Equal(t, "first\n", line)
	rest, err := io.ReadAll(r)
	require.NoError(t, err)
	require.Equal(t, "second\n", string(rest))
}

// FuzzHTTPRequest feeds arbitrary bytes to the HTTP request parser and the
// target check: no panics, and an accepted target is a valid host:port.
func FuzzHTTPRequest(f *testing.F) {
	f.Add([]byte("CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"))
	f.Add([]byte("GET http://example.com/x HTTP/1.1\r\nHost: example.com\r\n\r\n"))
	f.Add([]byte("POST http://[::1]:8080/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"))
	f.Add([]byte("GET https://example.com/ HTTP/1.0\r\n\r\n"))
	f.Add([]byte("GET / HTTP/1.1\r\n\r\n"))
	f.Add([]byte("CONNECT [::1]:22 HTTP/1.1\r\nProxy-Authorization: Basic YTpi\r\n\r\n"))
	f.Fuzz(func(t *testing.T, in []byte) {
		req, err := readProxyRequest(bufio.NewReader(bytes.NewReader(in)))
		if err != nil {
			return
		}
		target, err := requestTarget(req)
		if err != nil {
			if _, ok := err.(*httpError); !ok {
				t.Fatalf("requestTarget error %T is not an *httpError", err)
			}
			return
		}
		host, port, err := net.SplitHostPort(target)
		if err != nil || host == "" {
			t.Fatalf("accepted target %q: %v", target, err)
		}
		if n, err := strconv.ParseUint(port, 10, 16); err != nil || n == 0 {
			t.Fatalf("accepted target %q", target)
		}
		removeHopHeaders(req.Header)
	})
}

// TestHTTPKeepAliveThenCONNECT: a client that sends a plain request and
// then CONNECT on the same connection gets its tunnel, and the origin
// conn of the plain request is closed when the tunnel starts, not when it
// ends.
func TestHTTPKeepAliveThenCONNECT(t *testing.T) {
	originClosed := make(chan struct{}, 1)
	origin := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "plain")
	}))
	origin.Config.ConnState = func(_ net.Conn, st http.ConnState) {
		if st == http.StateClosed {
			originClosed <- struct{}{}
		}
	}
	origin.Start()
	t.Cleanup(origin.Close)
	echo := startEchoServer(t)

	addr := startServer(t, &Server{})
	c, err := net.Dial("tcp", addr)
	require.NoError(t, err)
	defer c.Close()
	require.NoError(t, c.SetDeadline(time.Now().Add(20*time.Second)))
	br := bufio.NewReader(c)
	host := origin.Listener.Addr().String()
	_, err = io.WriteString(c, "GET http://"+host+"/ HTTP/1.1\r\nHost: "+host+"\r\n\r\n")
	require.NoError(t, err)
	resp, err := http.ReadResponse(br, nil)
	require.NoError(t, err)
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	require.Equal(t, "plain", string(body))
	require.False(t, resp.Close, "the proxy should keep the client connection alive")

	_, err = io.WriteString(c, "CONNECT "+echo+" HTTP/1.1\r\nHost: "+echo+"\r\n\r\n")
	require.NoError(t, err)
	resp, err = http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
	require.NoError(t, err)
	require.Equal(t, 200, resp.StatusCode)
	_, err = io.WriteString(c, "through the tunnel")
	require.NoError(t, err)
	got := make([]byte, len("through the tunnel"))
	_, err = io.ReadFull(br, got)
	require.NoError(t, err)
	require.Equal(t, "through the tunnel", string(got))

	// The tunnel is still open; the origin conn must be gone already.
	select {
	case <-originClosed:
	case <-time.After(5 * time.Second):
		t.Fatal("the origin conn of the earlier request stays open during the tunnel")
	}
}
