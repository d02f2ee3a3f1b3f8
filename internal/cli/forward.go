package cli

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/hpcproxy/hpcproxy"
)

// The forward and expose commands add a port forward to the running
// daemon through its control socket (hpcproxy.AddForward, AddExpose); a
// second start that asks for forwards the daemon lacks points at them.

func (a *App) expose(args []string) error {
	var spec hpcproxy.ExposeSpec
	ps, fi, err := a.addToRunning(args, "expose", "LOCAL[=REMOTE], such as 8888", 2*time.Minute,
		"how long to wait for the login node to listen (the tunnel may be reconnecting)",
		func(arg string) (err error) { spec, err = hpcproxy.ParseExposeSpec(arg); return err },
		func(ctx context.Context, state string) (hpcproxy.ForwardInfo, error) {
			return hpcproxy.AddExpose(ctx, state, spec)
		})
	if err != nil {
		return err
	}
	printForwards(a.Stdout, &hpcproxy.ProxyState{Via: ps.Via, Forwards: []hpcproxy.ForwardInfo{fi}}, true)
	return nil
}

func (a *App) forward(args []string) error {
	var spec hpcproxy.ForwardSpec
	ps, fi, err := a.addToRunning(args, "forward", "LOCAL=REMOTE, such as 5432=db.internal:5432", 30*time.Second,
		"how long to wait for the daemon",
		func(arg string) (err error) { spec, err = hpcproxy.ParseForwardSpec(arg); return err },
		func(ctx context.Context, state string) (hpcproxy.ForwardInfo, error) {
			return hpcproxy.AddForward(ctx, state, spec)
		})
	if err != nil {
		return err
	}
	fmt.Fprintf(a.Stdout, "forwarding %s -> %s (resolved on %s)\n", fi.Listen, fi.Target, orDirect(ps.Via))
	return nil
}

// addToRunning is the expose and forward commands: it parses the flags
// and the one argument (want describes it), finds the proxy running here
// and has add ask it for the forward.
func (a *App) addToRunning(args []string, cmd, want string, timeout time.Duration, timeoutHelp string,
	parse func(arg string) error, add func(ctx context.Context, statePath string) (hpcproxy.ForwardInfo, error),
) (*hpcproxy.ProxyState, hpcproxy.ForwardInfo, error) {
	f := a.cmdFlags(cmd)
	wait := f.Duration("timeout", timeout, timeoutHelp)
	if err := f.parse(args); err != nil {
		return nil, hpcproxy.ForwardInfo{}, err
	}
	if f.NArg() != 1 {
		name, _, _ := strings.Cut(want, ",")
		fmt.Fprintf(a.Stderr, "%s %s: want one %s\nUsage: %s %s [flags] %s\n", a.Name, cmd, want, a.Name, cmd, name)
		return nil, hpcproxy.ForwardInfo{}, errUsage
	}
	if err := parse(f.Arg(0)); err != nil {
		return nil, hpcproxy.ForwardInfo{}, err
	}
	ps, err := a.controllable(f, cmd)
	if err != nil {
		return nil, hpcproxy.ForwardInfo{}, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), *wait)
	defer cancel()
	fi, err := add(ctx, a.statePath(f))
	if err != nil {
		return nil, hpcproxy.ForwardInfo{}, a.controlError(ps, err)
	}
	return ps, fi, nil
}

// controllable finds the running proxy and checks that it runs here, where
// its control socket is.
func (a *App) controllable(f *flags, cmd string) (*hpcproxy.ProxyState, error) {
	ps, err := a.findState(f)
	if err != nil {
		return nil, err
	}
	if host, _ := os.Hostname(); ps.Host != host {
		return nil, fmt.Errorf("the proxy runs on %s (pid %d), not here: run '%s %s' there", ps.Host, ps.PID, a.Name, cmd)
	}
	return ps, nil
}

// controlError explains a failed control request.
func (a *App) controlError(ps *hpcproxy.ProxyState, err error) error {
	if errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("%w\nthe running proxy (pid %d) takes no new forwards: its log %s says why; "+
			"'%s stop' and start it again with --forward/--expose", err, ps.PID, ps.LogFile, a.Name)
	}
	return err
}

// alreadyRunning handles a start that finds a proxy running: fine if the
// proxy has every forward and expose asked for (the ssh -L hints are
// printed again), else an error naming the commands that add the missing
// ones to it. stateArg is the --state flag to repeat in those commands.
func (a *App) alreadyRunning(ps *hpcproxy.ProxyState, t *tunnelFlags, stateArg string, verbose bool) error {
	// Said also without -v: start did not start what it was asked to.
	fmt.Fprintf(a.Stdout, "already running: pid %d on %s, %s via %s (%s)\n", ps.PID, ps.Host, ps.Addr(), orDirect(ps.Via), ps.Status)
	fwd, exp, err := t.specs()
	if err != nil {
		return err
	}
	var missing, cmds []string
	var have []hpcproxy.ForwardInfo
	for i, spec := range fwd {
		if !hasForward(ps.Forwards, spec.Matches) {
			missing = append(missing, "--forward "+t.forwards[i])
			cmds = append(cmds, a.Name+" forward"+stateArg+" "+t.forwards[i])
		}
	}
	for i, spec := range exp {
		fi, ok := findForward(ps.Forwards, spec.Matches)
		if !ok {
			missing = append(missing, "--expose "+t.exposes[i])
			cmds = append(cmds, a.Name+" expose"+stateArg+" "+t.exposes[i])
			continue
		}
		have = append(have, fi)
	}
	if len(missing) > 0 {
		return fmt.Errorf("a proxy is already running (pid %d, via %s) without %s\nadd to it with:\n  %s\n(or '%s stop%s' first, to start afresh)",
			ps.PID, orDirect(ps.Via), strings.Join(missing, ", "), strings.Join(cmds, "\n  "), a.Name, stateArg)
	}
	printForwards(a.Stdout, &hpcproxy.ProxyState{Via: ps.Via, Forwards: have}, true)
	return nil
}

func findForward(fs []hpcproxy.ForwardInfo, match func(hpcproxy.ForwardInfo) bool) (hpcproxy.ForwardInfo, bool) {
	for _, fi := range fs {
		if match(fi) {
			return fi, true
		}
	}
	return hpcproxy.ForwardInfo{}, false
}

func hasForward(fs []hpcproxy.ForwardInfo, match func(hpcproxy.ForwardInfo) bool) bool {
	_, ok := findForward(fs, match)
	return ok
}

// stateFlag is " --state PATH" if the command was given one, else "".
func stateFlag(f *flags) string {
	if f.state == "" {
		return ""
	}
	return " --state " + f.state
}
