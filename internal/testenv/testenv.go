// Package testenv decides what a test does when something it needs is
// missing from the machine: skip with a reason on a developer's machine,
// fail under CI (CI=true), where every test must run.
package testenv

import (
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"testing"
)

// InCI reports whether the tests run under CI (CI set to a true value). There
// a missing requirement is a failure, not a skip.
func InCI() bool {
	v, err := strconv.ParseBool(os.Getenv("CI"))
	return err == nil && v
}

// Require skips t (fails it under CI) with the formatted reason unless ok.
func Require(t testing.TB, ok bool, format string, args ...any) {
	t.Helper()
	if ok {
		return
	}
	msg := fmt.Sprintf(format, args...)
	if InCI() {
		t.Fatalf("required under CI=true: %s", msg)
	}
	t.Skipf("skipping: %s", msg)
}

// LookPath returns the path of the named program, or skips t (fails it under
// CI) when the program is not installed.
func LookPath(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	Require(t, err == nil, "%s is not installed (apt-get install the package that provides it; .ci/run does)", name)
	return p
}

// RequireRoot skips t (fails it under CI) unless the test runs as root.
func RequireRoot(t testing.TB) {
	t.Helper()
	Require(t, os.Geteuid() == 0, "needs root (uid 0), running as uid %d", os.Geteuid())
}

// RequireFile skips t (fails it under CI) unless path exists.
func RequireFile(t testing.TB, path, why string) {
	t.Helper()
	_, err := os.Stat(path)
	Require(t, err == nil, "%s missing (%s): %v", path, why, err)
}
