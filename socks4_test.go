package hpcproxy

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"net"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestSOCKS4BadInput checks SOCKS4/4a refusals byte for byte.
func TestSOCKS4BadInput(t *testing.T) {
	echo := startEchoServer(t)
	closed := portOf(t, closedPort(t))
	rejected := []byte{0, 0x5b, 0, 0, 0, 0, 0, 0}
	req := func(cmd byte, port uint16, ip [4]byte, rest ...string) []byte {
		b := []byte{4, cmd}
		b = binary.BigEndian.AppendUint16(b, port)
		b = append(b, ip[:]...)
		for _, s := range rest {
			b = append(b, s...)
			b = append(b, 0)
		}
		return b
	}
	lo := [4]byte{127, 0, 0, 1}
	creds := map[string]string{"alice": "s3cret"}
	for _, tc := range []struct {
		name  string
		creds map[string]string
		in    []byte
		want  []byte
	}{
		{"BIND", nil, req(2, 80, lo, ""), rejected},
		{"unknown command", nil, req(3, 80, lo, ""), rejected},
		{"user id too long", nil, req(1, 80, lo, strings.Repeat("u", 600)), rejected},
		{"4a empty host", nil, req(1, 80, [4]byte{0, 0, 0, 1}, "", ""), rejected},
		{"4a host too long", nil, req(1, 80, [4]byte{0, 0, 0, 1}, "", strings.Repeat("h", 300)), rejected},
		{"4a bad host", nil, req(1, 80, [4]byte{0, 0, 0, 1}, "", "a/b"), rejected},
		{"port 0", nil, req(1, 0, lo, ""), rejected},
		{"4a port 0", nil, req(1, 0, [4]byte{0, 0, 0, 1}, "", "localhost"), rejected},
		{"truncated", nil, []byte{4, 1, 0}, []byte{}},
		{"unterminated user id", nil, []byte{4, 1, 0, 80, 127, 0, 0, 1, 'u'}, []byte{}},
		{"refused", nil, req(1, closed, lo, "anyone"), rejected},
		{"4a refused", nil, req(1, closed, [4]byte{0, 0, 0, 9}, "", "localhost"), rejected},
		{"no token", creds, req(1, portOf(t, echo), lo, ""), rejected},
		{"wrong token", creds, req(1, portOf(t, echo), lo, "alice"), rejected},
		{"wrong user:password", creds, req(1, portOf(t, echo), lo, "alice:nope"), rejected},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := &Server{Credentials: tc.creds}
			addr := startServer(t, srv)
			require.Equal(t, tc.want, rawExchange(t, addr, tc.in))
			require.Equal(t, int64(1), srv.Stats().FailedHandshakes)
			user := "someone"
			if tc.creds != nil {
				user = "alice:s3cret"
			}
			for _, good := range [][]byte{
				req(1, portOf(t, echo), lo, user),
				req(1, portOf(t, echo), [4]byte{0, 0, 0, 1}, user, "localhost"),
			} {
				c, err := net.Dial("tcp", addr)
				require.NoError(t, err)
				_, err = c.Write(good)
				require.NoError(t, err)
				reply := make([]byte, 8)
				_, err = readFull(c, reply)
				require.NoError(t, err)
				require.Equal(t, []byte{0, 0x5a, 0, 0, 0, 0, 0, 0}, reply)
				echoCheck(t, c, "still serving")
				c.Close()
			}
		})
	}
}

func TestSOCKS4Token(t *testing.T) {
	srv := &Server{Credentials: map[string]string{"alice": "s3cret", "bob": "hunter2"}}
	for tok, want := range map[string]bool{
		"s3cret": true, "hunter2": true, "alice:s3cret": true, "bob:hunter2": true,
		"alice": false, "alice:hunter2": false, "": false, "s3cret ": false,
	} {
		require.Equal(t, want, srv.checkToken(tok), "token %q", tok)
	}
}

// FuzzSOCKS4Request feeds arbitrary bytes to the SOCKS4/4a parser.
func FuzzSOCKS4Request(f *testing.F) {
	f.Add([]byte{4, 1, 0, 80, 127, 0, 0, 1, 'u', 0})
	f.Add([]byte("\x04\x01\x01\xbb\x00\x00\x00\x01\x00example.com\x00"))
	f.Add([]byte{4, 2, 0, 80, 127, 0, 0, 1, 0})
	f.Add([]byte{4, 1, 0, 80, 0, 0, 0, 1, 0, 0})
	f.Fuzz(func(t *testing.T, in []byte) {
		req, err := readSOCKS4Request(bufio.NewReader(bytes.NewReader(in)))
		if err != nil {
			return
		}
		host, port, err := net.SplitHostPort(req.addr)
		if err != nil || host == "" {
			t.Fatalf("accepted %q: %v", req.addr, err)
		}
		if _, err := strconv.ParseUint(port, 10, 16); err != nil {
			t.Fatalf("accepted %q", req.addr)
		}
		if len(req.userID) > socks4MaxUserID {
			t.Fatalf("user id of %d bytes accepted", len(req.userID))
		}
	})
}
