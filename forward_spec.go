package hpcproxy

// The forward and expose specifications of the command line (ForwardSpec,
// ExposeSpec) and the `ssh -L` hint for a forward.

import (
	"fmt"
	"net"
	"strings"
)

// ForwardSpec is a local forward of a [Daemon]: Listen in the job (see
// [LocalForward.Listen]) to Remote on the login side.
type ForwardSpec struct {
	Listen string // PORT, HOST:PORT or a unix socket path
	Remote string // HOST:PORT as the login node resolves it
}

// String returns the spec as ParseForwardSpec reads it: "LISTEN=REMOTE".
func (s ForwardSpec) String() string { return s.Listen + "=" + s.Remote }

// ParseForwardSpec parses "LOCAL=REMOTE": LOCAL a port (on 127.0.0.1),
// HOST:PORT or a unix socket path; REMOTE a HOST:PORT resolved on the login
// node.
func ParseForwardSpec(s string) (ForwardSpec, error) {
	local, remote, ok := strings.Cut(s, "=")
	if !ok {
		return ForwardSpec{}, fmt.Errorf("hpcproxy: forward %q: want LOCAL=REMOTE, such as 5432=db.internal:5432", s)
	}
	if _, _, err := ListenAddr(local); err != nil {
		return ForwardSpec{}, fmt.Errorf("hpcproxy: forward %q: %w", s, err)
	}
	if _, port, err := net.SplitHostPort(remote); err != nil || port == "" || port == "0" {
		return ForwardSpec{}, fmt.Errorf("hpcproxy: forward %q: REMOTE must be HOST:PORT", s)
	}
	return ForwardSpec{Listen: local, Remote: remote}, nil
}

// Matches reports whether fi, a forward as a daemon reports it, is the
// local forward s asks for: the same target, listening where s says (on
// any port if s asks for port 0).
func (s ForwardSpec) Matches(fi ForwardInfo) bool {
	if fi.Kind != ForwardLocal || fi.Target != s.Remote {
		return false
	}
	network, addr, err := ListenAddr(s.Listen)
	if err != nil {
		return false
	}
	if network == "unix" {
		return fi.Listen == addr
	}
	return sameHostPort(addr, fi.Listen)
}

// sameHostPort reports whether bound, a listener's "host:port", is what
// want asks for, where port 0 in want stands for any port.
func sameHostPort(want, bound string) bool {
	wh, wp, err := net.SplitHostPort(want)
	if err != nil {
		return false
	}
	bh, bp, err := net.SplitHostPort(bound)
	if err != nil {
		return false
	}
	return wh == bh && (wp == "0" || wp == bp)
}

// ExposeSpec is a reverse forward of a [Daemon]: the login node listens
// on Remote and connections reach Local in the job.
type ExposeSpec struct {
	Local  string // HOST:PORT (or a unix socket path) of the service in the job
	Remote string // where the login node listens; "" is 127.0.0.1 with a port sshd chooses
}

// String returns the spec as ParseExposeSpec reads it.
func (s ExposeSpec) String() string {
	if s.Remote == "" {
		return s.Local
	}
	return s.Local + "=" + s.Remote
}

// Matches reports whether fi, a forward as a daemon reports it, is the
// reverse forward s asks for: the same service in the job, and, if s names
// one, the same address on the login node (any port if s asks for port 0).
func (s ExposeSpec) Matches(fi ForwardInfo) bool {
	if fi.Kind != ForwardReverse || fi.Target != s.Local {
		return false
	}
	switch {
	case s.Remote == "":
		return true
	case isSocketPath(s.Remote):
		return fi.Listen == s.Remote
	}
	return sameHostPort(s.Remote, fi.Listen)
}

// ParseExposeSpec parses "LOCAL[=REMOTE]": LOCAL a port (of 127.0.0.1),
// HOST:PORT or a unix socket path in the job; REMOTE optionally where the
// login node listens: a port (on its 127.0.0.1), HOST:PORT or a socket
// path. Without REMOTE, sshd picks a free port on its 127.0.0.1.
func ParseExposeSpec(s string) (ExposeSpec, error) {
	local, remote, _ := strings.Cut(s, "=")
	var spec ExposeSpec
	if _, addr, err := ListenAddr(local); err != nil {
		return spec, fmt.Errorf("hpcproxy: expose %q: %w", s, err)
	} else {
		spec.Local = addr
	}
	if remote != "" {
		if _, addr, err := ListenAddr(remote); err != nil {
			return spec, fmt.Errorf("hpcproxy: expose %q: %w", s, err)
		} else {
			spec.Remote = addr
		}
	}
	return spec, nil
}
