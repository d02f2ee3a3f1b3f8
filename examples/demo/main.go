// Command demo runs an hpcproxy Server with a direct dialer on 127.0.0.1
// and fetches a page from a local HTTP server through it with each
// protocol the server speaks on its one port: SOCKS5, SOCKS4a, HTTP CONNECT
// and plain (absolute-form) HTTP. It prints each step.
//
//	go run ./examples/demo
package main

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"

	"golang.org/x/net/proxy"

	"github.com/hpcproxy/hpcproxy"
)

func main() {
	log.SetFlags(0)
	log.SetPrefix("demo: ")

	// The destination: a tiny web server on loopback.
	webLn, err := net.Listen("tcp", "127.0.0.1:0")
	check(err)
	web := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello from the web server (%s %s, Via: %q)", r.Method, r.URL.Path, r.Header.Get("Via"))
	})}
	go web.Serve(webLn)
	defer web.Close()
	webAddr := webLn.Addr().String()
	_, webPort, _ := net.SplitHostPort(webAddr)
	fmt.Println("1. web server listening on", webAddr)

	// The proxy: one port, every protocol, dialling directly.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	check(err)
	srv := &hpcproxy.Server{}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	proxyAddr := ln.Addr().String()
	fmt.Println("2. hpcproxy listening on", proxyAddr)

	// SOCKS5, with the name "localhost" resolved by the proxy (socks5h).
	d, err := proxy.SOCKS5("tcp", proxyAddr, nil, proxy.Direct)
	check(err)
	tr5 := &http.Transport{DialContext: d.(proxy.ContextDialer).DialContext}
	fmt.Println("3. SOCKS5:      ", get(&http.Client{Transport: tr5}, "http://localhost:"+webPort+"/socks5"))
	tr5.CloseIdleConnections()

	// SOCKS4a, spoken by hand (x/net/proxy has no SOCKS4).
	c, err := dialSOCKS4a(proxyAddr, "localhost", webPort)
	check(err)
	fmt.Println("4. SOCKS4a:     ", getOver(c, "localhost:"+webPort, "/socks4a"))

	// HTTP CONNECT, then a request through the tunnel.
	c, err = dialCONNECT(proxyAddr, webAddr)
	check(err)
	fmt.Println("5. HTTP CONNECT:", getOver(c, webAddr, "/connect"))

	// Plain HTTP: net/http sends http:// URLs to a proxy in absolute form.
	u := &url.URL{Scheme: "http", Host: proxyAddr}
	trh := &http.Transport{Proxy: http.ProxyURL(u)}
	fmt.Println("6. plain HTTP:  ", get(&http.Client{Transport: trh}, "http://"+webAddr+"/plain"))
	trh.CloseIdleConnections()

	check(srv.Close())
	if err := <-served; !errors.Is(err, hpcproxy.ErrServerClosed) {
		check(err)
	}
	st := srv.Stats()
	fmt.Printf("7. stopped: %d connections, %d bytes in, %d bytes out\n", st.Total, st.BytesIn, st.BytesOut)
}

func get(c *http.Client, u string) string {
	resp, err := c.Get(u)
	check(err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	check(err)
	return resp.Status + ": " + string(b)
}

// getOver sends one GET over an established tunnel.
func getOver(c net.Conn, host, path string) string {
	defer c.Close()
	req, err := http.NewRequest("GET", "http://"+host+path, nil)
	check(err)
	req.Close = true
	check(req.Write(c))
	resp, err := http.ReadResponse(bufio.NewReader(c), req)
	check(err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	check(err)
	return resp.Status + ": " + string(b)
}

func dialSOCKS4a(proxyAddr, host, port string) (net.Conn, error) {
	p, err := strconv.ParseUint(port, 10, 16)
	if err != nil {
		return nil, err
	}
	c, err := net.Dial("tcp", proxyAddr)
	if err != nil {
		return nil, err
	}
	req := binary.BigEndian.AppendUint16([]byte{4, 1}, uint16(p))
	req = append(req, 0, 0, 0, 1, 0) // 0.0.0.1: a name follows; empty user ID
	req = append(append(req, host...), 0)
	reply := make([]byte, 8)
	if _, err := c.Write(req); err != nil {
		c.Close()
		return nil, err
	}
	if _, err := io.ReadFull(c, reply); err != nil || reply[1] != 0x5a {
		c.Close()
		return nil, fmt.Errorf("socks4a refused: %x %v", reply, err)
	}
	return c, nil
}

func dialCONNECT(proxyAddr, target string) (net.Conn, error) {
	c, err := net.Dial("tcp", proxyAddr)
	if err != nil {
		return nil, err
	}
	fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", target, target)
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
	if err != nil || resp.StatusCode != 200 || br.Buffered() > 0 {
		c.Close()
		return nil, fmt.Errorf("CONNECT refused: %v %v", resp, err)
	}
	return c, nil
}

func check(err error) {
	if err != nil {
		log.Print(err)
		os.Exit(1)
	}
}
