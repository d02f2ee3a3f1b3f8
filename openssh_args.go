package hpcproxy

// The ssh command line of the OpenSSH-based tunnel methods: controlmaster
// (dial_controlmaster.go), socks-unix (dial_sshsocks.go) and exec
// (dial_systemssh.go); socks-tcp is refused: see MethodSOCKSTCP. Each runs
// the system ssh client as a child process (openssh_child.go), so OpenSSH
// does all of the authentication (hostbased via ssh-keysign, GSSAPI, MFA,
// certificates, ProxyJump) and reads the user's ssh_config and known_hosts.
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

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"time"

	"github.com/hpcproxy/hpcproxy/internal/shellenv"
)

const (
	// defaultSetupTimeout bounds a method's setup when neither TunnelConfig
	// nor ssh_config sets ConnectTimeout.
	defaultSetupTimeout = 30 * time.Second
	// defaultServerAliveInterval is passed to ssh children when neither
	// TunnelConfig nor ssh_config sets ServerAliveInterval.
	defaultServerAliveInterval = 60
)

// errSSHNotFound is the reason the OpenSSH methods fail without an ssh
// client.
var errSSHNotFound = errors.New("hpcproxy: ssh client not found in PATH: install openssh-client")

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
	args = append(args, d.LoginArgs()...)
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
	words = append(words, last.LoginArgs()...)
	for _, o := range opts {
		words = append(words, "-o", o)
	}
	var b strings.Builder
	for _, w := range words {
		b.WriteString(shellenv.Quote(percentEscape(w)))
		b.WriteByte(' ')
	}
	// The one place where the tokens are meant: the outer ssh's target.
	b.WriteString("-W '[%h]:%p' -- ")
	b.WriteString(shellenv.Quote(percentEscape(last.Host)))
	return b.String(), nil
}

// percentEscape protects s from ssh's %-token expansion.
func percentEscape(s string) string { return strings.ReplaceAll(s, "%", "%%") }

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
	a = append(a, s.dest.LoginArgs()...)
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
