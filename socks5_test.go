package hpcproxy

import (
	"bytes"
	"encoding/binary"
	"net"
	"strconv"
	"testing"

	"github.com/stretchr/testify/require"
)

// connectReq builds a SOCKS5 CONNECT request to an IPv4 address.
func socks5Connect(ip [4]byte, port uint16) []byte {
	b := []byte{5, 1, 0, 1}
	b = append(b, ip[:]...)
	return binary.BigEndian.AppendUint16(b, port)
}

func portOf(t testing.TB, addr string) uint16 {
	t.Helper()
	_, p, err := net.SplitHostPort(addr)
	require.NoError(t, err)
	n, err := strconv.ParseUint(p, 10, 16)
	require.NoError(t, err)
	return uint16(n)
}

// TestSOCKS5BadInput sends malformed and unsupported requests and checks
// the exact bytes of the answer; after each, the server still serves.
func TestSOCKS5BadInput(t *testing.T) {
	echo := startEchoServer(t)
	closed := portOf(t, closedPort(t))
	fail := func(rep byte) []byte { return []byte{5, rep, 0, 1, 0, 0, 0, 0, 0, 0} }
	noAuth := []byte{5, 1, 0}
	ok := []byte{5, 0}
	cat := func(bs ...[]byte) []byte { return bytes.Join(bs, nil) }
	creds := map[string]string{"alice": "s3cret"}
	for _, tc := range []struct {
		name  string
		creds map[string]string
		in    []byte
		want  []byte
	}{
		{"no methods", nil, []byte{5, 0}, []byte{5, 0xff}},
		{"only GSSAPI offered", nil, []byte{5, 1, 1}, []byte{5, 0xff}},
		{"truncated greeting", nil, []byte{5, 3, 0}, []byte{}},
		{"BIND", nil, cat(noAuth, []byte{5, 2, 0, 1, 127, 0, 0, 1, 0, 80}), cat(ok, fail(7))},
		{"UDP ASSOCIATE", nil, cat(noAuth, []byte{5, 3, 0, 1, 0, 0, 0, 0, 0, 0}), cat(ok, fail(7))},
		{"unknown command", nil, cat(noAuth, []byte{5, 9, 0, 1, 127, 0, 0, 1, 0, 80}), cat(ok, fail(7))},
		{"unknown address type", nil, cat(noAuth, []byte{5, 1, 0, 5, 127, 0, 0, 1, 0, 80}), cat(ok, fail(8))},
		{"request version 4", nil, cat(noAuth, []byte{4, 1, 0, 1, 127, 0, 0, 1, 0, 80}), cat(ok, fail(1))},
		{"empty domain", nil, cat(noAuth, []byte{5, 1, 0, 3, 0, 0, 80}), cat(ok, fail(1))},
		{"domain with space", nil, cat(noAuth, []byte{5, 1, 0, 3, 3, 'a', ' ', 'b', 0, 80}), cat(ok, fail(1))},
		{"port 0", nil, cat(noAuth, socks5Connect([4]byte{127, 0, 0, 1}, 0)), cat(ok, fail(1))},
		{"domain port 0", nil, cat(noAuth, []byte{5, 1, 0, 3, 9}, []byte("localhost"), []byte{0, 0}), cat(ok, fail(1))},
		{"truncated request", nil, cat(noAuth, []byte{5, 1, 0, 1, 127}), ok},
		{"truncated domain", nil, cat(noAuth, []byte{5, 1, 0, 3, 10, 'a'}), ok},
		{"refused", nil, cat(noAuth, socks5Connect([4]byte{127, 0, 0, 1}, closed)), cat(ok, fail(5))},
		{"auth required, none offered", creds, noAuth, []byte{5, 0xff}},
		{"wrong password", creds, cat([]byte{5, 2, 0, 2}, []byte{1, 5}, []byte("alice"), []byte{4}, []byte("nope")), []byte{5, 2, 1, 1}},
		{"unknown user", creds, cat([]byte{5, 1, 2}, []byte{1, 3}, []byte("bob"), []byte{6}, []byte("s3cret")), []byte{5, 2, 1, 1}},
		{"bad auth version", creds, cat([]byte{5, 1, 2}, []byte{5, 5}, []byte("alice"), []byte{6}, []byte("s3cret")), []byte{5, 2}},
		{"truncated auth", creds, cat([]byte{5, 1, 2}, []byte{1, 5}, []byte("ali")), []byte{5, 2}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := &Server{Credentials: tc.creds}
			addr := startServer(t, srv)
			got := rawExchange(t, addr, tc.in)
			require.Equal(t, tc.want, got)
			require.Equal(t, int64(1), srv.Stats().FailedHandshakes)

			// The server keeps serving.
			var auth []byte
			if tc.creds != nil {
				auth = cat([]byte{5, 1, 2}, []byte{1, 5}, []byte("alice"), []byte{6}, []byte("s3cret"))
			} else {
				auth = noAuth
			}
			c, err := net.Dial("tcp", addr)
			require.NoError(t, err)
			defer c.Close()
			_, err = c.Write(cat(auth, socks5Connect([4]byte{127, 0, 0, 1}, portOf(t, echo))))
			require.NoError(t, err)
			want := 2 + 10
			if tc.creds != nil {
				want += 2
			}
			reply := make([]byte, want)
			_, err = readFull(c, reply)
			require.NoError(t, err)
			require.Equal(t, byte(0), reply[want-9], "reply %x", reply)
			echoCheck(t, c, "still serving")
		})
	}
}

func readFull(c net.Conn, b []byte) (int, error) {
	n := 0
	for n < len(b) {
		m, err := c.Read(b[n:])
		n += m
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

func TestSOCKS5RequestParser(t *testing.T) {
	for _, tc := range []struct {
		in   []byte
		want string
	}{
		{[]byte{5, 1, 0, 1, 10, 1, 2, 3, 0x1f, 0x90}, "10.1.2.3:8080"},
		{append(append([]byte{5, 1, 0, 4}, net.ParseIP("2001:db8::1")...), 0, 80), "[2001:db8::1]:80"},
		{append(append([]byte{5, 1, 0, 4}, net.ParseIP("::ffff:1.2.3.4")...), 0, 80), "[::ffff:1.2.3.4]:80"},
		{append([]byte{5, 1, 0, 3, 11}, "example.org\x01\xbb"...), "example.org:443"},
		{append([]byte{5, 1, 0, 3, 3}, "::1\x00\x16"...), "[::1]:22"},
	} {
		got, err := readSOCKS5Request(bytes.NewReader(tc.in))
		require.NoError(t, err)
		require.Equal(t, tc.want, got)
	}
}

func TestChooseSOCKS5Method(t *testing.T) {
	for _, tc := range []struct {
		offered []byte
		auth    bool
		want    byte
	}{
		{[]byte{0}, false, 0},
		{[]byte{2, 0}, false, 0},
		{[]byte{2}, false, 2},
		{[]byte{1}, false, 0xff},
		{nil, false, 0xff},
		{[]byte{0, 2}, true, 2},
		{[]byte{0}, true, 0xff},
		{[]byte{0x80, 1, 2}, true, 2},
	} {
		require.Equal(t, tc.want, chooseSOCKS5Method(tc.offered, tc.auth), "offered %x auth %v", tc.offered, tc.auth)
	}
}

// FuzzSOCKS5Request feeds arbitrary bytes to the SOCKS5 parsers: they must
// not panic, and an accepted request must name a valid host:port.
func FuzzSOCKS5Request(f *testing.F) {
	f.Add([]byte{5, 1, 0, 5, 1, 0, 1, 127, 0, 0, 1, 0, 80})
	f.Add([]byte{5, 2, 0, 2, 1, 1, 'u', 1, 'p', 5, 1, 0, 3, 9, 'l', 'o', 'c', 'a', 'l', 'h', 'o', 's', 't', 0, 80})
	f.Add(append(append([]byte{5, 1, 0, 5, 1, 0, 4}, net.IPv6loopback...), 1, 0))
	f.Add([]byte{5, 1, 0, 5, 2, 0, 1, 0, 0, 0, 0, 0, 0})
	f.Add([]byte{5, 1, 0, 5, 1, 0, 9})
	f.Add([]byte{5, 0})
	f.Fuzz(func(t *testing.T, in []byte) {
		r := bytes.NewReader(in)
		methods, err := readSOCKS5Greeting(r)
		if err != nil {
			return
		}
		if chooseSOCKS5Method(methods, true) == socks5AuthUserPass {
			if _, _, err := readSOCKS5UserPass(r); err != nil {
				return
			}
		}
		addr, err := readSOCKS5Request(r)
		if err != nil {
			return
		}
		host, port, err := net.SplitHostPort(addr)
		if err != nil {
			t.Fatalf("accepted %q: %v", addr, err)
		}
		if _, err := strconv.ParseUint(port, 10, 16); err != nil || host == "" {
			t.Fatalf("accepted %q", addr)
		}
	})
}
