// Package jobenv reads what a process can learn about the batch job it
// runs in from its environment: the scheduler, the job ID, the submit
// host, the job script's PID, and the node-local tmp dir for per-job
// state. The root package and the example binaries share it.
package jobenv

import (
	"bufio"
	"bytes"
	"cmp"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// EnvTmpDir is hpcproxy.EnvTmpDir: if set, it is the node-local tmp dir.
const EnvTmpDir = "HPCPROXY_TMPDIR"

// Scheduler names a batch system.
type Scheduler string

// The batch systems Detect knows.
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

// Detect reports the job this process runs in, from its environment.
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
func Detect() JobInfo { return FromEnv(os.LookupEnv) }

// FromEnv is Detect with env in place of os.LookupEnv.
func FromEnv(env func(string) (string, bool)) JobInfo {
	get := func(k string) string { v, _ := env(k); return v }
	has := func(k string) bool { v, ok := env(k); return ok && v != "" }

	if has("FLUX_JOB_ID") {
		return JobInfo{InJob: true, Scheduler: SchedulerFlux, JobID: get("FLUX_JOB_ID"), TmpDir: get("FLUX_JOB_TMPDIR")}
	}
	if id := cmp.Or(get("SLURM_JOB_ID"), get("SLURM_JOBID")); id != "" {
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
		jobID = c + "." + cmp.Or(attrs["procid"], "0")
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

// TmpDir returns the node-local tmp dir for per-job state, the first
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
func TmpDir() string { return TmpDirFrom(os.LookupEnv, isDir) }

func isDir(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.IsDir()
}

// TmpDirFrom is TmpDir with env and isDir in place of the process's
// environment and file system.
func TmpDirFrom(env func(string) (string, bool), isDir func(string) bool) string {
	get := func(k string) string { v, _ := env(k); return v }
	if d := get(EnvTmpDir); filepath.IsAbs(d) {
		return filepath.Clean(d)
	}
	var perJobTMPDIR string
	if j := FromEnv(env); j.InJob && (j.Scheduler == SchedulerPBS || j.Scheduler == SchedulerSGE) {
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
