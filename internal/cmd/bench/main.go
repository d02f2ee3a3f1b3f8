// Command bench measures hpcproxy side by side with the tools it replaces,
// all in one run on this machine: through a throwaway OpenSSH sshd on
// loopback, hpcproxy's per-job daemon with the gossh method (one SSH
// connection, and a pool of two), with the controlmaster method, and
// OpenSSH's own `ssh -N -D`, all with the same cipher; and without SSH,
// hpcproxy's shared daemon relaying directly next to socat and microsocks.
//
//	go run ./internal/cmd/bench                 # everything, about 10 minutes
//	go run ./internal/cmd/bench -only ssh -rounds 3 -hold 1000
//
// Every contender is a separate process, started the way users start it
// (hpcproxy through its example CLI, which this program runs as a child), so
// that its CPU time and resident memory can be read from /proc. The
// contenders take turns round by round (A B C A B C ...) and each ratio is
// computed within a round, so that the machine's drift hits both sides of
// a ratio alike; the table gives each ratio's median over the rounds and
// its min-max spread. Measured, per contender:
//
//   - single-stream throughput, download and upload;
//   - aggregate throughput of 8 and 64 parallel downloads;
//   - connect latency: a new connection through the proxy and a one-byte
//     round trip to the source, p50 and p99;
//   - CPU time of the proxy's process tree per GB moved in the
//     single-stream transfers (/proc/PID/stat);
//   - resident memory per held idle connection at 1,000 and 10,000
//     connections (fresh processes, VmRSS of the tree), and errors among
//     those connections, each checked with a second round trip.
//
// BENCHMARKS.md records a full run and what each optimisation bought.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/hpcproxy/hpcproxy"
	"github.com/hpcproxy/hpcproxy/internal/cli"
	"github.com/hpcproxy/hpcproxy/internal/sshtest"
)

func main() {
	if code, ok := runCLI(os.Args[1:]); ok {
		os.Exit(code)
	}
	if code, ok := runSource(); ok {
		os.Exit(code)
	}
	var o options
	flag.Var(&o.size, "size", "bytes per single-stream transfer (and per parallel run), e.g. 512MiB, 1GiB")
	flag.IntVar(&o.rounds, "rounds", 5, "rounds: every contender runs every measurement once per round")
	flag.StringVar(&o.only, "only", "", "run only these contenders: a comma-separated list of groups (ssh, relay) or names")
	flag.StringVar(&o.hold, "hold", "1000,10000", "numbers of idle connections to hold for the memory measurement (empty: skip it)")
	flag.IntVar(&o.latency, "latency-samples", 300, "connections per round for the connect latency (0: skip it)")
	flag.StringVar(&o.streams, "streams", "8,64", "parallel stream counts for the aggregate throughput (empty: skip it)")
	flag.DurationVar(&o.settle, "settle", 8*time.Second, "how long held connections stay idle before their memory is read (hpcproxy's collector settles after 5 quiet seconds)")
	flag.StringVar(&o.storm, "storm", "50,150,300", "start storms: numbers of per-job daemons (and of ssh -D) started at once against one sshd with the default MaxStartups (empty: skip them)")
	flag.StringVar(&o.concurrent, "concurrent", "1000,5000", "numbers of downloads at once through one proxy (empty: skip them)")
	o.concSize = 64 << 10
	flag.Var(&o.concSize, "concurrent-size", "bytes per download of -concurrent")
	flag.BoolVar(&o.verbose, "v", false, "print each measurement as it is taken")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "Usage: bench [flags]\n\nRuns hpcproxy side by side with ssh -D, socat and microsocks and prints ratios.\n\nFlags:\n")
		flag.PrintDefaults()
	}
	o.size = 1 << 30
	flag.Parse()
	if flag.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "bench: unexpected arguments %q (see -help)\n", flag.Args())
		os.Exit(2)
	}
	if err := run(os.Stdout, o); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

// options are the command's flags.
type options struct {
	size    byteSize
	rounds  int
	only    string
	hold    string
	latency int
	streams string
	settle  time.Duration
	verbose bool

	storm, concurrent string
	concSize          byteSize
}

// byteSize is a flag.Value for sizes like "1GiB", "512MiB", "64KiB" or a
// plain number of bytes.
type byteSize int64

func (b *byteSize) String() string {
	for _, u := range []struct {
		s string
		n int64
	}{{"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}} {
		if int64(*b) >= u.n && int64(*b)%u.n == 0 {
			return strconv.FormatInt(int64(*b)/u.n, 10) + u.s
		}
	}
	return strconv.FormatInt(int64(*b), 10)
}

func (b *byteSize) Set(s string) error {
	mult := int64(1)
	for _, u := range []struct {
		s string
		n int64
	}{{"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}} {
		if v, ok := strings.CutSuffix(s, u.s); ok {
			s, mult = v, u.n
			break
		}
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n <= 0 {
		return fmt.Errorf("want a size like 1GiB or 512MiB")
	}
	*b = byteSize(n * mult)
	return nil
}

func cliApp(name string) *cli.App {
	switch name {
	case "perjob":
		return &cli.App{Name: "perjob", Mode: hpcproxy.ModePerJob}
	case "shared":
		return &cli.App{Name: "shared", Mode: hpcproxy.ModeShared}
	}
	return nil
}

func parseInts(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f == "" {
			continue
		}
		n, err := strconv.Atoi(f)
		if err != nil || n <= 0 {
			return nil, fmt.Errorf("%q: want positive numbers separated by commas", s)
		}
		out = append(out, n)
	}
	return out, nil
}

// run sets everything up, measures, prints the tables and tears down.
func run(w io.Writer, o options) (err error) {
	streams, err := parseInts(o.streams)
	if err != nil {
		return fmt.Errorf("-streams %w", err)
	}
	holds, err := parseInts(o.hold)
	if err != nil {
		return fmt.Errorf("-hold %w", err)
	}
	storms, err := parseInts(o.storm)
	if err != nil {
		return fmt.Errorf("-storm %w", err)
	}
	concs, err := parseInts(o.concurrent)
	if err != nil {
		return fmt.Errorf("-concurrent %w", err)
	}
	if o.rounds < 1 {
		return errors.New("-rounds must be at least 1")
	}
	cs, err := selectContenders(o.only)
	if err != nil {
		return err
	}

	h := &harnessTB{}
	defer h.cleanup()
	defer func() {
		if r := recover(); r != nil {
			f, ok := r.(harnessFailure)
			if !ok {
				panic(r)
			}
			err = errors.New(f.msg)
		}
	}()

	fdLimit := raiseFileLimit()
	self, err := os.Executable()
	if err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "hpcbench")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	if err := os.Chmod(dir, 0o700); err != nil {
		return err
	}
	env := &benchEnv{dir: dir, self: self}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	defer signal.Stop(sigs)
	go func() {
		if _, ok := <-sigs; ok {
			fmt.Fprintln(os.Stderr, "bench: interrupted; stopping the contenders")
			env.stopAll()
			h.cleanup()
			os.RemoveAll(dir)
			os.Exit(1)
		}
	}()
	if needsSSHD(cs) {
		env.sshd = sshtest.StartSSHD(h, sshtest.Options{Config: []string{"LogLevel ERROR"}})
		if err := pinLoginSide(env); err != nil {
			return err
		}
	}
	env.src, err = startSource(self)
	if err != nil {
		return err
	}
	defer env.src.close()

	fmt.Fprintf(w, "hpcproxy bench: %s, %d CPUs, %s; %s per transfer, %d rounds, cipher %s, fd limit %d\n",
		time.Now().Format(time.DateOnly), runtime.NumCPU(), kernel(), o.size.String(), o.rounds, benchCipher, fdLimit)
	if v := sshVersion(); v != "" {
		fmt.Fprintf(w, "OpenSSH: %s\n", v)
	}

	res := newResults(cs, streams)
	if err := measureRounds(w, env, cs, o, streams, res); err != nil {
		return err
	}
	var hr map[*contender][]holdResult
	if len(holds) > 0 {
		hr = measureHold(w, env, cs, holds, fdLimit, o)
	}
	printTables(w, cs, res, streams, holds, hr, int64(o.size))
	if needsSSHD(cs) && len(concs) > 0 {
		printConcurrent(w, measureConcurrent(w, env, concurrentContenders(), concs, int64(o.concSize), o.verbose), int64(o.concSize))
	}
	if needsSSHD(cs) && len(storms) > 0 {
		printStorms(w, measureStorms(w, env, h, storms, o.verbose))
	}
	return nil
}

func needsSSHD(cs []*contender) bool {
	return slices.ContainsFunc(cs, func(c *contender) bool { return c.group == "ssh" })
}

// selectContenders picks the contenders named by -only (groups or names),
// all of them if it is empty. A group's baseline is always included.
func selectContenders(only string) ([]*contender, error) {
	all := allContenders()
	if only == "" {
		return all, nil
	}
	want := map[string]bool{}
	for _, f := range strings.Split(only, ",") {
		want[strings.TrimSpace(f)] = true
	}
	var out []*contender
	groups := map[string]bool{}
	for _, c := range all {
		if want[c.group] || want[c.name] {
			out = append(out, c)
			groups[c.group] = true
			delete(want, c.name)
		}
	}
	for k := range want {
		if k != "ssh" && k != "relay" {
			return nil, fmt.Errorf("-only: no contender or group %q", k)
		}
	}
	for _, c := range all {
		if c.baseline && groups[c.group] && !slices.Contains(out, c) {
			out = append(out, c)
		}
	}
	return out, nil
}

func kernel() string {
	b, err := os.ReadFile("/proc/sys/kernel/osrelease")
	if err != nil {
		return runtime.GOOS
	}
	return "Linux " + strings.TrimSpace(string(b))
}

func sshVersion() string {
	out, err := execOutput("ssh", "-V")
	if err != nil {
		return ""
	}
	return strings.TrimSpace(out)
}

// results holds every round's figures, per contender.
type results struct {
	down, up map[*contender][]float64         // bytes/s
	par      map[*contender]map[int][]float64 // streams -> bytes/s
	p50, p99 map[*contender][]time.Duration
	cpuPerGB map[*contender][]float64 // CPU seconds per GB (1e9 bytes)
	sysPerGB map[*contender][]float64 // of which in the kernel
	// cpuPerConn is the proxy's CPU seconds per connection of the
	// latency measurement (open, one byte there and back, close).
	cpuPerConn map[*contender][]float64
	// loginPerGB is the sshd's CPU seconds per GB: the login node's cost
	// of a tunnel.
	loginPerGB map[*contender][]float64
	skipped    map[*contender]error
}

func newResults(cs []*contender, streams []int) *results {
	r := &results{
		down: map[*contender][]float64{}, up: map[*contender][]float64{},
		par: map[*contender]map[int][]float64{},
		p50: map[*contender][]time.Duration{}, p99: map[*contender][]time.Duration{},
		cpuPerGB: map[*contender][]float64{}, sysPerGB: map[*contender][]float64{}, loginPerGB: map[*contender][]float64{},
		cpuPerConn: map[*contender][]float64{},
		skipped:    map[*contender]error{},
	}
	for _, c := range cs {
		r.par[c] = map[int][]float64{}
	}
	return r
}

// measureRounds starts every contender, then runs the throughput, latency
// and CPU measurements round by round, each contender in turn.
func measureRounds(w io.Writer, env *benchEnv, cs []*contender, o options, streams []int, res *results) error {
	run := map[*contender]*running{}
	defer func() {
		for _, r := range run {
			r.stop()
		}
	}()
	for _, c := range cs {
		r, err := env.start(c)
		if err != nil {
			if c.baseline {
				return fmt.Errorf("%s: %w", c.name, err)
			}
			fmt.Fprintf(w, "SKIPPED %s: %v\n", c.name, err)
			res.skipped[c] = err
			continue
		}
		run[c] = r
	}
	size := int64(o.size)
	buf := make([]byte, 256<<10)
	for round := range o.rounds {
		for _, c := range cs {
			r := run[c]
			if r == nil {
				continue
			}
			cpu0, login0, own0 := treeCPU(r.pids), treeCPU(env.sshdPIDs()), ownCPU(r.pids)
			d, err := download(r.dial, size, buf)
			if err != nil {
				return fmt.Errorf("%s: round %d: %w", c.name, round+1, err)
			}
			u, err := upload(r.dial, size, buf)
			if err != nil {
				return fmt.Errorf("%s: round %d: %w", c.name, round+1, err)
			}
			cpu, login := treeCPU(r.pids).sub(cpu0), treeCPU(env.sshdPIDs()).sub(login0)
			own := ownCPU(r.pids).sub(own0)
			res.down[c] = append(res.down[c], float64(size)/d.Seconds())
			res.up[c] = append(res.up[c], float64(size)/u.Seconds())
			gb := 2 * float64(size) / 1e9
			res.cpuPerGB[c] = append(res.cpuPerGB[c], cpu.total().Seconds()/gb)
			res.sysPerGB[c] = append(res.sysPerGB[c], cpu.sys.Seconds()/gb)
			if c.group == "ssh" {
				res.loginPerGB[c] = append(res.loginPerGB[c], login.total().Seconds()/gb)
			}
			for _, n := range streams {
				cpu0, login0 := treeCPU(r.pids), treeCPU(env.sshdPIDs())
				pd, err := parallelDownload(r.dial, size, n)
				if err != nil {
					return fmt.Errorf("%s: round %d: %d streams: %w", c.name, round+1, n, err)
				}
				res.par[c][n] = append(res.par[c][n], float64(size/int64(n)*int64(n))/pd.Seconds())
				if o.verbose {
					cpu, login := treeCPU(r.pids).sub(cpu0), treeCPU(env.sshdPIDs()).sub(login0)
					fmt.Fprintf(os.Stderr, "round %d %-24s %d streams: %s, proxy busy %.0f%%, sshd busy %.0f%%\n",
						round+1, c.name, n, rate(res.par[c][n][round]), 100*cpu.total().Seconds()/pd.Seconds(),
						100*login.total().Seconds()/pd.Seconds())
				}
			}
			var ownConn, sysConn time.Duration
			if o.latency > 0 {
				cpu0, own0 := treeCPU(r.pids), ownCPU(r.pids)
				lat, err := connectLatency(r.dial, o.latency)
				if err != nil {
					return fmt.Errorf("%s: round %d: latency: %w", c.name, round+1, err)
				}
				cpu := treeCPU(r.pids).sub(cpu0)
				ownConn = ownCPU(r.pids).sub(own0).total() / time.Duration(o.latency)
				sysConn = cpu.sys / time.Duration(o.latency)
				res.p50[c] = append(res.p50[c], percentile(lat, 50))
				res.p99[c] = append(res.p99[c], percentile(lat, 99))
				res.cpuPerConn[c] = append(res.cpuPerConn[c], cpu.total().Seconds()/float64(o.latency))
			}
			if o.verbose && o.latency > 0 {
				fmt.Fprintf(os.Stderr, "round %d %-24s down %s up %s cpu %.2fs/GB (kernel %.2f; main process alone %.2f) p50 %s p99 %s cpu/conn %s (kernel %s; main process alone %s)\n", round+1, c.name,
					rate(res.down[c][round]), rate(res.up[c][round]), res.cpuPerGB[c][round], res.sysPerGB[c][round],
					own.total().Seconds()/(2*float64(size)/1e9),
					res.p50[c][round].Round(time.Microsecond), res.p99[c][round].Round(time.Microsecond),
					time.Duration(res.cpuPerConn[c][round]*1e9).Round(time.Microsecond), sysConn.Round(time.Microsecond), ownConn.Round(time.Microsecond))
			}
		}
	}
	return nil
}

// measureHold starts each contender afresh and holds idle connections
// through it, growing to each count in holds, measuring the resident
// memory they cost and counting the connections that fail.
func measureHold(w io.Writer, env *benchEnv, cs []*contender, holds []int, fdLimit uint64, o options) map[*contender][]holdResult {
	out := map[*contender][]holdResult{}
	for _, c := range cs {
		if c.name == "socat" {
			// socat forks a process per connection: holding thousands
			// measures fork, not a relay.
			continue
		}
		// What the file limit allows this contender (with room for the
		// processes' own descriptors): the counts above it are left out.
		var fit []int
		for _, n := range holds {
			if need := c.fds(n, fdLimit); need+100 > fdLimit {
				fmt.Fprintf(w, "SKIPPED hold %s at %d: needs %d descriptors, the limit here is %d\n", c.name, n, need, fdLimit)
				continue
			}
			fit = append(fit, n)
		}
		if len(fit) == 0 {
			continue
		}
		r, err := env.start(c)
		if err != nil {
			fmt.Fprintf(w, "SKIPPED hold %s: %v\n", c.name, err)
			continue
		}
		for _, h := range holdOne(r, fit, o, c.name) {
			for len(out[c]) < slices.Index(holds, h.n) {
				out[c] = append(out[c], holdResult{}) // a count left out
			}
			out[c] = append(out[c], h)
		}
		r.stop()
	}
	return out
}

func holdOne(r *running, holds []int, o options, name string) []holdResult {
	var held []net.Conn
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	// One connection first, so that the baseline includes what any
	// connection brings up once (buffers, goroutine pools).
	if c, err := openEcho(r.dial); err == nil {
		c.Close()
	}
	time.Sleep(o.settle)
	base := treeRSS(r.pids)
	var out []holdResult
	for _, n := range holds {
		start := time.Now()
		errs, firstErr := holdConns(r.dial, n-len(held), 64, &held)
		opened := time.Since(start)
		// Idle connections: measured once the daemon has settled (its
		// collector goes back to GOGC=100 after 5 quiet seconds).
		time.Sleep(o.settle)
		rss := treeRSS(r.pids)
		cerrs, cfirst := checkHeld(held, 256)
		if firstErr == nil {
			firstErr = cfirst
		}
		if os.Getenv(profileEnv) != "" && strings.HasPrefix(name, "hpcproxy") {
			// The daemon writes its heap profile at the peak.
			_ = syscall.Kill(r.pids[0], syscall.SIGUSR1)
			time.Sleep(2 * time.Second)
		}
		hr := holdResult{n: n, errors: errs + cerrs, openTime: opened, firstErr: firstErr}
		if hr.errors > 0 {
			hr.log = r.log()
		}
		if len(held) > 0 {
			hr.perConn = float64(rss-base) / float64(len(held))
		}
		if o.verbose {
			fmt.Fprintf(os.Stderr, "hold %-24s %6d conns: %d errors, %.1f KiB/conn, opened in %s (first error: %v)\n",
				name, n, hr.errors, hr.perConn/1024, opened.Round(time.Millisecond), firstErr)
		}
		out = append(out, hr)
	}
	return out
}
