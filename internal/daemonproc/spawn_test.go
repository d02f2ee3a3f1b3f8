package daemonproc

import (
	"context"
	"errors"
	"os"
	"slices"
	"syscall"
	"testing"
	"time"
)

func TestReportProtocol(t *testing.T) {
	for i, tc := range []struct {
		name string
		do   func(fd int) error
		want string
	}{
		{"ready", ReportReady, "READY=1\n"},
		{"error", func(fd int) error { return ReportError(fd, errors.New("hpcproxy: bad")) }, "hpcproxy: bad\n"},
		{"error that looks ready", func(fd int) error { return ReportError(fd, errors.New("READY=1")) }, "error: READY=1\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, w, err := os.Pipe()
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			// A distinct fd per case: a used report fd is refused for good.
			fd := 200 + i
			err = syscall.Dup3(int(w.Fd()), fd, 0)
			w.Close()
			if err != nil {
				t.Fatal(err)
			}
			if err := tc.do(fd); err != nil {
				t.Fatal(err)
			}
			b := make([]byte, 100)
			n, _ := r.Read(b)
			if got := string(b[:n]); got != tc.want {
				t.Errorf("got %q, want %q", got, tc.want)
			}
			if err := ReportReady(fd); err == nil {
				t.Errorf("second report on fd %d accepted", fd)
			}
		})
	}
	if err := ReportReady(0); err != nil {
		t.Errorf("ReportReady(0) = %v, want no-op", err)
	}
}

func TestWatchExitFdContext(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	fd, err := syscall.Dup(int(r.Fd()))
	r.Close()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ch, err := WatchExitFd(ctx, fd)
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-ch:
		t.Fatal("fired early")
	case <-time.After(50 * time.Millisecond):
	}
	cancel()
	select {
	case <-ch:
	case <-time.After(5 * time.Second):
		t.Fatal("cancel did not end the watch")
	}
}

// TestDaemonGODEBUG checks the GODEBUG a daemon is started with: the
// caller's settings kept, adaptive stack sizing off unless the caller set
// it.
func TestDaemonGODEBUG(t *testing.T) {
	for _, tc := range []struct{ in, want []string }{
		{[]string{"A=1"}, []string{"A=1", "GODEBUG=adaptivestackstart=0"}},
		{[]string{"GODEBUG="}, []string{"GODEBUG=adaptivestackstart=0"}},
		{[]string{"GODEBUG=gctrace=1"}, []string{"GODEBUG=gctrace=1,adaptivestackstart=0"}},
		{[]string{"GODEBUG=adaptivestackstart=1"}, []string{"GODEBUG=adaptivestackstart=1"}},
		{[]string{"GODEBUG=x=1,adaptivestackstart=1"}, []string{"GODEBUG=x=1,adaptivestackstart=1"}},
	} {
		in := slices.Clone(tc.in)
		if got := daemonGODEBUG(in); !slices.Equal(got, tc.want) {
			t.Errorf("daemonGODEBUG(%q) = %q, want %q", tc.in, got, tc.want)
		}
		if !slices.Equal(in, tc.in) {
			t.Errorf("daemonGODEBUG(%q) modified its argument", tc.in)
		}
	}
}
