package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// job is a finished batch job.
type job struct {
	id     string
	state  string // Slurm's final JobState
	output string // the job's stdout and stderr
}

var jobSeq atomic.Int32

// jobPrelude starts every job script: it says where the job runs and
// defines step NAME CMD..., which prints "RESULT NAME ok" or "RESULT NAME
// FAIL" with the command's stderr, and works in a scratch dir.
const jobPrelude = `#!/bin/sh
set -u
echo "job $SLURM_JOB_ID on $(hostname) as $(id -un), submitted from $SLURM_SUBMIT_HOST, script pid $$ (SLURM_TASK_PID=${SLURM_TASK_PID:-}), HPCPROXY_VIA=${HPCPROXY_VIA:-}"
step() {
	name=$1; shift
	if "$@" >"$scratch/$name.stdout" 2>"$scratch/$name.stderr"; then
		echo "RESULT $name ok"
	else
		echo "RESULT $name FAIL (exit $?): $*"
		sed 's/^/    /' "$scratch/$name.stderr"
	fi
}
# sha FILE: the sha256 of FILE, or "none".
sha() { sha256sum <"$1" 2>/dev/null | cut -d' ' -f1 || echo none; }
scratch=$(mktemp -d)
cd "$scratch"
`

// sbatch submits script (after jobPrelude) from the login node as the test
// user with env added to the user's environment (sbatch exports it into
// the job), waits up to timeout for the job to end and returns it.
func (c *cluster) sbatch(t *testing.T, script string, env []string, timeout time.Duration) job {
	t.Helper()
	id, out := c.submit(t, script, env, timeout)
	return c.wait(t, id, out, timeout)
}

// submit submits script (after jobPrelude) from the login node as the test
// user and returns the job ID and its output file.
func (c *cluster) submit(t *testing.T, script string, env []string, timeout time.Duration) (id, out string) {
	t.Helper()
	n := jobSeq.Add(1)
	path := filepath.Join(c.user.home, fmt.Sprintf("job%d.sh", n))
	out = filepath.Join(c.user.home, fmt.Sprintf("job%d.out", n))
	writeFile(t, path, jobPrelude+script, 0o755)
	if err := os.Chown(path, c.user.uid, c.user.gid); err != nil {
		t.Fatal(err)
	}
	limit := int(timeout/time.Minute) + 1
	r := c.runOn(c.login, c.user, c.env(c.user, env...), 20*time.Second,
		"sbatch", "--parsable", "--export=ALL", "--time="+fmt.Sprint(limit), "-J", t.Name(), "-o", out, "-D", c.user.home, path)
	if r.code != 0 {
		t.Fatalf("sbatch: %s", r)
	}
	id = strings.TrimSpace(strings.Split(r.out, ";")[0])
	t.Logf("submitted job %s", id)
	return id, out
}

// wait waits up to timeout for job id to end and returns it.
func (c *cluster) wait(t *testing.T, id, out string, timeout time.Duration) job {
	t.Helper()
	j := job{id: id}
	deadline := time.Now().Add(timeout)
	stateRE := regexp.MustCompile(`JobState=(\S+)`)
	for {
		r := c.runOn(c.login, nil, c.slurmEnv(), 10*time.Second, "scontrol", "show", "job", "-o", j.id)
		if m := stateRE.FindStringSubmatch(r.out); m != nil {
			switch m[1] {
			case "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED":
				j.state = m[1]
			}
		}
		if j.state != "" {
			break
		}
		if time.Now().After(deadline) || c.overTime() {
			why := fmt.Sprintf("within %s", timeout)
			if c.overTime() {
				why = fmt.Sprintf("before the e2e suite's time limit of %s", suiteLimit)
			}
			c.cleanupOn(c.login, nil, c.slurmEnv(), 10*time.Second, "scancel", j.id)
			b, _ := os.ReadFile(out)
			t.Fatalf("job %s did not finish %s; scontrol: %s\noutput so far:\n%s", j.id, why, r.out, b)
		}
		time.Sleep(200 * time.Millisecond)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatalf("job %s (%s): no output: %v", j.id, j.state, err)
	}
	j.output = string(b)
	t.Logf("job %s %s; output:\n%s", j.id, j.state, j.output)
	return j
}

func (c *cluster) slurmEnv() []string {
	return []string{"SLURM_CONF=" + c.slurmCfg, "PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
}

// results parses the job's "RESULT NAME ok|FAIL" lines.
func results(output string) map[string]string {
	m := map[string]string{}
	for _, line := range strings.Split(output, "\n") {
		if rest, ok := strings.CutPrefix(line, "RESULT "); ok {
			name, verdict, _ := strings.Cut(rest, " ")
			m[name] = verdict
		}
	}
	return m
}

// wantOK fails t for each named step that did not succeed.
func wantOK(t *testing.T, output string, names ...string) {
	t.Helper()
	res := results(output)
	for _, n := range names {
		if v, ok := res[n]; !ok {
			t.Errorf("step %s: did not run", n)
		} else if v != "ok" {
			t.Errorf("step %s: %s", n, v)
		}
	}
}

// field returns the first submatch of re in s, or "".
func field(s, re string) string {
	if m := regexp.MustCompile(re).FindStringSubmatch(s); m != nil {
		return m[1]
	}
	return ""
}

func atoi(s string) int {
	n, err := strconv.Atoi(s)
	if err != nil {
		return -1
	}
	return n
}

func itoa(n int) string { return strconv.Itoa(n) }
