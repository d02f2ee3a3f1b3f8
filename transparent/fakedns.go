package transparent

import (
	"errors"
	"net/netip"
	"strings"
	"sync"

	"golang.org/x/net/dns/dnsmessage"
)

// FakeDNS answers a command's DNS queries with fake IPv4 addresses from a
// reserved range, one per name, and maps them back to the name when the
// command connects, so that the name is resolved at the far end of the
// tunnel (the login node), never here. Safe for concurrent use.
//
// A queries get the name's fake address; AAAA and every other type get an
// empty answer (NOERROR, no records), so that resolvers fall back to IPv4;
// PTR queries for a fake address get the name back. A name keeps its
// address for the life of the FakeDNS; when the range is used up, the
// least recently handed-out names give theirs up.
type FakeDNS struct {
	mu     sync.Mutex
	prefix netip.Prefix
	first  netip.Addr // first address handed out
	next   netip.Addr // next never-used address; invalid once the range is used up
	byName map[string]netip.Addr
	byAddr map[netip.Addr]*fakeEntry
	// LRU over entries: head is the least recently used.
	head, tail *fakeEntry
	// TTL is the TTL of answers, in seconds.
	ttl uint32
}

type fakeEntry struct {
	name       string
	addr       netip.Addr
	prev, next *fakeEntry
}

// DefaultFakeRange is the range fake addresses come from: 198.18.0.0/15,
// reserved for benchmarking (RFC 2544), never a real destination.
var DefaultFakeRange = netip.MustParsePrefix("198.18.0.0/15")

// NewFakeDNS returns a FakeDNS that hands out addresses of prefix (an IPv4
// prefix of at least 4 addresses), starting at first.
func NewFakeDNS(prefix netip.Prefix, first netip.Addr) (*FakeDNS, error) {
	prefix = prefix.Masked()
	if !prefix.Addr().Is4() || prefix.Bits() > 30 || !prefix.Contains(first) {
		return nil, errors.New("transparent: fake DNS range must be an IPv4 prefix of at least 4 addresses containing the first address")
	}
	return &FakeDNS{
		prefix: prefix,
		first:  first,
		next:   first,
		byName: map[string]netip.Addr{},
		byAddr: map[netip.Addr]*fakeEntry{},
		ttl:    60,
	}, nil
}

// canonical lower-cases name and drops the root dot.
func canonical(name string) string {
	return strings.ToLower(strings.TrimSuffix(name, "."))
}

// Lookup returns the fake address of name, handing out a new one if name
// has none yet.
func (f *FakeDNS) Lookup(name string) netip.Addr {
	name = canonical(name)
	f.mu.Lock()
	defer f.mu.Unlock()
	if a, ok := f.byName[name]; ok {
		f.touch(f.byAddr[a])
		return a
	}
	var e *fakeEntry
	if f.next.IsValid() {
		e = &fakeEntry{addr: f.next}
		n := f.next.Next()
		if !f.prefix.Contains(n) || n == lastOf(f.prefix) {
			n = netip.Addr{} // keep the broadcast-looking last address out
		}
		f.next = n
	} else {
		// Range used up: recycle the least recently used address.
		e = f.head
		f.unlink(e)
		delete(f.byName, e.name)
	}
	e.name = name
	f.byName[name] = e.addr
	f.byAddr[e.addr] = e
	f.pushBack(e)
	return e.addr
}

// Name returns the name that addr was handed out for.
func (f *FakeDNS) Name(addr netip.Addr) (string, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	e, ok := f.byAddr[addr.Unmap()]
	if !ok {
		return "", false
	}
	f.touch(e)
	return e.name, true
}

// Contains reports whether addr is in the fake range.
func (f *FakeDNS) Contains(addr netip.Addr) bool { return f.prefix.Contains(addr.Unmap()) }

func lastOf(p netip.Prefix) netip.Addr {
	a := p.Addr().As4()
	host := 32 - p.Bits()
	v := uint32(a[0])<<24 | uint32(a[1])<<16 | uint32(a[2])<<8 | uint32(a[3])
	v |= (1 << host) - 1
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

func (f *FakeDNS) touch(e *fakeEntry) {
	if e == nil || f.tail == e {
		return
	}
	f.unlink(e)
	f.pushBack(e)
}

func (f *FakeDNS) unlink(e *fakeEntry) {
	if e.prev != nil {
		e.prev.next = e.next
	} else {
		f.head = e.next
	}
	if e.next != nil {
		e.next.prev = e.prev
	} else {
		f.tail = e.prev
	}
	e.prev, e.next = nil, nil
}

func (f *FakeDNS) pushBack(e *fakeEntry) {
	e.prev = f.tail
	if f.tail != nil {
		f.tail.next = e
	} else {
		f.head = e
	}
	f.tail = e
}

// maxDNSMessage bounds an answer: a UDP answer must fit 512 bytes unless
// the query carried EDNS; ours are one record long.
const maxDNSMessage = 512

// errNoAnswer: the query is not worth an answer (not a query, or not even
// a header): the caller drops it, as a DNS server does.
var errNoAnswer = errors.New("transparent: not a DNS query")

// Answer parses the DNS query q and returns the response. A query it
// cannot parse gets FORMERR when its header could be read, and errNoAnswer
// (drop it) otherwise; a response is never longer than 512 bytes.
func (f *FakeDNS) Answer(q []byte) ([]byte, error) {
	var p dnsmessage.Parser
	h, err := p.Start(q)
	if err != nil {
		return nil, errNoAnswer
	}
	if h.Response {
		return nil, errNoAnswer
	}
	resp := dnsmessage.Header{ID: h.ID, Response: true, OpCode: h.OpCode, RecursionDesired: h.RecursionDesired, RecursionAvailable: true}
	if h.OpCode != 0 {
		resp.RCode = dnsmessage.RCodeNotImplemented
		return f.build(resp, nil, nil)
	}
	questions, err := p.AllQuestions()
	if err != nil || len(questions) != 1 {
		// Zero or several questions: no resolver sends that.
		resp.RCode = dnsmessage.RCodeFormatError
		return f.build(resp, nil, nil)
	}
	qn := questions[0]
	resp.Authoritative = true
	if qn.Class != dnsmessage.ClassINET {
		resp.RCode = dnsmessage.RCodeNotImplemented
		return f.build(resp, &qn, nil)
	}
	name := qn.Name.String()
	switch qn.Type {
	case dnsmessage.TypeA:
		if !validName(name) {
			resp.RCode = dnsmessage.RCodeNameError
			return f.build(resp, &qn, nil)
		}
		a := f.Lookup(name).As4()
		return f.build(resp, &qn, func(b *dnsmessage.Builder) error {
			return b.AResource(f.rh(qn), dnsmessage.AResource{A: a})
		})
	case dnsmessage.TypePTR:
		addr, ok := ptrAddr(name)
		if !ok || !f.Contains(addr) {
			resp.RCode = dnsmessage.RCodeNameError
			return f.build(resp, &qn, nil)
		}
		host, ok := f.Name(addr)
		if !ok {
			resp.RCode = dnsmessage.RCodeNameError
			return f.build(resp, &qn, nil)
		}
		target, err := dnsmessage.NewName(host + ".")
		if err != nil {
			resp.RCode = dnsmessage.RCodeServerFailure
			return f.build(resp, &qn, nil)
		}
		return f.build(resp, &qn, func(b *dnsmessage.Builder) error {
			return b.PTRResource(f.rh(qn), dnsmessage.PTRResource{PTR: target})
		})
	}
	// AAAA, MX, TXT, ...: the name "exists" (it has an A record) but has
	// no record of this type here.
	return f.build(resp, &qn, nil)
}

func (f *FakeDNS) rh(q dnsmessage.Question) dnsmessage.ResourceHeader {
	return dnsmessage.ResourceHeader{Name: q.Name, Type: q.Type, Class: dnsmessage.ClassINET, TTL: f.ttl}
}

func (f *FakeDNS) build(h dnsmessage.Header, q *dnsmessage.Question, answer func(*dnsmessage.Builder) error) ([]byte, error) {
	b := dnsmessage.NewBuilder(make([]byte, 0, 128), h)
	b.EnableCompression()
	if q != nil {
		if err := b.StartQuestions(); err != nil {
			return nil, err
		}
		if err := b.Question(*q); err != nil {
			return nil, err
		}
	}
	if answer != nil {
		if err := b.StartAnswers(); err != nil {
			return nil, err
		}
		if err := answer(&b); err != nil {
			return nil, err
		}
	}
	msg, err := b.Finish()
	if err != nil {
		return nil, err
	}
	if len(msg) > maxDNSMessage {
		return nil, errors.New("transparent: DNS answer too long")
	}
	return msg, nil
}

// validName reports whether name (with its root dot) is a host name a
// login node could resolve: letters, digits, '-', '_' and dots, no empty
// label. Anything else gets NXDOMAIN instead of an address the dial would
// then fail for.
func validName(name string) bool {
	name = strings.TrimSuffix(name, ".")
	if name == "" || len(name) > 253 {
		return false
	}
	for _, label := range strings.Split(name, ".") {
		if label == "" || len(label) > 63 {
			return false
		}
		for _, c := range []byte(label) {
			ok := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_'
			if !ok {
				return false
			}
		}
	}
	return true
}

// ptrAddr parses a reverse name d.c.b.a.in-addr.arpa.
func ptrAddr(name string) (netip.Addr, bool) {
	rest, ok := strings.CutSuffix(strings.ToLower(name), ".in-addr.arpa.")
	if !ok {
		return netip.Addr{}, false
	}
	parts := strings.Split(rest, ".")
	if len(parts) != 4 {
		return netip.Addr{}, false
	}
	a, err := netip.ParseAddr(parts[3] + "." + parts[2] + "." + parts[1] + "." + parts[0])
	if err != nil || !a.Is4() {
		return netip.Addr{}, false
	}
	return a, true
}
