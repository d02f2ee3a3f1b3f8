// Package sshdest parses SSH destinations as hpcproxy takes them
// ("user@host:port" and its shorter forms) and writes the OpenSSH command
// lines the example binaries print as hints. The root package and
// internal/cli share it.
package sshdest

import (
	"fmt"
	"net"
	"strconv"
	"strings"

	"github.com/hpcproxy/hpcproxy/internal/shellenv"
)

// Destination is a parsed SSH destination (hpcproxy.TunnelConfig.Destination).
// Host may still be an
// ssh_config alias; User and Port are empty/zero when not given, so that
// ssh_config (or ssh's defaults) decide.
type Destination struct {
	User string
	Host string
	Port int
}

// Parse splits "user@host:port" and its shorter forms.
// IPv6 addresses take brackets when a port follows ("[::1]:2222"); a bare
// IPv6 address ("::1") is a host without a port.
func Parse(s string) (Destination, error) {
	var d Destination
	if s == "" {
		return d, fmt.Errorf("hpcproxy: empty SSH destination")
	}
	// Errors quote the whole destination as given, not what is left of it.
	orig := s
	if strings.ContainsAny(s, " \t\r\n") || strings.HasPrefix(s, "-") {
		return d, fmt.Errorf("hpcproxy: invalid SSH destination %q", orig)
	}
	if i := strings.LastIndex(s, "@"); i >= 0 {
		d.User, s = s[:i], s[i+1:]
		if d.User == "" {
			return d, fmt.Errorf("hpcproxy: invalid SSH destination %q: empty user", orig)
		}
	}
	host, port := s, ""
	switch {
	case strings.HasPrefix(s, "["):
		h, p, err := net.SplitHostPort(s)
		if err != nil {
			// "[v6addr]" without a port; anything else is malformed.
			h = strings.TrimSuffix(strings.TrimPrefix(s, "["), "]")
			if !strings.HasSuffix(s, "]") || strings.ContainsAny(h, "[]") {
				return d, fmt.Errorf("hpcproxy: invalid SSH destination %q: %w", orig, err)
			}
			p = ""
		}
		host, port = h, p
	case strings.Count(s, ":") == 1:
		host, port, _ = strings.Cut(s, ":")
	}
	if host == "" {
		return d, fmt.Errorf("hpcproxy: invalid SSH destination %q: empty host", orig)
	}
	d.Host = host
	if port != "" {
		n, err := strconv.Atoi(port)
		if err != nil || n < 1 || n > 65535 {
			return d, fmt.Errorf("hpcproxy: invalid SSH destination %q: bad port %q", orig, port)
		}
		d.Port = n
	}
	return d, nil
}

// LoginArgs returns ssh's -l and -p arguments for the user and port of d,
// when given. They must come before every -o on ssh's command line: ssh
// keeps the first value it sees, and the destination's explicit parts take
// precedence over -o User/Port (see sshResolver).
func (d Destination) LoginArgs() []string {
	var args []string
	if d.User != "" {
		args = append(args, "-l", d.User)
	}
	if d.Port != 0 {
		args = append(args, "-p", strconv.Itoa(d.Port))
	}
	return args
}

// Command returns the OpenSSH command line that reaches destination,
// given as hpcproxy takes it ("host", "user@host", "host:port",
// "user@host:port", "[v6addr]:port" or an ssh_config alias), followed by
// args: "ssh -p PORT user@host ARGS...". OpenSSH itself reads no ":port"
// in a destination ("ssh host:2222" dials a host named "host:2222" on port
// 22), so the port moves to -p. A destination hpcproxy would refuse is
// given as it is, after "--".
func Command(destination string, args ...string) string {
	words := []string{"ssh"}
	d, err := Parse(destination)
	if err != nil {
		// After "--": never an option, whatever it looks like.
		words = append(words, "--", shellenv.Quote(destination))
	} else {
		if d.Port != 0 {
			words = append(words, "-p", strconv.Itoa(d.Port))
		}
		host := d.Host
		if d.User != "" {
			host = d.User + "@" + host
		}
		words = append(words, shellenv.Quote(host))
	}
	for _, a := range args {
		words = append(words, shellenv.Quote(a))
	}
	return strings.Join(words, " ")
}

// ForwardHint returns the command a user runs on their own machine to
// reach a reverse forward's remote address (as ForwardInfo.Listen records
// it) through the login node via: `ssh -L LOCALPORT:127.0.0.1:PORT HOST`,
// with -p and the user from via when it names them. It returns "" for an
// address it cannot use.
func ForwardHint(via, remote string, localPort int) string {
	target := remote
	if !strings.Contains(remote, "/") {
		host, port, err := net.SplitHostPort(remote)
		if err != nil || port == "0" {
			return ""
		}
		if host == "" || host == "0.0.0.0" || host == "::" || host == "localhost" {
			host = "127.0.0.1"
		}
		target = net.JoinHostPort(host, port)
		if localPort <= 0 {
			localPort, _ = strconv.Atoi(port)
		}
	} else if localPort <= 0 {
		return ""
	}
	dest, sshPort := via, ""
	at := strings.LastIndex(dest, "@")
	if h, p, err := net.SplitHostPort(dest[at+1:]); err == nil {
		dest, sshPort = dest[:at+1]+h, p
	}
	cmd := fmt.Sprintf("ssh -N -L %d:%s", localPort, target)
	if sshPort != "" && sshPort != "22" {
		cmd += " -p " + sshPort
	}
	return cmd + " " + dest
}
