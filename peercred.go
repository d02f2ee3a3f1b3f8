package hpcproxy

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"syscall"
	"unsafe"
)

// Peer credentials over loopback TCP
//
// A per-job proxy listens on 127.0.0.1 of a compute node that other users'
// jobs may share. Tools that cannot send proxy credentials (some do not
// take userinfo in proxy URLs) still get in for their owner: the kernel
// records which UID created every TCP socket, and on loopback both ends of
// a connection are in the same table, /proc/net/tcp and /proc/net/tcp6 of
// the network namespace. loopbackPeerUID finds the client's socket there
// (its local address is our peer's address and its remote address is
// ours; netlink sock_diag looks it up directly, /proc/net/tcp{,6} is the
// fallback) and returns its owner. Sockets of processes in other network
// namespaces, or of other hosts, are never found: those peers must
// present the token. Over a unix socket the kernel hands over the peer's
// credentials directly (SO_PEERCRED; unixPeerUID).

// errPeerNotFound is returned by loopbackPeerUID when no socket in the
// kernel's tables matches the connection (it was closed meanwhile, or the
// peer is in another network namespace).
var errPeerNotFound = errors.New("hpcproxy: loopback peer socket not found")

// errNotLoopback is returned by loopbackPeerUID for a connection whose
// peer is not a loopback TCP address.
var errNotLoopback = errors.New("hpcproxy: peer is not on loopback")

// procNetTCPFiles are searched for the peer's socket.
var procNetTCPFiles = []string{"/proc/net/tcp", "/proc/net/tcp6"}

// loopbackPeerUID returns the UID owning the client end of c, a TCP
// connection accepted from a loopback address of this host. It asks the
// kernel for exactly that socket over netlink (sock_diag, as ss(8) does),
// and, where netlink is unavailable, scans /proc/net/tcp and
// /proc/net/tcp6, whose cost grows with the number of TCP sockets on the
// node. Use it once per connection, only when no credentials were given.
func loopbackPeerUID(c net.Conn) (int, error) {
	peer, err := addrPortOf(c.RemoteAddr())
	if err != nil {
		return -1, err
	}
	self, err := addrPortOf(c.LocalAddr())
	if err != nil {
		return -1, err
	}
	if !peer.Addr().IsLoopback() {
		return -1, fmt.Errorf("%w: %v", errNotLoopback, peer)
	}
	uid, err := sockDiagUID(peer, self)
	if err == nil || errors.Is(err, errPeerNotFound) {
		return uid, err
	}
	return procNetUID(peer, self)
}

// procNetUID finds the socket whose local address is peer and remote
// address is self in /proc/net/tcp{,6}.
func procNetUID(peer, self netip.AddrPort) (int, error) {
	// Only lines whose local port is the peer's are parsed.
	portTag := []byte(fmt.Sprintf(":%04X ", peer.Port()))
	for _, name := range procNetTCPFiles {
		f, err := os.Open(name)
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				continue // no IPv6
			}
			return -1, fmt.Errorf("hpcproxy: peer credentials: %w", err)
		}
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			line := sc.Bytes()
			if !bytes.Contains(line, portTag) {
				continue
			}
			e, ok, err := parseProcNetLine(line, binary.NativeEndian)
			if err != nil || !ok {
				continue
			}
			if e.Local == peer && e.Remote == self {
				f.Close()
				return e.UID, nil
			}
		}
		err = sc.Err()
		f.Close()
		if err != nil {
			return -1, fmt.Errorf("hpcproxy: peer credentials: %s: %w", name, err)
		}
	}
	return -1, fmt.Errorf("%w: %v", errPeerNotFound, peer)
}

// sameUserConn reports whether c's peer runs as this process's UID: for a
// unix socket connection (*net.UnixConn) the UID the kernel recorded when
// the peer connected ([unixPeerUID]), for TCP a loopback socket owned by
// that UID ([loopbackPeerUID]). Any failure to tell answers false. Its
// signature suits a server's "trust this connection without credentials"
// hook and a forward's AllowConn.
func sameUserConn(c net.Conn) bool {
	var uid int
	var err error
	if uc, ok := c.(*net.UnixConn); ok {
		uid, err = unixPeerUID(uc)
	} else {
		uid, err = loopbackPeerUID(c)
	}
	return err == nil && uid == selfUID()
}

// selfUID is os.Getuid, which is a system call each time: a daemon asks
// for every connection.
var selfUID = sync.OnceValue(os.Getuid)

// unixPeerUID returns the UID of the process at the other end of c, a
// unix socket connection, as the kernel recorded it when the connection
// was made (SO_PEERCRED).
func unixPeerUID(c *net.UnixConn) (int, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return -1, fmt.Errorf("hpcproxy: peer credentials: %w", err)
	}
	var cred *syscall.Ucred
	var serr error
	if err := rc.Control(func(fd uintptr) {
		cred, serr = syscall.GetsockoptUcred(int(fd), syscall.SOL_SOCKET, syscall.SO_PEERCRED)
	}); err != nil {
		return -1, fmt.Errorf("hpcproxy: peer credentials: %w", err)
	}
	if serr != nil {
		return -1, fmt.Errorf("hpcproxy: peer credentials: SO_PEERCRED: %w", serr)
	}
	return int(cred.Uid), nil
}

func addrPortOf(a net.Addr) (netip.AddrPort, error) {
	if ta, ok := a.(*net.TCPAddr); ok {
		ap := ta.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), nil
	}
	if a == nil {
		return netip.AddrPort{}, fmt.Errorf("%w: no address", errNotLoopback)
	}
	ap, err := netip.ParseAddrPort(a.String())
	if err != nil || a.Network() != "tcp" {
		return netip.AddrPort{}, fmt.Errorf("%w: %s address %q", errNotLoopback, a.Network(), a.String())
	}
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), nil
}

// procNetEntry is one socket of /proc/net/tcp{,6}. Addresses are unmapped
// (an IPv4-mapped IPv6 address appears as IPv4).
type procNetEntry struct {
	Local, Remote netip.AddrPort
	State         uint8
	UID           int
	Inode         uint64
}

// parseProcNetTCP parses the text of /proc/net/tcp or /proc/net/tcp6:
//
//	sl  local_address rem_address   st tx_queue:rx_queue tr:tm->when retrnsmt   uid  timeout inode ...
//	0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 12345 ...
//
// Addresses are hex dumps of 32-bit words in the kernel's byte order
// (order: binary.NativeEndian on the running machine), ports are hex in
// host order. The header line is skipped; a malformed line is an error.
func parseProcNetTCP(b []byte, order binary.ByteOrder) ([]procNetEntry, error) {
	var out []procNetEntry
	for n, line := range bytes.Split(b, []byte("\n")) {
		e, ok, err := parseProcNetLine(line, order)
		if err != nil {
			return nil, fmt.Errorf("line %d: %w", n+1, err)
		}
		if ok {
			out = append(out, e)
		}
	}
	return out, nil
}

// parseProcNetLine parses one line; ok is false for blank and header lines.
func parseProcNetLine(line []byte, order binary.ByteOrder) (e procNetEntry, ok bool, err error) {
	f := bytes.Fields(line)
	if len(f) == 0 || string(f[0]) == "sl" {
		return e, false, nil
	}
	if len(f) < 10 {
		return e, false, fmt.Errorf("%d fields, want at least 10", len(f))
	}
	if e.Local, err = parseProcNetAddr(f[1], order); err != nil {
		return e, false, fmt.Errorf("local address: %w", err)
	}
	if e.Remote, err = parseProcNetAddr(f[2], order); err != nil {
		return e, false, fmt.Errorf("remote address: %w", err)
	}
	st, err := strconv.ParseUint(string(f[3]), 16, 8)
	if err != nil {
		return e, false, fmt.Errorf("state: %w", err)
	}
	e.State = uint8(st)
	uid, err := strconv.ParseUint(string(f[7]), 10, 32)
	if err != nil {
		return e, false, fmt.Errorf("uid: %w", err)
	}
	e.UID = int(uid)
	if e.Inode, err = strconv.ParseUint(string(f[9]), 10, 64); err != nil {
		return e, false, fmt.Errorf("inode: %w", err)
	}
	return e, true, nil
}

// parseProcNetAddr parses "0100007F:1F90" (IPv4) or a 32-hex-digit IPv6
// address with its port.
func parseProcNetAddr(s []byte, order binary.ByteOrder) (netip.AddrPort, error) {
	i := bytes.IndexByte(s, ':')
	if i < 0 {
		return netip.AddrPort{}, errors.New("no port")
	}
	hexAddr, hexPort := s[:i], s[i+1:]
	if len(hexPort) != 4 {
		return netip.AddrPort{}, fmt.Errorf("bad port %q", hexPort)
	}
	port, err := strconv.ParseUint(string(hexPort), 16, 16)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("bad port %q", hexPort)
	}
	raw := make([]byte, hex.DecodedLen(len(hexAddr)))
	if _, err := hex.Decode(raw, hexAddr); err != nil {
		return netip.AddrPort{}, fmt.Errorf("bad address %q", hexAddr)
	}
	if len(raw) != 4 && len(raw) != 16 {
		return netip.AddrPort{}, fmt.Errorf("bad address length %d", len(hexAddr))
	}
	// Each 32-bit word was printed as a number ("%08X") in the kernel's
	// byte order; turn it back into network-order bytes.
	ip := make([]byte, len(raw))
	for w := 0; w < len(raw); w += 4 {
		order.PutUint32(ip[w:], binary.BigEndian.Uint32(raw[w:]))
	}
	a, _ := netip.AddrFromSlice(ip)
	return netip.AddrPortFrom(a.Unmap(), uint16(port)), nil
}

// sockDiagByFamily is SOCK_DIAG_BY_FAMILY from linux/sock_diag.h.
const sockDiagByFamily = 20

// sockDiagUID asks the kernel over netlink (NETLINK_SOCK_DIAG, an exact
// inet_diag lookup, no dump) for the TCP socket whose local address is
// peer and remote address is self, and returns its owner's UID. An IPv4
// peer is looked up as an AF_INET socket, then as an AF_INET6 socket with
// IPv4-mapped addresses (a dual-stack client).
func sockDiagUID(peer, self netip.AddrPort) (int, error) {
	diagSock.mu.Lock()
	defer diagSock.mu.Unlock()
	if !diagSock.open {
		fd, err := syscall.Socket(syscall.AF_NETLINK, syscall.SOCK_DGRAM|syscall.SOCK_CLOEXEC, syscall.NETLINK_INET_DIAG)
		if err != nil {
			return -1, fmt.Errorf("hpcproxy: sock_diag: %w", err)
		}
		tv := syscall.Timeval{Sec: 2}
		if err := syscall.SetsockoptTimeval(fd, syscall.SOL_SOCKET, syscall.SO_RCVTIMEO, &tv); err != nil {
			syscall.Close(fd)
			return -1, fmt.Errorf("hpcproxy: sock_diag: %w", err)
		}
		diagSock.fd, diagSock.open = fd, true
	}
	families := []uint8{syscall.AF_INET6}
	if peer.Addr().Is4() {
		families = []uint8{syscall.AF_INET, syscall.AF_INET6}
	}
	for _, fam := range families {
		diagSock.seq++
		uid, err := sockDiagQuery(diagSock.fd, diagSock.seq, fam, peer, self, &diagSock.msg, &diagSock.buf)
		if errors.Is(err, errPeerNotFound) {
			continue
		}
		if err != nil {
			// A socket in an unknown state (a reply may still come):
			// the next lookup opens a fresh one.
			syscall.Close(diagSock.fd)
			diagSock.open = false
		}
		return uid, err
	}
	return -1, fmt.Errorf("%w: %v", errPeerNotFound, peer)
}

// diagSock is the netlink socket that sockDiagUID asks through, opened at
// the first lookup and kept: a daemon looks up every loopback client that
// brings no credentials, and a socket per lookup cost three more system
// calls each. Replies are matched by sequence number, so one that comes
// late for an earlier query is skipped.
// The request and reply buffers are kept with it (under mu): a lookup per
// connection allocated 4 KiB of garbage before.
var diagSock struct {
	mu   sync.Mutex
	open bool
	fd   int
	seq  uint32
	msg  [72]byte
	buf  [4096]byte
}

func sockDiagQuery(fd int, seq uint32, family uint8, peer, self netip.AddrPort, msgBuf *[72]byte, rbuf *[4096]byte) (int, error) {
	ne := binary.NativeEndian
	// struct nlmsghdr (16 bytes) + struct inet_diag_req_v2 (56 bytes).
	msg := msgBuf[:]
	clear(msg)
	ne.PutUint32(msg[0:], uint32(len(msg)))
	ne.PutUint16(msg[4:], sockDiagByFamily)
	ne.PutUint16(msg[6:], syscall.NLM_F_REQUEST)
	ne.PutUint32(msg[8:], seq)
	req := msg[16:]
	req[0], req[1] = family, syscall.IPPROTO_TCP
	ne.PutUint32(req[4:], 0xffffffff) // idiag_states: any
	id := req[8:]                     // struct inet_diag_sockid, 48 bytes
	binary.BigEndian.PutUint16(id[0:], peer.Port())
	binary.BigEndian.PutUint16(id[2:], self.Port())
	putDiagAddr(id[4:20], family, peer.Addr())
	putDiagAddr(id[20:36], family, self.Addr())
	ne.PutUint32(id[40:], 0xffffffff) // INET_DIAG_NOCOOKIE
	ne.PutUint32(id[44:], 0xffffffff)

	// Raw system calls: the kernel answers within sendto, so neither call
	// blocks (rawio_linux.go says why the scheduler is kept out).
	kernel := syscall.RawSockaddrNetlink{Family: syscall.AF_NETLINK}
	for {
		_, _, errno := syscall.RawSyscall6(syscall.SYS_SENDTO, uintptr(fd), uintptr(unsafe.Pointer(&msg[0])), uintptr(len(msg)),
			0, uintptr(unsafe.Pointer(&kernel)), syscall.SizeofSockaddrNetlink)
		if errno == syscall.EINTR {
			continue
		}
		if errno != 0 {
			return -1, fmt.Errorf("hpcproxy: sock_diag: %w", errno)
		}
		break
	}
	buf := rbuf[:]
	for {
		r, _, errno := syscall.RawSyscall6(syscall.SYS_RECVFROM, uintptr(fd), uintptr(unsafe.Pointer(&buf[0])), uintptr(len(buf)), 0, 0, 0)
		if errno == syscall.EINTR {
			continue
		}
		if errno != 0 {
			return -1, fmt.Errorf("hpcproxy: sock_diag: %w", errno)
		}
		n := int(r)
		msgs, err := syscall.ParseNetlinkMessage(buf[:n])
		if err != nil {
			return -1, fmt.Errorf("hpcproxy: sock_diag: %w", err)
		}
		for _, m := range msgs {
			if m.Header.Seq != seq {
				continue
			}
			switch m.Header.Type {
			case syscall.NLMSG_ERROR:
				if len(m.Data) < 4 {
					return -1, errors.New("hpcproxy: sock_diag: short error message")
				}
				errno := syscall.Errno(-int32(ne.Uint32(m.Data)))
				if errno == syscall.ENOENT {
					return -1, fmt.Errorf("%w: %v", errPeerNotFound, peer)
				}
				return -1, fmt.Errorf("hpcproxy: sock_diag: %w", errno)
			case sockDiagByFamily:
				// struct inet_diag_msg: family, state, timer, retrans,
				// sockid (48 bytes), expires, rqueue, wqueue, uid, inode.
				d := m.Data
				if len(d) < 72 {
					return -1, errors.New("hpcproxy: sock_diag: short reply")
				}
				const tcpListen = 10
				if d[1] == tcpListen || binary.BigEndian.Uint16(d[4+2:]) != self.Port() {
					// The exact lookup falls back to listeners: a listener
					// on the peer's port is not the peer.
					return -1, fmt.Errorf("%w: %v", errPeerNotFound, peer)
				}
				return int(ne.Uint32(d[64:])), nil
			}
		}
	}
}

func putDiagAddr(dst []byte, family uint8, a netip.Addr) {
	if family == syscall.AF_INET {
		b := a.Unmap().As4()
		copy(dst, b[:])
		return
	}
	b := a.As16() // an IPv4 address becomes IPv4-mapped
	copy(dst, b[:])
}
