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
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/hpcproxy/hpcproxy/internal/daemonproc"
	"github.com/hpcproxy/hpcproxy/internal/jobenv"
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

// TestEnvTmpDirShared: the root package and internal/jobenv name the
// same variable.
func TestEnvTmpDirShared(t *testing.T) {
	assert.Equal(t, EnvTmpDir, jobenv.EnvTmpDir)
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

	// Exited and not reaped (a zombie): gone too.
	zombie := exec.Command("true")
	require.NoError(t, zombie.Start())
	defer zombie.Wait()
	require.Eventually(t, func() bool { return !daemonproc.PIDAlive(zombie.Process.Pid) }, 5*time.Second, 10*time.Millisecond)
	select {
	case <-watchPID(t.Context(), zombie.Process.Pid, 20*time.Millisecond):
	case <-time.After(5 * time.Second):
		t.Fatal("a zombie is taken for a live process")
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

// TestWatchPidfd: a node daemon's watch of an attached job's process (a
// pidfd) fires when that process exits and not before, even when a signal
// interrupts its check (poll's EINTR detached jobs in CI); a cancelled
// context ends it.
func TestWatchPidfd(t *testing.T) {
	cmd := exec.Command("sleep", "30")
	require.NoError(t, cmd.Start())
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	open := func(pid int) *os.File {
		fd, err := unix.PidfdOpen(pid, 0)
		require.NoError(t, err)
		require.NoError(t, unix.SetNonblock(fd, true))
		f := os.NewFile(uintptr(fd), "pidfd")
		t.Cleanup(func() { f.Close() })
		return f
	}

	// Many watches start while signals keep arriving, as in a busy
	// daemon (the runtime's preemption signal, SIGURG, is the usual one).
	stop := make(chan struct{})
	var flood sync.WaitGroup
	flood.Add(1)
	go func() {
		defer flood.Done()
		for {
			select {
			case <-stop:
				return
			default:
				_ = syscall.Kill(os.Getpid(), syscall.SIGURG)
			}
		}
	}()
	ctx, cancel := context.WithCancel(t.Context())
	var chs []<-chan struct{}
	for range 2000 {
		chs = append(chs, watchPidfd(ctx, open(cmd.Process.Pid)))
	}
	close(stop)
	flood.Wait()
	time.Sleep(100 * time.Millisecond)
	fired := 0
	for _, ch := range chs {
		select {
		case <-ch:
			fired++
		default:
		}
	}
	assert.Zero(t, fired, "watches fired while the process runs")

	// The process's exit fires them.
	_ = cmd.Process.Kill()
	_ = cmd.Wait()
	for i, ch := range chs[:50] {
		select {
		case <-ch:
		case <-time.After(5 * time.Second):
			t.Fatalf("watch %d did not fire after the process exited", i)
		}
	}
	cancel()

	// A cancelled context ends a watch of a live process.
	live := exec.Command("sleep", "30")
	require.NoError(t, live.Start())
	t.Cleanup(func() { _ = live.Process.Kill(); _ = live.Wait() })
	ctx, cancel = context.WithCancel(t.Context())
	ch := watchPidfd(ctx, open(live.Process.Pid))
	cancel()
	select {
	case <-ch:
	case <-time.After(5 * time.Second):
		t.Fatal("cancel did not end the watch")
	}
}
