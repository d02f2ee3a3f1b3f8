package hpcproxy

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"

	"github.com/skeema/knownhosts"
	"golang.org/x/crypto/ssh"
	xknownhosts "golang.org/x/crypto/ssh/knownhosts"
)

// UnknownHostError reports that no known_hosts file records a key for the
// login node, and the host key policy does not allow recording it.
type UnknownHostError struct {
	Host        string   // the name looked up, "host" or "[host]:port"
	KeyType     string   // the type of the key the server offered
	Fingerprint string   // its SHA256 fingerprint
	Files       []string // the known_hosts files checked
}

func (e *UnknownHostError) Error() string {
	return fmt.Sprintf("hpcproxy: host %s is not in known_hosts (it offered %s key %s; checked %s): "+
		"run `ssh %s` once to verify and record its key, or use the accept-new host key policy",
		e.Host, e.KeyType, e.Fingerprint, fileList(e.Files), sshHostArg(e.Host))
}

// HostKeyChangedError reports that the login node offered a key other than
// the one known_hosts records for it: either the host was reinstalled or
// someone is intercepting the connection. It is never accepted.
type HostKeyChangedError struct {
	Host        string // the name looked up, "host" or "[host]:port"
	KeyType     string // the type of the key the server offered
	Fingerprint string // its SHA256 fingerprint
	// Known lists the recorded keys, each "FILE:LINE TYPE FINGERPRINT".
	Known []string
}

func (e *HostKeyChangedError) Error() string {
	file := ""
	if len(e.Known) > 0 {
		file, _, _ = strings.Cut(e.Known[0], ":")
	}
	return fmt.Sprintf("hpcproxy: HOST KEY CHANGED for %s: it offered %s key %s, but known_hosts records %s; "+
		"someone may be intercepting the connection. If the key changed legitimately, remove the old entry "+
		"(ssh-keygen -R '%s' -f %s) and verify the new one",
		e.Host, e.KeyType, e.Fingerprint, strings.Join(e.Known, ", "), e.Host, file)
}

// hostKeyVerifier checks a login node's host key against the user's and the
// global known_hosts files, OpenSSH style:
//
//   - the name looked up is HostKeyAlias if set, else HostName, as
//     "[name]:port" for ports other than 22 (hashed entries, wildcards,
//     @cert-authority and @revoked lines work as in OpenSSH);
//   - when the name is unknown, the address actually connected to is looked
//     up too, so a host recorded by IP address is recognised;
//   - an unknown host is refused, unless the policy is HostKeyAcceptNew,
//     which appends the key to the first UserKnownHostsFile;
//   - a changed or revoked key is always refused.
//
// Missing known_hosts files count as empty.
type hostKeyVerifier struct {
	lookup    string   // "name:port", as the knownhosts callback wants it
	name      string   // the same in known_hosts form: "name" or "[name]:port"
	userFiles []string // UserKnownHostsFile; the first is written by accept-new
	files     []string // every file that exists, user and global
	policy    HostKeyPolicy
	hash      bool // HashKnownHosts: record names hashed
	db        *knownhosts.HostKeyDB
	log       *slog.Logger

	mu  sync.Mutex
	err error // the last verification failure, for callers
}

// newHostKeyVerifier loads the known_hosts files of s.
func newHostKeyVerifier(s *sshSettings, policy HostKeyPolicy, log *slog.Logger) (*hostKeyVerifier, error) {
	name := s.HostName
	if s.HostKeyAlias != "" {
		name = s.HostKeyAlias
	}
	lookup := net.JoinHostPort(name, strconv.Itoa(s.Port))
	v := &hostKeyVerifier{
		lookup:    lookup,
		name:      knownhosts.Normalize(lookup),
		userFiles: s.UserKnownHostsFiles,
		policy:    policy,
		hash:      s.HashKnownHosts,
		log:       log,
	}
	for _, f := range slices.Concat(s.UserKnownHostsFiles, s.GlobalKnownHostsFiles) {
		if _, err := os.Stat(f); errors.Is(err, fs.ErrNotExist) {
			continue
		} else if err != nil {
			return nil, fmt.Errorf("hpcproxy: known_hosts: %w", err)
		}
		if !slices.Contains(v.files, f) {
			v.files = append(v.files, f)
		}
	}
	db, err := knownhosts.NewDB(v.files...)
	if err != nil {
		return nil, fmt.Errorf("hpcproxy: reading known_hosts: %w", err)
	}
	v.db = db
	return v, nil
}

// algorithms returns the host key algorithms to offer: those known_hosts
// holds for the host (by name, and by addr when given), then the remaining
// defaults, so the server presents the key type that was recorded instead
// of one that would look like a changed key (golang/go#29286). Certificate
// algorithms are offered only when a @cert-authority line covers the host.
// configured, when non-nil, limits the list (ssh_config HostKeyAlgorithms).
func (v *hostKeyVerifier) algorithms(addr string, configured []string) []string {
	known := v.db.HostKeyAlgorithms(v.lookup)
	if addr != "" {
		for _, a := range v.db.HostKeyAlgorithms(addr) {
			if !slices.Contains(known, a) {
				known = append(known, a)
			}
		}
	}
	all := configured
	if all == nil {
		all = ssh.SupportedAlgorithms().HostKeys
	}
	var out []string
	for _, a := range known {
		if slices.Contains(all, a) {
			out = append(out, a)
		}
	}
	for _, a := range all {
		if !slices.Contains(out, a) && !strings.Contains(a, "-cert-") {
			out = append(out, a)
		}
	}
	return out
}

// callback returns the ssh.HostKeyCallback for one connection.
func (v *hostKeyVerifier) callback() ssh.HostKeyCallback {
	return func(_ string, remote net.Addr, key ssh.PublicKey) error {
		err := v.check(remote, key)
		if err != nil {
			v.mu.Lock()
			v.err = err
			v.mu.Unlock()
		}
		return err
	}
}

// lastErr returns the last verification failure, if any.
func (v *hostKeyVerifier) lastErr() error {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.err
}

func (v *hostKeyVerifier) check(remote net.Addr, key ssh.PublicKey) error {
	cb := v.db.HostKeyCallback()
	err := v.classify(v.name, cb(v.lookup, remote, key), key)
	var unknown *UnknownHostError
	if !errors.As(err, &unknown) {
		return err
	}
	// Like OpenSSH's CheckHostIP: the address connected to may be recorded
	// when the name is not.
	if tcp, ok := remote.(*net.TCPAddr); ok && tcp.IP != nil && !tcp.IP.IsUnspecified() {
		addrName := knownhosts.Normalize(tcp.String())
		if addrName != v.name {
			aerr := v.classify(addrName, cb(tcp.String(), remote, key), key)
			if aerr == nil {
				v.log.Debug("host key recorded for the address, not the name", "host", v.name, "addr", addrName)
				return nil
			}
			if !errors.As(aerr, &unknown) {
				return aerr
			}
		}
	}
	if v.policy != HostKeyAcceptNew {
		return &UnknownHostError{Host: v.name, KeyType: key.Type(), Fingerprint: ssh.FingerprintSHA256(key), Files: v.filesChecked()}
	}
	return v.record(key)
}

// classify turns a knownhosts callback error into ours.
func (v *hostKeyVerifier) classify(name string, err error, key ssh.PublicKey) error {
	if err == nil {
		return nil
	}
	var revoked *xknownhosts.RevokedError
	if errors.As(err, &revoked) {
		return fmt.Errorf("hpcproxy: host key of %s (%s %s) is marked @revoked in %s:%d: %w",
			name, key.Type(), ssh.FingerprintSHA256(key), revoked.Revoked.Filename, revoked.Revoked.Line, err)
	}
	var ke *xknownhosts.KeyError
	if !errors.As(err, &ke) {
		return fmt.Errorf("hpcproxy: checking the host key of %s: %w", name, err)
	}
	if len(ke.Want) == 0 {
		return &UnknownHostError{Host: name, KeyType: key.Type(), Fingerprint: ssh.FingerprintSHA256(key), Files: v.filesChecked()}
	}
	ce := &HostKeyChangedError{Host: name, KeyType: key.Type(), Fingerprint: ssh.FingerprintSHA256(key)}
	for _, w := range ke.Want {
		ce.Known = append(ce.Known, fmt.Sprintf("%s:%d %s %s", w.Filename, w.Line, w.Key.Type(), ssh.FingerprintSHA256(w.Key)))
	}
	return ce
}

// filesChecked returns the files looked at, or all configured ones when
// none exists (so the message says where a key would be expected).
func (v *hostKeyVerifier) filesChecked() []string {
	if len(v.files) > 0 {
		return v.files
	}
	return v.userFiles
}

// record appends key for the host to the first UserKnownHostsFile, creating
// it (0600) and its directory (0700) when missing.
func (v *hostKeyVerifier) record(key ssh.PublicKey) error {
	if len(v.userFiles) == 0 {
		return &UnknownHostError{Host: v.name, KeyType: key.Type(), Fingerprint: ssh.FingerprintSHA256(key), Files: v.filesChecked()}
	}
	file := v.userFiles[0]
	if err := os.MkdirAll(filepath.Dir(file), 0o700); err != nil {
		return fmt.Errorf("hpcproxy: recording host key: %w", err)
	}
	f, err := os.OpenFile(file, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("hpcproxy: recording host key: %w", err)
	}
	name := v.name
	if v.hash {
		name = xknownhosts.HashHostname(name)
	}
	line := knownhosts.Line([]string{name}, key) + "\n"
	if st, err := f.Stat(); err == nil && st.Size() > 0 && !endsWithNewline(file, st.Size()) {
		line = "\n" + line
	}
	if _, err := f.WriteString(line); err != nil {
		f.Close()
		return fmt.Errorf("hpcproxy: recording host key: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("hpcproxy: recording host key: %w", err)
	}
	v.log.Warn("recorded new host key (accept-new)", "host", v.name, "key", key.Type(),
		"fingerprint", ssh.FingerprintSHA256(key), "file", file)
	return nil
}

func endsWithNewline(file string, size int64) bool {
	f, err := os.Open(file)
	if err != nil {
		return true
	}
	defer f.Close()
	b := make([]byte, 1)
	if _, err := f.ReadAt(b, size-1); err != nil {
		return true
	}
	return b[0] == '\n'
}

// hostKeyPolicy combines the caller's policy with ssh_config's
// StrictHostKeyChecking. accept-new in either selects HostKeyAcceptNew.
// "no" and "off" are NOT honoured: hpcproxy never connects to a host whose
// key it cannot verify, so they are treated as strict, with a warning.
func hostKeyPolicy(p HostKeyPolicy, s *sshSettings, log *slog.Logger) HostKeyPolicy {
	switch s.StrictHostKeyChecking {
	case "accept-new":
		return HostKeyAcceptNew
	case "no", "off", "false":
		log.Warn("ignoring StrictHostKeyChecking="+s.StrictHostKeyChecking+
			": hpcproxy always verifies host keys (use accept-new to record first-seen keys)", "host", s.Host)
	}
	return p
}

func fileList(files []string) string {
	if len(files) == 0 {
		return "no known_hosts file"
	}
	return strings.Join(files, ", ")
}

// sshHostArg turns a known_hosts name back into ssh arguments.
func sshHostArg(name string) string {
	if h, p, err := net.SplitHostPort(name); err == nil {
		return "-p " + p + " " + h
	}
	return name
}
