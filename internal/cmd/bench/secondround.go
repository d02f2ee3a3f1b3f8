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
	return []*contender{
		{name: "hpcproxy gossh x4", group: "ssh", fds: perConn(1), start: startPerJob("gossh", 4)},
		{name: "hpcproxy cm optimistic", group: "ssh", fds: controlMasterFds,
			start: withEnv("HPCPROXY_HANDOFF", "optimistic", startPerJob("controlmaster", 1))},
		{name: "hpcproxy cm relayed", group: "ssh", fds: controlMasterFds,
			start: withEnv("HPCPROXY_HANDOFF", "off", startPerJob("controlmaster", 1))},
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
