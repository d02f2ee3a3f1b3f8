package hpcproxy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/kevinburke/ssh_config"

	"github.com/hpcproxy/hpcproxy/internal/sshdest"
)

// destination is a parsed TunnelConfig.Destination (see sshdest).
type destination = sshdest.Destination

func parseDestination(s string) (destination, error) { return sshdest.Parse(s) }

// sshSettings is the configuration of one SSH destination, resolved the way
// the ssh client would resolve it. Paths are absolute, with ~ and the
// %-tokens expanded.
type sshSettings struct {
	Host     string // the host as given: a name, an address or an ssh_config alias
	HostName string // the host to connect to
	User     string
	Port     int

	IdentityFiles    []string
	IdentitiesOnly   bool
	IdentityAgent    string // agent socket; "" means $SSH_AUTH_SOCK, "none" no agent
	CertificateFiles []string

	ProxyJump    string // "host1,user@host2:port"; "" when there is none
	ProxyCommand string // "" when there is none (gossh cannot run one)

	UserKnownHostsFiles   []string
	GlobalKnownHostsFiles []string
	StrictHostKeyChecking string // lower case, as configured: yes, ask, accept-new, no, off
	HostKeyAlias          string
	HashKnownHosts        bool

	ConnectTimeout      time.Duration // zero when unset
	ServerAliveInterval time.Duration // zero when unset (or 0)
	ServerAliveCountMax int

	// HostKeyAlgorithms and Ciphers are nil unless the configuration
	// changed them from OpenSSH's defaults.
	HostKeyAlgorithms []string
	Ciphers           []string

	Source string // "ssh -G" or "ssh_config parser"
}

// addr returns "HostName:Port".
func (s *sshSettings) addr() string {
	return net.JoinHostPort(s.HostName, strconv.Itoa(s.Port))
}

// sshResolver resolves destinations into sshSettings.
//
// # Precedence
//
// As with ssh itself, the first value obtained for an option wins, and
// values are obtained in this order:
//
//  1. the explicit parts of the destination string: "user@" and ":port"
//     (ssh's -l and -p);
//  2. TunnelConfig.SSHOptions (ssh's -o);
//  3. the config files: TunnelConfig.SSHConfigFile if set (ssh's -F; "none"
//     reads none), otherwise ~/.ssh/config and then /etc/ssh/ssh_config;
//  4. OpenSSH's defaults.
//
// IdentityFile and CertificateFile accumulate over all of these instead.
//
// When an ssh binary is available (TunnelConfig.SSHBinary, else "ssh" in
// PATH) the resolution is delegated to `ssh -G`, which applies Match,
// Include, Canonicalize*, the defaults and token expansion exactly as a
// connection would. Without one (or with an ssh older than 6.8, which lacks
// -G) the files are read by github.com/kevinburke/ssh_config; that parser
// supports Host, Match Host/all and Include, but not Match exec/user/
// localuser, which make the resolution fail rather than guess.
//
// "~" and %d mean the home directory of the user's passwd entry, not $HOME,
// because that is where OpenSSH looks.
type sshResolver struct {
	binary     string // ssh program; "" means "ssh" from PATH
	configFile string // like ssh -F
	options    []string
	forceParse bool   // skip ssh -G (tests)
	home       string // passwd home; "" means look it up
	localUser  string // "" means look it up
	log        *slog.Logger
}

func newResolver(cfg *TunnelConfig) *sshResolver {
	return &sshResolver{
		binary:     cfg.SSHBinary,
		configFile: cfg.SSHConfigFile,
		options:    cfg.SSHOptions,
		log:        cfg.logger(),
	}
}

// errNoSSHG says that `ssh -G` is unavailable, so the parser must be used.
var errNoSSHG = errors.New("hpcproxy: ssh -G unavailable")

// resolve returns the settings for d.
func (r *sshResolver) resolve(ctx context.Context, d destination) (*sshSettings, error) {
	if err := r.identity(); err != nil {
		return nil, err
	}
	var (
		s   *sshSettings
		err error
	)
	if !r.forceParse {
		s, err = r.resolveSSHG(ctx, d)
		if errors.Is(err, errNoSSHG) {
			r.log.Debug("ssh -G unavailable, parsing ssh_config", "err", err)
			s, err = nil, nil
		} else if err != nil {
			return nil, err
		}
	}
	if s == nil {
		s, err = r.resolveParse(d)
		if err != nil {
			return nil, err
		}
	}
	r.expandPaths(s)
	return s, nil
}

// identity fills in the local user and the passwd home directory.
func (r *sshResolver) identity() error {
	if r.home != "" && r.localUser != "" {
		return nil
	}
	u, err := user.Current()
	if err != nil {
		return fmt.Errorf("hpcproxy: looking up the current user: %w", err)
	}
	if r.home == "" {
		r.home = u.HomeDir
	}
	if r.localUser == "" {
		r.localUser = u.Username
	}
	return nil
}

// resolveSSHG runs `ssh -G` for d. It returns an error wrapping errNoSSHG
// when there is no ssh binary or it does not know -G.
func (r *sshResolver) resolveSSHG(ctx context.Context, d destination) (*sshSettings, error) {
	bin := r.binary
	if bin == "" {
		bin = "ssh"
	}
	path, err := exec.LookPath(bin)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", errNoSSHG, err)
	}
	args := []string{"-G"}
	if r.configFile != "" {
		args = append(args, "-F", r.configFile)
	}
	args = append(args, d.LoginArgs()...)
	for _, o := range r.options {
		args = append(args, "-o", o)
	}
	args = append(args, "--", d.Host)
	kv, err := runSSHG(ctx, path, args)
	if err != nil {
		return nil, err
	}
	// OpenSSH's compiled-in defaults, to tell configured algorithm lists
	// from default ones (ssh -G prints both the same way).
	defaults, err := runSSHG(ctx, path, []string{"-G", "-F", "none", "--", d.Host})
	if err != nil {
		return nil, err
	}
	s := &sshSettings{Host: d.Host, Source: "ssh -G"}
	first := func(k string) string {
		if v := kv[k]; len(v) > 0 {
			return v[0]
		}
		return ""
	}
	s.HostName = first("hostname")
	s.User = first("user")
	if s.Port, err = strconv.Atoi(first("port")); err != nil {
		return nil, fmt.Errorf("hpcproxy: ssh -G printed a bad port %q", first("port"))
	}
	s.IdentityFiles = kv["identityfile"]
	s.IdentitiesOnly = first("identitiesonly") == "yes"
	s.IdentityAgent = first("identityagent")
	s.CertificateFiles = kv["certificatefile"]
	s.ProxyJump = noneToEmpty(first("proxyjump"))
	s.ProxyCommand = noneToEmpty(first("proxycommand"))
	s.UserKnownHostsFiles = strings.Fields(first("userknownhostsfile"))
	s.GlobalKnownHostsFiles = strings.Fields(first("globalknownhostsfile"))
	s.StrictHostKeyChecking = strings.ToLower(first("stricthostkeychecking"))
	s.HostKeyAlias = first("hostkeyalias")
	s.HashKnownHosts = first("hashknownhosts") == "yes"
	if s.ConnectTimeout, err = parseSeconds("ConnectTimeout", first("connecttimeout")); err != nil {
		return nil, err
	}
	if s.ServerAliveInterval, err = parseSeconds("ServerAliveInterval", first("serveraliveinterval")); err != nil {
		return nil, err
	}
	if v := first("serveralivecountmax"); v != "" {
		if s.ServerAliveCountMax, err = strconv.Atoi(v); err != nil {
			return nil, fmt.Errorf("hpcproxy: bad ServerAliveCountMax %q", v)
		}
	}
	for _, k := range []string{"ciphers", "hostkeyalgorithms"} {
		if first(k) == "" || first(k) == defaults[k][0] {
			continue
		}
		list := strings.Split(first(k), ",")
		if k == "ciphers" {
			s.Ciphers = list
		} else {
			s.HostKeyAlgorithms = list
		}
	}
	return s, nil
}

// runSSHG runs ssh with args (-G first) and returns its "key value" lines,
// keys in lower case, values in order of appearance.
func runSSHG(ctx context.Context, path string, args []string) (map[string][]string, error) {
	cmd := exec.CommandContext(ctx, path, args...)
	// ssh -G runs Match exec commands, which inherit its stderr: when ctx
	// ends, kill ssh's whole process group, and do not wait for a
	// straggler holding the pipe.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = time.Second
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		msg := strings.TrimSpace(stderr.String())
		if strings.Contains(msg, "illegal option") || strings.Contains(msg, "unknown option") {
			return nil, fmt.Errorf("%w: %s", errNoSSHG, msg)
		}
		return nil, fmt.Errorf("hpcproxy: %s %s: %w: %s", path, strings.Join(args, " "), err, msg)
	}
	kv := map[string][]string{}
	for line := range strings.Lines(string(out)) {
		k, v, _ := strings.Cut(strings.TrimSpace(line), " ")
		if k == "" {
			continue
		}
		k = strings.ToLower(k)
		kv[k] = append(kv[k], v)
	}
	if len(kv["hostname"]) == 0 || len(kv["port"]) == 0 {
		return nil, fmt.Errorf("%w: %s printed no hostname/port", errNoSSHG, path)
	}
	return kv, nil
}

// Defaults of OpenSSH's ssh_config(5), used by the parser.
var (
	defaultIdentityFiles = []string{
		"~/.ssh/id_rsa", "~/.ssh/id_ecdsa", "~/.ssh/id_ecdsa_sk",
		"~/.ssh/id_ed25519", "~/.ssh/id_ed25519_sk", "~/.ssh/id_xmss", "~/.ssh/id_dsa",
	}
	defaultUserKnownHosts   = []string{"~/.ssh/known_hosts", "~/.ssh/known_hosts2"}
	defaultGlobalKnownHosts = []string{"/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2"}
)

// systemSSHConfig is read after the user's config unless a config file is
// given explicitly, as ssh does.
const systemSSHConfig = "/etc/ssh/ssh_config"

// resolveParse resolves d by parsing the config files.
func (r *sshResolver) resolveParse(d destination) (*sshSettings, error) {
	var files []string
	switch r.configFile {
	case "none":
	case "":
		files = []string{filepath.Join(r.home, ".ssh", "config"), systemSSHConfig}
	default:
		files = []string{r.expandTilde(r.configFile)}
	}
	var cfgs []*ssh_config.Config
	for i, f := range files {
		b, err := os.ReadFile(f)
		if errors.Is(err, fs.ErrNotExist) && (r.configFile == "" || i > 0) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("hpcproxy: reading ssh config: %w", err)
		}
		c, err := ssh_config.DecodeBytes(b)
		if err != nil {
			return nil, fmt.Errorf("hpcproxy: parsing ssh config %s: %w", f, err)
		}
		cfgs = append(cfgs, c)
	}
	opts := map[string][]string{}
	for _, o := range r.options {
		k, v, ok := splitOption(o)
		if !ok {
			return nil, fmt.Errorf("hpcproxy: bad ssh option %q (want Key=Value)", o)
		}
		opts[k] = append(opts[k], v)
	}
	get := func(key string) string {
		if v := opts[strings.ToLower(key)]; len(v) > 0 {
			return v[0]
		}
		for _, c := range cfgs {
			if v, _ := c.Get(d.Host, key); v != "" {
				return v
			}
		}
		return ""
	}
	getAll := func(key string) []string {
		all := slices.Clone(opts[strings.ToLower(key)])
		for _, c := range cfgs {
			v, _ := c.GetAll(d.Host, key)
			all = append(all, v...)
		}
		return all
	}

	s := &sshSettings{Host: d.Host, Source: "ssh_config parser"}
	s.HostName = d.Host
	if v := get("HostName"); v != "" {
		s.HostName = strings.ReplaceAll(strings.ReplaceAll(v, "%h", d.Host), "%%", "%")
	}
	s.User = d.User
	if s.User == "" {
		s.User = orDefault(get("User"), r.localUser)
	}
	s.Port = d.Port
	if s.Port == 0 {
		s.Port = 22
		if v := get("Port"); v != "" {
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 || n > 65535 {
				return nil, fmt.Errorf("hpcproxy: bad Port %q in ssh config", v)
			}
			s.Port = n
		}
	}
	s.IdentityFiles = getAll("IdentityFile")
	if len(s.IdentityFiles) == 0 {
		s.IdentityFiles = defaultIdentityFiles
	}
	s.IdentitiesOnly = yes(get("IdentitiesOnly"))
	s.IdentityAgent = get("IdentityAgent")
	s.CertificateFiles = getAll("CertificateFile")
	s.ProxyJump = noneToEmpty(get("ProxyJump"))
	s.ProxyCommand = noneToEmpty(get("ProxyCommand"))
	s.UserKnownHostsFiles = fieldsOr(get("UserKnownHostsFile"), defaultUserKnownHosts)
	s.GlobalKnownHostsFiles = fieldsOr(get("GlobalKnownHostsFile"), defaultGlobalKnownHosts)
	s.StrictHostKeyChecking = strings.ToLower(orDefault(get("StrictHostKeyChecking"), "ask"))
	s.HostKeyAlias = get("HostKeyAlias")
	s.HashKnownHosts = yes(get("HashKnownHosts"))
	var err error
	if s.ConnectTimeout, err = parseSeconds("ConnectTimeout", get("ConnectTimeout")); err != nil {
		return nil, err
	}
	if s.ServerAliveInterval, err = parseSeconds("ServerAliveInterval", get("ServerAliveInterval")); err != nil {
		return nil, err
	}
	s.ServerAliveCountMax = 3
	if v := get("ServerAliveCountMax"); v != "" {
		if s.ServerAliveCountMax, err = strconv.Atoi(v); err != nil {
			return nil, fmt.Errorf("hpcproxy: bad ServerAliveCountMax %q", v)
		}
	}
	// Only plain lists: "+", "-" and "^" modify OpenSSH's defaults, which
	// the parser does not know; leave those to the client's defaults.
	if v := get("Ciphers"); v != "" && !strings.ContainsAny(v[:1], "+-^") {
		s.Ciphers = strings.Split(v, ",")
	}
	if v := get("HostKeyAlgorithms"); v != "" && !strings.ContainsAny(v[:1], "+-^") {
		s.HostKeyAlgorithms = strings.Split(v, ",")
	}
	return s, nil
}

// expandPaths expands ~ and the %-tokens in s's file names (ssh -G leaves
// them unexpanded in IdentityFile and CertificateFile).
func (r *sshResolver) expandPaths(s *sshSettings) {
	exp := func(list []string) []string {
		out := make([]string, 0, len(list))
		for _, p := range list {
			out = append(out, r.expand(p, s))
		}
		return out
	}
	s.IdentityFiles = exp(s.IdentityFiles)
	s.CertificateFiles = exp(s.CertificateFiles)
	s.UserKnownHostsFiles = exp(s.UserKnownHostsFiles)
	s.GlobalKnownHostsFiles = exp(s.GlobalKnownHostsFiles)
	if s.IdentityAgent != "" && s.IdentityAgent != "none" && s.IdentityAgent != "SSH_AUTH_SOCK" {
		s.IdentityAgent = r.expand(s.IdentityAgent, s)
	}
}

// expand expands a leading ~ and the tokens %d (home), %u (local user),
// %h (HostName), %n (host as given), %p (port), %r (remote user) and %%.
func (r *sshResolver) expand(p string, s *sshSettings) string {
	p = r.expandTilde(p)
	if !strings.Contains(p, "%") {
		return p
	}
	var b strings.Builder
	for i := 0; i < len(p); i++ {
		if p[i] != '%' || i+1 == len(p) {
			b.WriteByte(p[i])
			continue
		}
		i++
		switch p[i] {
		case 'd':
			b.WriteString(r.home)
		case 'u':
			b.WriteString(r.localUser)
		case 'h':
			b.WriteString(s.HostName)
		case 'n':
			b.WriteString(s.Host)
		case 'p':
			b.WriteString(strconv.Itoa(s.Port))
		case 'r':
			b.WriteString(s.User)
		case '%':
			b.WriteByte('%')
		default:
			b.WriteByte('%')
			b.WriteByte(p[i])
		}
	}
	return b.String()
}

// expandTilde replaces a leading "~" or "~/" with the passwd home.
func (r *sshResolver) expandTilde(p string) string {
	if p == "~" {
		return r.home
	}
	if rest, ok := strings.CutPrefix(p, "~/"); ok {
		return filepath.Join(r.home, rest)
	}
	return p
}

// splitOption splits an ssh -o option, "Key=Value" or "Key Value"; the key
// is returned in lower case.
func splitOption(o string) (key, value string, ok bool) {
	o = strings.TrimSpace(o)
	i := strings.IndexAny(o, "= \t")
	if i <= 0 {
		return "", "", false
	}
	key = strings.ToLower(o[:i])
	value = strings.TrimLeft(o[i:], "= \t")
	return key, strings.Trim(value, `"`), value != ""
}

// parseSeconds parses an ssh_config time value: plain seconds, "none", or
// OpenSSH's time format ("1m30s").
func parseSeconds(name, v string) (time.Duration, error) {
	v = strings.ToLower(strings.TrimSpace(v))
	if v == "" || v == "none" || v == "0" {
		return 0, nil
	}
	if n, err := strconv.Atoi(v); err == nil && n >= 0 {
		return time.Duration(n) * time.Second, nil
	}
	var total time.Duration
	num := ""
	for _, c := range v {
		if c >= '0' && c <= '9' {
			num += string(c)
			continue
		}
		n, err := strconv.Atoi(num)
		unit, ok := map[rune]time.Duration{'s': time.Second, 'm': time.Minute, 'h': time.Hour, 'd': 24 * time.Hour, 'w': 7 * 24 * time.Hour}[c]
		if err != nil || !ok {
			return 0, fmt.Errorf("hpcproxy: bad %s %q in ssh config", name, v)
		}
		total += time.Duration(n) * unit
		num = ""
	}
	if num != "" {
		n, _ := strconv.Atoi(num)
		total += time.Duration(n) * time.Second
	}
	return total, nil
}

func noneToEmpty(v string) string {
	if strings.EqualFold(v, "none") {
		return ""
	}
	return v
}

func yes(v string) bool {
	switch strings.ToLower(v) {
	case "yes", "true":
		return true
	}
	return false
}

func fieldsOr(v string, def []string) []string {
	if f := strings.Fields(v); len(f) > 0 {
		return f
	}
	return def
}

func orDefault(v, def string) string {
	if v != "" {
		return v
	}
	return def
}

// jumpHops splits a ProxyJump value ("host1,user@host2:port") into
// destinations. "none" and "" give none.
func jumpHops(v string) ([]destination, error) {
	v = noneToEmpty(strings.TrimSpace(v))
	if v == "" {
		return nil, nil
	}
	var hops []destination
	for _, h := range strings.Split(v, ",") {
		h = strings.TrimPrefix(strings.TrimSpace(h), "ssh://")
		d, err := parseDestination(h)
		if err != nil {
			return nil, fmt.Errorf("hpcproxy: bad ProxyJump %q: %w", v, err)
		}
		hops = append(hops, d)
	}
	return hops, nil
}

// jumpChain returns the SSH connections to make, in order: the ProxyJump
// hops, then s. As in OpenSSH, the first hop's own ProxyJump applies
// (recursively); later hops are reached through the hop before them. Hops
// are resolved with the same config file but without TunnelConfig.SSHOptions
// (ssh does not pass -o to its jump connections either).
func (r *sshResolver) jumpChain(ctx context.Context, s *sshSettings, depth int) ([]*sshSettings, error) {
	if s.ProxyJump == "" {
		return []*sshSettings{s}, nil
	}
	if depth >= maxJumpDepth {
		return nil, fmt.Errorf("hpcproxy: ProxyJump chain for %s is longer than %d hops (a loop?)", s.Host, maxJumpDepth)
	}
	hops, err := jumpHops(s.ProxyJump)
	if err != nil {
		return nil, err
	}
	hr := *r
	hr.options = nil
	var out []*sshSettings
	for i, h := range hops {
		hs, err := hr.resolve(ctx, h)
		if err != nil {
			return nil, err
		}
		if hs.ProxyCommand != "" {
			return nil, fmt.Errorf("hpcproxy: jump host %s uses ProxyCommand, which only OpenSSH can run", h.Host)
		}
		if i == 0 {
			sub, err := hr.jumpChain(ctx, hs, depth+1)
			if err != nil {
				return nil, err
			}
			out = append(out, sub...)
			continue
		}
		hs.ProxyJump = ""
		out = append(out, hs)
	}
	return append(out, s), nil
}
