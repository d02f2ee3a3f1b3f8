package shellenv

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/hpcproxy/hpcproxy/internal/testenv"
)

// awkwardValues are values every shell's quoting must carry unchanged.
var awkwardValues = []string{
	"plain",
	"it's",
	`say "hi"`,
	"a!b !! !$",
	`back\slash \' \\`,
	"a  b\tc*?[x]|d;e&f<g>h(i)",
	"$HOME ${X} $(id) `id`",
	"{a,b} ~root %self #hash ^caret",
	"-Dhttp.proxyHost=127.0.0.1 -Dhttp.nonProxyHosts=localhost|127.*|[::1]",
	"ünïcödé",
	"",
	"-leading-dash",
}

// TestExportLinesInShells evaluates each shell's export lines in that
// shell, the way the README says to (sh: eval "$(...)", csh and tcsh:
// eval "`...`", fish: ... | source), and checks from a child process that
// every value arrived in the environment byte for byte.
func TestExportLinesInShells(t *testing.T) {
	var env []string
	want := map[string]string{}
	for i, v := range awkwardValues {
		k := "HPX_T" + string(rune('A'+i))
		env = append(env, k+"="+v)
		want[k] = v
	}
	for _, tc := range []struct {
		shell   Shell
		program string
		script  string // evaluates the lines in file OUT, then runs env -0
		newline bool   // can carry a newline
	}{
		{Sh, "sh", `eval "$(cat OUT)"` + "\nenv -0\n", true},
		{Sh, "bash", `eval "$(cat OUT)"` + "\nenv -0\n", true},
		{Csh, "tcsh", "eval \"`cat OUT`\"\nenv -0\n", false},
		{Csh, "csh", "eval \"`cat OUT`\"\nenv -0\n", false},
		{Fish, "fish", "cat OUT | source\nenv -0\n", true},
	} {
		t.Run(tc.program, func(t *testing.T) {
			prog := testenv.LookPath(t, tc.program)
			env, want := env, want
			if tc.newline {
				env = append(env, "HPX_NL=line1\nline2")
				want = maps(want, "HPX_NL", "line1\nline2")
			}
			lines, err := tc.shell.ExportLines(env)
			require.NoError(t, err)
			dir := t.TempDir()
			out := filepath.Join(dir, "out")
			require.NoError(t, os.WriteFile(out, []byte(lines), 0o600))
			script := filepath.Join(dir, "script")
			require.NoError(t, os.WriteFile(script, []byte(strings.ReplaceAll(tc.script, "OUT", out)), 0o600))
			args := []string{script}
			if tc.shell == Csh {
				args = []string{"-f", script} // no ~/.cshrc
			}
			cmd := exec.Command(prog, args...)
			cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + dir}
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			got, err := cmd.Output()
			require.NoError(t, err, "%s: %s\nlines:\n%s", tc.program, stderr.String(), lines)
			assert.Empty(t, stderr.String(), "%s wrote to stderr", tc.program)
			have := map[string]string{}
			for _, kv := range strings.Split(string(got), "\x00") {
				if k, v, ok := strings.Cut(kv, "="); ok && strings.HasPrefix(k, "HPX_") {
					have[k] = v
				}
			}
			assert.Equal(t, want, have, "lines:\n%s", lines)
		})
	}
}

func maps(m map[string]string, k, v string) map[string]string {
	out := map[string]string{k: v}
	for k, v := range m {
		out[k] = v
	}
	return out
}

func TestExportLinesRefuses(t *testing.T) {
	for _, s := range []Shell{Csh, Slurm} {
		_, err := s.ExportLines([]string{"X=a\nb"})
		assert.ErrorContains(t, err, "X:", "%s", s)
	}
	lines, err := Slurm.ExportLines([]string{"http_proxy=http://127.0.0.1:1080", "JAVA_TOOL_OPTIONS=-Da=b -Dc=d|e", "bad-name=x"})
	require.NoError(t, err)
	assert.Equal(t, "export http_proxy=http://127.0.0.1:1080\nexport JAVA_TOOL_OPTIONS=-Da=b -Dc=d|e\n", lines)
}

func TestShellSet(t *testing.T) {
	for in, want := range map[string]Shell{
		"sh": Sh, "csh": Csh, "fish": Fish, "slurm": Slurm,
		"/bin/tcsh": Csh, "-tcsh": Csh, "bash": Sh, "/usr/bin/zsh": Sh, "/usr/local/bin/fish": Fish,
	} {
		var s Shell
		require.NoError(t, s.Set(in), in)
		assert.Equal(t, want, s, in)
	}
	var s Shell
	assert.Error(t, s.Set("python"))
	assert.Equal(t, "csh", Csh.String())
}

func TestShellQuote(t *testing.T) {
	for in, want := range map[string]string{
		"plain":                 "plain",
		"http://u:t@h:1/a,b":    "http://u:t@h:1/a,b",
		"":                      "''",
		"a b":                   "'a b'",
		"it's":                  `'it'\''s'`,
		"$HOME `x` \\ \"q\" *;": `'$HOME ` + "`x`" + ` \ "q" *;'`,
	} {
		assert.Equal(t, want, Quote(in), "Quote(%q)", in)
	}
}

func TestExportLinesEval(t *testing.T) {
	sh := testenv.LookPath(t, "sh")
	env := []string{
		"A=plain",
		"B=it's a \"test\" with $HOME and `cmd` and \\ and ;|&",
		"C=line1\nline2",
		"D=",
		"not-a-name=x",
	}
	lines, err := Sh.ExportLines(env)
	require.NoError(t, err)
	assert.NotContains(t, lines, "not-a-name")
	out, err := exec.Command(sh, "-c", lines+`printf '%s|' "$A" "$B" "$C" "$D"`).CombinedOutput()
	require.NoError(t, err, "%s", out)
	assert.Equal(t, "plain|it's a \"test\" with $HOME and `cmd` and \\ and ;|&|line1\nline2||", string(out))
}
