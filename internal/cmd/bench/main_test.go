package main

import (
	"bytes"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/hpcproxy/hpcproxy/internal/testenv"
)

// TestMain lets the test binary stand in for the command: the benchmark
// runs itself as hpcproxy's CLI and as its data source.
func TestMain(m *testing.M) {
	if code, ok := runCLI(os.Args[1:]); ok {
		os.Exit(code)
	}
	if code, ok := runSource(); ok {
		os.Exit(code)
	}
	os.Exit(m.Run())
}

// TestBenchSmoke runs the whole benchmark with tiny sizes, so that it keeps
// working: every contender starts, moves bytes both ways, holds
// connections, and shows up in the tables.
func TestBenchSmoke(t *testing.T) {
	for _, prog := range []string{"ssh", "socat", "microsocks"} {
		testenv.LookPath(t, prog)
	}
	testenv.RequireFile(t, "/usr/sbin/sshd", "apt-get install openssh-server")
	var out bytes.Buffer
	err := run(&out, options{
		size: 4 << 20, rounds: 2, hold: "20,40", latency: 10, streams: "2,4",
		settle: 100 * time.Millisecond, storm: "3", concurrent: "30", concSize: 64 << 10,
	})
	t.Log(out.String())
	if err != nil {
		t.Fatal(err)
	}
	got := out.String()
	if strings.Contains(got, "SKIPPED") {
		t.Errorf("a contender was skipped")
	}
	for _, c := range allContenders() {
		want := 2 // a row in the medians and one in the ratios
		if c.baseline {
			want = 1
		}
		if n := strings.Count(got, c.name+" "); n < want {
			t.Errorf("%q has %d rows in the output, want %d", c.name, n, want)
		}
	}
	for _, want := range []string{"Ratios to ssh -D", "Ratios to socat", "KiB/conn@40", "errors@40",
		"Start storms", "Concurrent downloads", "hpcproxy gossh pool"} {
		if !strings.Contains(got, want) {
			t.Errorf("output lacks %q", want)
		}
	}
	if strings.Contains(got, "first error") {
		t.Errorf("held connections, storm starts or concurrent downloads failed")
	}
}

func TestByteSize(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int64
	}{{"1GiB", 1 << 30}, {"512MiB", 512 << 20}, {"64KiB", 64 << 10}, {"1000", 1000}} {
		var b byteSize
		if err := b.Set(tc.in); err != nil || int64(b) != tc.want {
			t.Errorf("Set(%q) = %d, %v; want %d", tc.in, b, err, tc.want)
		}
		if s := b.String(); s != tc.in {
			t.Errorf("String() = %q, want %q", s, tc.in)
		}
	}
	var b byteSize
	for _, bad := range []string{"", "x", "-1", "0", "1TiB"} {
		if err := b.Set(bad); err == nil {
			t.Errorf("Set(%q) succeeded", bad)
		}
	}
}

// TestTreeCPUCountsReapedChildren: a contender that forks a process per
// connection (socat) is charged for the children it has reaped.
func TestTreeCPUCountsReapedChildren(t *testing.T) {
	sh := testenv.LookPath(t, "sh")
	before := treeCPU([]int{os.Getpid()})
	cmd := exec.Command(sh, "-c", "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done")
	if err := cmd.Run(); err != nil {
		t.Fatal(err)
	}
	child := cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime()
	if child < 50*time.Millisecond {
		t.Fatalf("the child used only %v of CPU: too little to tell", child)
	}
	got := treeCPU([]int{os.Getpid()}).sub(before).total()
	// clock ticks are 10 ms: allow two of rounding.
	if got < child-20*time.Millisecond {
		t.Errorf("tree CPU grew by %v while a reaped child used %v", got, child)
	}
}
