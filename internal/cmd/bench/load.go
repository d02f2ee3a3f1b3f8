package main

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// The data source speaks a tiny protocol: a client sends one op byte and,
// for 'D' and 'U', an 8-byte big-endian length.
const (
	opDownload = 'D' // the source sends N bytes
	opUpload   = 'U' // the source reads N bytes, then answers one byte
	opEcho     = 'E' // the source echoes until EOF
)

// source is the far end of every measured connection, on 127.0.0.1. It
// runs in a process of its own (sourceEnv), so that the connections it
// holds count against its file limit, not the benchmark's.
type source struct {
	ln    net.Listener
	chunk []byte
}

// sourceEnv, when set in this program's environment, makes it serve as the
// data source: it prints its address and serves until its stdin closes.
const sourceEnv = "HPCPROXY_BENCH_SOURCE"

// runSource serves as the data source, if asked to.
func runSource() (int, bool) {
	if os.Getenv(sourceEnv) == "" {
		return 0, false
	}
	raiseFileLimit()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench source:", err)
		return 1, true
	}
	s := &source{ln: ln, chunk: make([]byte, 256<<10)}
	for i := range s.chunk {
		s.chunk[i] = byte(i * 7)
	}
	fmt.Println(ln.Addr())
	go func() {
		_, _ = io.Copy(io.Discard, os.Stdin)
		os.Exit(0)
	}()
	var backoff time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			// Out of file descriptors: the benchmark counts the
			// failures; keep serving the others.
			backoff = min(max(2*backoff, time.Millisecond), 100*time.Millisecond)
			time.Sleep(backoff)
			continue
		}
		backoff = 0
		go s.serve(c)
	}
}

// sourceProc is the running data source process.
type sourceProc struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	addr  string
}

// startSource starts this program as the data source and returns its
// address.
func startSource(self string) (*sourceProc, error) {
	cmd := exec.Command(self)
	cmd.Env = append(os.Environ(), sourceEnv+"=1")
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		return nil, fmt.Errorf("data source: %w", err)
	}
	return &sourceProc{cmd: cmd, stdin: stdin, addr: strings.TrimSpace(line)}, nil
}

func (s *sourceProc) close() {
	s.stdin.Close()
	done := make(chan struct{})
	go func() { _ = s.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		_ = s.cmd.Process.Kill()
		<-done
	}
}

func (s *source) serve(c net.Conn) {
	defer c.Close()
	var op [1]byte
	if _, err := io.ReadFull(c, op[:]); err != nil {
		return
	}
	switch op[0] {
	case opEcho:
		// Held connections are many and quiet: a small buffer each.
		var buf [64]byte
		for {
			n, err := c.Read(buf[:])
			if n > 0 {
				if _, err := c.Write(buf[:n]); err != nil {
					return
				}
			}
			if err != nil {
				return
			}
		}
	case opDownload, opUpload:
		var nb [8]byte
		if _, err := io.ReadFull(c, nb[:]); err != nil {
			return
		}
		left := int64(binary.BigEndian.Uint64(nb[:]))
		if op[0] == opUpload {
			// Read in 256 KiB like the client does: io.Discard reads
			// 8 KiB at a time, which made the sink, not the proxy, the
			// bottleneck of uploads.
			n, err := io.CopyBuffer(writerOnly{io.Discard}, io.LimitReader(c, left), make([]byte, 256<<10))
			if err != nil || n < left {
				return
			}
			_, _ = c.Write([]byte{1})
			_, _ = io.Copy(io.Discard, c)
			return
		}
		for left > 0 {
			n, err := c.Write(s.chunk[:min(left, int64(len(s.chunk)))])
			left -= int64(n)
			if err != nil {
				return
			}
		}
		_, _ = io.Copy(io.Discard, c)
	}
}

// dialer opens a connection to the source through one contender.
type dialer func() (net.Conn, error)

// socks5Dialer returns a dialer that asks the SOCKS5 proxy at proxyAddr to
// connect to target, with username/password when user is not empty. The
// request and, with auth, the credentials go out in as few writes as the
// protocol allows, as curl does.
func socks5Dialer(proxyAddr, target, user, pass string) dialer {
	host, portStr, _ := net.SplitHostPort(target)
	port, _ := strconv.Atoi(portStr)
	ip := net.ParseIP(host).To4()
	req := []byte{5, 1, 0, 1}
	req = append(req, ip...)
	req = binary.BigEndian.AppendUint16(req, uint16(port))
	greet := []byte{5, 1, 0}
	var auth []byte
	if user != "" {
		greet = []byte{5, 1, 2}
		auth = append([]byte{1, byte(len(user))}, user...)
		auth = append(append(auth, byte(len(pass))), pass...)
	}
	return func() (net.Conn, error) {
		c, err := net.DialTimeout("tcp", proxyAddr, dialTimeout)
		if err != nil {
			return nil, err
		}
		_ = c.SetDeadline(time.Now().Add(dialTimeout))
		if err := socks5Handshake(c, greet, auth, req); err != nil {
			c.Close()
			return nil, err
		}
		_ = c.SetDeadline(time.Time{})
		return c, nil
	}
}

func socks5Handshake(c net.Conn, greet, auth, req []byte) error {
	if _, err := c.Write(greet); err != nil {
		return err
	}
	var b [10]byte
	if _, err := io.ReadFull(c, b[:2]); err != nil {
		return fmt.Errorf("socks5 method reply: %w", err)
	}
	if b[0] != 5 || b[1] != greet[2] {
		return fmt.Errorf("socks5 method reply %x", b[:2])
	}
	if auth != nil {
		if _, err := c.Write(auth); err != nil {
			return err
		}
		if _, err := io.ReadFull(c, b[:2]); err != nil {
			return fmt.Errorf("socks5 auth reply: %w", err)
		}
		if b[1] != 0 {
			return fmt.Errorf("socks5 auth refused (%d)", b[1])
		}
	}
	if _, err := c.Write(req); err != nil {
		return err
	}
	// Every proxy here answers with an IPv4 bound address: 10 bytes.
	if _, err := io.ReadFull(c, b[:]); err != nil {
		return fmt.Errorf("socks5 connect reply: %w", err)
	}
	if b[1] != 0 {
		return fmt.Errorf("socks5 connect refused (reply %d)", b[1])
	}
	return nil
}

// tcpDialer connects straight to addr (the source, or a port forwarder).
func tcpDialer(addr string) dialer {
	return func() (net.Conn, error) { return net.DialTimeout("tcp", addr, dialTimeout) }
}

// dialTimeout bounds a connection through a proxy, handshake included, and
// one echo round trip: a contender that stalls fails the measurement
// instead of hanging the benchmark.
const dialTimeout = 30 * time.Second

// download reads n bytes from the source through d and returns how long it
// took from the request to the last byte.
func download(d dialer, n int64, buf []byte) (time.Duration, error) {
	c, err := d()
	if err != nil {
		return 0, err
	}
	defer c.Close()
	var req [9]byte
	req[0] = opDownload
	binary.BigEndian.PutUint64(req[1:], uint64(n))
	start := time.Now()
	if _, err := c.Write(req[:]); err != nil {
		return 0, err
	}
	var got int64
	for got < n {
		m, err := c.Read(buf[:min(int64(len(buf)), n-got)])
		got += int64(m)
		if err != nil && got < n {
			return 0, fmt.Errorf("download: after %d of %d bytes: %w", got, n, err)
		}
	}
	return time.Since(start), nil
}

// upload sends n bytes to the source through d and returns how long it
// took until the source confirmed the last byte.
func upload(d dialer, n int64, buf []byte) (time.Duration, error) {
	c, err := d()
	if err != nil {
		return 0, err
	}
	defer c.Close()
	var req [9]byte
	req[0] = opUpload
	binary.BigEndian.PutUint64(req[1:], uint64(n))
	start := time.Now()
	if _, err := c.Write(req[:]); err != nil {
		return 0, err
	}
	for left := n; left > 0; {
		m, err := c.Write(buf[:min(int64(len(buf)), left)])
		left -= int64(m)
		if err != nil {
			return 0, fmt.Errorf("upload: %d bytes left: %w", left, err)
		}
	}
	var ack [1]byte
	if _, err := io.ReadFull(c, ack[:]); err != nil {
		return 0, fmt.Errorf("upload: no confirmation: %w", err)
	}
	return time.Since(start), nil
}

// parallelDownload downloads total bytes over streams connections at once
// and returns the wall time from the first request to the last byte.
func parallelDownload(d dialer, total int64, streams int) (time.Duration, error) {
	per := total / int64(streams)
	var wg sync.WaitGroup
	errs := make([]error, streams)
	start := time.Now()
	for i := range streams {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 128<<10)
			_, errs[i] = download(d, per, buf)
		}()
	}
	wg.Wait()
	return time.Since(start), errors.Join(errs...)
}

// echoRoundTrip sends one byte on c and waits for it to come back.
func echoRoundTrip(c net.Conn) error {
	var b [1]byte
	b[0] = 42
	if _, err := c.Write(b[:]); err != nil {
		return err
	}
	if _, err := io.ReadFull(c, b[:]); err != nil {
		return err
	}
	if b[0] != 42 {
		return fmt.Errorf("echo returned %d", b[0])
	}
	return nil
}

// openEcho opens a connection to the source's echo service through d and
// makes one round trip over it.
func openEcho(d dialer) (net.Conn, error) {
	c, err := d()
	if err != nil {
		return nil, err
	}
	_ = c.SetDeadline(time.Now().Add(dialTimeout))
	if _, err := c.Write([]byte{opEcho}); err != nil {
		c.Close()
		return nil, err
	}
	if err := echoRoundTrip(c); err != nil {
		c.Close()
		return nil, err
	}
	_ = c.SetDeadline(time.Time{})
	return c, nil
}

// connectLatency measures samples sequential "new connection through the
// proxy, one byte there and back" and returns the sorted durations.
func connectLatency(d dialer, samples int) ([]time.Duration, error) {
	out := make([]time.Duration, 0, samples)
	for range samples {
		start := time.Now()
		c, err := openEcho(d)
		if err != nil {
			return nil, err
		}
		out = append(out, time.Since(start))
		c.Close()
	}
	slices.Sort(out)
	return out, nil
}

// percentile returns the p-th percentile (0-100) of sorted durations.
func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(float64(len(sorted)-1) * p / 100)
	return sorted[i]
}

// holdResult is what holding many idle connections at once measured.
type holdResult struct {
	n        int
	errors   int           // connections that failed to open or to echo
	perConn  float64       // bytes of proxy RSS per held connection
	openTime time.Duration // to open all n
	firstErr error
	log      string // the contender's stderr or log, when there were errors
}

// holdConns opens up to n echo connections through d (parallel openers,
// at most par in flight), keeping the ones that work in *held.
func holdConns(d dialer, n, par int, held *[]net.Conn) (errs int, firstErr error) {
	var mu sync.Mutex
	sem := make(chan struct{}, par)
	var wg sync.WaitGroup
	for range n {
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			c, err := openEcho(d)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				errs++
				if firstErr == nil {
					firstErr = err
				}
				return
			}
			*held = append(*held, c)
		}()
	}
	wg.Wait()
	return errs, firstErr
}

// checkHeld makes one more round trip over every held connection, par at a
// time, and counts the failures.
func checkHeld(held []net.Conn, par int) (errs int, firstErr error) {
	var mu sync.Mutex
	sem := make(chan struct{}, par)
	var wg sync.WaitGroup
	for _, c := range held {
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			_ = c.SetDeadline(time.Now().Add(dialTimeout))
			err := echoRoundTrip(c)
			_ = c.SetDeadline(time.Time{})
			if err != nil {
				mu.Lock()
				errs++
				if firstErr == nil {
					firstErr = err
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return errs, firstErr
}

// writerOnly hides a writer's ReadFrom (io.Discard's reads 8 KiB at a
// time), so that io.CopyBuffer uses the buffer it is given.
type writerOnly struct{ io.Writer }
