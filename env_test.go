package hpcproxy

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/hpcproxy/hpcproxy/internal/testenv"
)

func init() {
	// goclient: GET each URL of HELPER_URLS with Go's default client
	// (http.ProxyFromEnvironment) and print "URL STATUS BODY" or
	// "URL error ERR".
	helpers["goclient"] = func() int {
		for _, u := range strings.Fields(os.Getenv("HELPER_URLS")) {
			resp, err := http.Get(u)
			if err != nil {
				fmt.Printf("%s error %v\n", u, err)
				continue
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			fmt.Printf("%s %d %s\n", u, resp.StatusCode, strings.TrimSpace(string(b)))
		}
		return 0
	}
}

func TestProxyEnvList(t *testing.T) {
	t.Setenv(EnvNoProxy, "cluster.example.edu, 10.0.0.0/8 localhost")
	got := ProxyEnvList("http://hpcproxy:T0k_en-@login1:8080")
	np := "localhost,127.0.0.1,127.0.0.0/8,::1,cluster.example.edu,10.0.0.0/8"
	assert.Equal(t, []string{
		"http_proxy=http://hpcproxy:T0k_en-@login1:8080",
		"HTTP_PROXY=http://hpcproxy:T0k_en-@login1:8080",
		"https_proxy=http://hpcproxy:T0k_en-@login1:8080",
		"HTTPS_PROXY=http://hpcproxy:T0k_en-@login1:8080",
		"all_proxy=socks5h://hpcproxy:T0k_en-@login1:8080",
		"ALL_PROXY=socks5h://hpcproxy:T0k_en-@login1:8080",
		"no_proxy=" + np,
		"NO_PROXY=" + np,
	}, got)

	t.Setenv(EnvNoProxy, "")
	for _, bad := range []string{"", "login1:8080", "socks5://h:1", "http://", "::"} {
		assert.Nil(t, ProxyEnvList(bad), "ProxyEnvList(%q)", bad)
	}
	// A path is dropped; IPv6 hosts keep their brackets.
	assert.Contains(t, ProxyEnvList("http://[::1]:3128/x"), "all_proxy=socks5h://[::1]:3128")

	env, err := buildProxyEnv("http://127.0.0.1:9000", EnvOptions{
		Credentials: &ProxyCredentials{User: "hpcproxy", Token: "abc"},
		NoProxy:     []string{".cluster.local"},
	})
	require.NoError(t, err)
	assert.Contains(t, env, "https_proxy=http://hpcproxy:abc@127.0.0.1:9000")
	assert.Contains(t, env, "no_proxy=localhost,127.0.0.1,127.0.0.0/8,::1,.cluster.local")

	ps := &ProxyState{Host: "node1", Port: 9001, Mode: ModePerJob, Credentials: &ProxyCredentials{User: "hpcproxy", Token: "xyz"}}
	assert.Contains(t, ProxyEnvListFor(ps, EnvOptions{}), "ALL_PROXY=socks5h://hpcproxy:xyz@127.0.0.1:9001")
}

// envTestProxy is the real Server, requiring creds (if they have a token), whose Dial records
// each destination it is asked for and sends the name "origin.test" to the
// origin, refusing every other destination. A request that reaches the
// origin through it proves that the client used the proxy and did not
// resolve the name itself.
type envTestProxy struct {
	ln   net.Listener
	mu   sync.Mutex
	hits []string
}

func startEnvTestProxy(t *testing.T, origin string, creds ProxyCredentials) *envTestProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	p := &envTestProxy{ln: ln}
	srv := &Server{
		Dial: func(ctx context.Context, network, addr string) (net.Conn, error) {
			p.record("dial " + addr)
			if host, _, _ := net.SplitHostPort(addr); host != "origin.test" {
				return nil, fmt.Errorf("refused destination %q: %w", addr, ErrProhibited)
			}
			var d net.Dialer
			return d.DialContext(ctx, network, origin)
		},
	}
	if creds.Token != "" { // else open, as a per-job proxy is to its owner
		srv.Credentials = map[string]string{creds.User: creds.Token}
	}
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = srv.Serve(ln)
	}()
	t.Cleanup(func() {
		srv.Close()
		<-served
	})
	return p
}

func (p *envTestProxy) record(s string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.hits = append(p.hits, s)
}

func (p *envTestProxy) Hits() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.hits...)
}

// TestProxyEnvListClients runs curl and a Go program with exactly the
// environment ProxyEnvList returns and checks where their requests go.
func TestProxyEnvListClients(t *testing.T) {
	// The origin records whether a request came forwarded in absolute form
	// (the proxy adds Via) or through a tunnel (CONNECT, SOCKS: no Via).
	var proxy *envTestProxy
	origin := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		proxy.record("origin via=" + r.Header.Get("Via"))
		fmt.Fprintf(w, "origin %s", r.URL.Path)
	}))
	t.Cleanup(origin.Close)
	originPort := origin.Listener.Addr().(*net.TCPAddr).Port

	creds, err := newProxyCredentials()
	require.NoError(t, err)
	proxy = startEnvTestProxy(t, origin.Listener.Addr().String(), creds)
	ps := &ProxyState{Host: thisHost(), Port: proxy.ln.Addr().(*net.TCPAddr).Port, Mode: ModePerJob, Credentials: &creds}
	env := ProxyEnvListFor(ps, EnvOptions{NoProxy: []string{"cluster.test"}})
	require.Len(t, env, 8)

	without := func(keys ...string) []string {
		var out []string
	next:
		for _, kv := range env {
			for _, k := range keys {
				if strings.HasPrefix(kv, k+"=") {
					continue next
				}
			}
			out = append(out, kv)
		}
		return out
	}
	localURL := "http://localhost:" + strconv.Itoa(originPort) + "/local"
	loopURL := "http://127.0.0.1:" + strconv.Itoa(originPort) + "/loop"

	t.Run("curl", func(t *testing.T) {
		curl := testenv.LookPath(t, "curl")
		run := func(env []string, args ...string) (string, error) {
			cmd := exec.Command(curl, append([]string{"-q", "-sS", "--max-time", "10"}, args...)...)
			cmd.Env = env
			out, err := cmd.CombinedOutput()
			return string(out), err
		}
		for _, tc := range []struct {
			name     string
			env      []string
			args     []string
			want     string
			wantHits []string
		}{
			{"http_proxy, absolute-form", env, []string{"http://origin.test/abs"}, "origin /abs", []string{"dial origin.test:80", "origin via=1.1 hpcproxy"}},
			{"http_proxy, CONNECT", env, []string{"-p", "http://origin.test/tunnel"}, "origin /tunnel", []string{"dial origin.test:80", "origin via="}},
			// With HTTP_PROXY curl would forward (Via); it tunnels instead.
			{"upper-case only: curl ignores HTTP_PROXY, uses ALL_PROXY", without("http_proxy", "all_proxy"), []string{"http://origin.test/upper"}, "origin /upper", []string{"dial origin.test:80", "origin via="}},
			{"all_proxy socks5h: the name goes to the proxy", without("http_proxy", "HTTP_PROXY"), []string{"http://origin.test/socks"}, "origin /socks", []string{"dial origin.test:80", "origin via="}},
			{"localhost bypasses", env, []string{localURL}, "origin /local", []string{"origin via="}},
			{"127.0.0.1 bypasses", env, []string{loopURL}, "origin /loop", []string{"origin via="}},
		} {
			t.Run(tc.name, func(t *testing.T) {
				before := len(proxy.Hits())
				out, err := run(tc.env, tc.args...)
				require.NoError(t, err, "curl: %s", out)
				assert.Equal(t, tc.want, out)
				assert.ElementsMatch(t, tc.wantHits, proxy.Hits()[before:], "proxy hits")
			})
		}
		t.Run("cluster domain bypasses", func(t *testing.T) {
			before := len(proxy.Hits())
			out, err := run(env, "http://node1.cluster.test/")
			assert.Error(t, err, "curl resolved node1.cluster.test itself, as it should, and failed")
			assert.Contains(t, out, "node1.cluster.test")
			assert.Empty(t, proxy.Hits()[before:], "proxy hits")
		})
	})

	t.Run("go", func(t *testing.T) {
		before := len(proxy.Hits())
		cmd := helperCommand("goclient")
		cmd.Env = append(append([]string(nil), env...), helperEnv+"=goclient",
			"HELPER_URLS=http://origin.test/go "+localURL+" http://node1.cluster.test/")
		out, err := cmd.CombinedOutput()
		require.NoError(t, err, "%s", out)
		lines := strings.Split(strings.TrimSpace(string(out)), "\n")
		require.Len(t, lines, 3, "%s", out)
		assert.Equal(t, "http://origin.test/go 200 origin /go", lines[0])
		assert.Equal(t, localURL+" 200 origin /local", lines[1])
		assert.Contains(t, lines[2], "http://node1.cluster.test/ error", "resolved directly, not through the proxy")
		assert.Equal(t, []string{"dial origin.test:80", "origin via=1.1 hpcproxy", "origin via="}, proxy.Hits()[before:])
	})

	t.Run("wrong token refused", func(t *testing.T) {
		curl := testenv.LookPath(t, "curl")
		bad := *ps
		bad.Credentials = &ProxyCredentials{User: credentialsUser, Token: "wrong"}
		cmd := exec.Command(curl, "-q", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10", "http://origin.test/")
		cmd.Env = ProxyEnvListFor(&bad, EnvOptions{})
		out, _ := cmd.CombinedOutput()
		assert.Equal(t, "407", string(out))
	})
}
