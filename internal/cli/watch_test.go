package cli

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/hpcproxy/hpcproxy/internal/sshtest"
	"github.com/hpcproxy/hpcproxy/internal/testenv"
)

func TestIsShellScript(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want bool
	}{
		{[]string{"-bash"}, false},
		{[]string{"bash"}, false},
		{[]string{"/bin/bash", "-l"}, false},
		{[]string{"bash", "--login", "-i"}, false},
		{[]string{"sh", "-c", "perjob start; x"}, true},
		{[]string{"bash", "-ec", "x"}, true},
		{[]string{"/bin/sh", "./setup.sh"}, true},
		{[]string{"tcsh", "-f", "job.csh"}, true},
		{[]string{"fish"}, false},
	} {
		comm := filepath.Base(tc.args[0])
		if comm[0] == '-' {
			comm = comm[1:]
		}
		assert.Equal(t, tc.want, isShellScript(comm, tc.args), "%q", tc.args)
	}
	assert.False(t, isShellScript("python3", []string{"python3", "x.py"}))
}

// TestStartWarnsAndHints runs start as a user would under a wrapper that
// exits as soon as start returns (timeout) and from a shell script, with a
// login node that refuses connections: start warns that the proxy would
// stop with its parent, and its failure hint is an ssh command that
// OpenSSH accepts (the port as -p, not host:port).
func TestStartWarnsAndHints(t *testing.T) {
	timeout := testenv.LookPath(t, "timeout")
	sh := testenv.LookPath(t, "sh")
	dir := sshtest.PrivateTempDir(t)
	args := []string{"start", "--via", "127.0.0.1:1", "--method", "gossh", "--timeout", "20s", "--state", filepath.Join(dir, "proxy.json")}
	self, err := os.Executable()
	require.NoError(t, err)
	for _, tc := range []struct {
		name, warning string
		cmd           *exec.Cmd
	}{
		{"timeout", `warning: perjob was run by "timeout" (pid `, exec.Command(timeout, append([]string{"60", self}, args...)...)},
		{"script", `warning: perjob was run by a shell script (` + sh + ` -c `, exec.Command(sh, "-c", `"$0" "$@"; exit $?`, self, args[0], args[1], args[2], args[3], args[4], args[5], args[6], args[7], args[8])},
		{"not a wrapper", "", exec.Command(self, args...)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			tc.cmd.Env = append(cleanEnv(), envApp+"=perjob", "HOME="+dir)
			tc.cmd.Stdout, tc.cmd.Stderr = &stdout, &stderr
			err := tc.cmd.Run()
			require.Error(t, err, "start through a refusing login node succeeded: %s", stdout.String())
			if tc.warning == "" {
				assert.NotContains(t, stderr.String(), "warning")
			} else {
				assert.Contains(t, stderr.String(), tc.warning)
				assert.Contains(t, stderr.String(), "the proxy stops")
			}
			assert.Contains(t, stderr.String(), "hint: check the login node with 'ssh -p 1 127.0.0.1 true'")
		})
	}
}

func TestWatchWarningGoneParent(t *testing.T) {
	assert.Contains(t, watchWarning("perjob", 1, false), "runs until 'perjob stop'")
	cmd := exec.Command("true")
	require.NoError(t, cmd.Run())
	assert.Contains(t, watchWarning("perjob", cmd.Process.Pid, false), "has already exited")
	assert.Empty(t, watchWarning("perjob", os.Getpid(), false), "a test binary is no wrapper")
}
