package main

import (
	"fmt"
	"os"
	"slices"
	"testing"
)

// harnessTB lets a command use the test helpers of internal/sshtest (a
// throwaway OpenSSH sshd), which report through testing.TB. Fatal and Skip
// panic with a harnessFailure that run recovers; cleanups run in reverse
// order from cleanup. The embedded interface is nil: only the methods below
// may be called, which are all that sshtest uses.
type harnessTB struct {
	testing.TB
	cleanups []func()
}

// harnessFailure is what a Fatal or Skip of harnessTB panics with.
type harnessFailure struct{ msg string }

func (h *harnessTB) Helper()          {}
func (h *harnessTB) Name() string     { return "bench" }
func (h *harnessTB) Cleanup(f func()) { h.cleanups = append(h.cleanups, f) }
func (h *harnessTB) Logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, format+"\n", args...)
}
func (h *harnessTB) Fatalf(format string, args ...any) {
	panic(harnessFailure{fmt.Sprintf(format, args...)})
}
func (h *harnessTB) Fatal(args ...any) { panic(harnessFailure{fmt.Sprint(args...)}) }
func (h *harnessTB) Skipf(format string, args ...any) {
	panic(harnessFailure{fmt.Sprintf(format, args...)})
}

// cleanup runs the registered cleanups, last first.
func (h *harnessTB) cleanup() {
	for _, f := range slices.Backward(h.cleanups) {
		f()
	}
	h.cleanups = nil
}
