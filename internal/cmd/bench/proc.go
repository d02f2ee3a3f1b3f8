package main

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// clockTicks is USER_HZ, the unit of utime and stime in /proc/PID/stat. It
// is 100 on every Linux architecture Go supports.
const clockTicks = 100

// procStat is what the bench reads of one process in /proc/PID/stat.
type procStat struct {
	ppid int
	cpuTimes
}

// readStat parses /proc/PID/stat. The command name may hold spaces and
// parentheses, so fields are counted from the last ')'.
func readStat(pid int) (procStat, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return procStat{}, err
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return procStat{}, fmt.Errorf("/proc/%d/stat: no ')'", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	// f[0] is field 3 (state): ppid is field 4, utime 14, stime 15, and
	// cutime 16, cstime 17: the time of children it waited for. Those
	// count, or a socat that forks a process per connection would cost
	// nothing: a child's time moves from its own entry to its parent's
	// when it is reaped, so a difference of two tree sums is the tree's
	// time in between.
	if len(f) < 15 {
		return procStat{}, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(f))
	}
	ppid, _ := strconv.Atoi(f[1])
	var t [4]int64
	for i := range t {
		t[i], _ = strconv.ParseInt(f[11+i], 10, 64)
	}
	return procStat{ppid: ppid, cpuTimes: cpuTimes{
		user: time.Duration(t[0]+t[2]) * time.Second / clockTicks,
		sys:  time.Duration(t[1]+t[3]) * time.Second / clockTicks,
	}}, nil
}

// processTree returns roots and every process below them, from one scan of
// /proc: a proxy's own children (the ssh of a ControlMaster) count as part
// of it.
func processTree(roots []int) []int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return roots
	}
	children := map[int][]int{}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		st, err := readStat(pid)
		if err != nil {
			continue
		}
		children[st.ppid] = append(children[st.ppid], pid)
	}
	var out []int
	seen := map[int]bool{}
	var walk func(int)
	walk = func(pid int) {
		if seen[pid] {
			return
		}
		seen[pid] = true
		out = append(out, pid)
		for _, c := range children[pid] {
			walk(c)
		}
	}
	for _, r := range roots {
		walk(r)
	}
	return out
}

// cpuTimes is CPU time in user space and in the kernel (all threads).
type cpuTimes struct{ user, sys time.Duration }

func (c cpuTimes) total() time.Duration { return c.user + c.sys }

func (c cpuTimes) add(d cpuTimes) cpuTimes { return cpuTimes{c.user + d.user, c.sys + d.sys} }

func (c cpuTimes) sub(d cpuTimes) cpuTimes { return cpuTimes{c.user - d.user, c.sys - d.sys} }

// treeCPU is the CPU time used so far by the processes of the tree below
// roots.
func treeCPU(roots []int) cpuTimes {
	var sum cpuTimes
	for _, pid := range processTree(roots) {
		if st, err := readStat(pid); err == nil {
			sum = sum.add(st.cpuTimes)
		}
	}
	return sum
}

// treeRSS is the resident memory (VmRSS) of the processes of the tree
// below roots, in bytes.
func treeRSS(roots []int) int64 {
	var sum int64
	for _, pid := range processTree(roots) {
		sum += rssOf(pid)
	}
	return sum
}

func rssOf(pid int) int64 {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return kb << 10
		}
	}
	return 0
}

// alive reports whether pid exists (and is not a zombie).
func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	i := bytes.LastIndexByte(b, ')')
	return i >= 0 && i+2 < len(b) && b[i+2] != 'Z'
}

// raiseFileLimit raises RLIMIT_NOFILE as far as it goes (as root, the
// hard limit too, up to fs.nr_open), for this process and the proxies it
// starts, which inherit it. It returns the soft limit now in force.
func raiseFileLimit() uint64 {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 0
	}
	want := lim.Max
	if b, err := os.ReadFile("/proc/sys/fs/nr_open"); err == nil {
		if n, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64); err == nil && n > want {
			want = n
		}
	}
	for _, max := range []uint64{want, lim.Max} {
		next := syscall.Rlimit{Cur: max, Max: max}
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &next); err == nil {
			return max
		}
	}
	return lim.Cur
}
