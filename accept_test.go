package hpcproxy

import (
	"bufio"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestAcceptOutOfDescriptors runs a local forward and a proxy server in a
// process with few file descriptors to spare, fills both up with held
// connections until accept fails (EMFILE), lets the connections go, and
// checks that each listener answers again: a passing shortage must not end
// an accept loop (the local forward's, the control socket's and a reverse
// forward's ended at the first one).
func TestAcceptOutOfDescriptors(t *testing.T) {
	echo := startEchoServer(t)
	cmd := helperCommand("fdlimit", "HPCPROXY_TEST_ECHO="+echo)
	stdin, err := cmd.StdinPipe()
	require.NoError(t, err)
	stdout, err := cmd.StdoutPipe()
	require.NoError(t, err)
	var stderr syncBuffer
	cmd.Stderr = &stderr
	require.NoError(t, cmd.Start())
	var waitErr error
	exited := make(chan struct{})
	go func() { waitErr = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		stdin.Close()
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
	})
	lines := bufio.NewScanner(stdout)
	addrs := map[string]string{}
	for range 2 {
		require.True(t, lines.Scan(), "helper: %s", stderr.String())
		name, addr, _ := strings.Cut(lines.Text(), " ")
		addrs[name] = addr
	}

	for _, name := range []string{"forward", "proxy"} {
		t.Run(name, func(t *testing.T) {
			addr := addrs[name]
			// Far more connections than the helper has descriptors for:
			// they wait in the listen backlog once accept fails.
			var held []net.Conn
			release := func() {
				for _, c := range held {
					c.Close()
				}
				held = nil
			}
			t.Cleanup(release)
			short := strings.Count(stderr.String(), "too many open files")
			for range 40 {
				c, err := net.DialTimeout("tcp", addr, 5*time.Second)
				require.NoError(t, err)
				held = append(held, c)
			}
			require.Eventually(t, func() bool {
				return strings.Count(stderr.String(), "too many open files") > short
			}, 10*time.Second, 20*time.Millisecond, "%s never ran out of descriptors; the helper's log:\n%s", addr, stderr.String())
			release()
			// The listener answers again once descriptors are free (the
			// first connections it accepts then are the backlog of closed
			// ones, whose dials may still run short).
			var last error
			if !assert.Eventually(t, func() bool {
				last = echoThrough(addr, echo, name == "proxy")
				return last == nil
			}, 15*time.Second, 100*time.Millisecond) {
				t.Fatalf("%s does not answer after the shortage: %v; the helper's log:\n%s", addr, last, stderr.String())
			}
			assert.Contains(t, stderr.String(), `accept failed; retrying" addr=`+addr, "the shortage was not the accept loop's")
		})
	}
	stdin.Close()
	select {
	case <-exited:
		assert.NoError(t, waitErr, "helper: %s", stderr.String())
	case <-time.After(10 * time.Second):
		t.Error("the helper did not exit")
	}
}

// echoThrough sends a line through addr (a SOCKS5 proxy to the echo
// server at echo, on 127.0.0.1, if socks, else a forward to it) and checks
// that it comes back, within two seconds.
func echoThrough(addr, echo string, socks bool) error {
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	if err := c.SetDeadline(time.Now().Add(2 * time.Second)); err != nil {
		return err
	}
	if socks {
		_, port, _ := net.SplitHostPort(echo)
		p, _ := strconv.Atoi(port)
		// The greeting (no authentication) and the request in one write.
		req := append([]byte{5, 1, 0}, socks5Connect([4]byte{127, 0, 0, 1}, uint16(p))...)
		if _, err := c.Write(req); err != nil {
			return err
		}
		var reply [12]byte // method choice, then a 10-byte IPv4 reply
		if _, err := io.ReadFull(c, reply[:]); err != nil {
			return err
		}
		if socks5Reply(reply[3]) != socks5Succeeded {
			return fmt.Errorf("SOCKS reply %d", reply[3])
		}
	}
	const msg = "after the shortage"
	if _, err := io.WriteString(c, msg); err != nil {
		return err
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil {
		return err
	}
	if string(got) != msg {
		return fmt.Errorf("got %q back", got)
	}
	return nil
}

func init() { helpers["fdlimit"] = fdLimitHelper }

// fdLimitHelper serves a local forward and a proxy (both to the echo
// server at HPCPROXY_TEST_ECHO, dialled directly) with 10 descriptors to
// spare, prints "forward ADDR" and "proxy ADDR", and serves until stdin
// ends. It logs to stderr.
func fdLimitHelper() int {
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	var d net.Dialer
	fln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fwd := &LocalForward{Remote: os.Getenv("HPCPROXY_TEST_ECHO"), Dial: d.DialContext, Logger: log}
	forwarded := make(chan struct{})
	go func() {
		defer close(forwarded)
		if err := fwd.Serve(fln); err != nil {
			log.Error("the forward ended", "err", err)
		}
	}()
	defer func() { fwd.Close(); <-forwarded }()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	srv := &Server{Dial: d.DialContext, Logger: log}
	served := make(chan struct{})
	go func() { defer close(served); _ = srv.Serve(ln) }()
	defer func() { srv.Close(); <-served }()

	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	lim := syscall.Rlimit{Cur: uint64(len(fds) + 10), Max: uint64(len(fds) + 10)}
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Printf("forward %s\nproxy %s\n", fln.Addr(), ln.Addr())
	_, _ = io.Copy(io.Discard, os.Stdin)
	return 0
}

// TestRetryableAccept: which accept errors an accept loop waits out.
func TestRetryableAccept(t *testing.T) {
	acceptErr := func(errno syscall.Errno) error {
		return &net.OpError{Op: "accept", Net: "tcp", Err: os.NewSyscallError("accept4", errno)}
	}
	for _, errno := range []syscall.Errno{syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ENOMEM,
		syscall.ECONNABORTED, syscall.EINTR, syscall.EPROTO, syscall.ENETDOWN, syscall.EHOSTUNREACH, syscall.EPERM} {
		assert.True(t, retryableAccept(acceptErr(errno)), "%v", errno)
	}
	assert.True(t, retryableAccept(&net.OpError{Op: "accept", Err: os.ErrDeadlineExceeded}), "a timeout")
	for _, err := range []error{net.ErrClosed, acceptErr(syscall.EBADF), acceptErr(syscall.EINVAL), io.EOF} {
		assert.False(t, retryableAccept(err), "%v", err)
	}
}
