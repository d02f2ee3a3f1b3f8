package hpcproxy

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"

	"github.com/hpcproxy/hpcproxy/internal/jobenv"
)

// TestCheckLogoutFixtures checks every row of checkLogout's table against
// file trees under testdata/logind, for user alice (uid 1000).
func TestCheckLogoutFixtures(t *testing.T) {
	slurmJob := jobenv.JobInfo{InJob: true, Scheduler: jobenv.SchedulerSlurm, JobID: "5"}
	for _, tc := range []struct {
		fixture  string
		job      jobenv.JobInfo
		survives bool
		kill     bool
		linger   bool
		scope    cgroupScope
		reason   string
	}{
		{"nosystemd", jobenv.JobInfo{}, true, true, false, scopeSession, "systemd is not running"},
		{"default-no", jobenv.JobInfo{}, true, false, true, scopeSession, "KillUserProcesses=no"},
		{"default-yes", jobenv.JobInfo{}, false, true, false, scopeSession, "lingering or not"},
		{"session-linger", jobenv.JobInfo{}, false, true, true, scopeSession, "lingering or not"},
		{"manager-linger", jobenv.JobInfo{}, true, true, true, scopeUserManager, "lingering keeps up"},
		{"manager-nolinger", jobenv.JobInfo{}, false, true, false, scopeUserManager, "enable-linger"},
		// KillUserProcesses=no does not keep user@UID.service up: only
		// lingering does.
		{"manager-nolinger-killno", jobenv.JobInfo{}, false, false, false, scopeUserManager, "enable-linger"},
		{"dropins-last-wins", jobenv.JobInfo{}, false, true, false, scopeSession, "lingering or not"},
		{"dropins-etc-masks", jobenv.JobInfo{}, true, false, false, scopeSession, "KillUserProcesses=no"},
		{"excluded", jobenv.JobInfo{}, true, false, false, scopeSession, "KillUserProcesses=no"},
		{"kill-only-others", jobenv.JobInfo{}, true, false, false, scopeSession, "KillUserProcesses=no"},
		// KillOnlyUsers overrides KillUserProcesses=no for the users it
		// lists (logind.conf(5)).
		{"kill-only-alice", jobenv.JobInfo{}, false, true, false, scopeSession, "lingering or not"},
		{"slurm-job", slurmJob, true, true, false, scopeOther, "ends with the job"},
		{"cgroup-v1", jobenv.JobInfo{}, false, true, false, scopeSession, "lingering or not"},
		{"usrlib-main", jobenv.JobInfo{}, false, true, false, scopeSession, "lingering or not"},
	} {
		t.Run(tc.fixture, func(t *testing.T) {
			r := checkLogout(filepath.Join("testdata", "logind", tc.fixture), "alice", 1000, tc.job)
			assert.Equal(t, tc.survives, r.Survives, "Survives (%s)", r.Reason)
			assert.Equal(t, tc.kill, r.KillUserProcesses, "KillUserProcesses")
			assert.Equal(t, tc.linger, r.Linger, "Linger")
			assert.Equal(t, tc.scope, r.Scope, "Scope")
			assert.Contains(t, r.Reason, tc.reason)
		})
	}
}

func TestCheckLogoutWrongUID(t *testing.T) {
	// user@1000.service is alice's manager, not uid 1001's.
	r := checkLogout(filepath.Join("testdata", "logind", "manager-linger"), "alice", 1001, jobenv.JobInfo{})
	assert.Equal(t, scopeOther, r.Scope)
}

func TestWillSurviveLogoutHere(t *testing.T) {
	// Whatever this machine is, the answers agree with each other.
	name, _ := currentUserName()
	r := checkLogout("/", name, os.Getuid(), jobenv.Detect())
	s, k, l := WillSurviveLogout()
	assert.Equal(t, r.Survives, s)
	assert.Equal(t, r.KillUserProcesses, k)
	assert.Equal(t, r.Linger, l)
	assert.NotEmpty(t, r.Reason)
}
