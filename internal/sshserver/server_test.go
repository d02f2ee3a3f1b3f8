package sshserver

import (
	"crypto/ed25519"
	"crypto/rand"
	"encoding/binary"
	"io"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/crypto/ssh"
)

func FuzzParseDirectTCPIP(f *testing.F) {
	f.Add([]byte{0, 0, 0, 9, 'l', 'o', 'c', 'a', 'l', 'h', 'o', 's', 't', 0, 0, 0, 80})
	f.Add([]byte{0, 0, 0, 0xff})
	f.Fuzz(func(t *testing.T, b []byte) {
		target, err := parseDirectTCPIP(b)
		if err == nil && target == "" {
			t.Fatal("empty target without error")
		}
	})
}

func TestParseDirectTCPIP(t *testing.T) {
	b := binary.BigEndian.AppendUint32(nil, 3)
	b = append(b, "::1"...)
	b = binary.BigEndian.AppendUint32(b, 443)
	got, err := parseDirectTCPIP(b)
	assert.NoError(t, err)
	assert.Equal(t, "[::1]:443", got)
	_, err = parseDirectTCPIP(b[:5])
	assert.Error(t, err)
}

// The fault-injection switches the tunnel tests rely on: delayed channel
// opens, the count of open channels, delayed global request replies.
func TestDelaysAndChannelCount(t *testing.T) {
	_, hostPriv, err := ed25519.GenerateKey(rand.Reader)
	require.NoError(t, err)
	hostKey, err := ssh.NewSignerFromKey(hostPriv)
	require.NoError(t, err)
	_, clientPriv, err := ed25519.GenerateKey(rand.Reader)
	require.NoError(t, err)
	clientKey, err := ssh.NewSignerFromKey(clientPriv)
	require.NoError(t, err)
	s := New(hostKey, clientKey.PublicKey())
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	s.Start(ln)
	defer s.Close()

	echo, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer echo.Close()
	go func() {
		for {
			c, err := echo.Accept()
			if err != nil {
				return
			}
			go func() { _, _ = io.Copy(c, c); c.Close() }()
		}
	}()

	client, err := ssh.Dial("tcp", ln.Addr().String(), &ssh.ClientConfig{
		User: "u", Auth: []ssh.AuthMethod{ssh.PublicKeys(clientKey)},
		HostKeyCallback: ssh.FixedHostKey(hostKey.PublicKey()),
	})
	require.NoError(t, err)
	defer client.Close()

	const d = 100 * time.Millisecond
	s.DelayChannelOpens(d)
	start := time.Now()
	c, err := client.Dial("tcp", echo.Addr().String())
	require.NoError(t, err)
	assert.GreaterOrEqual(t, time.Since(start), d)
	accepted, open := s.Channels()
	assert.Equal(t, [2]int{1, 1}, [2]int{accepted, open})
	require.NoError(t, c.Close())
	assert.Eventually(t, func() bool { _, open := s.Channels(); return open == 0 }, 5*time.Second, 5*time.Millisecond)

	s.DelayGlobalRequests(func(n int) time.Duration {
		if n == 0 {
			return d
		}
		return 0
	})
	for n, want := range []time.Duration{d, 0} {
		start := time.Now()
		_, _, err := client.SendRequest("keepalive@openssh.com", true, nil)
		require.NoError(t, err)
		took := time.Since(start)
		assert.GreaterOrEqual(t, took, want, "request %d", n)
		if want == 0 {
			assert.Less(t, took, d, "request %d", n)
		}
	}
}
