package hpcproxy

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// muxPacket frames fields as the master sends them: a length, then the
// body.
func muxPacket(fields ...any) []byte {
	var b muxBuf
	for _, f := range fields {
		switch v := f.(type) {
		case uint32:
			b.u32(v)
		case string:
			b.str(v)
		}
	}
	var w bytes.Buffer
	_ = b.send(&w)
	return w.Bytes()
}

func TestParseMuxReply(t *testing.T) {
	for _, tc := range []struct {
		name    string
		pkt     []byte
		port    uint32
		errIs   error
		errText string
	}{
		{name: "ok", pkt: muxPacket(uint32(muxSOK), uint32(1))},
		{name: "remote port", pkt: muxPacket(uint32(muxSRemotePort), uint32(1), uint32(40123)), port: 40123},
		{name: "denied", pkt: muxPacket(uint32(muxSPermissionDenied), uint32(1), "no way"), errIs: ErrProhibited, errText: "no way"},
		{name: "failure", pkt: muxPacket(uint32(muxSFailure), uint32(1), "port in use"), errIs: ErrProhibited, errText: "port in use"},
		{name: "other request", pkt: muxPacket(uint32(muxSOK), uint32(2)), errText: "want 1"},
		{name: "short port", pkt: muxPacket(uint32(muxSRemotePort), uint32(1)), errText: "short remote port"},
		{name: "unknown", pkt: muxPacket(uint32(0x80000099), uint32(1)), errText: "unexpected reply"},
		{name: "empty", pkt: muxPacket(), errText: "want 1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			msg, err := muxRead(bytes.NewReader(tc.pkt))
			require.NoError(t, err)
			r, err := parseMuxReply(msg, 1)
			if tc.errText == "" {
				require.NoError(t, err)
				assert.Equal(t, tc.port, r.port)
				return
			}
			require.Error(t, err)
			assert.Contains(t, err.Error(), tc.errText)
			if tc.errIs != nil {
				assert.ErrorIs(t, err, tc.errIs)
			}
		})
	}
}

func TestMuxRead(t *testing.T) {
	// Over the size limit: refused before anything is allocated.
	_, err := muxRead(bytes.NewReader(binary.BigEndian.AppendUint32(nil, 256<<10+1)))
	assert.ErrorContains(t, err, "packet of")
	// Cut short: in the header, and in the body.
	_, err = muxRead(bytes.NewReader([]byte{0, 0}))
	assert.ErrorIs(t, err, io.ErrUnexpectedEOF)
	_, err = muxRead(bytes.NewReader([]byte{0, 0, 0, 8, 1, 2}))
	assert.ErrorIs(t, err, io.ErrUnexpectedEOF)
	// A string longer than what is left is refused.
	m := muxMsg(binary.BigEndian.AppendUint32(nil, 5))
	m = append(m, "abc"...)
	_, ok := m.str()
	assert.False(t, ok)
}

// FuzzMuxReply feeds arbitrary bytes from "the master" to the packet
// reader, the field readers and the reply parser: none may panic, read
// past the packet, or report success for a reply that is not one.
func FuzzMuxReply(f *testing.F) {
	f.Add(muxPacket(uint32(muxSOK), uint32(1)))
	f.Add(muxPacket(uint32(muxSRemotePort), uint32(1), uint32(40123)))
	f.Add(muxPacket(uint32(muxSPermissionDenied), uint32(1), "Permission denied"))
	f.Add(muxPacket(uint32(muxMsgHello), uint32(muxVersion)))
	f.Add([]byte{0, 0, 0, 4, 0x80, 0, 0, 1})
	f.Add([]byte{0xff, 0xff, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, b []byte) {
		msg, err := muxRead(bytes.NewReader(b))
		if err != nil {
			return
		}
		if len(b) < 4 || int(binary.BigEndian.Uint32(b)) != len(msg) || len(msg) > 256<<10 {
			t.Fatalf("packet of %d bytes from %d input bytes", len(msg), len(b))
		}
		fields := msg
		for len(fields) > 0 {
			before := len(fields)
			s, ok := fields.str()
			if !ok {
				if len(fields) != before && len(fields) != before-4 {
					t.Fatalf("failed str consumed %d bytes", before-len(fields))
				}
				break
			}
			if len(fields) != before-4-len(s) {
				t.Fatalf("str of %d bytes consumed %d", len(s), before-len(fields))
			}
		}
		r, err := parseMuxReply(msg, 1)
		if err != nil {
			if errors.Is(err, ErrProhibited) && binary.BigEndian.Uint32(msg) != muxSPermissionDenied &&
				binary.BigEndian.Uint32(msg) != muxSFailure {
				t.Fatalf("ErrProhibited for reply type %#x", binary.BigEndian.Uint32(msg))
			}
			return
		}
		typ := binary.BigEndian.Uint32(msg)
		if id := binary.BigEndian.Uint32(msg[4:]); id != 1 {
			t.Fatalf("accepted a reply to request %d", id)
		}
		switch {
		case typ == muxSOK && r.port == 0:
		case typ == muxSRemotePort && r.port == binary.BigEndian.Uint32(msg[8:]):
		default:
			t.Fatalf("accepted reply type %#x as %+v", typ, r)
		}
	})
}

// TestDialUnixFullBacklog fills a unix listener's backlog, as a burst of
// connections does to an OpenSSH master's control socket (backlog 64)
// while ssh is busy: a plain dial then fails at once with EAGAIN, and
// dialUnix waits until the listener accepts one, or its context ends.
func TestDialUnixFullBacklog(t *testing.T) {
	path := filepath.Join(t.TempDir(), "ctl.sock")
	lfd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	require.NoError(t, err)
	defer unix.Close(lfd)
	require.NoError(t, unix.Bind(lfd, &unix.SockaddrUnix{Name: path}))
	require.NoError(t, unix.Listen(lfd, 1))
	var queued []net.Conn
	defer func() {
		for _, c := range queued {
			c.Close()
		}
	}()
	var d net.Dialer
	for {
		c, err := d.DialContext(t.Context(), "unix", path)
		if err != nil {
			require.ErrorIs(t, err, syscall.EAGAIN, "a full backlog")
			break
		}
		queued = append(queued, c)
		require.Less(t, len(queued), 100, "the backlog never filled")
	}

	// Its context ends while the backlog stays full.
	ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
	defer cancel()
	_, err = dialUnix(ctx, path)
	require.ErrorIs(t, err, syscall.EAGAIN)
	assert.Contains(t, err.Error(), "backlog stayed full")

	// The listener takes one: the waiting dial gets through.
	got := make(chan error, 1)
	go func() {
		c, err := dialUnix(t.Context(), path)
		if err == nil {
			c.Close()
		}
		got <- err
	}()
	select {
	case err := <-got:
		t.Fatalf("dialUnix returned %v while the backlog was full", err)
	case <-time.After(100 * time.Millisecond):
	}
	nfd, _, err := unix.Accept4(lfd, unix.SOCK_CLOEXEC)
	require.NoError(t, err)
	unix.Close(nfd)
	select {
	case err := <-got:
		require.NoError(t, err)
	case <-time.After(5 * time.Second):
		t.Fatal("dialUnix did not get through once there was room")
	}
}
