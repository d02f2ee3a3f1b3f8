package cli

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"debug/elf"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/hpcproxy/hpcproxy/internal/testenv"
)

// TestRelease runs scripts/release.sh as a user would and checks what it
// promises: a tarball per architecture with static perjob and shared
// binaries for that machine, SHA256SUMS that verify, the version linked
// in, and the same bytes from a second build.
func TestRelease(t *testing.T) {
	for _, p := range []string{"bash", "git", "tar", "gzip", "sha256sum"} {
		testenv.LookPath(t, p)
	}
	if testing.Short() {
		t.Skip("cross-compiles six binaries; not in -short")
	}
	const version = "v9.8.7-test"
	dist := filepath.Join(t.TempDir(), "dist")
	release := func(dist string, env ...string) {
		t.Helper()
		cmd := exec.Command("bash", "../../scripts/release.sh")
		cmd.Env = append(os.Environ(), append([]string{"VERSION=" + version, "DIST=" + dist}, env...)...)
		out, err := cmd.CombinedOutput()
		require.NoError(t, err, "release.sh:\n%s", out)
	}
	release(dist)

	sums := exec.Command("sha256sum", "--check", "--strict", "SHA256SUMS")
	sums.Dir = dist
	out, err := sums.CombinedOutput()
	require.NoError(t, err, "sha256sum --check:\n%s", out)

	machines := map[string]elf.Machine{"amd64": elf.EM_X86_64, "arm64": elf.EM_AARCH64, "ppc64le": elf.EM_PPC64}
	for arch, machine := range machines {
		tgz := filepath.Join(dist, "hpcproxy-"+version+"-linux-"+arch+".tar.gz")
		assert.Contains(t, string(out), filepath.Base(tgz)+": OK")
		files := untar(t, tgz, t.TempDir())
		for _, bin := range []string{"perjob", "shared"} {
			path := filepath.Join(files, "hpcproxy-"+version+"-linux-"+arch, "bin", bin)
			checkStatic(t, path, machine)
			if arch != "amd64" {
				continue
			}
			for _, arg := range []string{"--version", "version"} {
				out, err := exec.Command(path, arg).CombinedOutput()
				require.NoError(t, err, "%s %s: %s", bin, arg, out)
				assert.Regexp(t, `^`+bin+` `+version+` \(go1\.\S+ linux/amd64\)\n$`, string(out))
			}
		}
		for _, f := range []string{"README.md", "contrib/slurm/hpcproxy-taskprolog", "contrib/slurm/hpcproxy-taskepilog", "contrib/jobstarter/hpcproxy-job-starter", "contrib/lmod/hpcproxy.lua"} {
			assert.FileExists(t, filepath.Join(files, "hpcproxy-"+version+"-linux-"+arch, f))
		}
	}

	// Reproducible: the same tree built again gives the same tarball.
	again := filepath.Join(t.TempDir(), "dist")
	release(again, "ARCHES=amd64")
	name := "hpcproxy-" + version + "-linux-amd64.tar.gz"
	first, err := os.ReadFile(filepath.Join(dist, name))
	require.NoError(t, err)
	second, err := os.ReadFile(filepath.Join(again, name))
	require.NoError(t, err)
	assert.True(t, bytes.Equal(first, second), "a second build of %s differs from the first", name)
}

// checkStatic fails t unless path is an ELF executable for machine that
// needs no dynamic loader and no shared library.
func checkStatic(t *testing.T, path string, machine elf.Machine) {
	t.Helper()
	f, err := elf.Open(path)
	require.NoError(t, err)
	defer f.Close()
	assert.Equal(t, machine, f.Machine, "%s", path)
	for _, p := range f.Progs {
		assert.NotEqual(t, elf.PT_INTERP, p.Type, "%s asks for a dynamic loader (PT_INTERP)", path)
		assert.NotEqual(t, elf.PT_DYNAMIC, p.Type, "%s is dynamically linked (PT_DYNAMIC)", path)
	}
	libs, err := f.ImportedLibraries()
	require.NoError(t, err)
	assert.Empty(t, libs, "%s needs shared libraries", path)
}

// untar unpacks the gzipped tarball tgz into dir and returns dir.
func untar(t *testing.T, tgz, dir string) string {
	t.Helper()
	f, err := os.Open(tgz)
	require.NoError(t, err)
	defer f.Close()
	zr, err := gzip.NewReader(f)
	require.NoError(t, err)
	tr := tar.NewReader(zr)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return dir
		}
		require.NoError(t, err)
		require.False(t, strings.Contains(h.Name, ".."), "tar entry %q", h.Name)
		assert.Equal(t, 0, h.Uid, "%s: owner", h.Name)
		p := filepath.Join(dir, h.Name)
		switch h.Typeflag {
		case tar.TypeDir:
			require.NoError(t, os.MkdirAll(p, 0o755))
		case tar.TypeReg:
			require.NoError(t, os.MkdirAll(filepath.Dir(p), 0o755))
			b, err := io.ReadAll(tr)
			require.NoError(t, err)
			require.NoError(t, os.WriteFile(p, b, h.FileInfo().Mode().Perm()))
		}
	}
}

func TestVersionFromBuildInfo(t *testing.T) {
	for _, tc := range []struct {
		name string
		bi   debug.BuildInfo
		want string
	}{
		{"go install @version", debug.BuildInfo{Main: debug.Module{Version: "v1.2.0"}}, "v1.2.0"},
		{"pseudo-version of a clone", debug.BuildInfo{Main: debug.Module{Version: "v0.0.0-20261206210000-9f9df0b1a2b3+dirty"}}, "v0.0.0-20261206210000-9f9df0b1a2b3+dirty"},
		{"revision", debug.BuildInfo{Main: debug.Module{Version: "(devel)"}, Settings: []debug.BuildSetting{{Key: "vcs.revision", Value: "abc123"}}}, "abc123"},
		{"modified", debug.BuildInfo{Main: debug.Module{Version: "(devel)"}, Settings: []debug.BuildSetting{{Key: "vcs.revision", Value: "abc123"}, {Key: "vcs.modified", Value: "true"}}}, "abc123+dirty"},
		{"nothing", debug.BuildInfo{Main: debug.Module{Version: "(devel)"}}, "devel"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			assert.Equal(t, tc.want, versionFrom(&tc.bi))
		})
	}
}

// TestVersionCommand: the version a plain `go build` stamps, through both
// spellings of the command.
func TestVersionCommand(t *testing.T) {
	for _, args := range [][]string{{"--version"}, {"version"}} {
		var out, errb bytes.Buffer
		app := &App{Name: "perjob", Stdout: &out, Stderr: &errb}
		require.Equal(t, 0, app.Main(args), "stderr: %s", errb.String())
		assert.Equal(t, app.versionLine(), out.String())
		assert.True(t, strings.HasPrefix(out.String(), "perjob "+Version()+" (go"), out.String())
	}
}
