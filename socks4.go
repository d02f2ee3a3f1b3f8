package hpcproxy

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
)

// SOCKS4 and SOCKS4a wire constants.
const (
	socks4Version    = 0x04
	socks4CmdConnect = 0x01
	socks4CmdBind    = 0x02

	socks4ReplyVersion = 0x00
	socks4Granted      = 0x5a
	socks4Rejected     = 0x5b

	// Limits on the NUL-terminated fields.
	socks4MaxUserID = 512
	socks4MaxHost   = 255
)

// socks4Request is a parsed SOCKS4 or SOCKS4a request.
type socks4Request struct {
	addr   string // "host:port"; host unresolved for SOCKS4a
	userID string
}

func socks4Refuse(format string, args ...any) error {
	return &socksRequestError{reply: socks4Rejected, msg: "socks4: " + fmt.Sprintf(format, args...)}
}

// readSOCKS4Request reads a SOCKS4 CONNECT request, or a SOCKS4a one (IP
// 0.0.0.x, x != 0, followed by a host name). Requests the server refuses
// (BIND, malformed fields) yield a *socksRequestError with code 0x5b.
func readSOCKS4Request(r *bufio.Reader) (socks4Request, error) {
	var req socks4Request
	var hdr [8]byte // VN CD DSTPORT DSTIP
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return req, fmt.Errorf("hpcproxy: socks4: read request: %w", err)
	}
	if hdr[0] != socks4Version {
		return req, socks4Refuse("request has version %d", hdr[0])
	}
	user, err := readNulString(r, socks4MaxUserID, "user id")
	if err != nil {
		return req, err
	}
	req.userID = user
	switch hdr[1] {
	case socks4CmdConnect:
	case socks4CmdBind:
		return req, socks4Refuse("BIND is not supported")
	default:
		return req, socks4Refuse("unknown command %#x", hdr[1])
	}
	if binary.BigEndian.Uint16(hdr[2:4]) == 0 {
		return req, socks4Refuse("port 0 is not a destination")
	}
	port := strconv.Itoa(int(binary.BigEndian.Uint16(hdr[2:4])))
	ip := netip.AddrFrom4([4]byte(hdr[4:8]))
	if hdr[4] == 0 && hdr[5] == 0 && hdr[6] == 0 && hdr[7] != 0 {
		host, err := readNulString(r, socks4MaxHost, "host name")
		if err != nil {
			return req, err
		}
		if err := checkHostName([]byte(host)); err != nil {
			return req, socks4Refuse("%v", err)
		}
		req.addr = net.JoinHostPort(host, port)
		return req, nil
	}
	req.addr = net.JoinHostPort(ip.String(), port)
	return req, nil
}

// readNulString reads a NUL-terminated field of at most max bytes.
func readNulString(r *bufio.Reader, max int, what string) (string, error) {
	var b []byte
	for {
		c, err := r.ReadByte()
		if err != nil {
			return "", fmt.Errorf("hpcproxy: socks4: read %s: %w", what, err)
		}
		if c == 0 {
			return string(b), nil
		}
		if len(b) == max {
			return "", socks4Refuse("%s longer than %d bytes", what, max)
		}
		b = append(b, c)
	}
}

// serveSOCKS4 serves a SOCKS4/4a CONNECT. With credentials required, the
// user ID must be a password (a token) or "user:password".
func (ss *session) serveSOCKS4() error {
	reject := []byte{socks4ReplyVersion, socks4Rejected, 0, 0, 0, 0, 0, 0}
	req, err := readSOCKS4Request(ss.c.br)
	if err != nil {
		if _, ok := err.(*socksRequestError); ok {
			ss.writeReply(reject)
		}
		return ss.fail(err)
	}
	if !ss.trusted && !ss.srv.checkToken(req.userID) {
		ss.writeReply(reject)
		return ss.fail(fmt.Errorf("hpcproxy: socks4: user id is not a valid token"))
	}
	ss.authenticated()
	granted := []byte{socks4ReplyVersion, socks4Granted, 0, 0, 0, 0, 0, 0}
	dst, err := ss.dialOrHandoff(req.addr, granted)
	if err != nil {
		ss.logDialError(req.addr, classifyDialError(err), err)
		ss.writeReply(reject)
		return ss.fail(err)
	}
	if dst == nil {
		return nil // handed off
	}
	if _, err := ss.c.io.Write(granted); err != nil {
		ss.release(dst)
		return ss.fail(fmt.Errorf("hpcproxy: socks4: write reply: %w", err))
	}
	return ss.startRelay(dst)
}
