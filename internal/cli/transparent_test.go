package cli

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"

	"github.com/hpcproxy/hpcproxy/internal/testenv"
)

// TestRunTransparentUserNamespacesOff: where user namespaces are off, run
// --transparent says so, naming the sysctl, before anything runs, and
// points at the plain run. The test turns them off only for itself: in a
// throwaway user namespace (unshare), where user.max_user_namespaces is
// that namespace's own, set to 0 there.
func TestRunTransparentUserNamespacesOff(t *testing.T) {
	unshare := testenv.LookPath(t, "unshare")
	probe := exec.Command(unshare, "--user", "--map-root-user", "sh", "-c", "echo 0 >/proc/sys/user/max_user_namespaces")
	out, err := probe.CombinedOutput()
	testenv.Require(t, err == nil, "cannot make a throwaway user namespace to turn user namespaces off in: %v %s", err, out)

	dir := t.TempDir()
	marker := filepath.Join(dir, "ran")
	cmd := exec.Command(unshare, "--user", "--map-root-user", "sh", "-c",
		`echo 0 >/proc/sys/user/max_user_namespaces && exec "$@"`, "sh",
		os.Args[0], "run", "--transparent", "--state", filepath.Join(dir, "proxy.json"), "--", "touch", marker)
	cmd.Env = append(cleanEnv(), envApp+"=perjob")
	var stderr strings.Builder
	cmd.Stderr = &stderr
	err = cmd.Run()
	ee, ok := err.(*exec.ExitError)
	if !ok || ee.ExitCode() != 1 {
		t.Fatalf("run --transparent: %v, want exit status 1; stderr:\n%s", err, stderr.String())
	}
	assert.Contains(t, stderr.String(), "perjob run: transparent: user namespaces are disabled on this node (sysctl user.max_user_namespaces=0")
	assert.Contains(t, stderr.String(), "hint: without --transparent, 'perjob run -- CMD'")
	_, err = os.Stat(marker)
	assert.True(t, os.IsNotExist(err), "the command ran: %v", err)
}

func TestRunExcludeNeedsTransparent(t *testing.T) {
	r := run(t, "perjob", "", "run", "--exclude", "10.0.0.0/8", "--state", filepath.Join(t.TempDir(), "p.json"), "--", "true")
	assert.Equal(t, 1, r.code)
	assert.Contains(t, r.stderr, "--exclude needs --transparent")
	r = run(t, "perjob", "", "run", "--transparent", "--exclude", "10.0.0.300/8", "--", "true")
	assert.Equal(t, 1, r.code)
	assert.Contains(t, r.stderr, `--exclude "10.0.0.300/8": want a network like 10.0.0.0/8`)
}

func TestWithoutProxyEnv(t *testing.T) {
	got := withoutProxyEnv([]string{"http_proxy=x", "HTTPS_PROXY=y", "ALL_PROXY=z", "no_proxy=a", "PATH=/bin", "MY_PROXY_HOST=h"})
	assert.Equal(t, []string{"PATH=/bin", "MY_PROXY_HOST=h"}, got)
}
