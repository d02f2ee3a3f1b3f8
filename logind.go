package hpcproxy

import (
	"bufio"
	"bytes"
	"os"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/hpcproxy/hpcproxy/internal/jobenv"
)

// cgroupScope says where in systemd's cgroup tree a process sits, which
// decides whether logind kills it at logout.
type cgroupScope string

// Cgroup scopes.
const (
	// scopeSession: a login session's scope (session-N.scope), as for
	// anything started from an SSH shell, even after setsid.
	scopeSession cgroupScope = "session"
	// scopeUserManager: the user's service manager (user@UID.service), as
	// for anything started with systemd-run --user.
	scopeUserManager cgroupScope = "user-manager"
	// scopeOther: anything else, such as a batch job's cgroup under the
	// scheduler's system service.
	scopeOther cgroupScope = "other"
)

// logoutReport is checkLogout's answer with its reasons.
type logoutReport struct {
	// Survives reports whether a daemon started now, from this process's
	// cgroup, is expected to outlive the user's logout.
	Survives bool
	// KillUserProcesses is logind's effective setting for this user's
	// session scopes: KillUserProcesses, overridden by KillExcludeUsers
	// and KillOnlyUsers as checkLogout describes.
	KillUserProcesses bool
	// Linger reports whether the user lingers (user@UID.service stays up
	// without sessions).
	Linger bool
	// Systemd reports whether systemd runs the machine; without it nothing
	// kills processes at logout (setsid already escapes SIGHUP).
	Systemd bool
	// Scope is where this process sits in the cgroup tree.
	Scope cgroupScope
	// Job is the batch job this process runs in, if any: a daemon started
	// inside a job lives with the job, not with a login.
	Job jobenv.JobInfo
	// Reason explains Survives in a sentence.
	Reason string
}

// WillSurviveLogout reports whether a proxy daemon started now by this
// process is expected to survive the user's logout, and logind's effective
// KillUserProcesses and the user's Linger setting. See checkLogout for the
// rules; the simpler "KillUserProcesses=no or Linger=yes" would be wrong
// both ways: lingering does not save a session scope, and KillUserProcesses=no
// does not keep the user's service manager up after the last logout.
func WillSurviveLogout() (survives, killUserProcesses, linger bool) {
	name, _ := currentUserName()
	r := checkLogout("/", name, os.Getuid(), jobenv.Detect())
	return r.Survives, r.KillUserProcesses, r.Linger
}

// checkLogout decides whether a daemon started now from this process will
// survive logout, from the files logind and the kernel expose:
// /run/systemd/system (systemd is running), logind.conf and its
// logind.conf.d drop-ins (KillUserProcesses, KillOnlyUsers,
// KillExcludeUsers; later files win), /var/lib/systemd/linger/USER and
// /proc/self/cgroup. The rules:
//
//	systemd  scope         KillUserProcesses*  linger  survives
//	no       -             -                   -       yes (nothing kills at logout)
//	yes      session       no                  any     yes (the scope is abandoned, left "closing")
//	yes      session       yes                 any     no  (the session scope is killed)
//	yes      user-manager  any                 yes     yes (user@UID.service stays up)
//	yes      user-manager  any                 no      no  (it stops with the last session)
//	yes      other         any                 any     yes (not logind's, e.g. a batch job)
//
// The scope decides first: KillUserProcesses is about session scopes only,
// and whatever it says, only lingering keeps user@UID.service up after the
// last session ends.
//
// *KillUserProcesses is logind's effective setting for the user, decided
// as logind.conf(5) describes (and logind's manager_shall_kill does): a
// user in KillExcludeUsers (default "root") is never killed; otherwise, if
// KillOnlyUsers is set, the user is killed if and only if listed there,
// whatever KillUserProcesses says ("these settings override
// KillUserProcesses="); otherwise KillUserProcesses decides. So
// KillOnlyUsers=alice kills alice's sessions even with KillUserProcesses=no.
//
// Inside a batch job, Survives is about logout only: the daemon still ends
// with the job. When no configuration sets KillUserProcesses, the default
// is taken from the commented-out default in logind.conf (distributions
// ship "#KillUserProcesses=no"), else "no", the setting of Debian, Ubuntu,
// RHEL, Fedora and SUSE (upstream systemd's build default is yes).
//
// Every path is read under root ("/" but for test fixtures).
func checkLogout(root, userName string, uid int, job jobenv.JobInfo) logoutReport {
	r := logoutReport{Job: job}
	r.Systemd = isDir(filepath.Join(root, "run/systemd/system"))
	if userName != "" {
		_, err := os.Stat(filepath.Join(root, "var/lib/systemd/linger", userName))
		r.Linger = err == nil
	}
	r.KillUserProcesses = readLogindConf(root).kills(userName)
	r.Scope = readCgroupScope(filepath.Join(root, "proc/self/cgroup"), uid)

	switch {
	case !r.Systemd:
		r.Survives, r.Reason = true, "systemd is not running: nothing kills processes at logout"
	case r.Scope == scopeUserManager && r.Linger:
		r.Survives, r.Reason = true, "the daemon runs under the user's service manager, which lingering keeps up"
	case r.Scope == scopeUserManager:
		r.Survives, r.Reason = false, "the user's service manager stops at the last logout, whatever KillUserProcesses says: enable lingering (loginctl enable-linger)"
	case r.Scope == scopeSession && !r.KillUserProcesses:
		r.Survives, r.Reason = true, "logind does not kill this user's session processes at logout (KillUserProcesses=no for the user)"
	case r.Scope == scopeSession:
		r.Survives, r.Reason = false, "logind kills the login session's processes at logout (KillUserProcesses=yes for the user), lingering or not: start the daemon with systemd-run --user (with linger on) or from a batch job"
	default:
		r.Survives, r.Reason = true, "the daemon is outside logind's sessions"
	}
	if job.InJob {
		r.Reason += "; inside " + string(job.Scheduler) + " job " + job.JobID + " it ends with the job"
	}
	return r
}

// logindConf is the part of logind.conf that decides killing.
type logindConf struct {
	killUserProcesses *bool
	defaultKill       bool // from a commented-out default in the main file
	killOnlyUsers     []string
	killExcludeUsers  []string
}

// kills reports whether logind kills userName's session scopes at logout:
// KillExcludeUsers first, then KillOnlyUsers (which overrides
// KillUserProcesses when set), then KillUserProcesses; see checkLogout.
func (c logindConf) kills(userName string) bool {
	if slices.Contains(c.killExcludeUsers, userName) {
		return false
	}
	if len(c.killOnlyUsers) > 0 {
		return slices.Contains(c.killOnlyUsers, userName)
	}
	if c.killUserProcesses != nil {
		return *c.killUserProcesses
	}
	return c.defaultKill
}

// logindConfDirs are searched in order of precedence, as systemd does.
var logindConfDirs = []string{"etc/systemd", "run/systemd", "usr/local/lib/systemd", "usr/lib/systemd", "lib/systemd"}

// readLogindConf reads the main logind.conf (the first found in
// logindConfDirs) and then the *.conf drop-ins of every logind.conf.d,
// sorted by file name, a name in a higher-precedence directory hiding the
// same name in lower ones; the last assignment wins.
func readLogindConf(root string) logindConf {
	c := logindConf{killExcludeUsers: []string{"root"}}
	for _, d := range logindConfDirs {
		p := filepath.Join(root, d, "logind.conf")
		if b, err := os.ReadFile(p); err == nil {
			c.parse(b, true)
			break
		}
	}
	dropins := map[string]string{}
	for i := len(logindConfDirs) - 1; i >= 0; i-- {
		dir := filepath.Join(root, logindConfDirs[i], "logind.conf.d")
		ents, err := os.ReadDir(dir)
		if err != nil {
			continue
		}
		for _, e := range ents {
			if strings.HasSuffix(e.Name(), ".conf") && !e.IsDir() {
				dropins[e.Name()] = filepath.Join(dir, e.Name())
			}
		}
	}
	names := make([]string, 0, len(dropins))
	for n := range dropins {
		names = append(names, n)
	}
	slices.Sort(names)
	for _, n := range names {
		if b, err := os.ReadFile(dropins[n]); err == nil {
			c.parse(b, false)
		}
	}
	return c
}

func (c *logindConf) parse(b []byte, main bool) {
	section := ""
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if strings.HasPrefix(line, "[") && strings.HasSuffix(line, "]") {
			section = line[1 : len(line)-1]
			continue
		}
		if section != "Login" {
			continue
		}
		if rest, ok := strings.CutPrefix(line, "#"); ok && main {
			// Distributions ship the build's defaults commented out.
			if k, v, ok := strings.Cut(rest, "="); ok && strings.TrimSpace(k) == "KillUserProcesses" {
				if b, ok := parseSystemdBool(v); ok {
					c.defaultKill = b
				}
			}
			continue
		}
		if line == "" || line[0] == '#' || line[0] == ';' {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			continue
		}
		k, v = strings.TrimSpace(k), strings.TrimSpace(v)
		switch k {
		case "KillUserProcesses":
			if b, ok := parseSystemdBool(v); ok {
				c.killUserProcesses = &b
			}
		case "KillOnlyUsers":
			c.killOnlyUsers = strings.Fields(v)
		case "KillExcludeUsers":
			c.killExcludeUsers = strings.Fields(v)
		}
	}
}

func parseSystemdBool(s string) (bool, bool) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "1", "yes", "y", "true", "t", "on":
		return true, true
	case "0", "no", "n", "false", "f", "off":
		return false, true
	}
	return false, false
}

// readCgroupScope classifies the systemd cgroup path of /proc/self/cgroup:
// the name=systemd hierarchy under cgroup v1 or hybrid, else the unified
// "0::" line.
func readCgroupScope(path string, uid int) cgroupScope {
	b, err := os.ReadFile(path)
	if err != nil {
		return scopeOther
	}
	var unified, named string
	for _, line := range strings.Split(string(b), "\n") {
		parts := strings.SplitN(line, ":", 3)
		if len(parts) != 3 {
			continue
		}
		switch {
		case parts[1] == "name=systemd":
			named = parts[2]
		case parts[0] == "0" && parts[1] == "":
			unified = parts[2]
		}
	}
	cg := named
	if cg == "" {
		cg = unified
	}
	manager := "user@" + strconv.Itoa(uid) + ".service"
	for _, c := range strings.Split(cg, "/") {
		switch {
		case strings.HasPrefix(c, "session-") && strings.HasSuffix(c, ".scope"):
			return scopeSession
		case c == manager:
			return scopeUserManager
		}
	}
	return scopeOther
}

func currentUserName() (string, error) {
	u, err := user.Current()
	if err != nil {
		return os.Getenv("USER"), err
	}
	return u.Username, nil
}

func isDir(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.IsDir()
}
