// Command e2efetch is the Go client of the end-to-end tests (test/e2e): a
// program that uses a proxy the way Go programs do, through
// http.ProxyFromEnvironment, or finds one the way hpcproxy's library users
// do, with FindActiveProxy.
//
//	e2efetch URL             # GET URL through $HTTPS_PROXY/$HTTP_PROXY
//	e2efetch -find           # print FindActiveProxy's URL, exit 1 if none
//	e2efetch -find URL       # GET URL through the proxy FindActiveProxy found
//	e2efetch -noproxy URL    # GET URL with no proxy at all (Transport.Proxy nil), printing the address it connected to
//	e2efetch -serve ADDR -body TEXT  # serve TEXT (and a newline) at every path
//
// A fetch prints "bytes=N sha256=HEX" and exits 0 only for a 200 response
// read completely within -timeout. A server prints "serving on ADDR" once
// it listens and runs until killed, or for -timeout if that was given.
package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/url"
	"os"
	"time"

	"github.com/hpcproxy/hpcproxy"
)

func main() {
	find := flag.Bool("find", false, "find the proxy with hpcproxy.FindActiveProxy instead of the environment")
	noProxy := flag.Bool("noproxy", false, "use no proxy at all: Transport.Proxy nil, every proxy variable ignored")
	timeout := flag.Duration("timeout", 20*time.Second, "bound on the whole request (with -serve: on the server's life, if given)")
	serveAddr := flag.String("serve", "", "serve -body on this address instead of fetching")
	body := flag.String("body", "", "what -serve answers")
	flag.Parse()

	if *serveAddr != "" {
		life := time.Duration(0)
		flag.Visit(func(f *flag.Flag) {
			if f.Name == "timeout" {
				life = *timeout
			}
		})
		if err := serve(*serveAddr, *body, life); err != nil {
			fmt.Fprintln(os.Stderr, "e2efetch:", err)
			os.Exit(1)
		}
		return
	}

	proxy := http.ProxyFromEnvironment
	if *find {
		u, ok := hpcproxy.FindActiveProxy()
		if !ok {
			fmt.Fprintln(os.Stderr, "e2efetch: FindActiveProxy found no proxy")
			os.Exit(1)
		}
		if flag.NArg() == 0 {
			fmt.Println(u)
			return
		}
		pu, err := url.Parse(u)
		if err != nil {
			fmt.Fprintln(os.Stderr, "e2efetch:", err)
			os.Exit(1)
		}
		proxy = http.ProxyURL(pu)
	}
	if *noProxy {
		proxy = nil
	}
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: e2efetch [-find|-noproxy] [-timeout D] URL | e2efetch -serve ADDR -body TEXT [-timeout D]")
		os.Exit(2)
	}
	if err := fetch(flag.Arg(0), proxy, *timeout); err != nil {
		fmt.Fprintln(os.Stderr, "e2efetch:", err)
		os.Exit(1)
	}
}

func fetch(u string, proxy func(*http.Request) (*url.URL, error), timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.Proxy = proxy
	if proxy == nil {
		// Say where the connection went: without a proxy, the address the
		// name resolved to here.
		ctx = httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{GotConn: func(ci httptrace.GotConnInfo) {
			fmt.Printf("remote=%s\n", ci.Conn.RemoteAddr())
		}})
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return err
	}
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", u, resp.Status)
	}
	h := sha256.New()
	n, err := io.Copy(h, resp.Body)
	if err != nil {
		return fmt.Errorf("GET %s: after %d bytes: %w", u, n, err)
	}
	fmt.Printf("bytes=%d sha256=%s\n", n, hex.EncodeToString(h.Sum(nil)))
	return nil
}

// serve answers every request on addr with body and a newline, for life
// (forever if zero).
func serve(addr, body string, life time.Duration) error {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	fmt.Printf("serving on %s\n", l.Addr())
	if life > 0 {
		time.AfterFunc(life, func() { l.Close() })
	}
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "text/plain")
			fmt.Fprintln(w, body)
		}),
		ReadHeaderTimeout: 10 * time.Second,
	}
	err = srv.Serve(l)
	if life > 0 && errors.Is(err, net.ErrClosed) {
		return nil
	}
	return err
}
