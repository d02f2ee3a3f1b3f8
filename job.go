package hpcproxy

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hpcproxy/hpcproxy/internal/daemonproc"
	"github.com/hpcproxy/hpcproxy/internal/jobenv"
	"github.com/hpcproxy/hpcproxy/internal/shellenv"
)

var jobProxy struct {
	once sync.Once
	url  string
	ok   bool
}

// GetJobProxy returns the proxy URL (with credentials) for programs that
// run inside a scheduler job, found with FindActiveProxy. Outside a job,
// on login nodes, which reach the internet themselves, it returns "",
// false. The result is computed once per process.
func GetJobProxy() (string, bool) {
	jobProxy.once.Do(func() {
		if !jobenv.Detect().InJob {
			return
		}
		jobProxy.url, jobProxy.ok = FindActiveProxy()
	})
	return jobProxy.url, jobProxy.ok
}

// FindActiveProxy returns the URL of a proxy this process can use,
// http://hpcproxy:TOKEN@host:port: this job's per-job proxy if it answers,
// else the user's shared proxy if it answers. See FindActiveProxyState.
func FindActiveProxy() (string, bool) {
	ps, ok := FindActiveProxyState()
	if !ok {
		return "", false
	}
	return ps.URL("http"), true
}

// FindActiveProxyState is FindActiveProxy returning the whole state, for
// callers that want the SOCKS URL or the credentials (ProxyEnvListFor).
// State files that are unreadable, unsafe or stale are skipped, never
// removed.
func FindActiveProxyState() (*ProxyState, bool) {
	return findActive(LocalPidFilePath(), PidFilePath())
}

func findActive(paths ...string) (*ProxyState, bool) {
	for _, p := range paths {
		ps, err := ReadPidFileAt(p)
		if err != nil {
			continue
		}
		if ps.Status == StatusStarting {
			continue
		}
		if CheckState(ps).Usable() {
			return ps, true
		}
	}
	return nil, false
}

// EnvVia names the environment variable that ResolveViaHost consults after
// the flag: a login node, or several separated by commas (see
// TunnelConfig.Destinations).
const EnvVia = "HPCPROXY_VIA"

// ErrNoViaHost is returned by ResolveViaHost when nothing names a login
// node: no argument, no $HPCPROXY_VIA and no submit host. A command line
// translates it into its own flag's hint.
var ErrNoViaHost = errors.New("hpcproxy: no login node: none given, " + EnvVia + " unset, and no submit host known")

// ResolveViaHost returns the SSH destination for a per-job tunnel: flagVia
// if set, else $HPCPROXY_VIA, else the host the job was submitted from
// (the submit host the scheduler records). If none is known, the error is ErrNoViaHost.
func ResolveViaHost(flagVia string) (string, error) {
	return resolveViaHost(flagVia, os.LookupEnv)
}

func resolveViaHost(flagVia string, env func(string) (string, bool)) (string, error) {
	if flagVia != "" {
		return flagVia, nil
	}
	if v, _ := env(EnvVia); v != "" {
		return v, nil
	}
	if j := jobenv.FromEnv(env); j.SubmitHost != "" {
		return j.SubmitHost, nil
	}
	return "", ErrNoViaHost
}

// proxyAlive reports whether something accepts TCP connections at
// host:port within 500 ms.
func proxyAlive(host string, port int) bool {
	c, err := net.DialTimeout("tcp", net.JoinHostPort(host, strconv.Itoa(port)), 500*time.Millisecond)
	if err != nil {
		return false
	}
	c.Close()
	return true
}

// remoteStart starts a shared proxy on another node over SSH, the way
// StartOnNode does, with its parts configurable.
type remoteStart struct {
	// SSHBinary optionally specifies the ssh client. If empty, "ssh".
	SSHBinary string
	// SSHOptions optionally adds ssh_config options ("Key=Value") given as
	// -o. BatchMode=yes is always given: nothing may prompt.
	SSHOptions []string
	// Command optionally specifies the remote command, to which
	// "--via VIA" (if via is set) and "--port N" (if port > 0) are
	// appended. If empty, it is this program (os.Executable(), which on a
	// cluster's shared file system has the same path on the other node)
	// with the argument "start".
	Command []string
	// StateFile optionally specifies the state file to wait for. If
	// empty, PidFilePath().
	StateFile string
	// Wait optionally bounds the wait for the state file to show an
	// answering proxy after ssh returned. If zero, 10 seconds (NFS
	// attribute caching can delay it).
	Wait time.Duration
}

// StartOnNode runs this program's "start" command on host over ssh
// (BatchMode=yes), passing --via and --port when set, and waits up to 10
// seconds for the shared state file to show an answering proxy. See
// remoteStart for the details and to change them.
func StartOnNode(host, via string, port int) error {
	return remoteStart{}.Run(context.Background(), host, via, port)
}

// Run starts the proxy on host; see StartOnNode. ctx bounds the whole run.
func (r remoteStart) Run(ctx context.Context, host, via string, port int) error {
	bin, args, err := r.sshArgs(host, via, port)
	if err != nil {
		return err
	}
	out, err := exec.CommandContext(ctx, bin, args...).CombinedOutput()
	if err != nil {
		msg := strings.TrimSpace(string(out))
		if msg == "" {
			return fmt.Errorf("hpcproxy: start on %s: %w", host, err)
		}
		return fmt.Errorf("hpcproxy: start on %s: %w: %s", host, err, msg)
	}
	state := cmp.Or(r.StateFile, PidFilePath())
	wait := r.Wait
	if wait <= 0 {
		wait = 10 * time.Second
	}
	deadline := time.Now().Add(wait)
	for {
		if _, ok := findActive(state); ok {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("hpcproxy: started on %s, but %s shows no answering proxy after %v", host, state, wait)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("hpcproxy: start on %s: %w", host, ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// sshArgs builds the ssh command line. ssh joins the remote command's
// words with spaces for the remote shell, so each is shell-quoted.
func (r remoteStart) sshArgs(host, via string, port int) (string, []string, error) {
	if host == "" || strings.HasPrefix(host, "-") || strings.ContainsAny(host, " \t\r\n") {
		return "", nil, fmt.Errorf("hpcproxy: invalid host %q", host)
	}
	cmd := r.Command
	if len(cmd) == 0 {
		exe, err := os.Executable()
		if err != nil {
			return "", nil, fmt.Errorf("hpcproxy: start on %s: %w", host, err)
		}
		cmd = []string{exe, "start"}
	}
	cmd = append([]string(nil), cmd...)
	if via != "" {
		cmd = append(cmd, "--via", via)
	}
	if port > 0 {
		cmd = append(cmd, "--port", strconv.Itoa(port))
	}
	args := []string{"-o", "BatchMode=yes"}
	for _, o := range r.SSHOptions {
		args = append(args, "-o", o)
	}
	args = append(args, "--", host)
	quoted := make([]string, len(cmd))
	for i, w := range cmd {
		quoted[i] = shellenv.Quote(w)
	}
	args = append(args, strings.Join(quoted, " "))
	return cmp.Or(r.SSHBinary, "ssh"), args, nil
}

// watchPID returns a channel that is closed when process pid has exited,
// checked every interval (a second if zero), or when ctx ends. A per-job
// daemon watches the job script (its PID from the scheduler) with it, so that it
// ends with the job even where the scheduler does not track processes
// that detached (Slurm's proctrack/linuxproc). On Linux the process is
// held by a pidfd from the start, so a reused PID is not mistaken for it.
func watchPID(ctx context.Context, pid int, interval time.Duration) <-chan struct{} {
	if interval <= 0 {
		interval = time.Second
	}
	ch := make(chan struct{})
	p, err := os.FindProcess(pid)
	if err != nil || pid <= 0 {
		close(ch)
		return ch
	}
	go func() {
		defer close(ch)
		defer p.Release()
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			if err := p.Signal(syscall.Signal(0)); err != nil && !errors.Is(err, syscall.EPERM) {
				return
			}
			// A signal reaches a zombie too: one whose parent does not
			// reap it (a container's init that does not) has ended.
			if !daemonproc.PIDAlive(pid) {
				return
			}
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
	}()
	return ch
}
