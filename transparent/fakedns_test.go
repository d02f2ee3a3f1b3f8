package transparent

import (
	"net/netip"
	"testing"

	"golang.org/x/net/dns/dnsmessage"
)

func newTestDNS(t testing.TB, prefix string, first string) *FakeDNS {
	t.Helper()
	f, err := NewFakeDNS(netip.MustParsePrefix(prefix), netip.MustParseAddr(first))
	if err != nil {
		t.Fatal(err)
	}
	return f
}

func query(t testing.TB, id uint16, name string, typ dnsmessage.Type) []byte {
	t.Helper()
	b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: id, RecursionDesired: true})
	_ = b.StartQuestions()
	if err := b.Question(dnsmessage.Question{Name: dnsmessage.MustNewName(name), Type: typ, Class: dnsmessage.ClassINET}); err != nil {
		t.Fatal(err)
	}
	m, err := b.Finish()
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func parse(t testing.TB, b []byte) dnsmessage.Message {
	t.Helper()
	var m dnsmessage.Message
	if err := m.Unpack(b); err != nil {
		t.Fatalf("answer does not parse: %v", err)
	}
	return m
}

func TestFakeDNSAnswers(t *testing.T) {
	f := newTestDNS(t, "198.18.0.0/15", "198.18.0.16")
	resp, err := f.Answer(query(t, 77, "PyPI.org.", dnsmessage.TypeA))
	if err != nil {
		t.Fatal(err)
	}
	m := parse(t, resp)
	if m.ID != 77 || !m.Response || m.RCode != dnsmessage.RCodeSuccess || len(m.Answers) != 1 || len(m.Questions) != 1 {
		t.Fatalf("got %+v, want one A answer to query 77", m.Header)
	}
	a := netip.AddrFrom4(m.Answers[0].Body.(*dnsmessage.AResource).A)
	if a != netip.MustParseAddr("198.18.0.16") {
		t.Errorf("address %s, want the first fake 198.18.0.16", a)
	}
	if name, ok := f.Name(a); !ok || name != "pypi.org" {
		t.Errorf("Name(%s) = %q, %v; want pypi.org", a, name, ok)
	}
	// The same name (any case) keeps its address; another gets the next.
	if b := f.Lookup("pypi.ORG"); b != a {
		t.Errorf("second lookup %s, want %s", b, a)
	}
	if b := f.Lookup("github.com"); b != netip.MustParseAddr("198.18.0.17") {
		t.Errorf("next name got %s, want 198.18.0.17", b)
	}

	// AAAA and MX: the name exists, no record of that type.
	for _, typ := range []dnsmessage.Type{dnsmessage.TypeAAAA, dnsmessage.TypeMX, dnsmessage.TypeTXT} {
		m := parse(t, must(f.Answer(query(t, 5, "pypi.org.", typ))))
		if m.RCode != dnsmessage.RCodeSuccess || len(m.Answers) != 0 {
			t.Errorf("%s: rcode %s, %d answers; want NOERROR and none", typ, m.RCode, len(m.Answers))
		}
	}
	// PTR of a fake address names the host; of anything else NXDOMAIN.
	m = parse(t, must(f.Answer(query(t, 6, "16.0.18.198.in-addr.arpa.", dnsmessage.TypePTR))))
	if len(m.Answers) != 1 || m.Answers[0].Body.(*dnsmessage.PTRResource).PTR.String() != "pypi.org." {
		t.Errorf("PTR: %+v, want pypi.org.", m.Answers)
	}
	for _, name := range []string{"1.1.168.192.in-addr.arpa.", "200.0.18.198.in-addr.arpa.", "x.in-addr.arpa."} {
		if m := parse(t, must(f.Answer(query(t, 7, name, dnsmessage.TypePTR)))); m.RCode != dnsmessage.RCodeNameError {
			t.Errorf("PTR %s: rcode %s, want NXDOMAIN", name, m.RCode)
		}
	}
	// A name no login node could resolve gets NXDOMAIN, not an address.
	if m := parse(t, must(f.Answer(query(t, 8, "bad\\032name.org.", dnsmessage.TypeA)))); m.RCode != dnsmessage.RCodeNameError {
		t.Errorf("bad name: rcode %s, want NXDOMAIN", m.RCode)
	}
}

func must(b []byte, err error) []byte {
	if err != nil {
		panic(err)
	}
	return b
}

func TestFakeDNSBadQueries(t *testing.T) {
	f := newTestDNS(t, "198.18.0.0/15", "198.18.0.16")
	// Not even a header, or a response: dropped.
	for _, q := range [][]byte{nil, {1, 2, 3}, func() []byte {
		b := query(t, 1, "a.org.", dnsmessage.TypeA)
		b[2] |= 0x80 // QR: a response
		return b
	}()} {
		if _, err := f.Answer(q); err == nil {
			t.Errorf("Answer(%x): answered, want dropped", q)
		}
	}
	// A header and a truncated question: FORMERR with the query's ID.
	q := query(t, 99, "example.org.", dnsmessage.TypeA)
	m := parse(t, must(f.Answer(q[:len(q)-3])))
	if m.ID != 99 || m.RCode != dnsmessage.RCodeFormatError {
		t.Errorf("truncated: id %d rcode %s, want 99 FORMERR", m.ID, m.RCode)
	}
	// Another opcode: NOTIMP.
	q = query(t, 3, "example.org.", dnsmessage.TypeA)
	q[2] |= 2 << 3 // opcode 2, STATUS
	if m := parse(t, must(f.Answer(q))); m.RCode != dnsmessage.RCodeNotImplemented {
		t.Errorf("opcode 2: rcode %s, want NOTIMP", m.RCode)
	}
}

// TestFakeDNSRecycles: once the range is used up, the least recently used
// name gives its address up; recently used names keep theirs.
func TestFakeDNSRecycles(t *testing.T) {
	f := newTestDNS(t, "10.0.0.0/29", "10.0.0.1") // .1 to .6: six addresses
	var addrs []netip.Addr
	for _, n := range []string{"a", "b", "c", "d", "e", "f"} {
		addrs = append(addrs, f.Lookup(n))
	}
	if addrs[5] != netip.MustParseAddr("10.0.0.6") {
		t.Fatalf("sixth address %s, want 10.0.0.6", addrs[5])
	}
	f.Lookup("a") // a is now the most recently used
	g := f.Lookup("g")
	if g != addrs[1] {
		t.Errorf("g got %s, want b's %s (least recently used)", g, addrs[1])
	}
	if _, ok := f.Name(addrs[1]); !ok {
		t.Errorf("recycled address has no name")
	}
	if name, _ := f.Name(addrs[1]); name != "g" {
		t.Errorf("recycled address names %q, want g", name)
	}
	if a := f.Lookup("a"); a != addrs[0] {
		t.Errorf("a moved from %s to %s", addrs[0], a)
	}
}

// FuzzFakeDNS: whatever bytes arrive on port 53, Answer does not panic,
// and what it answers is one valid DNS response of at most 512 bytes.
func FuzzFakeDNS(f *testing.F) {
	f.Add(query(f, 1, "pypi.org.", dnsmessage.TypeA))
	f.Add(query(f, 2, "16.0.18.198.in-addr.arpa.", dnsmessage.TypePTR))
	f.Add(query(f, 3, "x.", dnsmessage.TypeAAAA))
	f.Add([]byte{0, 1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0})
	d := newTestDNS(f, "198.18.0.0/15", "198.18.0.16")
	f.Fuzz(func(t *testing.T, q []byte) {
		resp, err := d.Answer(q)
		if err != nil {
			return
		}
		if len(resp) > maxDNSMessage {
			t.Fatalf("answer of %d bytes", len(resp))
		}
		var m dnsmessage.Message
		if err := m.Unpack(resp); err != nil {
			t.Fatalf("answer does not parse: %v", err)
		}
		if !m.Response {
			t.Fatalf("answer is not a response")
		}
	})
}
