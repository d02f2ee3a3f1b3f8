package daemonproc

import (
	"errors"
	"os"
	"strconv"
	"strings"
	"syscall"
)

// PIDAlive reports whether the process pid on this host is running: it
// exists (kill -0; EPERM means it belongs to someone else) and is not a
// zombie, a process that has exited but that its parent has not reaped
// yet (kill -0 succeeds on those). State-file checks and `stop` use it.
func PIDAlive(pid int) bool {
	if pid <= 0 {
		return false
	}
	if err := syscall.Kill(pid, 0); err != nil && !errors.Is(err, syscall.EPERM) {
		return false
	}
	return !isZombie(pid)
}

// isZombie reports whether /proc says pid has exited unreaped (state Z,
// after the command name in parentheses, which may itself hold ')').
func isZombie(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false // no /proc: trust kill -0
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i >= 0 && i+2 < len(s) && s[i+2] == 'Z'
}
