package hpcproxy

import (
	"context"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/crypto/ssh"

	"github.com/hpcproxy/hpcproxy/internal/sshtest"
)

// TestChannelConnRequests checks that a tunnelled connection answers the
// channel requests a server sends on it (refusing them, as
// ssh.DiscardRequests would) as it is used, without a goroutine of its own
// for that. (x/crypto sends a channel's requests one at a time, each after
// the last one's reply.)
func TestChannelConnRequests(t *testing.T) {
	noAgent(t)
	srv := sshtest.StartServer(t)
	srv.SendChannelRequests(5)
	tun, err := establishGoSSH(t, TunnelConfig{SSHConfigFile: srv.SSHConfigFile})
	require.NoError(t, err)
	defer tun.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := tun.Dial(ctx, "tcp", startEchoServer(t))
	require.NoError(t, err)
	defer c.Close()
	for i := 0; i < 200 && srv.ChannelRequestReplies() < 5; i++ {
		_, err = c.Write([]byte("x"))
		require.NoError(t, err)
		_, err = io.ReadFull(c, make([]byte, 1))
		require.NoError(t, err)
		time.Sleep(5 * time.Millisecond)
	}
	require.Equal(t, 5, srv.ChannelRequestReplies(), "replies to the server's 5 requests")
	require.Equal(t, channelAddr(c.RemoteAddr().String()), c.RemoteAddr())
	require.Error(t, c.SetDeadline(time.Now()), "an SSH channel has no deadlines")
}

func TestDirectTCPIPPayloadMatchesMarshal(t *testing.T) {
	for _, tc := range []struct {
		host string
		port uint32
	}{{"example.org", 443}, {"::1", 22}, {"", 0}, {strings.Repeat("h", 255), 65535}} {
		want := ssh.Marshal(&struct {
			Host     string
			Port     uint32
			OrigHost string
			OrigPort uint32
		}{tc.host, tc.port, "0.0.0.0", 0})
		assert.Equal(t, want, directTCPIPPayload(tc.host, tc.port), "%s:%d", tc.host, tc.port)
	}
}
