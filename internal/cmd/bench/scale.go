package main

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/hpcproxy/hpcproxy"
	"github.com/hpcproxy/hpcproxy/internal/sshtest"
)

// Cluster scale: a job array's start storm against one login node, and many
// concurrent downloads through one tunnel.

// stormStartTimeout is how long one start of the storm may take: what
// `perjob start` waits for its daemon by default.
const stormStartTimeout = 2 * time.Minute

// stormResult is one storm of n starts of one contender.
type stormResult struct {
	name              string
	n                 int
	started, fetched  int
	slowest           time.Duration // the slowest successful start
	sessions          int           // sshd session processes once all started
	loginRSS          int64         // their resident memory, bytes
	firstErr, lastErr string
}

// measureStorms starts, for each n, n per-job daemons at once (each its own
// `perjob start` process with its own state directory), then n `ssh -N -D`
// the same way, all against one sshd with OpenSSH's default MaxStartups,
// and counts the starts that came up, the fetches through them that
// worked, and the sshd sessions and their memory on the "login node".
func measureStorms(w io.Writer, env *benchEnv, h *harnessTB, ns []int, verbose bool) []stormResult {
	// A login node as sites run it: MaxStartups at its default.
	sshd := sshtest.StartSSHD(h, sshtest.Options{Config: []string{"LogLevel ERROR", "MaxStartups 10:30:100"}})
	var out []stormResult
	for _, n := range ns {
		for _, c := range []struct {
			name  string
			start func(env *benchEnv, sshd *sshtest.SSHD, i int) *stormStart
		}{{"hpcproxy", stormPerJob}, {"ssh -D", stormSSHD}} {
			r := runStorm(env, sshd, c.name, n, c.start)
			if verbose {
				fmt.Fprintf(os.Stderr, "storm %-9s N=%d: started %d, fetched %d, slowest %s, sshd sessions %d (%.0f MiB); first error: %s\n",
					c.name, n, r.started, r.fetched, r.slowest.Round(100*time.Millisecond), r.sessions, float64(r.loginRSS)/(1<<20), r.firstErr)
			}
			out = append(out, r)
		}
	}
	return out
}

// stormStart is one start of a storm: run blocks until the start succeeded
// or failed; then dial reaches the source through it, and stop ends it.
type stormStart struct {
	run  func() error
	dial dialer
	stop func()
}

func runStorm(env *benchEnv, sshd *sshtest.SSHD, name string, n int, start func(*benchEnv, *sshtest.SSHD, int) *stormStart) stormResult {
	r := stormResult{name: name, n: n}
	starts := make([]*stormStart, n)
	for i := range starts {
		starts[i] = start(env, sshd, i)
	}
	errs := make([]error, n)
	took := make([]time.Duration, n)
	var wg sync.WaitGroup
	gate := make(chan struct{})
	for i := range starts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-gate
			t0 := time.Now()
			errs[i] = starts[i].run()
			took[i] = time.Since(t0)
		}()
	}
	close(gate) // released at the same instant, as a job array's tasks
	wg.Wait()
	defer func() {
		var sw sync.WaitGroup
		for _, s := range starts {
			sw.Add(1)
			go func() { defer sw.Done(); s.stop() }()
		}
		sw.Wait()
	}()
	fetchErrs := make([]error, n)
	sem := make(chan struct{}, 64)
	for i, s := range starts {
		if errs[i] != nil {
			continue
		}
		r.started++
		r.slowest = max(r.slowest, took[i])
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			_, fetchErrs[i] = download(s.dial, 64<<10, make([]byte, 64<<10))
		}()
	}
	wg.Wait()
	for i := range starts {
		err := errs[i]
		if err == nil {
			err = fetchErrs[i]
			if err == nil {
				r.fetched++
				continue
			}
		}
		msg := strings.TrimSpace(err.Error())
		if i, ok := strings.CutPrefix(msg, "\n"); ok {
			msg = i
		}
		if len(msg) > 300 {
			msg = msg[:300] + "..."
		}
		if r.firstErr == "" {
			r.firstErr = msg
		}
		r.lastErr = msg
	}
	pids := sshtest.Descendants(sshd.PID())
	for _, pid := range pids {
		if st, err := readStat(pid); err == nil && st.ppid == sshd.PID() {
			r.sessions++
		}
	}
	r.loginRSS = treeRSS(pids)
	return r
}

// stormPerJob is `perjob start` with its default method chain, the way a
// job array's tasks run it, each with a state directory of its own.
func stormPerJob(env *benchEnv, sshd *sshtest.SSHD, i int) *stormStart {
	s := &stormStart{}
	var state string
	var ps *hpcproxy.ProxyState
	s.run = func() error {
		dir, err := os.MkdirTemp(env.dir, "storm")
		if err != nil {
			return err
		}
		state = filepath.Join(dir, "proxy.json")
		if _, err := env.cli("perjob", state, "start", "--state", state, "--via", "sshtest",
			"--ssh-config", sshd.SSHConfigFile, "-o", "Ciphers="+benchCipher, "--watch-pid", "-1",
			"--timeout", stormStartTimeout.String()); err != nil {
			return err
		}
		ps, err = hpcproxy.ReadPidFileAt(state)
		if err != nil {
			return err
		}
		s.dial = socks5Dialer(ps.Addr(), env.src.addr, "", "")
		return nil
	}
	s.stop = func() {
		if ps != nil {
			stopDaemon(env, "perjob", state, ps.PID)
		}
	}
	return s
}

// stormSSHD is `ssh -N -D 127.0.0.1:PORT`, up once its SOCKS port answers,
// failed if it exits first.
func stormSSHD(env *benchEnv, sshd *sshtest.SSHD, i int) *stormStart {
	s := &stormStart{}
	var cmd *exec.Cmd
	exited := make(chan struct{})
	s.run = func() error {
		port, err := freePort()
		if err != nil {
			return err
		}
		addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
		cmd = exec.Command("ssh", "-N", "-D", addr, "-c", benchCipher, "-o", "ExitOnForwardFailure=yes",
			"-F", sshd.SSHConfigFile, "sshtest")
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		if err := cmd.Start(); err != nil {
			return err
		}
		go func() { _ = cmd.Wait(); close(exited) }()
		s.dial = socks5Dialer(addr, env.src.addr, "", "")
		deadline := time.Now().Add(stormStartTimeout)
		for {
			select {
			case <-exited:
				return fmt.Errorf("ssh exited: %s", strings.TrimSpace(stderr.String()))
			default:
			}
			if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
				c.Close()
				// Listening: ssh listens once it has logged in.
				return nil
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("ssh not listening after %s", stormStartTimeout)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	s.stop = func() {
		if cmd != nil && cmd.Process != nil {
			_ = cmd.Process.Kill()
			<-exited
		}
	}
	return s
}

func printStorms(w io.Writer, rs []stormResult) {
	fmt.Fprintln(w)
	fmt.Fprintf(w, "Start storms: N starts released at once against one sshd with MaxStartups 10:30:100 (start deadline %s):\n", stormStartTimeout)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "contender\tN\tstarted\tfetched\tslowest start s\tsshd sessions\tsshd MiB\t")
	for _, r := range rs {
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%.1f\t%d\t%.0f\t\n", r.name, r.n, r.started, r.fetched, r.slowest.Seconds(), r.sessions, float64(r.loginRSS)/(1<<20))
	}
	tw.Flush()
	for _, r := range rs {
		if r.firstErr != "" {
			fmt.Fprintf(w, "%s N=%d: %d failed; first error: %s\n", r.name, r.n, r.n-r.fetched, r.firstErr)
		}
	}
}

// concurrentContenders are what the concurrent downloads compare: the
// per-job daemon with its pool at the defaults (growing with the channels
// up to hpcproxy.DefaultMaxConnections), the same held to one connection,
// and ssh -D.
func concurrentContenders() []*contender {
	return []*contender{
		{name: "hpcproxy gossh pool", group: "ssh", start: startPerJob("gossh", 1)},
		{name: "hpcproxy gossh x1", group: "ssh", start: startPerJob("gossh", 1, "--max-connections", "1")},
		{name: "ssh -D", group: "ssh", baseline: true, start: startSSHD},
	}
}

// concurrentResult is n downloads at once through one contender.
type concurrentResult struct {
	name     string
	n        int
	took     time.Duration
	failed   int
	firstErr error
	sessions int // sshd sessions serving the contender at the end
}

// measureConcurrent starts each contender afresh and runs, for each n, n
// downloads of size bytes at once through it.
func measureConcurrent(w io.Writer, env *benchEnv, cs []*contender, ns []int, size int64, verbose bool) []concurrentResult {
	var out []concurrentResult
	for _, n := range ns {
		for _, c := range cs {
			r, err := env.start(c)
			if err != nil {
				fmt.Fprintf(w, "SKIPPED concurrent %s: %v\n", c.name, err)
				continue
			}
			cr := concurrentDownloads(r, n, size)
			cr.name = c.name
			if env.sshd != nil {
				for _, pid := range sshtest.Descendants(env.sshd.PID()) {
					if st, err := readStat(pid); err == nil && st.ppid == env.sshd.PID() {
						cr.sessions++
					}
				}
			}
			r.stop()
			if verbose {
				fmt.Fprintf(os.Stderr, "concurrent %-24s %5d x %d bytes: %s, %d failed, %d sshd sessions (first error: %v)\n",
					c.name, n, size, cr.took.Round(time.Millisecond), cr.failed, cr.sessions, cr.firstErr)
			}
			out = append(out, cr)
		}
	}
	return out
}

func concurrentDownloads(r *running, n int, size int64) concurrentResult {
	cr := concurrentResult{n: n}
	var mu sync.Mutex
	var wg sync.WaitGroup
	gate := make(chan struct{})
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-gate
			_, err := download(r.dial, size, make([]byte, 32<<10))
			if err != nil {
				mu.Lock()
				cr.failed++
				if cr.firstErr == nil {
					cr.firstErr = err
				}
				mu.Unlock()
			}
		}()
	}
	start := time.Now()
	close(gate)
	wg.Wait()
	cr.took = time.Since(start)
	return cr
}

func printConcurrent(w io.Writer, rs []concurrentResult, size int64) {
	fmt.Fprintln(w)
	fmt.Fprintf(w, "Concurrent downloads: N x %s at once through one proxy (ratio: ssh -D's time over the contender's, same N):\n", (*byteSize)(&size).String())
	base := map[int]time.Duration{}
	for _, r := range rs {
		if r.name == "ssh -D" {
			base[r.n] = r.took
		}
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "contender\tN\tseconds\tms per download\tfailed\tx ssh -D\tsshd sessions\t")
	for _, r := range rs {
		ratio := "-"
		if b, ok := base[r.n]; ok && r.took > 0 {
			ratio = fmt.Sprintf("%.1f", b.Seconds()/r.took.Seconds())
		}
		fmt.Fprintf(tw, "%s\t%d\t%.2f\t%.2f\t%d\t%s\t%d\t\n", r.name, r.n, r.took.Seconds(),
			1000*r.took.Seconds()/float64(r.n), r.failed, ratio, r.sessions)
	}
	tw.Flush()
	for _, r := range rs {
		if r.firstErr != nil {
			fmt.Fprintf(w, "%s N=%d: first error: %v\n", r.name, r.n, r.firstErr)
		}
	}
}
