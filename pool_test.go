package hpcproxy

import (
	"context"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/hpcproxy/hpcproxy/internal/sshtest"
)

// pooledTunnel establishes a tunnel of method m through sshd with conns
// SSH connections (one if conns is 0 or 1), and no more: a pool that does
// not grow (TestPoolGrowsAndShrinks tests growing).
func pooledTunnel(t *testing.T, sshd *sshtest.SSHD, m Method, conns int) *Tunnel {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	tun, err := EstablishTunnel(ctx, TunnelConfig{
		Destination: "sshtest", SSHConfigFile: sshd.SSHConfigFile,
		Methods: []Method{m}, RuntimeDir: sshtest.PrivateTempDir(t),
		Connections: conns, MaxConnections: max(conns, 1),
	})
	require.NoError(t, err, "sshd log:\n%s", sshd.Log())
	t.Cleanup(func() { tun.Close() })
	return tun
}

// TestPoolSpreadsConnections opens a tunnel of three SSH connections and
// checks that sshd authenticated three, that concurrent connections are
// spread evenly over them, and that closing one frees its slot.
func TestPoolSpreadsConnections(t *testing.T) {
	for _, m := range []Method{MethodGoSSH, MethodControlMaster} {
		t.Run(m.String(), func(t *testing.T) {
			noAgent(t)
			sshd := sshtest.StartSSHD(t, sshtest.Options{})
			tun := pooledTunnel(t, sshd, m, 3)
			require.Equal(t, 3, strings.Count(sshd.Log(), "Accepted publickey"), "sshd log:\n%s", sshd.Log())
			p, ok := tun.impl.(*poolTunnel)
			require.True(t, ok, "impl is %T, want a pool", tun.impl)
			require.Len(t, p.members, 3)

			echo := startEchoServer(t)
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			var conns []net.Conn
			for range 6 {
				c, err := tun.Dial(ctx, "tcp", echo)
				require.NoError(t, err)
				conns = append(conns, c)
			}
			for i, mem := range p.members {
				require.EqualValues(t, 2, mem.active.Load(), "connection %d carries %d, want 2", i, mem.active.Load())
			}
			for _, c := range conns {
				_, err := c.Write([]byte("x"))
				require.NoError(t, err)
				_, err = c.Read(make([]byte, 1))
				require.NoError(t, err)
			}
			// Close twice: the slot is freed once.
			require.NoError(t, conns[0].Close())
			_ = conns[0].Close()
			var sum int64
			for _, mem := range p.members {
				sum += mem.active.Load()
			}
			require.EqualValues(t, 5, sum)
			for _, c := range conns[1:] {
				c.Close()
			}
		})
	}
}

// TestPoolHalfClose checks that a pooled connection still half-closes.
func TestPoolHalfClose(t *testing.T) {
	noAgent(t)
	sshd := sshtest.StartSSHD(t, sshtest.Options{})
	tun := pooledTunnel(t, sshd, MethodGoSSH, 2)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := tun.Dial(ctx, "tcp", startEchoServer(t))
	require.NoError(t, err)
	defer c.Close()
	_, err = c.Write([]byte("bye"))
	require.NoError(t, err)
	require.NoError(t, c.(closeWriter).CloseWrite())
	buf := make([]byte, 8)
	n, err := c.Read(buf)
	require.NoError(t, err)
	require.Equal(t, "bye", string(buf[:n]))
	_, err = c.Read(buf)
	require.Error(t, err, "want EOF after the echo server saw our EOF")
}

// TestPoolMemberDrop checks that one dropped connection takes the whole
// pool down (so that a supervisor re-establishes it), with the reason.
func TestPoolMemberDrop(t *testing.T) {
	noAgent(t)
	sshd := sshtest.StartSSHD(t, sshtest.Options{})
	tun := pooledTunnel(t, sshd, MethodGoSSH, 2)
	p := tun.impl.(*poolTunnel)
	g := p.members[1].impl.(*gosshTunnel)
	require.NoError(t, g.client.Close())
	select {
	case <-tun.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("pool still up after one of its connections dropped")
	}
	require.ErrorContains(t, tun.Err(), "dropped")
	select {
	case <-p.members[0].impl.Done():
	default:
		t.Fatal("the other connection is still open")
	}
	_, err := tun.Dial(context.Background(), "tcp", "127.0.0.1:1")
	require.ErrorIs(t, err, ErrTunnelDown)
}

// TestPoolStartFailure checks that a pool whose connections fail reports
// why and leaves nothing open.
func TestPoolStartFailure(t *testing.T) {
	noAgent(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err := EstablishTunnel(ctx, TunnelConfig{
		Destination: "127.0.0.1:" + closedPortNumber(t), SSHConfigFile: "none",
		Methods: []Method{MethodGoSSH}, Connections: 3,
	})
	require.ErrorContains(t, err, "3 of 3 pooled connections failed")
	require.ErrorContains(t, err, "connection refused")
}

// closedPortNumber returns the port of closedPort.
func closedPortNumber(t *testing.T) string {
	_, port, err := net.SplitHostPort(closedPort(t))
	require.NoError(t, err)
	return port
}

// TestPoolPick checks the choice of connection: the least loaded, ties
// spread round the pool.
func TestPoolPick(t *testing.T) {
	p := &poolTunnel{}
	for range 3 {
		p.members = append(p.members, &poolMember{})
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	seen := map[*poolMember]int{}
	for range 3 {
		seen[p.pick()]++
	}
	require.Len(t, seen, 3, "ties must be spread")
	p.members[0].active.Store(5)
	p.members[1].active.Store(1)
	p.members[2].active.Store(3)
	for range 5 {
		require.Same(t, p.members[1], p.pick())
	}
}

// gosshPool establishes a gossh tunnel to sshd, a pool as cfg sets it
// (its destination is set here), closed when the test ends.
func gosshPool(ctx context.Context, t *testing.T, sshd *sshtest.SSHD, cfg TunnelConfig) (*Tunnel, *poolTunnel) {
	t.Helper()
	cfg.Destination, cfg.SSHConfigFile, cfg.Methods = "sshtest", sshd.SSHConfigFile, []Method{MethodGoSSH}
	tun, err := EstablishTunnel(ctx, cfg)
	require.NoError(t, err)
	t.Cleanup(func() { tun.Close() })
	p, ok := tun.impl.(*poolTunnel)
	require.True(t, ok, "impl is %T, want a pool", tun.impl)
	return tun, p
}

// TestPoolGrowsAndShrinks opens many concurrent channels through a tunnel
// whose pool grows past 4 channels per connection, up to 3 connections:
// sshd authenticates 3, the channels spread over them and all carry
// bytes, and once they close the added connections close again.
func TestPoolGrowsAndShrinks(t *testing.T) {
	noAgent(t)
	sshd := sshtest.StartSSHD(t, sshtest.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	tun, p := gosshPool(ctx, t, sshd, TunnelConfig{MaxConnections: 3, ChannelsPerConnection: 4, poolIdle: 300 * time.Millisecond})
	require.Equal(t, 1, p.size(), "one connection while idle")

	echo := startEchoServer(t)
	const n = 40
	conns := make([]net.Conn, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			conns[i], errs[i] = tun.Dial(ctx, "tcp", echo)
		}()
	}
	wg.Wait()
	for i := range n {
		require.NoError(t, errs[i], "channel %d", i)
	}
	require.Equal(t, 3, p.size(), "grown to the cap")
	require.Equal(t, 3, strings.Count(sshd.Log(), "Accepted publickey"), "sshd authenticated the pool")
	p.mu.Lock()
	var loads []int64
	for _, m := range p.members {
		loads = append(loads, m.active.Load())
	}
	p.mu.Unlock()
	t.Logf("channels per connection: %v", loads)
	for i, l := range loads {
		// 40 over 3, each new one to the least loaded: 4 on the first
		// before the others come, then even.
		assert.GreaterOrEqual(t, l, int64(10), "connection %d carries %d of %d", i, l, n)
	}
	for i, c := range conns {
		_, err := c.Write([]byte{byte(i)})
		require.NoError(t, err)
		var b [1]byte
		_, err = io.ReadFull(c, b[:])
		require.NoError(t, err, "channel %d", i)
		require.Equal(t, byte(i), b[0])
	}
	// Half close: the pool keeps its connections while they carry any.
	for _, c := range conns[:n/2] {
		c.Close()
	}
	time.Sleep(600 * time.Millisecond)
	require.Equal(t, 3, p.size(), "connections that carry channels stay")
	for _, c := range conns[n/2:] {
		c.Close()
	}
	waitFor(t, func() bool { return p.size() == 1 }, "the added connections to close")
	select {
	case <-tun.Done():
		t.Fatal("closing added connections took the tunnel down")
	default:
	}
	// And it grows again.
	c, err := tun.Dial(ctx, "tcp", echo)
	require.NoError(t, err)
	c.Close()
}

// TestPoolGrowthFailureKeepsServing: when the login node refuses to add a
// connection, channels go on over the ones there are.
func TestPoolGrowthFailureKeepsServing(t *testing.T) {
	noAgent(t)
	sshd := sshtest.StartSSHD(t, sshtest.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	tun, p := gosshPool(ctx, t, sshd, TunnelConfig{MaxConnections: 4, ChannelsPerConnection: 2, StartRetryTimeout: -1})
	// The key no longer opens the login node: new connections fail.
	require.NoError(t, os.WriteFile(sshd.AuthorizedKeysFile, nil, 0o600))
	echo := startEchoServer(t)
	var conns []net.Conn
	for range 8 {
		c, err := tun.Dial(ctx, "tcp", echo)
		require.NoError(t, err)
		conns = append(conns, c)
	}
	for _, c := range conns {
		c.Close()
	}
	require.Equal(t, 1, p.size())
}

// firstConn returns the tunnel's first SSH connection: the pool's first
// member, or the tunnel itself if it is no pool.
func firstConn(tun *Tunnel) tunnelImpl {
	if p, ok := tun.impl.(*poolTunnel); ok {
		p.mu.Lock()
		defer p.mu.Unlock()
		return p.members[0].impl
	}
	return tun.impl
}
