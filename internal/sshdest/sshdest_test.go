package sshdest

import (
	"os/exec"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/hpcproxy/hpcproxy/internal/testenv"
)

// TestCommand checks the command lines Command prints, and that
// OpenSSH reads each the way hpcproxy reads the destination (ssh -G).
func TestCommand(t *testing.T) {
	ssh := testenv.LookPath(t, "ssh")
	for _, tc := range []struct {
		dest, want           string
		user, hostname, port string
	}{
		{"login1", "ssh login1 true", "", "login1", "22"},
		{"alice@login1", "ssh alice@login1 true", "alice", "login1", "22"},
		{"127.0.0.1:22222", "ssh -p 22222 127.0.0.1 true", "", "127.0.0.1", "22222"},
		{"alice@login1:2222", "ssh -p 2222 alice@login1 true", "alice", "login1", "2222"},
		{"[::1]:2222", "ssh -p 2222 ::1 true", "", "::1", "2222"},
		{"a@b@login1", "ssh a@b@login1 true", "a@b", "login1", "22"},
		{"-oProxyCommand=x", "ssh -- -oProxyCommand=x true", "", "", ""},
	} {
		got := Command(tc.dest, "true")
		assert.Equal(t, tc.want, got, "Command(%q)", tc.dest)
		if tc.hostname == "" {
			continue
		}
		args := append([]string{"-F", "none", "-G"}, strings.Fields(got)[1:]...)
		args = args[:len(args)-1] // not the remote command
		out, err := exec.Command(ssh, args...).Output()
		require.NoError(t, err, "ssh %q", args)
		conf := string(out)
		assert.Contains(t, conf, "\nhostname "+tc.hostname+"\n", "ssh %q", args)
		assert.Contains(t, conf, "\nport "+tc.port+"\n", "ssh %q", args)
		if tc.user != "" {
			assert.Contains(t, conf, "\nuser "+tc.user+"\n", "ssh %q", args)
		}
	}
}

func TestForwardHint(t *testing.T) {
	assert.Equal(t, "ssh -N -L 8888:127.0.0.1:40001 -p 2222 alice@login1", ForwardHint("alice@login1:2222", "127.0.0.1:40001", 8888))
	assert.Equal(t, "ssh -N -L 8888:/home/a/j.sock login1", ForwardHint("login1", "/home/a/j.sock", 8888))
	assert.Equal(t, "", ForwardHint("login1", "127.0.0.1:0", 0))
}

func TestParse(t *testing.T) {
	tests := []struct {
		in      string
		want    Destination
		wantErr bool
	}{
		{in: "login", want: Destination{Host: "login"}},
		{in: "alice@login", want: Destination{User: "alice", Host: "login"}},
		{in: "login:2222", want: Destination{Host: "login", Port: 2222}},
		{in: "alice@login.example.org:2222", want: Destination{User: "alice", Host: "login.example.org", Port: 2222}},
		{in: "a@b@login", want: Destination{User: "a@b", Host: "login"}},
		{in: "[::1]:22", want: Destination{Host: "::1", Port: 22}},
		{in: "::1", want: Destination{Host: "::1"}},
		{in: "", wantErr: true},
		{in: "-oProxyCommand=x", wantErr: true},
		{in: "@login", wantErr: true},
		{in: "login:0", wantErr: true},
		{in: "login:http", wantErr: true},
		{in: "a b", wantErr: true},
	}
	for _, tt := range tests {
		got, err := Parse(tt.in)
		if tt.wantErr {
			assert.Error(t, err, "Parse(%q)", tt.in)
			continue
		}
		require.NoError(t, err, "Parse(%q)", tt.in)
		assert.Equal(t, tt.want, got, "Parse(%q)", tt.in)
	}
}

// Errors quote the destination as the user gave it, not what is left of it
// after "user@" was cut off.
func TestParseErrors(t *testing.T) {
	for in, want := range map[string]string{
		"@login":          `hpcproxy: invalid SSH destination "@login": empty user`,
		"alice@":          `hpcproxy: invalid SSH destination "alice@": empty host`,
		"alice@login:0":   `hpcproxy: invalid SSH destination "alice@login:0": bad port "0"`,
		"alice@[::1":      `hpcproxy: invalid SSH destination "alice@[::1": address [::1: missing ']' in address`,
		"bob@login:65536": `hpcproxy: invalid SSH destination "bob@login:65536": bad port "65536"`,
	} {
		_, err := Parse(in)
		assert.EqualError(t, err, want, "Parse(%q)", in)
	}
}

func FuzzParse(f *testing.F) {
	for _, s := range []string{"login", "a@b:22", "[::1]:2222", "::1", "@", "a@[b]:x"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		d, err := Parse(s)
		if err != nil {
			return
		}
		if d.Host == "" || d.Port < 0 || d.Port > 65535 {
			t.Fatalf("Parse(%q) = %+v", s, d)
		}
	})
}
