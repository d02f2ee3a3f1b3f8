package cli

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/hpcproxy/hpcproxy/internal/testenv"
)

// lmodInit is where Debian's lmod package keeps its bash initialisation.
const lmodInit = "/usr/share/lmod/lmod/init/bash"

// TestLmodModule loads contrib/lmod/hpcproxy.lua with the real Lmod, both
// where it lies in an unpacked release (it finds the bin/ beside it) and
// copied into a module tree with root set, and runs perjob from PATH.
func TestLmodModule(t *testing.T) {
	bash := testenv.LookPath(t, "bash")
	testenv.RequireFile(t, lmodInit, "apt-get install lmod")
	module, err := os.ReadFile("../../contrib/lmod/hpcproxy.lua")
	require.NoError(t, err)

	// An unpacked release: ROOT/bin/perjob, ROOT/contrib/lmod/hpcproxy.lua.
	release := t.TempDir()
	bin := filepath.Join(release, "bin")
	build := exec.Command("go", "build", "-o", bin+"/", "github.com/hpcproxy/hpcproxy/examples/perjob", "github.com/hpcproxy/hpcproxy/examples/shared")
	out, err := build.CombinedOutput()
	require.NoError(t, err, "go build: %s", out)
	inRelease := filepath.Join(release, "contrib", "lmod")
	require.NoError(t, os.MkdirAll(inRelease, 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(inRelease, "hpcproxy.lua"), module, 0o644))

	// A site's module tree: modulefiles/hpcproxy/1.0.lua with root edited.
	tree := t.TempDir()
	require.NoError(t, os.MkdirAll(filepath.Join(tree, "hpcproxy"), 0o755))
	edited := strings.Replace(string(module), `local root = "/opt/hpcproxy"`, `local root = "`+release+`"`, 1)
	require.NotEqual(t, string(module), edited, "the module file has no root line to edit")
	require.NoError(t, os.WriteFile(filepath.Join(tree, "hpcproxy", "1.0.lua"), []byte(edited), 0o644))

	for name, modulePath := range map[string]string{"release": inRelease, "tree": tree} {
		t.Run(name, func(t *testing.T) {
			cmd := exec.Command(bash, "--noprofile", "--norc", "-c", `
set -e
source `+lmodInit+`
! command -v perjob >/dev/null
module load hpcproxy
command -v perjob
command -v shared
perjob --version
module unload hpcproxy
! command -v perjob >/dev/null
echo unloaded`)
			cmd.Env = []string{"PATH=/usr/bin:/bin", "HOME=" + t.TempDir(), "MODULEPATH=" + modulePath}
			out, err := cmd.CombinedOutput()
			require.NoError(t, err, "%s", out)
			assert.Equal(t, []string{filepath.Join(bin, "perjob"), filepath.Join(bin, "shared"), "perjob " + mustVersion(t, bin) + " ", "unloaded"},
				firstWords(string(out)), "%s", out)
		})
	}
}

// mustVersion is the version perjob in bin reports.
func mustVersion(t *testing.T, bin string) string {
	t.Helper()
	out, err := exec.Command(filepath.Join(bin, "perjob"), "--version").Output()
	require.NoError(t, err)
	f := strings.Fields(string(out))
	require.GreaterOrEqual(t, len(f), 2, "%s", out)
	return f[1]
}

// firstWords returns each line of s: the whole line, except for a
// version line, cut after its version.
func firstWords(s string) []string {
	var out []string
	for _, line := range strings.Split(strings.TrimSpace(s), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "perjob" {
			line = f[0] + " " + f[1] + " "
		}
		out = append(out, line)
	}
	return out
}
