package hpcproxy

import (
	"context"
	"io"
	"sync"
	"testing"
	"time"

	"github.com/hpcproxy/hpcproxy/internal/sshtest"
)

// benchMethods are compared on the same sshd in the same run; direct (no
// SSH at all) is the loopback baseline. controlmaster runs first: the
// others report their ratio to it (the x_controlmaster column).
var benchMethods = []Method{MethodControlMaster, MethodSOCKSUnix, MethodSOCKSTCP, MethodExec, MethodDirect}

// benchTunnels starts one sshd and one tunnel per method, every SSH
// connection with the same cipher (aes128-gcm, OpenSSH's fastest here) and
// no compression, all torn down when b ends.
func benchTunnels(b *testing.B) map[Method]*Tunnel {
	b.Helper()
	sshd := sshtest.StartSSHD(b, sshtest.Options{})
	tuns := map[Method]*Tunnel{}
	for _, m := range benchMethods {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		tun, err := EstablishTunnel(ctx, TunnelConfig{
			Destination:   "sshtest",
			SSHConfigFile: sshd.SSHConfigFile,
			SSHOptions:    []string{"Ciphers=aes128-gcm@openssh.com", "Compression=no"},
			RuntimeDir:    sshtest.PrivateTempDir(b),
			Methods:       []Method{m},
		})
		cancel()
		if err != nil {
			b.Fatalf("%s: %v\nsshd log:\n%s", m, err, sshd.Log())
		}
		b.Cleanup(func() { _ = tun.Close() })
		tuns[m] = tun
	}
	return tuns
}

// benchRatios keeps controlmaster's result so that the other methods can
// report theirs relative to it.
type benchRatios struct {
	mu   sync.Mutex
	base float64 // controlmaster's MB/s or ns/op
}

// report records v for m (controlmaster) or reports v relative to
// controlmaster's as the x_controlmaster metric.
func (r *benchRatios) report(b *testing.B, m Method, v float64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if m == MethodControlMaster {
		r.base = v
		return
	}
	if r.base > 0 {
		b.ReportMetric(v/r.base, "x_controlmaster")
	}
}

// BenchmarkSystemSSHThroughput measures one stream's download rate from a
// loopback source through each method; x_controlmaster is the method's
// rate over controlmaster's (above 1: faster).
//
//	go test -run '^$' -bench 'SystemSSH' -benchtime 2s .
func BenchmarkSystemSSHThroughput(b *testing.B) {
	tuns := benchTunnels(b)
	src := startStreamSource(b)
	ratios := &benchRatios{}
	const chunk = 1 << 20
	for _, m := range benchMethods {
		b.Run(m.String(), func(b *testing.B) {
			c, err := tuns[m].Dial(context.Background(), "tcp", src)
			if err != nil {
				b.Fatal(err)
			}
			defer c.Close()
			buf := make([]byte, chunk)
			// Warm up: first bytes through ssh -D can stall (Nagle).
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
			ratios.report(b, m, float64(chunk)*float64(b.N)/b.Elapsed().Seconds())
		})
	}
}

// BenchmarkSystemSSHConnect measures a connection's setup through each
// method: dial, one byte echoed, close; x_controlmaster is the method's
// time over controlmaster's (above 1: slower).
//
// Back-to-back dials are controlmaster's worst case: the channel open
// follows the previous channel's close so closely that small SSH packets
// go out while an earlier small segment is unacknowledged, and Nagle
// (neither ssh nor sshd sets TCP_NODELAY without a pty) meets the 40 ms
// delayed ACK: some opens stall ~41 ms (perf trace on the master: it
// waits that long for sshd's OPEN_CONFIRMATION). Dials paced ~0.7 ms
// apart, or interleaved with other traffic, open in ~0.3 ms, as through
// ssh -D.
func BenchmarkSystemSSHConnect(b *testing.B) {
	tuns := benchTunnels(b)
	echo := startEchoServer(b)
	ratios := &benchRatios{}
	for _, m := range benchMethods {
		b.Run(m.String(), func(b *testing.B) {
			ctx := context.Background()
			one := []byte{'x'}
			for range b.N {
				c, err := tuns[m].Dial(ctx, "tcp", echo)
				if err != nil {
					b.Fatal(err)
				}
				if _, err := c.Write(one); err != nil {
					b.Fatal(err)
				}
				if _, err := io.ReadFull(c, one); err != nil {
					b.Fatal(err)
				}
				c.Close()
			}
			ratios.report(b, m, float64(b.Elapsed().Nanoseconds())/float64(b.N))
		})
	}
}
