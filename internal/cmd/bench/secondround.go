package main

import (
	"flag"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// The second round of performance work (issue 17): contenders that hand
// clients' sockets to the controlmaster in each of the daemon's modes, and
// pinning the login side to CPUs of its own.

// handoffContenders are the controlmaster method in the handoff modes
// other than the default ("hpcproxy controlmaster" is HandoffPipe), which
// the daemon's HPCPROXY_HANDOFF picks, and gossh over four SSH
// connections (for -pin-login).
func handoffContenders() []*contender {
	var before []*contender
	if *compareWith != "" || *compareEnv != "" {
		// Started as the contender of the same method is.
		start, fds := startPerJob("gossh", 1, "--max-connections", "1"), perConn(1)
		if *compareMethod == "controlmaster" {
			start, fds = startPerJob("controlmaster", 1), controlMasterFds
		}
		if *compareWith != "" {
			start = withSelf(*compareWith, start)
		}
		if k, v, ok := strings.Cut(*compareEnv, "="); ok {
			start = withEnv(k, v, start)
		}
		before = append(before, &contender{name: "hpcproxy " + *compareMethod + " before", group: "ssh", fds: fds, start: start})
	}
	return append(before, []*contender{
		{name: "hpcproxy gossh x4", group: "ssh", fds: perConn(1), start: startPerJob("gossh", 4)},
		{name: "hpcproxy cm optimistic", group: "ssh", fds: controlMasterFds,
			start: withEnv("HPCPROXY_HANDOFF", "optimistic", startPerJob("controlmaster", 1))},
		{name: "hpcproxy cm relayed", group: "ssh", fds: controlMasterFds,
			start: withEnv("HPCPROXY_HANDOFF", "off", startPerJob("controlmaster", 1))},
	}...)
}

var compareWith = flag.String("compare", "",
	"a benchmark binary built from another commit (go build -o PATH ./internal/cmd/bench there): "+
		"adds the contender \"hpcproxy METHOD before\" (METHOD from -compare-method), whose daemon is that build's, "+
		"for a before/after ratio in one run")

var compareEnv = flag.String("compare-env", "",
	"KEY=VALUE: the environment of \"hpcproxy METHOD before\" (which this adds too, from this build unless -compare is given), "+
		"e.g. GODEBUG=adaptivestackstart=1 for a runtime setting's before/after in one run")

var compareMethod = flag.String("compare-method", "gossh",
	"the tunnel method of the -compare/-compare-env contender, gossh or controlmaster, "+
		"started as \"hpcproxy gossh\" or \"hpcproxy controlmaster\" is")

// withSelf runs start with the hpcproxy CLI taken from the benchmark
// binary at path instead of this one. Contenders start one at a time.
func withSelf(path string, start func(*benchEnv) (*running, error)) func(*benchEnv) (*running, error) {
	return func(env *benchEnv) (*running, error) {
		self := env.self
		env.self = path
		defer func() { env.self = self }()
		return start(env)
	}
}

// withEnv runs start with key=value in this process's environment, which
// the daemon it starts inherits. Contenders start one at a time.
func withEnv(key, value string, start func(*benchEnv) (*running, error)) func(*benchEnv) (*running, error) {
	return func(env *benchEnv) (*running, error) {
		old, had := os.LookupEnv(key)
		if err := os.Setenv(key, value); err != nil {
			return nil, err
		}
		defer func() {
			if had {
				_ = os.Setenv(key, old)
			} else {
				_ = os.Unsetenv(key)
			}
		}()
		return start(env)
	}
}

var pinLogin = flag.String("pin-login", "",
	"CPUs (e.g. 0 or 0-1,3) to pin the sshd to, with every session it forks: the login side; "+
		"run the benchmark itself under taskset on the others to give the compute side (daemon, client, source) its own")

// pinLoginSide pins the benchmark's sshd listener to -pin-login's CPUs;
// the sessions it forks inherit them.
func pinLoginSide(env *benchEnv) error {
	if *pinLogin == "" || env.sshd == nil {
		return nil
	}
	var set unix.CPUSet
	for _, part := range strings.Split(*pinLogin, ",") {
		lo, hi, isRange := strings.Cut(part, "-")
		a, err := strconv.Atoi(lo)
		b := a
		if err == nil && isRange {
			b, err = strconv.Atoi(hi)
		}
		if err != nil || a < 0 || b < a {
			return fmt.Errorf("-pin-login %q: want CPU numbers and ranges separated by commas", *pinLogin)
		}
		for cpu := a; cpu <= b; cpu++ {
			set.Set(cpu)
		}
	}
	if err := unix.SchedSetaffinity(env.sshd.PID(), &set); err != nil {
		return fmt.Errorf("-pin-login: %w", err)
	}
	return nil
}

// ownCPU is the CPU time of the roots alone, without the processes below
// them (a controlmaster daemon's ssh): what the daemon itself spends. The
// -v lines print it beside the tree's.
func ownCPU(roots []int) cpuTimes {
	var sum cpuTimes
	for _, pid := range roots {
		if st, err := readStat(pid); err == nil {
			sum = sum.add(st.cpuTimes)
		}
	}
	return sum
}
