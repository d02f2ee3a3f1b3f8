package daemonproc

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// Stand-bys: a job's port outlives the node daemon.
//
// A node tunnel's daemon lives in the job whose start opened it. Where
// the scheduler kills every process of a job at its end (Slurm's
// proctrack/cgroup, cgroup-based PBS and LSF), or the daemon is killed
// any other way, the jobs attached to it would lose their proxy with it.
// So each job's listening socket is made in the job itself, by its start
// ([ListenJob]), and held there by a stand-by: a shell ([StartStandby])
// that inherited the listener and blocks in `read` on a pipe whose write
// end only the daemon holds (a copy of the listener and that write end
// travel to it with SCM_RIGHTS, or by inheritance to a daemon the start
// spawns). The daemon serves the job's port from its copy of the
// listener. When the job ends normally (its watched process, its exit
// pipe, `stop`) the daemon closes its copy and writes [standbyExitLine]:
// the stand-by exits, and the port closes. When the daemon dies (SIGKILL
// included; the kernel closes the write end) the stand-by reads EOF and
// execs the job's start again, with the listener as fd 3
// ([EnvListenFd]): that start attaches to a node daemon that still runs or
// starts the new one (one wins the abstract socket, the others attach to
// it), passing the same listener on, so the port never closes and
// connections made meanwhile wait in its backlog. A stand-by ends with its
// job: the scheduler kills it with the job's cgroup, and where it does not
// (proctrack/linuxproc), the daemon tells it to exit when the job's
// watched process ends, or, the daemon being gone too, the start it execs
// finds that process gone and exits.

// EnvListenFd names the fd of a job's listener that a start inherited
// (from its stand-by) or a daemon inherited (from Start); EnvStandbyFd
// names the write end of the stand-by's pipe, which a daemon inherited.
const (
	EnvListenFd  = "HPCPROXY_LISTEN_FD"
	EnvStandbyFd = "HPCPROXY_STANDBY_FD"
)

// standbyExitLine, written on a stand-by's pipe, tells it to exit: the
// job has ended. EOF without it means the daemon died.
const standbyExitLine = "exit\n"

// standbyScript is the stand-by: "$0" "$@" is the start to exec when the
// pipe on stdin reaches EOF without the exit line.
const standbyScript = `read -r l; [ "$l" = exit ] && exit 0; exec "$0" "$@" </dev/null`

// standbyShell runs the stand-by. A POSIX shell: dash, where /bin/sh is
// dash, holds it in about 100 KiB of its own memory (PSS), against
// several MiB for a Go process.
var standbyShell = "/bin/sh"

// ListenJob binds a job's listener, on 127.0.0.1 at port (0: a free
// one), as a file to hand to a stand-by and a daemon.
func ListenJob(port int) (*os.File, error) {
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: port})
	if err != nil {
		return nil, fmt.Errorf("hpcproxy: listen: %w", err)
	}
	f, err := ln.File()
	_ = ln.Close()
	if err != nil {
		return nil, fmt.Errorf("hpcproxy: listen: %w", err)
	}
	return f, nil
}

// InheritedListener returns the listener named by EnvListenFd (a start
// exec'd by its stand-by), marked close-on-exec, and removes the variable
// from the environment; nil if there is none.
func InheritedListener() *os.File {
	fd := envFd(EnvListenFd)
	os.Unsetenv(EnvListenFd)
	if fd < 0 || PrepareFds(fd) != nil {
		return nil
	}
	return os.NewFile(uintptr(fd), "listener")
}

// Standby is a job's stand-by process, from the side of the start that
// made it: it holds the write end of the stand-by's pipe until the
// daemon has a copy.
type Standby struct {
	// W is the write end of the stand-by's pipe, for the daemon.
	W   *os.File
	pid int
}

// StartStandby starts a stand-by holding the listener ln (its fd 3) in a
// session of its own, its output appended to logFile. When its pipe
// reaches EOF without the exit line it execs argv (argv[0] the program)
// with EnvListenFd=3. Give W to the daemon, then call Handoff; if no
// daemon got it, call Release.
func StartStandby(ln *os.File, logFile string, argv []string) (*Standby, error) {
	if len(argv) == 0 {
		return nil, errors.New("hpcproxy: stand-by: no command")
	}
	logf, err := OpenLog(logFile, []string{"stand-by"})
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	pr, pw, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("hpcproxy: stand-by: %w", err)
	}
	defer pr.Close()
	cmd := exec.Command(standbyShell, append([]string{"-c", standbyScript}, argv...)...)
	cmd.Env = append(deleteFdEnv(os.Environ()), EnvListenFd+"=3")
	cmd.Stdin, cmd.Stdout, cmd.Stderr = pr, logf, logf
	cmd.ExtraFiles = []*os.File{ln}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		pw.Close()
		return nil, fmt.Errorf("hpcproxy: stand-by: %w", err)
	}
	pid := cmd.Process.Pid
	// Not waited for: it outlives this start (and is reaped by init, or
	// by this process when it execs into the start).
	_ = cmd.Process.Release()
	return &Standby{W: pw, pid: pid}, nil
}

// PID returns the stand-by's process id.
func (s *Standby) PID() int { return s.pid }

// Handoff closes this process's copy of the pipe's write end, once a
// daemon holds its own.
func (s *Standby) Handoff() { _ = s.W.Close() }

// Release tells the stand-by to exit (no daemon serves its listener).
func (s *Standby) Release() { EndStandby(s.W, true) }

// EndStandby closes a stand-by's pipe, after telling it to exit if exit
// (else it takes over).
func EndStandby(w io.WriteCloser, exit bool) {
	if exit {
		_, _ = io.WriteString(w, standbyExitLine)
	}
	_ = w.Close()
}

// deleteFdEnv removes the variables naming inherited fds from env.
func deleteFdEnv(env []string) []string {
	out := make([]string, 0, len(env))
	for _, kv := range env {
		switch name, _, _ := strings.Cut(kv, "="); name {
		case EnvReportFd, EnvExitFd, EnvListenFd, EnvStandbyFd:
			continue
		}
		out = append(out, kv)
	}
	return out
}

// FileListener makes a net.Listener of a job's listener file, checking
// that it is a TCP listener on loopback. It takes f over.
func FileListener(f *os.File) (net.Listener, error) {
	defer f.Close()
	if v, err := unix.GetsockoptInt(int(f.Fd()), unix.SOL_SOCKET, unix.SO_ACCEPTCONN); err != nil || v == 0 {
		return nil, errors.New("hpcproxy: job listener: not a listening socket")
	}
	ln, err := net.FileListener(f)
	if err != nil {
		return nil, fmt.Errorf("hpcproxy: job listener: %w", err)
	}
	a, ok := ln.Addr().(*net.TCPAddr)
	if !ok || !a.IP.IsLoopback() {
		_ = ln.Close()
		return nil, fmt.Errorf("hpcproxy: job listener %s: not TCP on loopback", ln.Addr())
	}
	return ln, nil
}
