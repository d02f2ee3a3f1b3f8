package transparent

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// roleEnv makes the test binary act as a command run inside the namespace
// instead of running the tests: "fetch URL" is a Go client that ignores
// every proxy setting.
const roleEnv = "HPCPROXY_TRANSPARENT_TEST_ROLE"

// TestMain runs the namespace stage when Start re-executes the test
// binary, the test roles, and otherwise the tests with a goroutine-leak
// check.
func TestMain(m *testing.M) {
	Init()
	switch os.Getenv(roleEnv) {
	case "fetch":
		os.Exit(fetchRole(os.Args[1]))
	case "halfclose":
		if err := halfCloseRole(os.Args[1]); err != nil {
			fmt.Fprintln(os.Stderr, "halfclose:", err)
			os.Exit(1)
		}
		os.Exit(0)
	case "resolve":
		if err := resolveRole(os.Args[1]); err != nil {
			fmt.Fprintln(os.Stderr, "resolve:", err)
			os.Exit(1)
		}
		os.Exit(0)
	case "sink":
		if err := sinkRole(os.Args[1], os.Args[2]); err != nil {
			fmt.Fprintln(os.Stderr, "sink:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	code := m.Run()
	removeTestUser()
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintln(os.Stderr, "goleak:", err)
			code = 1
		}
	}
	os.Exit(code)
}

// fetchRole GETs url with a transport that has no proxy at all and prints
// the body.
func fetchRole(url string) int {
	c := &http.Client{Transport: &http.Transport{Proxy: nil}, Timeout: 20 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		fmt.Fprintln(os.Stderr, "fetch:", err)
		return 1
	}
	defer resp.Body.Close()
	if _, err := io.Copy(os.Stdout, resp.Body); err != nil {
		fmt.Fprintln(os.Stderr, "fetch:", err)
		return 1
	}
	if resp.StatusCode != 200 {
		fmt.Fprintln(os.Stderr, "fetch:", resp.Status)
		return 1
	}
	return 0
}

// halfCloseRole sends 100,000 bytes to addr, half-closes, and prints what
// comes back after that.
func halfCloseRole(addr string) error {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write(make([]byte, 100000)); err != nil {
		return err
	}
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		return err
	}
	b, err := io.ReadAll(c)
	if err != nil {
		return err
	}
	fmt.Printf("%s", b)
	return nil
}

// resolveRole looks name up with Go's resolver over UDP and over TCP (the
// servers of /etc/resolv.conf) and prints "udp ADDRS" and "tcp ADDRS".
func resolveRole(name string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, network := range []string{"udp", "tcp"} {
		r := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, _, addr string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, addr)
		}}
		addrs, err := r.LookupHost(ctx, name)
		if err != nil {
			return fmt.Errorf("%s: %w", network, err)
		}
		fmt.Println(network, strings.Join(addrs, ","))
	}
	return nil
}
