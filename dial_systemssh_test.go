package hpcproxy

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/hpcproxy/hpcproxy/internal/sshtest"
	"github.com/hpcproxy/hpcproxy/internal/testenv"
)

// systemSSHMethods are the methods that run the ssh binary.
var systemSSHMethods = []Method{MethodControlMaster, MethodSOCKSUnix, MethodExec}

func TestSSHArgs(t *testing.T) {
	tests := []struct {
		name string
		cfg  TunnelConfig
		// resolved is ssh -G's output; nil means ssh -G failed.
		resolved map[string]string
		want     []string
	}{
		{
			name: "minimal, ssh -G unavailable",
			cfg:  TunnelConfig{Destination: "login", SSHConfigFile: "none"},
			want: []string{"-F", "none", "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes",
				"-o", "StrictHostKeyChecking=yes", "-o", "ServerAliveInterval=60", "-N", "--", "login"},
		},
		{
			name: "ssh -G unavailable, keepalive explicit",
			cfg:  TunnelConfig{Destination: "login", SSHConfigFile: "none", KeepaliveInterval: 5 * time.Second},
			want: []string{"-F", "none", "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes",
				"-o", "StrictHostKeyChecking=yes", "-o", "ServerAliveInterval=5", "-N", "--", "login"},
		},
		{
			name:     "ssh_config leaves keepalive and loglevel unset",
			cfg:      TunnelConfig{Destination: "alice@login:2222", SSHConfigFile: "/cfg"},
			resolved: map[string]string{"serveraliveinterval": "0", "loglevel": "ERROR"},
			want: []string{"-F", "/cfg", "-l", "alice", "-p", "2222", "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes",
				"-o", "StrictHostKeyChecking=yes", "-o", "ServerAliveInterval=60", "-o", "LogLevel=INFO",
				"-N", "--", "login"},
		},
		{
			name:     "ssh_config sets keepalive",
			cfg:      TunnelConfig{Destination: "login"},
			resolved: map[string]string{"serveraliveinterval": "15", "loglevel": "DEBUG1"},
			want: []string{"-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes",
				"-o", "StrictHostKeyChecking=yes", "-N", "--", "login"},
		},
		{
			name: "explicit values, accept-new, user options after ours",
			cfg: TunnelConfig{
				Destination:       "login",
				HostKeyPolicy:     HostKeyAcceptNew,
				KeepaliveInterval: 1500 * time.Millisecond,
				KeepaliveCountMax: 5,
				ConnectTimeout:    10 * time.Second,
				SSHOptions:        []string{"StrictHostKeyChecking=no", "Ciphers=aes128-gcm@openssh.com"},
			},
			resolved: map[string]string{"serveraliveinterval": "2", "loglevel": "INFO"},
			want: []string{"-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes",
				"-o", "StrictHostKeyChecking=accept-new", "-o", "ServerAliveInterval=2",
				"-o", "ServerAliveCountMax=5", "-o", "ConnectTimeout=10",
				"-o", "StrictHostKeyChecking=no", "-o", "Ciphers=aes128-gcm@openssh.com",
				"-N", "--", "login"},
		},
		{
			name:     "keepalive disabled",
			cfg:      TunnelConfig{Destination: "login", KeepaliveInterval: -1},
			resolved: map[string]string{"serveraliveinterval": "0", "loglevel": "INFO"},
			want: []string{"-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes",
				"-o", "StrictHostKeyChecking=yes", "-o", "ServerAliveInterval=0", "-N", "--", "login"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dest, err := parseDestination(tt.cfg.Destination)
			require.NoError(t, err)
			// A fake ssh that prints tt.resolved as ssh -G would, or fails.
			bin := filepath.Join(t.TempDir(), "ssh")
			script := "#!/bin/sh\nexit 255\n"
			if tt.resolved != nil {
				var b strings.Builder
				b.WriteString("hostname login\nport 22\n")
				for k, v := range tt.resolved {
					b.WriteString(k + " " + v + "\n")
				}
				script = "#!/bin/sh\ncat <<'EOF'\n" + b.String() + "EOF\n"
			}
			require.NoError(t, os.WriteFile(bin, []byte(script), 0o700))
			s := &sshCommand{bin: bin, cfg: &tt.cfg, dest: dest, log: discardLogger}
			s.resolve(context.Background())
			got := s.args(nil, nil, "-N")
			assert.Equal(t, tt.want, got)
		})
	}
}

// When ssh -G fails, the ssh_config parser decides whether the
// ServerAliveInterval default is needed; when it cannot read the
// configuration either, the default is added.
func TestSSHArgsWithoutSSHG(t *testing.T) {
	noG := filepath.Join(t.TempDir(), "ssh")
	require.NoError(t, os.WriteFile(noG, []byte("#!/bin/sh\necho 'ssh: illegal option -- G' >&2\nexit 255\n"), 0o700))
	for _, tt := range []struct {
		name, config string
		want         bool // ServerAliveInterval=60 added
	}{
		{"unset", "Host login\n  User alice\n", true},
		{"set for the host", "Host login\n  ServerAliveInterval 15\n", false},
		{"set for another host", "Host other\n  ServerAliveInterval 15\n", true},
		{"set by Host *", "Host *\n  ServerAliveInterval 1m\n", false},
		{"unparsable (Match exec)", "Match exec true\n  ServerAliveInterval 15\n", true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cfgFile := filepath.Join(t.TempDir(), "ssh_config")
			require.NoError(t, os.WriteFile(cfgFile, []byte(tt.config), 0o600))
			cfg := TunnelConfig{Destination: "login", SSHConfigFile: cfgFile, SSHBinary: noG}
			s, err := newSSHCommand(context.Background(), &cfg)
			require.NoError(t, err)
			require.Nil(t, s.resolved)
			args := strings.Join(s.args(nil, nil, "-N"), " ")
			if tt.want {
				assert.Contains(t, args, "-o ServerAliveInterval=60")
			} else {
				assert.NotContains(t, args, "ServerAliveInterval")
			}
		})
	}
}

// The user's StrictHostKeyChecking=no must not win: ours comes first, and
// ssh keeps the first value. Checked with the real ssh -G.
func TestSSHArgsHostKeyCheckingWins(t *testing.T) {
	sshBin := testenv.LookPath(t, "ssh")
	cfgFile := filepath.Join(t.TempDir(), "ssh_config")
	require.NoError(t, os.WriteFile(cfgFile, []byte("Host *\n  StrictHostKeyChecking no\n  LogLevel QUIET\n"), 0o600))
	for _, pol := range []HostKeyPolicy{HostKeyStrict, HostKeyAcceptNew} {
		cfg := TunnelConfig{Destination: "login.example", SSHConfigFile: cfgFile, HostKeyPolicy: pol,
			SSHOptions: []string{"StrictHostKeyChecking=no"}, SSHBinary: sshBin}
		s, err := newSSHCommand(context.Background(), &cfg)
		require.NoError(t, err)
		require.NotNil(t, s.resolved, "ssh -G failed")
		want := map[HostKeyPolicy]string{HostKeyStrict: "true", HostKeyAcceptNew: "accept-new"}[pol]
		// ssh -G without our forced value shows the user's choice; the
		// arguments ssh really gets override it.
		assert.Equal(t, "false", s.resolved["stricthostkeychecking"])
		assert.Equal(t, want, resolveWith(t, s)["stricthostkeychecking"])
		assert.Equal(t, "60", resolveWith(t, s)["serveraliveinterval"])
		assert.Equal(t, "INFO", resolveWith(t, s)["loglevel"])
	}
}

// The destination's user@ and :port beat SSHOptions' User and Port, as
// documented (and as gossh's resolution does): -l and -p come before every
// -o. Checked with the real ssh -G.
func TestSSHArgsDestinationWins(t *testing.T) {
	sshBin := testenv.LookPath(t, "ssh")
	cfgFile := filepath.Join(t.TempDir(), "ssh_config")
	require.NoError(t, os.WriteFile(cfgFile, []byte("Host *\n  User erin\n  Port 5555\n"), 0o600))
	for dest, want := range map[string][2]string{
		"carol@login.example:3333": {"carol", "3333"},
		"carol@login.example":      {"carol", "4444"},
		"login.example:3333":       {"dave", "3333"},
		"login.example":            {"dave", "4444"},
	} {
		cfg := TunnelConfig{Destination: dest, SSHConfigFile: cfgFile, SSHBinary: sshBin,
			SSHOptions: []string{"User=dave", "Port=4444"}}
		s, err := newSSHCommand(context.Background(), &cfg)
		require.NoError(t, err)
		got := resolveWith(t, s)
		assert.Equal(t, want, [2]string{got["user"], got["port"]}, dest)
	}
}

// resolveWith runs ssh -G with s's full argument list (defaults included).
func resolveWith(t *testing.T, s *sshCommand) map[string]string {
	t.Helper()
	out, err := exec.Command(s.bin, s.args(nil, nil, "-G")...).Output()
	require.NoError(t, err)
	m := map[string]string{}
	for line := range strings.Lines(string(out)) {
		k, v, _ := strings.Cut(strings.TrimSpace(line), " ")
		m[k] = v
	}
	return m
}

func TestFindSSH(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	_, err := findSSH("")
	require.ErrorIs(t, err, errSSHNotFound)
	require.EqualError(t, err, "hpcproxy: ssh client not found in PATH: install openssh-client")
	_, err = findSSH("/nonexistent/ssh")
	require.ErrorContains(t, err, `hpcproxy: ssh client "/nonexistent/ssh" not usable`)
}

func TestTailBuffer(t *testing.T) {
	b := &tailBuffer{max: 8}
	_, _ = b.Write([]byte("hello "))
	_, _ = b.Write([]byte("world\r\nagain\n"))
	assert.Equal(t, "again", b.String())
	b = &tailBuffer{max: 100}
	_, _ = b.Write([]byte("line one\nline two\n"))
	assert.Equal(t, "line one; line two", b.String())
}

func TestTailBufferSince(t *testing.T) {
	b := &tailBuffer{max: 16}
	_, _ = b.Write([]byte("0123456789"))
	off := b.offset()
	assert.Equal(t, int64(10), off)
	assert.Equal(t, "", b.since(off))
	_, _ = b.Write([]byte("abc"))
	assert.Equal(t, "abc", b.since(off))
	assert.Equal(t, "9abc", b.since(off-1))
	_, _ = b.Write([]byte("defghijklmnop")) // more than max: the start is gone
	assert.Equal(t, "abcdefghijklmnop", b.since(off))
	assert.Equal(t, "abcdefghijklmnop", b.since(0), "only what is kept")
	assert.Equal(t, "", b.since(b.offset()+5))
}

func TestOpenFailureReason(t *testing.T) {
	for _, tt := range []struct {
		log, reason string
		ok          bool
	}{
		{"", "", false},
		{"Warning: something else\n", "", false},
		{"channel 3: open failed: connect failed: Connection refused\r\n", "connect failed: Connection refused", true},
		{"channel 2: open failed: administratively prohibited: open failed\nchannel 4: open failed: administratively prohibited: open failed\n",
			"administratively prohibited: open failed", true},
		// Two dials failing for different reasons at once: which is ours
		// is unknown.
		{"channel 2: open failed: connect failed: Connection refused\nchannel 3: open failed: connect failed: No route to host\n", "", true},
	} {
		reason, ok := openFailureReason(tt.log)
		assert.Equal(t, tt.reason, reason, "%q", tt.log)
		assert.Equal(t, tt.ok, ok, "%q", tt.log)
	}
}

func TestRuntimeDir(t *testing.T) {
	t.Run("private dir accepted", func(t *testing.T) {
		dir := sshtest.PrivateTempDir(t)
		d, err := openRuntimeDir(&TunnelConfig{RuntimeDir: dir})
		require.NoError(t, err)
		sock, err := d.socketPath("x", maxSunPath)
		require.NoError(t, err)
		assert.Equal(t, dir, filepath.Dir(sock))
		d.cleanup(sock)
		_, err = os.Stat(dir)
		require.NoError(t, err, "a RuntimeDir we did not create must stay")
	})
	t.Run("group-accessible dir refused", func(t *testing.T) {
		dir := sshtest.PrivateTempDir(t)
		require.NoError(t, os.Chmod(dir, 0o750))
		_, err := openRuntimeDir(&TunnelConfig{RuntimeDir: dir})
		require.ErrorContains(t, err, "others must have no access")
	})
	t.Run("not a directory", func(t *testing.T) {
		f := filepath.Join(sshtest.PrivateTempDir(t), "file")
		require.NoError(t, os.WriteFile(f, nil, 0o600))
		_, err := openRuntimeDir(&TunnelConfig{RuntimeDir: f})
		require.ErrorContains(t, err, "is not a directory")
	})
	t.Run("owned by someone else", func(t *testing.T) {
		testenv.RequireRoot(t)
		dir := sshtest.PrivateTempDir(t)
		require.NoError(t, os.Chown(dir, 65534, 65534))
		_, err := openRuntimeDir(&TunnelConfig{RuntimeDir: dir})
		require.ErrorContains(t, err, "owned by uid 65534")
	})
	t.Run("temporary dir removed", func(t *testing.T) {
		d, err := openRuntimeDir(&TunnelConfig{})
		require.NoError(t, err)
		fi, err := os.Stat(d.path)
		require.NoError(t, err)
		assert.Equal(t, os.FileMode(0o700), fi.Mode().Perm())
		d.cleanup("")
		_, err = os.Stat(d.path)
		require.ErrorIs(t, err, os.ErrNotExist)
	})
	t.Run("path too long", func(t *testing.T) {
		dir := sshtest.PrivateTempDir(t)
		long := filepath.Join(dir, strings.Repeat("d", 100))
		require.NoError(t, os.Mkdir(long, 0o700))
		d, err := openRuntimeDir(&TunnelConfig{RuntimeDir: long})
		require.NoError(t, err)
		_, err = d.socketPath("cm", maxSunPath-controlPathSuffix)
		require.ErrorContains(t, err, "use a shorter RuntimeDir")
	})
	t.Run("stale socket removed, live one kept", func(t *testing.T) {
		dir := sshtest.PrivateTempDir(t)
		stale := filepath.Join(dir, "stale.sock")
		ln, err := net.Listen("unix", stale)
		require.NoError(t, err)
		ln.(*net.UnixListener).SetUnlinkOnClose(false)
		ln.Close()
		require.NoError(t, removeStaleSocket(stale))
		_, err = os.Lstat(stale)
		require.ErrorIs(t, err, os.ErrNotExist)

		live := filepath.Join(dir, "live.sock")
		ln, err = net.Listen("unix", live)
		require.NoError(t, err)
		defer ln.Close()
		require.ErrorContains(t, removeStaleSocket(live), "in use")

		plain := filepath.Join(dir, "plain")
		require.NoError(t, os.WriteFile(plain, nil, 0o600))
		require.ErrorContains(t, removeStaleSocket(plain), "not a socket")
	})
	t.Run("method fails clearly", func(t *testing.T) {
		dir := sshtest.PrivateTempDir(t)
		require.NoError(t, os.Chmod(dir, 0o755))
		_, err := EstablishTunnel(context.Background(), TunnelConfig{
			Destination: "sshtest", SSHConfigFile: "none", RuntimeDir: dir,
			Methods: []Method{MethodControlMaster, MethodSOCKSUnix},
		})
		var terr *TunnelError
		require.ErrorAs(t, err, &terr)
		require.Len(t, terr.Attempts, 2)
		for _, a := range terr.Attempts {
			assert.ErrorContains(t, a, "others must have no access")
		}
	})
}

// startMaster runs a user's own ControlMaster (as `ssh -M -N` with a
// ControlPath in ssh_config, and extra arguments) and stops it when the
// test ends.
func startMaster(t *testing.T, sshd *sshtest.SSHD, cfgFile, sock string, extra ...string) *exec.Cmd {
	t.Helper()
	args := append([]string{"-F", cfgFile, "-M", "-N", "-o", "ControlPersist=no"}, extra...)
	cmd := exec.Command(testenv.LookPath(t, "ssh"), append(args, "sshtest")...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	require.NoError(t, cmd.Start())
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
	})
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(sock); err == nil {
			return cmd
		}
		select {
		case <-exited:
			t.Fatalf("master exited: %s\nsshd log:\n%s", stderr.String(), sshd.Log())
		default:
		}
		require.True(t, time.Now().Before(deadline), "master did not come up")
		time.Sleep(20 * time.Millisecond)
	}
}

// usersMaster starts a user's own ControlMaster to sshd and returns the
// ssh_config (sshd's, with its ControlPath) that reaches it.
func usersMaster(t *testing.T, sshd *sshtest.SSHD) (cfgFile string, master *exec.Cmd) {
	t.Helper()
	dir := sshtest.PrivateTempDir(t)
	sock := filepath.Join(dir, "user-master.sock")
	cfgFile = filepath.Join(dir, "ssh_config")
	base, err := os.ReadFile(sshd.SSHConfigFile)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(cfgFile, append([]byte("ControlPath "+sock+"\n"), base...), 0o600))
	return cfgFile, startMaster(t, sshd, cfgFile, sock)
}

// attachUsersMaster establishes a controlmaster tunnel through the user's
// master that cfgFile names (usersMaster), checks that it attached to it
// rather than starting a master of its own, and closes it when the test
// ends.
func attachUsersMaster(ctx context.Context, t *testing.T, cfgFile string) *Tunnel {
	t.Helper()
	tun, err := EstablishTunnel(ctx, TunnelConfig{
		Destination: "sshtest", SSHConfigFile: cfgFile, RuntimeDir: sshtest.PrivateTempDir(t),
		Methods: []Method{MethodControlMaster},
	})
	require.NoError(t, err)
	t.Cleanup(func() { tun.Close() })
	require.Nil(t, firstConn(tun).(*controlMasterTunnel).proc, "started its own master instead of attaching")
	return tun
}

func TestControlMasterAttachesToUsersMaster(t *testing.T) {
	sshd := sshtest.StartSSHD(t, sshtest.Options{})
	cfgFile, master := usersMaster(t, sshd)

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	tun := attachUsersMaster(ctx, t, cfgFile)
	echo := startEchoServer(t)
	require.NoError(t, echoOnce(ctx, tun, echo, []byte("through the user's master")))
	require.NoError(t, tun.Close())
	require.NoError(t, tun.Err())

	// The user's master outlives our tunnel.
	require.NoError(t, master.Process.Signal(syscall.Signal(0)), "Close killed the user's master")
	out, err := exec.Command("ssh", "-F", cfgFile, "-O", "check", "sshtest").CombinedOutput()
	require.NoError(t, err, "master not answering after our Close: %s", out)

	// And a tunnel attached to it goes down when it does.
	tun, err = EstablishTunnel(ctx, TunnelConfig{
		Destination: "sshtest", SSHConfigFile: cfgFile, Methods: []Method{MethodControlMaster},
	})
	require.NoError(t, err)
	defer tun.Close()
	require.NoError(t, master.Process.Kill())
	select {
	case <-tun.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("Done did not fire when the user's master died")
	}
	require.ErrorContains(t, tun.Err(), "control connection lost")
	_, err = tun.Dial(ctx, "tcp", echo)
	require.ErrorIs(t, err, ErrTunnelDown)
}

// A user's master whose ssh_config turns host key checking off may sit on
// an unverified host key: neither controlmaster nor exec may use it. Here
// it really does (the host is in no known_hosts), so both must fail host
// key verification with their own connection instead of using it.
func TestUserMasterNotUsedWithoutHostKeyChecking(t *testing.T) {
	sshd := sshtest.StartSSHD(t, sshtest.Options{})
	dir := sshtest.PrivateTempDir(t)
	sock := filepath.Join(dir, "user-master.sock")
	emptyKnown := filepath.Join(dir, "known_hosts")
	require.NoError(t, os.WriteFile(emptyKnown, nil, 0o600))
	base, err := os.ReadFile(sshd.SSHConfigFile)
	require.NoError(t, err)
	cfg := strings.ReplaceAll(string(base), sshd.KnownHostsFile, emptyKnown)
	cfg = strings.ReplaceAll(cfg, "StrictHostKeyChecking yes", "StrictHostKeyChecking no")
	cfgFile := filepath.Join(dir, "ssh_config")
	require.NoError(t, os.WriteFile(cfgFile, []byte("ControlPath "+sock+"\n"+cfg), 0o600))
	// The master accepts the unknown key and records it nowhere.
	startMaster(t, sshd, cfgFile, sock, "-o", "UserKnownHostsFile=/dev/null")
	out, err := exec.Command("ssh", "-F", cfgFile, "-O", "check", "sshtest").CombinedOutput()
	require.NoError(t, err, "user master not answering: %s", out)

	for _, m := range []Method{MethodControlMaster, MethodExec} {
		t.Run(m.String(), func(t *testing.T) {
			var logs syncBuffer
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			tun, err := EstablishTunnel(ctx, TunnelConfig{
				Destination: "sshtest", SSHConfigFile: cfgFile, RuntimeDir: sshtest.PrivateTempDir(t),
				Methods: []Method{m},
				Logger:  slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
			})
			if err == nil {
				tun.Close()
			}
			require.ErrorContains(t, err, "Host key verification failed")
			require.NotContains(t, logs.String(), "attached to the user's ssh control master")
			if m == MethodControlMaster {
				require.Contains(t, logs.String(), "not using the user's ssh control master")
			}
		})
	}
	known, err := os.ReadFile(emptyKnown)
	require.NoError(t, err)
	require.Empty(t, known, "an unverified host key was recorded")
}

// ProxyJump hops get our forced options too: OpenSSH's own ProxyJump
// passes only -F to the jump ssh, so a `StrictHostKeyChecking no` for the
// jump host in ssh_config would let it through unverified. jumpCommand
// replaces it with a ProxyCommand of ours; it must work through one hop,
// two hops (a nested ProxyCommand), and a first hop with a ProxyJump of its
// own, whatever $SHELL is.
func TestSystemSSHProxyJumpHopChecked(t *testing.T) {
	jump, target := startJumpAndTarget(t)
	t.Setenv("SSH_AUTH_SOCK", "")
	// ssh runs a ProxyCommand with $SHELL: ours must not depend on it.
	t.Setenv("SHELL", "/bin/false")
	dir := sshtest.PrivateTempDir(t)
	known := filepath.Join(dir, "known_hosts")
	cfgFile := writeJumpConfig(t, jump, known,
		"Host jump jumpvia",
		"  HostName 127.0.0.1",
		"  Port "+strconv.Itoa(jump.Port),
		"  StrictHostKeyChecking no",
		"Host jumpvia",
		"  ProxyJump jump",
		"Host target",
		"  ProxyJump jump",
		"Host target2",
		"  ProxyJump jump,jump",
		"Host target3",
		"  ProxyJump jumpvia",
		"Host target target2 target3",
		"  HostName 127.0.0.1",
		"  Port "+strconv.Itoa(target.Port),
	)
	establish := func(t *testing.T, dest string, m Method) (*Tunnel, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		return EstablishTunnel(ctx, TunnelConfig{
			Destination: dest, SSHConfigFile: cfgFile, RuntimeDir: sshtest.PrivateTempDir(t), Methods: []Method{m},
		})
	}

	for _, dest := range []string{"target", "target2", "target3"} {
		t.Run(dest, func(t *testing.T) {
			t.Run("jump host unknown", func(t *testing.T) {
				onlyTarget := mustRead(t, target.KnownHostsFile)
				require.NoError(t, os.WriteFile(known, onlyTarget, 0o600))
				for _, m := range systemSSHMethods {
					tun, err := establish(t, dest, m)
					if err == nil {
						tun.Close()
					}
					require.ErrorContains(t, err, "Host key verification failed", "%s through an unverified jump host", m)
				}
				require.Equal(t, onlyTarget, mustRead(t, known), "the jump host's key was recorded")
			})
			t.Run("jump host known", func(t *testing.T) {
				require.NoError(t, os.WriteFile(known, append(mustRead(t, jump.KnownHostsFile), mustRead(t, target.KnownHostsFile)...), 0o600))
				for _, m := range systemSSHMethods {
					tun, err := establish(t, dest, m)
					require.NoError(t, err, "%s\njump log:\n%s\ntarget log:\n%s", m, jump.Log(), target.Log())
					require.NoError(t, echoOnce(context.Background(), tun, startEchoServer(t), []byte("via "+dest)), "%s", m)
					require.NoError(t, tun.Close())
				}
			})
		})
	}
}

// jumpCommand's quoting, checked by what /bin/sh makes of it after ssh's
// %-expansion, level by level.
func TestJumpCommandQuoting(t *testing.T) {
	s := &sshCommand{bin: "/opt/my ssh/ssh", cfg: &TunnelConfig{SSHConfigFile: "/cfg/100%'s $HOME"}, log: discardLogger}
	cmd, err := s.jumpCommand(context.Background(), []destination{{Host: "gw1"}, {User: "bob", Host: "gw2", Port: 2200}}, 0)
	require.NoError(t, err)
	assert.True(t, strings.HasSuffix(cmd, ` -W '[%h]:%p' -- gw2`), cmd)

	expand := func(c, host, port string) string {
		return strings.NewReplacer("%%", "%", "%h", host, "%p", port).Replace(c)
	}
	// The jump ssh for gw2, as the destination's ssh runs it.
	argv := shellArgv(t, expand(cmd, "target", "22"))
	require.Equal(t, []string{"/opt/my ssh/ssh", "-F", "/cfg/100%'s $HOME", "-l", "bob", "-p", "2200"}, argv[:7])
	require.Equal(t, []string{"-W", "[target]:22", "--", "gw2"}, argv[len(argv)-4:])
	for _, o := range []string{"BatchMode=yes", "StrictHostKeyChecking=yes", "ControlMaster=no", "ControlPath=none", "ServerAliveInterval=60"} {
		require.Contains(t, argv, o)
	}
	var nested string
	for _, a := range argv {
		if v, ok := strings.CutPrefix(a, "ProxyCommand="); ok {
			nested = v
		}
	}
	require.NotEmpty(t, nested, "no ProxyCommand for the hop before gw2: %q", argv)
	// The jump ssh for gw1, as the one for gw2 runs it.
	argv = shellArgv(t, expand(nested, "gw2", "2200"))
	require.Equal(t, []string{"/opt/my ssh/ssh", "-F", "/cfg/100%'s $HOME", "-o", "BatchMode=yes"}, argv[:5])
	require.Equal(t, []string{"-W", "[gw2]:2200", "--", "gw1"}, argv[len(argv)-4:])
	for _, a := range argv {
		require.False(t, strings.HasPrefix(a, "ProxyCommand="), "gw1 has no jump of its own: %q", argv)
	}

	// Accept-new and explicit keepalives reach the hops.
	s.cfg.HostKeyPolicy, s.cfg.KeepaliveInterval, s.cfg.KeepaliveCountMax = HostKeyAcceptNew, 7*time.Second, 2
	cmd, err = s.jumpCommand(context.Background(), []destination{{Host: "gw1"}}, 0)
	require.NoError(t, err)
	argv = shellArgv(t, expand(cmd, "target", "22"))
	for _, o := range []string{"StrictHostKeyChecking=accept-new", "ServerAliveInterval=7", "ServerAliveCountMax=2"} {
		require.Contains(t, argv, o)
	}
}

// shellArgv runs command's words through /bin/sh and returns them.
func shellArgv(t *testing.T, command string) []string {
	t.Helper()
	out, err := exec.Command("/bin/sh", "-c", `set -- `+command+`; for a; do printf '%s\0' "$a"; done`).Output()
	require.NoError(t, err, "%s", command)
	return strings.Split(strings.TrimSuffix(string(out), "\x00"), "\x00")
}

// When the link to the login node drops, the ssh child exits: Done fires
// and Err carries ssh's own words.
func TestSystemSSHDoneWhenServerStops(t *testing.T) {
	sshd := sshtest.StartSSHD(t, sshtest.Options{})
	for _, m := range []Method{MethodControlMaster, MethodSOCKSUnix} {
		t.Run(m.String(), func(t *testing.T) {
			if !sshd.Running() {
				sshd.Start(t)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			tun, err := EstablishTunnel(ctx, TunnelConfig{
				Destination: "sshtest", SSHConfigFile: sshd.SSHConfigFile,
				RuntimeDir: sshtest.PrivateTempDir(t), Methods: []Method{m},
			})
			require.NoError(t, err)
			defer tun.Close()
			sshd.Stop()
			select {
			case <-tun.Done():
			case <-time.After(10 * time.Second):
				t.Fatal("Done did not fire when sshd went away")
			}
			require.Error(t, tun.Err())
			require.ErrorContains(t, tun.Err(), "hpcproxy: ssh exited: exit status 255")
			_, err = tun.Dial(ctx, "tcp", "127.0.0.1:1")
			require.ErrorIs(t, err, ErrTunnelDown)
		})
	}
}

// A login that fails is reported at once with ssh's message, not after the
// connect timeout.
func TestSystemSSHAuthFailureFast(t *testing.T) {
	sshd := sshtest.StartSSHD(t, sshtest.Options{})
	dir := sshtest.PrivateTempDir(t)
	otherKey := filepath.Join(dir, "id_other")
	sshtest.GenerateKeyFile(t, "ed25519", otherKey)
	cfgFile := filepath.Join(dir, "ssh_config")
	base, err := os.ReadFile(sshd.SSHConfigFile)
	require.NoError(t, err)
	cfg := strings.ReplaceAll(string(base), sshd.ClientKeyFile, otherKey)
	require.NoError(t, os.WriteFile(cfgFile, []byte(cfg), 0o600))
	for _, m := range systemSSHMethods {
		t.Run(m.String(), func(t *testing.T) {
			start := time.Now()
			_, err := EstablishTunnel(context.Background(), TunnelConfig{
				Destination: "sshtest", SSHConfigFile: cfgFile, RuntimeDir: dir,
				ConnectTimeout: 20 * time.Second, Methods: []Method{m},
			})
			require.Error(t, err)
			require.ErrorContains(t, err, "Permission denied")
			require.Less(t, time.Since(start), 10*time.Second)
		})
	}
}

// An unknown host key fails every method, even when the user's config
// and SSHOptions say StrictHostKeyChecking=no.
func TestSystemSSHNeverSkipsHostKeyCheck(t *testing.T) {
	sshd := sshtest.StartSSHD(t, sshtest.Options{})
	dir := sshtest.PrivateTempDir(t)
	emptyKnown := filepath.Join(dir, "known_hosts")
	require.NoError(t, os.WriteFile(emptyKnown, nil, 0o600))
	cfgFile := filepath.Join(dir, "ssh_config")
	base, err := os.ReadFile(sshd.SSHConfigFile)
	require.NoError(t, err)
	cfg := strings.ReplaceAll(string(base), sshd.KnownHostsFile, emptyKnown)
	cfg = strings.ReplaceAll(cfg, "StrictHostKeyChecking yes", "StrictHostKeyChecking no")
	require.NoError(t, os.WriteFile(cfgFile, []byte(cfg), 0o600))
	for _, m := range systemSSHMethods {
		t.Run(m.String(), func(t *testing.T) {
			_, err := EstablishTunnel(context.Background(), TunnelConfig{
				Destination: "sshtest", SSHConfigFile: cfgFile, RuntimeDir: dir,
				SSHOptions: []string{"StrictHostKeyChecking=no"}, Methods: []Method{m},
			})
			require.ErrorContains(t, err, "Host key verification failed")
		})
	}
	t.Run("accept-new records the key", func(t *testing.T) {
		tun, err := EstablishTunnel(context.Background(), TunnelConfig{
			Destination: "sshtest", SSHConfigFile: cfgFile, RuntimeDir: dir,
			HostKeyPolicy: HostKeyAcceptNew, Methods: []Method{MethodSOCKSUnix},
		})
		require.NoError(t, err)
		require.NoError(t, tun.Close())
		known, err := os.ReadFile(emptyKnown)
		require.NoError(t, err)
		require.Contains(t, string(known), "[127.0.0.1]:"+strconv.Itoa(sshd.Port))
	})
	t.Run("accept-new in ssh_config is kept", func(t *testing.T) {
		known2 := filepath.Join(dir, "known_hosts2")
		require.NoError(t, os.WriteFile(known2, nil, 0o600))
		cfg2 := strings.ReplaceAll(string(base), sshd.KnownHostsFile, known2)
		cfg2 = strings.ReplaceAll(cfg2, "StrictHostKeyChecking yes", "StrictHostKeyChecking accept-new")
		cfgFile2 := filepath.Join(dir, "ssh_config2")
		require.NoError(t, os.WriteFile(cfgFile2, []byte(cfg2), 0o600))
		tun, err := EstablishTunnel(context.Background(), TunnelConfig{
			Destination: "sshtest", SSHConfigFile: cfgFile2, RuntimeDir: dir, Methods: []Method{MethodControlMaster},
		})
		require.NoError(t, err)
		require.NoError(t, tun.Close())
		known, err := os.ReadFile(known2)
		require.NoError(t, err)
		require.Contains(t, string(known), "[127.0.0.1]:"+strconv.Itoa(sshd.Port))
	})
}

func TestExecConn(t *testing.T) {
	sshd := sshtest.StartSSHD(t, sshtest.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	tun, err := EstablishTunnel(ctx, TunnelConfig{
		Destination: "sshtest", SSHConfigFile: sshd.SSHConfigFile, Methods: []Method{MethodExec},
	})
	require.NoError(t, err)
	defer tun.Close()

	t.Run("read deadline", func(t *testing.T) {
		// A server that accepts and stays silent.
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		require.NoError(t, err)
		defer ln.Close()
		c, err := tun.Dial(ctx, "tcp", ln.Addr().String())
		require.NoError(t, err)
		defer c.Close()
		require.NoError(t, c.SetReadDeadline(time.Now().Add(200*time.Millisecond)))
		_, err = c.Read(make([]byte, 1))
		require.ErrorIs(t, err, os.ErrDeadlineExceeded)
		var ne net.Error
		require.ErrorAs(t, err, &ne)
		require.True(t, ne.Timeout())
	})
	t.Run("far side half-closes", func(t *testing.T) {
		// The server answers and shuts down its write side but keeps
		// reading: Read must see the answer and EOF at once, not wait
		// for ssh to exit.
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		require.NoError(t, err)
		defer ln.Close()
		served := make(chan string, 1)
		go func() {
			c, err := ln.Accept()
			if err != nil {
				served <- err.Error()
				return
			}
			defer c.Close()
			_, _ = c.Write([]byte("answer"))
			_ = c.(*net.TCPConn).CloseWrite()
			b, _ := io.ReadAll(c)
			served <- string(b)
		}()
		c, err := tun.Dial(ctx, "tcp", ln.Addr().String())
		require.NoError(t, err)
		defer c.Close()
		start := time.Now()
		got, err := io.ReadAll(c)
		require.NoError(t, err)
		require.Equal(t, "answer", string(got))
		require.Less(t, time.Since(start), time.Second)
		// ssh -W (unlike the channel methods) stops forwarding our
		// writes once the far side's EOF arrives (documented on
		// execConn), so nothing more is checked here.
		require.NoError(t, c.Close())
		<-served
	})
	t.Run("addrs", func(t *testing.T) {
		echo := startEchoServer(t)
		c, err := tun.Dial(ctx, "tcp", echo)
		require.NoError(t, err)
		defer c.Close()
		assert.Equal(t, "ssh-exec", c.RemoteAddr().Network())
		assert.Equal(t, echo, c.RemoteAddr().String())
		assert.Equal(t, "sshtest", c.LocalAddr().String())
	})
	t.Run("close ends the ssh process", func(t *testing.T) {
		echo := startEchoServer(t)
		c, err := tun.Dial(ctx, "tcp", echo)
		require.NoError(t, err)
		ec := c.(*execConn)
		require.NoError(t, c.Close())
		require.True(t, ec.proc.hasExited())
		_, err = c.Write([]byte("x"))
		require.ErrorIs(t, err, os.ErrClosed)
	})
	t.Run("bad address", func(t *testing.T) {
		for _, addr := range []string{"no-port", "-oProxyCommand=x:22"} {
			_, err := tun.Dial(ctx, "tcp", addr)
			require.Error(t, err, addr)
		}
		_, err := tun.Dial(ctx, "unix", "/tmp/x")
		require.ErrorContains(t, err, "cannot dial network")
	})
	t.Run("refused reason", func(t *testing.T) {
		// ssh -W says "channel 0: open failed: connect failed:
		// Connection refused" and exits 255.
		c, err := tun.Dial(ctx, "tcp", "127.0.0.1:1")
		require.NoError(t, err)
		defer c.Close()
		_, err = c.Read(make([]byte, 1))
		var rde *RemoteDialError
		require.ErrorAs(t, err, &rde)
		require.ErrorIs(t, err, syscall.ECONNREFUSED)
		require.Equal(t, "127.0.0.1:1", rde.Addr)
	})
}

// With forwarding prohibited by the login node, the exec probe fails the
// method (and so does every other method).
func TestSystemSSHForwardingProhibited(t *testing.T) {
	sshd := sshtest.StartSSHD(t, sshtest.Options{Config: []string{"AllowTcpForwarding=no"}})
	for _, m := range []Method{MethodExec, MethodControlMaster, MethodSOCKSUnix} {
		t.Run(m.String(), func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			tun, err := EstablishTunnel(ctx, TunnelConfig{
				Destination: "sshtest", SSHConfigFile: sshd.SSHConfigFile,
				RuntimeDir: sshtest.PrivateTempDir(t), Methods: []Method{m},
			})
			if m == MethodExec {
				require.ErrorIs(t, err, ErrProhibited)
				return
			}
			// The master logs in fine; each dial is refused by sshd.
			require.NoError(t, err)
			defer tun.Close()
			_, err = tun.Dial(ctx, "tcp", startEchoServer(t))
			require.ErrorIs(t, err, ErrProhibited)
		})
	}
}

// DialSystemSSH finds ssh in PATH; a wrapper there points it at the test
// sshd's client config, so the real ~/.ssh is never read.
func TestDialSystemSSH(t *testing.T) {
	sshd := sshtest.StartSSHD(t, sshtest.Options{})
	realSSH := testenv.LookPath(t, "ssh")
	bin := t.TempDir()
	wrapper := "#!/bin/sh\nexec " + realSSH + " -F " + sshd.SSHConfigFile + " \"$@\"\n"
	require.NoError(t, os.WriteFile(filepath.Join(bin, "ssh"), []byte(wrapper), 0o700))
	t.Setenv("PATH", bin)

	dial, stop, done, err := DialSystemSSH("sshtest")
	require.NoError(t, err)
	echo := startEchoServer(t)
	c, err := dial(context.Background(), "tcp", echo)
	require.NoError(t, err)
	_, err = c.Write([]byte("seed"))
	require.NoError(t, err)
	buf := make([]byte, 4)
	_, err = io.ReadFull(c, buf)
	require.NoError(t, err)
	require.Equal(t, "seed", string(buf))
	require.NoError(t, c.Close())
	select {
	case <-done:
		t.Fatal("done fired before stop")
	default:
	}
	stop()
	<-done
	_, err = dial(context.Background(), "tcp", echo)
	require.ErrorIs(t, err, ErrTunnelDown)

	t.Run("unknown host", func(t *testing.T) {
		_, _, _, err := DialSystemSSH("no-such-host.invalid")
		var terr *TunnelError
		require.ErrorAs(t, err, &terr)
		require.Len(t, terr.Attempts, 1)
		require.Equal(t, MethodExec, terr.Attempts[0].Method)
	})
}

// The ssh child dies with its parent process: the helper below (this test
// binary, re-run) starts a tunnel, prints the child's pid and is killed
// with SIGKILL, which gives it no chance to clean up.
func TestSystemSSHChildDiesWithParent(t *testing.T) {
	sshd := sshtest.StartSSHD(t, sshtest.Options{})
	for _, m := range []Method{MethodControlMaster, MethodSOCKSUnix} {
		t.Run(m.String(), func(t *testing.T) {
			cmd := helperCommand("tunnelchild", "HPCPROXY_HELPER_CONFIG="+sshd.SSHConfigFile,
				"HPCPROXY_HELPER_METHOD="+m.String(), "HPCPROXY_HELPER_RUNTIMEDIR="+sshtest.PrivateTempDir(t))
			stdout, err := cmd.StdoutPipe()
			require.NoError(t, err)
			cmd.Stderr = os.Stderr
			require.NoError(t, cmd.Start())
			defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
			var pid int
			buf := make([]byte, 4096)
			var out string
			deadline := time.Now().Add(20 * time.Second)
			for pid == 0 && time.Now().Before(deadline) {
				n, err := stdout.Read(buf)
				out += string(buf[:n])
				if _, rest, ok := strings.Cut(out, "CHILDPID="); ok {
					if line, _, ok := strings.Cut(rest, "\n"); ok {
						pid, _ = strconv.Atoi(line)
					}
				}
				require.NoError(t, err, "helper output: %s", out)
			}
			require.NotZero(t, pid, "helper output: %s", out)
			require.NoError(t, syscall.Kill(pid, 0), "ssh child not running")
			require.NoError(t, cmd.Process.Kill())
			_ = cmd.Wait()
			// The child was reparented; poll until it is gone (a zombie
			// reaped by init, or no such process).
			require.Eventually(t, func() bool { return !processAlive(pid) }, 10*time.Second, 20*time.Millisecond,
				"ssh child %d outlived its parent", pid)
		})
	}
}

// processAlive reports whether pid exists and is not a zombie.
func processAlive(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	_, rest, _ := strings.Cut(string(b), ") ")
	return !strings.HasPrefix(rest, "Z")
}

func init() {
	helpers["tunnelchild"] = tunnelChildHelper
}

// tunnelChildHelper runs in a child process for
// TestSystemSSHChildDiesWithParent: it establishes a tunnel, prints the
// ssh child's pid, and waits to be killed.
func tunnelChildHelper() int {
	fail := func(format string, args ...any) int {
		fmt.Fprintf(os.Stderr, "tunnelchild: "+format+"\n", args...)
		return 1
	}
	m, err := ParseMethod(os.Getenv("HPCPROXY_HELPER_METHOD"))
	if err != nil {
		return fail("%v", err)
	}
	tun, err := EstablishTunnel(context.Background(), TunnelConfig{
		Destination: "sshtest", SSHConfigFile: os.Getenv("HPCPROXY_HELPER_CONFIG"), Methods: []Method{m},
		RuntimeDir: os.Getenv("HPCPROXY_HELPER_RUNTIMEDIR"),
	})
	if err != nil {
		return fail("%v", err)
	}
	var proc *sshProcess
	switch impl := firstConn(tun).(type) {
	case *controlMasterTunnel:
		proc = impl.proc
	case *socksTunnel:
		proc = impl.proc
	}
	if proc == nil {
		return fail("method %s has no ssh child", m)
	}
	// Retire the thread that started the child's goroutine siblings: a
	// locked goroutine exiting without unlocking kills its thread. The
	// child must survive that (it was forked by its own locked thread).
	for range 8 {
		done := make(chan struct{})
		go func() { runtime.LockOSThread(); close(done) }()
		<-done
	}
	time.Sleep(100 * time.Millisecond)
	if !processAlive(proc.cmd.Process.Pid) {
		return fail("ssh child died when unrelated threads exited: %v", proc.stderr.String())
	}
	os.Stdout.WriteString("CHILDPID=" + strconv.Itoa(proc.cmd.Process.Pid) + "\n")
	<-tun.Done() // killed by the parent test long before this
	return fail("tunnel went down in the helper")
}
