package hpcproxy

import (
	"crypto/rand"
	"crypto/subtle"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/url"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/hpcproxy/hpcproxy/internal/daemonproc"
	"github.com/hpcproxy/hpcproxy/internal/jobenv"
)

// State files
//
// A running daemon describes itself in a JSON state file (a "PID file" in
// the names of the functions that handle it). There are two scopes:
//
//   - shared: one proxy per user on a login node, listening on all
//     interfaces. Its state file is PidFilePath(), in the user's data dir,
//     which is normally on NFS so that compute nodes can read it.
//   - per-job: one proxy per job on a compute node, listening on 127.0.0.1.
//     Its state file is LocalPidFilePath(), in a per-user directory of the
//     node-local tmp dir (see [EnvTmpDir]), named after the job.
//
// The environment can move both: HPCPROXY_STATE_DIR replaces the shared
// state directory, HPCPROXY_TMPDIR the node-local tmp dir.
//
// Every state directory is created 0700 and must be owned by the user and
// not writable by group or others; state files are written atomically
// (temporary file, fsync, rename) with mode 0600, because they hold the
// proxy's credentials.

// Environment variables that relocate state.
const (
	// EnvStateDir, if set, is used as the shared-mode state directory
	// instead of $XDG_DATA_HOME/hpcproxy.
	EnvStateDir = "HPCPROXY_STATE_DIR"
	// EnvTmpDir, if set, is the node-local tmp dir, ahead of the job's
	// tmp dir that the scheduler names ($SLURM_TMPDIR, $LSB_JOB_TMPDIR, ...),
	// $TMPDIR and /tmp.
	EnvTmpDir = "HPCPROXY_TMPDIR"
)

// Mode is a daemon's scope.
type Mode string

// The two daemon modes.
const (
	// ModeShared is one proxy per user on a login node, listening on all
	// interfaces, with credentials required.
	ModeShared Mode = "shared"
	// ModePerJob is one proxy per job on a compute node, listening on
	// 127.0.0.1, open only to the same user.
	ModePerJob Mode = "per-job"
)

// Status is what a daemon reports about its tunnel in the state file.
type Status string

// Daemon statuses.
const (
	// StatusStarting: the state file is claimed and the daemon is not
	// ready yet. Port is 0 (or the requested port) until the listener is
	// bound, then the bound port, while the tunnel and the forwards come
	// up.
	StatusStarting Status = "starting"
	// StatusUp: listening, tunnel up.
	StatusUp Status = "up"
	// StatusReconnecting: still listening, the tunnel dropped and is being
	// re-established; dials fail with ErrTunnelDown meanwhile.
	StatusReconnecting Status = "reconnecting"
	// StatusUnresponsive: listening, the tunnel is up but the login node
	// left a keepalive unanswered for a whole keepalive interval (gossh
	// only, see [Tunnel.Unresponsive]): the link may be hung. The daemon
	// notices within its StatsInterval; it becomes "up" again with the
	// next reply, or "reconnecting" after KeepaliveCountMax misses.
	StatusUnresponsive Status = "unresponsive"
)

// credentialsUser is the user name carried in proxy URLs. Only the token
// is secret; the fixed name just fills the userinfo slot that clients
// expect (http://hpcproxy:TOKEN@host:port).
const credentialsUser = "hpcproxy"

// ProxyCredentials are what a client presents to the proxy: HTTP
// Proxy-Authorization Basic, SOCKS5 username/password (RFC 1929), carried
// in proxy URLs as userinfo.
//
// # Security model
//
// The proxy relays as its owner, through the owner's SSH login, so it is
// never open to everyone:
//
//   - Shared mode (login node, all interfaces) always requires
//     credentials. The daemon generates them at start
//     (newProxyCredentials) and keeps them only in its 0600 state file in
//     the user's 0700 data dir; FindActiveProxy and ProxyEnvList hand them
//     to the user's own programs in the proxy URL. Other users cannot read
//     the file, so they cannot use the proxy. A daemon may further
//     restrict clients to an allow-list of networks.
//   - Per-job mode (compute node, 127.0.0.1) accepts the same user only:
//     a client presenting the token, or a loopback client whose socket
//     belongs to the daemon's UID (SO_PEERCRED; for loopback TCP, the socket's owner), so that tools which
//     cannot send proxy credentials still work for their owner and for
//     nobody else sharing the node.
type ProxyCredentials struct {
	User  string `json:"user"`
	Token string `json:"token"`
}

// newProxyCredentials returns credentials with user credentialsUser and a
// fresh token of 32 bytes from crypto/rand, base64url-encoded (43
// characters, safe in URL userinfo without escaping).
func newProxyCredentials() (ProxyCredentials, error) {
	var b [32]byte
	if _, err := rand.Read(b[:]); err != nil {
		return ProxyCredentials{}, fmt.Errorf("hpcproxy: generate token: %w", err)
	}
	return ProxyCredentials{User: credentialsUser, Token: base64.RawURLEncoding.EncodeToString(b[:])}, nil
}

// Match reports, in constant time with respect to the secret, whether user
// and token are these credentials. Empty credentials match nothing.
func (c ProxyCredentials) Match(user, token string) bool {
	if c.Token == "" {
		return false
	}
	u := subtle.ConstantTimeCompare([]byte(user), []byte(c.User))
	t := subtle.ConstantTimeCompare([]byte(token), []byte(c.Token))
	return u&t == 1
}

// ProxyState is the content of a state file. The first four fields are the
// original format; the rest are optional, and readers ignore fields they
// do not know, so the format can grow.
type ProxyState struct {
	// Host is os.Hostname() of the node the daemon runs on. Liveness is
	// checked by PID only when Host is this host.
	Host string `json:"host"`
	// Via is the SSH destination (login node) the tunnel goes through, or
	// several, separated by commas (TunnelConfig.Destinations).
	Via string `json:"via"`
	// Port is the listening port (SOCKS5, SOCKS4a, HTTP on one port).
	Port int `json:"port"`
	// PID is the daemon's process ID on Host.
	PID int `json:"pid"`

	// Mode is ModeShared or ModePerJob.
	Mode Mode `json:"mode,omitempty"`
	// AdvertiseHost optionally names the host clients should dial. If
	// empty, clients use 127.0.0.1 for a per-job proxy and Host for a
	// shared one.
	AdvertiseHost string `json:"advertise_host,omitempty"`
	// Method is the tunnel method in use ([Method.String]).
	Method string `json:"method,omitempty"`
	// ViaInUse is the login node of Via that the tunnel reached (or last
	// reached, while reconnecting).
	ViaInUse string `json:"via_in_use,omitempty"`
	// Started is when the daemon started.
	Started time.Time `json:"started,omitzero"`
	// Status and StatusSince describe the tunnel; the daemon rewrites the
	// file when they change.
	Status      Status    `json:"status,omitempty"`
	StatusSince time.Time `json:"status_since,omitzero"`
	// Reconnects counts tunnel re-establishments since Started.
	Reconnects int `json:"reconnects,omitempty"`
	// LastError is the last tunnel error, while reconnecting.
	LastError string `json:"last_error,omitempty"`
	// Credentials are required by the proxy (always in shared mode; in
	// per-job mode the owner's own loopback connections may skip them).
	Credentials *ProxyCredentials `json:"credentials,omitempty"`
	// JobID and Scheduler identify the job a per-job proxy belongs to.
	JobID     string `json:"job_id,omitempty"`
	Scheduler string `json:"scheduler,omitempty"`
	// LogFile is where the daemon's stdout and stderr go.
	LogFile string `json:"log_file,omitempty"`
	// Stats are the daemon's connection and byte counters, refreshed
	// periodically while they change.
	Stats *DaemonStats `json:"stats,omitempty"`
	// Forwards are the daemon's port forwards (Daemon.Forwards and
	// Daemon.Exposes) with their addresses, status and counters, refreshed
	// with Stats and whenever a reverse forward is (re)bound.
	Forwards []ForwardInfo `json:"forwards,omitempty"`
	// Node describes the node tunnel a per-job proxy shares with the
	// user's other jobs on the node; nil for a private one.
	Node *NodeTunnelInfo `json:"node,omitempty"`
	// LoginNodes are what the login node(s) carry for this daemon (for a
	// node tunnel: for all its jobs), refreshed with Stats.
	LoginNodes []LoginNodeStats `json:"login_nodes,omitempty"`
}

// LoginNodeStats is what one login node carries for a daemon: its part of
// `status --json`. The JSON names are stable.
type LoginNodeStats struct {
	Host   string `json:"host"`   // the SSH destination (Via); "direct" when relaying directly
	InUse  bool   `json:"in_use"` // the tunnel goes through it now
	Status Status `json:"status"` // up or reconnecting
	Method string `json:"method"` // the tunnel method
	// Connections counts the SSH connections open to it (each costs an
	// sshd session there); 0 while reconnecting.
	Connections int `json:"connections"`
	// Channels and ChannelsTotal count the connections carried through
	// it (proxied and forwarded): open now, and since start.
	Channels      int64 `json:"channels"`
	ChannelsTotal int64 `json:"channels_total"`
	BytesIn       int64 `json:"bytes_in"`  // client to destination
	BytesOut      int64 `json:"bytes_out"` // destination to client
	// Jobs counts the jobs whose traffic these figures sum.
	Jobs int `json:"jobs"`
}

// DaemonStats are a running daemon's counters as of Updated.
type DaemonStats struct {
	Active           int64     `json:"active"`    // connections being served
	Total            int64     `json:"total"`     // connections accepted since start
	BytesIn          int64     `json:"bytes_in"`  // client to destination
	BytesOut         int64     `json:"bytes_out"` // destination to client
	FailedHandshakes int64     `json:"failed_handshakes"`
	Updated          time.Time `json:"updated"`
}

// Login returns the login node the tunnel goes through: ViaInUse if the
// daemon recorded it, else Via.
func (ps *ProxyState) Login() string {
	if ps.ViaInUse != "" {
		return ps.ViaInUse
	}
	return ps.Via
}

// DialHost returns the host clients dial: AdvertiseHost if set, 127.0.0.1
// for a per-job proxy, else Host.
func (ps *ProxyState) DialHost() string {
	switch {
	case ps.AdvertiseHost != "":
		return ps.AdvertiseHost
	case ps.Mode == ModePerJob:
		return "127.0.0.1"
	}
	return ps.Host
}

// Addr returns DialHost():Port.
func (ps *ProxyState) Addr() string {
	return net.JoinHostPort(ps.DialHost(), strconv.Itoa(ps.Port))
}

// URL returns the proxy's URL with the given scheme ("http", "socks5h",
// ...) and the credentials, if any, as userinfo:
// http://hpcproxy:TOKEN@host:port.
func (ps *ProxyState) URL(scheme string) string {
	u := url.URL{Scheme: scheme, Host: ps.Addr()}
	if c := ps.Credentials; c != nil && c.Token != "" {
		u.User = url.UserPassword(c.User, c.Token)
	}
	return u.String()
}

// Errors about state files.
var (
	// ErrUnsafePath is wrapped by errors about a state directory or file
	// that is owned by someone else, writable by others, or not what it
	// should be (a symlink, not a directory). hpcproxy never uses one.
	ErrUnsafePath = daemonproc.ErrUnsafePath
	// ErrAlreadyRunning is matched (errors.Is) by *AlreadyRunningError, and
	// by the error of a daemon start whose daemon reported one.
	ErrAlreadyRunning = errors.New("hpcproxy: proxy already running")
)

// AlreadyRunningError is returned by claimStateFile when the scope already
// has a proxy, possibly on another host, or one still starting.
type AlreadyRunningError struct {
	Path    string      // the state file
	State   *ProxyState // its content; nil if the owner has not written it yet
	Verdict StateVerdict
}

// Error describes the running proxy and names the state file.
func (e *AlreadyRunningError) Error() string {
	s := ErrAlreadyRunning.Error()
	if e.State != nil {
		s += fmt.Sprintf(": pid %d on %s, port %d", e.State.PID, e.State.Host, e.State.Port)
		if e.State.Status != "" {
			s += " (" + string(e.State.Status) + ")"
		}
	}
	return s + " [" + e.Path + "]"
}

// Is makes errors.Is(err, ErrAlreadyRunning) true.
func (e *AlreadyRunningError) Is(target error) bool { return target == ErrAlreadyRunning }

// stateDir returns the shared-mode state directory: $HPCPROXY_STATE_DIR,
// else $XDG_DATA_HOME/hpcproxy, else HOME/.local/share/hpcproxy. HOME is
// $HOME if set, else the passwd entry's home: the data dir is the user's
// to choose, and a shared proxy is looked up from compute nodes through the
// same (NFS) home.
func stateDir() string {
	if d := os.Getenv(EnvStateDir); d != "" {
		return d
	}
	if d := os.Getenv("XDG_DATA_HOME"); d != "" && filepath.IsAbs(d) {
		return filepath.Join(d, "hpcproxy")
	}
	return filepath.Join(homeDir(), ".local", "share", "hpcproxy")
}

// localStateDir returns the per-job state directory: hpcproxy-UID in the
// node-local tmp dir (jobenv.TmpDir). If another user owns a file of that
// name (squatting it), it is a private directory beside it instead,
// hpcproxy-UID.XXXXXXXX (mode 0700, made by the first call that needs
// it, as mkdtemp does), which later calls find again.
func localStateDir() string {
	return uidTmpDir(jobenv.TmpDir())
}

// PidFilePath returns the shared-mode state file, stateDir()/proxy.json.
func PidFilePath() string { return filepath.Join(stateDir(), "proxy.json") }

// LocalPidFilePath returns the per-job state file in localStateDir():
// proxy-JOBID.json inside a scheduler job (two jobs of one user can share
// a node), proxy.json outside one.
func LocalPidFilePath() string {
	return filepath.Join(localStateDir(), "proxy"+jobSuffix()+".json")
}

// LogFilePath returns the log file that goes with a state file: the same
// name with ".log" for ".json".
func LogFilePath(statePath string) string {
	return strings.TrimSuffix(statePath, ".json") + ".log"
}

func jobSuffix() string {
	if j := jobenv.Detect(); j.InJob && j.JobID != "" {
		return "-" + sanitizeName(j.JobID)
	}
	return ""
}

// sanitizeName keeps job IDs ("1234.pbs01", "5_[1-3]") file-name safe.
func sanitizeName(s string) string {
	return strings.Map(func(r rune) rune {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '.', r == '-', r == '_':
			return r
		}
		return '_'
	}, s)
}

func homeDir() string {
	if h := os.Getenv("HOME"); h != "" {
		return h
	}
	if u, err := user.LookupId(strconv.Itoa(os.Getuid())); err == nil && u.HomeDir != "" {
		return u.HomeDir
	}
	return "/"
}

// ReadPidFile reads the shared-mode state file.
func ReadPidFile() (*ProxyState, error) { return ReadPidFileAt(PidFilePath()) }

// ReadLocalPidFile reads the per-job state file.
func ReadLocalPidFile() (*ProxyState, error) { return ReadPidFileAt(LocalPidFilePath()) }

// ReadPidFileAt reads and parses a state file. A missing file gives an
// error wrapping fs.ErrNotExist. A file that is not a regular file owned by
// the user gives an error wrapping ErrUnsafePath: it holds credentials that
// clients will send, so it must come from the user.
func ReadPidFileAt(path string) (*ProxyState, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
	if err != nil {
		if errors.Is(err, syscall.ELOOP) {
			return nil, fmt.Errorf("%w: %s is a symlink", ErrUnsafePath, path)
		}
		return nil, fmt.Errorf("hpcproxy: read state: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("hpcproxy: read state: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("%w: %s is not a regular file", ErrUnsafePath, path)
	}
	if uid := fileUID(fi); uid != os.Getuid() {
		return nil, fmt.Errorf("%w: %s is owned by uid %d, not %d", ErrUnsafePath, path, uid, os.Getuid())
	}
	var ps ProxyState
	if err := json.NewDecoder(f).Decode(&ps); err != nil {
		return nil, fmt.Errorf("hpcproxy: parse state file %s: %w", path, err)
	}
	return &ps, nil
}

// WritePidFileAt writes ps to path atomically: a temporary file in the same
// directory (mode 0600), fsync, rename over path, fsync of the directory.
// The directory is created 0700 if missing and refused (ErrUnsafePath) if
// another user owns it or others can write to it. WritePidFileAt does not
// check who owns the scope: a daemon uses claimStateFile and
// [stateClaim.Update].
func WritePidFileAt(path string, ps ProxyState) error {
	dir := filepath.Dir(path)
	if err := ensurePrivateDir(dir); err != nil {
		return err
	}
	tmp, err := writeTemp(dir, &ps)
	if err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("hpcproxy: write state: %w", err)
	}
	syncDir(dir)
	return nil
}

// writeTemp writes ps to a new 0600 file in dir, fsyncs it and returns its
// name.
func writeTemp(dir string, ps *ProxyState) (string, error) {
	b, err := json.MarshalIndent(ps, "", "  ")
	if err != nil {
		return "", fmt.Errorf("hpcproxy: encode state: %w", err)
	}
	b = append(b, '\n')
	f, err := os.CreateTemp(dir, ".proxy-*.tmp") // mode 0600
	if err != nil {
		return "", fmt.Errorf("hpcproxy: write state: %w", err)
	}
	name := f.Name()
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(name)
		return "", fmt.Errorf("hpcproxy: write state: %w", err)
	}
	return name, nil
}

func syncDir(dir string) {
	// Best effort: the rename is durable once the directory is synced, but
	// some file systems refuse fsync on a directory.
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		d.Close()
	}
}

// RemovePidFile removes the shared-mode state file unless it belongs to
// another live proxy: one on another host (never removed from here), or
// a live process other than this one on this host. It never deletes the
// state of a running daemon.
func RemovePidFile() {
	path := PidFilePath()
	ps, err := ReadPidFileAt(path)
	if err != nil {
		return
	}
	if ps.Host == thisHost() && ps.PID == os.Getpid() {
		removeIfUnchanged(path, ps)
		return
	}
	_, _ = RemoveStaleState(path)
}

// ensurePrivateDir creates dir (and its parents) 0700 if needed and
// checks that only the user can use it; see daemonproc.EnsurePrivateDir.
func ensurePrivateDir(dir string) error { return daemonproc.EnsurePrivateDir(dir) }

func fileUID(fi fs.FileInfo) int { return daemonproc.FileUID(fi) }
