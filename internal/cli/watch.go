package cli

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/hpcproxy/hpcproxy/internal/shellenv"
)

// shortLivedWrappers are programs that run one command and exit with it:
// as the parent of start, they exit right after start returns.
var shortLivedWrappers = map[string]bool{
	"timeout": true, "time": true, "env": true, "nice": true, "nohup": true, "setsid": true,
	"stdbuf": true, "xargs": true, "sudo": true, "su": true, "runuser": true, "flock": true,
	"chrt": true, "taskset": true, "ionice": true, "strace": true, "ltrace": true, "watch": true,
	"parallel": true, "make": true, "srun": true, "mpirun": true, "mpiexec": true,
}

// watchWarning says why the process a per-job daemon would watch (pid, the
// parent of start, by default) may end long before the user is done with
// the proxy, or returns "". inJob tells whether start runs in a batch job,
// where the parent being the job script is what is wanted.
func watchWarning(name string, pid int, inJob bool) string {
	if pid <= 1 {
		return fmt.Sprintf("the process that ran %s has exited (its parent is now pid %d): the proxy runs until '%s stop'", name, pid, name)
	}
	comm, args, err := procCmdline(pid)
	if err != nil {
		return fmt.Sprintf("the process that ran %s (pid %d) has already exited: the proxy stops at once", name, pid)
	}
	switch {
	case shortLivedWrappers[comm]:
		return fmt.Sprintf("%s was run by %q (pid %d), which exits as soon as %s start returns: the proxy stops with it", name, comm, pid, name)
	case !inJob && isShellScript(comm, args):
		return fmt.Sprintf("%s was run by a shell script (%s, pid %d): the proxy stops when that script exits", name, strings.Join(args, " "), pid)
	}
	return ""
}

// procCmdline returns the executable name and arguments of process pid.
func procCmdline(pid int) (comm string, args []string, err error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil {
		return "", nil, err
	}
	for _, a := range bytes.Split(bytes.TrimRight(b, "\x00"), []byte{0}) {
		args = append(args, string(a))
	}
	if c, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/comm"); err == nil {
		comm = strings.TrimSpace(string(c))
	}
	if len(args) > 0 && args[0] != "" {
		// comm is cut at 15 bytes; argv[0] is whole.
		comm = strings.TrimPrefix(filepath.Base(args[0]), "-")
	}
	return comm, args, nil
}

// isShellScript reports whether comm with args is a shell running a script
// or a -c command rather than an interactive shell.
func isShellScript(comm string, args []string) bool {
	if _, ok := shellenv.For(comm); !ok {
		return false
	}
	for _, a := range args[min(1, len(args)):] {
		switch {
		case a == "--":
			return false
		case strings.HasPrefix(a, "--"):
		case strings.HasPrefix(a, "-") || strings.HasPrefix(a, "+"):
			if strings.ContainsRune(a[1:], 'c') {
				return true
			}
		default:
			return true // a script file
		}
	}
	return false
}
