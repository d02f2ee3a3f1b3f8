// Package shellenv writes environment assignments as lines a command-line
// shell evaluates (sh, csh, fish, a Slurm TaskProlog) and quotes words for
// a POSIX shell. The root package and the example binaries share it.
package shellenv

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// Shell is the syntax of the lines that [Shell.ExportLines] writes for a
// command-line shell to evaluate. It is a flag.Value.
type Shell int

// The shells ExportLines writes for.
const (
	// Sh is POSIX sh (bash, dash, zsh, ksh): export NAME='VALUE'.
	// Evaluate with eval "$(perjob env)".
	Sh Shell = iota
	// Csh is csh and tcsh: setenv NAME 'VALUE';. Each line ends in
	// a semicolon because csh's command substitution joins lines into
	// one: evaluate with eval "`perjob env`".
	Csh
	// Fish is fish: set -gx NAME 'VALUE';. Evaluate with
	// perjob env | source.
	Fish
	// Slurm is what a Slurm TaskProlog prints to set the task's
	// environment: export NAME=VALUE, unquoted, because Slurm takes the
	// rest of the line as the value.
	Slurm
)

var shellNames = []string{"sh", "csh", "fish", "slurm"}

func (s Shell) String() string {
	if s < 0 || int(s) >= len(shellNames) {
		return "Shell(" + strconv.Itoa(int(s)) + ")"
	}
	return shellNames[s]
}

// Set parses a shell name: sh, csh or fish (or a shell's path or name
// such as /bin/tcsh, bash, zsh: see [For]), or slurm.
func (s *Shell) Set(name string) error {
	for i, n := range shellNames {
		if name == n {
			*s = Shell(i)
			return nil
		}
	}
	if sh, ok := For(name); ok {
		*s = sh
		return nil
	}
	return fmt.Errorf("hpcproxy: unknown shell %q: want one of %s", name, strings.Join(shellNames, ", "))
}

// For returns the syntax the shell program at path (or of that name)
// reads, and whether it is a shell For knows: tcsh and csh read
// Csh, fish Fish, and sh, bash, dash, zsh, ksh, mksh, ash,
// busybox and yash Sh. A login shell's leading "-" is ignored.
func For(path string) (Shell, bool) {
	switch strings.TrimPrefix(filepath.Base(path), "-") {
	case "csh", "tcsh":
		return Csh, true
	case "fish":
		return Fish, true
	case "sh", "bash", "dash", "zsh", "ksh", "ksh93", "mksh", "pdksh", "ash", "busybox", "yash":
		return Sh, true
	}
	return Sh, false
}

// Default guesses the shell that will evaluate this process's output:
// the parent process, if it is a shell For knows (the shell running
// eval "$(perjob env)" in a script is the parent, whatever the user's
// login shell), else $SHELL, else Sh.
func Default() Shell {
	if comm, err := os.ReadFile("/proc/" + strconv.Itoa(os.Getppid()) + "/comm"); err == nil {
		if sh, ok := For(strings.TrimSpace(string(comm))); ok {
			return sh
		}
	}
	if sh, ok := For(os.Getenv("SHELL")); ok {
		return sh
	}
	return Sh
}

// ExportLines formats "KEY=VALUE" assignments as lines that set and export
// them in shell s. Assignments whose key is not a shell name are skipped.
// A value the syntax cannot carry (a newline for csh and slurm, a NUL for
// any) is an error naming the key.
func (s Shell) ExportLines(env []string) (string, error) {
	var b strings.Builder
	for _, kv := range env {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || !isShellName(k) {
			continue
		}
		if strings.ContainsRune(v, 0) || (strings.ContainsRune(v, '\n') && (s == Csh || s == Slurm)) {
			return "", fmt.Errorf("hpcproxy: %s: value cannot be written for %s (newline or NUL)", k, s)
		}
		switch s {
		case Sh:
			fmt.Fprintf(&b, "export %s=%s\n", k, Quote(v))
		case Csh:
			fmt.Fprintf(&b, "setenv %s %s;\n", k, cshQuote(v))
		case Fish:
			fmt.Fprintf(&b, "set -gx %s %s;\n", k, fishQuote(v))
		case Slurm:
			fmt.Fprintf(&b, "export %s=%s\n", k, v)
		default:
			return "", fmt.Errorf("hpcproxy: unknown shell %s", s)
		}
	}
	return b.String(), nil
}

// Quote quotes s as one word for a POSIX shell: unchanged if it
// consists only of characters no shell treats specially, else in single
// quotes, each embedded single quote closed, escaped and reopened:
//
//	it's  ->  'it'\''s'
func Quote(s string) string {
	if s != "" && strings.Trim(s, safeShellChars) == "" {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

const safeShellChars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_@%+=:,./-"

// cshQuote quotes s as one word for csh and tcsh, whose single quotes stop
// everything but history substitution: a ! is escaped (\! inside single
// quotes) and a single quote is closed, escaped and reopened as in sh.
func cshQuote(s string) string {
	r := strings.NewReplacer("'", `'\''`, "!", `\!`)
	return "'" + r.Replace(s) + "'"
}

// fishQuote quotes s as one word for fish: in single quotes, where only \'
// and \\ are escapes. Always quoted: unquoted, fish expands more than sh
// (a leading %, braces).
func fishQuote(s string) string {
	r := strings.NewReplacer(`\`, `\\`, "'", `\'`)
	return "'" + r.Replace(s) + "'"
}

func isShellName(s string) bool {
	if s == "" {
		return false
	}
	for i, r := range s {
		switch {
		case r == '_', r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z':
		case r >= '0' && r <= '9' && i > 0:
		default:
			return false
		}
	}
	return true
}
