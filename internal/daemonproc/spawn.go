package daemonproc

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Daemon start-up protocol
//
// Start (the parent) starts the daemon in its own session with two
// pipes:
//
//   - the report pipe, fd 3 in the daemon (EnvReportFd names it). The
//     daemon writes "READY=1\n" and closes it once it listens, its tunnel
//     is up and its state file is written (ReportReady), or writes its
//     error text and closes it (ReportError). The parent waits for EOF,
//     or for READY=1 (a ready daemon stays ready even if a child it
//     started leaked the pipe and holds it open). A silent EOF is not success: a daemon that dies
//     before reporting closes the pipe too, and must not look ready.
//   - optionally the exit pipe, fd 4 in the daemon (EnvExitFd). The parent
//     keeps the write end; when it is closed, explicitly or because the
//     parent died, the daemon's read end sees EOF (WatchExitFd) and the
//     daemon stops. This ties a per-job proxy to the process that started
//     it, as rootlessport does with podman.
//
// The daemon's stdout and stderr go to a log file (mode 0600, appended).
// A daemon must mark both fds close-on-exec (PrepareFds, done by
// InheritedFds and again by Daemon.Run for fds given otherwise)
// before it starts any child process, such as ssh or a wrapper script
// around it: an inherited copy of the report pipe's write end would keep
// the parent waiting for as long as the child lives.

// The daemon's inherited file descriptors and the variables naming them.
const (
	ReportFd    = 3
	ExitFd      = 4
	ListenFd    = 5
	StandbyFd   = 6
	EnvReportFd = "HPCPROXY_REPORT_FD"
	EnvExitFd   = "HPCPROXY_EXIT_FD"
)

// ReadyLine is what a ready daemon writes on the report pipe.
const ReadyLine = "READY=1\n"

// ErrTimeout is wrapped by the *Error of a daemon that did not
// report within Options.Timeout. The daemon has been killed.
var ErrTimeout = errors.New("hpcproxy: daemon did not report readiness in time")

// Options configures Start.
type Options struct {
	// Cmd is the daemon's command line and environment, built with
	// exec.Command (not CommandContext, which would kill the daemon with
	// the context). Start sets its Stdin (nil), Stdout, Stderr,
	// ExtraFiles and SysProcAttr.Setsid, and adds EnvReportFd (and
	// EnvExitFd) to its environment; Stdout, Stderr and ExtraFiles must be
	// unset.
	Cmd *exec.Cmd
	// LogFile is where the daemon's stdout and stderr are appended, for
	// example LogFilePath(statePath). Its directory is created 0700 and
	// checked like a state directory; a log over 1 MiB is moved to
	// LogFile + ".1" first. Required.
	LogFile string
	// Timeout optionally bounds the wait for the daemon's report. If zero,
	// two minutes, enough for a fallback chain of slow SSH methods.
	Timeout time.Duration
	// ExitPipe optionally gives the daemon an exit pipe (fd 4): it stops
	// when [Process.CloseExit] is called or this process dies.
	ExitPipe bool
	// Listener and Standby optionally give the daemon its job's listener
	// (fd 5, [EnvListenFd]) and the write end of the job's stand-by pipe
	// (fd 6, [EnvStandbyFd]); see [StartStandby]. The caller keeps its
	// copies.
	Listener, Standby *os.File
	// Errors optionally lists sentinel errors the daemon may report (as
	// its error's text): the error Start returns then matches (errors.Is)
	// each one whose text the daemon's report contains. ErrUnsafePath is
	// always recognised.
	Errors []error
}

// daemonGODEBUG adds adaptivestackstart=0 to GODEBUG in env, unless it sets
// adaptivestackstart already. A Go program starts each new goroutine with
// a stack as large as its goroutines have lately used on average (rounded
// up to a power of two), 4 KiB in a proxy daemon; but its goroutines are
// mostly a relay's two copiers, idle and shallow, which fit in the 2 KiB a
// goroutine starts with otherwise. Measured with 10,000 held connections
// through a gossh tunnel: 16.2 KiB of resident memory per connection with
// the default, 14.3 without adaptive stacks. A setting read once at start
// (not settable with //go:debug), so it is given to the daemon's
// environment.
func daemonGODEBUG(env []string) []string {
	const setting = "adaptivestackstart=0"
	for i, kv := range env {
		v, ok := strings.CutPrefix(kv, "GODEBUG=")
		if !ok {
			continue
		}
		if strings.Contains(","+v, ",adaptivestackstart=") {
			return env
		}
		env = slices.Clone(env)
		if v == "" {
			env[i] = "GODEBUG=" + setting
		} else {
			env[i] = "GODEBUG=" + v + "," + setting
		}
		return env
	}
	return append(env, "GODEBUG="+setting)
}

// Process is a daemon process started by Start.
type Process struct {
	cmd     *exec.Cmd
	logFile string
	exitW   *os.File
	hasExit bool
	done    chan struct{}
	waitErr error
	mu      sync.Mutex
}

// Error is returned by Start when the daemon did not become
// ready.
type Error struct {
	// Reported is the daemon's own error text; empty if it reported none.
	Reported string
	// LogFile is the daemon's log.
	LogFile string
	// LogTail is the end of the log, for daemons that reported nothing.
	LogTail string
	// Err is ErrTimeout, the context's error, the daemon's exit
	// status (*exec.ExitError), or nil when the daemon reported an error.
	Err error
	// Known are the sentinel errors Unwrap looks for in Reported:
	// Options.Errors and ErrUnsafePath.
	Known []error
}

// Error gives the daemon's own text (or why there is none) and the log
// path, and the log's tail when the daemon reported nothing.
func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString("hpcproxy: daemon did not start: ")
	switch {
	case e.Reported != "":
		b.WriteString(strings.TrimPrefix(e.Reported, "hpcproxy: "))
	case e.Err != nil:
		b.WriteString(strings.TrimPrefix(e.Err.Error(), "hpcproxy: "))
	default:
		b.WriteString("it closed the report pipe without reporting")
	}
	if e.Reported != "" && e.Err != nil {
		b.WriteString(" (" + e.Err.Error() + ")")
	}
	b.WriteString(" (log: " + e.LogFile + ")")
	if e.Reported == "" && e.LogTail != "" {
		b.WriteString("\nlog tail:\n" + e.LogTail)
	}
	return b.String()
}

// Unwrap returns Err and each of Known whose text the daemon's report
// contains, such as the root package's ErrAlreadyRunning for a daemon that
// found a proxy running.
func (e *Error) Unwrap() []error {
	var errs []error
	if e.Err != nil {
		errs = append(errs, e.Err)
	}
	for _, k := range e.Known {
		if e.Reported != "" && strings.Contains(e.Reported, k.Error()) {
			errs = append(errs, k)
		}
	}
	return errs
}

// Start starts opts.Cmd as a daemon (see the protocol above) and
// waits until it reports. On success the daemon listens and its state
// file is written. Otherwise the error is a *Error carrying the
// daemon's own error text or, if it died without one, its exit status and
// the end of its log; a daemon that did not report in time, or before ctx
// ended, is killed (its whole process group) and reaped.
//
// A goroutine waits for the daemon's exit to reap it, so a long-lived
// parent collects no zombies; it ends when the daemon does. A short-lived
// parent may simply exit: the daemon, in its own session, lives on (unless
// ExitPipe was set).
func Start(ctx context.Context, opts Options) (*Process, error) {
	cmd := opts.Cmd
	switch {
	case cmd == nil:
		return nil, errors.New("hpcproxy: start daemon: no command")
	case opts.LogFile == "":
		return nil, errors.New("hpcproxy: start daemon: no log file")
	case cmd.Stdout != nil || cmd.Stderr != nil || len(cmd.ExtraFiles) > 0:
		return nil, errors.New("hpcproxy: start daemon: Stdout, Stderr and ExtraFiles must be unset")
	case cmd.Process != nil:
		return nil, errors.New("hpcproxy: start daemon: command already started")
	}
	timeout := opts.Timeout
	if timeout <= 0 {
		timeout = 2 * time.Minute
	}
	logf, err := OpenLog(opts.LogFile, cmd.Args)
	if err != nil {
		return nil, err
	}
	defer logf.Close()

	pr, pw, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("hpcproxy: start daemon: %w", err)
	}
	defer pr.Close()
	files := []*os.File{pw}
	var er, ew *os.File
	if opts.ExitPipe {
		if er, ew, err = os.Pipe(); err != nil {
			pw.Close()
			return nil, fmt.Errorf("hpcproxy: start daemon: %w", err)
		}
		files = append(files, er)
	}
	env := cmd.Env
	if env == nil {
		env = os.Environ()
	}
	// Fds named by our own environment (a daemon starting a daemon) are
	// not the child's.
	env = deleteFdEnv(env)
	env = append(env, EnvReportFd+"="+strconv.Itoa(ReportFd))
	env = daemonGODEBUG(env)
	if opts.ExitPipe {
		env = append(env, EnvExitFd+"="+strconv.Itoa(ExitFd))
	}
	if opts.Listener != nil || opts.Standby != nil {
		if len(files) == 1 {
			files = append(files, nil) // fd 4 stays closed
		}
		files = append(files, opts.Listener, opts.Standby)
		if opts.Listener != nil {
			env = append(env, EnvListenFd+"="+strconv.Itoa(ListenFd))
		}
		if opts.Standby != nil {
			env = append(env, EnvStandbyFd+"="+strconv.Itoa(StandbyFd))
		}
	}
	cmd.Env = env
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.ExtraFiles = files
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Setsid = true

	err = cmd.Start()
	// The parent's copies of the daemon's ends must go, or EOF never comes.
	pw.Close()
	if er != nil {
		er.Close()
	}
	if err != nil {
		if ew != nil {
			ew.Close()
		}
		return nil, fmt.Errorf("hpcproxy: start daemon: %w", err)
	}
	d := &Process{cmd: cmd, logFile: opts.LogFile, exitW: ew, hasExit: ew != nil, done: make(chan struct{})}
	go func() {
		d.waitErr = cmd.Wait()
		close(d.done)
	}()

	text, rerr := readReport(ctx, pr, timeout, d.done)
	if rerr == nil && text == ReadyLine {
		return d, nil
	}
	derr := &Error{LogFile: opts.LogFile, Known: append(slices.Clip(opts.Errors), ErrUnsafePath), Reported: strings.TrimSpace(strings.TrimPrefix(text, ReadyLine))}
	switch {
	case rerr != nil && ctx.Err() != nil:
		derr.Err = ctx.Err()
	case errors.Is(rerr, os.ErrDeadlineExceeded):
		derr.Err = ErrTimeout
	case rerr != nil:
		derr.Err = rerr
	}
	// A daemon that reported its failure exits by itself: give it a
	// moment. One that did not report in time is stopped now.
	if rerr != nil {
		_ = syscall.Kill(-d.cmd.Process.Pid, syscall.SIGTERM)
	}
	exitErr := d.stopGroup(2 * time.Second)
	if derr.Err == nil && derr.Reported == "" {
		derr.Err = exitErr
	}
	if derr.Reported == "" {
		derr.LogTail = logTail(opts.LogFile, 2048)
	}
	d.CloseExit()
	return nil, derr
}

// readReport reads the report pipe until EOF, or until the daemon has
// said READY=1 (a ready daemon whose child leaked the pipe is still
// ready), or shortly after the daemon exited (a dead daemon's child may
// hold the pipe open too), within timeout or until ctx ends. It reads at
// most 64 KiB.
func readReport(ctx context.Context, pr *os.File, timeout time.Duration, exited <-chan struct{}) (string, error) {
	if err := pr.SetReadDeadline(time.Now().Add(timeout)); err != nil {
		return "", err
	}
	stop := context.AfterFunc(ctx, func() { _ = pr.SetReadDeadline(time.Now()) })
	defer stop()
	var didExit atomic.Bool
	watchDone := make(chan struct{})
	defer close(watchDone)
	go func() {
		select {
		case <-exited:
			didExit.Store(true)
			// Whatever it wrote is in the pipe by now; drain it.
			_ = pr.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		case <-watchDone:
		}
	}()
	var buf []byte
	chunk := make([]byte, 4096)
	for len(buf) < 64<<10 {
		n, err := pr.Read(chunk)
		buf = append(buf, chunk[:n]...)
		if string(buf) == ReadyLine {
			return ReadyLine, nil
		}
		if err == io.EOF {
			return string(buf), nil
		}
		if errors.Is(err, os.ErrDeadlineExceeded) && didExit.Load() && ctx.Err() == nil {
			return string(buf), nil
		}
		if err != nil {
			return string(buf), err
		}
	}
	return string(buf), nil
}

// stopGroup waits up to grace for the daemon to exit, then signals its
// process group (SIGTERM, and SIGKILL after another grace) and waits. Once
// the daemon is gone, stragglers of its group (child processes it left
// behind) are killed. It returns the daemon's exit error.
func (d *Process) stopGroup(grace time.Duration) error {
	pid := d.cmd.Process.Pid
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-d.done:
	case <-t.C:
		_ = syscall.Kill(-pid, syscall.SIGTERM)
		t.Reset(grace)
		select {
		case <-d.done:
		case <-t.C:
			_ = syscall.Kill(-pid, syscall.SIGKILL)
			<-d.done
		}
	}
	// The group outlives its leader while members remain, so its ID cannot
	// have been reused.
	_ = syscall.Kill(-pid, syscall.SIGKILL)
	return d.waitErr
}

// PID returns the daemon's process ID (and process group and session ID).
func (d *Process) PID() int { return d.cmd.Process.Pid }

// LogFile returns the daemon's log file.
func (d *Process) LogFile() string { return d.logFile }

// Done is closed when the daemon has exited.
func (d *Process) Done() <-chan struct{} { return d.done }

// Wait waits for the daemon to exit and returns its exit error.
func (d *Process) Wait() error {
	<-d.done
	return d.waitErr
}

// CloseExit closes the exit pipe, which asks a daemon started with
// ExitPipe to stop. It is a no-op otherwise, and idempotent.
func (d *Process) CloseExit() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.exitW == nil {
		return nil
	}
	err := d.exitW.Close()
	d.exitW = nil
	return err
}

// Stop asks the daemon to stop, through the exit pipe if it has one, else
// with SIGTERM, and waits up to grace before killing its process group.
// It returns the daemon's exit error.
func (d *Process) Stop(grace time.Duration) error {
	if d.hasExit {
		_ = d.CloseExit()
	} else {
		_ = d.cmd.Process.Signal(syscall.SIGTERM)
	}
	return d.stopGroup(grace)
}

// logStartMarker begins the line Start writes to the log before
// each start.
const logStartMarker = "--- hpcproxy daemon start "

// maxLogSize is the size beyond which a daemon log is rotated on start.
const maxLogSize = 1 << 20

func OpenLog(path string, args []string) (*os.File, error) {
	if err := EnsurePrivateDir(filepath.Dir(path)); err != nil {
		return nil, err
	}
	if fi, err := os.Lstat(path); err == nil && fi.Mode().IsRegular() && fi.Size() > maxLogSize {
		_ = os.Rename(path, path+".1")
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return nil, fmt.Errorf("hpcproxy: daemon log: %w", err)
	}
	fmt.Fprintf(f, "%s%s: %s\n", logStartMarker, time.Now().UTC().Format(time.RFC3339), strings.Join(args, " "))
	return f, nil
}

func logTail(path string, n int64) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	if fi, err := f.Stat(); err == nil && fi.Size() > n {
		_, _ = f.Seek(-n, io.SeekEnd)
	}
	b, _ := io.ReadAll(f)
	// Only what this start wrote: from the last start marker on.
	if i := bytes.LastIndex(b, []byte(logStartMarker)); i >= 0 {
		if j := bytes.IndexByte(b[i:], '\n'); j >= 0 {
			b = b[i+j+1:]
		}
	}
	return strings.TrimSpace(string(b))
}

// Daemon side.

// Fds are the pipes a daemon inherited from Start; -1 when
// absent.
type Fds struct {
	Report  int
	Exit    int
	Listen  int // the job's listener ([EnvListenFd])
	Standby int // the write end of the job's stand-by pipe ([EnvStandbyFd])
}

// InheritedFds returns the fds named by EnvReportFd and EnvExitFd,
// marks them close-on-exec (PrepareFds) and removes the variables
// from the environment, so that child processes such as ssh inherit
// neither. A daemon calls it first thing; fds that
// are not open are reported as -1.
func InheritedFds() Fds {
	fds := Fds{Report: envFd(EnvReportFd), Exit: envFd(EnvExitFd), Listen: envFd(EnvListenFd), Standby: envFd(EnvStandbyFd)}
	// Children (ssh, a nested daemon) must not take them for theirs.
	for _, name := range []string{EnvReportFd, EnvExitFd, EnvListenFd, EnvStandbyFd} {
		os.Unsetenv(name)
	}
	for _, fd := range []*int{&fds.Report, &fds.Exit, &fds.Listen, &fds.Standby} {
		if *fd >= 0 && PrepareFds(*fd) != nil {
			*fd = -1
		}
	}
	return fds
}

func envFd(name string) int {
	n, err := strconv.Atoi(os.Getenv(name))
	if err != nil || n < 3 {
		return -1
	}
	return n
}

// PrepareFds checks that each fd is open and marks it close-on-exec.
// A daemon given its fds by flags (--report-fd 3) calls it before starting
// any child process.
func PrepareFds(fds ...int) error {
	for _, fd := range fds {
		var st syscall.Stat_t
		if err := syscall.Fstat(fd, &st); err != nil {
			return fmt.Errorf("hpcproxy: fd %d: %w", fd, err)
		}
		syscall.CloseOnExec(fd)
	}
	return nil
}

func report(fd int, msg string) error {
	if fd <= 0 {
		return nil
	}
	if err := PrepareFds(fd); err != nil {
		return err
	}
	f := os.NewFile(uintptr(fd), "report-fd")
	_, err := io.WriteString(f, msg)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil && !errors.Is(err, syscall.EPIPE) {
		return fmt.Errorf("hpcproxy: report: %w", err)
	}
	return nil
}

// ReportReady tells the parent that the daemon is ready ("READY=1" and
// EOF on fd). It closes fd: report once, with ReportReady or ReportError,
// never both, since afterwards the number may name an unrelated file. Call it only once the listener is bound, the tunnel is up
// and the state file is written. fd <= 0 means no parent waits: a no-op.
// A parent that gave up (EPIPE) is not an error.
func ReportReady(fd int) error { return report(fd, ReadyLine) }

// ReportError tells the parent why the daemon could not start: err's text
// (one line or several; never "READY=1"), then EOF. fd <= 0 is a no-op.
func ReportError(fd int, err error) error {
	msg := "hpcproxy: daemon failed"
	if err != nil {
		msg = err.Error()
	}
	msg = strings.TrimRight(msg, "\n") + "\n"
	if msg == ReadyLine {
		msg = "error: " + msg
	}
	return report(fd, msg)
}

// WatchExitFd returns a channel that is closed when the exit pipe fd
// reaches EOF (the parent closed its end or died), or when ctx ends, which
// also stops the watch and closes fd. fd <= 0 gives a channel closed only
// by ctx. The fd is marked close-on-exec.
func WatchExitFd(ctx context.Context, fd int) (<-chan struct{}, error) {
	ch := make(chan struct{})
	if fd <= 0 {
		context.AfterFunc(ctx, func() { close(ch) })
		return ch, nil
	}
	if err := PrepareFds(fd); err != nil {
		return nil, err
	}
	// Non-blocking, so that os.File uses the poller and Close interrupts
	// a pending Read.
	if err := syscall.SetNonblock(fd, true); err != nil {
		return nil, fmt.Errorf("hpcproxy: exit fd %d: %w", fd, err)
	}
	f := os.NewFile(uintptr(fd), "exit-fd")
	stop := context.AfterFunc(ctx, func() { f.Close() })
	go func() {
		defer close(ch)
		defer stop()
		defer f.Close()
		var buf [64]byte
		for {
			if _, err := f.Read(buf[:]); err != nil {
				return
			}
		}
	}()
	return ch, nil
}
