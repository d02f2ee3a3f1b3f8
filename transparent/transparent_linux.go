package transparent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Config says how the connections of a transparent command are carried.
type Config struct {
	// Dial opens a connection through the tunnel; it is called with
	// network "tcp" and addr "host:port", host being the name the command
	// resolved (to resolve on the far side) or the address it connected
	// to. Required. ctx bounds the dial only.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)

	// Exclude optionally lists networks that are dialled directly from
	// this process's network namespace (with DirectDial) instead of
	// through Dial: cluster subnets the command should reach without the
	// tunnel. Names never match: only connections to an address do.
	Exclude []netip.Prefix

	// DirectDial optionally dials the excluded networks; if nil, a
	// net.Dialer.
	DirectDial func(ctx context.Context, network, addr string) (net.Conn, error)

	// DialTimeout optionally bounds each dial; if zero, 30 seconds.
	DialTimeout time.Duration

	// Logger optionally receives a line per failed dial (Info) and per
	// connection (Debug); if nil, nothing is logged.
	Logger *slog.Logger

	// Executable optionally names the program Start re-executes as the
	// namespace stage (it must call [Init] first thing in main); if
	// empty, this program (os.Executable).
	Executable string
}

// ErrUnavailable is wrapped by every error that says this node does not
// let an unprivileged user run a transparent command (user namespaces off,
// no usable /dev/net/tun). The proxy itself works there: use it through
// its environment variables instead.
var ErrUnavailable = errors.New("transparent mode is not available on this node")

// SetupError is an [ErrUnavailable] error: what failed, and the setting
// of the node responsible for it.
type SetupError struct {
	What    string // what could not be done
	Setting string // the node's setting that forbids it, with the value that would allow it
	Err     error  // the cause, if any
}

func (e *SetupError) Error() string {
	s := "transparent: " + e.What
	if e.Err != nil {
		s += ": " + e.Err.Error()
	}
	if e.Setting != "" {
		s += " (" + e.Setting + ")"
	}
	return s
}

func (e *SetupError) Unwrap() []error { return []error{ErrUnavailable, e.Err} }

// readSysctl returns the trimmed content of /proc/sys/PATH, or "" if it
// does not exist.
func readSysctl(path string) string {
	b, err := os.ReadFile(filepath.Join("/proc/sys", path))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// Check reports whether this node lets the current user run a transparent
// command: unprivileged user namespaces allowed (kernel.unprivileged_userns_clone,
// user.max_user_namespaces) and /dev/net/tun openable. It returns a
// *SetupError naming the setting otherwise. Start calls it; AppArmor's
// restriction (kernel.apparmor_restrict_unprivileged_userns) shows only
// when the namespace is set up, and Start names it then.
func Check() error {
	if readSysctl("user/max_user_namespaces") == "0" {
		return &SetupError{What: "user namespaces are disabled on this node", Setting: "sysctl user.max_user_namespaces=0; an administrator must set it above 0"}
	}
	if os.Geteuid() != 0 && readSysctl("kernel/unprivileged_userns_clone") == "0" {
		return &SetupError{What: "unprivileged user namespaces are disabled on this node", Setting: "sysctl kernel.unprivileged_userns_clone=0; an administrator must set it to 1"}
	}
	return checkTun("/dev/net/tun")
}

// checkTun opens the TUN clone device at path, as the stage will.
func checkTun(path string) error {
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
	switch {
	case errors.Is(err, unix.ENOENT), errors.Is(err, unix.ENODEV), errors.Is(err, unix.ENXIO):
		return &SetupError{What: "cannot open " + path, Setting: "no TUN device on this node: the tun kernel module must be loaded (modprobe tun) and /dev/net/tun exist", Err: err}
	case errors.Is(err, unix.EACCES), errors.Is(err, unix.EPERM):
		mode := ""
		if fi, err := os.Stat(path); err == nil {
			mode = fmt.Sprintf(" is mode %#o;", fi.Mode().Perm())
		}
		return &SetupError{What: "cannot open " + path, Setting: path + mode + " most distributions ship it 0666 (crw-rw-rw-), which an administrator can restore", Err: err}
	case err != nil:
		return &SetupError{What: "cannot open " + path, Err: err}
	}
	unix.Close(fd)
	return nil
}

// explainSetup turns a failure of the namespace stage into an error that
// names the node's setting where one is to blame.
func explainSetup(what string, err error) error {
	if errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES) || errors.Is(err, unix.ENOSPC) || errors.Is(err, unix.EUSERS) || errors.Is(err, unix.EINVAL) {
		if c := Check(); c != nil {
			return c
		}
		if readSysctl("kernel/apparmor_restrict_unprivileged_userns") == "1" {
			return &SetupError{What: what, Setting: "AppArmor restricts unprivileged user namespaces: sysctl kernel.apparmor_restrict_unprivileged_userns=1; an administrator must set it to 0 or give this program an AppArmor profile that allows userns", Err: err}
		}
		if errors.Is(err, unix.ENOSPC) || errors.Is(err, unix.EUSERS) {
			return &SetupError{What: what, Setting: "the user has too many user namespaces: sysctl user.max_user_namespaces", Err: err}
		}
		return &SetupError{What: what, Setting: "the node's security policy (seccomp, SELinux or a container runtime) forbids unprivileged user namespaces", Err: err}
	}
	return fmt.Errorf("transparent: %s: %w", what, err)
}

// Session is a started transparent command's network: the user-space
// stack carrying its connections. Close it after the command's Wait.
type Session struct {
	st *netStack
}

// Close stops the stack and closes every connection still open. The
// command's sockets see their connections reset.
func (s *Session) Close() error {
	s.st.Close()
	return nil
}

// tempDir makes a private directory for the namespace's resolv.conf: in
// $TMPDIR, else /tmp or /dev/shm (a job may inherit a TMPDIR from its
// submit host that does not exist on the node).
func tempDir() (string, error) {
	var first error
	for _, base := range []string{"", "/tmp", "/dev/shm"} {
		dir, err := os.MkdirTemp(base, "hpcproxy-transparent-")
		if err == nil {
			return dir, nil
		}
		if first == nil {
			first = err
		}
	}
	return "", fmt.Errorf("transparent: no directory for the namespace's resolv.conf: %w", first)
}

// Start starts cmd in a new user, network and mount namespace whose only
// route is a TUN device served by a user-space TCP/IP stack in this
// process: every TCP connection cmd opens to an address outside the
// namespace is dialled with cfg.Dial, and its DNS queries are answered
// with fake addresses (see [FakeDNS]) that are dialled by name. cmd runs
// as the same UID and GID as this process (mapped into the namespace),
// with its own Stdin, Stdout, Stderr, Env and Dir; cmd.ExtraFiles and
// cmd.SysProcAttr must be unset. Start rewrites cmd to run through this
// program's namespace stage (see [Init]) and starts it; once it returns
// nil, cmd.Process is the command (the stage executes it in place): wait
// for it with cmd.Wait, signal it through cmd.Process, then Close the
// session. The command has not run when Start fails.
func Start(cfg Config, cmd *exec.Cmd) (*Session, error) {
	if cfg.Dial == nil {
		return nil, errors.New("transparent: Config.Dial is nil")
	}
	if cmd.Err != nil {
		return nil, cmd.Err
	}
	if len(cmd.ExtraFiles) > 0 || cmd.SysProcAttr != nil || cmd.Process != nil {
		return nil, errors.New("transparent: cmd must have no ExtraFiles or SysProcAttr and not be started")
	}
	if err := Check(); err != nil {
		return nil, err
	}
	self := cfg.Executable
	if self == "" {
		var err error
		if self, err = os.Executable(); err != nil {
			return nil, fmt.Errorf("transparent: cannot find this program to run the namespace stage: %w", err)
		}
	}
	path := cmd.Path
	if !filepath.IsAbs(path) && cmd.Dir == "" {
		// The stage resolves the path after the namespace is made; the
		// working directory is the same, but be exact.
		if abs, err := filepath.Abs(path); err == nil {
			path = abs
		}
	}
	dir, err := tempDir()
	if err != nil {
		return nil, err
	}
	resolv := filepath.Join(dir, "resolv.conf")
	// No search domains: every name "exists" here, so a search domain
	// would turn "pypi.org" into "pypi.org.cluster.local" at the far end.
	conf := "# hpcproxy transparent mode: names resolve on the login node\nnameserver " + dnsAddr.String() + "\noptions ndots:1 attempts:2 timeout:2\n"
	if err := os.WriteFile(resolv, []byte(conf), 0o644); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	// The command's environment, and the stage's marker.
	env := cmd.Env
	if env == nil {
		env = os.Environ()
	}
	env = append(append([]string(nil), env...), stageEnv+"="+resolv)

	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("transparent: socketpair: %w", err)
	}
	pf := os.NewFile(uintptr(fds[0]), "transparent-parent")
	child := os.NewFile(uintptr(fds[1]), "transparent-child")
	fc, err := net.FileConn(pf)
	pf.Close()
	if err != nil {
		child.Close()
		os.RemoveAll(dir)
		return nil, fmt.Errorf("transparent: socketpair: %w", err)
	}
	parent := fc.(*net.UnixConn)
	defer parent.Close()

	uid, gid := os.Getuid(), os.Getgid()
	cmd.Path = self
	cmd.Args = append([]string{self, path}, cmd.Args...)
	cmd.Env = env
	cmd.ExtraFiles = []*os.File{child}
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Cloneflags:                 syscall.CLONE_NEWUSER | syscall.CLONE_NEWNET | syscall.CLONE_NEWNS,
		UidMappings:                []syscall.SysProcIDMap{{ContainerID: uid, HostID: uid, Size: 1}},
		GidMappings:                []syscall.SysProcIDMap{{ContainerID: gid, HostID: gid, Size: 1}},
		GidMappingsEnableSetgroups: false,
		AmbientCaps:                []uintptr{unix.CAP_NET_ADMIN, unix.CAP_SYS_ADMIN},
	}
	err = cmd.Start()
	child.Close()
	if err != nil {
		os.RemoveAll(dir)
		return nil, explainSetup("cannot create the user and network namespace", err)
	}
	fail := func(err error) (*Session, error) {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		os.RemoveAll(dir)
		return nil, err
	}
	tunFD, err := recvReady(parent)
	if err != nil {
		return fail(err)
	}
	// The resolv.conf is bound in the namespace now: the file can go.
	os.RemoveAll(dir)
	log := cfg.Logger
	if log == nil {
		log = slog.New(discardHandler{})
	}
	fd, err := NewFakeDNS(DefaultFakeRange, firstFake)
	if err != nil {
		unix.Close(tunFD)
		return fail(err)
	}
	timeout := cfg.DialTimeout
	if timeout == 0 {
		timeout = 30 * time.Second
	}
	st := &netStack{dns: fd, log: log, dialTimeout: timeout, dial: dialFunc(cfg)}
	if _, err := newNetStack(tunFD, st); err != nil {
		unix.Close(tunFD)
		return fail(err)
	}
	if _, err := parent.Write([]byte{msgGo}); err != nil {
		st.Close()
		return fail(fmt.Errorf("transparent: the namespace stage went away: %w", err))
	}
	return &Session{st: st}, nil
}

// dialFunc chooses between the tunnel and a direct dial by destination.
func dialFunc(cfg Config) func(ctx context.Context, dst string, byName bool) (net.Conn, error) {
	direct := cfg.DirectDial
	if direct == nil {
		var d net.Dialer
		direct = d.DialContext
	}
	return func(ctx context.Context, dst string, byName bool) (net.Conn, error) {
		if !byName && len(cfg.Exclude) > 0 {
			if ap, err := netip.ParseAddrPort(dst); err == nil {
				for _, p := range cfg.Exclude {
					if p.Contains(ap.Addr().Unmap()) {
						return direct(ctx, "tcp", dst)
					}
				}
			}
		}
		return cfg.Dial(ctx, "tcp", dst)
	}
}

// recvReady waits for the stage's report and returns the TUN fd.
func recvReady(sock *net.UnixConn) (int, error) {
	_ = sock.SetReadDeadline(time.Now().Add(30 * time.Second))
	buf := make([]byte, 4096)
	oob := make([]byte, unix.CmsgSpace(4))
	n, oobn, _, _, err := sock.ReadMsgUnix(buf, oob)
	if err == io.EOF {
		n, err = 0, nil
	}
	if err != nil {
		return -1, fmt.Errorf("transparent: no word from the namespace stage: %w", err)
	}
	if n == 0 {
		return -1, errors.New("transparent: the namespace stage exited before it was ready (does this program call transparent.Init first thing in main?)")
	}
	switch buf[0] {
	case msgError:
		return -1, explainStage(string(buf[1:n]))
	case msgReady:
		msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
		if err != nil || len(msgs) != 1 {
			return -1, errors.New("transparent: the namespace stage sent no TUN device")
		}
		fds, err := unix.ParseUnixRights(&msgs[0])
		if err != nil || len(fds) != 1 {
			return -1, errors.New("transparent: the namespace stage sent no TUN device")
		}
		return fds[0], nil
	}
	return -1, fmt.Errorf("transparent: unexpected message %q from the namespace stage", buf[:n])
}

// explainStage turns the stage's error text into an error naming the
// setting to blame where one is.
func explainStage(text string) error {
	for _, e := range []syscall.Errno{unix.EPERM, unix.EACCES} {
		if what, ok := strings.CutSuffix(text, ": "+e.Error()); ok {
			return explainSetup("namespace setup failed: "+what, e)
		}
	}
	return fmt.Errorf("transparent: namespace setup failed: %s", text)
}

type discardHandler struct{}

func (discardHandler) Enabled(context.Context, slog.Level) bool  { return false }
func (discardHandler) Handle(context.Context, slog.Record) error { return nil }
func (d discardHandler) WithAttrs([]slog.Attr) slog.Handler      { return d }
func (d discardHandler) WithGroup(string) slog.Handler           { return d }

var _ io.Closer = (*Session)(nil)
