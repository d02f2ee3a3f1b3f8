package hpcproxy

import (
	"os"
	"path/filepath"
	"sort"
	"strconv"
)

// Squatted temporary directories
//
// The per-job state directory is hpcproxy-UID in a shared tmp dir: a name
// anyone can guess, and so create first. A directory (or link) of that
// name that another user owns is never used (ensurePrivateDir refuses it,
// naming the owner); instead, as ssh-agent does with mkdtemp, the
// directory becomes a private one with a random suffix,
// hpcproxy-UID.XXXXXXXX beside it, which every later call finds again:
// the first such directory, in name order, that is a real directory owned
// by this UID with mode 0700 (no other user can make one that passes).

// privateTmpDir returns primary if it is usable (missing, or ours), else
// the fallback directory for it, created if there is none yet. If that
// fails, it returns primary, whose use then fails with an error that names
// its owner.
func privateTmpDir(primary string) string {
	if !squatted(primary) {
		return primary
	}
	if fb := findFallback(primary); fb != "" {
		return fb
	}
	made, err := os.MkdirTemp(filepath.Dir(primary), filepath.Base(primary)+".")
	if err != nil {
		return primary
	}
	// Another process may have made one at the same moment: all settle on
	// the first in name order.
	if fb := findFallback(primary); fb != "" && fb != made {
		_ = os.Remove(made)
		return fb
	}
	return made
}

// squatted reports whether path exists but belongs to another user.
func squatted(path string) bool {
	fi, err := os.Lstat(path)
	if err != nil {
		return false
	}
	return fileUID(fi) != os.Getuid()
}

// findFallback returns the first private fallback directory of primary,
// or "".
func findFallback(primary string) string {
	matches, err := filepath.Glob(globEscape(primary) + ".*")
	if err != nil {
		return ""
	}
	sort.Strings(matches)
	for _, m := range matches {
		fi, err := os.Lstat(m)
		if err == nil && fi.IsDir() && fileUID(fi) == os.Getuid() && fi.Mode().Perm() == 0o700 {
			return m
		}
	}
	return ""
}

// globEscape quotes the metacharacters of filepath.Match in path.
func globEscape(path string) string {
	var b []byte
	for i := 0; i < len(path); i++ {
		switch c := path[i]; c {
		case '*', '?', '[', '\\':
			b = append(b, '\\', c)
		default:
			b = append(b, c)
		}
	}
	return string(b)
}

// uidTmpDir is hpcproxy-UID in dir, or its private fallback.
func uidTmpDir(dir string) string {
	return privateTmpDir(filepath.Join(dir, "hpcproxy-"+strconv.Itoa(os.Getuid())))
}
