// Package cli implements the commands of the example binaries
// examples/shared and examples/perjob: start, stop, status, expose,
// forward, env, run, connect, and the hidden daemon command that start
// launches. The library does the work; this package only parses flags and
// prints.
package cli

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/net/proxy"

	"github.com/hpcproxy/hpcproxy"
	"github.com/hpcproxy/hpcproxy/internal/daemonproc"
	"github.com/hpcproxy/hpcproxy/internal/jobenv"
	"github.com/hpcproxy/hpcproxy/internal/shellenv"
	"github.com/hpcproxy/hpcproxy/internal/sshdest"
	"github.com/hpcproxy/hpcproxy/transparent"
)

// daemonErrors are the library's errors that a daemon reports and start
// branches on (ErrUnsafePath daemonproc knows itself).
var daemonErrors = []error{hpcproxy.ErrAlreadyRunning, hpcproxy.ErrNodeTunnelRunning}

// App is one example binary: its name and the mode it runs daemons in.
type App struct {
	Name   string
	Mode   hpcproxy.Mode
	Stdout io.Writer
	Stderr io.Writer
	Stdin  io.Reader
}

type command struct {
	name, args, summary string
	run                 func(a *App, args []string) error
	perJobOnly          bool
	hidden              bool
}

func (a *App) commands() []command {
	stopSummary := "stop the running proxy daemon"
	if a.Mode == hpcproxy.ModePerJob {
		stopSummary = "stop this job's proxy (on a node tunnel other jobs use: detach this job only)"
	}
	return []command{
		{name: "start", args: "[flags]", summary: "start the proxy daemon and wait until it is ready", run: (*App).start},
		{name: "stop", args: "[flags]", summary: stopSummary, run: (*App).stop},
		{name: "status", args: "[flags]", summary: "show the proxy's state, tunnel and counters", run: (*App).status},
		{name: "expose", args: "[flags] LOCAL[=REMOTE]", summary: "have the login node listen and connect to LOCAL here, like ssh -R (running proxy)", run: (*App).expose},
		{name: "forward", args: "[flags] LOCAL=REMOTE", summary: "listen on LOCAL here and connect to REMOTE from the login node, like ssh -L (running proxy)", run: (*App).forward},
		{name: "env", args: "[flags]", summary: "print export lines for the proxy: eval \"$(NAME env)\"", run: (*App).env},
		{name: "run", args: "[flags] -- CMD [ARG...]", summary: "run CMD with the proxy environment (--transparent: every TCP connection and DNS, no proxy settings needed)", run: (*App).runCmd},
		{name: "connect", args: "[flags] HOST PORT", summary: "relay stdin/stdout to HOST:PORT through the proxy (ssh ProxyCommand)", run: (*App).connect},
		{name: "version", args: "", summary: "print the version of this program (also --version)", run: (*App).printVersion},
		{name: "daemon", args: "[flags]", summary: "run the daemon in the foreground (start runs this)", run: (*App).daemon, hidden: true},
	}
}

// Main runs the command named by args[0] and returns the exit status.
// In the namespace stage of run --transparent (this program re-executed
// by transparent.Start) it executes the command instead and never
// returns.
func (a *App) Main(args []string) int {
	transparent.Init()
	if a.Stdout == nil {
		a.Stdout = os.Stdout
	}
	if a.Stderr == nil {
		a.Stderr = os.Stderr
	}
	if a.Stdin == nil {
		a.Stdin = os.Stdin
	}
	switch {
	case len(args) == 0:
		// A usage error: the usage goes to stderr, stdout stays clean.
		a.usage(a.Stderr)
		return 2
	case args[0] == "-h" || args[0] == "-help" || args[0] == "--help" || (args[0] == "help" && len(args) == 1):
		a.usage(a.Stdout)
		return 0
	case args[0] == "--version" || args[0] == "-version":
		args = []string{"version"}
	case args[0] == "help":
		// help CMD is CMD --help.
		return a.Main([]string{args[1], "--help"})
	}
	for _, c := range a.commands() {
		if c.name != args[0] {
			continue
		}
		err := c.run(a, args[1:])
		switch {
		case err == nil:
			return 0
		case errors.Is(err, flag.ErrHelp):
			return 0
		case errors.Is(err, errUsage):
			return 2
		}
		var ee *exitError
		if errors.As(err, &ee) {
			return ee.code
		}
		// The library's errors say "hpcproxy: "; after "perjob start: " that
		// says nothing more.
		fmt.Fprintf(a.Stderr, "%s %s: %s\n", a.Name, c.name, strings.TrimPrefix(err.Error(), "hpcproxy: "))
		return 1
	}
	fmt.Fprintf(a.Stderr, "%s: unknown command %q\nRun '%s --help' for the commands.\n", a.Name, args[0], a.Name)
	return 2
}

func (a *App) usage(w io.Writer) {
	where := "a login node (shared mode: all interfaces, token required)"
	if a.Mode == hpcproxy.ModePerJob {
		where = "a compute node, inside a job (per-job mode: 127.0.0.1, owner only)"
	}
	fmt.Fprintf(w, "%s runs an hpcproxy on %s.\n\nUsage:\n", a.Name, where)
	for _, c := range a.commands() {
		if !c.hidden {
			fmt.Fprintf(w, "  %s %-8s %-26s %s\n", a.Name, c.name, c.args, strings.ReplaceAll(c.summary, "NAME", a.Name))
		}
	}
	fmt.Fprintf(w, "\nRun '%s COMMAND --help' for a command's flags.\n", a.Name)
}

// errUsage: the flag package already printed what was wrong.
var errUsage = errors.New("usage")

type exitError struct{ code int }

func (e *exitError) Error() string { return "exit status " + strconv.Itoa(e.code) }

// flags is the set of flags every command shares, plus its own.
type flags struct {
	*flag.FlagSet
	app     *App
	state   string
	verbose bool
}

func (a *App) newFlags(cmd, args, summary string) *flags {
	f := &flags{FlagSet: flag.NewFlagSet(a.Name+" "+cmd, flag.ContinueOnError), app: a}
	f.SetOutput(a.Stderr)
	f.StringVar(&f.state, "state", "", "state file (default: "+a.defaultStatePath()+")")
	f.BoolVar(&f.verbose, "v", false, "verbose: say what happens")
	f.Usage = func() {
		fmt.Fprintf(f.Output(), "Usage: %s %s %s\n\n%s.\n\nFlags:\n", a.Name, cmd, args, summary)
		f.PrintDefaults()
	}
	return f
}

func (f *flags) parse(args []string) error {
	for _, arg := range args {
		if arg == "--" {
			break
		}
		if arg == "-h" || arg == "-help" || arg == "--help" {
			f.SetOutput(f.app.Stdout) // asked-for help is output, not an error
		}
	}
	if err := f.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return errUsage
	}
	return nil
}

func (a *App) defaultStatePath() string {
	if a.Mode == hpcproxy.ModePerJob {
		return hpcproxy.LocalPidFilePath()
	}
	return hpcproxy.PidFilePath()
}

func (a *App) statePath(f *flags) string {
	if f.state != "" {
		return f.state
	}
	return a.defaultStatePath()
}

func (a *App) cmdFlags(name string) *flags {
	for _, c := range a.commands() {
		if c.name == name {
			return a.newFlags(name, c.args, strings.ReplaceAll(c.summary, "NAME", a.Name))
		}
	}
	panic("cli: no command " + name)
}

// tunnelFlags are the flags of start and daemon.
type tunnelFlags struct {
	via       string
	port      int
	methods   hpcproxy.Methods
	sshConfig string
	sshOpts   multiString
	acceptNew bool
	allow     multiString
	advertise string
	timeout   time.Duration
	watchPID  int
	forwards  multiString
	exposes   multiString
	conns     int
	private   bool
	maxConns  int
}

// envInt returns the integer in environment variable name, or 0.
// envMaxConnections names the environment variable from which
// --max-connections (TunnelConfig.MaxConnections) takes its default: a
// site can set it for its users, in a module file for instance.
const envMaxConnections = "HPCPROXY_MAX_CONNECTIONS"

func envInt(name string) int {
	n, _ := strconv.Atoi(os.Getenv(name))
	return n
}

type multiString []string

func (m *multiString) String() string     { return strings.Join(*m, ",") }
func (m *multiString) Set(s string) error { *m = append(*m, s); return nil }

func (a *App) addTunnelFlags(f *flags, t *tunnelFlags) {
	viaHelp := "login node to tunnel through: HOST, USER@HOST[:PORT] or an ssh_config alias, or several separated by commas (each node prefers its own, stable by node name; the next takes over when one fails) (default: $" + hpcproxy.EnvVia + ", else the job's submit host)"
	if a.Mode == hpcproxy.ModeShared {
		viaHelp = "host to tunnel through (default: none, relay directly from this node)"
	}
	f.StringVar(&t.via, "via", "", viaHelp)
	f.IntVar(&t.port, "port", 0, "port to listen on (default: a free port)")
	f.Var(&t.methods, "method", "tunnel methods to try, in order (default: "+hpcproxy.Methods(hpcproxy.DefaultMethods).String()+")")
	f.StringVar(&t.sshConfig, "ssh-config", "", "ssh_config file to use instead of ~/.ssh/config (like ssh -F)")
	f.Var(&t.sshOpts, "o", "ssh option Key=Value (repeatable, like ssh -o)")
	f.IntVar(&t.conns, "connections", 1, "SSH connections to the login node kept open (gossh, controlmaster): parallel streams spread over them, each served by its own sshd process there")
	f.IntVar(&t.maxConns, "max-connections", envInt(envMaxConnections), fmt.Sprintf("most SSH connections to the login node: more are opened while many channels are open (%d per connection), and closed when idle (default: $%s, else %d)", hpcproxy.DefaultChannelsPerConnection, envMaxConnections, hpcproxy.DefaultMaxConnections))
	f.BoolVar(&t.acceptNew, "accept-new", false, "record the host key of a login node seen for the first time (StrictHostKeyChecking=accept-new)")
	f.DurationVar(&t.timeout, "timeout", 2*time.Minute, "how long start waits for the daemon to be ready")
	f.Var(&t.forwards, "forward", "LOCAL=REMOTE: listen on LOCAL (PORT on 127.0.0.1, HOST:PORT or a socket path) and connect to REMOTE (HOST:PORT as the login node resolves it), like ssh -L (repeatable)")
	f.Var(&t.exposes, "expose", "LOCAL[=REMOTE]: have the login node listen on REMOTE (PORT or HOST:PORT on its side, or a socket path; default: a free port on its 127.0.0.1) and connect to LOCAL (PORT or HOST:PORT here), like ssh -R; needs method gossh or controlmaster (repeatable)")
	if a.Mode == hpcproxy.ModeShared {
		f.Var(&t.allow, "allow", "client network allowed to connect, CIDR (repeatable; default: any client with the token)")
		f.StringVar(&t.advertise, "advertise", "", "host name or address the compute nodes should dial, recorded in the state file (default: this node's host name)")
	} else {
		f.IntVar(&t.watchPID, "watch-pid", 0, "stop when this process exits (default: the job script, else the shell that ran start; -1: never)")
		f.BoolVar(&t.private, "private", false, "keep a tunnel of this job's own: do not share the node's tunnel with (or attach to the one of) the user's other jobs on this node")
	}
}

// daemonArgs turns tunnel flags back into the daemon command's arguments.
func (t *tunnelFlags) daemonArgs(state string, verbose bool) []string {
	args := []string{"daemon", "--state", state, "--port", strconv.Itoa(t.port)}
	if t.via != "" {
		args = append(args, "--via", t.via)
	}
	if len(t.methods) > 0 {
		args = append(args, "--method", t.methods.String())
	}
	if t.sshConfig != "" {
		args = append(args, "--ssh-config", t.sshConfig)
	}
	for _, o := range t.sshOpts {
		args = append(args, "-o", o)
	}
	if t.acceptNew {
		args = append(args, "--accept-new")
	}
	if t.conns > 1 {
		args = append(args, "--connections", strconv.Itoa(t.conns))
	}
	if t.maxConns > 0 {
		args = append(args, "--max-connections", strconv.Itoa(t.maxConns))
	}
	for _, n := range t.allow {
		args = append(args, "--allow", n)
	}
	if t.advertise != "" {
		args = append(args, "--advertise", t.advertise)
	}
	if t.watchPID != 0 {
		args = append(args, "--watch-pid", strconv.Itoa(t.watchPID))
	}
	if t.private {
		args = append(args, "--private")
	}
	for _, fw := range t.forwards {
		args = append(args, "--forward", fw)
	}
	for _, e := range t.exposes {
		args = append(args, "--expose", e)
	}
	if verbose {
		args = append(args, "-v")
	}
	return args
}

// envTakeoverCreds gives a daemon that a stand-by's start runs the job's
// credentials (USER:TOKEN), kept from the daemon that died.
const envTakeoverCreds = "HPCPROXY_TAKEOVER_CREDENTIALS"

// startArgs are the arguments of the start a job's stand-by execs when
// the node daemon dies: this start's, resolved (--via, --watch-pid).
func (t *tunnelFlags) startArgs(state string, verbose bool) []string {
	args := t.daemonArgs(state, verbose)
	args[0] = "start"
	return args
}

// tunnelConfig is the tunnel the flags ask for: the daemon's, and the
// name of the node tunnel a start attaches to.
func (t *tunnelFlags) tunnelConfig() hpcproxy.TunnelConfig {
	tc := hpcproxy.TunnelConfig{
		Destination:   t.via,
		Methods:       t.methods,
		SSHConfigFile: t.sshConfig,
		SSHOptions:    t.sshOpts,
		Connections:   t.conns,

		MaxConnections: t.maxConns,
	}
	if t.acceptNew {
		tc.HostKeyPolicy = hpcproxy.HostKeyAcceptNew
	}
	return tc
}

func (a *App) start(args []string) error {
	// A start exec'd by its job's stand-by (the node daemon died) gets the
	// job's listener: take it first, before anything else inherits it.
	held := daemonproc.InheritedListener()
	takeover := held != nil
	defer func() {
		if held != nil {
			held.Close()
		}
	}()
	f := a.cmdFlags("start")
	var t tunnelFlags
	a.addTunnelFlags(f, &t)
	if err := f.parse(args); err != nil {
		return err
	}
	if f.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q (see --help)", f.Args())
	}
	if _, _, err := t.specs(); err != nil {
		return err
	}
	// A running proxy first: a second start needs no login node to report
	// it (outside a job, without --via or HPCPROXY_VIA, there is none).
	state := a.statePath(f)
	var creds *hpcproxy.ProxyCredentials
	if takeover {
		// The stand-by saw the daemon's pipe close, which happens while
		// the daemon is still exiting: let it be gone, or its state file
		// (whose port the stand-by holds open) would look alive. The job
		// keeps the credentials it recorded.
		if ps, err := hpcproxy.ReadPidFileAt(state); err == nil {
			for end := time.Now().Add(10 * time.Second); daemonproc.PIDAlive(ps.PID) && time.Now().Before(end); {
				time.Sleep(20 * time.Millisecond)
			}
			creds = ps.Credentials
		}
		if t.watchPID > 0 && !daemonproc.PIDAlive(t.watchPID) {
			// The job has ended too (where the scheduler did not kill
			// the stand-by with it): nothing to take over.
			if f.verbose {
				fmt.Fprintf(a.Stdout, "stand-by: the node daemon and the job (pid %d) are gone: not taking over\n", t.watchPID)
			}
			return nil
		}
	}
	if ps, err := hpcproxy.ReadPidFileAt(state); err == nil && hpcproxy.CheckState(ps).Usable() {
		// Not an error if the proxy the user asked for is there.
		return a.alreadyRunning(ps, &t, stateFlag(f), f.verbose)
	}
	if a.Mode == hpcproxy.ModePerJob {
		via, err := hpcproxy.ResolveViaHost(t.via)
		if errors.Is(err, hpcproxy.ErrNoViaHost) {
			return fmt.Errorf("%w\nhint: pass --via HOST or set %s", err, hpcproxy.EnvVia)
		}
		if err != nil {
			return err
		}
		t.via = via
		if t.watchPID == 0 {
			t.watchPID = os.Getppid()
			j := jobenv.Detect()
			if j.ScriptPID > 0 {
				t.watchPID = j.ScriptPID
			} else if w := watchWarning(a.Name, t.watchPID, j.InJob); w != "" {
				fmt.Fprintf(a.Stderr, "%s start: warning: %s\nhint: --watch-pid PID names a process that lives as long as you need the proxy; --watch-pid -1 keeps it until '%s stop'\n", a.Name, w, a.Name)
			}
		}
	}
	exe, err := os.Executable()
	if err != nil {
		return fmt.Errorf("cannot find this program to start the daemon: %w", err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	deadline := time.Now().Add(t.timeout)
	var d *daemonproc.Process
	// On a node tunnel the job's listener is made here, in the job, and a
	// stand-by holds it (see daemonproc.StartStandby): the port outlives
	// the node daemon, wherever that runs.
	var sby *daemonproc.Standby
	defer func() {
		if sby != nil {
			sby.Release() // no daemon took it
		}
	}()
	for {
		var opts daemonproc.Options
		if a.Mode == hpcproxy.ModePerJob && !t.private {
			if sby == nil {
				if held == nil {
					if held, err = daemonproc.ListenJob(t.port); err != nil {
						return fmt.Errorf("%w\nhint: choose another --port, or none for a free one", err)
					}
				}
				sby, err = daemonproc.StartStandby(held, hpcproxy.LogFilePath(state), append([]string{exe}, t.startArgs(state, f.verbose)...))
				if err != nil {
					return err
				}
			}
			ps, err := a.attach(ctx, &t, state, deadline, hpcproxy.Daemon{
				ListenerFd: int(held.Fd()), StandbyFd: int(sby.W.Fd()), Credentials: creds,
			})
			if err == nil {
				sby.Handoff()
				sby = nil
				if f.verbose {
					fmt.Fprintf(a.Stdout, "attached to the node tunnel %s: pid %d, %s via %s (%s, %d jobs); log %s\n",
						ps.Node.Socket, ps.PID, ps.Addr(), ps.Via, ps.Method, ps.Node.Jobs, ps.LogFile)
				}
				printForwards(a.Stdout, ps, true)
				return nil
			}
			if are := (*hpcproxy.AlreadyRunningError)(nil); errors.As(err, &are) && are.State != nil {
				return a.alreadyRunning(are.State, &t, stateFlag(f), f.verbose)
			}
			if errors.Is(err, hpcproxy.ErrNodeTunnelForeign) {
				// Someone else holds the name: never talk to it, and do not
				// let it keep this job from its proxy either.
				fmt.Fprintf(a.Stderr, "%s start: warning: %s\n%s start: starting a tunnel of this job's own (as with --private)\n",
					a.Name, strings.TrimPrefix(err.Error(), "hpcproxy: "), a.Name)
				t.private = true
				sby.Release()
				sby = nil
				continue
			}
			if !errors.Is(err, hpcproxy.ErrNoNodeTunnel) {
				return fmt.Errorf("%w\nhint: start with --private to open a tunnel of this job's own; the log is %s", err, hpcproxy.LogFilePath(state))
			}
			opts.Standby = sby.W
		}
		// No node tunnel (or a private one): this start opens it.
		opts.Listener = held
		opts.Cmd = exec.Command(exe, t.daemonArgs(state, f.verbose)...)
		if creds != nil {
			// Not on the command line, which other users can read.
			opts.Cmd.Env = append(os.Environ(), envTakeoverCreds+"="+creds.User+":"+creds.Token)
		}
		opts.LogFile, opts.Timeout = hpcproxy.LogFilePath(state), time.Until(deadline)
		opts.Errors = daemonErrors
		d, err = daemonproc.Start(ctx, opts)
		if errors.Is(err, hpcproxy.ErrNodeTunnelRunning) && time.Now().Before(deadline) {
			// Another job's start opened it meanwhile: attach to that one.
			time.Sleep(time.Duration(20+rand.IntN(80)) * time.Millisecond)
			continue
		}
		break
	}
	if err != nil {
		if are := (*hpcproxy.AlreadyRunningError)(nil); errors.As(err, &are) && are.State != nil {
			return a.alreadyRunning(are.State, &t, stateFlag(f), f.verbose)
		}
		if errors.Is(err, hpcproxy.ErrAlreadyRunning) {
			fmt.Fprintln(a.Stdout, strings.TrimPrefix(err.Error(), "hpcproxy: "))
			return nil
		}
		hint := t.startHint()
		if errors.Is(err, hpcproxy.ErrUnsafePath) {
			// Not the login node: a file here that another user owns, or
			// that others may write.
			hint = "the cause is on this node, not the login node: remove what is in the way if it is yours, or choose another place with --state or " + hpcproxy.EnvTmpDir
		}
		return fmt.Errorf("%w\nhint: %s; the log is %s", err, hint, hpcproxy.LogFilePath(state))
	}
	if sby != nil {
		sby.Handoff()
		sby = nil
	}
	ps, _ := hpcproxy.ReadPidFileAt(state)
	if f.verbose && ps != nil {
		fmt.Fprintf(a.Stdout, "started: pid %d, %s via %s (%s); log %s\n", d.PID(), ps.Addr(), orDirect(ps.Login()), ps.Method, d.LogFile())
	}
	if ps != nil {
		// What the user asked to expose is useless without the way to it.
		printForwards(a.Stdout, ps, true)
	}
	return nil
}

// attach attaches this job to the node tunnel the flags name, if a
// daemon serves it.
func (a *App) attach(ctx context.Context, t *tunnelFlags, state string, deadline time.Time, o hpcproxy.Daemon) (*hpcproxy.ProxyState, error) {
	fwd, exp, err := t.specs()
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	o.Tunnel, o.StatePath, o.Port = t.tunnelConfig(), state, t.port
	o.WatchPID, o.Forwards, o.Exposes = max(t.watchPID, 0), fwd, exp
	return o.Attach(ctx)
}

// startHint says where to look when a daemon with these flags did not
// start: the login node it tunnels through, or, relaying directly, this
// node (a --port in use).
func (t *tunnelFlags) startHint() string {
	switch {
	case t.via != "":
		return "check the login node with '" + sshdest.Command(hpcproxy.ParseDestinations(t.via)[0], "true") + "'"
	case t.port != 0:
		return fmt.Sprintf("the proxy relays directly from this node: is port %d in use here? choose another --port, or none for a free one", t.port)
	}
	return "the proxy relays directly from this node: the cause is here"
}

// specs checks --connections and parses the --forward and --expose flags.
func (t *tunnelFlags) specs() ([]hpcproxy.ForwardSpec, []hpcproxy.ExposeSpec, error) {
	if t.conns < 1 {
		return nil, nil, fmt.Errorf("--connections %d: want at least 1", t.conns)
	}
	if t.maxConns < 0 {
		return nil, nil, fmt.Errorf("--max-connections %d: want at least 1 (or 0 for the default)", t.maxConns)
	}
	var fwd []hpcproxy.ForwardSpec
	var exp []hpcproxy.ExposeSpec
	for _, s := range t.forwards {
		spec, err := hpcproxy.ParseForwardSpec(s)
		if err != nil {
			return nil, nil, fmt.Errorf("--forward: %w", err)
		}
		fwd = append(fwd, spec)
	}
	for _, s := range t.exposes {
		spec, err := hpcproxy.ParseExposeSpec(s)
		if err != nil {
			return nil, nil, fmt.Errorf("--expose: %w", err)
		}
		exp = append(exp, spec)
	}
	return fwd, exp, nil
}

// printForwards lists the forwards of ps; with onlyHints, just the exposes
// and how to reach them from the user's own machine.
func printForwards(w io.Writer, ps *hpcproxy.ProxyState, onlyHints bool) {
	for _, fi := range ps.Forwards {
		if !onlyHints {
			arrow := "->"
			if fi.Kind == hpcproxy.ForwardReverse {
				arrow = "<-"
			}
			fmt.Fprintf(w, "forward:     %-7s %s %s %s (%s): %d active, %d total, %d failed, %d bytes in, %d out\n",
				fi.Kind, fi.Listen, arrow, fi.Target, fi.Status, fi.Active, fi.Total, fi.Failed, fi.BytesIn, fi.BytesOut)
			if fi.LastError != "" {
				fmt.Fprintf(w, "             last error: %s\n", fi.LastError)
			}
		}
		if fi.Kind != hpcproxy.ForwardReverse {
			continue
		}
		lport := 0
		if _, p, err := net.SplitHostPort(fi.Target); err == nil {
			lport, _ = strconv.Atoi(p)
		}
		if onlyHints {
			fmt.Fprintf(w, "exposed %s on %s at %s\n", fi.Target, orDirect(ps.Login()), fi.Listen)
		}
		if hint := sshdest.ForwardHint(ps.Login(), fi.Listen, lport); hint != "" {
			fmt.Fprintf(w, "             on your machine: %s\n", hint)
			if lport > 0 {
				fmt.Fprintf(w, "             then open http://127.0.0.1:%d/ (use the login node's public name if it differs)\n", lport)
			}
		}
	}
}

func orDirect(via string) string {
	if via == "" {
		return "direct"
	}
	return via
}

func (a *App) daemon(args []string) error {
	f := a.cmdFlags("daemon")
	var t tunnelFlags
	a.addTunnelFlags(f, &t)
	if err := f.parse(args); err != nil {
		return err
	}
	fds := daemonproc.InheritedFds()
	level := slog.LevelInfo
	if f.verbose {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(a.Stderr, &slog.HandlerOptions{Level: level}))
	d := &hpcproxy.Daemon{
		Mode:          a.Mode,
		Port:          t.port,
		AdvertiseHost: t.advertise,
		StatePath:     a.statePath(f),
		ReportFd:      fds.Report,
		ExitFd:        fds.Exit,
		ListenerFd:    fds.Listen,
		StandbyFd:     fds.Standby,
		Logger:        log,
		Tunnel:        t.tunnelConfig(),
		Private:       t.private,
	}
	if t.watchPID > 0 {
		d.WatchPID = t.watchPID
	}
	if v, ok := os.LookupEnv(envTakeoverCreds); ok {
		os.Unsetenv(envTakeoverCreds) // not for ssh
		if user, token, ok := strings.Cut(v, ":"); ok && user != "" && token != "" {
			d.Credentials = &hpcproxy.ProxyCredentials{User: user, Token: token}
		}
	}
	fwd, exp, err := t.specs()
	if err != nil {
		_ = daemonproc.ReportError(fds.Report, err)
		return err
	}
	d.Forwards, d.Exposes = fwd, exp
	for _, s := range t.allow {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			err = fmt.Errorf("--allow %q: want a network like 10.1.0.0/16: %w", s, err)
			_ = daemonproc.ReportError(fds.Report, err)
			return err
		}
		d.AllowNetworks = append(d.AllowNetworks, p)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return d.Run(ctx)
}

// findState reads the state file and checks that its proxy is usable.
func (a *App) findState(f *flags) (*hpcproxy.ProxyState, error) {
	path := a.statePath(f)
	ps, err := hpcproxy.ReadPidFileAt(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("no proxy running (no %s)\nhint: start one with '%s start%s'", path, a.Name, a.viaHint())
	}
	if err != nil {
		return nil, err
	}
	if v := hpcproxy.CheckState(ps); !v.Usable() {
		return nil, fmt.Errorf("the proxy recorded in %s is not running (%s)\nhint: start one with '%s start%s'", path, v, a.Name, a.viaHint())
	}
	return ps, nil
}

func (a *App) viaHint() string {
	if a.Mode == hpcproxy.ModePerJob {
		return " --via LOGIN_NODE"
	}
	return ""
}

func (a *App) stop(args []string) error {
	f := a.cmdFlags("stop")
	wait := f.Duration("wait", 15*time.Second, "how long to wait for the daemon to exit")
	if err := f.parse(args); err != nil {
		return err
	}
	path := a.statePath(f)
	ps, err := hpcproxy.ReadPidFileAt(path)
	if errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("no proxy running (no %s)\nhint: %s", path, a.stopHint())
	}
	if err != nil {
		return err
	}
	host, _ := os.Hostname()
	if ps.Host != host {
		return fmt.Errorf("the proxy runs on %s (pid %d), not here: run stop there", ps.Host, ps.PID)
	}
	switch v := hpcproxy.CheckState(ps); {
	case v.Stale():
		if _, err := hpcproxy.RemoveStaleState(path); err != nil {
			return err
		}
		if f.verbose {
			fmt.Fprintf(a.Stdout, "removed stale state file %s (%s)\n", path, v)
		}
		return nil
	}
	if ps.Node != nil {
		// A node tunnel: end this job's proxy only; the daemon goes on for
		// the other jobs (or ends, if this was the last).
		ctx, cancel := context.WithTimeout(context.Background(), *wait)
		err := hpcproxy.DetachJob(ctx, path)
		cancel()
		if err != nil {
			return fmt.Errorf("detach from the node tunnel (pid %d): %w", ps.PID, err)
		}
	} else if err := syscall.Kill(ps.PID, syscall.SIGTERM); err != nil {
		return fmt.Errorf("signal pid %d: %w", ps.PID, err)
	}
	deadline := time.Now().Add(*wait)
	for time.Now().Before(deadline) {
		// Stopped once its state file is gone (the daemon's last step) or
		// the process has exited, zombies included: a parent that does not
		// reap (an init in a container) must not make stop wait in vain.
		cur, err := hpcproxy.ReadPidFileAt(path)
		removed := errors.Is(err, os.ErrNotExist) || (err == nil && cur.PID != ps.PID)
		if removed || !daemonproc.PIDAlive(ps.PID) {
			if ps.Node != nil && f.verbose && removed {
				fmt.Fprintf(a.Stdout, "detached from the node tunnel (pid %d)\n", ps.PID)
				return nil
			}
			if !removed {
				// It died without cleaning up.
				_, _ = hpcproxy.RemoveStaleState(path)
			}
			if f.verbose {
				fmt.Fprintf(a.Stdout, "stopped pid %d\n", ps.PID)
			}
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("pid %d did not exit within %s; its log is %s", ps.PID, *wait, ps.LogFile)
}

// stopHint says why stop may not find a proxy that runs.
func (a *App) stopHint() string {
	if a.Mode == hpcproxy.ModePerJob {
		return "inside a job the state file is named after the job: run stop in the job that started the proxy, or pass the --state it was started with"
	}
	return "pass the --state the proxy was started with, or run stop with the same $" + hpcproxy.EnvStateDir
}

func (a *App) status(args []string) error {
	f := a.cmdFlags("status")
	asJSON := f.Bool("json", false, "print the status as one JSON object (a stable shape, documented in the README)")
	if err := f.parse(args); err != nil {
		return err
	}
	path := a.statePath(f)
	ps, err := hpcproxy.ReadPidFileAt(path)
	if errors.Is(err, os.ErrNotExist) {
		if *asJSON {
			if err := printJSON(a.Stdout, NewStatusReport(path, nil, 0)); err != nil {
				return err
			}
			return &exitError{3}
		}
		fmt.Fprintf(a.Stdout, "state:       not running (no %s)\n", path)
		return &exitError{3}
	}
	if err != nil {
		return err
	}
	v := hpcproxy.CheckState(ps)
	if *asJSON {
		if err := printJSON(a.Stdout, NewStatusReport(path, ps, v)); err != nil {
			return err
		}
		if !v.Usable() {
			return &exitError{1}
		}
		return nil
	}
	w := a.Stdout
	fmt.Fprintf(w, "state:       %s\n", v)
	fmt.Fprintf(w, "mode:        %s\n", ps.Mode)
	fmt.Fprintf(w, "address:     %s\n", ps.Addr())
	fmt.Fprintf(w, "pid:         %d on %s\n", ps.PID, ps.Host)
	fmt.Fprintf(w, "via:         %s\n", orDirect(ps.Via))
	if ps.ViaInUse != "" && ps.ViaInUse != ps.Via {
		fmt.Fprintf(w, "login node:  %s\n", ps.ViaInUse)
	}
	fmt.Fprintf(w, "method:      %s\n", ps.Method)
	fmt.Fprintf(w, "tunnel:      %s since %s\n", ps.Status, ps.StatusSince.Local().Format(time.DateTime))
	if ps.LastError != "" {
		fmt.Fprintf(w, "last error:  %s\n", ps.LastError)
	}
	fmt.Fprintf(w, "reconnects:  %d\n", ps.Reconnects)
	if !ps.Started.IsZero() {
		fmt.Fprintf(w, "uptime:      %s\n", time.Since(ps.Started).Round(time.Second))
	}
	if s := ps.Stats; s != nil {
		fmt.Fprintf(w, "connections: %d active, %d total\n", s.Active, s.Total)
		fmt.Fprintf(w, "bytes:       %d in, %d out (as of %s)\n", s.BytesIn, s.BytesOut, s.Updated.Local().Format(time.TimeOnly))
	}
	if n := ps.Node; n != nil {
		how := "opened by this job"
		if n.Attached {
			how = "attached"
		}
		fmt.Fprintf(w, "node tunnel: %s, %s, %d jobs\n", n.Socket, how, n.Jobs)
	}
	for _, ln := range ps.LoginNodes {
		fmt.Fprintf(w, "login node:  %s (%s): %d ssh connections, %d channels open, %d total, %d bytes in, %d out, %d jobs\n",
			ln.Host, ln.Status, ln.Connections, ln.Channels, ln.ChannelsTotal, ln.BytesIn, ln.BytesOut, ln.Jobs)
	}
	printForwards(w, ps, false)
	if ps.JobID != "" {
		fmt.Fprintf(w, "job:         %s %s\n", ps.Scheduler, ps.JobID)
	}
	fmt.Fprintf(w, "state file:  %s\n", path)
	fmt.Fprintf(w, "log:         %s\n", ps.LogFile)
	if !v.Usable() {
		return &exitError{1}
	}
	return nil
}

// printJSON writes v as indented JSON.
func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func (a *App) envList(f *flags, noProxy []string) ([]string, error) {
	ps, err := a.findState(f)
	if err != nil {
		return nil, err
	}
	return hpcproxy.ProxyEnvListFor(ps, hpcproxy.EnvOptions{
		NoProxy: append(hpcproxy.EnvNoProxyEntries(), noProxy...),
		// A per-job proxy admits its owner without credentials, so JVMs
		// can use it from system properties; a shared one wants the
		// token, which does not belong in every JVM's command line.
		Java:            ps.Mode == hpcproxy.ModePerJob,
		JavaToolOptions: os.Getenv("JAVA_TOOL_OPTIONS"),
	}), nil
}

func (a *App) env(args []string) error {
	f := a.cmdFlags("env")
	var noProxy multiString
	f.Var(&noProxy, "no-proxy", "extra no_proxy entry, such as the cluster's domain (repeatable; added to those of $"+hpcproxy.EnvNoProxy+")")
	shell := shellenv.Default()
	f.Var(&shell, "shell", "`SHELL` syntax of the lines: sh (eval \"$("+a.Name+" env)\"), csh (eval \"`"+a.Name+" env`\"), fish ("+a.Name+" env | source) or slurm (a TaskProlog's unquoted export lines) (default: the shell that runs "+a.Name+", else $SHELL's, else sh)")
	if err := f.parse(args); err != nil {
		return err
	}
	env, err := a.envList(f, noProxy)
	if err != nil {
		return err
	}
	lines, err := shell.ExportLines(env)
	if err != nil {
		return err
	}
	_, err = io.WriteString(a.Stdout, lines)
	return err
}

func (a *App) runCmd(args []string) error {
	f := a.cmdFlags("run")
	var noProxy multiString
	f.Var(&noProxy, "no-proxy", "extra no_proxy entry (repeatable; added to those of $"+hpcproxy.EnvNoProxy+")")
	var tf transparentFlags
	tf.add(f)
	if err := f.parse(args); err != nil {
		return err
	}
	if f.NArg() == 0 {
		fmt.Fprintf(a.Stderr, "%s run: no command given\nUsage: %s run [flags] -- CMD [ARG...]\n", a.Name, a.Name)
		return errUsage
	}
	if tf.on {
		return a.runTransparent(f, &tf)
	}
	if len(tf.exclude) > 0 {
		return fmt.Errorf("--exclude needs --transparent")
	}
	env, err := a.envList(f, noProxy)
	if err != nil {
		return err
	}
	cmd := exec.Command(f.Arg(0), f.Args()[1:]...)
	cmd.Env = mergeEnv(os.Environ(), env)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = a.Stdin, a.Stdout, a.Stderr
	signal.Ignore(os.Interrupt) // the child gets the terminal's ^C itself
	defer signal.Reset(os.Interrupt)
	err = cmd.Run()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if code := ee.ExitCode(); code >= 0 {
			return &exitError{code}
		}
		return &exitError{128 + 15}
	}
	if err != nil {
		return fmt.Errorf("%s: %w", f.Arg(0), err)
	}
	return nil
}

// mergeEnv returns base with the assignments of add replacing any of the
// same name.
func mergeEnv(base, add []string) []string {
	names := map[string]bool{}
	for _, kv := range add {
		k, _, _ := strings.Cut(kv, "=")
		names[k] = true
	}
	out := make([]string, 0, len(base)+len(add))
	for _, kv := range base {
		k, _, _ := strings.Cut(kv, "=")
		if !names[k] {
			out = append(out, kv)
		}
	}
	return append(out, add...)
}

func (a *App) connect(args []string) error {
	f := a.cmdFlags("connect")
	timeout := f.Duration("timeout", 30*time.Second, "how long to wait for the connection")
	if err := f.parse(args); err != nil {
		return err
	}
	if f.NArg() != 2 {
		fmt.Fprintf(a.Stderr, "%s connect: want HOST PORT\nUsage: %s connect [flags] HOST PORT\n", a.Name, a.Name)
		return errUsage
	}
	ps, err := a.findState(f)
	if err != nil {
		return err
	}
	d, err := socksDialer(ps, *timeout)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	c, err := d.DialContext(ctx, "tcp", net.JoinHostPort(f.Arg(0), f.Arg(1)))
	if err != nil {
		return err
	}
	defer c.Close()
	return relayStdio(c, a.Stdin, a.Stdout)
}

// socksDialer dials through the proxy of ps over SOCKS5 with its
// credentials; names are sent unresolved (resolved on the far side).
func socksDialer(ps *hpcproxy.ProxyState, timeout time.Duration) (proxy.ContextDialer, error) {
	var auth *proxy.Auth
	if c := ps.Credentials; c != nil {
		auth = &proxy.Auth{User: c.User, Password: c.Token}
	}
	d, err := proxy.SOCKS5("tcp", ps.Addr(), auth, &net.Dialer{Timeout: timeout})
	if err != nil {
		return nil, err
	}
	return d.(proxy.ContextDialer), nil
}

// relayStdio copies stdin to c and c to stdout, half-closing c when stdin
// ends; it returns when c's side has ended.
func relayStdio(c net.Conn, stdin io.Reader, stdout io.Writer) error {
	go func() {
		_, _ = io.Copy(c, stdin)
		if cw, ok := c.(interface{ CloseWrite() error }); ok {
			_ = cw.CloseWrite()
		}
	}()
	_, err := io.Copy(stdout, c)
	// The far side is done; stdin may never end (ssh keeps it open).
	_ = c.Close()
	return err
}
