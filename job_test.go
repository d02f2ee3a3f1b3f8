package hpcproxy

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/hpcproxy/hpcproxy/internal/shellenv"
)

// jobEnvVars are every variable job detection and the tmp-dir chain read.
var jobEnvVars = []string{
	"SLURM_JOB_ID", "SLURM_JOBID", "SLURMD_NODENAME", "SLURM_STEP_ID", "SLURM_SUBMIT_HOST", "SLURM_TMPDIR", "SLURM_TASK_PID",
	"PBS_JOBID", "PBS_ENVIRONMENT", "PBS_O_HOST",
	"LSB_JOBID", "LSB_SUB_HOST", "LSB_JOB_TMPDIR",
	"JOB_ID", "SGE_O_HOST", "SGE_TASK_ID",
	"_CONDOR_JOB_AD", "_CONDOR_SCRATCH_DIR",
	"FLUX_JOB_ID", "FLUX_JOB_TMPDIR",
	"TMPDIR", EnvTmpDir, EnvVia,
}

// clearJobEnv unsets, for the test, every variable that job detection
// reads, so the machine's own environment cannot leak in.
func clearJobEnv(t *testing.T) {
	t.Helper()
	for _, k := range jobEnvVars {
		if v, ok := os.LookupEnv(k); ok {
			t.Setenv(k, v) // restores it afterwards
			os.Unsetenv(k)
		}
	}
}

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
			assert.Equal(t, tc.want, detectJob(mapEnv(tc.env)))
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
			assert.Equal(t, tc.want, nodeTmpDir(mapEnv(tc.env), isDir))
		})
	}
}

func TestResolveViaHost(t *testing.T) {
	for _, tc := range []struct {
		name    string
		flag    string
		env     map[string]string
		want    string
		wantErr error
	}{
		{"flag", "login9", map[string]string{EnvVia: "login2", "SLURM_SUBMIT_HOST": "login1", "SLURM_JOB_ID": "1"}, "login9", nil},
		{"HPCPROXY_VIA", "", map[string]string{EnvVia: "alice@login2", "SLURM_SUBMIT_HOST": "login1", "SLURM_JOB_ID": "1"}, "alice@login2", nil},
		{"submit host", "", map[string]string{"SLURM_SUBMIT_HOST": "login1", "SLURM_JOB_ID": "1", "SLURMD_NODENAME": "n"}, "login1", nil},
		{"pbs submit host", "", map[string]string{"PBS_JOBID": "1", "PBS_O_HOST": "pbslogin"}, "pbslogin", nil},
		{"nothing", "", nil, "", ErrNoViaHost},
		{"flux has no submit host", "", map[string]string{"FLUX_JOB_ID": "f1"}, "", ErrNoViaHost},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := resolveViaHost(tc.flag, mapEnv(tc.env))
			assert.Equal(t, tc.want, got)
			assert.ErrorIs(t, err, tc.wantErr)
		})
	}
	assert.Contains(t, ErrNoViaHost.Error(), EnvVia)
	assert.NotContains(t, ErrNoViaHost.Error(), "--", "a library error speaks of functions and variables, not flags")
}

func TestFindActiveProxy(t *testing.T) {
	clearJobEnv(t)
	t.Setenv(EnvStateDir, filepath.Join(t.TempDir(), "shared"))
	t.Setenv(EnvTmpDir, filepath.Join(t.TempDir(), "local"))
	_, ok := FindActiveProxy()
	assert.False(t, ok, "no state files")

	port := listenPort(t)
	creds := &ProxyCredentials{User: credentialsUser, Token: "sharedtok"}
	// The shared proxy runs on a login node; here it answers on loopback.
	require.NoError(t, WritePidFileAt(PidFilePath(), ProxyState{Host: "login1", AdvertiseHost: "127.0.0.1", Port: port, PID: 5, Mode: ModeShared, Status: StatusUp, Credentials: creds}))
	u, ok := FindActiveProxy()
	require.True(t, ok)
	assert.Equal(t, "http://hpcproxy:sharedtok@127.0.0.1:"+strconv.Itoa(port), u)

	// A per-job proxy that is still starting is not used yet.
	local := ProxyState{Host: thisHost(), Port: port, PID: os.Getpid(), Mode: ModePerJob, Status: StatusStarting, Credentials: &ProxyCredentials{User: credentialsUser, Token: "jobtok"}}
	require.NoError(t, WritePidFileAt(LocalPidFilePath(), local))
	u, _ = FindActiveProxy()
	assert.Contains(t, u, "sharedtok")

	// Once up, the per-job proxy comes first.
	local.Status = StatusUp
	require.NoError(t, WritePidFileAt(LocalPidFilePath(), local))
	u, ok = FindActiveProxy()
	require.True(t, ok)
	assert.Equal(t, "http://hpcproxy:jobtok@127.0.0.1:"+strconv.Itoa(port), u)

	// A dead per-job daemon's file is skipped (and left for the daemon
	// tooling to clean).
	local.PID = deadPID(t)
	require.NoError(t, WritePidFileAt(LocalPidFilePath(), local))
	u, _ = FindActiveProxy()
	assert.Contains(t, u, "sharedtok")
	_, err := os.Stat(LocalPidFilePath())
	assert.NoError(t, err)
}

func TestRemoteStartArgs(t *testing.T) {
	r := remoteStart{SSHOptions: []string{"ConnectTimeout=5"}, Command: []string{"/opt/hpc proxy/bin/hpcproxy", "start"}}
	bin, args, err := r.sshArgs("login1", "alice@gw", 8080)
	require.NoError(t, err)
	assert.Equal(t, "ssh", bin)
	assert.Equal(t, []string{
		"-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "--", "login1",
		"'/opt/hpc proxy/bin/hpcproxy' start --via alice@gw --port 8080",
	}, args)

	r = remoteStart{SSHBinary: "/usr/bin/ssh"}
	bin, args, err = r.sshArgs("login1", "", 0)
	require.NoError(t, err)
	assert.Equal(t, "/usr/bin/ssh", bin)
	exe, _ := os.Executable()
	assert.Equal(t, shellenv.Quote(exe)+" start", args[len(args)-1])

	for _, bad := range []string{"", "-oProxyCommand=x", "a b"} {
		_, _, err := r.sshArgs(bad, "", 0)
		assert.Error(t, err, "host %q", bad)
	}
}

func TestRemoteStartRun(t *testing.T) {
	// A fake ssh that records its arguments and "starts" a proxy by
	// writing the state file, as the real start command would.
	dir := t.TempDir()
	state := filepath.Join(dir, "state", "proxy.json")
	port := listenPort(t)
	require.NoError(t, WritePidFileAt(state, ProxyState{Host: "login1", AdvertiseHost: "127.0.0.1", Port: port, PID: 1, Status: StatusUp}))
	fake := filepath.Join(dir, "ssh")
	require.NoError(t, os.WriteFile(fake, []byte("#!/bin/sh\necho \"$@\" > "+shellenv.Quote(filepath.Join(dir, "args"))+"\n"), 0o700))
	r := remoteStart{SSHBinary: fake, Command: []string{"hpcproxy", "start"}, StateFile: state}
	require.NoError(t, r.Run(t.Context(), "login1", "", 0))
	b, _ := os.ReadFile(filepath.Join(dir, "args"))
	assert.Equal(t, "-o BatchMode=yes -- login1 hpcproxy start\n", string(b))

	failing := filepath.Join(dir, "ssh-fail")
	require.NoError(t, os.WriteFile(failing, []byte("#!/bin/sh\necho 'Permission denied (publickey).' >&2\nexit 255\n"), 0o700))
	r.SSHBinary = failing
	err := r.Run(t.Context(), "login1", "", 0)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "Permission denied")

	r.SSHBinary = fake
	r.StateFile = filepath.Join(dir, "never.json")
	r.Wait = 300 * time.Millisecond
	err = r.Run(t.Context(), "login1", "", 0)
	require.Error(t, err)
	assert.False(t, errors.Is(err, ErrAlreadyRunning))
	assert.Contains(t, err.Error(), "no answering proxy")
}

func TestWatchPID(t *testing.T) {
	cmd := exec.Command("sleep", "30")
	require.NoError(t, cmd.Start())
	ch := watchPID(t.Context(), cmd.Process.Pid, 20*time.Millisecond)
	select {
	case <-ch:
		t.Fatal("fired while the process runs")
	case <-time.After(100 * time.Millisecond):
	}
	cmd.Process.Kill()
	cmd.Wait()
	select {
	case <-ch:
	case <-time.After(5 * time.Second):
		t.Fatal("did not fire after the process exited")
	}

	// Already gone, and a cancelled context.
	select {
	case <-watchPID(t.Context(), deadPID(t), 20*time.Millisecond):
	case <-time.After(5 * time.Second):
		t.Fatal("dead pid not noticed")
	}
	ctx, cancel := context.WithCancel(t.Context())
	ch = watchPID(ctx, os.Getpid(), time.Hour)
	cancel()
	select {
	case <-ch:
	case <-time.After(5 * time.Second):
		t.Fatal("cancel did not end the watch")
	}
}

func init() {
	// getjobproxy: print GetJobProxy's answer twice (cached).
	helpers["getjobproxy"] = func() int {
		u, ok := GetJobProxy()
		fmt.Println(u, ok)
		os.Remove(PidFilePath()) // the cache must not notice
		u, ok = GetJobProxy()
		fmt.Println(u, ok)
		return 0
	}
}

func TestGetJobProxy(t *testing.T) {
	stateDir := filepath.Join(t.TempDir(), "shared")
	port := listenPort(t)
	want := "http://hpcproxy:tok@127.0.0.1:" + strconv.Itoa(port)
	base := []string{EnvStateDir + "=" + stateDir, EnvTmpDir + "=" + t.TempDir()}
	for _, tc := range []struct {
		name string
		env  []string
		want string
	}{
		{"login node", nil, " false\n false\n"},
		{"salloc shell on the login node", []string{"SLURM_JOB_ID=5"}, " false\n false\n"},
		{"in a job", []string{"SLURM_JOB_ID=5", "SLURMD_NODENAME=node1"}, want + " true\n" + want + " true\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			require.NoError(t, WritePidFileAt(filepath.Join(stateDir, "proxy.json"), ProxyState{
				Host: "login1", AdvertiseHost: "127.0.0.1", Port: port, PID: 1, Mode: ModeShared, Status: StatusUp,
				Credentials: &ProxyCredentials{User: credentialsUser, Token: "tok"},
			}))
			cmd := helperCommand("getjobproxy")
			var env []string
			for _, kv := range cmd.Env {
				k, _, _ := strings.Cut(kv, "=")
				if !slices.Contains(jobEnvVars, k) {
					env = append(env, kv)
				}
			}
			cmd.Env = append(append(env, base...), tc.env...)
			out, err := cmd.Output()
			require.NoError(t, err)
			assert.Equal(t, tc.want, string(out))
		})
	}
}
