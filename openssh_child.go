package hpcproxy

// The ssh child processes of the OpenSSH-based tunnel methods, the
// lifecycle they share (childTunnel) and the private runtime directory that
// holds their sockets.
//
// # Child processes
//
// Children run in their own session (no controlling terminal, so nothing
// can prompt or be stopped by job control) with Pdeathsig SIGTERM. Linux
// sends the death signal when the *thread* that forked the child exits, not
// the process (golang/go#27505), so each child is started and waited for by
// one goroutine locked to its OS thread for the child's whole life: the
// thread cannot be retired under the child. The last 8 KiB of ssh's stderr
// are kept and put into errors. Stopping a child sends SIGTERM, then
// SIGKILL after a short grace, and always reaps it.

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hpcproxy/hpcproxy/internal/jobenv"
)

const (
	// stderrTail is how much of an ssh child's stderr is kept for errors.
	stderrTail = 8 << 10
	// stopGrace is how long a child has to exit after SIGTERM.
	stopGrace = 2 * time.Second
	// maxSunPath is the longest unix socket path Linux accepts (108 bytes
	// of sun_path, NUL included).
	maxSunPath = 107
	// controlPathSuffix is the length of the random suffix OpenSSH appends
	// to a ControlPath while binding it ("path.XXXXXXXXXXXXXXXX"), before
	// renaming it into place.
	controlPathSuffix = 17
	// maxRuntimeDir is the longest runtime dir whose sockets fit in
	// sun_path: the longest is the control socket "/cm-PID-SEQ.sock" (PID
	// up to 7 digits, SEQ up to 4) with its binding suffix; a SOCKS socket
	// and a reverse forward's "/hpcproxy-rf-N/s" are shorter.
	maxRuntimeDir = maxSunPath - controlPathSuffix - len("/cm-1234567-1234.sock")
)

// sshProcess is a running ssh child.
type sshProcess struct {
	cmd     *exec.Cmd
	stderr  *tailBuffer
	exited  chan struct{} // closed once the child is reaped
	waitErr error         // cmd.Wait's result, valid after exited
}

// startSSHProcess starts bin in its own session with Pdeathsig, on a
// goroutine locked to its OS thread that then waits for the child (see the
// comment at the top of this file). env nil means our environment. stdin and stdout may be
// nil (/dev/null).
func startSSHProcess(bin string, args, env []string, stdin, stdout *os.File) (*sshProcess, error) {
	p := &sshProcess{stderr: &tailBuffer{max: stderrTail}, exited: make(chan struct{})}
	cmd := exec.Command(bin, args...)
	cmd.Env = env
	if stdin != nil {
		cmd.Stdin = stdin
	}
	if stdout != nil {
		cmd.Stdout = stdout
	}
	cmd.Stderr = p.stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Pdeathsig: syscall.SIGTERM}
	// A grandchild (ProxyCommand) holding stderr open must not block Wait.
	cmd.WaitDelay = stopGrace
	p.cmd = cmd
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		p.waitErr = cmd.Wait()
		close(p.exited)
	}()
	if err := <-started; err != nil {
		return nil, fmt.Errorf("hpcproxy: start ssh: %w", err)
	}
	return p, nil
}

// exitError describes why the child exited, with its stderr. Call it only
// after exited is closed.
func (p *sshProcess) exitError() error { return p.exitErrorAs("ssh") }

// exitErrorAs is exitError with what names the command in the message.
func (p *sshProcess) exitErrorAs(what string) error {
	msg := p.stderr.String()
	err := p.waitErr
	if err == nil {
		err = errors.New("exit status 0")
	}
	if msg == "" {
		return fmt.Errorf("hpcproxy: %s exited: %w", what, err)
	}
	err = fmt.Errorf("hpcproxy: %s exited: %w: %s", what, err, msg)
	if sshDroppedAtStart(msg) {
		return startDropError{err}
	}
	return err
}

// sshDroppedAtStart reports whether an ssh child's stderr says that the
// login node closed or reset the connection at the SSH version exchange,
// what sshd does over MaxStartups: "kex_exchange_identification" (older
// OpenSSH "ssh_exchange_identification"). A jump host that failed its own
// host key check or authentication ends the ProxyCommand, which the last
// ssh reports the same way; that failure is final, and its own line says
// so.
func sshDroppedAtStart(stderr string) bool {
	for _, final := range []string{"Host key verification failed", "Permission denied", "REMOTE HOST IDENTIFICATION HAS CHANGED"} {
		if strings.Contains(stderr, final) {
			return false
		}
	}
	return strings.Contains(stderr, "kex_exchange_identification") || strings.Contains(stderr, "ssh_exchange_identification")
}

// startDropError is an ssh child's error that is errDroppedAtStart too,
// without changing its message.
type startDropError struct{ error }

func (e startDropError) Unwrap() []error { return []error{e.error, errDroppedAtStart} }

// hasExited reports whether the child has been reaped.
func (p *sshProcess) hasExited() bool {
	select {
	case <-p.exited:
		return true
	default:
		return false
	}
}

// stop ends the child, SIGTERM first and SIGKILL after stopGrace, and
// waits until it is reaped. os.Process signals through a pidfd, so a child
// reaped meanwhile is never confused with a reused pid.
func (p *sshProcess) stop() {
	if p.hasExited() {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	t := time.NewTimer(stopGrace)
	defer t.Stop()
	select {
	case <-p.exited:
	case <-t.C:
		_ = p.cmd.Process.Kill()
		<-p.exited
	}
}

// tailBuffer keeps the last max bytes written to it.
type tailBuffer struct {
	mu      sync.Mutex
	max     int
	buf     []byte
	written int64 // bytes written so far, kept or not
}

func (b *tailBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.buf = append(b.buf, p...)
	b.written += int64(len(p))
	if over := len(b.buf) - b.max; over > 0 {
		b.buf = append(b.buf[:0], b.buf[over:]...)
	}
	return len(p), nil
}

// offset returns how many bytes have been written so far.
func (b *tailBuffer) offset() int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.written
}

// since returns what was written after offset off, as far as it is kept.
func (b *tailBuffer) since(off int64) string {
	b.mu.Lock()
	defer b.mu.Unlock()
	n := int(min(max(b.written-off, 0), int64(len(b.buf))))
	return string(b.buf[len(b.buf)-n:])
}

// String returns the kept text, trimmed, lines joined with "; ".
func (b *tailBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	s := strings.TrimSpace(strings.ToValidUTF8(string(b.buf), "?"))
	s = strings.ReplaceAll(s, "\r", "")
	return strings.ReplaceAll(s, "\n", "; ")
}

// waitReady polls probe until it returns a conn, the child exits (then the
// error is the child's, with its stderr, at once), or timeout or ctx ends.
func waitReady(ctx context.Context, p *sshProcess, timeout time.Duration, what string,
	probe func(ctx context.Context) (net.Conn, error)) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	delay := 5 * time.Millisecond
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-p.exited:
			return nil, p.exitError()
		case <-ctx.Done():
			err := fmt.Errorf("hpcproxy: ssh did not open %s within %v: %w", what, timeout, ctx.Err())
			if msg := p.stderr.String(); msg != "" {
				err = fmt.Errorf("%w (ssh said: %s)", err, msg)
			}
			return nil, err
		case <-t.C:
		}
		c, err := probe(ctx)
		if err == nil {
			return c, nil
		}
		t.Reset(delay)
		delay = min(delay*3/2, 100*time.Millisecond)
	}
}

// runtimeDir is where a tunnel keeps its sockets.
type runtimeDir struct {
	path string
	temp bool // created by us: removed on cleanup
}

var socketSeq atomic.Uint64

// socketTempBase is where a tunnel without a RuntimeDir makes its private
// temporary directories: the node-local tmp dir (jobenv.TmpDir: a
// scheduler's per-job dir, $TMPDIR if it exists, else /tmp), or /tmp when
// sockets there would not fit in sun_path. Unlike os.TempDir it survives a
// job whose TMPDIR, passed on from the submitting host, does not exist on
// the node.
func socketTempBase() string {
	base := jobenv.TmpDir()
	if len(base)+len("/hpcproxy-1234567890") > maxRuntimeDir {
		return "/tmp"
	}
	return base
}

// openRuntimeDir returns TunnelConfig.RuntimeDir after checking that it is
// a directory owned by us that nobody else can enter, or a fresh private
// temporary directory under socketTempBase().
func openRuntimeDir(cfg *TunnelConfig) (*runtimeDir, error) {
	if cfg.RuntimeDir == "" {
		p, err := os.MkdirTemp(socketTempBase(), "hpcproxy-")
		if err != nil {
			return nil, fmt.Errorf("hpcproxy: create runtime dir: %w", err)
		}
		return &runtimeDir{path: p, temp: true}, nil
	}
	fi, err := os.Stat(cfg.RuntimeDir)
	if err != nil {
		return nil, fmt.Errorf("hpcproxy: runtime dir: %w", err)
	}
	if !fi.IsDir() {
		return nil, fmt.Errorf("hpcproxy: runtime dir %s is not a directory", cfg.RuntimeDir)
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && int(st.Uid) != os.Geteuid() {
		return nil, fmt.Errorf("hpcproxy: runtime dir %s is owned by uid %d, not by us (uid %d)",
			cfg.RuntimeDir, st.Uid, os.Geteuid())
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return nil, fmt.Errorf("hpcproxy: runtime dir %s has mode %04o: others must have no access (chmod 700)",
			cfg.RuntimeDir, perm)
	}
	return &runtimeDir{path: cfg.RuntimeDir}, nil
}

// socketPath returns a fresh socket path "prefix-PID-N.sock" in d, at most
// maxLen bytes long, with any stale socket file there removed.
func (d *runtimeDir) socketPath(prefix string, maxLen int) (string, error) {
	p := filepath.Join(d.path, fmt.Sprintf("%s-%d-%d.sock", prefix, os.Getpid(), socketSeq.Add(1)))
	if len(p) > maxLen {
		return "", fmt.Errorf("hpcproxy: socket path %s is %d bytes, more than the %d a unix socket allows here: use a shorter RuntimeDir or TMPDIR",
			p, len(p), maxLen)
	}
	if err := removeStaleSocket(p); err != nil {
		return "", err
	}
	return p, nil
}

// removeStaleSocket removes a socket file at p that nothing answers on (a
// crashed earlier run with the same pid). OpenSSH will not bind over it.
func removeStaleSocket(p string) error {
	fi, err := os.Lstat(p)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("hpcproxy: %w", err)
	}
	if fi.Mode().Type() != os.ModeSocket {
		return fmt.Errorf("hpcproxy: %s exists and is not a socket", p)
	}
	if c, err := net.DialTimeout("unix", p, time.Second); err == nil {
		c.Close()
		return fmt.Errorf("hpcproxy: socket %s is in use by another process", p)
	}
	if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("hpcproxy: remove stale socket: %w", err)
	}
	return nil
}

// cleanup removes sock and, if we created it, the directory.
func (d *runtimeDir) cleanup(sock string) {
	if sock != "" {
		_ = os.Remove(sock)
	}
	if d.temp {
		_ = os.RemoveAll(d.path)
	}
}

// childTunnel is the lifecycle shared by the methods that keep an ssh
// child (or a control connection) running: Done, Err and Close.
type childTunnel struct {
	proc *sshProcess // nil when attached to a master we do not own
	dir  *runtimeDir // nil when nothing to clean up
	sock string

	done      chan struct{}
	closing   chan struct{}
	mu        sync.Mutex
	err       error
	closeOnce sync.Once
	wg        sync.WaitGroup
}

func newChildTunnel(proc *sshProcess, dir *runtimeDir, sock string) *childTunnel {
	return &childTunnel{proc: proc, dir: dir, sock: sock, done: make(chan struct{}), closing: make(chan struct{})}
}

// fail records err as the reason the tunnel went down, unless it is being
// closed on purpose, and fires Done.
func (t *childTunnel) fail(err error) {
	t.mu.Lock()
	select {
	case <-t.closing:
	default:
		if t.err == nil {
			t.err = err
		}
	}
	t.mu.Unlock()
	t.fireDone()
}

func (t *childTunnel) fireDone() {
	t.mu.Lock()
	defer t.mu.Unlock()
	select {
	case <-t.done:
	default:
		close(t.done)
	}
}

// Done implements tunnelImpl.
func (t *childTunnel) Done() <-chan struct{} { return t.done }

// Err implements tunnelImpl.
func (t *childTunnel) Err() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.err
}

// close stops everything: closeConn (if any) first, then the child, then
// it waits for the watcher goroutines and removes the sockets.
func (t *childTunnel) close(closeConn func()) {
	t.closeOnce.Do(func() {
		t.mu.Lock()
		close(t.closing)
		t.mu.Unlock()
		if closeConn != nil {
			closeConn()
		}
		if t.proc != nil {
			t.proc.stop()
		}
		t.wg.Wait()
		t.fireDone()
		if t.dir != nil {
			t.dir.cleanup(t.sock)
		}
	})
}

// downError wraps err with ErrTunnelDown when the tunnel is down.
func (t *childTunnel) downError(err error) error {
	select {
	case <-t.done:
		if cause := t.Err(); cause != nil {
			return fmt.Errorf("%w: %w: %w", ErrTunnelDown, cause, err)
		}
		return fmt.Errorf("%w: %w", ErrTunnelDown, err)
	default:
		return err
	}
}
