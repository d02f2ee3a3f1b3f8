package hpcproxy

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/hpcproxy/hpcproxy/internal/sshtest"
	"github.com/hpcproxy/hpcproxy/internal/testenv"
)

// keysignPath is where Debian installs OpenSSH's setuid helper that signs
// hostbased requests with the system host key.
const keysignPath = "/usr/lib/openssh/ssh-keysign"

// TestHostbasedControlMaster logs in with hostbased authentication, which
// only OpenSSH can do (x/crypto has no hostbased, and it needs the setuid
// ssh-keysign), through the controlmaster method. The client has no key
// and no agent.
//
// Setup, as FIELD-NOTES "Hostbased works on loopback" describes it, done as
// root and undone when the test ends:
//   - EnableSSHKeysign yes in the SYSTEM ssh_config (ssh-keysign reads
//     nothing else), as a drop-in in /etc/ssh/ssh_config.d when
//     ssh_config includes that directory, else appended and restored;
//   - system host keys in /etc/ssh (ssh-keygen -A when missing);
//   - a dedicated throwaway user to log in as, whose home (a temp dir)
//     holds .shosts ("127.0.0.1 root": root on this host may log in) and
//     .ssh/known_hosts with the system host keys for 127.0.0.1, so no real
//     home directory is touched;
//   - sshd with HostbasedAuthentication=yes, IgnoreRhosts=no and public
//     key authentication off.
func TestHostbasedControlMaster(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireFile(t, keysignPath, "apt-get install openssh-client")
	testenv.LookPath(t, "ssh")
	for _, p := range []string{"useradd", "usermod", "userdel", "ssh-keygen"} {
		testenv.LookPath(t, p)
	}
	enableKeysign(t)
	hostKeys := systemHostKeys(t)
	user, home := throwawayUser(t)

	// The user's home is read by sshd as that user.
	require.NoError(t, os.WriteFile(filepath.Join(home, ".shosts"), []byte("127.0.0.1 root\n"), 0o600))
	require.NoError(t, os.MkdirAll(filepath.Join(home, ".ssh"), 0o700))
	var known strings.Builder
	for _, k := range hostKeys {
		known.WriteString("127.0.0.1 " + k + "\n")
	}
	require.NoError(t, os.WriteFile(filepath.Join(home, ".ssh", "known_hosts"), []byte(known.String()), 0o600))
	chownR(t, home, user)

	sshd := sshtest.StartSSHD(t, sshtest.Options{Config: []string{
		"HostbasedAuthentication=yes", "IgnoreRhosts=no", "PubkeyAuthentication=no",
	}})
	t.Setenv("SSH_AUTH_SOCK", "")
	cfgFile := filepath.Join(sshtest.PrivateTempDir(t), "ssh_config")
	client := []string{
		"Host hb",
		"  HostName 127.0.0.1",
		"  Port " + strconv.Itoa(sshd.Port),
		"  User " + user,
		"  HostbasedAuthentication yes",
		"  EnableSSHKeysign yes",
		"  PreferredAuthentications hostbased",
		"  PubkeyAuthentication no",
		"  PasswordAuthentication no",
		"  KbdInteractiveAuthentication no",
		"  GSSAPIAuthentication no",
		"  IdentitiesOnly yes",
		"  UserKnownHostsFile " + sshd.KnownHostsFile,
		"  GlobalKnownHostsFile /dev/null",
		"  StrictHostKeyChecking yes",
		"  BatchMode yes",
	}
	require.NoError(t, os.WriteFile(cfgFile, []byte(strings.Join(client, "\n")+"\n"), 0o600))

	for _, methods := range [][]Method{
		{MethodControlMaster},
		// The in-process client cannot do hostbased: the chain moves on.
		{MethodGoSSH, MethodControlMaster},
	} {
		t.Run(Methods(methods).String(), func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			tun, err := EstablishTunnel(ctx, TunnelConfig{
				Destination:   "hb",
				SSHConfigFile: cfgFile,
				RuntimeDir:    sshtest.PrivateTempDir(t),
				Methods:       methods,
			})
			require.NoError(t, err, "sshd log:\n%s", sshd.Log())
			defer tun.Close()
			require.Equal(t, MethodControlMaster, tun.Method())
			require.NoError(t, echoOnce(ctx, tun, startEchoServer(t), []byte("hostbased")))
			require.Contains(t, sshd.Log(), "Accepted hostbased for "+user)
		})
	}
}

// enableKeysign puts EnableSSHKeysign yes into the system ssh_config for
// the test's duration.
func enableKeysign(t *testing.T) {
	t.Helper()
	const sysConfig = "/etc/ssh/ssh_config"
	orig, err := os.ReadFile(sysConfig)
	require.NoError(t, err)
	const dropInDir = "/etc/ssh/ssh_config.d"
	if strings.Contains(string(orig), "Include "+dropInDir+"/*.conf") {
		if fi, err := os.Stat(dropInDir); err == nil && fi.IsDir() {
			p := filepath.Join(dropInDir, "zz-hpcproxy-test-keysign.conf")
			require.NoError(t, os.WriteFile(p, []byte("EnableSSHKeysign yes\n"), 0o644))
			t.Cleanup(func() { _ = os.Remove(p) })
			return
		}
	}
	fi, err := os.Stat(sysConfig)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(sysConfig, append(orig, "\n# hpcproxy test\nEnableSSHKeysign yes\n"...), fi.Mode().Perm()))
	t.Cleanup(func() { _ = os.WriteFile(sysConfig, orig, fi.Mode().Perm()) })
}

// systemHostKeys returns the public system host keys ("type base64"),
// generating them (and removing them afterwards) when there are none.
func systemHostKeys(t *testing.T) []string {
	t.Helper()
	pubs, _ := filepath.Glob("/etc/ssh/ssh_host_*_key.pub")
	if len(pubs) == 0 {
		out, err := exec.Command("ssh-keygen", "-A").CombinedOutput()
		require.NoError(t, err, "ssh-keygen -A: %s", out)
		created, _ := filepath.Glob("/etc/ssh/ssh_host_*_key*")
		t.Cleanup(func() {
			for _, p := range created {
				_ = os.Remove(p)
			}
		})
		pubs, _ = filepath.Glob("/etc/ssh/ssh_host_*_key.pub")
	}
	var keys []string
	for _, p := range pubs {
		b, err := os.ReadFile(p)
		require.NoError(t, err)
		f := strings.Fields(string(b))
		require.GreaterOrEqual(t, len(f), 2, "%s", p)
		keys = append(keys, f[0]+" "+f[1])
	}
	require.NotEmpty(t, keys)
	return keys
}

// throwawayUser creates a user with a usable (not locked) account and a
// temporary home, deleted when the test ends.
func throwawayUser(t *testing.T) (name, home string) {
	t.Helper()
	var b [4]byte
	_, _ = rand.Read(b[:])
	name = "hpxhb" + hex.EncodeToString(b[:])
	home = sshtest.PrivateTempDir(t)
	out, err := exec.Command("useradd", "-M", "-d", home, "-s", "/bin/sh", name).CombinedOutput()
	require.NoError(t, err, "useradd: %s", out)
	t.Cleanup(func() {
		if out, err := exec.Command("userdel", name).CombinedOutput(); err != nil {
			t.Logf("userdel %s: %v: %s", name, err, out)
		}
	})
	// useradd leaves the password field '!' (locked), which sshd refuses
	// with UsePAM no, whatever the authentication method.
	out, err = exec.Command("usermod", "-p", "*", name).CombinedOutput()
	require.NoError(t, err, "usermod: %s", out)
	return name, home
}

// chownR gives dir and everything in it to user.
func chownR(t *testing.T, dir, user string) {
	t.Helper()
	out, err := exec.Command("chown", "-R", user+":", dir).CombinedOutput()
	require.NoError(t, err, "chown: %s", out)
}
