package e2e

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// downloadsScript defines downloads PREFIX: every client a user would
// point at the proxy fetches through it, each a step of its own, with the
// sha256 of what it got printed as "SHA PREFIX.STEP HEX".
const downloadsScript = `
downloads() {
	p=$1
	step $p.curl-https curl -sS --fail --max-time 60 -o $p.curl-https.bin https://www.internet.test/files/big.bin
	echo "SHA $p.curl-https $(sha $p.curl-https.bin)"
	step $p.curl-socks5h sh -c 'curl -sS --fail --max-time 60 --proxy "$ALL_PROXY" -o "$0" https://www.internet.test/files/big.bin' $p.curl-socks5h.bin
	echo "SHA $p.curl-socks5h $(sha $p.curl-socks5h.bin)"
	step $p.wget-http wget -q -T 60 -t 1 -O $p.wget-http.bin http://www.internet.test/files/big.bin
	echo "SHA $p.wget-http $(sha $p.wget-http.bin)"
	step $p.git-https git clone -q https://www.internet.test/repo.git $p.repo
	echo "GIT $p.git-https $(git -C $p.repo log -1 --format=%s 2>/dev/null)"
	step $p.go-fetch e2efetch https://www.internet.test/files/big.bin
	echo "SHA $p.go-fetch $(sed -n 's/.*sha256=//p' "$scratch/$p.go-fetch.stdout")"
}
`

// downloadSteps are the step names downloads PREFIX reports.
var downloadSteps = []string{"curl-https", "curl-socks5h", "wget-http", "git-https", "go-fetch"}

// checkDownloads asserts that every download of prefix succeeded and
// brought the right bytes (or the right commit).
func (c *cluster) checkDownloads(t *testing.T, output, prefix string) {
	t.Helper()
	for _, s := range downloadSteps {
		name := prefix + "." + s
		wantOK(t, output, name)
		if s == "git-https" {
			if got := field(output, `(?m)^GIT `+regexp.QuoteMeta(name)+` (.*)$`); got != c.repoCommit {
				t.Errorf("%s: cloned commit %q, want %q", name, got, c.repoCommit)
			}
			continue
		}
		if got := field(output, `(?m)^SHA `+regexp.QuoteMeta(name)+` (\S*)$`); got != c.bigSHA {
			t.Errorf("%s: sha256 %q, want %q", name, got, c.bigSHA)
		}
	}
}

func TestCluster(t *testing.T) {
	c := newCluster(t)

	// Scenario 1: a per-job proxy inside a batch job, its login node named
	// by HPCPROXY_VIA, or else found as the job's submit host.
	for _, v := range []struct {
		name string
		env  []string
	}{
		{"PerJob/ViaEnv", []string{"HPCPROXY_VIA=login"}},
		{"PerJob/ViaSubmitHost", nil},
	} {
		t.Run(v.name, func(t *testing.T) { c.perJobJob(t, v.env) })
	}
}

// perJobJob is scenario 1.
func (c *cluster) perJobJob(t *testing.T, env []string) {
	j := c.sbatch(t, downloadsScript+`
step no-dns sh -c '! getent hosts www.internet.test'
step no-route sh -c '! curl -sS --noproxy "*" --max-time 5 -o /dev/null https://10.231.2.2/'
if perjob start -v; then echo "RESULT start ok"; else echo "RESULT start FAIL"; exit 1; fi
perjob status
eval "$(perjob env)"
downloads perjob
`, env, 2*time.Minute)
	if j.state != "COMPLETED" {
		t.Errorf("job %s ended %s, want COMPLETED", j.id, j.state)
	}
	if !strings.Contains(j.output, "submitted from login") {
		t.Errorf("job was not submitted from login")
	}
	wantOK(t, j.output, "no-dns", "no-route", "start")
	c.checkDownloads(t, j.output, "perjob")

	// The daemon ends with the job and takes its state file along.
	pid := atoi(field(j.output, `pid:\s+(\d+) on compute`))
	state := field(j.output, `state file:\s+(\S+)`)
	if pid <= 0 || state == "" {
		t.Fatalf("perjob status did not show the daemon's pid and state file")
	}
	if want := filepath.Join(c.nodeTmp, "hpcproxy-"+itoa(c.user.uid), "proxy-"+j.id+".json"); state != want {
		t.Errorf("state file %s, want %s (node-local TMPDIR, per job)", state, want)
	}
	c.waitFor(t, "daemon gone after the job", 15*time.Second, nil, func() bool {
		_, err := os.Stat(state)
		return !pidAlive(pid) && os.IsNotExist(err)
	})
}
