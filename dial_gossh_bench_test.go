package hpcproxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os/exec"
	"testing"
	"time"

	"golang.org/x/net/proxy"

	"github.com/hpcproxy/hpcproxy/internal/sshtest"
	"github.com/hpcproxy/hpcproxy/internal/testenv"
)

// The benchmarks compare gossh with `ssh -N -D` (OpenSSH's SOCKS forwarder,
// dialled with golang.org/x/net/proxy) on the same throwaway sshd in the
// same run, both with aes128-gcm@openssh.com:
//
//	go test -run '^$' -bench 'GoSSH' -benchtime 2s .
//
// Compare the gossh and ssh-D lines of each benchmark for the ratios.

// benchDialers starts an sshd and returns the two dialers to compare.
func benchDialers(b *testing.B) map[string]func(ctx context.Context, network, addr string) (net.Conn, error) {
	b.Helper()
	b.Setenv("SSH_AUTH_SOCK", "")
	sshd := sshtest.StartSSHD(b, sshtest.Options{})
	tun := benchGoSSH(b, sshd)
	b.Cleanup(func() { _ = tun.Close() })
	socks := startSOCKSForwarder(b, sshd)
	d, err := proxy.SOCKS5("tcp", socks, nil, proxy.Direct)
	if err != nil {
		b.Fatal(err)
	}
	return map[string]func(ctx context.Context, network, addr string) (net.Conn, error){
		"gossh": tun.Dial,
		"ssh-D": d.(proxy.ContextDialer).DialContext,
	}
}

func benchGoSSH(b *testing.B, sshd *sshtest.SSHD) *Tunnel {
	b.Helper()
	tun, err := EstablishTunnel(context.Background(), TunnelConfig{
		Destination:   "sshtest",
		SSHConfigFile: sshd.SSHConfigFile,
		Methods:       []Method{MethodGoSSH},
		SSHOptions:    []string{"Ciphers=aes128-gcm@openssh.com"},
	})
	if err != nil {
		b.Fatal(err)
	}
	return tun
}

// startSOCKSForwarder runs `ssh -N -D 127.0.0.1:PORT -c aes128-gcm@openssh.com` and
// returns the SOCKS address once it answers; the process is killed at
// cleanup.
func startSOCKSForwarder(b *testing.B, sshd *sshtest.SSHD) string {
	b.Helper()
	addr, stop, err := startSSHDynamic(sshd, nil)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(stop)
	return addr
}

// startSSHDynamic starts `ssh -D` and waits until a SOCKS CONNECT to target
// (if not nil, a func dialling through the proxy) succeeds, or until the
// port accepts.
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
	cmd := exec.Command(bin, "-N", "-D", addr, "-c", "aes128-gcm@openssh.com", "-F", sshd.SSHConfigFile, "sshtest")
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

// BenchmarkGoSSHThroughput reads one stream through the tunnel, 1 MiB per
// op.
func BenchmarkGoSSHThroughput(b *testing.B) {
	testenv.LookPath(b, "ssh")
	dialers := benchDialers(b)
	src := startStreamSource(b)
	for _, name := range []string{"gossh", "ssh-D"} {
		b.Run(name, func(b *testing.B) {
			c, err := dialers[name](context.Background(), "tcp", src)
			if err != nil {
				b.Fatal(err)
			}
			defer c.Close()
			const chunk = 1 << 20
			b.SetBytes(chunk)
			for b.Loop() {
				if _, err := io.CopyN(io.Discard, c, chunk); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkGoSSHConnect measures latency: "conn" is one new connection and
// a 1-byte round trip through an established tunnel; "tunnel" is bringing
// a tunnel up from nothing until such a round trip works (gossh: resolve
// config, TCP, handshake, auth; ssh -D: process start to first SOCKS
// CONNECT answered).
func BenchmarkGoSSHConnect(b *testing.B) {
	testenv.LookPath(b, "ssh")
	dialers := benchDialers(b)
	echo := startEchoServer(b)
	roundTrip := func(dial func(ctx context.Context, network, addr string) (net.Conn, error)) error {
		c, err := dial(context.Background(), "tcp", echo)
		if err != nil {
			return err
		}
		defer c.Close()
		if _, err := c.Write([]byte{1}); err != nil {
			return err
		}
		_, err = io.ReadFull(c, make([]byte, 1))
		return err
	}
	for _, name := range []string{"gossh", "ssh-D"} {
		b.Run("conn/"+name, func(b *testing.B) {
			for b.Loop() {
				if err := roundTrip(dialers[name]); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
	sshd := sshtest.StartSSHD(b, sshtest.Options{})
	b.Run("tunnel/gossh", func(b *testing.B) {
		for b.Loop() {
			tun := benchGoSSH(b, sshd)
			err := roundTrip(tun.Dial)
			_ = tun.Close()
			if err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("tunnel/ssh-D", func(b *testing.B) {
		for b.Loop() {
			_, stop, err := startSSHDynamic(sshd, func(socks string) error {
				d, err := proxy.SOCKS5("tcp", socks, nil, proxy.Direct)
				if err != nil {
					return err
				}
				return roundTrip(d.(proxy.ContextDialer).DialContext)
			})
			if err != nil {
				b.Fatal(err)
			}
			stop()
		}
	})
}
