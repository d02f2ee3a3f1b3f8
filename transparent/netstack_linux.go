package transparent

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/link/fdbased"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
	"gvisor.dev/gvisor/pkg/waiter"
)

// The addresses inside the namespace. The TUN device has tunAddr in the
// fake range; the resolver the namespace's resolv.conf names is dnsAddr;
// fake addresses start at firstFake.
var (
	tunAddr   = netip.MustParseAddr("198.18.0.1")
	dnsAddr   = netip.MustParseAddr("198.18.0.2")
	firstFake = netip.MustParseAddr("198.18.0.16")
)

// tunMTU is the TUN device's MTU: far above Ethernet's, so that each
// packet the stack handles carries up to 64 KiB and the per-packet cost
// (a read, a checksum pass, a trip through the stack) is paid once per
// 64 KiB instead of once per 1.5 KiB. Nothing outside the namespace ever
// sees these packets.
const tunMTU = 65520

// netStack is the user-space TCP/IP stack on the parent's side of the TUN
// device: it accepts every TCP connection the command opens and dials it
// with dial; it answers DNS on dnsAddr port 53 (UDP and TCP) from dns.
type netStack struct {
	s    *stack.Stack
	dial func(ctx context.Context, dst string, fake bool) (net.Conn, error)
	dns  *FakeDNS
	log  *slog.Logger

	dialTimeout time.Duration

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu    sync.Mutex
	conns map[io.Closer]struct{}
}

func newNetStack(tunFD int, st *netStack) (*netStack, error) {
	st.ctx, st.cancel = context.WithCancel(context.Background())
	st.conns = map[io.Closer]struct{}{}
	s := stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, ipv6.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol},
	})
	st.s = s
	// The handlers before the NIC: its packet dispatcher, started by
	// CreateNIC, must find them in place (and the race detector must see
	// them made before it starts).
	fwd := tcp.NewForwarder(s, 0, 1024, st.handleTCP)
	s.SetTransportProtocolHandler(tcp.ProtocolNumber, fwd.HandlePacket)
	ufwd := udp.NewForwarder(s, st.handleUDP)
	s.SetTransportProtocolHandler(udp.ProtocolNumber, ufwd.HandlePacket)
	ep, err := fdbased.New(&fdbased.Options{
		FDs:                []int{tunFD},
		MTU:                tunMTU,
		RXChecksumOffload:  true, // the kernel made these packets: no need to check them again
		PacketDispatchMode: fdbased.Readv,
	})
	if err != nil {
		s.Close()
		return nil, fmt.Errorf("transparent: TUN endpoint: %w", err)
	}
	const nic = 1
	if e := s.CreateNIC(nic, ep); e != nil {
		s.Close()
		return nil, fmt.Errorf("transparent: create NIC: %s", e)
	}
	// Accept packets for every address and answer from every address: the
	// stack stands in for the whole network.
	if e := s.SetPromiscuousMode(nic, true); e != nil {
		s.Close()
		return nil, fmt.Errorf("transparent: promiscuous mode: %s", e)
	}
	if e := s.SetSpoofing(nic, true); e != nil {
		s.Close()
		return nil, fmt.Errorf("transparent: spoofing: %s", e)
	}
	s.SetRouteTable([]tcpip.Route{
		{Destination: header.IPv4EmptySubnet, NIC: nic},
		{Destination: header.IPv6EmptySubnet, NIC: nic},
	})
	// Buffers large enough for one stream to fill the tunnel: the
	// defaults (1 MiB receive, 4 MiB max) hold a fast local sender back.
	sack := tcpip.TCPSACKEnabled(true)
	_ = s.SetTransportProtocolOption(tcp.ProtocolNumber, &sack)
	rcv := tcpip.TCPReceiveBufferSizeRangeOption{Min: 4 << 10, Default: 1 << 20, Max: 8 << 20}
	_ = s.SetTransportProtocolOption(tcp.ProtocolNumber, &rcv)
	snd := tcpip.TCPSendBufferSizeRangeOption{Min: 4 << 10, Default: 1 << 20, Max: 8 << 20}
	_ = s.SetTransportProtocolOption(tcp.ProtocolNumber, &snd)
	mod := tcpip.TCPModerateReceiveBufferOption(true)
	_ = s.SetTransportProtocolOption(tcp.ProtocolNumber, &mod)

	return st, nil
}

// Close stops accepting, closes every connection and waits for their
// goroutines.
func (st *netStack) Close() {
	st.mu.Lock()
	st.cancel() // under mu: no goroutine is added after this (add)
	for c := range st.conns {
		_ = c.Close()
	}
	st.mu.Unlock()
	st.s.Close()
	st.wg.Wait()
	st.s.Wait()
}

// add counts a goroutine that Close must wait for, unless Close has
// begun: then it reports false and the goroutine must not start.
func (st *netStack) add() bool {
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.ctx.Err() != nil {
		return false
	}
	st.wg.Add(1)
	return true
}

func (st *netStack) track(c io.Closer) bool {
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.ctx.Err() != nil {
		return false
	}
	st.conns[c] = struct{}{}
	return true
}

func (st *netStack) untrack(c io.Closer) {
	st.mu.Lock()
	delete(st.conns, c)
	st.mu.Unlock()
}

func addrFrom(a tcpip.Address) netip.Addr {
	ip, _ := netip.AddrFromSlice(a.AsSlice())
	return ip
}

// handleTCP runs for each new connection (its SYN): it dials the
// destination first and completes the handshake only if that worked, so
// that a refused destination looks refused to the command (RST).
func (st *netStack) handleTCP(r *tcp.ForwarderRequest) {
	id := r.ID()
	dst := addrFrom(id.LocalAddress)
	port := id.LocalPort
	if dst == dnsAddr && port == 53 {
		if !st.add() {
			r.Complete(true)
			return
		}
		defer st.wg.Done()
		st.acceptTCP(r, st.serveDNSTCP)
		return
	}
	target := netip.AddrPortFrom(dst, port).String()
	fake := false
	if st.dns.Contains(dst) {
		name, ok := st.dns.Name(dst)
		if !ok {
			st.log.Debug("transparent: connection to an unmapped fake address refused", "dst", target)
			r.Complete(true)
			return
		}
		target, fake = net.JoinHostPort(name, strconv.Itoa(int(port))), true
	}
	// The forwarder already calls this in a goroutine of its own (one of
	// maxInFlight; retransmitted SYNs are ignored until Complete); the
	// dial goes on in one that Close waits for.
	if !st.add() {
		r.Complete(true)
		return
	}
	go func() {
		defer st.wg.Done()
		ctx, cancel := context.WithTimeout(st.ctx, st.dialTimeout)
		out, err := st.dial(ctx, target, fake)
		cancel()
		if err != nil {
			st.log.Info("transparent: dial failed", "dst", target, "err", err)
			r.Complete(true)
			return
		}
		st.log.Debug("transparent: connected", "dst", target)
		st.acceptTCP(r, func(in net.Conn) { relay(in, out) })
		// acceptTCP closes in; out is closed by relay, or here if the
		// handshake with the command failed.
		_ = out.Close()
	}()
}

// acceptTCP completes the handshake of r and runs serve with the
// connection, closing it after.
func (st *netStack) acceptTCP(r *tcp.ForwarderRequest, serve func(net.Conn)) {
	var wq waiter.Queue
	ep, e := r.CreateEndpoint(&wq)
	if e != nil {
		st.log.Debug("transparent: handshake with the command failed", "err", e)
		r.Complete(true)
		return
	}
	r.Complete(false)
	ep.SocketOptions().SetKeepAlive(true)
	c := gonet.NewTCPConn(&wq, ep)
	if !st.track(c) {
		_ = c.Close()
		return
	}
	defer st.untrack(c)
	defer c.Close()
	serve(c)
}

// relay copies both ways, half-closing each side when the other's input
// ends, and returns when both directions are done.
func relay(a, b net.Conn) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		copyHalf(b, a)
	}()
	copyHalf(a, b)
	<-done
	_ = a.Close()
	_ = b.Close()
}

type closeWriter interface{ CloseWrite() error }

// copyBufSize is the relay's buffer: a read can fill several of the
// stack's 64 KiB packets at once (io.Copy's 32 KiB is half of one), for
// fewer calls into the stack per byte.
const copyBufSize = 256 << 10

var copyBufs = sync.Pool{New: func() any { b := make([]byte, copyBufSize); return &b }}

func copyHalf(dst, src net.Conn) {
	bp := copyBufs.Get().(*[]byte)
	// Hide ReaderFrom/WriterTo: neither side has a fast path that beats a
	// large buffer here, and gonet's would use a small one.
	_, err := io.CopyBuffer(struct{ io.Writer }{dst}, struct{ io.Reader }{src}, *bp)
	copyBufs.Put(bp)
	if err == nil {
		// src's side is done sending: pass the half-close on. A dst
		// that cannot half-close stays open for the other direction
		// (relay closes it when that ends).
		if cw, ok := dst.(closeWriter); ok {
			_ = cw.CloseWrite()
		}
		return
	}
	// An error on one side: the connection is over both ways.
	_ = dst.Close()
	_ = src.Close()
}

// handleUDP answers DNS on dnsAddr:53; every other datagram is dropped
// (UDP beyond DNS is not carried).
func (st *netStack) handleUDP(r *udp.ForwarderRequest) bool {
	id := r.ID()
	if addrFrom(id.LocalAddress) != dnsAddr || id.LocalPort != 53 {
		st.log.Debug("transparent: UDP datagram dropped (only DNS is carried)",
			"dst", netip.AddrPortFrom(addrFrom(id.LocalAddress), id.LocalPort))
		return false
	}
	var wq waiter.Queue
	ep, e := r.CreateEndpoint(&wq)
	if e != nil {
		st.log.Debug("transparent: DNS endpoint", "err", e)
		return true
	}
	c := gonet.NewUDPConn(&wq, ep)
	if !st.add() {
		_ = c.Close()
		return true
	}
	if !st.track(c) {
		st.wg.Done()
		_ = c.Close()
		return true
	}
	go func() {
		defer st.wg.Done()
		defer st.untrack(c)
		defer c.Close()
		// One endpoint per client port: serve it until it is quiet.
		buf := make([]byte, 4096)
		for {
			_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
			n, err := c.Read(buf)
			if err != nil {
				return
			}
			resp, err := st.dns.Answer(buf[:n])
			if err != nil {
				st.log.Debug("transparent: DNS query dropped", "err", err)
				continue
			}
			if _, err := c.Write(resp); err != nil {
				st.log.Debug("transparent: DNS answer", "err", err)
				return
			}
		}
	}()
	return true
}

// serveDNSTCP answers DNS over TCP: 2-byte length-prefixed messages.
func (st *netStack) serveDNSTCP(c net.Conn) {
	for {
		_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
		var l [2]byte
		if _, err := io.ReadFull(c, l[:]); err != nil {
			return
		}
		q := make([]byte, binary.BigEndian.Uint16(l[:]))
		if _, err := io.ReadFull(c, q); err != nil {
			return
		}
		resp, err := st.dns.Answer(q)
		if err != nil {
			st.log.Debug("transparent: DNS query dropped", "err", err)
			return
		}
		out := binary.BigEndian.AppendUint16(make([]byte, 0, 2+len(resp)), uint16(len(resp)))
		if _, err := c.Write(append(out, resp...)); err != nil {
			return
		}
	}
}
