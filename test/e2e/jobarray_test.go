package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hpcproxy/hpcproxy/internal/cli"
)

// arrayTasks is how many tasks of the job array run on compute at once
// (its 2 CPUs, oversubscribed: the partition allows 4 jobs per CPU).
const arrayTasks = 5

// jobArray is scenario 7: a Slurm job array whose tasks all run on
// compute, each starting a per-job proxy with plain `perjob start`. The
// first task's start opens the node tunnel, the others attach to it: one
// SSH connection on login for every task (counted there), while each task
// keeps its own port, credentials and state file. Every task downloads in
// a loop until it is released; the tasks are released one by one in a
// scrambled order, the first task (the one whose daemon holds the tunnel)
// early, and every download of every task must succeed and bring the
// right bytes. The last task's end ends the daemon and the connection.
//
// In PrivateTmp every task runs in a mount namespace of its own with a
// fresh tmpfs over its TMPDIR, as Slurm's job_container/tmpfs gives each
// job a /tmp of its own: the tasks cannot see each other's state files
// (checked), and still share the tunnel, whose daemon lives in the first
// task's namespace. The namespace is made by the job itself (unshare
// with a user namespace that maps the user to itself, so its UID stays
// the same), since this Slurm cannot host job_container/tmpfs: the test
// users' homes are under /tmp.
//
// In OpenerKilled the task whose start opened the tunnel is killed as a
// scheduler's cgroup kill would kill it (this Slurm's
// proctrack/linuxproc would not): SIGKILL to the node daemon, to the
// task's stand-by and (scancel --signal=KILL) to its script, while the
// other tasks download. Each of them loses at most the download in
// flight; every download started after the kill succeeds on the same
// port (the stand-bys keep the ports open and one of them starts the new
// daemon), login serves one SSH connection again, and after the last
// task no process of the user is left.
func (c *cluster) jobArray(t *testing.T) {
	t.Run("SharedTmp", func(t *testing.T) { c.jobArrayWith(t, false, false) })
	t.Run("PrivateTmp", func(t *testing.T) { c.jobArrayWith(t, true, false) })
	t.Run("OpenerKilled", func(t *testing.T) { c.jobArrayWith(t, false, true) })
}

// privateTmpScript re-runs the job script in a mount namespace with a
// fresh tmpfs over TMPDIR (the prelude runs again there).
const privateTmpScript = `
if [ -z "${IN_PRIVATE_TMP:-}" ]; then
	IN_PRIVATE_TMP=1 exec unshare --user --map-current-user --keep-caps --mount --propagation private \
		sh -c 'mount -t tmpfs -o mode=0700 jobtmp "$TMPDIR" && exec "$0"' "$0"
fi
`

func (c *cluster) jobArrayWith(t *testing.T, privateTmp, killOpener bool) {
	script := `
tag="$SLURM_ARRAY_JOB_ID-$SLURM_ARRAY_TASK_ID"
if perjob start -v; then echo "RESULT start ok"; else echo "RESULT start FAIL"; exit 1; fi
if [ -n "${IN_PRIVATE_TMP:-}" ]; then
	# Its own state file only: the other tasks' are in their own tmpfs.
	step private-tmp sh -c 'test "$(ls "$TMPDIR"/hpcproxy-*/ | grep -c "json$")" = 1'
fi
perjob status --json >"$HOME/status-$tag.json"
eval "$(perjob env)"
touch "$HOME/ready-$tag"
n=0; bad=0; after=0; badafter=0
while :; do
	released=0
	[ -e "$HOME/release-$tag" ] && released=1
	killed=0
	[ -e "$HOME/killed-$SLURM_ARRAY_JOB_ID" ] && killed=1
	if curl -sS --fail --max-time 60 -o big.bin https://www.internet.test/files/big.bin && [ "$(sha big.bin)" = "$BIGSHA" ]; then
		n=$((n+1)); after=$((after+killed))
	else
		bad=$((bad+1)); badafter=$((badafter+killed)); echo "download $((n+bad)) failed (after the kill: $killed)"
	fi
	[ $released = 1 ] && break
done
echo "DOWNLOADS $n BAD $bad AFTER $after BADAFTER $badafter"
# Killing the daemon cuts the download in flight, no other.
if [ $bad = 0 ] || { [ -e "$HOME/killed-$SLURM_ARRAY_JOB_ID" ] && [ $bad = 1 ] && [ $badafter = 0 ]; }; then
	echo "RESULT downloads ok"
else
	echo "RESULT downloads FAIL"
fi
`
	n := jobSeq.Add(1)
	path := filepath.Join(c.user.home, fmt.Sprintf("job%d.sh", n))
	if privateTmp {
		script = privateTmpScript + script
	}
	writeFile(t, path, jobPrelude+script, 0o755)
	if err := os.Chown(path, c.user.uid, c.user.gid); err != nil {
		t.Fatal(err)
	}
	outPattern := filepath.Join(c.user.home, fmt.Sprintf("job%d-%%a.out", n))
	r := c.runOn(c.login, c.user, c.env(c.user, "HPCPROXY_VIA=login", "BIGSHA="+c.bigSHA), 20*time.Second,
		"sbatch", "--parsable", "--export=ALL", "--time=5", "--oversubscribe", fmt.Sprintf("--array=1-%d", arrayTasks),
		"-J", t.Name(), "-o", outPattern, "-D", c.user.home, path)
	if r.code != 0 {
		t.Fatalf("sbatch: %s", r)
	}
	id := strings.TrimSpace(strings.Split(r.out, ";")[0])
	t.Logf("submitted job array %s", id)
	tag := func(task int) string { return fmt.Sprintf("%s-%d", id, task) }
	out := func(task int) string { return strings.ReplaceAll(outPattern, "%a", itoa(task)) }
	released := map[int]bool{}
	release := func(task int) {
		released[task] = true
		writeFile(t, filepath.Join(c.user.home, "release-"+tag(task)), "", 0o644)
	}
	t.Cleanup(func() {
		for task := 1; task <= arrayTasks; task++ {
			if !released[task] {
				release(task)
			}
		}
		c.cleanupOn(c.login, nil, c.slurmEnv(), 10*time.Second, "scancel", id)
	})

	c.waitFor(t, "every task holding its proxy", 2*time.Minute, nil, func() bool {
		for task := 1; task <= arrayTasks; task++ {
			if _, err := os.Stat(filepath.Join(c.user.home, "ready-"+tag(task))); err != nil {
				b, _ := os.ReadFile(out(task))
				if strings.Contains(string(b), "RESULT start FAIL") {
					t.Fatalf("task %d: start failed:\n%s", task, b)
				}
				return false
			}
		}
		return true
	})

	// One daemon, one node tunnel, a port and a token per task.
	var reps []cli.StatusReport
	for task := 1; task <= arrayTasks; task++ {
		var rep cli.StatusReport
		b, err := os.ReadFile(filepath.Join(c.user.home, "status-"+tag(task)+".json"))
		if err == nil {
			err = json.Unmarshal(b, &rep)
		}
		if err != nil || rep.Node == nil {
			t.Fatalf("task %d: perjob status --json: %v\n%s", task, err, b)
		}
		reps = append(reps, rep)
	}
	ports := map[string]bool{}
	attached := 0
	for i, rep := range reps {
		if rep.PID != reps[0].PID || rep.Node.Socket != reps[0].Node.Socket {
			t.Errorf("task %d: daemon %d on %s, task 1's: %d on %s", i+1, rep.PID, rep.Node.Socket, reps[0].PID, reps[0].Node.Socket)
		}
		if ports[rep.Address] {
			t.Errorf("task %d: address %s used by another task too", i+1, rep.Address)
		}
		ports[rep.Address] = true
		if rep.Node.Attached {
			attached++
		}
		if len(rep.LoginNodes) != 1 || rep.LoginNodes[0].Connections != 1 {
			t.Errorf("task %d: login_nodes %+v, want one login node with one connection", i+1, rep.LoginNodes)
		}
	}
	if attached != arrayTasks-1 {
		t.Errorf("%d tasks attached to the node tunnel, want %d (all but the one that opened it)", attached, arrayTasks-1)
	}
	daemon := reps[0].PID
	for _, rep := range reps {
		if !rep.Node.Attached {
			daemon = rep.PID
		}
	}
	if got := c.sshConnections(); got != 1 {
		t.Errorf("login's sshd serves %d connections for %d tasks, want 1", got, arrayTasks)
	}

	// The task whose start opened the tunnel goes early; the others in a
	// scrambled order, each after the others have downloaded a while.
	opener := 0
	for i, rep := range reps {
		if !rep.Node.Attached {
			opener = i + 1
		}
	}
	order := []int{opener}
	for _, task := range []int{4, 2, 5, 1, 3} {
		if task != opener && task <= arrayTasks {
			order = append(order, task)
		}
	}
	if killOpener {
		c.killOpener(t, id, opener, reps[opener-1], daemon)
		order = order[1:]
	}
	for i, task := range order {
		time.Sleep(time.Second)
		release(task)
		j := c.wait(t, id+"_"+itoa(task), out(task), time.Minute)
		wantOK(t, j.output, "start", "downloads")
		if killOpener {
			if got := atoi(field(j.output, `AFTER (\d+)`)); got < 1 {
				t.Errorf("task %d: %d downloads after the kill", task, got)
			}
			continue
		}
		if privateTmp {
			wantOK(t, j.output, "private-tmp")
		}
		if got := atoi(field(j.output, `DOWNLOADS (\d+)`)); got < 1 {
			t.Errorf("task %d: %d downloads", task, got)
		}
		if i < len(order)-1 {
			if !pidAlive(daemon) {
				t.Fatalf("the daemon ended with task %d; %d tasks still run", task, len(order)-1-i)
			}
			if got := c.sshConnections(); got != 1 {
				t.Errorf("after task %d ended: login's sshd serves %d connections, want 1", task, got)
			}
		}
	}
	c.waitFor(t, "daemon and SSH connection gone after the last task", 15*time.Second, nil, func() bool {
		return !pidAlive(daemon) && c.sshConnections() == 0
	})
	c.waitFor(t, "no process of the tasks' proxies left", 15*time.Second, nil, func() bool {
		return len(proxyProcs(c.user.uid, "")) == 0
	})
}

// killOpener kills the task that opened the node tunnel as a cgroup kill
// would: the daemon, the task's stand-by and its script, at once; then
// it waits for the other tasks' stand-bys to have restored the tunnel.
func (c *cluster) killOpener(t *testing.T, id string, opener int, rep cli.StatusReport, daemon int) {
	t.Helper()
	time.Sleep(2 * time.Second) // downloads in flight
	standbys := proxyProcs(c.user.uid, rep.StateFile)
	if len(standbys) != 1 {
		t.Fatalf("task %d (%s): %d stand-bys, want 1", opener, rep.StateFile, len(standbys))
	}
	for _, pid := range append(standbys, daemon) {
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
			t.Fatalf("kill %d: %v", pid, err)
		}
	}
	c.runOn(c.login, nil, c.slurmEnv(), 10*time.Second, "scancel", "--signal=KILL", id+"_"+itoa(opener))
	writeFile(t, filepath.Join(c.user.home, "killed-"+id), "", 0o644)
	t.Logf("killed task %d's daemon %d and stand-by %d", opener, daemon, standbys[0])
	c.waitFor(t, "one SSH connection again after the daemon's kill", 30*time.Second, nil, func() bool {
		return c.sshConnections() == 1 && !pidAlive(daemon)
	})
	time.Sleep(3 * time.Second) // downloads through the new daemon
}

// proxyProcs lists uid's processes of a per-job proxy (a daemon, a
// stand-by, a start), those of the job whose state file is state if
// state is not empty, stand-bys only then.
func proxyProcs(uid int, state string) []int {
	var out []int
	for _, pid := range pidsOfUser(uid) {
		b, err := os.ReadFile("/proc/" + itoa(pid) + "/cmdline")
		if err != nil || !pidAlive(pid) {
			continue
		}
		switch {
		case state == "" && bytes.Contains(b, []byte("\x00--state\x00")):
		case state != "" && bytes.HasPrefix(b, []byte("/bin/sh\x00-c\x00")) && bytes.Contains(b, []byte("\x00--state\x00"+state+"\x00")):
		default:
			continue
		}
		out = append(out, pid)
	}
	return out
}

// sshConnections counts the TCP connections login's sshd has established.
func (c *cluster) sshConnections() int {
	r := c.runOn(c.login, nil, c.slurmEnv(), 10*time.Second, "ss", "-Htn", "state", "established", "( sport = :22 )")
	if r.code != 0 {
		c.t.Errorf("ss on login: %s", r)
		return -1
	}
	n := 0
	for line := range strings.Lines(r.out) {
		if strings.TrimSpace(line) != "" {
			n++
		}
	}
	return n
}
