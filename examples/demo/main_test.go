package main

import (
	"io"
	"os"
	"strings"
	"testing"
)

// TestDemo runs the demo and checks every step it prints.
func TestDemo(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout := os.Stdout
	os.Stdout = w
	out := make(chan string)
	go func() {
		b, _ := io.ReadAll(r)
		out <- string(b)
	}()
	main()
	os.Stdout = stdout
	w.Close()
	got := <-out
	t.Log(got)
	if n := strings.Count(got, "200 OK: hello from the web server"); n != 4 {
		t.Errorf("got %d successful fetches, want 4 (SOCKS5, SOCKS4a, CONNECT, plain HTTP)", n)
	}
	for _, want := range []string{"tunnel gossh via login1", `Via: "1.1 hpcproxy"`, "asked for: localhost:", "all_proxy=socks5h://", "state file removed"} {
		if !strings.Contains(got, want) {
			t.Errorf("output lacks %q", want)
		}
	}
}
