package hpcproxy

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
)

// SOCKS5 wire constants (RFC 1928, RFC 1929).
const (
	socks5Version = 0x05

	socks5AuthNone         = 0x00
	socks5AuthUserPass     = 0x02
	socks5AuthNoAcceptable = 0xff

	socks5UserPassVersion = 0x01
	socks5UserPassOK      = 0x00
	socks5UserPassFailed  = 0x01

	socks5CmdConnect      = 0x01
	socks5CmdBind         = 0x02
	socks5CmdUDPAssociate = 0x03

	socks5AddrIPv4   = 0x01
	socks5AddrDomain = 0x03
	socks5AddrIPv6   = 0x04
)

// socks5Reply is the REP field of a SOCKS5 reply.
type socks5Reply byte

const (
	socks5Succeeded           socks5Reply = 0x00
	socks5GeneralFailure      socks5Reply = 0x01
	socks5NotAllowed          socks5Reply = 0x02
	socks5NetworkUnreachable  socks5Reply = 0x03
	socks5HostUnreachable     socks5Reply = 0x04
	socks5ConnectionRefused   socks5Reply = 0x05
	socks5TTLExpired          socks5Reply = 0x06
	socks5CommandNotSupported socks5Reply = 0x07
	socks5AddrNotSupported    socks5Reply = 0x08
)

// socksRequestError is a request the server refuses before dialling, with
// the reply code the client gets.
type socksRequestError struct {
	reply byte // SOCKS5 REP, or SOCKS4 CD
	msg   string
}

func (e *socksRequestError) Error() string { return "hpcproxy: " + e.msg }

func socks5Refuse(r socks5Reply, format string, args ...any) error {
	return &socksRequestError{reply: byte(r), msg: "socks5: " + fmt.Sprintf(format, args...)}
}

// readSOCKS5Greeting reads the client's version identifier/method
// selection message and returns the methods it offers.
func readSOCKS5Greeting(r io.Reader) ([]byte, error) {
	var hdr [2]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, fmt.Errorf("hpcproxy: socks5: read greeting: %w", err)
	}
	if hdr[0] != socks5Version {
		return nil, fmt.Errorf("hpcproxy: socks5: greeting has version %d", hdr[0])
	}
	methods := make([]byte, hdr[1])
	if _, err := io.ReadFull(r, methods); err != nil {
		return nil, fmt.Errorf("hpcproxy: socks5: read methods: %w", err)
	}
	return methods, nil
}

// chooseSOCKS5Method picks the method to use among those offered:
// username/password when credentials are required, else no authentication
// if offered, else username/password (whose credentials are then not
// checked), else none acceptable.
func chooseSOCKS5Method(offered []byte, authRequired bool) byte {
	none := bytes.IndexByte(offered, socks5AuthNone) >= 0
	userPass := bytes.IndexByte(offered, socks5AuthUserPass) >= 0
	switch {
	case authRequired && userPass:
		return socks5AuthUserPass
	case authRequired:
		return socks5AuthNoAcceptable
	case none:
		return socks5AuthNone
	case userPass:
		return socks5AuthUserPass
	}
	return socks5AuthNoAcceptable
}

// readSOCKS5UserPass reads an RFC 1929 username/password request.
func readSOCKS5UserPass(r io.Reader) (user, pass string, err error) {
	var hdr [2]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return "", "", fmt.Errorf("hpcproxy: socks5: read username/password: %w", err)
	}
	if hdr[0] != socks5UserPassVersion {
		return "", "", fmt.Errorf("hpcproxy: socks5: username/password version %d, want 1", hdr[0])
	}
	u := make([]byte, int(hdr[1])+1) // the name and PLEN
	if _, err := io.ReadFull(r, u); err != nil {
		return "", "", fmt.Errorf("hpcproxy: socks5: read username: %w", err)
	}
	p := make([]byte, u[len(u)-1])
	if _, err := io.ReadFull(r, p); err != nil {
		return "", "", fmt.Errorf("hpcproxy: socks5: read password: %w", err)
	}
	return string(u[:len(u)-1]), string(p), nil
}

// readSOCKS5Request reads a SOCKS5 request and returns its destination as
// "host:port", the host unresolved when the client sent a name. A request
// the server cannot serve yields a *socksRequestError carrying the reply
// code: 0x07 for BIND, UDP ASSOCIATE and unknown commands, 0x08 for
// unknown address types, 0x01 for malformed fields and port 0.
func readSOCKS5Request(r io.Reader) (string, error) {
	var hdr [4]byte // VER CMD RSV ATYP
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return "", fmt.Errorf("hpcproxy: socks5: read request: %w", err)
	}
	if hdr[0] != socks5Version {
		return "", socks5Refuse(socks5GeneralFailure, "request has version %d", hdr[0])
	}
	switch hdr[1] {
	case socks5CmdConnect:
	case socks5CmdBind:
		return "", socks5Refuse(socks5CommandNotSupported, "BIND is not supported")
	case socks5CmdUDPAssociate:
		return "", socks5Refuse(socks5CommandNotSupported, "UDP ASSOCIATE is not supported")
	default:
		return "", socks5Refuse(socks5CommandNotSupported, "unknown command %#x", hdr[1])
	}
	var host string
	switch hdr[3] {
	case socks5AddrIPv4:
		var a [4]byte
		if _, err := io.ReadFull(r, a[:]); err != nil {
			return "", fmt.Errorf("hpcproxy: socks5: read address: %w", err)
		}
		host = netip.AddrFrom4(a).String()
	case socks5AddrIPv6:
		var a [16]byte
		if _, err := io.ReadFull(r, a[:]); err != nil {
			return "", fmt.Errorf("hpcproxy: socks5: read address: %w", err)
		}
		host = netip.AddrFrom16(a).String()
	case socks5AddrDomain:
		var n [1]byte
		if _, err := io.ReadFull(r, n[:]); err != nil {
			return "", fmt.Errorf("hpcproxy: socks5: read name: %w", err)
		}
		name := make([]byte, n[0])
		if _, err := io.ReadFull(r, name); err != nil {
			return "", fmt.Errorf("hpcproxy: socks5: read name: %w", err)
		}
		if err := checkHostName(name); err != nil {
			return "", socks5Refuse(socks5GeneralFailure, "%v", err)
		}
		host = string(name)
	default:
		return "", socks5Refuse(socks5AddrNotSupported, "unknown address type %#x", hdr[3])
	}
	var port [2]byte
	if _, err := io.ReadFull(r, port[:]); err != nil {
		return "", fmt.Errorf("hpcproxy: socks5: read port: %w", err)
	}
	p := binary.BigEndian.Uint16(port[:])
	if p == 0 {
		return "", socks5Refuse(socks5GeneralFailure, "port 0 is not a destination")
	}
	return net.JoinHostPort(host, strconv.Itoa(int(p))), nil
}

// checkHostName rejects names that are empty or hold bytes no host name
// has (controls, spaces, and the delimiters of URLs and host:port).
func checkHostName(name []byte) error {
	if len(name) == 0 {
		return errors.New("empty host name")
	}
	for _, b := range name {
		if b <= ' ' || b >= 0x7f || b == '/' || b == '\\' || b == '@' || b == '[' || b == ']' {
			return fmt.Errorf("invalid host name %q", name)
		}
	}
	return nil
}

// appendSOCKS5Reply appends a reply with code rep and bound address bind
// (0.0.0.0:0 when bind is not a TCP address, as for SSH channels).
func appendSOCKS5Reply(b []byte, rep socks5Reply, bind net.Addr) []byte {
	b = append(b, socks5Version, byte(rep), 0)
	ap := netip.AddrPortFrom(netip.IPv4Unspecified(), 0)
	if ta, ok := bind.(*net.TCPAddr); ok && ta != nil {
		if a, ok := netip.AddrFromSlice(ta.IP); ok {
			ap = netip.AddrPortFrom(a.Unmap(), uint16(ta.Port))
		}
	}
	if ap.Addr().Is4() {
		b = append(b, socks5AddrIPv4)
	} else {
		b = append(b, socks5AddrIPv6)
	}
	b = append(b, ap.Addr().AsSlice()...)
	return binary.BigEndian.AppendUint16(b, ap.Port())
}

// socks5ReplyFor maps a dial failure to its SOCKS5 reply code.
func socks5ReplyFor(f dialFailure) socks5Reply {
	switch f {
	case failRefused:
		return socks5ConnectionRefused
	case failNetUnreachable:
		return socks5NetworkUnreachable
	case failHostUnreachable:
		return socks5HostUnreachable
	case failTimeout:
		return socks5TTLExpired
	case failProhibited:
		return socks5NotAllowed
	}
	return socks5GeneralFailure
}

// serveSOCKS5 runs the SOCKS5 handshake and then the relay.
func (ss *session) serveSOCKS5() error {
	br, w := ss.c.br, ss.c.io
	methods, err := readSOCKS5Greeting(br)
	if err != nil {
		return ss.fail(err)
	}
	method := chooseSOCKS5Method(methods, !ss.trusted)
	if _, err := w.Write([]byte{socks5Version, method}); err != nil {
		return ss.fail(fmt.Errorf("hpcproxy: socks5: write method: %w", err))
	}
	switch method {
	case socks5AuthNoAcceptable:
		return ss.fail(fmt.Errorf("hpcproxy: socks5: no acceptable auth method among %x", methods))
	case socks5AuthUserPass:
		user, pass, err := readSOCKS5UserPass(br)
		if err != nil {
			return ss.fail(err)
		}
		ok := ss.trusted || ss.srv.checkPassword(user, pass)
		status := byte(socks5UserPassOK)
		if !ok {
			status = socks5UserPassFailed
		}
		if _, err := w.Write([]byte{socks5UserPassVersion, status}); err != nil {
			return ss.fail(fmt.Errorf("hpcproxy: socks5: write auth status: %w", err))
		}
		if !ok {
			return ss.fail(fmt.Errorf("hpcproxy: socks5: authentication failed for user %q", user))
		}
		ss.authenticated()
	}
	addr, err := readSOCKS5Request(br)
	if err != nil {
		var re *socksRequestError
		if errors.As(err, &re) {
			ss.writeReply(appendSOCKS5Reply(nil, socks5Reply(re.reply), nil))
		}
		return ss.fail(err)
	}
	dst, err := ss.dialOrHandoff(addr, appendSOCKS5Reply(nil, socks5Succeeded, nil))
	if err != nil {
		f := classifyDialError(err)
		ss.logDialError(addr, f, err)
		ss.writeReply(appendSOCKS5Reply(nil, socks5ReplyFor(f), nil))
		return ss.fail(err)
	}
	if dst == nil {
		return nil // handed off
	}
	if _, err := w.Write(appendSOCKS5Reply(nil, socks5Succeeded, dst.LocalAddr())); err != nil {
		ss.release(dst)
		return ss.fail(fmt.Errorf("hpcproxy: socks5: write reply: %w", err))
	}
	return ss.startRelay(dst)
}
