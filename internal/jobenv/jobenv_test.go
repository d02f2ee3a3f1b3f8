package jobenv

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func mapEnv(m map[string]string) func(string) (string, bool) {
	return func(k string) (string, bool) { v, ok := m[k]; return v, ok }
}

func TestDetectJob(t *testing.T) {
	ad := filepath.Join(t.TempDir(), ".job.ad")
	require.NoError(t, os.WriteFile(ad, []byte("ClusterId = 812\nProcId = 3\nGlobalJobId = \"submit.example.edu#812.3#1700000000\"\nOwner = \"alice\"\n"), 0o600))
	badAd := filepath.Join(t.TempDir(), "missing.ad")

	for _, tc := range []struct {
		name string
		env  map[string]string
		want JobInfo
	}{
		{"none", nil, JobInfo{}},
		{"slurm batch", map[string]string{"SLURM_JOB_ID": "1234", "SLURMD_NODENAME": "node7", "SLURM_SUBMIT_HOST": "login1", "SLURM_TASK_PID": "4321", "SLURM_TMPDIR": "/local/1234"},
			JobInfo{InJob: true, Scheduler: SchedulerSlurm, JobID: "1234", SubmitHost: "login1", TmpDir: "/local/1234", ScriptPID: 4321}},
		{"slurm step (srun)", map[string]string{"SLURM_JOB_ID": "1234", "SLURM_STEP_ID": "0", "SLURM_SUBMIT_HOST": "login1"},
			JobInfo{InJob: true, Scheduler: SchedulerSlurm, JobID: "1234", SubmitHost: "login1"}},
		{"slurm old SLURM_JOBID", map[string]string{"SLURM_JOBID": "77", "SLURMD_NODENAME": "n1"},
			JobInfo{InJob: true, Scheduler: SchedulerSlurm, JobID: "77"}},
		{"salloc shell on the login node", map[string]string{"SLURM_JOB_ID": "1234", "SLURM_SUBMIT_HOST": "login1", "SLURM_JOB_NODELIST": "node7"},
			JobInfo{InJob: false, Scheduler: SchedulerSlurm, JobID: "1234", SubmitHost: "login1"}},
		{"pbs batch", map[string]string{"PBS_JOBID": "99.pbs01", "PBS_ENVIRONMENT": "PBS_BATCH", "PBS_O_HOST": "login2", "TMPDIR": "/var/tmp/pbs.99"},
			JobInfo{InJob: true, Scheduler: SchedulerPBS, JobID: "99.pbs01", SubmitHost: "login2", TmpDir: "/var/tmp/pbs.99"}},
		{"pbs interactive", map[string]string{"PBS_JOBID": "99.pbs01", "PBS_ENVIRONMENT": "PBS_INTERACTIVE", "PBS_O_HOST": "login2"},
			JobInfo{InJob: true, Scheduler: SchedulerPBS, JobID: "99.pbs01", SubmitHost: "login2"}},
		{"torque without PBS_ENVIRONMENT", map[string]string{"PBS_JOBID": "5.torque"},
			JobInfo{InJob: true, Scheduler: SchedulerPBS, JobID: "5.torque"}},
		{"pbs odd environment", map[string]string{"PBS_JOBID": "5", "PBS_ENVIRONMENT": "SOMETHING"},
			JobInfo{InJob: false, Scheduler: SchedulerPBS, JobID: "5"}},
		{"lsf", map[string]string{"LSB_JOBID": "314", "LSB_SUB_HOST": "login3", "LSB_JOB_TMPDIR": "/tmp/314.tmpdir"},
			JobInfo{InJob: true, Scheduler: SchedulerLSF, JobID: "314", SubmitHost: "login3", TmpDir: "/tmp/314.tmpdir"}},
		{"sge", map[string]string{"JOB_ID": "42", "SGE_O_HOST": "login4", "TMPDIR": "/tmp/42.1.all.q", "SGE_TASK_ID": "undefined"},
			JobInfo{InJob: true, Scheduler: SchedulerSGE, JobID: "42", SubmitHost: "login4", TmpDir: "/tmp/42.1.all.q"}},
		{"sge array task", map[string]string{"JOB_ID": "42", "SGE_O_HOST": "login4", "SGE_TASK_ID": "7"},
			JobInfo{InJob: true, Scheduler: SchedulerSGE, JobID: "42.7", SubmitHost: "login4"}},
		{"JOB_ID alone is not SGE", map[string]string{"JOB_ID": "42"}, JobInfo{}},
		{"htcondor", map[string]string{"_CONDOR_JOB_AD": ad, "_CONDOR_SCRATCH_DIR": "/var/lib/condor/execute/dir_1"},
			JobInfo{InJob: true, Scheduler: SchedulerHTCondor, JobID: "812.3", SubmitHost: "submit.example.edu", TmpDir: "/var/lib/condor/execute/dir_1"}},
		{"htcondor unreadable ad", map[string]string{"_CONDOR_JOB_AD": badAd},
			JobInfo{InJob: true, Scheduler: SchedulerHTCondor}},
		{"flux", map[string]string{"FLUX_JOB_ID": "f2345", "FLUX_JOB_TMPDIR": "/tmp/flux-f2345"},
			JobInfo{InJob: true, Scheduler: SchedulerFlux, JobID: "f2345", TmpDir: "/tmp/flux-f2345"}},
		{"flux inside slurm: innermost wins", map[string]string{"FLUX_JOB_ID": "f1", "SLURM_JOB_ID": "9", "SLURMD_NODENAME": "n"},
			JobInfo{InJob: true, Scheduler: SchedulerFlux, JobID: "f1"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			assert.Equal(t, tc.want, FromEnv(mapEnv(tc.env)))
		})
	}
}

func TestNodeTmpDir(t *testing.T) {
	exists := map[string]bool{}
	isDir := func(p string) bool { return exists[p] }
	for _, d := range []string{"/slurm", "/pbsjob", "/lsf", "/flux", "/condor", "/tmpdir"} {
		exists[d] = true
	}
	for _, tc := range []struct {
		name string
		env  map[string]string
		want string
	}{
		{"default", nil, "/tmp"},
		{"TMPDIR", map[string]string{"TMPDIR": "/tmpdir"}, "/tmpdir"},
		{"TMPDIR missing on this node", map[string]string{"TMPDIR": "/login-node-only"}, "/tmp"},
		{"relative TMPDIR ignored", map[string]string{"TMPDIR": "tmpdir"}, "/tmp"},
		{"explicit override first, even before it exists", map[string]string{EnvTmpDir: "/mine/", "SLURM_TMPDIR": "/slurm"}, "/mine"},
		{"SLURM_TMPDIR", map[string]string{"SLURM_TMPDIR": "/slurm", "TMPDIR": "/tmpdir", "LSB_JOB_TMPDIR": "/lsf"}, "/slurm"},
		{"per-job TMPDIR in PBS beats the rest", map[string]string{"PBS_JOBID": "1", "TMPDIR": "/pbsjob", "FLUX_JOB_TMPDIR": "/flux"}, "/pbsjob"},
		{"per-job TMPDIR in SGE", map[string]string{"JOB_ID": "1", "SGE_O_HOST": "l", "TMPDIR": "/pbsjob", "_CONDOR_SCRATCH_DIR": "/condor"}, "/pbsjob"},
		{"LSB_JOB_TMPDIR before TMPDIR", map[string]string{"LSB_JOBID": "1", "LSB_JOB_TMPDIR": "/lsf", "TMPDIR": "/tmpdir"}, "/lsf"},
		{"FLUX_JOB_TMPDIR", map[string]string{"FLUX_JOB_TMPDIR": "/flux", "TMPDIR": "/tmpdir"}, "/flux"},
		{"_CONDOR_SCRATCH_DIR", map[string]string{"_CONDOR_SCRATCH_DIR": "/condor", "TMPDIR": "/tmpdir"}, "/condor"},
		{"slurm job: TMPDIR is the submitter's", map[string]string{"SLURM_JOB_ID": "1", "SLURMD_NODENAME": "n", "TMPDIR": "/login-node-only"}, "/tmp"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			assert.Equal(t, tc.want, TmpDirFrom(mapEnv(tc.env), isDir))
		})
	}
}
