package hpcproxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hpcproxy/hpcproxy/internal/daemonproc"
)

func init() {
	for _, m := range []string{"ready", "exitfd", "fail", "already", "crash", "hang", "envfds"} {
		helpers[m] = func() int { return daemonHelper(m) }
	}
}

// daemonHelper plays a daemon started by StartDaemon.
func daemonHelper(mode string) int {
	fds := daemonproc.InheritedFds()
	switch mode {
	case "ready", "exitfd":
		// Start a grandchild before reporting, as a daemon starts ssh: it
		// must inherit neither the pipes nor the variables naming them.
		sleeper := exec.Command("sleep", "60")
		if err := sleeper.Start(); err != nil {
			daemonproc.ReportError(fds.Report, err)
			return 1
		}
		// The child may open files of its own (locale data) on the same
		// numbers: only our pipes count.
		for _, fd := range []int{fds.Report, fds.Exit} {
			if fd <= 0 {
				continue
			}
			ours, _ := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", fd))
			theirs, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%d", sleeper.Process.Pid, fd))
			if err == nil && theirs == ours {
				daemonproc.ReportError(fds.Report, fmt.Errorf("fd %d (%s) leaked to a child process", fd, ours))
				return 1
			}
		}
		if v, ok := os.LookupEnv(daemonproc.EnvReportFd); ok {
			daemonproc.ReportError(fds.Report, fmt.Errorf("%s=%s left in the environment", daemonproc.EnvReportFd, v))
			return 1
		}
		// Be slow to bind: a parent that returned early would fail to
		// dial.
		time.Sleep(300 * time.Millisecond)
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			daemonproc.ReportError(fds.Report, err)
			return 1
		}
		if err := os.WriteFile(os.Getenv("HELPER_ADDR_FILE"), []byte(ln.Addr().String()), 0o600); err != nil {
			daemonproc.ReportError(fds.Report, err)
			return 1
		}
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				c.Write([]byte("hello\n"))
				c.Close()
			}
		}()
		exit, err := daemonproc.WatchExitFd(context.Background(), fds.Exit)
		if err != nil {
			daemonproc.ReportError(fds.Report, err)
			return 1
		}
		if err := daemonproc.ReportReady(fds.Report); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		if mode == "exitfd" {
			<-exit
			fmt.Fprintln(os.Stderr, "exit fd closed, stopping")
			sleeper.Process.Kill()
			sleeper.Wait()
			return 0
		}
		select {} // until killed
	case "fail":
		fmt.Fprintln(os.Stderr, "trying to start")
		daemonproc.ReportError(fds.Report, errors.New("hpcproxy: no tunnel method reached \"login1\"\n  gossh: connection refused"))
		return 1
	case "already":
		daemonproc.ReportError(fds.Report, &AlreadyRunningError{Path: "/x/proxy.json", State: &ProxyState{Host: "login1", PID: 42, Port: 8080}})
		return 1
	case "crash":
		fmt.Fprintln(os.Stderr, "panic: boom")
		return 2
	case "hang":
		select {}
	case "envfds":
		fmt.Printf("report=%d exit=%d listen=%d standby=%d\n", fds.Report, fds.Exit, fds.Listen, fds.Standby)
		if fds.Listen > 0 {
			// The job's listener: a listening socket on loopback.
			ln, err := daemonproc.FileListener(os.NewFile(uintptr(fds.Listen), "listener"))
			fmt.Printf("listener %v %v\n", ln != nil, err)
		}
		daemonproc.ReportReady(fds.Report)
		return 0
	}
	fmt.Fprintln(os.Stderr, "unknown helper mode", mode)
	return 3
}

func daemonLog(t *testing.T) string {
	return filepath.Join(t.TempDir(), "state", "daemon.log")
}

func TestStartDaemonReadyAfterListening(t *testing.T) {
	addrFile := filepath.Join(t.TempDir(), "addr")
	log := daemonLog(t)
	start := time.Now()
	d, err := daemonproc.Start(context.Background(), daemonproc.Options{
		Cmd:     helperCommand("ready", "HELPER_ADDR_FILE="+addrFile),
		LogFile: log,
		Timeout: 30 * time.Second,
	})
	if err != nil {
		t.Fatalf("StartDaemon: %v", err)
	}
	t.Cleanup(func() { d.Stop(time.Second) })
	if el := time.Since(start); el > 20*time.Second {
		t.Errorf("ready after %v", el)
	}
	addr, err := os.ReadFile(addrFile)
	if err != nil {
		t.Fatalf("daemon reported ready without writing its address: %v", err)
	}
	c, err := net.Dial("tcp", string(addr))
	if err != nil {
		t.Fatalf("dial right after ready: %v", err)
	}
	c.Close()

	// The daemon runs in its own session, and its log is private.
	sid, err := getsid(d.PID())
	if err != nil || sid != d.PID() {
		t.Errorf("daemon session = %d (%v), want its own (%d)", sid, err, d.PID())
	}
	fi, err := os.Stat(log)
	if err != nil {
		t.Fatal(err)
	}
	if got := fi.Mode().Perm(); got != 0o600 {
		t.Errorf("log mode %04o, want 0600", got)
	}
	if fi, _ := os.Stat(filepath.Dir(log)); fi.Mode().Perm() != 0o700 {
		t.Errorf("log dir mode %04o, want 0700", fi.Mode().Perm())
	}

	// Stop without an exit pipe: SIGTERM to the daemon, then its group.
	if err := d.Stop(2 * time.Second); err == nil {
		t.Errorf("Stop: daemon exited cleanly from SIGTERM? want a signal exit status")
	}
	select {
	case <-d.Done():
	default:
		t.Fatal("Done not closed after Stop")
	}
}

func getsid(pid int) (int, error) {
	sid, _, errno := syscall.RawSyscall(syscall.SYS_GETSID, uintptr(pid), 0, 0)
	if errno != 0 {
		return -1, errno
	}
	return int(sid), nil
}

func TestStartDaemonReportedError(t *testing.T) {
	log := daemonLog(t)
	_, err := daemonproc.Start(context.Background(), daemonproc.Options{Cmd: helperCommand("fail"), LogFile: log, Timeout: 30 * time.Second})
	var de *daemonproc.Error
	if !errors.As(err, &de) {
		t.Fatalf("err = %v, want *daemonproc.Error", err)
	}
	if !strings.Contains(de.Reported, "no tunnel method reached") || !strings.Contains(de.Reported, "gossh: connection refused") {
		t.Errorf("Reported = %q, want the daemon's text", de.Reported)
	}
	msg := err.Error()
	if !strings.HasPrefix(msg, "hpcproxy: daemon did not start: no tunnel method") || !strings.Contains(msg, log) {
		t.Errorf("error = %q, want the daemon's text and the log path", msg)
	}
	if errors.Is(err, ErrAlreadyRunning) {
		t.Errorf("errors.Is(err, ErrAlreadyRunning) = true for a tunnel failure")
	}
	b, _ := os.ReadFile(log)
	if !strings.Contains(string(b), "trying to start") {
		t.Errorf("daemon stderr not in log: %q", b)
	}
}

func TestStartDaemonAlreadyRunning(t *testing.T) {
	_, err := daemonproc.Start(context.Background(), daemonproc.Options{Cmd: helperCommand("already"), LogFile: daemonLog(t), Timeout: 30 * time.Second, Errors: []error{ErrAlreadyRunning}})
	if !errors.Is(err, ErrAlreadyRunning) {
		t.Fatalf("err = %v, want ErrAlreadyRunning", err)
	}
	if !strings.Contains(err.Error(), "pid 42 on login1, port 8080") {
		t.Errorf("error %q does not describe the running proxy", err)
	}
}

func TestStartDaemonCrashBeforeReport(t *testing.T) {
	_, err := daemonproc.Start(context.Background(), daemonproc.Options{Cmd: helperCommand("crash"), LogFile: daemonLog(t), Timeout: 30 * time.Second})
	var de *daemonproc.Error
	if !errors.As(err, &de) {
		t.Fatalf("err = %v, want *daemonproc.Error (a silent EOF is not ready)", err)
	}
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 2 {
		t.Errorf("err = %v, want exit status 2", err)
	}
	if !strings.Contains(de.LogTail, "panic: boom") {
		t.Errorf("LogTail = %q, want the daemon's last words", de.LogTail)
	}
}

func TestStartDaemonTimeout(t *testing.T) {
	start := time.Now()
	_, err := daemonproc.Start(context.Background(), daemonproc.Options{Cmd: helperCommand("hang"), LogFile: daemonLog(t), Timeout: 500 * time.Millisecond})
	if !errors.Is(err, daemonproc.ErrTimeout) {
		t.Fatalf("err = %v, want daemonproc.ErrTimeout", err)
	}
	if el := time.Since(start); el > 10*time.Second {
		t.Errorf("took %v", el)
	}
	// StartDaemon killed and reaped it: nothing left to wait for (goleak
	// would catch the waiter goroutine otherwise).
}

func TestStartDaemonContextCancel(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	_, err := daemonproc.Start(ctx, daemonproc.Options{Cmd: helperCommand("hang"), LogFile: daemonLog(t), Timeout: time.Minute})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want context.DeadlineExceeded", err)
	}
}

func TestStartDaemonExitFd(t *testing.T) {
	addrFile := filepath.Join(t.TempDir(), "addr")
	log := daemonLog(t)
	d, err := daemonproc.Start(context.Background(), daemonproc.Options{
		Cmd:      helperCommand("exitfd", "HELPER_ADDR_FILE="+addrFile),
		LogFile:  log,
		Timeout:  30 * time.Second,
		ExitPipe: true,
	})
	if err != nil {
		t.Fatalf("StartDaemon: %v", err)
	}
	t.Cleanup(func() { d.Stop(time.Second) })
	select {
	case <-d.Done():
		t.Fatal("daemon exited with its exit pipe still open")
	case <-time.After(200 * time.Millisecond):
	}
	if err := d.CloseExit(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-d.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("daemon still running 10s after its exit pipe closed")
	}
	if err := d.Wait(); err != nil {
		t.Errorf("daemon exit: %v, want clean exit", err)
	}
	if b, _ := os.ReadFile(log); !strings.Contains(string(b), "exit fd closed") {
		t.Errorf("log %q lacks the daemon's exit message", b)
	}
}

func TestStartDaemonEnv(t *testing.T) {
	log := daemonLog(t)
	d, err := daemonproc.Start(context.Background(), daemonproc.Options{Cmd: helperCommand("envfds"), LogFile: log, Timeout: 30 * time.Second, ExitPipe: true})
	if err != nil {
		t.Fatal(err)
	}
	d.Wait()
	b, _ := os.ReadFile(log)
	if !strings.Contains(string(b), "report=3 exit=4") {
		t.Errorf("daemon saw %q, want report=3 exit=4", b)
	}
}

// TestStartDaemonListener: a job's listener and stand-by pipe reach the
// daemon as fds 5 and 6, named by the environment; fd 4 stays closed
// without an exit pipe.
func TestStartDaemonListener(t *testing.T) {
	log := daemonLog(t)
	ln, err := daemonproc.ListenJob(0)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	defer pw.Close()
	d, err := daemonproc.Start(context.Background(), daemonproc.Options{Cmd: helperCommand("envfds"), LogFile: log, Timeout: 30 * time.Second,
		Listener: ln, Standby: pw})
	if err != nil {
		t.Fatal(err)
	}
	d.Wait()
	b, _ := os.ReadFile(log)
	if !strings.Contains(string(b), "report=3 exit=-1 listen=5 standby=6") || !strings.Contains(string(b), "listener true <nil>") {
		t.Errorf("daemon saw %q, want report=3 exit=-1 listen=5 standby=6 and a listener", b)
	}
}

func TestStartDaemonBadOptions(t *testing.T) {
	for name, opts := range map[string]daemonproc.Options{
		"no command": {LogFile: "/tmp/x.log"},
		"no log":     {Cmd: exec.Command("true")},
		"stdout set": {Cmd: &exec.Cmd{Path: "/bin/true", Stdout: os.Stdout}, LogFile: "/tmp/x.log"},
	} {
		if _, err := daemonproc.Start(context.Background(), opts); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
}
