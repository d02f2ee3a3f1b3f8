package hpcproxy

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"
)

// A daemon's claim on its state file: created under a lock so that one
// daemon per scope runs, updated atomically, removed only while it is
// still the daemon's own.

// stateClaim is a daemon's exclusive hold on a state file's scope. Hold it
// for the daemon's lifetime: rewrite the state with Update on every change
// and Release it on exit.
//
// Exclusion uses two mechanisms. A flock(2) on a lock file beside the state
// file (path + ".lock"; never removed, to keep the lock race-free) is held
// while the daemon runs and released by the kernel if it dies, so on one
// host two starts at once cannot both win and a crashed daemon never
// blocks the next. The state file itself is first created by link(2),
// which fails if it exists even on NFS, so two login nodes sharing an NFS
// state dir cannot both claim it even where NFS does not propagate flock
// (mounts with nolock or local_lock=flock). On such mounts, two hosts that
// both find the same stale file at the same moment can still race; with
// working NFS locks (NFSv4, or v3 with lockd) they cannot.
type stateClaim struct {
	path string
	lock *os.File
	mu   sync.Mutex
	last ProxyState
}

// claimStateFile claims the scope of the state file at path for this
// process and writes initial there (Host, PID and, if unset, Started and
// Status are filled in: os.Hostname(), os.Getpid(), now, StatusStarting).
//
// If the scope has a proxy, claimStateFile returns an *AlreadyRunningError
// describing it (errors.Is(err, ErrAlreadyRunning)): a live daemon here or
// one still starting (it holds the lock), or any state written on another
// host that is not proven stale (never removed or overwritten from here).
// A stale file from this host (its daemon gone) is replaced.
func claimStateFile(path string, initial ProxyState) (*stateClaim, error) {
	dir := filepath.Dir(path)
	if err := ensurePrivateDir(dir); err != nil {
		return nil, err
	}
	lock, err := os.OpenFile(path+".lock", os.O_RDWR|os.O_CREATE|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return nil, fmt.Errorf("hpcproxy: open lock file: %w", err)
	}
	if err := flockNB(lock); err != nil {
		lock.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			// The holder runs (here, or on another host where NFS locks
			// work); its state may not be written yet.
			are := &AlreadyRunningError{Path: path, Verdict: VerdictAlive}
			if ps, err := ReadPidFileAt(path); err == nil {
				are.State = ps
				if ps.Host != thisHost() {
					are.Verdict = CheckState(ps)
				}
			}
			return nil, are
		}
		return nil, fmt.Errorf("hpcproxy: lock %s: %w", path+".lock", err)
	}
	c := &stateClaim{path: path, lock: lock}

	if initial.Host == "" {
		initial.Host = thisHost()
	}
	initial.PID = os.Getpid()
	now := time.Now().UTC()
	if initial.Started.IsZero() {
		initial.Started = now
	}
	if initial.Status == "" {
		initial.Status = StatusStarting
	}
	if initial.StatusSince.IsZero() {
		initial.StatusSince = now
	}

	for attempt := 0; ; attempt++ {
		err := c.create(&initial)
		if err == nil {
			return c, nil
		}
		if !errors.Is(err, fs.ErrExist) {
			c.unlock()
			return nil, err
		}
		if attempt > 0 {
			// Replaced the stale file, and someone (another host) was
			// faster still.
			c.unlock()
			ps, _ := ReadPidFileAt(path)
			return nil, &AlreadyRunningError{Path: path, State: ps, Verdict: VerdictForeignUnknown}
		}
		old, rerr := ReadPidFileAt(path)
		if errors.Is(rerr, fs.ErrNotExist) {
			continue
		}
		if rerr != nil {
			// Unreadable or unsafe: do not touch it.
			c.unlock()
			return nil, rerr
		}
		v := VerdictDeadPID
		if old.Host != thisHost() {
			// Another host: its PID means nothing here, and we hold no lock
			// that it honours unless NFS locking works. Never clobber.
			v = CheckState(old)
			if !v.Stale() {
				c.unlock()
				return nil, &AlreadyRunningError{Path: path, State: old, Verdict: v}
			}
		}
		// Same host and we hold the lock: its writer is gone (every daemon
		// holds the lock while it runs), so the file is stale.
		removeIfUnchanged(path, old)
	}
}

// create writes ps to c.path only if no file exists there (link(2)).
func (c *stateClaim) create(ps *ProxyState) error {
	dir := filepath.Dir(c.path)
	tmp, err := writeTemp(dir, ps)
	if err != nil {
		return err
	}
	defer os.Remove(tmp)
	if err := os.Link(tmp, c.path); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return err
		}
		return fmt.Errorf("hpcproxy: create state file: %w", err)
	}
	syncDir(dir)
	c.last = *ps
	return nil
}

// Path returns the claimed state file.
func (c *stateClaim) Path() string { return c.path }

// State returns the state last written.
func (c *stateClaim) State() ProxyState {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.last
}

// errStateTakenOver is wrapped by stateClaim.Update when the state file
// now describes another daemon (one on another host sharing the state dir
// over NFS without working locks, or one started after the file and its
// lock were deleted): the claim never overwrites it, and Release leaves it.
var errStateTakenOver = errors.New("hpcproxy: state file taken over by another daemon")

// Update atomically rewrites the state file with ps (Host and PID are
// kept as claimed; StatusSince is set when Status changes and ps leaves it
// unset). It fails after Release, and with an error wrapping
// errStateTakenOver, writing nothing, if the file now describes another
// daemon. A missing file is written again.
func (c *stateClaim) Update(ps ProxyState) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.lock == nil {
		return errors.New("hpcproxy: state claim released")
	}
	if cur, err := ReadPidFileAt(c.path); err == nil && !sameDaemon(cur, &c.last) {
		return fmt.Errorf("%w: %s now names pid %d on %s", errStateTakenOver, c.path, cur.PID, cur.Host)
	}
	ps.Host, ps.PID = c.last.Host, c.last.PID
	if ps.Started.IsZero() {
		ps.Started = c.last.Started
	}
	if ps.Status != c.last.Status && ps.StatusSince.Equal(c.last.StatusSince) {
		ps.StatusSince = time.Now().UTC()
	}
	if err := WritePidFileAt(c.path, ps); err != nil {
		return err
	}
	c.last = ps
	return nil
}

// Release removes the state file (if it still is this daemon's) and gives
// up the claim. It is idempotent.
func (c *stateClaim) Release() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.lock == nil {
		return nil
	}
	last := c.last
	removeIfUnchanged(c.path, &last)
	c.unlock()
	return nil
}

// Abandon gives the claim up without removing the state file, as a
// killed daemon would: the next claim finds it stale.
func (c *stateClaim) Abandon() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.unlock()
}

func (c *stateClaim) unlock() {
	if c.lock != nil {
		c.lock.Close() // closing the last descriptor drops the flock
		c.lock = nil
	}
}

func flockNB(f *os.File) error {
	sc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var ferr error
	if err := sc.Control(func(fd uintptr) {
		for {
			ferr = syscall.Flock(int(fd), syscall.LOCK_EX|syscall.LOCK_NB)
			if ferr != syscall.EINTR {
				return
			}
		}
	}); err != nil {
		return err
	}
	return ferr
}
