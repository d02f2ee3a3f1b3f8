package hpcproxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os/exec"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/proxy"

	"github.com/hpcproxy/hpcproxy/internal/sshtest"
	"github.com/hpcproxy/hpcproxy/internal/testenv"
)

// The tunnel benchmarks run every method of the fallback chain and OpenSSH's
// own SOCKS forwarder, `ssh -N -D` (dialled with golang.org/x/net/proxy), on
// the same throwaway sshd in the same run, every SSH connection with the
// same cipher (aes128-gcm@openssh.com, the fastest both x/crypto and OpenSSH
// have) and no compression. ssh-D runs first in each round; every method
// reports its result relative to it (x_sshD). direct (no SSH at all) is
// the loopback ceiling.
//
//	go test -run '^$' -bench 'Tunnel' -benchtime 2s -count 3 .
//
// They measure the tunnels in this process, beside the benchmark's own
// client and source; `go run ./internal/cmd/bench` measures the daemon as
// its own process, with CPU time and memory.

// benchSSHD names the baseline.
const benchSSHD = "ssh-D"

var benchMethodNames = []string{benchSSHD, "gossh", "controlmaster", "socks-unix", "exec", "direct"}

// benchTunnels starts one sshd and, through it, ssh -D and one tunnel per
// method, all torn down when b ends.
func benchTunnels(b *testing.B) map[string]DialFunc {
	b.Helper()
	testenv.LookPath(b, "ssh")
	b.Setenv("SSH_AUTH_SOCK", "")
	sshd := sshtest.StartSSHD(b, sshtest.Options{})
	dialers := map[string]DialFunc{}
	for _, name := range benchMethodNames[1:] {
		m, err := ParseMethod(name)
		if err != nil {
			b.Fatal(err)
		}
		tun := benchTunnel(b, sshd, m)
		b.Cleanup(func() { _ = tun.Close() })
		dialers[name] = tun.Dial
	}
	socks, stop, err := startSSHDynamic(sshd, nil)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(stop)
	d, err := proxy.SOCKS5("tcp", socks, nil, proxy.Direct)
	if err != nil {
		b.Fatal(err)
	}
	dialers[benchSSHD] = d.(proxy.ContextDialer).DialContext
	return dialers
}

// benchTunnel establishes a tunnel of method m through sshd.
func benchTunnel(b *testing.B, sshd *sshtest.SSHD, m Method) *Tunnel {
	b.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	tun, err := EstablishTunnel(ctx, TunnelConfig{
		Destination:   "sshtest",
		SSHConfigFile: sshd.SSHConfigFile,
		SSHOptions:    []string{"Ciphers=aes128-gcm@openssh.com", "Compression=no"},
		RuntimeDir:    sshtest.PrivateTempDir(b),
		Methods:       []Method{m},
	})
	if err != nil {
		b.Fatalf("%s: %v\nsshd log:\n%s", m, err, sshd.Log())
	}
	return tun
}

// startSSHDynamic starts `ssh -N -D 127.0.0.1:PORT` through sshd with the
// benchmarks' cipher and waits until ready (if not nil, a func that dials
// through the SOCKS address) succeeds, or until the port accepts.
func startSSHDynamic(sshd *sshtest.SSHD, ready func(socks string) error) (string, func(), error) {
	bin, err := exec.LookPath("ssh")
	if err != nil {
		return "", nil, err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", nil, err
	}
	addr := ln.Addr().String()
	ln.Close()
	cmd := exec.Command(bin, "-N", "-D", addr, "-c", "aes128-gcm@openssh.com", "-o", "Compression=no",
		"-F", sshd.SSHConfigFile, "sshtest")
	if err := cmd.Start(); err != nil {
		return "", nil, err
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	stop := func() { _ = cmd.Process.Kill(); <-exited }
	deadline := time.Now().Add(10 * time.Second)
	for {
		var err error
		if ready != nil {
			err = ready(addr)
		} else {
			var c net.Conn
			if c, err = net.Dial("tcp", addr); err == nil {
				c.Close()
			}
		}
		if err == nil {
			return addr, stop, nil
		}
		select {
		case <-exited:
			return "", nil, errors.New("ssh -D exited")
		default:
		}
		if time.Now().After(deadline) {
			stop()
			return "", nil, fmt.Errorf("ssh -D not ready: %w", err)
		}
		time.Sleep(time.Millisecond)
	}
}

// benchRatios keeps the baseline's result of the current round so that
// the others can report theirs relative to it.
type benchRatios struct {
	mu   sync.Mutex
	base float64
}

// report records v for the baseline, or reports v over the baseline's as
// the x_sshD metric.
func (r *benchRatios) report(b *testing.B, name string, v float64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if name == benchSSHD {
		r.base = v
		return
	}
	if r.base > 0 {
		b.ReportMetric(v/r.base, "x_sshD")
	}
}

// BenchmarkTunnelThroughput reads one stream from a loopback source through
// each method, 1 MiB per op; x_sshD is the rate over ssh -D's (above 1:
// faster).
func BenchmarkTunnelThroughput(b *testing.B) {
	dialers := benchTunnels(b)
	src := startStreamSource(b)
	ratios := &benchRatios{}
	const chunk = 1 << 20
	for _, name := range benchMethodNames {
		b.Run(name, func(b *testing.B) {
			c, err := dialers[name](context.Background(), "tcp", src)
			if err != nil {
				b.Fatal(err)
			}
			defer c.Close()
			buf := make([]byte, chunk)
			// Warm up: the first bytes through ssh -D can stall (Nagle).
			if _, err := io.ReadFull(c, buf); err != nil {
				b.Fatal(err)
			}
			b.SetBytes(chunk)
			b.ResetTimer()
			for range b.N {
				if _, err := io.ReadFull(c, buf); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			ratios.report(b, name, float64(chunk)*float64(b.N)/b.Elapsed().Seconds())
		})
	}
}

// BenchmarkTunnelConnect measures a connection's setup through each method:
// dial, one byte echoed, close; x_sshD is the time over ssh -D's (above 1:
// slower).
func BenchmarkTunnelConnect(b *testing.B) {
	dialers := benchTunnels(b)
	echo := startEchoServer(b)
	ratios := &benchRatios{}
	for _, name := range benchMethodNames {
		b.Run(name, func(b *testing.B) {
			for range b.N {
				if err := echoRoundTrip(dialers[name], echo); err != nil {
					b.Fatal(err)
				}
			}
			ratios.report(b, name, float64(b.Elapsed().Nanoseconds())/float64(b.N))
		})
	}
}

// echoRoundTrip dials addr (an echo server) with dial, sends one byte and
// reads it back.
func echoRoundTrip(dial DialFunc, addr string) error {
	c, err := dial(context.Background(), "tcp", addr)
	if err != nil {
		return err
	}
	defer c.Close()
	one := []byte{'x'}
	if _, err := c.Write(one); err != nil {
		return err
	}
	_, err = io.ReadFull(c, one)
	return err
}

// BenchmarkTunnelSetup brings a tunnel up from nothing until a connection
// through it has echoed a byte: gossh resolves the config, connects, does
// the handshake and authenticates; ssh -D starts a process that does the
// same and answers a SOCKS CONNECT.
func BenchmarkTunnelSetup(b *testing.B) {
	testenv.LookPath(b, "ssh")
	b.Setenv("SSH_AUTH_SOCK", "")
	sshd := sshtest.StartSSHD(b, sshtest.Options{})
	echo := startEchoServer(b)
	ratios := &benchRatios{}
	b.Run(benchSSHD, func(b *testing.B) {
		for range b.N {
			_, stop, err := startSSHDynamic(sshd, func(socks string) error {
				d, err := proxy.SOCKS5("tcp", socks, nil, proxy.Direct)
				if err != nil {
					return err
				}
				return echoRoundTrip(d.(proxy.ContextDialer).DialContext, echo)
			})
			if err != nil {
				b.Fatal(err)
			}
			stop()
		}
		ratios.report(b, benchSSHD, float64(b.Elapsed().Nanoseconds())/float64(b.N))
	})
	for _, m := range []Method{MethodGoSSH, MethodControlMaster} {
		b.Run(m.String(), func(b *testing.B) {
			for range b.N {
				tun := benchTunnel(b, sshd, m)
				err := echoRoundTrip(tun.Dial, echo)
				_ = tun.Close()
				if err != nil {
					b.Fatal(err)
				}
			}
			ratios.report(b, m.String(), float64(b.Elapsed().Nanoseconds())/float64(b.N))
		})
	}
}
