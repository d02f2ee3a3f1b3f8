package hpcproxy

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hpcproxy/hpcproxy/internal/shellenv"
)

// Scheduler names a batch system.
type Scheduler string

// The batch systems DetectJob knows.
const (
	SchedulerSlurm    Scheduler = "slurm"
	SchedulerPBS      Scheduler = "pbs" // PBS Pro, OpenPBS, Torque
	SchedulerLSF      Scheduler = "lsf"
	SchedulerSGE      Scheduler = "sge" // SGE, UGE, OGS
	SchedulerHTCondor Scheduler = "htcondor"
	SchedulerFlux     Scheduler = "flux"
)

// JobInfo describes the batch job the process runs in, if any.
type JobInfo struct {
	// InJob reports whether the process runs inside a job on a compute
	// node. An allocation shell on a login node (Slurm's salloc without an
	// interactive step) is not a job in this sense.
	InJob bool
	// Scheduler is the batch system; set whenever one is recognised.
	Scheduler Scheduler
	// JobID is the scheduler's job ID ("1234", "1234.pbs01", "12.0").
	JobID string
	// SubmitHost is where the job was submitted: usually a login node,
	// the default SSH destination for a per-job tunnel. Empty where the
	// scheduler does not say (Flux). A job submitted from inside another
	// job names a compute node here.
	SubmitHost string
	// TmpDir is the scheduler's per-job node-local tmp dir, if it sets one.
	TmpDir string
	// ScriptPID is the PID of the job script where the scheduler exports
	// it (Slurm's SLURM_TASK_PID), else 0. A daemon can watch it to end
	// with the job even where the scheduler does not track detached
	// processes.
	ScriptPID int
}

// DetectJob reports the job this process runs in, from its environment.
// The rules, checked in this order (Flux first because it nests inside the
// others):
//
//   - Flux: FLUX_JOB_ID. Tmp dir FLUX_JOB_TMPDIR.
//   - Slurm: SLURM_JOB_ID (or SLURM_JOBID) and one of SLURMD_NODENAME or
//     SLURM_STEP_ID, which only slurmd sets: salloc exports SLURM_JOB_ID
//     into a shell on the login node, which is no compute-node job. Submit
//     host SLURM_SUBMIT_HOST, tmp dir SLURM_TMPDIR (a site convention),
//     script PID SLURM_TASK_PID.
//   - PBS Pro / Torque: PBS_JOBID, unless PBS_ENVIRONMENT says otherwise
//     than PBS_BATCH or PBS_INTERACTIVE (qsub -I runs on the compute node).
//     Submit host PBS_O_HOST, tmp dir TMPDIR (per job where configured).
//   - LSF: LSB_JOBID. Submit host LSB_SUB_HOST, tmp dir LSB_JOB_TMPDIR.
//   - SGE/UGE: JOB_ID and SGE_O_HOST (JOB_ID alone is too common a name).
//     Tmp dir TMPDIR (per job).
//   - HTCondor: _CONDOR_JOB_AD. The job ID (ClusterId.ProcId) and the
//     submit host (the schedd in GlobalJobId) come from that job ad file;
//     tmp dir _CONDOR_SCRATCH_DIR.
func DetectJob() JobInfo { return detectJob(os.LookupEnv) }

func detectJob(env func(string) (string, bool)) JobInfo {
	get := func(k string) string { v, _ := env(k); return v }
	has := func(k string) bool { v, ok := env(k); return ok && v != "" }

	if has("FLUX_JOB_ID") {
		return JobInfo{InJob: true, Scheduler: SchedulerFlux, JobID: get("FLUX_JOB_ID"), TmpDir: get("FLUX_JOB_TMPDIR")}
	}
	if id := firstOf(get("SLURM_JOB_ID"), get("SLURM_JOBID")); id != "" {
		j := JobInfo{
			Scheduler:  SchedulerSlurm,
			JobID:      id,
			SubmitHost: get("SLURM_SUBMIT_HOST"),
			TmpDir:     get("SLURM_TMPDIR"),
			InJob:      has("SLURMD_NODENAME") || has("SLURM_STEP_ID"),
		}
		if j.InJob {
			j.ScriptPID, _ = strconv.Atoi(get("SLURM_TASK_PID"))
		}
		return j
	}
	if id := get("PBS_JOBID"); id != "" {
		pe := get("PBS_ENVIRONMENT")
		return JobInfo{
			Scheduler:  SchedulerPBS,
			JobID:      id,
			SubmitHost: get("PBS_O_HOST"),
			TmpDir:     get("TMPDIR"),
			InJob:      pe == "" || pe == "PBS_BATCH" || pe == "PBS_INTERACTIVE",
		}
	}
	if id := get("LSB_JOBID"); id != "" {
		return JobInfo{InJob: true, Scheduler: SchedulerLSF, JobID: id, SubmitHost: get("LSB_SUB_HOST"), TmpDir: get("LSB_JOB_TMPDIR")}
	}
	if id := get("JOB_ID"); id != "" && has("SGE_O_HOST") {
		j := JobInfo{InJob: true, Scheduler: SchedulerSGE, JobID: id, SubmitHost: get("SGE_O_HOST"), TmpDir: get("TMPDIR")}
		if t := get("SGE_TASK_ID"); t != "" && t != "undefined" {
			j.JobID += "." + t
		}
		return j
	}
	if ad := get("_CONDOR_JOB_AD"); ad != "" {
		j := JobInfo{InJob: true, Scheduler: SchedulerHTCondor, TmpDir: get("_CONDOR_SCRATCH_DIR")}
		j.JobID, j.SubmitHost = readCondorJobAd(ad)
		return j
	}
	return JobInfo{}
}

func firstOf(vs ...string) string {
	for _, v := range vs {
		if v != "" {
			return v
		}
	}
	return ""
}

// readCondorJobAd extracts ClusterId.ProcId and the schedd name from
// GlobalJobId ("schedd#cluster.proc#time") of an HTCondor job ad. Missing
// or odd files give empty strings: the job is still a job.
func readCondorJobAd(path string) (jobID, submitHost string) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", ""
	}
	attrs := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), "=")
		if !ok {
			continue
		}
		attrs[strings.ToLower(strings.TrimSpace(k))] = strings.Trim(strings.TrimSpace(v), `"`)
	}
	if c := attrs["clusterid"]; c != "" {
		jobID = c + "." + firstOf(attrs["procid"], "0")
	}
	if g := attrs["globaljobid"]; g != "" {
		parts := strings.Split(g, "#")
		if jobID == "" && len(parts) > 1 {
			jobID = parts[1]
		}
		// A schedd name may carry a prefix ("name@host"); the host is last.
		s := parts[0]
		if i := strings.LastIndex(s, "@"); i >= 0 {
			s = s[i+1:]
		}
		submitHost = s
	}
	return jobID, submitHost
}

// localTmpDir returns the node-local tmp dir for per-job state, the first
// of this chain that is an absolute path to an existing directory:
//
//  1. $HPCPROXY_TMPDIR (an explicit choice: taken even if it does not
//     exist yet, as long as it is absolute)
//  2. $SLURM_TMPDIR
//  3. $TMPDIR inside a PBS or SGE job (set per job by those schedulers)
//  4. $LSB_JOB_TMPDIR
//  5. $FLUX_JOB_TMPDIR
//  6. $_CONDOR_SCRATCH_DIR
//  7. $TMPDIR (Slurm passes the submitter's through unchecked, hence
//     the existence check)
//  8. /tmp
func localTmpDir() string { return nodeTmpDir(os.LookupEnv, isDir) }

func isDir(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.IsDir()
}

func nodeTmpDir(env func(string) (string, bool), isDir func(string) bool) string {
	get := func(k string) string { v, _ := env(k); return v }
	if d := get(EnvTmpDir); filepath.IsAbs(d) {
		return filepath.Clean(d)
	}
	var perJobTMPDIR string
	if j := detectJob(env); j.InJob && (j.Scheduler == SchedulerPBS || j.Scheduler == SchedulerSGE) {
		perJobTMPDIR = get("TMPDIR")
	}
	for _, d := range []string{
		get("SLURM_TMPDIR"),
		perJobTMPDIR,
		get("LSB_JOB_TMPDIR"),
		get("FLUX_JOB_TMPDIR"),
		get("_CONDOR_SCRATCH_DIR"),
		get("TMPDIR"),
	} {
		if filepath.IsAbs(d) && isDir(d) {
			return filepath.Clean(d)
		}
	}
	return "/tmp"
}

var jobProxy struct {
	once sync.Once
	url  string
	ok   bool
}

// GetJobProxy returns the proxy URL (with credentials) for programs that
// run inside a scheduler job, found with FindActiveProxy. Outside a job,
// on login nodes, which reach the internet themselves, it returns "",
// false. The result is computed once per process.
func GetJobProxy() (string, bool) {
	jobProxy.once.Do(func() {
		if !DetectJob().InJob {
			return
		}
		jobProxy.url, jobProxy.ok = FindActiveProxy()
	})
	return jobProxy.url, jobProxy.ok
}

// FindActiveProxy returns the URL of a proxy this process can use,
// http://hpcproxy:TOKEN@host:port: this job's per-job proxy if it answers,
// else the user's shared proxy if it answers. See FindActiveProxyState.
func FindActiveProxy() (string, bool) {
	ps, ok := FindActiveProxyState()
	if !ok {
		return "", false
	}
	return ps.URL("http"), true
}

// FindActiveProxyState is FindActiveProxy returning the whole state, for
// callers that want the SOCKS URL or the credentials (ProxyEnvListFor).
// State files that are unreadable, unsafe or stale are skipped, never
// removed.
func FindActiveProxyState() (*ProxyState, bool) {
	return findActive(LocalPidFilePath(), PidFilePath())
}

func findActive(paths ...string) (*ProxyState, bool) {
	for _, p := range paths {
		ps, err := ReadPidFileAt(p)
		if err != nil {
			continue
		}
		if ps.Status == StatusStarting {
			continue
		}
		if CheckState(ps).Usable() {
			return ps, true
		}
	}
	return nil, false
}

// EnvVia names the environment variable that ResolveViaHost consults after
// the flag.
const EnvVia = "HPCPROXY_VIA"

// ErrNoViaHost is returned by ResolveViaHost when nothing names a login
// node: no argument, no $HPCPROXY_VIA and no submit host. A command line
// translates it into its own flag's hint.
var ErrNoViaHost = errors.New("hpcproxy: no login node: none given, " + EnvVia + " unset, and no submit host known")

// ResolveViaHost returns the SSH destination for a per-job tunnel: flagVia
// if set, else $HPCPROXY_VIA, else the host the job was submitted from
// (JobInfo.SubmitHost). If none is known, the error is ErrNoViaHost.
func ResolveViaHost(flagVia string) (string, error) {
	return resolveViaHost(flagVia, os.LookupEnv)
}

func resolveViaHost(flagVia string, env func(string) (string, bool)) (string, error) {
	if flagVia != "" {
		return flagVia, nil
	}
	if v, _ := env(EnvVia); v != "" {
		return v, nil
	}
	if j := detectJob(env); j.SubmitHost != "" {
		return j.SubmitHost, nil
	}
	return "", ErrNoViaHost
}

// proxyAlive reports whether something accepts TCP connections at
// host:port within 500 ms.
func proxyAlive(host string, port int) bool {
	c, err := net.DialTimeout("tcp", net.JoinHostPort(host, strconv.Itoa(port)), 500*time.Millisecond)
	if err != nil {
		return false
	}
	c.Close()
	return true
}

// remoteStart starts a shared proxy on another node over SSH, the way
// StartOnNode does, with its parts configurable.
type remoteStart struct {
	// SSHBinary optionally specifies the ssh client. If empty, "ssh".
	SSHBinary string
	// SSHOptions optionally adds ssh_config options ("Key=Value") given as
	// -o. BatchMode=yes is always given: nothing may prompt.
	SSHOptions []string
	// Command optionally specifies the remote command, to which
	// "--via VIA" (if via is set) and "--port N" (if port > 0) are
	// appended. If empty, it is this program (os.Executable(), which on a
	// cluster's shared file system has the same path on the other node)
	// with the argument "start".
	Command []string
	// StateFile optionally specifies the state file to wait for. If
	// empty, PidFilePath().
	StateFile string
	// Wait optionally bounds the wait for the state file to show an
	// answering proxy after ssh returned. If zero, 10 seconds (NFS
	// attribute caching can delay it).
	Wait time.Duration
}

// StartOnNode runs this program's "start" command on host over ssh
// (BatchMode=yes), passing --via and --port when set, and waits up to 10
// seconds for the shared state file to show an answering proxy. See
// remoteStart for the details and to change them.
func StartOnNode(host, via string, port int) error {
	return remoteStart{}.Run(context.Background(), host, via, port)
}

// Run starts the proxy on host; see StartOnNode. ctx bounds the whole run.
func (r remoteStart) Run(ctx context.Context, host, via string, port int) error {
	bin, args, err := r.sshArgs(host, via, port)
	if err != nil {
		return err
	}
	out, err := exec.CommandContext(ctx, bin, args...).CombinedOutput()
	if err != nil {
		msg := strings.TrimSpace(string(out))
		if msg == "" {
			return fmt.Errorf("hpcproxy: start on %s: %w", host, err)
		}
		return fmt.Errorf("hpcproxy: start on %s: %w: %s", host, err, msg)
	}
	state := firstOf(r.StateFile, PidFilePath())
	wait := r.Wait
	if wait <= 0 {
		wait = 10 * time.Second
	}
	deadline := time.Now().Add(wait)
	for {
		if _, ok := findActive(state); ok {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("hpcproxy: started on %s, but %s shows no answering proxy after %v", host, state, wait)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("hpcproxy: start on %s: %w", host, ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// sshArgs builds the ssh command line. ssh joins the remote command's
// words with spaces for the remote shell, so each is shell-quoted.
func (r remoteStart) sshArgs(host, via string, port int) (string, []string, error) {
	if host == "" || strings.HasPrefix(host, "-") || strings.ContainsAny(host, " \t\r\n") {
		return "", nil, fmt.Errorf("hpcproxy: invalid host %q", host)
	}
	cmd := r.Command
	if len(cmd) == 0 {
		exe, err := os.Executable()
		if err != nil {
			return "", nil, fmt.Errorf("hpcproxy: start on %s: %w", host, err)
		}
		cmd = []string{exe, "start"}
	}
	cmd = append([]string(nil), cmd...)
	if via != "" {
		cmd = append(cmd, "--via", via)
	}
	if port > 0 {
		cmd = append(cmd, "--port", strconv.Itoa(port))
	}
	args := []string{"-o", "BatchMode=yes"}
	for _, o := range r.SSHOptions {
		args = append(args, "-o", o)
	}
	args = append(args, "--", host)
	quoted := make([]string, len(cmd))
	for i, w := range cmd {
		quoted[i] = shellenv.Quote(w)
	}
	args = append(args, strings.Join(quoted, " "))
	return firstOf(r.SSHBinary, "ssh"), args, nil
}

// watchPID returns a channel that is closed when process pid has exited,
// checked every interval (a second if zero), or when ctx ends. A per-job
// daemon watches the job script (JobInfo.ScriptPID) with it, so that it
// ends with the job even where the scheduler does not track processes
// that detached (Slurm's proctrack/linuxproc). On Linux the process is
// held by a pidfd from the start, so a reused PID is not mistaken for it.
func watchPID(ctx context.Context, pid int, interval time.Duration) <-chan struct{} {
	if interval <= 0 {
		interval = time.Second
	}
	ch := make(chan struct{})
	p, err := os.FindProcess(pid)
	if err != nil || pid <= 0 {
		close(ch)
		return ch
	}
	go func() {
		defer close(ch)
		defer p.Release()
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			if err := p.Signal(syscall.Signal(0)); err != nil && !errors.Is(err, syscall.EPERM) {
				return
			}
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
	}()
	return ch
}
