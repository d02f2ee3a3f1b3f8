package hpcproxy

// The OpenSSH-based tunnel methods: controlmaster, socks-unix and exec
// (socks-tcp is refused: see MethodSOCKSTCP). Each runs the system ssh
// client as a child process, so OpenSSH does all of the authentication
// (hostbased via ssh-keysign, GSSAPI, MFA, certificates, ProxyJump) and
// reads the user's ssh_config and known_hosts.
//
// # How ssh is invoked
//
// Every ssh child gets, in this order (ssh keeps the FIRST value it sees for
// an option, and -o options beat the config files):
//
//  1. -F TunnelConfig.SSHConfigFile, when set, and -l USER and -p PORT when
//     the destination names them ("user@host:port"): they beat
//     SSHOptions' User and Port, the precedence sshResolver documents.
//  2. Options the user cannot override: BatchMode=yes (never prompt),
//     ExitOnForwardFailure=yes (a forward that cannot be set up is an exit,
//     not a warning), and StrictHostKeyChecking=yes, or accept-new under
//     HostKeyAcceptNew. hpcproxy never tunnels over an unverified host key:
//     a StrictHostKeyChecking=no in the user's ssh_config or SSHOptions is
//     overridden. (With "no", OpenSSH would also silently disable
//     forwarding when a known key CHANGED, so the tunnel would never work.)
//     When the destination has a ProxyJump, a ProxyCommand of ours that
//     replaces it (sshCommand.jumpCommand), so that the jump hosts get
//     BatchMode, host key checking and keepalives too.
//  3. The values TunnelConfig sets explicitly: ServerAliveInterval from
//     KeepaliveInterval (0 when negative: off), ServerAliveCountMax from
//     KeepaliveCountMax, ConnectTimeout from ConnectTimeout.
//  4. TunnelConfig.SSHOptions.
//  5. Method defaults the user may override with SSHOptions (ControlMaster=no
//     for the children that must not become or use a master, ...).
//  6. Defaults that apply only where ssh_config leaves the option unset, as
//     resolved with `ssh -G`: ServerAliveInterval=60 when the resolved value
//     is 0 (OpenSSH's default, "off"; without this, BatchMode=yes would
//     make it 300, with ServerAliveCountMax 3 a 15-minute blind spot), and LogLevel=INFO when ssh_config
//     asks for less, so that ssh's reasons ("open failed: connect failed:
//     Connection refused") reach the captured stderr. When `ssh -G` is not
//     available (OpenSSH < 6.8) or fails, the ssh_config parser is asked
//     instead (sshCommand.resolveParsed): ServerAliveInterval=60 is added
//     unless it finds ServerAliveInterval set.
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
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/crypto/ssh"
	"golang.org/x/net/proxy"
)

const (
	// defaultSetupTimeout bounds a method's setup when neither TunnelConfig
	// nor ssh_config sets ConnectTimeout.
	defaultSetupTimeout = 30 * time.Second
	// defaultServerAliveInterval is passed to ssh children when neither
	// TunnelConfig nor ssh_config sets ServerAliveInterval.
	defaultServerAliveInterval = 60
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

// errSSHNotFound is the reason the OpenSSH methods fail without an ssh
// client.
var errSSHNotFound = errors.New("hpcproxy: ssh client not found in PATH: install openssh-client")

// DialSystemSSH reaches node with the system ssh client, spawning
// `ssh -W host:port node` for each connection and using the process's
// stdin and stdout as the net.Conn. It is the slow last resort (one ssh
// process and one SSH handshake per connection) for when nothing else
// works, with everything OpenSSH can do (GSSAPI/Kerberos, hostbased, strict
// known_hosts, ProxyJump, ssh_config) at its disposal.
//
// Before returning, DialSystemSSH checks once that node accepts the user
// and forwards (see [MethodExec]). stop ends the tunnel; connections already
// dialled keep their own ssh process until they are closed. The returned
// done channel is closed only by stop, never because a connection dropped:
// there is no persistent link to watch.
//
// DialSystemSSH is [EstablishTunnel] with Methods {[MethodExec]}; use that
// for timeouts, ssh_config files and options, or a logger.
func DialSystemSSH(node string) (DialFunc, func(), <-chan struct{}, error) {
	tun, err := EstablishTunnel(context.Background(), TunnelConfig{
		Destination: node,
		Methods:     []Method{MethodExec},
	})
	if err != nil {
		return nil, nil, nil, err
	}
	return tun.Dial, func() { _ = tun.Close() }, tun.Done(), nil
}

// sshCommand builds ssh command lines for one destination.
type sshCommand struct {
	bin  string
	cfg  *TunnelConfig
	dest destination
	log  *slog.Logger
	// resolved is `ssh -G`'s view of the destination (lower-case keys);
	// nil when ssh -G failed.
	resolved map[string]string
	// parsed is the ssh_config parser's view when ssh -G failed; nil when
	// ssh -G worked or the parser failed too.
	parsed *sshSettings
	// defaults are the step-6 options, derived from resolved.
	defaults []string
	// proxyCommand replaces the destination's ProxyJump (see jumpCommand);
	// "" when it has none.
	proxyCommand string
	// hopUnchecked is set when a jump host's ssh_config turns host key
	// checking off, or could not be read: see userMasterOK.
	hopUnchecked bool
}

// newSSHCommand finds the ssh binary, parses the destination and resolves
// its configuration with `ssh -G`.
func newSSHCommand(ctx context.Context, cfg *TunnelConfig) (*sshCommand, error) {
	dest, err := parseDestination(cfg.Destination)
	if err != nil {
		return nil, err
	}
	bin, err := findSSH(cfg.SSHBinary)
	if err != nil {
		return nil, err
	}
	s := &sshCommand{bin: bin, cfg: cfg, dest: dest, log: cfg.logger()}
	s.resolve(ctx)
	jump := s.resolved["proxyjump"]
	if s.parsed != nil {
		jump = s.parsed.ProxyJump
	}
	if jump = noneToEmpty(jump); jump != "" {
		hops, err := jumpHops(jump)
		if err != nil {
			return nil, err
		}
		ctx, cancel := context.WithTimeout(ctx, s.resolveTimeout())
		defer cancel()
		if s.proxyCommand, err = s.jumpCommand(ctx, hops, 0); err != nil {
			return nil, err
		}
	}
	return s, nil
}

func findSSH(name string) (string, error) {
	if name == "" {
		p, err := exec.LookPath("ssh")
		if err != nil {
			return "", errSSHNotFound
		}
		return p, nil
	}
	p, err := exec.LookPath(name)
	if err != nil {
		return "", fmt.Errorf("hpcproxy: ssh client %q not usable: %w", name, err)
	}
	return p, nil
}

// resolveTimeout bounds each step of the resolution: 10 seconds, or
// ConnectTimeout when that is shorter.
func (s *sshCommand) resolveTimeout() time.Duration {
	timeout := 10 * time.Second
	if ct := s.cfg.ConnectTimeout; ct > 0 {
		timeout = min(timeout, ct)
	}
	return timeout
}

// resolve runs `ssh -G` and derives the default options from its output.
func (s *sshCommand) resolve(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, s.resolveTimeout())
	defer cancel()
	// Under BatchMode=yes, OpenSSH defaults ServerAliveInterval to 300;
	// resolve with BatchMode=no to see whether ssh_config sets it.
	// Likewise leave out our own StrictHostKeyChecking (the first one), so
	// that the user's accept-new shows through.
	var args []string
	forcedHostKey := true
	all := s.args(nil, nil, "-G")
	for i := 0; i < len(all); i++ {
		a := all[i]
		if a == "-o" && i+1 < len(all) && forcedHostKey && strings.HasPrefix(all[i+1], "StrictHostKeyChecking=") {
			forcedHostKey = false
			i++
			continue
		}
		if a == "BatchMode=yes" {
			a = "BatchMode=no"
		}
		args = append(args, a)
	}
	kv, err := runSSHG(ctx, s.bin, args)
	if err != nil {
		s.log.Debug("ssh -G failed; parsing ssh_config instead", "dest", s.cfg.Destination, "err", err)
		s.resolveParsed(ctx)
		return
	}
	s.resolved = make(map[string]string, len(kv))
	for k, v := range kv {
		s.resolved[k] = v[0] // multi-valued keys: keep the first
	}
	if s.cfg.KeepaliveInterval == 0 && s.resolved["serveraliveinterval"] == "0" {
		s.defaults = append(s.defaults, "-o", "ServerAliveInterval="+strconv.Itoa(defaultServerAliveInterval))
	}
	switch strings.ToUpper(s.resolved["loglevel"]) {
	case "QUIET", "SILENT", "FATAL", "ERROR":
		s.defaults = append(s.defaults, "-o", "LogLevel=INFO")
	}
}

// resolveParsed derives the step-6 defaults from the ssh_config parser
// when `ssh -G` failed. ServerAliveInterval=60 is added unless the parser
// finds the option set: without it, BatchMode=yes makes OpenSSH wait 300
// seconds (times ServerAliveCountMax) before it notices a dead link. When
// the parser cannot read the configuration either (Match exec, say), the
// default is added all the same. ServerAliveCountMax is left alone: OpenSSH
// defaults it to 3 whatever BatchMode says, and an -o would override a
// value the parser could not see.
func (s *sshCommand) resolveParsed(ctx context.Context) {
	r := newResolver(s.cfg)
	r.forceParse = true
	st, err := r.resolve(ctx, s.dest)
	if err != nil {
		s.log.Debug("ssh_config parser failed too; using hpcproxy's defaults", "dest", s.cfg.Destination, "err", err)
	} else {
		s.parsed = st
	}
	if s.cfg.KeepaliveInterval == 0 && (err != nil || st.ServerAliveInterval == 0) {
		s.defaults = append(s.defaults, "-o", "ServerAliveInterval="+strconv.Itoa(defaultServerAliveInterval))
	}
}

// hopConfig is what jumpCommand needs to know of a jump host's ssh_config.
type hopConfig struct {
	proxyJump string
	// strictHostKeyChecking is in ssh -G's words (true, false, ask,
	// accept-new); "" when unknown.
	strictHostKeyChecking string
	keepaliveSet          bool // ServerAliveInterval is set (not 0)
	controlPath           string
}

// lookupHop resolves a jump host's configuration with `ssh -G` (as the
// jump ssh will: same config file, its own -l and -p, no SSHOptions), or
// with the parser when ssh -G fails. The zero hopConfig means neither
// could read it.
func (s *sshCommand) lookupHop(ctx context.Context, d destination) hopConfig {
	args := []string{"-G"}
	if s.cfg.SSHConfigFile != "" {
		args = append(args, "-F", s.cfg.SSHConfigFile)
	}
	args = append(args, d.loginArgs()...)
	// BatchMode=no: under BatchMode, ssh -G shows 300 for an unset
	// ServerAliveInterval.
	args = append(args, "-o", "BatchMode=no", "--", d.Host)
	if kv, err := runSSHG(ctx, s.bin, args); err == nil {
		first := func(k string) string {
			if v := kv[k]; len(v) > 0 {
				return v[0]
			}
			return ""
		}
		return hopConfig{
			proxyJump:             noneToEmpty(first("proxyjump")),
			strictHostKeyChecking: first("stricthostkeychecking"),
			keepaliveSet:          first("serveraliveinterval") != "0",
			controlPath:           noneToEmpty(first("controlpath")),
		}
	}
	r := newResolver(s.cfg)
	r.forceParse, r.options = true, nil
	st, err := r.resolve(ctx, d)
	if err != nil {
		s.log.Debug("cannot resolve jump host", "host", d.Host, "err", err)
		return hopConfig{}
	}
	shkc := map[string]string{"yes": "true", "no": "false", "off": "false"}[st.StrictHostKeyChecking]
	return hopConfig{
		proxyJump:             st.ProxyJump,
		strictHostKeyChecking: orDefault(shkc, st.StrictHostKeyChecking),
		keepaliveSet:          st.ServerAliveInterval != 0,
	}
}

// jumpCommand returns a ProxyCommand that reaches %h:%p through hops (a
// ProxyJump list, in order), for ssh's command line.
//
// OpenSSH turns ProxyJump into a ProxyCommand of its own that passes only
// -F to the jump ssh: none of our forced options (BatchMode, host key
// checking, keepalives) would reach the jump hosts, and a
// `StrictHostKeyChecking no` in ssh_config would be honoured there. So we
// build that command ourselves, as OpenSSH builds it (the last hop is
// reached through the ones before it; the first hop's own ProxyJump
// applies), with the jump ssh getting BatchMode=yes, StrictHostKeyChecking
// yes (accept-new under HostKeyAcceptNew or when the hop's ssh_config says
// so), ControlMaster=no, ControlPath=none unless the hop's ssh_config keeps
// host key checking on, ServerAliveInterval (TunnelConfig's, else 60 when
// ssh_config leaves it unset), ServerAliveCountMax and ConnectTimeout when
// TunnelConfig sets them, and, for the hops before it, a nested
// ProxyCommand built the same way.
//
// ssh runs a ProxyCommand with $SHELL -c after expanding its %-tokens, so
// every literal word is %-escaped and single-quoted, and the children run
// with SHELL=/bin/sh (sshProcess.start).
func (s *sshCommand) jumpCommand(ctx context.Context, hops []destination, depth int) (string, error) {
	if depth >= maxJumpDepth {
		return "", fmt.Errorf("hpcproxy: ProxyJump chain for %s is longer than %d hops (a loop?)", s.dest.Host, maxJumpDepth)
	}
	last := hops[len(hops)-1]
	hc := s.lookupHop(ctx, last)
	if hc.strictHostKeyChecking == "" || hc.strictHostKeyChecking == "false" {
		s.hopUnchecked = true
	}
	var inner string
	switch {
	case len(hops) > 1:
		var err error
		if inner, err = s.jumpCommand(ctx, hops[:len(hops)-1], depth+1); err != nil {
			return "", err
		}
	case hc.proxyJump != "":
		sub, err := jumpHops(hc.proxyJump)
		if err != nil {
			return "", err
		}
		if inner, err = s.jumpCommand(ctx, sub, depth+1); err != nil {
			return "", err
		}
	}

	hostKey := "StrictHostKeyChecking=yes"
	if s.cfg.HostKeyPolicy == HostKeyAcceptNew || hc.strictHostKeyChecking == "accept-new" {
		hostKey = "StrictHostKeyChecking=accept-new"
	}
	opts := []string{"BatchMode=yes", hostKey, "ControlMaster=no"}
	if hc.controlPath == "" || hc.strictHostKeyChecking == "" || hc.strictHostKeyChecking == "false" {
		opts = append(opts, "ControlPath=none")
	}
	switch ka := s.cfg.KeepaliveInterval; {
	case ka > 0:
		opts = append(opts, "ServerAliveInterval="+strconv.Itoa(ceilSeconds(ka)))
	case ka < 0:
		opts = append(opts, "ServerAliveInterval=0")
	case !hc.keepaliveSet:
		opts = append(opts, "ServerAliveInterval="+strconv.Itoa(defaultServerAliveInterval))
	}
	if n := s.cfg.KeepaliveCountMax; n > 0 {
		opts = append(opts, "ServerAliveCountMax="+strconv.Itoa(n))
	}
	if ct := s.cfg.ConnectTimeout; ct > 0 {
		opts = append(opts, "ConnectTimeout="+strconv.Itoa(ceilSeconds(ct)))
	}
	if inner != "" {
		opts = append(opts, "ProxyCommand="+inner)
	}

	words := []string{s.bin}
	if s.cfg.SSHConfigFile != "" {
		words = append(words, "-F", s.cfg.SSHConfigFile)
	}
	words = append(words, last.loginArgs()...)
	for _, o := range opts {
		words = append(words, "-o", o)
	}
	var b strings.Builder
	for _, w := range words {
		b.WriteString(shellQuote(percentEscape(w)))
		b.WriteByte(' ')
	}
	// The one place where the tokens are meant: the outer ssh's target.
	b.WriteString("-W '[%h]:%p' -- ")
	b.WriteString(shellQuote(percentEscape(last.Host)))
	return b.String(), nil
}

// percentEscape protects s from ssh's %-token expansion.
func percentEscape(s string) string { return strings.ReplaceAll(s, "%", "%%") }

// shellQuote quotes s for a POSIX shell, unless it needs no quoting.
func shellQuote(s string) string {
	if s != "" && strings.Trim(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_@%+=:,./-") == "" {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// args returns ssh's arguments: -F, the destination's -l and -p, the
// fixed options, the explicit TunnelConfig values, extraFixed (method
// options the user cannot override), SSHOptions, overridable, the ssh -G
// defaults, flags, and the destination. See the comment at the top of this
// file.
func (s *sshCommand) args(extraFixed, overridable []string, flags ...string) []string {
	var a []string
	if s.cfg.SSHConfigFile != "" {
		a = append(a, "-F", s.cfg.SSHConfigFile)
	}
	a = append(a, s.dest.loginArgs()...)
	opt := func(o ...string) {
		for _, v := range o {
			a = append(a, "-o", v)
		}
	}
	// accept-new from the caller or from ssh_config is kept, as gossh keeps
	// it (hostKeyPolicy); "no" and "ask" become "yes".
	hostKey := "StrictHostKeyChecking=yes"
	if s.cfg.HostKeyPolicy == HostKeyAcceptNew || s.resolved["stricthostkeychecking"] == "accept-new" {
		hostKey = "StrictHostKeyChecking=accept-new"
	}
	opt("BatchMode=yes", "ExitOnForwardFailure=yes", hostKey)
	if s.proxyCommand != "" {
		// Before SSHOptions and ssh_config: it replaces their ProxyJump.
		opt("ProxyCommand=" + s.proxyCommand)
	}
	switch ka := s.cfg.KeepaliveInterval; {
	case ka > 0:
		opt("ServerAliveInterval=" + strconv.Itoa(ceilSeconds(ka)))
	case ka < 0:
		opt("ServerAliveInterval=0")
	}
	if n := s.cfg.KeepaliveCountMax; n > 0 {
		opt("ServerAliveCountMax=" + strconv.Itoa(n))
	}
	if ct := s.cfg.ConnectTimeout; ct > 0 {
		opt("ConnectTimeout=" + strconv.Itoa(ceilSeconds(ct)))
	}
	opt(extraFixed...)
	opt(s.cfg.SSHOptions...)
	opt(overridable...)
	a = append(a, s.defaults...)
	a = append(a, flags...)
	return append(a, "--", s.dest.Host)
}

func ceilSeconds(d time.Duration) int {
	return int((d + time.Second - 1) / time.Second)
}

// userMasterOK reports whether the user's own ControlMaster for the
// destination may carry our traffic (the controlmaster method attaching to
// it, exec's `ssh -W` handing off to it). Such a master was started by the
// user, with whatever options they gave it, so its host key was checked
// only if their configuration asked for that: it may be used only when
// `ssh -G` resolved a ControlPath for the destination and does not say
// "stricthostkeychecking false" for it (StrictHostKeyChecking no/off in
// ssh_config or SSHOptions), nor for any of its jump hosts. A master
// started by hand with
// -o StrictHostKeyChecking=no cannot be told apart; ssh_config is what
// hpcproxy can check.
func (s *sshCommand) userMasterOK() bool {
	if s.resolved == nil {
		return false
	}
	if cp := s.resolved["controlpath"]; cp == "" || cp == "none" {
		return false
	}
	return s.resolved["stricthostkeychecking"] != "false" && !s.hopUnchecked
}

// setupTimeout is how long a method may take to come up: ConnectTimeout,
// else ssh_config's ConnectTimeout, else defaultSetupTimeout.
func (s *sshCommand) setupTimeout() time.Duration {
	if s.cfg.ConnectTimeout > 0 {
		return s.cfg.ConnectTimeout
	}
	if n, err := strconv.Atoi(s.resolved["connecttimeout"]); err == nil && n > 0 {
		return time.Duration(n) * time.Second
	}
	return defaultSetupTimeout
}

// start starts ssh with the given arguments. With our own ProxyCommand
// (jumpCommand), ssh runs with SHELL=/bin/sh: ssh hands a ProxyCommand to
// $SHELL, and the command is quoted for a POSIX shell.
func (s *sshCommand) start(args []string, stdin, stdout *os.File) (*sshProcess, error) {
	s.log.Debug("starting ssh", "bin", s.bin, "args", args)
	var env []string
	if s.proxyCommand != "" {
		env = append(os.Environ(), "SHELL=/bin/sh")
	}
	return startSSHProcess(s.bin, args, env, stdin, stdout)
}

// sshProcess is a running ssh child.
type sshProcess struct {
	cmd     *exec.Cmd
	stderr  *tailBuffer
	exited  chan struct{} // closed once the child is reaped
	waitErr error         // cmd.Wait's result, valid after exited
}

// startSSHProcess starts bin in its own session with Pdeathsig, on a
// goroutine locked to its OS thread that then waits for the child (see the
// file comment). env nil means our environment. stdin and stdout may be
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
	return fmt.Errorf("hpcproxy: %s exited: %w: %s", what, err, msg)
}

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
// temporary directories: the node-local tmp dir ([NodeTmpDir]: a
// scheduler's per-job dir, $TMPDIR if it exists, else /tmp), or /tmp when
// sockets there would not fit in sun_path. Unlike os.TempDir it survives a
// job whose TMPDIR, passed on from the submitting host, does not exist on
// the node.
func socketTempBase() string {
	base := NodeTmpDir()
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

// ---- controlmaster ----

// controlMasterTunnel multiplexes channels in process over an OpenSSH
// ControlMaster's socket in mux proxy mode (OpenSSH >= 7.4). One control
// connection carries every channel.
type controlMasterTunnel struct {
	*childTunnel
	client  *ssh.Client
	ctlPath string // the control socket, for mux commands (controlfwd.go)
	// sockBase is where reverse forwards make their socket directories:
	// TunnelConfig.RuntimeDir, else socketTempBase().
	sockBase string
	log      *slog.Logger

	// The connections dialled as stdio forwards (controlstdio.go), closed
	// with the tunnel; nil once it is closed.
	stdioMu sync.Mutex
	stdio   map[*stdioConn]struct{}
}

var _ tunnelImpl = (*controlMasterTunnel)(nil)

// startControlMaster attaches to the user's live ControlMaster for the
// destination (ControlPath from ssh_config, as `ssh -G` resolves it) when
// userMasterOK allows it, or starts `ssh -M -S SOCK -N` and attaches to
// that. An attached user master is left running on Close; one we started
// dies with the tunnel.
func startControlMaster(ctx context.Context, cfg *TunnelConfig) (tunnelImpl, error) {
	s, err := newSSHCommand(ctx, cfg)
	if err != nil {
		return nil, err
	}
	timeout := s.setupTimeout()
	if cp := s.resolved["controlpath"]; cp != "" && cp != "none" && s.userMasterOK() {
		t, err := attachControlMaster(ctx, cp, nil, nil, "", min(timeout, 5*time.Second), s.log)
		if err == nil {
			s.log.Info("attached to the user's ssh control master", "dest", cfg.Destination, "path", cp)
			t.sockBase = cfg.RuntimeDir
			if t.sockBase == "" {
				t.sockBase = socketTempBase()
			}
			return t, nil
		}
		s.log.Debug("no usable control master at ControlPath", "path", cp, "err", err)
	} else if cp != "" && cp != "none" {
		s.log.Info("not using the user's ssh control master: ssh_config disables host key checking for the destination",
			"dest", cfg.Destination, "path", cp)
	}

	dir, err := openRuntimeDir(cfg)
	if err != nil {
		return nil, err
	}
	sock, err := dir.socketPath("cm", maxSunPath-controlPathSuffix)
	if err != nil {
		dir.cleanup("")
		return nil, err
	}
	proc, err := s.start(s.args([]string{"ControlPersist=no"}, nil, "-M", "-S", sock, "-N"), nil, nil)
	if err != nil {
		dir.cleanup(sock)
		return nil, err
	}
	// The master creates its socket only once it is logged in.
	conn, err := waitReady(ctx, proc, timeout, "its control socket", func(ctx context.Context) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", sock)
	})
	var t *controlMasterTunnel
	if err == nil {
		t, err = attachControlMaster(ctx, sock, conn, proc, sock, timeout, s.log)
	}
	if err != nil {
		proc.stop()
		dir.cleanup(sock)
		return nil, err
	}
	t.dir, t.sockBase = dir, dir.path
	return t, nil
}

// attachControlMaster speaks mux proxy mode over conn (dialled to path if
// nil) and returns the tunnel. proc is the master when it is ours.
func attachControlMaster(ctx context.Context, path string, conn net.Conn, proc *sshProcess, sock string,
	timeout time.Duration, log *slog.Logger) (*controlMasterTunnel, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if conn == nil {
		var d net.Dialer
		c, err := d.DialContext(ctx, "unix", path)
		if err != nil {
			return nil, fmt.Errorf("hpcproxy: control socket: %w", err)
		}
		conn = c
	}
	deadline, _ := ctx.Deadline()
	_ = conn.SetDeadline(deadline)
	// A cancelled ctx interrupts the handshake through the deadline.
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	c, chans, reqs, err := ssh.NewControlClientConn(newBufferedConn(conn))
	stopped := stop()
	if err != nil || !stopped {
		conn.Close()
		if err == nil {
			err = ctx.Err()
		}
		return nil, fmt.Errorf("hpcproxy: ssh control master at %s (mux proxy mode needs OpenSSH >= 7.4): %w", path, err)
	}
	_ = conn.SetDeadline(time.Time{})
	client := ssh.NewClient(c, chans, reqs)
	t := &controlMasterTunnel{childTunnel: newChildTunnel(proc, nil, sock), client: client, ctlPath: path,
		log: log, stdio: map[*stdioConn]struct{}{}}
	t.wg.Add(1)
	go t.watch()
	return t, nil
}

// watch fires Done when the master exits or the control connection drops.
func (t *controlMasterTunnel) watch() {
	defer t.wg.Done()
	waited := make(chan error, 1)
	go func() { waited <- t.client.Wait() }()
	var exited <-chan struct{}
	if t.proc != nil {
		exited = t.proc.exited
	}
	select {
	case <-exited:
		t.fail(t.proc.exitError())
		_ = t.client.Close()
		<-waited
	case err := <-waited:
		if exited != nil {
			// A dying master closes the socket before it is reaped: its
			// exit status and stderr say more than the EOF.
			timer := time.NewTimer(stopGrace)
			defer timer.Stop()
			select {
			case <-exited:
				t.fail(t.proc.exitError())
				return
			case <-t.closing:
			case <-timer.C:
			}
		}
		if err == nil {
			err = io.EOF
		}
		t.fail(fmt.Errorf("hpcproxy: ssh control connection lost: %w", err))
	}
}

// DialContext implements tunnelImpl: a stdio forward of the master
// (controlstdio.go), or, when that fails or too many are open, one channel
// over the control connection. Failures the login node reports are
// *RemoteDialError.
func (t *controlMasterTunnel) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	switch network {
	case "tcp", "tcp4", "tcp6":
	default:
		return nil, fmt.Errorf("hpcproxy: controlmaster tunnel cannot dial network %q", network)
	}
	t.stdioMu.Lock()
	n, closed := len(t.stdio), t.stdio == nil
	t.stdioMu.Unlock()
	if closed {
		return nil, t.downError(ErrTunnelDown)
	}
	if n < stdioCap() {
		sc, err := t.dialStdio(ctx, addr)
		if err == nil {
			return t.trackStdio(sc)
		}
		if ctx.Err() != nil {
			return nil, t.downError(err)
		}
		t.log.Debug("stdio forward failed; trying a proxy-mode channel", "dest", addr, "err", err)
	}
	c, err := openDirectContext(ctx, t.client, addr)
	if err != nil {
		return nil, t.downError(convertOpenChannelError(addr, err))
	}
	return c, nil
}

// trackStdio records c so that Close ends it, unless the tunnel is closed
// already.
func (t *controlMasterTunnel) trackStdio(c *stdioConn) (net.Conn, error) {
	t.stdioMu.Lock()
	defer t.stdioMu.Unlock()
	if t.stdio == nil {
		c.Close()
		return nil, t.downError(ErrTunnelDown)
	}
	t.stdio[c] = struct{}{}
	c.onClose = func() {
		t.stdioMu.Lock()
		delete(t.stdio, c)
		t.stdioMu.Unlock()
	}
	return c, nil
}

// Close implements tunnelImpl. It ends the connections dialled through the
// tunnel, stdio forwards included (those of a user's master would outlive
// the tunnel otherwise).
func (t *controlMasterTunnel) Close() error {
	t.close(func() {
		_ = t.client.Close()
		t.stdioMu.Lock()
		conns := t.stdio
		t.stdio = nil
		t.stdioMu.Unlock()
		for c := range conns {
			c.Close()
		}
	})
	return nil
}

// ---- socks-unix ----

// socksTunnel speaks SOCKS5 to `ssh -N -D /path/sock` over its unix socket,
// which ssh creates owner-only (StreamLocalBindMask) in the private runtime
// directory. When the login node cannot connect, ssh -D closes the
// socket without a SOCKS reply, but logs the reason ("channel 3: open
// failed: connect failed: Connection refused"; LogLevel INFO is forced, see
// the file comment): a failed dial looks briefly for such a line written
// to ssh's stderr since its handshake began, and its *RemoteDialError
// carries that reason and its cause (ECONNREFUSED, ...). When there is no
// such line, or concurrent failures logged different reasons, the error
// has no cause. The lines do not name the destination, so a failure
// reported at the same moment by another dial with the same reason cannot
// be told apart; that is the heuristic's limit.
//
// There is no TCP variant (`ssh -D 127.0.0.1:PORT`): any local user could
// use that port (MethodSOCKSTCP).
type socksTunnel struct {
	*childTunnel
	network, addr string // the SOCKS server: "unix" and its path
	socks         interface {
		DialWithConn(ctx context.Context, c net.Conn, network, address string) (net.Addr, error)
	}
}

var _ tunnelImpl = (*socksTunnel)(nil)

// startSOCKSTunnel starts `ssh -N -D` on a unix socket in the runtime
// directory and waits until it accepts connections.
func startSOCKSTunnel(ctx context.Context, cfg *TunnelConfig) (tunnelImpl, error) {
	s, err := newSSHCommand(ctx, cfg)
	if err != nil {
		return nil, err
	}
	dir, err := openRuntimeDir(cfg)
	if err != nil {
		return nil, err
	}
	sock, err := dir.socketPath("socks", maxSunPath)
	if err != nil {
		dir.cleanup("")
		return nil, err
	}
	t, err := runSOCKS(ctx, s, "unix", sock)
	if err != nil {
		dir.cleanup(sock)
		return nil, err
	}
	t.dir, t.sock = dir, sock
	return t, nil
}

func runSOCKS(ctx context.Context, s *sshCommand, network, addr string) (*socksTunnel, error) {
	d, err := proxy.SOCKS5(network, addr, nil, proxy.Direct)
	if err != nil {
		return nil, fmt.Errorf("hpcproxy: %w", err)
	}
	sd, ok := d.(interface {
		DialWithConn(ctx context.Context, c net.Conn, network, address string) (net.Addr, error)
	})
	if !ok {
		return nil, fmt.Errorf("hpcproxy: golang.org/x/net/proxy SOCKS5 dialer %T lacks DialWithConn", d)
	}
	// ssh children that must not become, or hand off to, a control master:
	// the forwarding has to live in the process we supervise.
	proc, err := s.start(s.args(nil, []string{"ControlMaster=no", "ControlPath=none"}, "-N", "-D", addr), nil, nil)
	if err != nil {
		return nil, err
	}
	conn, err := waitReady(ctx, proc, s.setupTimeout(), "its SOCKS listener", func(ctx context.Context) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, network, addr)
	})
	if err != nil {
		proc.stop()
		return nil, err
	}
	conn.Close()
	t := &socksTunnel{childTunnel: newChildTunnel(proc, nil, ""), network: network, addr: addr, socks: sd}
	t.wg.Add(1)
	go func() {
		defer t.wg.Done()
		select {
		case <-proc.exited:
			t.fail(proc.exitError())
		case <-t.closing:
		}
	}()
	return t, nil
}

// DialContext implements tunnelImpl: a SOCKS5 CONNECT through ssh -D. The
// returned conn is the raw *net.UnixConn (CloseWrite, splice).
func (t *socksTunnel) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, t.network, t.addr)
	if err != nil {
		return nil, t.downError(fmt.Errorf("hpcproxy: ssh -D at %s: %w", t.addr, err))
	}
	logged := t.proc.stderr.offset()
	if _, err := t.socks.DialWithConn(ctx, c, network, addr); err != nil {
		c.Close()
		if ctx.Err() != nil {
			return nil, err
		}
		if t.proc.hasExited() {
			return nil, t.downError(err)
		}
		// ssh -D hangs up without a SOCKS reply when its channel open
		// fails: the login node could not connect, and ssh logged why.
		rde := &RemoteDialError{Addr: addr, Reason: "no reason given by ssh -D"}
		if reason := t.openFailure(ctx, logged); reason != "" {
			rde = newRemoteDialError(addr, reason)
		}
		return nil, fmt.Errorf("%w (%w)", rde, err)
	}
	return c, nil
}

// openFailureWait is how long a failed SOCKS dial waits for ssh's reason to
// reach its stderr (ssh logs it before it closes the socket; our copy of
// its stderr trails a little).
const openFailureWait = 100 * time.Millisecond

// openFailure returns the reason ssh logged for a failed channel open
// after stderr offset off, waiting up to openFailureWait for it; "" if
// none arrives or the reasons logged meanwhile differ.
func (t *socksTunnel) openFailure(ctx context.Context, off int64) string {
	timer := time.NewTimer(openFailureWait)
	defer timer.Stop()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		if r, ok := openFailureReason(t.proc.stderr.since(off)); ok {
			return r
		}
		select {
		case <-tick.C:
		case <-timer.C:
			return ""
		case <-ctx.Done():
			return ""
		}
	}
}

// openFailureReason finds ssh's "channel N: open failed: REASON" lines in
// log. ok is false when there is none; when there are several with
// different reasons, ok is true and reason "" (which one is ours is
// unknown).
func openFailureReason(log string) (reason string, ok bool) {
	for line := range strings.Lines(log) {
		_, r, found := strings.Cut(line, "open failed: ")
		if !found {
			continue
		}
		r = strings.TrimSpace(r)
		if ok && r != reason {
			return "", true
		}
		reason, ok = r, true
	}
	return reason, ok
}

// Close implements tunnelImpl. Connections already dialled are separate
// sockets to ssh; they end when ssh exits.
func (t *socksTunnel) Close() error {
	t.close(nil)
	return nil
}

// ---- exec ----

// execTunnel runs `ssh -W host:port` for every connection. There is no
// persistent link: Done fires only on Close, and connections already
// dialled keep their own ssh process until they are closed.
type execTunnel struct {
	s    *sshCommand
	once sync.Once
	done chan struct{}
}

var _ tunnelImpl = (*execTunnel)(nil)

// startExecTunnel checks once that the destination lets us in and
// forwards: it runs `ssh -W HOST:PORT dest` to the login node's own sshd
// (HostName and Port as `ssh -G` resolves them) and reads its banner. A
// refused or unreachable target still proves login and forwarding work
// (the channel open comes after authentication), so only a login failure
// or forwarding that the login node prohibits fails the method.
func startExecTunnel(ctx context.Context, cfg *TunnelConfig) (tunnelImpl, error) {
	s, err := newSSHCommand(ctx, cfg)
	if err != nil {
		return nil, err
	}
	t := &execTunnel{s: s, done: make(chan struct{})}
	host, port := s.resolved["hostname"], s.resolved["port"]
	if host == "" {
		host = s.dest.Host
	}
	if port == "" {
		port = "22"
		if s.dest.Port != 0 {
			port = strconv.Itoa(s.dest.Port)
		}
	}
	target := net.JoinHostPort(host, port)
	if err := t.probe(ctx, target, s.setupTimeout()); err != nil {
		return nil, err
	}
	return t, nil
}

func (t *execTunnel) probe(ctx context.Context, target string, timeout time.Duration) error {
	c, err := t.DialContext(ctx, "tcp", target)
	if err != nil {
		return err
	}
	defer c.Close()
	deadline := time.Now().Add(timeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	_ = c.SetReadDeadline(deadline)
	stop := context.AfterFunc(ctx, func() { _ = c.SetReadDeadline(time.Unix(1, 0)) })
	defer stop()
	banner := make([]byte, 4)
	_, err = io.ReadFull(c, banner)
	var rde *RemoteDialError
	switch {
	case err == nil && string(banner) == "SSH-":
		return nil
	case err == nil:
		t.s.log.Debug("exec probe: unexpected banner; login and forwarding work", "target", target, "banner", banner)
		return nil
	case errors.As(err, &rde) && !errors.Is(err, ErrProhibited):
		t.s.log.Debug("exec probe: target unreachable; login and forwarding work", "target", target, "err", err)
		return nil
	case errors.As(err, &rde):
		return err
	case errors.Is(err, os.ErrDeadlineExceeded):
		return fmt.Errorf("hpcproxy: ssh -W %s gave no answer within %v: %w", target, timeout, err)
	}
	return err
}

// DialContext implements tunnelImpl: it starts `ssh -W addr` and returns
// its stdio as a conn at once. Whether the login node reached addr shows on
// the first Read: a *RemoteDialError (errors.Is ECONNREFUSED etc.) built
// from ssh's message when it could not.
func (t *execTunnel) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	switch network {
	case "tcp", "tcp4", "tcp6":
	default:
		return nil, fmt.Errorf("hpcproxy: exec method cannot dial network %q", network)
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("hpcproxy: dial %s: %w", addr, err)
	}
	if strings.HasPrefix(host, "-") || strings.ContainsAny(host, " \t\r\n") {
		return nil, fmt.Errorf("hpcproxy: dial %s: invalid host", addr)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	select {
	case <-t.done:
		return nil, ErrTunnelDown
	default:
	}
	// Pipes from os.Pipe are non-blocking on our side: deadlines work.
	inR, inW, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("hpcproxy: %w", err)
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		inR.Close()
		inW.Close()
		return nil, fmt.Errorf("hpcproxy: %w", err)
	}
	// ControlMaster=no: never become a master ourselves. A live master of
	// the user's (ControlPath) makes -W fast, but is used only when
	// userMasterOK: otherwise ControlPath=none, which SSHOptions cannot
	// undo.
	var fixed []string
	if !t.s.userMasterOK() {
		fixed = []string{"ControlPath=none"}
	}
	args := t.s.args(fixed, []string{"ControlMaster=no"}, "-W", net.JoinHostPort(host, port))
	proc, err := t.s.start(args, inR, outW)
	inR.Close()
	outW.Close()
	if err != nil {
		inW.Close()
		outR.Close()
		return nil, err
	}
	return &execConn{proc: proc, r: outR, w: inW, addr: addr, dest: t.s.cfg.Destination}, nil
}

// Close implements tunnelImpl.
func (t *execTunnel) Close() error {
	t.once.Do(func() { close(t.done) })
	return nil
}

// Done implements tunnelImpl; it fires only on Close.
func (t *execTunnel) Done() <-chan struct{} { return t.done }

// Err implements tunnelImpl; it is always nil.
func (t *execTunnel) Err() error { return nil }

// execConn is one `ssh -W` process as a net.Conn: Write feeds its stdin,
// Read drains its stdout, CloseWrite closes stdin (the far side sees EOF),
// Close ends the process. Deadlines work (non-blocking pipes).
//
// Half-close works one way only: after CloseWrite the far side's answer
// still arrives, but once the far side shuts down its write side, ssh -W
// stops forwarding what we write (OpenSSH's stdio forwarding, checked with
// 9.2); the channel methods forward both directions independently.
type execConn struct {
	proc       *sshProcess
	r          *os.File // ssh's stdout
	w          *os.File // ssh's stdin
	addr, dest string
	gotData    atomic.Bool
	closeOnce  sync.Once
}

var _ net.Conn = (*execConn)(nil)

// Read reads from ssh's stdout. At EOF before any data, if ssh failed, the
// error says why: a *RemoteDialError when the login node could not
// connect.
func (c *execConn) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	if n > 0 {
		c.gotData.Store(true)
	}
	// Once data has arrived the channel was open: EOF is the far side's.
	// A failed channel open ends stdout without data, as ssh exits.
	if err == io.EOF && !c.gotData.Load() {
		if e := c.exitError(); e != nil {
			return n, e
		}
	}
	return n, err
}

// exitError waits briefly for ssh to exit after EOF and returns why it
// failed, or nil if it exited cleanly or is still running (the far side
// half-closed without sending anything).
func (c *execConn) exitError() error {
	t := time.NewTimer(stopGrace)
	defer t.Stop()
	select {
	case <-c.proc.exited:
	case <-t.C:
		return nil
	}
	if c.proc.waitErr == nil {
		return nil
	}
	msg := c.proc.stderr.String()
	if _, reason, ok := strings.Cut(msg, "open failed: "); ok {
		reason, _, _ = strings.Cut(reason, "; ")
		return newRemoteDialError(c.addr, reason)
	}
	return c.proc.exitErrorAs(fmt.Sprintf("ssh -W %s via %s", c.addr, c.dest))
}

// Write writes to ssh's stdin.
func (c *execConn) Write(p []byte) (int, error) { return c.w.Write(p) }

// CloseWrite closes ssh's stdin: ssh sends EOF on the channel.
func (c *execConn) CloseWrite() error { return c.w.Close() }

// Close closes both pipes and ends the ssh process.
func (c *execConn) Close() error {
	c.closeOnce.Do(func() {
		_ = c.w.Close()
		_ = c.r.Close()
		c.proc.stop()
	})
	return nil
}

// LocalAddr returns the destination the ssh process logs in to.
func (c *execConn) LocalAddr() net.Addr { return execAddr(c.dest) }

// RemoteAddr returns the address ssh -W connects to.
func (c *execConn) RemoteAddr() net.Addr { return execAddr(c.addr) }

// SetDeadline sets the read and write deadlines.
func (c *execConn) SetDeadline(t time.Time) error {
	return errors.Join(c.r.SetReadDeadline(t), c.w.SetWriteDeadline(t))
}

// SetReadDeadline sets the deadline for Read.
func (c *execConn) SetReadDeadline(t time.Time) error { return c.r.SetReadDeadline(t) }

// SetWriteDeadline sets the deadline for Write.
func (c *execConn) SetWriteDeadline(t time.Time) error { return c.w.SetWriteDeadline(t) }

// execAddr is an address on the far side of an `ssh -W` process.
type execAddr string

// Network returns "ssh-exec".
func (execAddr) Network() string { return "ssh-exec" }

func (a execAddr) String() string { return string(a) }
