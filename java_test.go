package hpcproxy

import (
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/hpcproxy/hpcproxy/internal/testenv"
)

// TestJavaThroughProxy runs a real Java program (testdata/java/Fetch.java,
// launched from source, which the JRE can do) with the JAVA_TOOL_OPTIONS
// that env gives a per-job proxy, the user's own options kept: plain HTTP
// and HTTPS by a name only the proxy resolves arrive through the proxy,
// a loopback address (no_proxy) goes direct.
func TestJavaThroughProxy(t *testing.T) {
	java := testenv.LookPath(t, "java")
	var proxy *envTestProxy
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "origin %s tls=%t", r.URL.Path, r.TLS != nil)
	})
	plain := httptest.NewServer(handler)
	t.Cleanup(plain.Close)
	secure := httptest.NewTLSServer(handler)
	t.Cleanup(secure.Close)

	// One proxy per origin: each maps origin.test to its own.
	proxy = startEnvTestProxy(t, plain.Listener.Addr().String(), ProxyCredentials{})
	tlsProxy := startEnvTestProxy(t, secure.Listener.Addr().String(), ProxyCredentials{})
	port := func(l net.Listener) int { return l.Addr().(*net.TCPAddr).Port }

	run := func(p *envTestProxy, urls ...string) string {
		t.Helper()
		env, err := buildProxyEnv(fmt.Sprintf("http://127.0.0.1:%d", port(p.ln)), EnvOptions{
			Java: true, JavaToolOptions: "-Xmx64m -Dhttp.proxyHost=stale.example -Duser.language=en",
		})
		require.NoError(t, err)
		var jto string
		for _, kv := range env {
			if v, ok := strings.CutPrefix(kv, "JAVA_TOOL_OPTIONS="); ok {
				jto = v
			}
		}
		require.NotEmpty(t, jto, "no JAVA_TOOL_OPTIONS in %q", env)
		assert.NotContains(t, jto, "stale.example")
		assert.True(t, strings.HasPrefix(jto, "-Xmx64m -Duser.language=en "), jto)
		cmd := exec.Command(java, append([]string{"testdata/java/Fetch.java"}, urls...)...)
		cmd.Env = append(os.Environ(), "JAVA_TOOL_OPTIONS="+jto)
		out, err := cmd.CombinedOutput()
		require.NoError(t, err, "java: %s", out)
		assert.Contains(t, string(out), "Picked up JAVA_TOOL_OPTIONS: "+jto, "the JVM did not read the options")
		return string(out)
	}

	out := run(proxy,
		fmt.Sprintf("http://origin.test:%d/plain", port(plain.Listener)),
		fmt.Sprintf("http://127.0.0.1:%d/direct", port(plain.Listener)))
	assert.Contains(t, out, "/plain 200 origin /plain tls=false")
	assert.Contains(t, out, "/direct 200 origin /direct tls=false")
	assert.Equal(t, []string{fmt.Sprintf("dial origin.test:%d", port(plain.Listener))}, proxy.Hits(),
		"the proxy carried other requests than origin.test (127.0.0.1 is in no_proxy)")

	out = run(tlsProxy, fmt.Sprintf("https://origin.test:%d/secure", port(secure.Listener)))
	assert.Contains(t, out, "/secure 200 origin /secure tls=true")
	assert.Equal(t, []string{fmt.Sprintf("dial origin.test:%d", port(secure.Listener))}, tlsProxy.Hits())
}

func TestJavaNonProxyHosts(t *testing.T) {
	for _, tc := range []struct {
		in   []string
		want string
	}{
		{defaultNoProxy, "localhost|*.localhost|127.0.0.1|127.*|[::1]"},
		{[]string{"cluster.example.edu", ".svc.local", "db:5432", "10.1.2.3"}, "cluster.example.edu|*.cluster.example.edu|*.svc.local|db|*.db|10.1.2.3"},
		{[]string{"10.16.0.0/12"}, "10.16.*|10.17.*|10.18.*|10.19.*|10.20.*|10.21.*|10.22.*|10.23.*|10.24.*|10.25.*|10.26.*|10.27.*|10.28.*|10.29.*|10.30.*|10.31.*"},
		{[]string{"192.168.1.0/24", "172.16.5.7/32", "0.0.0.0/0"}, "192.168.1.*|172.16.5.7|*"},
		{[]string{"fd00::/8", "bad|entry", "", "*"}, "*"},
		{[]string{"[::1]", "::ffff:10.0.0.1"}, "[::1]|10.0.0.1"},
	} {
		assert.Equal(t, tc.want, javaNonProxyHosts(tc.in), "%q", tc.in)
	}
	assert.Equal(t, "-Xss1m -Dhttp.proxyHost=[::1] -Dhttp.proxyPort=8 -Dhttps.proxyHost=[::1] -Dhttps.proxyPort=8",
		javaProxyOptions("-Xss1m -Dhttps.proxyPort=9", "::1", 8, nil))
}

// FuzzJavaNonProxyHosts: whatever no_proxy holds, the JVM's value is a
// list of non-empty patterns without white space (JAVA_TOOL_OPTIONS is
// split at it) or empty entries.
func FuzzJavaNonProxyHosts(f *testing.F) {
	f.Add("localhost,127.0.0.0/8,::1")
	f.Add(".example.edu, 10.16.0.0/12 db:5432")
	f.Add("[::1],*,fd00::/8,0.0.0.0/0")
	f.Fuzz(func(t *testing.T, noProxy string) {
		got := javaNonProxyHosts(splitList(noProxy))
		if got == "" {
			return
		}
		if strings.ContainsAny(got, " \t\r\n\v\f") {
			t.Fatalf("white space in %q", got)
		}
		for _, p := range strings.Split(got, "|") {
			if p == "" {
				t.Fatalf("empty pattern in %q", got)
			}
		}
	})
}
