package main

import (
	"context"
	"os"
	"strings"
	"testing"
)

// TestDemo runs the demo and checks every step it prints, and that it
// leaves no files behind.
func TestDemo(t *testing.T) {
	base := t.TempDir()
	var out strings.Builder
	if err := run(context.Background(), &out, base); err != nil {
		t.Fatalf("demo: %v\noutput:\n%s", err, out.String())
	}
	got := out.String()
	t.Log(got)
	if n := strings.Count(got, "200 OK: hello from the web server"); n != 4 {
		t.Errorf("got %d successful fetches, want 4 (SOCKS5, SOCKS4a, CONNECT, plain HTTP)", n)
	}
	for _, want := range []string{"tunnel gossh via login1", `Via: "1.1 hpcproxy"`, "asked for: localhost:", "all_proxy=socks5h://", "state file removed"} {
		if !strings.Contains(got, want) {
			t.Errorf("output lacks %q", want)
		}
	}
	assertEmpty(t, base)
}

// TestDemoFailureCleansUp: a demo that fails half-way (here: interrupted
// before its daemon came up) still removes its files, the client's
// private key among them.
func TestDemoFailureCleansUp(t *testing.T) {
	base := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	var out strings.Builder
	if err := run(ctx, &out, base); err == nil {
		t.Fatalf("an interrupted demo succeeded:\n%s", out.String())
	}
	if !strings.Contains(out.String(), "1. login node") {
		t.Fatalf("the demo failed before it wrote its key:\n%s", out.String())
	}
	assertEmpty(t, base)
}

func assertEmpty(t *testing.T, dir string) {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		t.Errorf("left behind: %s", e.Name())
	}
}
