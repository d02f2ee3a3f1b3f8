package hpcproxy

import (
	"fmt"
	"os"
	"os/exec"
	"testing"
)

// helperEnv selects a helper mode when the test binary re-executes itself
// (the os/exec TestHelperProcess pattern).
const helperEnv = "HPCPROXY_TEST_HELPER"

// TestHelperDaemon is not a test: run by helperCommand with helperEnv set,
// it plays a daemon (or another child process) and exits.
func TestHelperDaemon(t *testing.T) {
	mode := os.Getenv(helperEnv)
	if mode == "" {
		return
	}
	f, ok := helpers[mode]
	if !ok {
		fmt.Fprintln(os.Stderr, "unknown helper mode", mode)
		os.Exit(3)
	}
	os.Exit(f())
}

// helpers are the helper modes, registered by each test file's init.
var helpers = map[string]func() int{}

// helperCommand returns a command that runs the test binary as the helper
// in mode, with the current environment plus env.
func helperCommand(mode string, env ...string) *exec.Cmd {
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperDaemon$", "-test.count=1")
	cmd.Env = append(os.Environ(), helperEnv+"="+mode)
	cmd.Env = append(cmd.Env, env...)
	return cmd
}
