package hpcproxy_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"time"

	"golang.org/x/net/proxy"

	"github.com/hpcproxy/hpcproxy"
)

// A Server with credentials, used by an ordinary net/http client through
// its proxy URL. Plain http:// URLs are forwarded in absolute form;
// https:// ones would go through CONNECT.
func ExampleServer() {
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello, via %s", r.Header.Get("Via"))
	}))
	defer backend.Close()

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	srv := &hpcproxy.Server{Credentials: map[string]string{"alice": "s3cret"}}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	defer func() { srv.Close(); <-served }()

	proxyURL := &url.URL{Scheme: "http", User: url.UserPassword("alice", "s3cret"), Host: ln.Addr().String()}
	tr := &http.Transport{Proxy: http.ProxyURL(proxyURL)}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr}).Get(backend.URL)
	if err != nil {
		log.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	fmt.Println(resp.Status)
	fmt.Println(string(body))
	// Output:
	// 200 OK
	// hello, via 1.1 hpcproxy
}

// RunProxy with a fake tunnel: the DialFunc stands in for an SSH tunnel
// and shows that a SOCKS5 client's host name reaches it unresolved, to be
// resolved on the far side.
func ExampleRunProxy() {
	fakeTunnel := func(ctx context.Context, network, addr string) (net.Conn, error) {
		near, far := net.Pipe()
		go func() {
			defer far.Close()
			fmt.Fprintf(far, "far side asked for %s %s\n", network, addr)
		}()
		return near, nil
	}

	// Pick a free port for the example; a daemon would use a fixed one.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- hpcproxy.RunProxy(ctx, addr, fakeTunnel) }()

	dialer, err := proxy.SOCKS5("tcp", addr, nil, proxy.Direct)
	if err != nil {
		log.Fatal(err)
	}
	var conn net.Conn
	for range 100 { // wait until RunProxy listens
		if conn, err = dialer.Dial("tcp", "login.cluster.example:22"); err == nil {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err != nil {
		log.Fatal(err)
	}
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		log.Fatal(err)
	}
	conn.Close()
	fmt.Print(line)

	cancel()
	fmt.Println("RunProxy returned:", <-done)
	// Output:
	// far side asked for tcp login.cluster.example:22
	// RunProxy returned: <nil>
}

// The library snippet of the README: a tunnel by the first method that
// works, a proxy server in front of it, and the same tunnel used directly
// from Go. It needs a login node, so it only compiles here; the example
// of Tunnel.Dial runs one without.
func ExampleEstablishTunnel() {
	ctx := context.Background()

	// A tunnel by the first method that works, and a proxy server in front of it.
	tun, err := hpcproxy.EstablishTunnel(ctx, hpcproxy.TunnelConfig{Destination: "login1"})
	if err != nil {
		log.Fatal(err) // *hpcproxy.TunnelError: why each method failed
	}
	defer tun.Close()
	go func() {
		if err := hpcproxy.RunProxy(ctx, "127.0.0.1:1080", tun.Dial); err != nil {
			log.Print(err)
		}
	}()

	// Or use the tunnel directly from Go: names resolve on the login node.
	client := &http.Client{Transport: &http.Transport{DialContext: tun.Dial}}
	resp, err := client.Get("https://example.org/")
	if err != nil {
		log.Fatal(err)
	}
	defer resp.Body.Close()
}

// A tunnel used directly by net/http. The direct method stands in for an
// SSH tunnel here (it dials with a net.Dialer, as a login node relaying
// itself would), so the example runs on loopback; with the default methods
// and a login node as Destination the code is the same.
func ExampleTunnel_Dial() {
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello from %s", r.Host)
	}))
	defer backend.Close()

	tun, err := hpcproxy.EstablishTunnel(context.Background(), hpcproxy.TunnelConfig{
		Destination: "login1",
		Methods:     []hpcproxy.Method{hpcproxy.MethodDirect},
	})
	if err != nil {
		log.Fatal(err)
	}
	defer tun.Close()

	tr := &http.Transport{DialContext: tun.Dial}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr}
	resp, err := client.Get(backend.URL)
	if err != nil {
		log.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	fmt.Println(resp.Status)
	fmt.Println(string(body) == "hello from "+backend.Listener.Addr().String())
	fmt.Println("method:", tun.Method())
	// Output:
	// 200 OK
	// true
	// method: direct
}
