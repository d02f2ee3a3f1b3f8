package hpcproxy

import (
	"fmt"
	"net/url"
	"os"
	"strings"
)

// EnvNoProxy names a comma-separated list of extra no_proxy entries
// (cluster domains such as "cluster.example.edu", addresses, CIDRs) that
// ProxyEnvList adds to its defaults.
const EnvNoProxy = "HPCPROXY_NO_PROXY"

// DefaultNoProxy lists what no_proxy always covers: loopback by name,
// address and network. 127.0.0.1 is listed beside 127.0.0.0/8 for
// clients that match no_proxy by string (Python's urllib, wget, curl
// before 7.86).
var DefaultNoProxy = []string{"localhost", "127.0.0.1", "127.0.0.0/8", "::1"}

// EnvOptions configures ProxyEnvListOptions.
type EnvOptions struct {
	// Credentials optionally specifies credentials put into URLs that
	// carry none. If nil, the URL is used as given.
	Credentials *ProxyCredentials
	// NoProxy optionally adds no_proxy entries after DefaultNoProxy, such
	// as the cluster's domains: "cluster.example.edu" (curl and Go match
	// the domain and its subdomains), "10.0.0.0/8".
	NoProxy []string
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
//   - no_proxy, NO_PROXY: DefaultNoProxy plus the entries of
//     $HPCPROXY_NO_PROXY.
//
// Credentials in httpURL are carried into every URL. If httpURL is not an
// http(s) URL with a host, ProxyEnvList returns nil.
func ProxyEnvList(httpURL string) []string {
	env, err := ProxyEnvListOptions(httpURL, EnvOptions{NoProxy: EnvNoProxyEntries()})
	if err != nil {
		return nil
	}
	return env
}

// EnvNoProxyEntries returns the entries of $HPCPROXY_NO_PROXY (separated
// by commas or white space), which ProxyEnvList adds to DefaultNoProxy.
// Callers of ProxyEnvListOptions and ProxyEnvListFor, which read no
// environment, pass them in EnvOptions.NoProxy to honour the variable.
func EnvNoProxyEntries() []string { return splitList(os.Getenv(EnvNoProxy)) }

// ProxyEnvListFor is ProxyEnvListOptions for the proxy a state file
// describes, with its credentials.
func ProxyEnvListFor(ps *ProxyState, opts EnvOptions) []string {
	if opts.Credentials == nil {
		opts.Credentials = ps.Credentials
	}
	env, _ := ProxyEnvListOptions("http://"+ps.Addr(), opts) // cannot fail: a valid URL
	return env
}

// ProxyEnvListOptions is ProxyEnvList with options; it reads no
// environment variables.
func ProxyEnvListOptions(httpURL string, opts EnvOptions) ([]string, error) {
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
	for _, e := range append(append([]string(nil), DefaultNoProxy...), opts.NoProxy...) {
		e = strings.TrimSpace(e)
		if e == "" || seen[strings.ToLower(e)] {
			continue
		}
		seen[strings.ToLower(e)] = true
		np = append(np, e)
	}
	noProxy := strings.Join(np, ",")

	return []string{
		"http_proxy=" + httpS,
		"HTTP_PROXY=" + httpS,
		"https_proxy=" + httpS,
		"HTTPS_PROXY=" + httpS,
		"all_proxy=" + socks,
		"ALL_PROXY=" + socks,
		"no_proxy=" + noProxy,
		"NO_PROXY=" + noProxy,
	}, nil
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

// ExportLines formats "KEY=VALUE" assignments as POSIX shell lines,
// "export KEY='VALUE'\n", for `eval "$(hpcproxy env)"`. Assignments whose
// key is not a shell name are skipped.
func ExportLines(env []string) string {
	var b strings.Builder
	for _, kv := range env {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || !isShellName(k) {
			continue
		}
		b.WriteString("export ")
		b.WriteString(k)
		b.WriteByte('=')
		b.WriteString(ShellQuote(v))
		b.WriteByte('\n')
	}
	return b.String()
}

// ShellQuote quotes s as one word for a POSIX shell: unchanged if it
// consists only of characters no shell treats specially, else in single
// quotes, each embedded single quote closed, escaped and reopened:
//
//	it's  ->  'it'\''s'
func ShellQuote(s string) string {
	if s != "" && strings.Trim(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_@%+=:,./-") == "" {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

func isShellName(s string) bool {
	if s == "" {
		return false
	}
	for i, r := range s {
		switch {
		case r == '_', r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z':
		case r >= '0' && r <= '9' && i > 0:
		default:
			return false
		}
	}
	return true
}
