package daemonproc

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
)

// ErrUnsafePath is wrapped by errors about a state directory or file that
// is owned by someone else, writable by others, or not what it should be
// (a symlink, not a directory). The root package exports it as
// hpcproxy.ErrUnsafePath.
var ErrUnsafePath = errors.New("hpcproxy: unsafe state path")

// EnsurePrivateDir creates dir with mode 0700 (and missing parents with
// 0700, as the XDG base directory spec asks) and checks that it is safe to
// keep secrets in: a directory (or a symlink the user owns to one) owned by
// the user and not writable by group or others. A directory that others
// can only read or enter is tightened to 0700. An unsafe directory, such
// as one pre-created by another user in a shared /tmp, gives an error
// wrapping ErrUnsafePath.
func EnsurePrivateDir(dir string) error {
	if err := os.MkdirAll(filepath.Dir(dir), 0o700); err != nil {
		return fmt.Errorf("hpcproxy: create state directory: %w", err)
	}
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("hpcproxy: create state directory: %w", err)
	}
	uid := os.Getuid()
	lfi, err := os.Lstat(dir)
	if err != nil {
		return fmt.Errorf("hpcproxy: state directory: %w", err)
	}
	if lfi.Mode()&fs.ModeSymlink != 0 {
		// In a sticky /tmp only the link's owner can replace it, so a link
		// of our own is as safe as the directory it names.
		if o := FileUID(lfi); o != uid {
			return fmt.Errorf("%w: %s is a symlink owned by uid %d, not %d", ErrUnsafePath, dir, o, uid)
		}
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("hpcproxy: state directory: %w", err)
	}
	switch {
	case !fi.IsDir():
		return fmt.Errorf("%w: %s is not a directory", ErrUnsafePath, dir)
	case FileUID(fi) != uid:
		return fmt.Errorf("%w: %s is owned by uid %d, not %d", ErrUnsafePath, dir, FileUID(fi), uid)
	case fi.Mode().Perm()&0o022 != 0:
		return fmt.Errorf("%w: %s is writable by others (mode %04o)", ErrUnsafePath, dir, fi.Mode().Perm())
	case fi.Mode().Perm()&0o077 != 0:
		if err := os.Chmod(dir, 0o700); err != nil {
			return fmt.Errorf("hpcproxy: state directory: %w", err)
		}
	}
	return nil
}

// FileUID returns the uid that owns fi, or -1 if fi does not say.
func FileUID(fi fs.FileInfo) int {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return int(st.Uid)
	}
	return -1
}
