package hpcproxy

import (
	"context"
	"errors"
	"net"
	"strings"
	"syscall"

	"golang.org/x/crypto/ssh"
)

// ErrProhibited is wrapped by dial errors when the login node refuses to
// forward to the destination (sshd's AllowTcpForwarding or PermitOpen), and
// by the proxy server when its own rules refuse a destination.
var ErrProhibited = errors.New("hpcproxy: forwarding not allowed")

// RemoteDialError reports that the login node tried to reach Addr and
// failed. When the login node's reason names a well-known cause, Unwrap
// returns the matching errno (syscall.ECONNREFUSED, EHOSTUNREACH,
// ENETUNREACH, ETIMEDOUT) or ErrProhibited, so callers can test with
// errors.Is.
type RemoteDialError struct {
	Addr   string // the destination, "host:port"
	Reason string // what the login node said
	cause  error
}

func (e *RemoteDialError) Error() string {
	return "hpcproxy: login node could not connect to " + e.Addr + ": " + e.Reason
}

// Unwrap returns the classified cause, or nil when the reason is unknown.
func (e *RemoteDialError) Unwrap() error { return e.cause }

// Timeout reports whether the login node timed out connecting.
func (e *RemoteDialError) Timeout() bool { return e.cause == syscall.ETIMEDOUT }

// newRemoteDialError classifies the reason text that sshd (or ssh's stderr)
// gave for a failed connect.
func newRemoteDialError(addr, reason string) *RemoteDialError {
	e := &RemoteDialError{Addr: addr, Reason: reason}
	r := strings.ToLower(reason)
	switch {
	case strings.Contains(r, "refused"):
		e.cause = syscall.ECONNREFUSED
	case strings.Contains(r, "no route to host"):
		e.cause = syscall.EHOSTUNREACH
	case strings.Contains(r, "network is unreachable"):
		e.cause = syscall.ENETUNREACH
	case strings.Contains(r, "timed out"):
		e.cause = syscall.ETIMEDOUT
	case strings.Contains(r, "administratively prohibited"), strings.Contains(r, "prohibited"),
		strings.Contains(r, "not permitted"):
		e.cause = ErrProhibited
	case strings.Contains(r, "not known"), strings.Contains(r, "unknown host"),
		strings.Contains(r, "name resolution"), strings.Contains(r, "no address"):
		e.cause = syscall.EHOSTUNREACH
	}
	return e
}

// convertOpenChannelError turns an SSH channel-open rejection into a
// *RemoteDialError; other errors pass through unchanged.
func convertOpenChannelError(addr string, err error) error {
	var oce *ssh.OpenChannelError
	if !errors.As(err, &oce) {
		return err
	}
	e := newRemoteDialError(addr, oce.Message)
	if e.cause == nil && oce.Reason == ssh.Prohibited {
		e.cause = ErrProhibited
	}
	switch {
	case e.Reason == "":
		e.Reason = oce.Reason.String()
	case oce.Reason == ssh.Prohibited && !strings.Contains(strings.ToLower(e.Reason), "prohibited"):
		// sshd refusing by AllowTcpForwarding or PermitOpen says only
		// "open failed": name the reason code.
		e.Reason = oce.Reason.String() + ": " + e.Reason
	}
	return e
}

// dialFailure classifies a dial error for the reply codes of every
// protocol.
type dialFailure int

const (
	failGeneral dialFailure = iota
	failRefused
	failNetUnreachable
	failHostUnreachable
	failTimeout
	failProhibited
	failTunnelDown
	failBusy
)

func classifyDialError(err error) dialFailure {
	var dnsErr *net.DNSError
	var ne net.Error
	switch {
	case errors.Is(err, errTooManyConns):
		return failBusy
	case errors.Is(err, ErrTunnelDown):
		return failTunnelDown
	case errors.Is(err, ErrProhibited):
		return failProhibited
	case errors.Is(err, syscall.ECONNREFUSED):
		return failRefused
	case errors.Is(err, syscall.ENETUNREACH):
		return failNetUnreachable
	case errors.Is(err, syscall.EHOSTUNREACH):
		return failHostUnreachable
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, syscall.ETIMEDOUT),
		errors.As(err, &ne) && ne.Timeout():
		return failTimeout
	case errors.As(err, &dnsErr):
		return failHostUnreachable
	}
	return failGeneral
}

// reason is the short text that HTTP error bodies and logs give.
func (f dialFailure) reason() string {
	switch f {
	case failRefused:
		return "connection refused"
	case failNetUnreachable:
		return "network unreachable"
	case failHostUnreachable:
		return "host unreachable or unknown"
	case failTimeout:
		return "timed out"
	case failProhibited:
		return "forwarding to this destination is not allowed"
	case failTunnelDown:
		return "the tunnel to the login node is down (reconnecting); try again shortly"
	case failBusy:
		return "too many connections; try again later"
	}
	return "connection failed"
}
