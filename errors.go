package hpcproxy

import (
	"errors"
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
