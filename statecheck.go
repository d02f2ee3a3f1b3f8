package hpcproxy

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"sync"
	"time"

	"github.com/hpcproxy/hpcproxy/internal/daemonproc"
)

// Stale state files: whether the daemon a state file names still runs
// and answers (CheckState), and removing the file when it does not.

// RemoveStaleState removes the state file at path if CheckState finds it
// stale, and returns the verdict. A live proxy's file, and any file
// written on another host, is left alone. A missing file is not an error
// (verdict VerdictDeadPID, nothing removed).
func RemoveStaleState(path string) (StateVerdict, error) {
	ps, err := ReadPidFileAt(path)
	if errors.Is(err, fs.ErrNotExist) {
		return VerdictDeadPID, nil
	}
	if err != nil {
		return 0, err
	}
	v := CheckState(ps)
	if v.Stale() {
		removeIfUnchanged(path, ps)
	}
	return v, nil
}

// removeIfUnchanged removes path if it still describes the same daemon as
// ps (a new daemon may have replaced it meanwhile).
func removeIfUnchanged(path string, ps *ProxyState) {
	cur, err := ReadPidFileAt(path)
	if err != nil || !sameDaemon(cur, ps) {
		return
	}
	_ = os.Remove(path)
}

// sameDaemon reports whether two states describe the same daemon: same
// host, pid and start time.
func sameDaemon(a, b *ProxyState) bool {
	return a.PID == b.PID && a.Host == b.Host && a.Started.Equal(b.Started)
}

// StateVerdict is what CheckState concludes about a state file.
type StateVerdict int

// Verdicts. Only VerdictDeadPID and VerdictNoAnswer are stale; a state
// file from another host is never judged stale from here, because its PID
// means nothing on this host and its port may simply be unreachable.
const (
	// VerdictAlive: on this host, the PID is alive and the port answers
	// (or the daemon is still starting and has not bound it yet).
	VerdictAlive StateVerdict = iota + 1
	// VerdictDeadPID: on this host, no process has the PID.
	VerdictDeadPID
	// VerdictNoAnswer: on this host, the PID is alive (possibly reused by
	// another program) but nothing answers on the port after retries.
	VerdictNoAnswer
	// VerdictForeignAnswering: on another host; its port answers.
	VerdictForeignAnswering
	// VerdictForeignUnknown: on another host; its port does not answer
	// from here. It may be down, or unreachable from this node.
	VerdictForeignUnknown
)

var verdictNames = map[StateVerdict]string{
	VerdictAlive:            "alive",
	VerdictDeadPID:          "stale (pid dead)",
	VerdictNoAnswer:         "stale (no answer)",
	VerdictForeignAnswering: "other host, answering",
	VerdictForeignUnknown:   "other host, not answering",
}

// String returns a short description of the verdict.
func (v StateVerdict) String() string {
	if s, ok := verdictNames[v]; ok {
		return s
	}
	return fmt.Sprintf("StateVerdict(%d)", int(v))
}

// Stale reports whether the state file may be removed.
func (v StateVerdict) Stale() bool { return v == VerdictDeadPID || v == VerdictNoAnswer }

// Usable reports whether clients can expect the proxy to answer.
func (v StateVerdict) Usable() bool { return v == VerdictAlive || v == VerdictForeignAnswering }

// CheckState judges a state file. The PID is checked only when ps.Host is
// this host; the port is probed (a TCP connect to DialHost) up to three
// times before "no answer" is concluded, so one lost probe cannot make a
// live daemon look stale.
func CheckState(ps *ProxyState) StateVerdict { return defaultChecker.check(ps) }

type stateChecker struct {
	hostname func() string
	pidAlive func(int) bool
	probe    func(host string, port int) bool
	tries    int
	pause    time.Duration
}

var defaultChecker = stateChecker{
	hostname: thisHost,
	pidAlive: daemonproc.PIDAlive,
	probe:    proxyAlive,
	tries:    3,
	pause:    200 * time.Millisecond,
}

func (c stateChecker) answers(ps *ProxyState) bool {
	if ps.Port <= 0 {
		return false
	}
	for i := 0; i < c.tries; i++ {
		if i > 0 {
			time.Sleep(c.pause)
		}
		if c.probe(ps.DialHost(), ps.Port) {
			return true
		}
	}
	return false
}

func (c stateChecker) check(ps *ProxyState) StateVerdict {
	if ps.Host != c.hostname() {
		if c.answers(ps) {
			return VerdictForeignAnswering
		}
		return VerdictForeignUnknown
	}
	if ps.PID <= 0 || !c.pidAlive(ps.PID) {
		return VerdictDeadPID
	}
	if ps.Status == StatusStarting || c.answers(ps) {
		return VerdictAlive
	}
	return VerdictNoAnswer
}

var (
	hostOnce sync.Once
	hostName string
)

// thisHost returns os.Hostname(), cached.
func thisHost() string {
	hostOnce.Do(func() {
		hostName, _ = os.Hostname()
	})
	return hostName
}
