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
