package e2e

import (
	"os"
	"path/filepath"
	"regexp"
	"testing"
	"time"
)

// siteEnv turns on the contrib TaskProlog for a job: the cluster's
// slurm.conf runs contrib/slurm's scripts through a wrapper that needs it,
// so that the other scenarios' jobs, which set HPCPROXY_VIA for their own
// perjob start (with their own flags), are not served by the prolog's
// proxy first.
const siteEnv = "HPCPROXY_E2E_SITE=1"

// installContrib copies contrib/slurm and contrib/jobstarter into the cluster's directory beside
// its bin/, as in an unpacked release (the scripts find ../../bin/perjob),
// writes the wrappers that slurm.conf names and returns their paths, and
// copies the Java test program for the jobs.
func (c *cluster) installContrib() (prolog, epilog string) {
	t := c.t
	dir := filepath.Join(c.dir, "contrib", "slurm")
	for _, name := range []string{"slurm/hpcproxy-taskprolog", "slurm/hpcproxy-taskepilog", "jobstarter/hpcproxy-job-starter"} {
		b, err := os.ReadFile(filepath.Join("..", "..", "contrib", name))
		if err != nil {
			t.Fatal(err)
		}
		mkdir(t, filepath.Join(c.dir, "contrib", filepath.Dir(name)), 0o755)
		writeFile(t, filepath.Join(c.dir, "contrib", name), string(b), 0o755)
	}
	wrap := func(name string) string {
		p := filepath.Join(c.slurmDir, "task-"+name)
		writeFile(t, p, "#!/bin/sh\n[ \"${HPCPROXY_E2E_SITE:-}\" = 1 ] || exit 0\nexec "+filepath.Join(dir, "hpcproxy-task"+name)+"\n", 0o755)
		return p
	}
	b, err := os.ReadFile(filepath.Join("..", "..", "testdata", "java", "Fetch.java"))
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(c.dir, "Fetch.java"), string(b), 0o644)
	return wrap("prolog"), wrap("epilog")
}

// siteIntegration: a job submitted with HPCPROXY_VIA and nothing of
// hpcproxy in its script gets its proxy from the TaskProlog: curl, wget,
// git, a Go program and a Java program fetch through it, also in an srun
// step (whose TaskEpilog must leave the job's proxy running), and the
// TaskEpilog of the job script stops it.
func (c *cluster) siteIntegration(t *testing.T) {
	j := c.sbatch(t, downloadsScript+`
echo "ENV http_proxy=${http_proxy:-} JAVA_TOOL_OPTIONS=${JAVA_TOOL_OPTIONS:-}"
state=$TMPDIR/hpcproxy-$(id -u)/proxy-$SLURM_JOB_ID.json
step site.marked test -s "$state.taskprolog"
echo "DAEMON $(sed -n 's/.*"pid": *\([0-9]*\).*/\1/p' "$state")"
downloads site
step site.java-http java `+filepath.Join(c.dir, "Fetch.java")+` http://www.internet.test/files/hello.txt
step site.java-https java `+filepath.Join(c.dir, "Fetch.java")+` https://www.internet.test/files/hello.txt
cat "$scratch/site.java-http.stdout" "$scratch/site.java-https.stdout"
step site.srun srun -n1 sh -c 'curl -sS --fail --max-time 30 https://www.internet.test/files/hello.txt >/dev/null && echo "srun http_proxy=$http_proxy"'
cat "$scratch/site.srun.stdout"
step site.after-srun curl -sS --fail --max-time 30 -o /dev/null https://www.internet.test/files/hello.txt
`, []string{"HPCPROXY_VIA=login", siteEnv}, 3*time.Minute)
	if j.state != "COMPLETED" {
		t.Errorf("job %s ended %s, want COMPLETED", j.id, j.state)
	}
	port := field(j.output, `(?m)^ENV http_proxy=http://hpcproxy:\S+@127\.0\.0\.1:(\d+) `)
	if port == "" {
		t.Fatalf("the TaskProlog did not set http_proxy to a per-job proxy on 127.0.0.1")
	}
	if !regexp.MustCompile(`(?m)^ENV .* JAVA_TOOL_OPTIONS=-Dhttp\.proxyHost=127\.0\.0\.1 -Dhttp\.proxyPort=` + port + ` .*-Dhttp\.nonProxyHosts=localhost\|`).MatchString(j.output) {
		t.Errorf("JAVA_TOOL_OPTIONS in the job does not name the proxy")
	}
	c.checkDownloads(t, j.output, "site")
	wantOK(t, j.output, "site.java-http", "site.java-https", "site.srun", "site.after-srun")
	for _, scheme := range []string{"http", "https"} {
		if !regexp.MustCompile(`(?m)^` + scheme + `://www\.internet\.test/files/hello\.txt 200 `).MatchString(j.output) {
			t.Errorf("java: no 200 for %s://www.internet.test/files/hello.txt", scheme)
		}
	}
	if got := field(j.output, `(?m)^srun http_proxy=http://\S+@127\.0\.0\.1:(\d+)$`); got != port {
		t.Errorf("srun step: proxy port %q, want the job's %s", got, port)
	}

	// The TaskEpilog of the job script stopped the proxy: the daemon, its
	// state file and the prolog's mark (removed only by the epilog of the
	// task it names) are gone.
	wantOK(t, j.output, "site.marked")
	pid := atoi(field(j.output, `(?m)^DAEMON (\d+)$`))
	if pid <= 0 {
		t.Fatalf("the job did not find the daemon's pid in its state file")
	}
	state := filepath.Join(c.nodeTmp, "hpcproxy-"+itoa(c.user.uid), "proxy-"+j.id+".json")
	c.waitFor(t, "proxy stopped after the job", 15*time.Second, nil, func() bool {
		_, err1 := os.Stat(state)
		_, err2 := os.Stat(state + ".taskprolog")
		return !pidAlive(pid) && os.IsNotExist(err1) && os.IsNotExist(err2)
	})
}

// jobStarter: the job starter that LSF and Torque sites put in front of a
// job's command (contrib/jobstarter), here in a Slurm job without the
// TaskProlog: the command gets a working proxy, and the proxy ends with
// the job.
func (c *cluster) jobStarter(t *testing.T) {
	starter := filepath.Join(c.dir, "contrib", "jobstarter", "hpcproxy-job-starter")
	j := c.sbatch(t, `
step starter.no-proxy-before sh -c '[ -z "${http_proxy:-}" ]'
step starter.curl `+starter+` sh -c 'curl -sS --fail --max-time 30 https://www.internet.test/files/hello.txt && echo "http_proxy=$http_proxy"'
cat "$scratch/starter.curl.stdout"
`, []string{"HPCPROXY_VIA=login"}, 2*time.Minute)
	if j.state != "COMPLETED" {
		t.Errorf("job %s ended %s, want COMPLETED", j.id, j.state)
	}
	wantOK(t, j.output, "starter.no-proxy-before", "starter.curl")
	if !regexp.MustCompile(`(?m)^http_proxy=http://\S+@127\.0\.0\.1:\d+$`).MatchString(j.output) {
		t.Errorf("the command did not get the proxy's environment")
	}
	state := filepath.Join(c.nodeTmp, "hpcproxy-"+itoa(c.user.uid), "proxy-"+j.id+".json")
	c.waitFor(t, "proxy gone after the job", 15*time.Second, nil, func() bool {
		_, err := os.Stat(state)
		return os.IsNotExist(err)
	})
}
