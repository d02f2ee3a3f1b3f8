package hpcproxy

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/hpcproxy/hpcproxy/internal/sshtest"
)

// testTunnel establishes a tunnel of method m through sshd.
func testTunnel(t *testing.T, sshd *sshtest.SSHD, m Method) *Tunnel {
	t.Helper()
	return pooledTunnel(t, sshd, m, 0)
}

// fwdEcho writes msg on a new connection to network/addr and returns what
// comes back once the write side is half-closed.
func fwdEcho(t *testing.T, network, addr, msg string) string {
	t.Helper()
	c, err := net.DialTimeout(network, addr, 5*time.Second)
	require.NoError(t, err)
	defer c.Close()
	require.NoError(t, c.SetDeadline(time.Now().Add(10*time.Second)))
	_, err = io.WriteString(c, msg)
	require.NoError(t, err)
	require.NoError(t, c.(interface{ CloseWrite() error }).CloseWrite())
	b, err := io.ReadAll(c)
	require.NoError(t, err)
	return string(b)
}

// httpGet fetches url with a fresh client and returns the body.
func httpGet(t *testing.T, url string) string {
	t.Helper()
	tr := &http.Transport{DisableKeepAlives: true}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr, Timeout: 10 * time.Second}).Get(url)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return string(b)
}

// TestLocalForward reaches a service through the real sshd, listening on
// TCP and on a unix socket. The target is on this machine too, so the
// origin checks who connected to it: sshd (which resolved "localhost" on
// its side), not this process.
func TestLocalForward(t *testing.T) {
	sshd := sshtest.StartSSHD(t, sshtest.Options{})
	tun := testTunnel(t, sshd, MethodGoSSH)
	peers := make(chan string, 10)
	echo := serveTCP(t, "127.0.0.1:0", func(c net.Conn) {
		comm, err := peerComm(c)
		if err != nil {
			comm = err.Error()
		}
		peers <- comm
		_, _ = io.Copy(c, c)
		_ = c.(*net.TCPConn).CloseWrite()
	})
	_, port, _ := net.SplitHostPort(echo)
	for _, listen := range []string{"127.0.0.1:0", filepath.Join(sshtest.PrivateTempDir(t), "fwd.sock")} {
		t.Run(listen, func(t *testing.T) {
			f := &LocalForward{Listen: listen, Remote: net.JoinHostPort("localhost", port), Dial: tun.Dial}
			require.NoError(t, f.Start())
			defer func() { assert.NoError(t, f.Close()) }()
			a := f.Addr()
			require.NotNil(t, a)
			assert.Equal(t, "hello forward", fwdEcho(t, a.Network(), a.String(), "hello forward"))
			assert.Equal(t, "again", fwdEcho(t, a.Network(), a.String(), "again"))
			for range 2 {
				assert.Equal(t, "sshd", <-peers, "who connected to the origin")
			}
			require.Eventually(t, func() bool { return f.Info().Active == 0 }, 5*time.Second, 10*time.Millisecond)
			info := f.Info()
			assert.Equal(t, ForwardLocal, info.Kind)
			assert.Equal(t, ForwardUp, info.Status)
			assert.Equal(t, int64(2), info.Total)
			assert.Equal(t, int64(len("hello forward")+len("again")), info.BytesIn)
			assert.Equal(t, info.BytesIn, info.BytesOut)
		})
	}
}

// peerComm tells who holds the client end of c, a TCP connection accepted
// on loopback: "self" (this process), "sshd" (an sshd process), or an
// error. Only those processes' descriptors are searched.
func peerComm(c net.Conn) (string, error) {
	peer, err := addrPortOf(c.RemoteAddr())
	if err != nil {
		return "", err
	}
	self, err := addrPortOf(c.LocalAddr())
	if err != nil {
		return "", err
	}
	var inode uint64
	portTag := []byte(fmt.Sprintf(":%04X ", peer.Port()))
	for _, name := range procNetTCPFiles {
		b, err := os.ReadFile(name)
		if err != nil {
			continue
		}
		for _, line := range bytes.Split(b, []byte("\n")) {
			if !bytes.Contains(line, portTag) {
				continue
			}
			if e, ok, err := parseProcNetLine(line, binary.NativeEndian); err == nil && ok && e.Local == peer && e.Remote == self {
				inode = e.Inode
			}
		}
	}
	if inode == 0 {
		return "", fmt.Errorf("no socket %v -> %v", peer, self)
	}
	want := "socket:[" + strconv.FormatUint(inode, 10) + "]"
	holds := func(proc string) bool {
		fds, _ := filepath.Glob(proc + "/fd/*")
		for _, fd := range fds {
			if l, err := os.Readlink(fd); err == nil && l == want {
				return true
			}
		}
		return false
	}
	if holds("/proc/self") {
		return "self", nil
	}
	procs, _ := filepath.Glob("/proc/[0-9]*")
	for _, p := range procs {
		if comm, err := os.ReadFile(p + "/comm"); err == nil && strings.TrimSpace(string(comm)) == "sshd" && holds(p) {
			return "sshd", nil
		}
	}
	return "", fmt.Errorf("neither this process nor an sshd holds %s", want)
}

// TestLocalForwardUnreachable counts a target the login node cannot reach
// as a failure and closes the client's connection.
func TestLocalForwardUnreachable(t *testing.T) {
	sshd := sshtest.StartSSHD(t, sshtest.Options{})
	tun := testTunnel(t, sshd, MethodGoSSH)
	requireForwardFails(t, tun.Dial, net.JoinHostPort("127.0.0.1", strconv.Itoa(sshtest.FreePort(t))), "refused")
}

// requireForwardFails starts a local forward to remote over dial, connects
// to it, and checks that the connection is closed unserved and counted as
// a failure with wantErr in LastError.
func requireForwardFails(t *testing.T, dial DialFunc, remote, wantErr string) {
	t.Helper()
	f := &LocalForward{Listen: "127.0.0.1:0", Remote: remote, Dial: dial}
	require.NoError(t, f.Start())
	defer f.Close()
	c, err := net.Dial("tcp", f.Addr().String())
	require.NoError(t, err)
	defer c.Close()
	require.NoError(t, c.SetDeadline(time.Now().Add(10*time.Second)))
	_, _ = io.WriteString(c, "let me through")
	n, err := c.Read(make([]byte, 1)) // EOF or reset: closed without a byte
	assert.Zero(t, n)
	require.Error(t, err, "the client's connection was not closed")
	var ne net.Error
	assert.False(t, errors.As(err, &ne) && ne.Timeout(), "the client's connection was left open: %v", err)
	require.Eventually(t, func() bool { return f.Info().Failed == 1 }, 5*time.Second, 10*time.Millisecond)
	info := f.Info()
	assert.Contains(t, info.LastError, wantErr)
	assert.Zero(t, info.BytesOut)
	t.Log(info.LastError)
}

// eachRefusingTunnel runs f on a tunnel of each method that opens channels
// and listeners itself (gossh, controlmaster), through an sshd started with
// each of the sshd options opts.
func eachRefusingTunnel(t *testing.T, opts []string, f func(t *testing.T, tun *Tunnel)) {
	t.Helper()
	for _, opt := range opts {
		t.Run(opt, func(t *testing.T) {
			sshd := sshtest.StartSSHD(t, sshtest.Options{Config: []string{opt}})
			for _, m := range []Method{MethodGoSSH, MethodControlMaster} {
				t.Run(m.String(), func(t *testing.T) { f(t, testTunnel(t, sshd, m)) })
			}
		})
	}
}

// TestLocalForwardRefused: sshd refusing the forward (AllowTcpForwarding
// no, PermitOpen none) closes the client's connection, counts a failure
// and says why in LastError.
func TestLocalForwardRefused(t *testing.T) {
	echo := startEchoServer(t)
	eachRefusingTunnel(t, []string{"AllowTcpForwarding=no", "PermitOpen=none"}, func(t *testing.T, tun *Tunnel) {
		requireForwardFails(t, tun.Dial, echo, "prohibited")
	})
}

// TestReverseForward exposes a test HTTP server in "the job" on the sshd
// side, over TCP (port chosen by sshd) and a unix socket, with each method
// that can listen.
func TestReverseForward(t *testing.T) {
	sshd := sshtest.StartSSHD(t, sshtest.Options{})
	web := startWebServer(t)
	local := strings.TrimPrefix(web.URL, "http://")
	for _, m := range []Method{MethodGoSSH, MethodControlMaster} {
		t.Run(m.String(), func(t *testing.T) {
			tun := testTunnel(t, sshd, m)
			t.Run("tcp", func(t *testing.T) {
				var bound []net.Addr
				f := &ReverseForward{Local: local, OnBind: func(a net.Addr) { bound = append(bound, a) }}
				require.NoError(t, f.Start(context.Background(), tun))
				ra := f.RemoteAddr().(*net.TCPAddr)
				assert.Equal(t, "127.0.0.1", ra.IP.String())
				assert.NotZero(t, ra.Port)
				assert.Equal(t, []net.Addr{ra}, bound)
				assert.Equal(t, "hello /jupyter", httpGet(t, "http://"+ra.String()+"/jupyter"))
				require.Eventually(t, func() bool { return f.Info().Active == 0 }, 5*time.Second, 10*time.Millisecond)
				info := f.Info()
				assert.Equal(t, ForwardReverse, info.Kind)
				assert.Equal(t, ra.String(), info.Listen)
				assert.Equal(t, local, info.Target)
				assert.Equal(t, int64(1), info.Total)
				assert.Greater(t, info.BytesIn, int64(50), "request bytes")
				assert.Greater(t, info.BytesOut, int64(len("hello /jupyter")), "response bytes")
				require.NoError(t, f.Close())
				assert.Equal(t, ForwardClosed, f.Info().Status)
				// The remote listener is gone: sshd no longer accepts there.
				require.Eventually(t, func() bool {
					c, err := net.DialTimeout("tcp", ra.String(), time.Second)
					if err == nil {
						c.Close()
					}
					return err != nil
				}, 5*time.Second, 20*time.Millisecond)
			})
			t.Run("unix", func(t *testing.T) {
				sock := filepath.Join(sshtest.PrivateTempDir(t), "jupyter.sock")
				f := &ReverseForward{Remote: sock, Local: local}
				require.NoError(t, f.Start(context.Background(), tun))
				defer f.Close()
				assert.Equal(t, sock, f.RemoteAddr().String())
				tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
					var d net.Dialer
					return d.DialContext(ctx, "unix", sock)
				}}
				defer tr.CloseIdleConnections()
				resp, err := (&http.Client{Transport: tr, Timeout: 10 * time.Second}).Get("http://job/unix")
				require.NoError(t, err)
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				assert.Equal(t, "hello /unix", string(b))
			})
		})
	}
}

// TestReverseForwardUnsupported: methods without an in-process SSH
// connection say so.
func TestReverseForwardUnsupported(t *testing.T) {
	tun, err := EstablishTunnel(context.Background(), TunnelConfig{Methods: []Method{MethodDirect}})
	require.NoError(t, err)
	defer tun.Close()
	f := &ReverseForward{Local: "127.0.0.1:1"}
	err = f.Start(context.Background(), tun)
	require.ErrorIs(t, err, ErrReverseUnsupported)
	assert.Contains(t, err.Error(), "direct")
	assert.NoError(t, f.Close())
}

// TestReverseForwardRefused: sshd's AllowTcpForwarding=no and
// PermitListen=none surface as ErrProhibited with an explanation.
func TestReverseForwardRefused(t *testing.T) {
	eachRefusingTunnel(t, []string{"AllowTcpForwarding=no", "PermitListen=none"}, func(t *testing.T, tun *Tunnel) {
		f := &ReverseForward{Local: "127.0.0.1:1"}
		err := f.Start(context.Background(), tun)
		require.Error(t, err)
		assert.ErrorIs(t, err, ErrProhibited)
		assert.Contains(t, err.Error(), "hpcproxy: reverse forward")
		t.Log(err)
		assert.NoError(t, f.Close())
		// The tunnel itself is unharmed.
		select {
		case <-tun.Done():
			t.Fatalf("tunnel went down: %v", tun.Err())
		default:
		}
	})
}

// TestReverseForwardReconnect restarts sshd under a supervised tunnel: the
// reverse forward comes back on the same port and serves again.
func TestReverseForwardReconnect(t *testing.T) {
	sshd := sshtest.StartSSHD(t, sshtest.Options{})
	web := startWebServer(t)
	for _, m := range []Method{MethodGoSSH, MethodControlMaster} {
		t.Run(m.String(), func(t *testing.T) {
			if !sshd.Running() {
				sshd.Start(t)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			sup, err := SuperviseTunnel(ctx, SupervisorConfig{
				Tunnel: TunnelConfig{
					Destination: "sshtest", SSHConfigFile: sshd.SSHConfigFile, Methods: []Method{m},
					KeepaliveInterval: 300 * time.Millisecond, KeepaliveCountMax: 2,
					ConnectTimeout: 2 * time.Second, RuntimeDir: sshtest.PrivateTempDir(t),
				},
				MinBackoff: 50 * time.Millisecond, MaxBackoff: 300 * time.Millisecond,
			})
			require.NoError(t, err)
			defer sup.Close()
			binds := make(chan net.Addr, 10)
			f := &ReverseForward{Local: strings.TrimPrefix(web.URL, "http://"), OnBind: func(a net.Addr) { binds <- a }}
			require.NoError(t, f.Start(ctx, sup))
			defer func() { assert.NoError(t, f.Close()) }()
			first := <-binds
			assert.Equal(t, "hello /before", httpGet(t, "http://"+first.String()+"/before"))

			sshd.Stop()
			require.Eventually(t, func() bool { return f.Info().Status == ForwardWaiting }, 20*time.Second, 20*time.Millisecond)
			sshd.Start(t)
			var again net.Addr
			select {
			case again = <-binds:
			case <-time.After(30 * time.Second):
				t.Fatalf("reverse listener not re-registered; info %+v", f.Info())
			}
			assert.Equal(t, first.String(), again.String(), "same port after the reconnect")
			assert.Equal(t, ForwardUp, f.Info().Status)
			assert.Equal(t, "hello /after", httpGet(t, "http://"+again.String()+"/after"))
			assert.Equal(t, int64(2), f.Info().Total)
		})
	}
}

// TestLocalForwardCloseWhileDialing closes a forward whose dial hangs (a
// tunnel that is down): Close cancels the dial and returns at once, the
// client's connection is closed, and the cancelled dial is no failure.
func TestLocalForwardCloseWhileDialing(t *testing.T) {
	dialing := make(chan struct{})
	dialErr := make(chan error, 1)
	f := &LocalForward{Listen: "127.0.0.1:0", Remote: "db.internal:5432",
		Dial: func(ctx context.Context, _, _ string) (net.Conn, error) {
			close(dialing)
			<-ctx.Done()
			dialErr <- ctx.Err()
			return nil, ctx.Err()
		}}
	require.NoError(t, f.Start())
	c, err := net.Dial("tcp", f.Addr().String())
	require.NoError(t, err)
	defer c.Close()
	select {
	case <-dialing:
	case <-time.After(5 * time.Second):
		t.Fatal("the forward never dialled")
	}

	start := time.Now()
	require.NoError(t, f.Close())
	assert.Less(t, time.Since(start), 2*time.Second, "Close waited for the hanging dial")
	assert.ErrorIs(t, <-dialErr, context.Canceled, "the dial's ctx was not cancelled")
	require.NoError(t, c.SetReadDeadline(time.Now().Add(5*time.Second)))
	n, err := c.Read(make([]byte, 1))
	assert.Zero(t, n)
	assert.Error(t, err, "client connection left open")
	info := f.Info()
	assert.Equal(t, int64(0), info.Failed, "a dial cancelled by Close counted as a failure")
	assert.Empty(t, info.LastError)
	assert.Equal(t, ForwardClosed, info.Status)
}

// TestListenUnixPrivate: the socket is 0600 at its path, nothing is left
// beside it, a stale socket is replaced, a live one or another file is
// not, and Close removes the socket.
func TestListenUnixPrivate(t *testing.T) {
	dir := sshtest.PrivateTempDir(t)
	path := filepath.Join(dir, "fwd.sock")

	// A stale socket (its listener gone) is in the way at first.
	stale, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	require.NoError(t, err)
	stale.SetUnlinkOnClose(false)
	require.NoError(t, stale.Close())

	ln, err := listenUnixPrivate(path)
	require.NoError(t, err)
	defer ln.Close()
	assert.Equal(t, path, ln.Addr().String())
	fi, err := os.Lstat(path)
	require.NoError(t, err)
	assert.Equal(t, os.ModeSocket, fi.Mode().Type())
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm())
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	require.Len(t, entries, 1, "left beside the socket: %v", entries)

	accepted := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			c.Close()
		}
		accepted <- err
	}()
	c, err := net.Dial("unix", path)
	require.NoError(t, err)
	c.Close()
	require.NoError(t, <-accepted)

	// A live socket is not taken over.
	_, err = listenUnixPrivate(path)
	assert.ErrorIs(t, err, syscall.EADDRINUSE)

	require.NoError(t, ln.Close())
	_, err = os.Lstat(path)
	assert.ErrorIs(t, err, fs.ErrNotExist, "Close left the socket file")

	// A file that is not a socket is never replaced.
	require.NoError(t, os.WriteFile(path, []byte("data"), 0o600))
	_, err = listenUnixPrivate(path)
	assert.ErrorIs(t, err, syscall.EADDRINUSE)
	b, _ := os.ReadFile(path)
	assert.Equal(t, "data", string(b))
	entries, _ = os.ReadDir(dir)
	assert.Len(t, entries, 1, "a failed listen left files behind")
}

// TestListenUnixPrivateUmask creates directories while forwards listen on
// unix sockets: their modes must follow the process's umask throughout,
// which a listener that narrows the umask for its bind would break.
func TestListenUnixPrivateUmask(t *testing.T) {
	dir := sshtest.PrivateTempDir(t)
	old := syscall.Umask(0o022)
	syscall.Umask(old)
	want := os.FileMode(0o700) &^ os.FileMode(old)
	stop := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				done <- nil
				return
			default:
			}
			ln, err := listenUnixPrivate(filepath.Join(dir, "s"+strconv.Itoa(i%4)))
			if err != nil {
				done <- err
				return
			}
			ln.Close()
		}
	}()
	for i := 0; i < 2000; i++ {
		d, err := os.MkdirTemp(dir, "m")
		require.NoError(t, err)
		fi, err := os.Stat(d)
		require.NoError(t, err)
		if fi.Mode().Perm() != want {
			close(stop)
			<-done
			t.Fatalf("directory made while listening has mode %v, want %v", fi.Mode().Perm(), want)
		}
		require.NoError(t, os.Remove(d))
	}
	close(stop)
	require.NoError(t, <-done)
}

// TestForwardCountsWhileFlowing: the byte counters of a forward between
// two kernel sockets (where the relay could splice and count only at the
// end) move while the connection is still open.
func TestForwardCountsWhileFlowing(t *testing.T) {
	echo := startEchoServer(t)
	var d net.Dialer
	for _, listen := range []string{"127.0.0.1:0", filepath.Join(sshtest.PrivateTempDir(t), "fwd.sock")} {
		t.Run(listen, func(t *testing.T) {
			f := &LocalForward{Listen: listen, Remote: echo, Dial: d.DialContext}
			require.NoError(t, f.Start())
			defer f.Close()
			a := f.Addr()
			c, err := net.Dial(a.Network(), a.String())
			require.NoError(t, err)
			defer c.Close()
			require.NoError(t, c.SetDeadline(time.Now().Add(10*time.Second)))
			_, err = io.WriteString(c, "ping")
			require.NoError(t, err)
			_, err = io.ReadFull(c, make([]byte, 4))
			require.NoError(t, err)
			require.Eventually(t, func() bool {
				i := f.Info()
				return i.BytesIn == 4 && i.BytesOut == 4
			}, 5*time.Second, 10*time.Millisecond, "counters of an open connection: %+v", f.Info())
			assert.Equal(t, int64(1), f.Info().Active, "the connection is still open")
		})
	}
}
