package hpcproxy

import "syscall"

// raiseFileLimit raises this process's soft limit on open files to its
// hard limit and returns the limit now in force. Every held connection
// costs the daemon a descriptor or more, and Go raises the soft limit only
// for itself: the ssh children it starts (a ControlMaster, which holds
// three descriptors per stdio forward) inherit the original, often 1024,
// unless the program sets the limit itself, as this does.
func raiseFileLimit() (uint64, error) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 0, err
	}
	lim.Cur = lim.Max
	return lim.Cur, syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
}

// openFileLimit returns the soft limit on open files (a large number if it
// cannot be read).
func openFileLimit() uint64 {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 1 << 20
	}
	return lim.Cur
}
