package hpcproxy

import (
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"os"
	"strconv"
	"strings"
	"unicode"
)

// EnvNoProxy names a comma-separated list of extra no_proxy entries
// (cluster domains such as "cluster.example.edu", addresses, CIDRs) that
// ProxyEnvList adds to its defaults.
const EnvNoProxy = "HPCPROXY_NO_PROXY"

// defaultNoProxy lists what no_proxy always covers: loopback by name,
// address and network. 127.0.0.1 is listed beside 127.0.0.0/8 for
// clients that match no_proxy by string (Python's urllib, wget, curl
// before 7.86).
var defaultNoProxy = []string{"localhost", "127.0.0.1", "127.0.0.0/8", "::1"}

// EnvOptions configures ProxyEnvListFor.
type EnvOptions struct {
	// Credentials optionally specifies credentials put into URLs that
	// carry none. If nil, the URL is used as given.
	Credentials *ProxyCredentials
	// NoProxy optionally adds no_proxy entries after the loopback ones
	// (localhost, 127.0.0.1, 127.0.0.0/8, ::1), such
	// as the cluster's domains: "cluster.example.edu" (curl and Go match
	// the domain and its subdomains), "10.0.0.0/8".
	NoProxy []string
	// Java, if true, adds JAVA_TOOL_OPTIONS with the JVM's proxy system
	// properties (http.proxyHost, http.proxyPort, https.proxyHost,
	// https.proxyPort, http.nonProxyHosts), which carry no credentials:
	// set it only for a proxy that admits the client without, as a
	// per-job proxy admits its owner's loopback connections. JVMs ignore
	// http_proxy and the rest.
	Java bool
	// JavaToolOptions optionally specifies the JAVA_TOOL_OPTIONS already
	// in the environment, kept in front of the proxy's properties (minus
	// proxy properties of an earlier proxy). Used only with Java.
	JavaToolOptions string
}

// ProxyEnvList returns environment assignments ("KEY=VALUE") that point
// ordinary clients at the dual-protocol proxy whose HTTP URL is httpURL
// (http://user:token@host:port), in both cases because clients disagree
// about which they read:
//
//   - http_proxy, HTTP_PROXY, https_proxy, HTTPS_PROXY: httpURL. curl reads
//     only the lower-case http_proxy; wget, pip and conda only speak HTTP
//     to a proxy.
//   - all_proxy, ALL_PROXY: the same port as socks5h://, so that names are
//     resolved on the login node (compute nodes often have no DNS).
//   - no_proxy, NO_PROXY: defaultNoProxy plus the entries of
//     $HPCPROXY_NO_PROXY.
//
// Credentials in httpURL are carried into every URL. If httpURL is not an
// http(s) URL with a host, ProxyEnvList returns nil.
func ProxyEnvList(httpURL string) []string {
	env, err := buildProxyEnv(httpURL, EnvOptions{NoProxy: EnvNoProxyEntries()})
	if err != nil {
		return nil
	}
	return env
}

// EnvNoProxyEntries returns the entries of $HPCPROXY_NO_PROXY (separated
// by commas or white space), which ProxyEnvList adds to defaultNoProxy.
// Callers of ProxyEnvListFor, which reads no environment, pass them in
// EnvOptions.NoProxy to honour the variable.
func EnvNoProxyEntries() []string { return splitList(os.Getenv(EnvNoProxy)) }

// ProxyEnvListFor returns the assignments ProxyEnvList describes for the
// proxy a state file describes, with its credentials unless
// opts.Credentials overrides them, configured by opts. It reads no
// environment variables.
func ProxyEnvListFor(ps *ProxyState, opts EnvOptions) []string {
	if opts.Credentials == nil {
		opts.Credentials = ps.Credentials
	}
	env, _ := buildProxyEnv("http://"+ps.Addr(), opts) // cannot fail: a valid URL
	return env
}

// buildProxyEnv builds ProxyEnvList's assignments for httpURL, configured
// by opts; it reads no environment variables.
func buildProxyEnv(httpURL string, opts EnvOptions) ([]string, error) {
	u, err := url.Parse(httpURL)
	if err != nil {
		return nil, fmt.Errorf("hpcproxy: proxy URL: %w", err)
	}
	if (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("hpcproxy: proxy URL %q: want http://[user:token@]host:port", redactURL(u))
	}
	if u.User == nil && opts.Credentials != nil && opts.Credentials.Token != "" {
		u.User = url.UserPassword(opts.Credentials.User, opts.Credentials.Token)
	}
	u.Path, u.RawPath, u.RawQuery, u.Fragment = "", "", "", ""
	httpS := u.String()
	s := *u
	s.Scheme = "socks5h"
	socks := s.String()

	seen := map[string]bool{}
	var np []string
	for _, e := range append(append([]string(nil), defaultNoProxy...), opts.NoProxy...) {
		e = strings.TrimSpace(e)
		if e == "" || seen[strings.ToLower(e)] {
			continue
		}
		seen[strings.ToLower(e)] = true
		np = append(np, e)
	}
	noProxy := strings.Join(np, ",")

	env := []string{
		"http_proxy=" + httpS,
		"HTTP_PROXY=" + httpS,
		"https_proxy=" + httpS,
		"HTTPS_PROXY=" + httpS,
		"all_proxy=" + socks,
		"ALL_PROXY=" + socks,
		"no_proxy=" + noProxy,
		"NO_PROXY=" + noProxy,
	}
	if opts.Java {
		port, _ := strconv.Atoi(u.Port())
		if port == 0 {
			port = 80
		}
		env = append(env, "JAVA_TOOL_OPTIONS="+javaProxyOptions(opts.JavaToolOptions, u.Hostname(), port, np))
	}
	return env, nil
}

// javaProxyProperties are the system properties javaProxyOptions sets.
var javaProxyProperties = []string{"http.proxyHost", "http.proxyPort", "https.proxyHost", "https.proxyPort", "http.nonProxyHosts"}

// javaProxyOptions returns JVM options that send a JVM's HTTP and HTTPS
// connections (java.net.URL, java.net.http.HttpClient, Maven, Gradle,
// Nextflow, Spark...) through the proxy at host:port, except to the hosts
// of noProxy: existing (a JAVA_TOOL_OPTIONS value), without any of these
// properties it already sets, followed by
//
//	-Dhttp.proxyHost=HOST -Dhttp.proxyPort=PORT -Dhttps.proxyHost=HOST
//	-Dhttps.proxyPort=PORT -Dhttp.nonProxyHosts=H1|H2...
//
// http.nonProxyHosts (which HTTPS uses too) is noProxy in the JVM's
// syntax ([javaNonProxyHosts]). No credentials: a JVM answers a proxy's
// 407 only through a java.net.Authenticator the program installs, and
// HTTPS tunnels through a proxy that wants Basic authentication also need
// -Djdk.http.auth.tunneling.disabledSchemes= (empty).
func javaProxyOptions(existing, host string, port int, noProxy []string) string {
	var opts []string
	for _, f := range strings.Fields(existing) {
		if !isJavaProxyProperty(f) {
			opts = append(opts, f)
		}
	}
	if strings.Contains(host, ":") {
		host = "[" + host + "]"
	}
	p := strconv.Itoa(port)
	opts = append(opts,
		"-Dhttp.proxyHost="+host, "-Dhttp.proxyPort="+p,
		"-Dhttps.proxyHost="+host, "-Dhttps.proxyPort="+p)
	if np := javaNonProxyHosts(noProxy); np != "" {
		opts = append(opts, "-Dhttp.nonProxyHosts="+np)
	}
	return strings.Join(opts, " ")
}

func isJavaProxyProperty(opt string) bool {
	for _, p := range javaProxyProperties {
		if strings.HasPrefix(opt, "-D"+p+"=") {
			return true
		}
	}
	return false
}

// javaNonProxyHosts turns no_proxy entries into the value of the JVM's
// http.nonProxyHosts: patterns separated by |, each a host name or address
// with * as a wildcard at either end. The translation follows curl's
// reading of no_proxy:
//
//	example.edu   ->  example.edu|*.example.edu   (the domain and below)
//	.example.edu  ->  *.example.edu
//	10.1.2.3      ->  10.1.2.3
//	10.0.0.0/8    ->  10.*                (other prefix lengths: each
//	10.16.0.0/12  ->  10.16.*|...|10.31.*  /8, /16 or /24 network inside)
//	::1           ->  [::1]
//	host:8080     ->  host                (the JVM matches no ports)
//	*             ->  *
//
// IPv6 networks, which the JVM cannot match by pattern, and entries it
// cannot parse are left out.
func javaNonProxyHosts(noProxy []string) string {
	seen := map[string]bool{}
	var out []string
	add := func(p string) {
		if p != "" && !seen[p] {
			seen[p] = true
			out = append(out, p)
		}
	}
	for _, e := range noProxy {
		e = strings.ToLower(strings.TrimSpace(e))
		if e == "" || strings.ContainsFunc(e, func(r rune) bool { return r == '|' || unicode.IsSpace(r) || unicode.IsControl(r) }) {
			continue // JAVA_TOOL_OPTIONS is split at white space; | separates
		}
		if e == "*" {
			add("*")
			continue
		}
		if pfx, err := netip.ParsePrefix(e); err == nil {
			for _, p := range javaNetworkPatterns(pfx) {
				add(p)
			}
			continue
		}
		if a, err := netip.ParseAddr(strings.Trim(e, "[]")); err == nil {
			if a.Is6() && !a.Is4In6() {
				add("[" + a.String() + "]")
			} else {
				add(a.Unmap().String())
			}
			continue
		}
		if h, _, err := net.SplitHostPort(e); err == nil {
			e = h
		}
		if strings.HasPrefix(e, ".") {
			add("*" + e)
			continue
		}
		add(e)
		add("*." + e)
	}
	return strings.Join(out, "|")
}

// javaNetworkPatterns returns the "a.b.*" patterns that cover exactly the
// IPv4 network pfx, or nothing for an IPv6 one.
func javaNetworkPatterns(pfx netip.Prefix) []string {
	pfx = pfx.Masked()
	if !pfx.Addr().Is4() {
		return nil
	}
	bits := pfx.Bits()
	if bits == 32 {
		return []string{pfx.Addr().String()}
	}
	if bits == 0 {
		return []string{"*"}
	}
	octets := (bits + 7) / 8 // whole octets in each pattern
	n := 1 << (octets*8 - bits)
	b := pfx.Addr().As4()
	var out []string
	for i := range n {
		v := b
		v[octets-1] += byte(i)
		parts := make([]string, 0, octets+1)
		for _, o := range v[:octets] {
			parts = append(parts, strconv.Itoa(int(o)))
		}
		out = append(out, strings.Join(append(parts, "*"), "."))
	}
	return out
}

func redactURL(u *url.URL) string {
	if u.User != nil {
		return u.Redacted()
	}
	return u.String()
}

func splitList(s string) []string {
	var out []string
	for _, f := range strings.FieldsFunc(s, func(r rune) bool { return r == ',' || r == ' ' || r == '\t' || r == '\n' }) {
		out = append(out, f)
	}
	return out
}
