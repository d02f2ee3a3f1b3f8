package main

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/hpcproxy/hpcproxy"
	"github.com/hpcproxy/hpcproxy/internal/sshtest"
)

// benchCipher is the cipher every SSH contender uses, so that the
// comparison is between tunnels, not ciphers: AES-GCM is the fastest cipher
// both OpenSSH and x/crypto have (OpenSSH's default, chacha20-poly1305, is
// slower in both).
const benchCipher = "aes128-gcm@openssh.com"

// contender is one way of reaching the source: a proxy started as its own
// process (so that its CPU time and memory can be read from /proc).
type contender struct {
	name     string
	group    string // "ssh" (through the sshd) or "relay" (no SSH)
	baseline bool   // the one the others are compared with in its group
	// fds is how many file descriptors n held connections cost its
	// busiest process, whose limit is limit (a relay holds two sockets
	// per connection, a tunnel one).
	fds   func(n int, limit uint64) uint64
	start func(env *benchEnv) (*running, error)
}

// perConn returns an fds func for k descriptors per connection.
func perConn(k int) func(int, uint64) uint64 {
	return func(n int, _ uint64) uint64 { return uint64(k * n) }
}

// controlMasterFds is what the controlmaster method holds: three
// descriptors for each stdio forward, at most an eighth of the limit of
// them (hpcproxy's stdioCap), and one for each connection beyond.
func controlMasterFds(n int, limit uint64) uint64 {
	stdio := min(uint64(n), 4096, limit/8)
	return 3*stdio + (uint64(n) - stdio)
}

// running is a started contender.
type running struct {
	dial dialer
	pids []int // the roots of its process tree
	stop func()
	// log returns what the contender said on stderr or in its log file,
	// to explain a failure.
	log func() string
}

// benchEnv is what contenders are started against.
type benchEnv struct {
	dir  string // private scratch directory
	sshd *sshtest.SSHD
	src  *sourceProc
	self string // this program, to run hpcproxy's CLI as a child

	mu      sync.Mutex
	running map[*running]struct{} // stopped by stopAll on a signal
}

// start starts c and records it, so that stopAll reaches it; its stop
// forgets it again and may be called more than once.
func (env *benchEnv) start(c *contender) (*running, error) {
	r, err := c.start(env)
	if err != nil {
		return nil, err
	}
	stop, once := r.stop, sync.Once{}
	r.stop = func() {
		once.Do(stop)
		env.mu.Lock()
		delete(env.running, r)
		env.mu.Unlock()
	}
	env.mu.Lock()
	defer env.mu.Unlock()
	if env.running == nil {
		env.running = map[*running]struct{}{}
	}
	env.running[r] = struct{}{}
	return r, nil
}

// sshdPIDs returns the sshd listener's pid (its sessions are below it), or
// none without an sshd.
func (env *benchEnv) sshdPIDs() []int {
	if env.sshd != nil {
		if pid := env.sshd.PID(); pid != 0 {
			return []int{pid}
		}
	}
	return nil
}

// stopAll stops every running contender (the daemons run in sessions of
// their own: they would outlive an interrupted benchmark).
func (env *benchEnv) stopAll() {
	env.mu.Lock()
	rs := make([]*running, 0, len(env.running))
	for r := range env.running {
		rs = append(rs, r)
	}
	env.mu.Unlock()
	for _, r := range rs {
		r.stop()
	}
}

func allContenders() []*contender {
	return append([]*contender{
		{name: "hpcproxy gossh", group: "ssh", fds: perConn(1), start: startPerJob("gossh", 1, "--max-connections", "1")},
		{name: "hpcproxy gossh x2", group: "ssh", fds: perConn(1), start: startPerJob("gossh", 2)},
		{name: "hpcproxy controlmaster", group: "ssh", fds: controlMasterFds, start: startPerJob("controlmaster", 1)},
		{name: "ssh -D", group: "ssh", baseline: true, fds: perConn(1), start: startSSHD},
		{name: "hpcproxy direct", group: "relay", fds: perConn(2), start: startSharedDirect},
		{name: "socat", group: "relay", baseline: true, fds: perConn(2), start: startSocat},
		{name: "microsocks", group: "relay", fds: perConn(2), start: startMicrosocks},
	}, handoffContenders()...)
}

// cliEnv, when set in a child's environment, makes this program run
// hpcproxy's example CLI (perjob or shared) instead of the benchmark: the
// contenders are the real daemon, started the way users start it.
const cliEnv = "HPCPROXY_BENCH_CLI"

// runCLI runs an example binary's CLI as this process, if asked to.
func runCLI(args []string) (int, bool) {
	name := os.Getenv(cliEnv)
	if name == "" {
		return 0, false
	}
	app := cliApp(name)
	if app == nil {
		fmt.Fprintf(os.Stderr, "bench: unknown %s=%q\n", cliEnv, name)
		return 2, true
	}
	if prof := os.Getenv(profileEnv); prof != "" && len(args) > 0 && args[0] == "daemon" {
		// Profile the daemon (not the start command) until it stops.
		f, err := os.Create(fmt.Sprintf("%s.%d", prof, os.Getpid()))
		if err == nil && pprof.StartCPUProfile(f) == nil {
			defer f.Close()
			defer pprof.StopCPUProfile()
		}
		// SIGUSR1 writes a heap profile and the memory statistics.
		usr1 := make(chan os.Signal, 1)
		signal.Notify(usr1, syscall.SIGUSR1)
		go func() {
			for range usr1 {
				writeMemProfile(fmt.Sprintf("%s.%d.heap", prof, os.Getpid()))
			}
		}()
	}
	return app.Main(args), true
}

// writeMemProfile writes a heap profile to path and the runtime's memory
// statistics to path.txt.
func writeMemProfile(path string) {
	runtime.GC()
	if f, err := os.Create(path); err == nil {
		_ = pprof.WriteHeapProfile(f)
		f.Close()
	}
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	txt := fmt.Sprintf("goroutines %d\nHeapInuse %d\nHeapAlloc %d\nStackInuse %d\nHeapIdle %d\nHeapReleased %d\nSys %d\nNumGC %d\n",
		runtime.NumGoroutine(), ms.HeapInuse, ms.HeapAlloc, ms.StackInuse, ms.HeapIdle, ms.HeapReleased, ms.Sys, ms.NumGC)
	_ = os.WriteFile(path+".txt", []byte(txt), 0o600)
}

// profileEnv, when set to a path prefix, makes every hpcproxy daemon the
// benchmark starts write a CPU profile to PREFIX.PID: a way to see where a
// contender's CPU time goes (go tool pprof PREFIX.PID).
const profileEnv = "HPCPROXY_BENCH_CPUPROFILE"

// cli runs `NAME args...` (the perjob or shared example) as a child and
// returns its output; a failure includes the output and the daemon log.
func (env *benchEnv) cli(name string, state string, args ...string) ([]byte, error) {
	cmd := exec.Command(env.self, args...)
	cmd.Env = append(os.Environ(), cliEnv+"="+name)
	out, err := cmd.CombinedOutput()
	if err != nil {
		log, _ := os.ReadFile(hpcproxy.LogFilePath(state))
		return out, fmt.Errorf("%s %v: %w\n%s\ndaemon log:\n%s", name, args, err, out, log)
	}
	return out, nil
}

// startPerJob starts `perjob start` with one tunnel method (and conns SSH
// connections) through the benchmark's sshd. The benchmark runs as the
// daemon's owner, so its loopback connections need no token (the peer UID
// check of a per-job proxy runs for each of them, as for a user's).
func startPerJob(method string, conns int, extra ...string) func(env *benchEnv) (*running, error) {
	return func(env *benchEnv) (*running, error) {
		dir, err := os.MkdirTemp(env.dir, "perjob")
		if err != nil {
			return nil, err
		}
		state := filepath.Join(dir, "proxy.json")
		args := []string{"start", "--state", state, "--via", "sshtest",
			"--ssh-config", env.sshd.SSHConfigFile, "--method", method,
			"-o", "Ciphers=" + benchCipher, "--watch-pid", "-1",
			// Each contender measured alone: without this, contenders
			// with the same tunnel settings (controlmaster and its handoff
			// modes) would attach to the first one's node tunnel.
			"--private"}
		if conns > 1 {
			args = append(args, "--connections", strconv.Itoa(conns))
		}
		args = append(args, extra...)
		if _, err := env.cli("perjob", state, args...); err != nil {
			return nil, err
		}
		ps, err := hpcproxy.ReadPidFileAt(state)
		if err != nil {
			return nil, err
		}
		return &running{
			dial: socks5Dialer(ps.Addr(), env.src.addr, "", ""),
			pids: []int{ps.PID},
			stop: func() { stopDaemon(env, "perjob", state, ps.PID) },
			log:  fileTail(hpcproxy.LogFilePath(state)),
		}, nil
	}
}

// startSharedDirect starts `shared start` without --via: the login-node
// proxy relaying directly, with its token (SOCKS5 username/password).
func startSharedDirect(env *benchEnv) (*running, error) {
	dir, err := os.MkdirTemp(env.dir, "shared")
	if err != nil {
		return nil, err
	}
	state := filepath.Join(dir, "proxy.json")
	if _, err := env.cli("shared", state, "start", "--state", state, "--allow", "127.0.0.0/8"); err != nil {
		return nil, err
	}
	ps, err := hpcproxy.ReadPidFileAt(state)
	if err != nil {
		return nil, err
	}
	if ps.Credentials == nil {
		return nil, errors.New("shared proxy state has no credentials")
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(ps.Port))
	return &running{
		dial: socks5Dialer(addr, env.src.addr, ps.Credentials.User, ps.Credentials.Token),
		pids: []int{ps.PID},
		stop: func() { stopDaemon(env, "shared", state, ps.PID) },
		log:  fileTail(hpcproxy.LogFilePath(state)),
	}, nil
}

// stopDaemon runs `NAME stop` and makes sure the daemon is gone.
func stopDaemon(env *benchEnv, name, state string, pid int) {
	if _, err := env.cli(name, state, "stop", "--state", state); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
	}
	for deadline := time.Now().Add(10 * time.Second); alive(pid) && time.Now().Before(deadline); {
		time.Sleep(20 * time.Millisecond)
	}
	if alive(pid) {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
}

// startSSHD runs OpenSSH's own SOCKS forwarder, `ssh -N -D`, with the same
// cipher on the same sshd.
func startSSHD(env *benchEnv) (*running, error) {
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	p, err := startProcess(env, "ssh", addr, func() error {
		_, err := socks5Dialer(addr, env.src.addr, "", "")()
		return err
	}, "-N", "-D", addr, "-c", benchCipher, "-o", "ExitOnForwardFailure=yes",
		"-F", env.sshd.SSHConfigFile, "sshtest")
	if err != nil {
		return nil, err
	}
	return &running{dial: socks5Dialer(addr, env.src.addr, "", ""), pids: []int{p.pid()}, stop: p.stop, log: p.stderrTail}, nil
}

// startSocat runs socat as a port forwarder to the source, with the
// 256 KiB buffer that makes it fastest (its default is 8 KiB).
func startSocat(env *benchEnv) (*running, error) {
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	p, err := startProcess(env, "socat", addr, nil, "-b", "262144",
		fmt.Sprintf("TCP-LISTEN:%d,bind=127.0.0.1,reuseaddr,fork,backlog=4096", port), "TCP:"+env.src.addr)
	if err != nil {
		return nil, err
	}
	return &running{dial: tcpDialer(addr), pids: []int{p.pid()}, stop: p.stop, log: p.stderrTail}, nil
}

// startMicrosocks runs microsocks, a small SOCKS5 server, with
// username/password like hpcproxy's shared mode.
func startMicrosocks(env *benchEnv) (*running, error) {
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	p, err := startProcess(env, "microsocks", addr, nil, "-i", "127.0.0.1", "-p", strconv.Itoa(port),
		"-u", "bench", "-P", "benchpass")
	if err != nil {
		return nil, err
	}
	return &running{dial: socks5Dialer(addr, env.src.addr, "bench", "benchpass"), pids: []int{p.pid()}, stop: p.stop, log: p.stderrTail}, nil
}

// process is a contender the benchmark started itself.
type process struct {
	cmd    *exec.Cmd
	exited chan struct{}
	stderr *bytes.Buffer
}

func (p *process) pid() int { return p.cmd.Process.Pid }

// stderrTail returns the end of what the process wrote to stderr.
func (p *process) stderrTail() string { return tail(p.stderr.String()) }

// fileTail returns a func that reads the end of the file at path.
func fileTail(path string) func() string {
	return func() string {
		b, _ := os.ReadFile(path)
		return tail(string(b))
	}
}

// tail returns the last 2,000 bytes of s.
func tail(s string) string {
	if len(s) > 2000 {
		s = "..." + s[len(s)-2000:]
	}
	return s
}

func (p *process) stop() {
	_ = p.cmd.Process.Kill()
	<-p.exited
}

// startProcess starts the named program and waits until ready reports nil
// (or, if ready is nil, until addr accepts a connection).
func startProcess(env *benchEnv, name, addr string, ready func() error, args ...string) (*process, error) {
	path, err := exec.LookPath(name)
	if err != nil {
		return nil, fmt.Errorf("%s is not installed (apt-get install %s): %w", name, debianPackage(name), err)
	}
	p := &process{cmd: exec.Command(path, args...), exited: make(chan struct{}), stderr: new(bytes.Buffer)}
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	p.cmd.Stderr = p.stderr // microsocks logs every connection to stdout: dropped
	if err := p.cmd.Start(); err != nil {
		return nil, err
	}
	go func() { _ = p.cmd.Wait(); close(p.exited) }()
	if ready == nil {
		ready = func() error {
			c, err := net.DialTimeout("tcp", addr, time.Second)
			if err == nil {
				c.Close()
			}
			return err
		}
	}
	deadline := time.Now().Add(15 * time.Second)
	for {
		err := ready()
		if err == nil {
			return p, nil
		}
		select {
		case <-p.exited:
			return nil, fmt.Errorf("%s exited at start: %s", name, p.stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			p.stop()
			return nil, fmt.Errorf("%s not ready on %s: %w; stderr: %s", name, addr, err, p.stderr.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func debianPackage(name string) string {
	if name == "ssh" {
		return "openssh-client"
	}
	return name
}

func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}
