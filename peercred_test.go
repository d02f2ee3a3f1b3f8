package hpcproxy

import (
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/hpcproxy/hpcproxy/internal/sshtest"
	"github.com/hpcproxy/hpcproxy/internal/testenv"
)

const procNetTCPSample = `  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:07E8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 125 1 000000004b021281 100 0 0 10 0
   1: 0100007F:A9D7 0100007F:1F90 01 00000000:00000000 00:00000000 00000000  1000        0 95382 2 000000000f116624 100 0 0 10 0
   2: 0A01A8C0:0016 6401A8C0:D431 01 00000000:00000000 02:000A7B2C 00000000  1001        0 4711 4 0000000000000000 20 4 30 10 -1
`

const procNetTCP6Sample = `  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:8912 00000000000000000000000001000000:838B 01 00000000:00000000 03:00000FC1 00000000  1000        0 77 3 00000000fd3e684e
   1: 0000000000000000FFFF00000100007F:1F90 0000000000000000FFFF00000100007F:A9D7 01 00000000:00000000 00:00000000 00000000     0        0 78 1 0000000000000000
   2: B80D01200000000000000000010000C0:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000    33        0 79 1 0000000000000000
`

func TestParseProcNetTCP(t *testing.T) {
	ap := netip.MustParseAddrPort
	got, err := parseProcNetTCP([]byte(procNetTCPSample), binary.LittleEndian)
	require.NoError(t, err)
	assert.Equal(t, []procNetEntry{
		{Local: ap("0.0.0.0:2024"), Remote: ap("0.0.0.0:0"), State: 0x0A, UID: 0, Inode: 125},
		{Local: ap("127.0.0.1:43479"), Remote: ap("127.0.0.1:8080"), State: 1, UID: 1000, Inode: 95382},
		{Local: ap("192.168.1.10:22"), Remote: ap("192.168.1.100:54321"), State: 1, UID: 1001, Inode: 4711},
	}, got)

	got, err = parseProcNetTCP([]byte(procNetTCP6Sample), binary.LittleEndian)
	require.NoError(t, err)
	assert.Equal(t, []procNetEntry{
		{Local: ap("[::1]:35090"), Remote: ap("[::1]:33675"), State: 1, UID: 1000, Inode: 77},
		// IPv4-mapped addresses are unmapped, to compare with IPv4 peers.
		{Local: ap("127.0.0.1:8080"), Remote: ap("127.0.0.1:43479"), State: 1, UID: 0, Inode: 78},
		{Local: ap("[2001:db8::c000:1]:80"), Remote: ap("[::]:0"), State: 0x0A, UID: 33, Inode: 79},
	}, got)

	// On a big-endian kernel the words are printed in network order.
	got, err = parseProcNetTCP([]byte("0: 7F000001:0050 7F000002:0051 01 0:0 0:0 0 7 0 9\n"), binary.BigEndian)
	require.NoError(t, err)
	assert.Equal(t, []procNetEntry{{Local: ap("127.0.0.1:80"), Remote: ap("127.0.0.2:81"), State: 1, UID: 7, Inode: 9}}, got)
}

func TestParseProcNetTCPErrors(t *testing.T) {
	for _, bad := range []string{
		"0: 0100007F:1F90 0100007F:1F90 01\n",                     // short
		"0: 0100007G:1F90 0100007F:1F90 01 0:0 0:0 0 7 0 9\n",     // hex
		"0: 0100007F 0100007F:1F90 01 0:0 0:0 0 7 0 9\n",          // no port
		"0: 0100007F:1F9 0100007F:1F90 01 0:0 0:0 0 7 0 9\n",      // short port
		"0: 01000:1F90 0100007F:1F90 01 0:0 0:0 0 7 0 9\n",        // odd address
		"0: 0100007F00:1F90 0100007F:1F90 01 0:0 0:0 0 7 0 9\n",   // 5 bytes
		"0: 0100007F:1F90 0100007F:1F90 01 0:0 0:0 0 -7 0 9\n",    // uid
		"0: 0100007F:1F90 0100007F:1F90 0100 0:0 0:0 0 7 0 9\n",   // state
		"0: 0100007F:1F90 0100007F:1F90 01 0:0 0:0 0 7 0 inode\n", // inode
	} {
		_, err := parseProcNetTCP([]byte(bad), binary.LittleEndian)
		assert.Error(t, err, "%q", bad)
	}
	got, err := parseProcNetTCP([]byte("\n  \n"), binary.LittleEndian)
	assert.NoError(t, err)
	assert.Empty(t, got)
}

func FuzzParseProcNetTCP(f *testing.F) {
	f.Add([]byte(procNetTCPSample))
	f.Add([]byte(procNetTCP6Sample))
	f.Add([]byte("0: 7F000001:0050 7F000002:0051 01 0:0 0:0 0 7 0 9\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		for _, order := range []binary.ByteOrder{binary.LittleEndian, binary.BigEndian} {
			entries, err := parseProcNetTCP(b, order)
			if err != nil {
				continue
			}
			for _, e := range entries {
				if !e.Local.Addr().IsValid() || !e.Remote.Addr().IsValid() || e.UID < 0 {
					t.Fatalf("invalid entry %+v from %q", e, b)
				}
				if e.Local.Addr().Is4In6() || e.Remote.Addr().Is4In6() {
					t.Fatalf("mapped address left in %+v", e)
				}
			}
		}
	})
}

// acceptOne accepts one connection on ln within 10 seconds, after dial
// (which connects to ln, or starts a process that does) returned.
func acceptOne(t *testing.T, ln net.Listener, dial func() error) net.Conn {
	t.Helper()
	require.NoError(t, dial())
	require.NoError(t, ln.(*net.TCPListener).SetDeadline(time.Now().Add(10*time.Second)))
	c, err := ln.Accept()
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	return c
}

func TestLoopbackPeerUIDSelf(t *testing.T) {
	for _, addr := range []string{"127.0.0.1:0", "[::1]:0"} {
		t.Run(addr, func(t *testing.T) {
			ln, err := net.Listen("tcp", addr)
			if err != nil && addr == "[::1]:0" {
				t.Skipf("no IPv6 loopback: %v", err)
			}
			require.NoError(t, err)
			defer ln.Close()
			var client net.Conn
			c := acceptOne(t, ln, func() error {
				var err error
				client, err = net.Dial("tcp", ln.Addr().String())
				return err
			})
			defer client.Close()
			uid, err := loopbackPeerUID(c)
			require.NoError(t, err)
			assert.Equal(t, os.Getuid(), uid)
			assert.True(t, sameUserConn(c))

			// Both lookups, on their own.
			peer, _ := addrPortOf(c.RemoteAddr())
			self, _ := addrPortOf(c.LocalAddr())
			uid, err = sockDiagUID(peer, self)
			require.NoError(t, err, "sock_diag")
			assert.Equal(t, os.Getuid(), uid, "sock_diag")
			uid, err = procNetUID(peer, self)
			require.NoError(t, err, "/proc/net")
			assert.Equal(t, os.Getuid(), uid, "/proc/net")

			// The listener's own port is not a peer.
			lnAddr, _ := addrPortOf(ln.Addr())
			_, err = sockDiagUID(lnAddr, self)
			assert.ErrorIs(t, err, errPeerNotFound)
		})
	}
}

func TestLoopbackPeerUIDClosedPeer(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	var client net.Conn
	c := acceptOne(t, ln, func() error {
		var err error
		client, err = net.Dial("tcp", ln.Addr().String())
		return err
	})
	// With SO_LINGER 0 the client's socket vanishes at once (RST).
	client.(*net.TCPConn).SetLinger(0)
	client.Close()
	time.Sleep(50 * time.Millisecond)
	_, err = loopbackPeerUID(c)
	assert.ErrorIs(t, err, errPeerNotFound)
	assert.False(t, sameUserConn(c))
	peer, _ := addrPortOf(c.RemoteAddr())
	self, _ := addrPortOf(c.LocalAddr())
	_, err = procNetUID(peer, self)
	assert.ErrorIs(t, err, errPeerNotFound, "/proc/net")
}

type fakeAddrConn struct {
	net.Conn
	local, remote net.Addr
}

func (c fakeAddrConn) LocalAddr() net.Addr  { return c.local }
func (c fakeAddrConn) RemoteAddr() net.Addr { return c.remote }

func TestLoopbackPeerUIDNotLoopback(t *testing.T) {
	local := &net.TCPAddr{IP: net.IPv4(10, 0, 0, 1), Port: 8080}
	for _, remote := range []net.Addr{
		&net.TCPAddr{IP: net.IPv4(10, 0, 0, 2), Port: 5000},
		&net.UnixAddr{Name: "/tmp/s", Net: "unix"},
		nil,
	} {
		_, err := loopbackPeerUID(fakeAddrConn{local: local, remote: remote})
		assert.ErrorIs(t, err, errNotLoopback, "remote %v", remote)
	}
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	assert.False(t, sameUserConn(a))
}

// TestLoopbackPeerUIDOtherUser connects as another UID (curl run with
// SysProcAttr.Credential) and checks that the lookup names that UID and
// sameUserConn refuses it. The kernel needs no passwd entry for a UID, so
// no user is created on the machine.
func TestLoopbackPeerUIDOtherUser(t *testing.T) {
	testenv.RequireRoot(t)
	curl := testenv.LookPath(t, "curl")
	const otherUID = 48213

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	cmd := exec.Command(curl, "-q", "-s", "--max-time", "10", "http://"+ln.Addr().String()+"/")
	cmd.Env = []string{}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: otherUID, Gid: otherUID}}
	c := acceptOne(t, ln, cmd.Start)
	defer cmd.Wait()
	defer c.Close()

	uid, err := loopbackPeerUID(c)
	require.NoError(t, err)
	assert.Equal(t, otherUID, uid, "peer uid")
	peer, _ := addrPortOf(c.RemoteAddr())
	self, _ := addrPortOf(c.LocalAddr())
	uid, err = procNetUID(peer, self)
	require.NoError(t, err)
	assert.Equal(t, otherUID, uid, "peer uid from /proc/net")
	assert.False(t, sameUserConn(c), "another user's connection trusted")

	c.Write([]byte("HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n"))
	c.Close()
	if err := cmd.Wait(); err != nil && !errors.As(err, new(*exec.ExitError)) {
		t.Errorf("curl: %v", err)
	}
}

// acceptUnix accepts one connection on ln within 10 seconds, after dial
// (which connects to ln, or starts a process that does) returned.
func acceptUnix(t *testing.T, ln *net.UnixListener, dial func() error) *net.UnixConn {
	t.Helper()
	require.NoError(t, dial())
	require.NoError(t, ln.SetDeadline(time.Now().Add(10*time.Second)))
	c, err := ln.AcceptUnix()
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	return c
}

func TestUnixPeerUIDSelf(t *testing.T) {
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: filepath.Join(sshtest.PrivateTempDir(t), "s"), Net: "unix"})
	require.NoError(t, err)
	defer ln.Close()
	var client net.Conn
	c := acceptUnix(t, ln, func() error {
		var err error
		client, err = net.Dial("unix", ln.Addr().String())
		return err
	})
	defer client.Close()
	// An unnamed client ("@"): no address to look up in the TCP tables.
	_, err = loopbackPeerUID(c)
	assert.ErrorIs(t, err, errNotLoopback)
	uid, err := unixPeerUID(c)
	require.NoError(t, err)
	assert.Equal(t, os.Getuid(), uid)
	assert.True(t, sameUserConn(c), "the owner's unix connection refused")
}

// TestUnixPeerUIDOtherUser connects to a unix socket as another UID (curl
// --unix-socket with SysProcAttr.Credential): SO_PEERCRED names that UID
// and sameUserConn refuses it.
func TestUnixPeerUIDOtherUser(t *testing.T) {
	testenv.RequireRoot(t)
	curl := testenv.LookPath(t, "curl")
	const otherUID = 48213
	sock := otherUserSocketPath(t)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	require.NoError(t, err)
	defer ln.Close()
	require.NoError(t, os.Chmod(sock, 0o666))
	cmd := exec.Command(curl, "-q", "-s", "--max-time", "10", "--unix-socket", sock, "http://job/")
	cmd.Env = []string{}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: otherUID, Gid: otherUID}}
	c := acceptUnix(t, ln, cmd.Start)
	defer cmd.Wait()

	uid, err := unixPeerUID(c)
	require.NoError(t, err)
	assert.Equal(t, otherUID, uid, "peer uid")
	assert.False(t, sameUserConn(c), "another user's unix connection trusted")
	c.Close()
}

// otherUserSocketPath returns a socket path in a fresh directory that other
// users can reach (mode 0755), removed when t ends.
func otherUserSocketPath(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "peercred")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	require.NoError(t, os.Chmod(dir, 0o755))
	return filepath.Join(dir, "s")
}
