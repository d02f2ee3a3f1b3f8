package transparent

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/proxy"

	"github.com/hpcproxy/hpcproxy"
	"github.com/hpcproxy/hpcproxy/internal/sshtest"
	"github.com/hpcproxy/hpcproxy/internal/testenv"
)

// BenchmarkTransparent measures one stream's download throughput through
// the transparent path next to the SOCKS path it is built on, both times
// from a client process of its own (the test binary in the "sink" role)
// reading from a source on loopback:
//
//	socks:       sink --SOCKS5--> hpcproxy.Server --tunnel--> source
//	transparent: sink (in the namespace, dialling the source by name)
//	             --TUN--> netstack --SOCKS5--> hpcproxy.Server --tunnel--> source
//
// with the tunnel a real one (gossh through a throwaway OpenSSH sshd,
// aes128-gcm) and, as the ceiling of the stack itself, none (direct). The
// two paths take turns within each iteration; the sink times its own
// transfer (connect to last byte), so process and namespace start-up are
// not counted. Reported: MB/s of each and their ratio (x_socks).
//
//	go test -run '^$' -bench Transparent -benchtime 5x ./transparent
func BenchmarkTransparent(b *testing.B) {
	if err := Check(); err != nil {
		testenv.Require(b, false, "transparent mode unavailable: %v", err)
	}
	src := startSource(b)
	for _, via := range []string{"gossh", "direct"} {
		b.Run(via, func(b *testing.B) {
			dial := benchDial(b, via)
			psrv := &hpcproxy.Server{Dial: dial}
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				b.Fatal(err)
			}
			go func() { _ = psrv.Serve(ln) }()
			b.Cleanup(func() { _ = psrv.Close() })
			socks, err := proxy.SOCKS5("tcp", ln.Addr().String(), nil, proxy.Direct)
			if err != nil {
				b.Fatal(err)
			}
			const size = 64 << 20
			var tSOCKS, tTrans time.Duration
			b.SetBytes(size)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				tSOCKS += runSink(b, nil, ln.Addr().String(), "127.0.0.1:"+src, size)
				tTrans += runSink(b, socks.(proxy.ContextDialer).DialContext, "", "source.test:"+src, size)
			}
			b.StopTimer()
			mbs := func(d time.Duration) float64 { return float64(size) * float64(b.N) / d.Seconds() / 1e6 }
			b.ReportMetric(mbs(tSOCKS), "socks_MB/s")
			b.ReportMetric(mbs(tTrans), "transparent_MB/s")
			b.ReportMetric(mbs(tTrans)/mbs(tSOCKS), "x_socks")
		})
	}
}

// benchDial is the proxy's DialFunc: a gossh tunnel or a direct dialer,
// mapping the source's name to loopback as a login node's DNS would.
func benchDial(b *testing.B, via string) hpcproxy.DialFunc {
	var base hpcproxy.DialFunc
	switch via {
	case "direct":
		var d net.Dialer
		base = d.DialContext
	default:
		testenv.LookPath(b, "ssh")
		b.Setenv("SSH_AUTH_SOCK", "")
		sshd := sshtest.StartSSHD(b, sshtest.Options{})
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		tun, err := hpcproxy.EstablishTunnel(ctx, hpcproxy.TunnelConfig{
			Destination:   "sshtest",
			SSHConfigFile: sshd.SSHConfigFile,
			SSHOptions:    []string{"Ciphers=aes128-gcm@openssh.com", "Compression=no"},
			RuntimeDir:    sshtest.PrivateTempDir(b),
			Methods:       []hpcproxy.Method{hpcproxy.MethodGoSSH},
		})
		if err != nil {
			b.Fatalf("tunnel: %v\nsshd log:\n%s", err, sshd.Log())
		}
		b.Cleanup(func() { _ = tun.Close() })
		base = tun.Dial
	}
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		if rest, ok := strings.CutPrefix(addr, "source.test:"); ok {
			addr = "127.0.0.1:" + rest
		}
		return base(ctx, network, addr)
	}
}

// startSource serves loopback connections: each sends an 8-byte count and
// gets that many bytes back. It returns the port.
func startSource(b *testing.B) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { ln.Close() })
	go func() {
		buf := make([]byte, 256<<10)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				var n [8]byte
				if _, err := io.ReadFull(c, n[:]); err != nil {
					return
				}
				for left := int64(binary.BigEndian.Uint64(n[:])); left > 0; {
					k, err := c.Write(buf[:min(left, int64(len(buf)))])
					if err != nil {
						return
					}
					left -= int64(k)
				}
			}()
		}
	}()
	return strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
}

// runSink runs the sink role once: through SOCKS5 at socksAddr, or, with
// dial set, transparently with dial as the tunnel. It returns the time
// the sink measured for its transfer.
func runSink(b *testing.B, dial func(ctx context.Context, network, addr string) (net.Conn, error), socksAddr, target string, size int) time.Duration {
	b.Helper()
	self, _ := os.Executable()
	cmd := exec.Command(self, target, strconv.Itoa(size))
	cmd.Env = append(os.Environ(), roleEnv+"=sink", "SINK_SOCKS="+socksAddr)
	var out, errOut strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errOut
	if dial == nil {
		if err := cmd.Run(); err != nil {
			b.Fatalf("sink: %v\n%s", err, errOut.String())
		}
	} else {
		s, err := Start(Config{Dial: dial}, cmd)
		if err != nil {
			b.Fatal(err)
		}
		err = cmd.Wait()
		_ = s.Close()
		if err != nil {
			b.Fatalf("transparent sink: %v\n%s", err, errOut.String())
		}
	}
	d, err := time.ParseDuration(strings.TrimSpace(out.String()))
	if err != nil {
		b.Fatalf("sink printed %q: %v", out.String(), err)
	}
	return d
}

// sinkRole connects to target (through SOCKS5 at $SINK_SOCKS if set),
// reads size bytes and prints how long that took.
func sinkRole(target, sizeArg string) error {
	size, err := strconv.ParseInt(sizeArg, 10, 64)
	if err != nil {
		return err
	}
	start := time.Now()
	var c net.Conn
	if s := os.Getenv("SINK_SOCKS"); s != "" {
		d, err := proxy.SOCKS5("tcp", s, nil, proxy.Direct)
		if err != nil {
			return err
		}
		c, err = d.Dial("tcp", target)
		if err != nil {
			return err
		}
	} else if c, err = net.Dial("tcp", target); err != nil {
		return err
	}
	defer c.Close()
	var n [8]byte
	binary.BigEndian.PutUint64(n[:], uint64(size))
	if _, err := c.Write(n[:]); err != nil {
		return err
	}
	got, err := io.Copy(io.Discard, c)
	if err != nil {
		return err
	}
	if got != size {
		return errors.New("short read: " + strconv.FormatInt(got, 10))
	}
	fmt.Println(time.Since(start))
	return nil
}
