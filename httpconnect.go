package hpcproxy

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/textproto"
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
)

// httpError is an HTTP request the server answers with an error status.
type httpError struct {
	code   int
	msg    string
	header []string // extra "Key: value" lines
}

func (e *httpError) Error() string {
	return fmt.Sprintf("hpcproxy: http %d: %s", e.code, e.msg)
}

// readProxyRequest reads one request's header block. A request that cannot
// be parsed yields a *httpError (400, or 431 for an over-long header).
func readProxyRequest(br *bufio.Reader) (*http.Request, error) {
	req, err := http.ReadRequest(br)
	if err != nil {
		if errors.Is(err, errHeaderTooLong) {
			return nil, &httpError{code: http.StatusRequestHeaderFieldsTooLarge, msg: "request header too large"}
		}
		// A bad request target is a *url.Error, which is also a net.Error:
		// it is the client's malformed request, not a broken connection.
		var ue *url.Error
		if !errors.As(err, &ue) && (errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || isNetError(err)) {
			return nil, fmt.Errorf("hpcproxy: http: read request: %w", err)
		}
		return nil, &httpError{code: http.StatusBadRequest, msg: "malformed request: " + err.Error()}
	}
	return req, nil
}

func isNetError(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) || errors.Is(err, net.ErrClosed) || errors.Is(err, syscall.ECONNRESET)
}

// requestTarget says where a parsed proxy request goes: for CONNECT the
// authority ("host:port"), for forwarding the origin ("host:port", port 80
// by default). Requests a proxy cannot serve yield a *httpError.
func requestTarget(req *http.Request) (string, error) {
	if req.Method == http.MethodConnect {
		u := req.URL
		if u.Host == "" || u.Path != "" || u.Scheme != "" {
			return "", &httpError{code: http.StatusBadRequest, msg: "CONNECT needs a host:port target, got " + strconv.Quote(req.RequestURI)}
		}
		return checkAuthority(u.Host, "")
	}
	switch strings.ToLower(req.URL.Scheme) {
	case "":
		return "", &httpError{code: http.StatusBadRequest,
			msg: "not a proxy request: send an absolute URL (GET http://host/path) or CONNECT host:port"}
	case "http":
		if req.URL.Host == "" {
			return "", &httpError{code: http.StatusBadRequest, msg: "URL has no host"}
		}
		return checkAuthority(req.URL.Host, "80")
	case "https":
		return "", &httpError{code: http.StatusMethodNotAllowed, header: []string{"Allow: CONNECT"},
			msg: "use CONNECT for https URLs (" + req.Method + " https://... is not proxied)"}
	}
	return "", &httpError{code: http.StatusBadRequest, msg: "unsupported URL scheme " + strconv.Quote(req.URL.Scheme)}
}

// checkAuthority validates "host:port" (port optional when defPort is
// set) and returns it with the port filled in.
func checkAuthority(hostport, defPort string) (string, error) {
	host, port, err := net.SplitHostPort(hostport)
	if err != nil && defPort != "" && !strings.HasSuffix(hostport, ":") {
		host, port, err = net.SplitHostPort(net.JoinHostPort(strings.Trim(hostport, "[]"), defPort))
	}
	if err != nil {
		return "", &httpError{code: http.StatusBadRequest, msg: "bad host:port " + strconv.Quote(hostport)}
	}
	if n, perr := strconv.ParseUint(port, 10, 16); perr != nil || n == 0 {
		return "", &httpError{code: http.StatusBadRequest, msg: "bad port in " + strconv.Quote(hostport)}
	}
	if err := checkHostName([]byte(host)); err != nil {
		return "", &httpError{code: http.StatusBadRequest, msg: err.Error()}
	}
	return net.JoinHostPort(host, port), nil
}

// httpStatusFor maps a dial failure to an HTTP status.
func httpStatusFor(f dialFailure) int {
	switch f {
	case failTimeout:
		return http.StatusGatewayTimeout
	case failTunnelDown, failBusy:
		return http.StatusServiceUnavailable
	case failProhibited:
		return http.StatusForbidden
	}
	return http.StatusBadGateway
}

// writeHTTPError writes a complete error response with a short text body.
func writeHTTPError(w io.Writer, e *httpError) error {
	body := "hpcproxy: " + e.msg + "\n"
	var b strings.Builder
	fmt.Fprintf(&b, "HTTP/1.1 %d %s\r\n", e.code, http.StatusText(e.code))
	b.WriteString("Content-Type: text/plain; charset=utf-8\r\n")
	fmt.Fprintf(&b, "Content-Length: %d\r\n", len(body))
	b.WriteString("Connection: close\r\n")
	for _, h := range e.header {
		b.WriteString(h + "\r\n")
	}
	b.WriteString("\r\n")
	b.WriteString(body)
	_, err := io.WriteString(w, b.String())
	return err
}

// refuseHTTP counts a failed request, answers e, logs it, and lingers
// briefly so that the client reads the response before the conn closes
// (closing with unread request bytes would reset it).
func (ss *session) refuseHTTP(e *httpError) error {
	ss.srv.failed.Add(1)
	ss.log.Debug("http request refused", "status", e.code, "reason", e.msg)
	if err := writeHTTPError(ss.c.io, e); err != nil {
		ss.log.Debug("write refusal", "err", err)
		return e
	}
	// The lingering read below holds no request in memory: the
	// connection's handshake slot (MaxHandshakes) is free for another.
	ss.authenticated()
	if cw, ok := ss.c.raw.(closeWriter); ok {
		_ = cw.CloseWrite()
		_ = ss.c.raw.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
		var r io.Reader = ss.c.raw
		if ss.c.br != nil {
			ss.c.unlimit()
			r = ss.c.br
		}
		_, _ = io.Copy(io.Discard, io.LimitReader(r, 256<<10))
	}
	return e
}

// serveHTTP serves HTTP proxy requests on one client connection: a CONNECT
// (which turns it into a relay), or any number of absolute-form requests,
// kept alive across destinations.
func (ss *session) serveHTTP() error {
	c := ss.c
	up := &upstreams{ss: ss}
	defer up.close()
	for first := true; ; first = false {
		if !first {
			// Wait for the next request, then bound its header block.
			var idle time.Time
			if d := ss.srv.keepAliveTimeout(); d > 0 {
				idle = time.Now().Add(d)
			}
			if err := c.raw.SetDeadline(idle); err != nil {
				return err
			}
			ss.idle.Store(true)
			_, err := c.br.Peek(1)
			ss.idle.Store(false)
			if err != nil {
				return nil // the client is done, idled out, or we shut down
			}
			if err := c.raw.SetDeadline(time.Now().Add(ss.srv.handshakeTimeout())); err != nil {
				return err
			}
		}
		c.limitHeader()
		req, err := readProxyRequest(c.br)
		if err != nil {
			var he *httpError
			if errors.As(err, &he) {
				return ss.refuseHTTP(he)
			}
			return ss.fail(err)
		}
		c.unlimit()
		if req.ProtoMajor != 1 {
			return ss.refuseHTTP(&httpError{code: http.StatusHTTPVersionNotSupported,
				msg: "unsupported protocol version " + strconv.Quote(req.Proto)})
		}
		if !ss.trusted && !ss.proxyAuthorized(req.Header) {
			return ss.refuseHTTP(&httpError{code: http.StatusProxyAuthRequired,
				msg:    "proxy authentication required",
				header: []string{`Proxy-Authenticate: Basic realm="hpcproxy"`}})
		}
		ss.authenticated()
		addr, err := requestTarget(req)
		if err != nil {
			return ss.refuseHTTP(err.(*httpError))
		}
		if req.Method == http.MethodConnect {
			// The connection is a tunnel from now on: an origin conn kept
			// for its earlier plain requests would stay open, unused,
			// for as long as the tunnel lasts.
			up.drop()
			return ss.serveCONNECT(addr)
		}
		if err := c.raw.SetDeadline(time.Time{}); err != nil {
			return err
		}
		keep, err := ss.forward(req, addr, up)
		if err != nil || !keep {
			return err
		}
	}
}

// proxyAuthorized checks Basic Proxy-Authorization against the
// credentials.
func (ss *session) proxyAuthorized(h http.Header) bool {
	scheme, cred, ok := strings.Cut(strings.TrimSpace(h.Get("Proxy-Authorization")), " ")
	if !ok || !strings.EqualFold(scheme, "Basic") {
		return false
	}
	dec, err := base64.StdEncoding.DecodeString(strings.TrimSpace(cred))
	if err != nil {
		return false
	}
	user, pass, ok := strings.Cut(string(dec), ":")
	return ok && ss.srv.checkPassword(user, pass)
}

// serveCONNECT dials addr, answers 200 and relays (RFC 9110, 9.3.6).
func (ss *session) serveCONNECT(addr string) error {
	const established = "HTTP/1.1 200 Connection established\r\n\r\n"
	dst, err := ss.dialOrHandoff(addr, []byte(established))
	if err != nil {
		f := classifyDialError(err)
		ss.logDialError(addr, f, err)
		return ss.refuseHTTP(&httpError{code: httpStatusFor(f), msg: "connect to " + addr + ": " + f.reason()})
	}
	if dst == nil {
		return nil // handed off
	}
	if _, err := io.WriteString(ss.c.io, established); err != nil {
		ss.release(dst)
		return ss.fail(fmt.Errorf("hpcproxy: http: write CONNECT reply: %w", err))
	}
	return ss.startRelay(dst)
}

// hopHeaders are removed when forwarding (RFC 9110, 7.6.1), besides the
// headers that Connection names.
var hopHeaders = []string{
	"Connection", "Proxy-Connection", "Keep-Alive", "Proxy-Authenticate",
	"Proxy-Authorization", "Te", "Trailer", "Transfer-Encoding", "Upgrade",
}

func removeHopHeaders(h http.Header) {
	for _, f := range h["Connection"] {
		for _, name := range strings.Split(f, ",") {
			if name = textproto.TrimString(name); name != "" {
				h.Del(name)
			}
		}
	}
	for _, k := range hopHeaders {
		h.Del(k)
	}
}

// via is this proxy's Via entry for a message received with HTTP
// major.minor (RFC 9110, 7.6.3).
func via(major, minor int) string {
	return strconv.Itoa(major) + "." + strconv.Itoa(minor) + " hpcproxy"
}

// forward sends one absolute-form request to addr and streams the response
// back. It reports whether the client connection may carry another
// request.
func (ss *session) forward(req *http.Request, addr string, ups *upstreams) (keep bool, err error) {
	clientClose := req.Close
	expectContinue := strings.EqualFold(strings.TrimSpace(req.Header.Get("Expect")), "100-continue")
	removeHopHeaders(req.Header)
	if expectContinue {
		req.Header.Del("Expect")
	}
	req.Header.Add("Via", via(req.ProtoMajor, req.ProtoMinor))
	if _, ok := req.Header["User-Agent"]; !ok {
		req.Header["User-Agent"] = []string{""} // keep req.Write from adding Go's
	}
	req.Close = false
	req.RequestURI = ""

	// The body's framing is the client's: a malformed chunked body or a
	// short one is the client's bad request (400), never a truncated
	// request sent upstream. A body that ends within bodyPrereadBytes is
	// read, and so checked, before anything is dialled; a longer one
	// streams, and if it breaks, the origin conn is closed before the
	// request is complete (no last chunk, too few bytes) and the client
	// gets 400. Not with Expect: 100-continue, whose client waits for the
	// go-ahead before it sends the body.
	var body *checkedBody
	if req.Body != nil && req.Body != http.NoBody {
		body = &checkedBody{rc: req.Body}
		req.Body = body
		if !expectContinue {
			if err := body.preread(); err != nil {
				return false, ss.refuseHTTP(&httpError{code: http.StatusBadRequest, msg: "malformed request body: " + err.Error()})
			}
		}
	}

	resp, err := ups.roundTrip(req, addr, func() error {
		if expectContinue {
			_, err := io.WriteString(ss.c.raw, "HTTP/1.1 100 Continue\r\n\r\n")
			return err
		}
		return nil
	})
	if err != nil {
		var he *httpError
		if body != nil && body.err != nil {
			return false, ss.refuseHTTP(&httpError{code: http.StatusBadRequest, msg: "malformed request body: " + body.err.Error()})
		}
		if errors.As(err, &he) {
			return false, ss.refuseHTTP(he)
		}
		return false, err
	}
	defer resp.Body.Close()

	upstreamClose := resp.Close
	removeHopHeaders(resp.Header)
	resp.Header.Add("Via", via(resp.ProtoMajor, resp.ProtoMinor))
	resp.Proto, resp.ProtoMajor, resp.ProtoMinor = "HTTP/1.1", 1, 1
	resp.Close = clientClose
	if resp.ContentLength < 0 && len(resp.TransferEncoding) == 0 && bodyAllowed(req.Method, resp.StatusCode) {
		// A close-delimited body: re-frame it as chunked so the client
		// connection survives, unless the client speaks HTTP/1.0.
		if req.ProtoAtLeast(1, 1) {
			resp.TransferEncoding = []string{"chunked"}
		} else {
			resp.Close = true
		}
	}
	clientW := newFlushWriter(ss.c.raw, &ss.srv.bytesOut)
	if resp.Body != http.NoBody {
		resp.Body = flushingBody{resp.Body, clientW}
	}
	werr := resp.Write(clientW)
	if werr == nil {
		werr = clientW.Flush()
	}
	if werr != nil || upstreamClose {
		ups.drop()
	}
	if werr != nil {
		return false, fmt.Errorf("hpcproxy: http: relay response from %s: %w", addr, werr)
	}
	return !resp.Close, nil
}

// bodyPrereadBytes is how much of a request body forward reads before it
// dials the origin.
const bodyPrereadBytes = 64 << 10

// checkedBody is a client's request body on its way upstream: it may hold
// the body's first bytes, read ahead, and it records a failure to read the
// rest (bad chunked framing, a client gone before Content-Length bytes),
// which is the client's fault, not the origin's.
type checkedBody struct {
	rc   io.ReadCloser
	head []byte // read ahead, not yet passed on
	done bool   // rc has been read to its end
	err  error  // the read of rc that failed
}

// preread reads up to bodyPrereadBytes of the body ahead.
func (b *checkedBody) preread() error {
	var buf bytes.Buffer
	n, err := buf.ReadFrom(io.LimitReader(b.rc, bodyPrereadBytes))
	if err != nil {
		b.err = err
		return err
	}
	b.head, b.done = buf.Bytes(), n < bodyPrereadBytes
	return nil
}

func (b *checkedBody) Read(p []byte) (int, error) {
	if len(b.head) > 0 {
		n := copy(p, b.head)
		b.head = b.head[n:]
		return n, nil
	}
	if b.done {
		return 0, io.EOF
	}
	if b.err != nil {
		return 0, b.err
	}
	n, err := b.rc.Read(p)
	if err != nil && err != io.EOF {
		b.err = err
	}
	return n, err
}

func (b *checkedBody) Close() error { return b.rc.Close() }

// bodyAllowed reports whether a response to method with code has a body.
func bodyAllowed(method string, code int) bool {
	return method != http.MethodHead && code >= 200 && code != http.StatusNoContent && code != http.StatusNotModified
}

// upstreams keeps a client connection's last origin connection for reuse
// by its next request to the same host.
type upstreams struct {
	ss   *session
	addr string
	conn net.Conn
	br   *bufio.Reader
}

func (u *upstreams) drop() {
	if u.conn != nil {
		u.ss.release(u.conn)
		u.conn, u.br, u.addr = nil, nil, ""
	}
}

func (u *upstreams) close() { u.drop() }

// roundTrip writes req to addr (reusing the previous conn when it went to
// the same place) and reads the response head. started runs once the
// origin is connected, before the request body is read. Dial failures and
// broken origins come back as *httpError.
func (u *upstreams) roundTrip(req *http.Request, addr string, started func() error) (*http.Response, error) {
	if u.conn != nil && u.addr != addr {
		u.drop()
	}
	for attempt := 0; ; attempt++ {
		reused := u.conn != nil
		if !reused {
			conn, err := u.ss.dial(addr)
			if err != nil {
				f := classifyDialError(err)
				u.ss.logDialError(addr, f, err)
				return nil, &httpError{code: httpStatusFor(f), msg: "connect to " + addr + ": " + f.reason()}
			}
			u.conn, u.addr = conn, addr
			u.br = bufio.NewReader(conn)
		}
		if attempt == 0 {
			if err := started(); err != nil {
				return nil, err
			}
		}
		resp, err := u.send(req)
		if err == nil {
			return resp, nil
		}
		u.drop()
		// An idle origin conn may have been closed under us; a request
		// without a body can safely go again on a fresh one.
		if reused && attempt == 0 && (req.Body == nil || req.Body == http.NoBody) {
			continue
		}
		return nil, &httpError{code: http.StatusBadGateway, msg: "origin " + addr + ": " + err.Error()}
	}
}

func (u *upstreams) send(req *http.Request) (*http.Response, error) {
	w := newFlushWriter(u.conn, &u.ss.srv.bytesIn)
	body := req.Body
	if body != nil && body != http.NoBody {
		req.Body = flushingBody{body, w}
		defer func() { req.Body = body }()
	}
	if err := req.Write(w); err != nil {
		return nil, err
	}
	if err := w.Flush(); err != nil {
		return nil, err
	}
	for {
		resp, err := http.ReadResponse(u.br, req)
		if err != nil {
			return nil, err
		}
		if resp.StatusCode == http.StatusSwitchingProtocols {
			resp.Body.Close()
			return nil, errors.New("origin switched protocols, which this proxy does not forward")
		}
		if resp.StatusCode >= 200 {
			return resp, nil
		}
		// 1xx interim responses (103 Early Hints) have no body; only the
		// final one matters to the exchange, and we drop the rest.
		resp.Body.Close()
	}
}

// flushWriter buffers small writes (a message head) into one syscall. It
// hides bufio.Writer's ReadFrom so that io.Copy reads a body through
// flushingBody, which flushes before each read: a streamed body is never
// held back waiting for more.
type flushWriter struct {
	bw *bufio.Writer
}

func newFlushWriter(w io.Writer, count *atomic.Int64) *flushWriter {
	return &flushWriter{bw: bufio.NewWriter(countingWriter{w, count})}
}

func (w *flushWriter) Write(p []byte) (int, error)       { return w.bw.Write(p) }
func (w *flushWriter) WriteString(s string) (int, error) { return w.bw.WriteString(s) }
func (w *flushWriter) WriteByte(c byte) error            { return w.bw.WriteByte(c) }
func (w *flushWriter) Flush() error                      { return w.bw.Flush() }

// flushingBody flushes w before each read of the body it wraps.
type flushingBody struct {
	io.ReadCloser
	w *flushWriter
}

func (b flushingBody) Read(p []byte) (int, error) {
	if b.w.bw.Buffered() > 0 {
		if err := b.w.bw.Flush(); err != nil {
			return 0, err
		}
	}
	return b.ReadCloser.Read(p)
}

// countingWriter counts the bytes written through it.
type countingWriter struct {
	w io.Writer
	n *atomic.Int64
}

func (c countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n.Add(int64(n))
	return n, err
}
