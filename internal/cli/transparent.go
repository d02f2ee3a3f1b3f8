package cli

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/hpcproxy/hpcproxy"
	"github.com/hpcproxy/hpcproxy/transparent"
)

// transparentFlags are run's flags for --transparent.
type transparentFlags struct {
	on      bool
	exclude multiString
}

func (tf *transparentFlags) add(f *flags) {
	f.BoolVar(&tf.on, "transparent", false, "run CMD in its own user+network namespace whose every TCP connection and DNS query goes through the proxy: for programs that ignore proxy settings (Java, ssh, database clients, static binaries). Needs unprivileged user namespaces and a /dev/net/tun the user can open")
	f.Var(&tf.exclude, "exclude", "with --transparent: a network (CIDR, such as the cluster's 10.0.0.0/8) that CMD reaches directly from this node instead of through the tunnel (repeatable)")
}

// runTransparent is run --transparent: CMD in a namespace of its own,
// its connections dialled through the running proxy over SOCKS5 (names
// resolved on the far side).
func (a *App) runTransparent(f *flags, tf *transparentFlags) error {
	var exclude []netip.Prefix
	for _, s := range tf.exclude {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return fmt.Errorf("--exclude %q: want a network like 10.0.0.0/8: %w", s, err)
		}
		exclude = append(exclude, p.Masked())
	}
	// The node first: a clear answer before anything else is looked at.
	if err := transparent.Check(); err != nil {
		return fmt.Errorf("%w\nhint: without --transparent, '%s run -- CMD' gives CMD the proxy's environment variables", err, a.Name)
	}
	ps, err := a.findState(f)
	if err != nil {
		return err
	}
	dial, err := rawSOCKSDial(ps)
	if err != nil {
		return err
	}
	cfg := transparent.Config{Dial: dial, Exclude: exclude}
	if f.verbose {
		cfg.Logger = slog.New(slog.NewTextHandler(a.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	cmd := exec.Command(f.Arg(0), f.Args()[1:]...)
	// The proxy's variables would point CMD at 127.0.0.1, which inside
	// the namespace is its own: CMD needs none.
	cmd.Env = withoutProxyEnv(os.Environ())
	cmd.Stdin, cmd.Stdout, cmd.Stderr = a.Stdin, a.Stdout, a.Stderr
	// Signals for CMD arrive here first: catch them from now on.
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGQUIT, syscall.SIGUSR1, syscall.SIGUSR2)
	defer signal.Stop(sigs)
	s, err := transparent.Start(cfg, cmd)
	if err != nil {
		if errors.Is(err, transparent.ErrUnavailable) {
			return fmt.Errorf("%w\nhint: without --transparent, '%s run -- CMD' gives CMD the proxy's environment variables", err, a.Name)
		}
		return fmt.Errorf("%s: %w", f.Arg(0), err)
	}
	defer s.Close()
	done := make(chan struct{})
	defer close(done)
	go forwardSignals(cmd.Process, sigs, done)
	err = cmd.Wait()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if code := ee.ExitCode(); code >= 0 {
			return &exitError{code}
		}
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			return &exitError{128 + int(ws.Signal())}
		}
		return &exitError{128 + 15}
	}
	return err
}

// rawSOCKSDial dials through the proxy of ps like socksDialer, but
// returns the TCP connection to the proxy itself once the SOCKS5
// handshake is done: x/net's DialContext wraps it in a type without
// CloseWrite, and CMD's half-closes must reach the far side.
func rawSOCKSDial(ps *hpcproxy.ProxyState) (func(ctx context.Context, network, addr string) (net.Conn, error), error) {
	d, err := socksDialer(ps, 30*time.Second)
	if err != nil {
		return nil, err
	}
	wc, ok := d.(interface {
		DialWithConn(ctx context.Context, c net.Conn, network, address string) (net.Addr, error)
	})
	if !ok {
		return d.DialContext, nil
	}
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		var nd net.Dialer
		c, err := nd.DialContext(ctx, "tcp", ps.Addr())
		if err != nil {
			return nil, err
		}
		if _, err := wc.DialWithConn(ctx, c, network, addr); err != nil {
			c.Close()
			return nil, err
		}
		return c, nil
	}, nil
}

// forwardSignals passes the signals this process gets to CMD, except a
// SIGINT from the terminal: CMD, in the terminal's foreground process
// group like this process, got that one itself.
func forwardSignals(p *os.Process, sigs <-chan os.Signal, done <-chan struct{}) {
	for {
		select {
		case <-done:
			return
		case sig := <-sigs:
			if sig == syscall.SIGINT && inForeground() {
				continue
			}
			_ = p.Signal(sig)
		}
	}
}

// inForeground reports whether this process's group is the foreground
// group of the terminal on stdin.
func inForeground() bool {
	pgrp, err := unix.IoctlGetInt(0, unix.TIOCGPGRP)
	return err == nil && pgrp == unix.Getpgrp()
}

// withoutProxyEnv drops the proxy variables (either case) from env.
func withoutProxyEnv(env []string) []string {
	var out []string
	for _, kv := range env {
		k, _, _ := strings.Cut(kv, "=")
		switch strings.ToLower(k) {
		case "http_proxy", "https_proxy", "all_proxy", "no_proxy", "ftp_proxy":
			continue
		}
		out = append(out, kv)
	}
	return out
}
