package hpcproxy

import (
	"fmt"
	"net"
	"strconv"
	"strings"
)

// destination is a parsed TunnelConfig.Destination. Host may still be an
// ssh_config alias; User and Port are empty/zero when not given, so that
// ssh_config (or ssh's defaults) decide.
type destination struct {
	User string
	Host string
	Port int
}

// parseDestination splits "user@host:port" and its shorter forms.
// IPv6 addresses take brackets when a port follows ("[::1]:2222"); a bare
// IPv6 address ("::1") is a host without a port.
func parseDestination(s string) (destination, error) {
	var d destination
	if s == "" {
		return d, fmt.Errorf("hpcproxy: empty SSH destination")
	}
	if strings.ContainsAny(s, " \t\r\n") || strings.HasPrefix(s, "-") {
		return d, fmt.Errorf("hpcproxy: invalid SSH destination %q", s)
	}
	if i := strings.LastIndex(s, "@"); i >= 0 {
		d.User, s = s[:i], s[i+1:]
		if d.User == "" {
			return d, fmt.Errorf("hpcproxy: invalid SSH destination %q: empty user", s)
		}
	}
	host, port := s, ""
	switch {
	case strings.HasPrefix(s, "["):
		h, p, err := net.SplitHostPort(s)
		if err != nil {
			h = strings.TrimSuffix(strings.TrimPrefix(s, "["), "]")
			if strings.ContainsAny(h, "[]") {
				return d, fmt.Errorf("hpcproxy: invalid SSH destination %q: %w", s, err)
			}
			p = ""
		}
		host, port = h, p
	case strings.Count(s, ":") == 1:
		host, port, _ = strings.Cut(s, ":")
	}
	if host == "" {
		return d, fmt.Errorf("hpcproxy: invalid SSH destination %q: empty host", s)
	}
	d.Host = host
	if port != "" {
		n, err := strconv.Atoi(port)
		if err != nil || n < 1 || n > 65535 {
			return d, fmt.Errorf("hpcproxy: invalid SSH destination %q: bad port %q", s, port)
		}
		d.Port = n
	}
	return d, nil
}

// sshArgs returns the ssh command-line arguments that name d: options for
// the user and port (when given) followed by the host.
func (d destination) sshArgs() []string {
	var args []string
	if d.User != "" {
		args = append(args, "-l", d.User)
	}
	if d.Port != 0 {
		args = append(args, "-p", strconv.Itoa(d.Port))
	}
	return append(args, "--", d.Host)
}
