// Command relaybench measures single-stream relay throughput over loopback,
// side by side in one run: a direct connection, hpcproxy (SOCKS5 and HTTP
// CONNECT, with a direct dialer), socat and microsocks, all relaying the
// same download from one source.
//
//	go run ./internal/cmd/relaybench [-size 1GiB] [-rounds 5]
//
// Each relay runs as its own process (hpcproxy too: relaybench starts a
// copy of itself with -serve), the contenders take turns A B C A B C over
// the rounds, and the table gives each one's median with its ratio to the
// direct copy and to socat. socat and microsocks are Debian packages; a
// missing one is reported and skipped.
package main

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/net/proxy"

	"github.com/hpcproxy/hpcproxy"
)

func main() {
	size := flag.Int64("size", 1<<30, "bytes per transfer")
	rounds := flag.Int("rounds", 5, "rounds (each contender once per round)")
	serve := flag.Bool("serve", false, "internal: run an hpcproxy server on 127.0.0.1 and print its address")
	flag.Parse()
	if *serve {
		if err := runServer(); err != nil {
			fmt.Fprintln(os.Stderr, "relaybench:", err)
			os.Exit(1)
		}
		return
	}
	if err := run(*size, *rounds); err != nil {
		fmt.Fprintln(os.Stderr, "relaybench:", err)
		os.Exit(1)
	}
}

// runServer serves hpcproxy with a direct dialer until stdin closes.
func runServer() error {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	fmt.Println(ln.Addr())
	srv := &hpcproxy.Server{}
	go func() {
		_, _ = io.Copy(io.Discard, os.Stdin)
		_ = srv.Close()
	}()
	if err := srv.Serve(ln); !errors.Is(err, hpcproxy.ErrServerClosed) {
		return err
	}
	return nil
}

// contender is one way of reaching the source.
type contender struct {
	name    string
	connect func() (net.Conn, error)
	times   []time.Duration
}

func run(size int64, rounds int) error {
	src, err := startSource()
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()

	var procs []*exec.Cmd
	defer func() {
		for _, p := range procs {
			_ = p.Process.Kill()
			_ = p.Wait()
		}
	}()

	cs := []*contender{{name: "direct", connect: func() (net.Conn, error) { return net.Dial("tcp", src) }}}

	self, err := os.Executable()
	if err != nil {
		return err
	}
	hp := exec.CommandContext(ctx, self, "-serve")
	hp.Stderr = os.Stderr
	stdin, err := hp.StdinPipe()
	if err != nil {
		return err
	}
	defer stdin.Close()
	out, err := hp.StdoutPipe()
	if err != nil {
		return err
	}
	if err := hp.Start(); err != nil {
		return err
	}
	procs = append(procs, hp)
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		return fmt.Errorf("hpcproxy server: %w", err)
	}
	hpAddr := strings.TrimSpace(line)
	cs = append(cs,
		&contender{name: "hpcproxy socks5", connect: func() (net.Conn, error) { return socks5(hpAddr, src) }},
		&contender{name: "hpcproxy connect", connect: func() (net.Conn, error) { return httpConnect(hpAddr, src) }},
	)

	var missing []string
	if path, err := exec.LookPath("socat"); err != nil {
		missing = append(missing, "socat (apt-get install socat)")
	} else {
		port, err := freePort()
		if err != nil {
			return err
		}
		addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
		p := exec.CommandContext(ctx, path, "-b", "262144",
			fmt.Sprintf("TCP-LISTEN:%d,bind=127.0.0.1,reuseaddr,fork", port), "TCP:"+src)
		if err := startAndWait(p, addr); err != nil {
			return fmt.Errorf("socat: %w", err)
		}
		procs = append(procs, p)
		cs = append(cs, &contender{name: "socat -b 262144", connect: func() (net.Conn, error) { return net.Dial("tcp", addr) }})
	}
	if path, err := exec.LookPath("microsocks"); err != nil {
		missing = append(missing, "microsocks (apt-get install microsocks)")
	} else {
		port, err := freePort()
		if err != nil {
			return err
		}
		addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
		p := exec.CommandContext(ctx, path, "-i", "127.0.0.1", "-p", strconv.Itoa(port))
		if err := startAndWait(p, addr); err != nil {
			return fmt.Errorf("microsocks: %w", err)
		}
		procs = append(procs, p)
		cs = append(cs, &contender{name: "microsocks", connect: func() (net.Conn, error) { return socks5(addr, src) }})
	}
	for _, m := range missing {
		fmt.Printf("MISSING: %s is not installed; its row is left out\n", m)
	}

	fmt.Printf("single stream, %d MiB per transfer, %d rounds, GOMAXPROCS from %d CPUs\n", size>>20, rounds, numCPU())
	buf := make([]byte, 256<<10)
	for r := range rounds {
		for _, c := range cs {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			d, err := transfer(c, size, buf)
			if err != nil {
				return fmt.Errorf("%s (round %d): %w", c.name, r+1, err)
			}
			c.times = append(c.times, d)
		}
	}

	median := func(c *contender) float64 {
		ts := slices.Clone(c.times)
		slices.Sort(ts)
		return float64(size) / ts[len(ts)/2].Seconds() / 1e9
	}
	direct := median(cs[0])
	var socat float64
	for _, c := range cs {
		if strings.HasPrefix(c.name, "socat") {
			socat = median(c)
		}
	}
	fmt.Printf("%-18s %10s %10s %10s   %s\n", "relay", "GB/s", "x direct", "x socat", "all rounds (GB/s)")
	for _, c := range cs {
		m := median(c)
		vs := "-"
		if socat > 0 {
			vs = fmt.Sprintf("%.2f", m/socat)
		}
		var all []string
		for _, d := range c.times {
			all = append(all, fmt.Sprintf("%.2f", float64(size)/d.Seconds()/1e9))
		}
		fmt.Printf("%-18s %10.2f %10.2f %10s   %s\n", c.name, m, m/direct, vs, strings.Join(all, " "))
	}
	return nil
}

// transfer downloads size bytes from the source through c and times it.
func transfer(c *contender, size int64, buf []byte) (time.Duration, error) {
	conn, err := c.connect()
	if err != nil {
		return 0, err
	}
	defer conn.Close()
	var req [8]byte
	binary.BigEndian.PutUint64(req[:], uint64(size))
	start := time.Now()
	if _, err := conn.Write(req[:]); err != nil {
		return 0, err
	}
	var got int64
	for got < size {
		n, err := conn.Read(buf)
		got += int64(n)
		if err != nil {
			if err == io.EOF && got == size {
				break
			}
			return 0, fmt.Errorf("after %d of %d bytes: %w", got, size, err)
		}
	}
	return time.Since(start), nil
}

// startSource serves downloads on 127.0.0.1: each request is an 8-byte
// big-endian length, answered with that many bytes.
func startSource() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	chunk := make([]byte, 1<<20)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
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
			}()
		}
	}()
	return ln.Addr().String(), nil
}

func socks5(proxyAddr, target string) (net.Conn, error) {
	d, err := proxy.SOCKS5("tcp", proxyAddr, nil, proxy.Direct)
	if err != nil {
		return nil, err
	}
	return d.Dial("tcp", target)
}

func httpConnect(proxyAddr, target string) (net.Conn, error) {
	c, err := net.Dial("tcp", proxyAddr)
	if err != nil {
		return nil, err
	}
	if _, err := fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", target, target); err != nil {
		c.Close()
		return nil, err
	}
	want := "HTTP/1.1 200 Connection established\r\n\r\n"
	got := make([]byte, len(want))
	if _, err := io.ReadFull(c, got); err != nil || string(got) != want {
		c.Close()
		return nil, fmt.Errorf("CONNECT reply %q: %v", got, err)
	}
	return c, nil
}

func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// startAndWait starts p and waits until addr accepts connections.
// Their chatter (microsocks logs every connection) is discarded.
func startAndWait(p *exec.Cmd, addr string) error {
	if err := p.Start(); err != nil {
		return err
	}
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		c, err := net.DialTimeout("tcp", addr, 100*time.Millisecond)
		if err == nil {
			c.Close()
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	_ = p.Process.Kill()
	_ = p.Wait()
	return fmt.Errorf("not listening on %s after 5s", addr)
}

func numCPU() int {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return 0
	}
	return strings.Count(string(b), "processor\t:")
}
