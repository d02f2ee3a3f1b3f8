package hpcproxy

import (
	"context"
	"os"
	"os/user"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/hpcproxy/hpcproxy/internal/testenv"
)

const testConfig = `
Host login
  HostName login.example.org
  Port 2222
  User alice
  IdentityFile ~/keys/%h_%r
  IdentityFile /abs/key
  IdentitiesOnly yes
  CertificateFile %d/certs/c.pub
  ProxyJump gw1,bob@gw2:2200
  UserKnownHostsFile ~/kh1 /tmp/kh2
  GlobalKnownHostsFile /etc/kh
  StrictHostKeyChecking accept-new
  ConnectTimeout 7
  ServerAliveInterval 1m
  ServerAliveCountMax 5
  Ciphers aes256-gcm@openssh.com,aes128-ctr
  HostKeyAlgorithms ssh-ed25519
  HostKeyAlias loginalias
  HashKnownHosts yes

Host *.cluster
  HostName %h.example.org

Host *
  User fallback
  IdentityAgent none
`

// TestResolve checks that `ssh -G` and the parser agree on a config, and
// the precedence of destination parts and SSHOptions over it.
func TestResolve(t *testing.T) {
	u, err := user.Current()
	require.NoError(t, err)
	home := u.HomeDir
	cfgFile := filepath.Join(t.TempDir(), "config")
	require.NoError(t, os.WriteFile(cfgFile, []byte(testConfig), 0o600))

	paths := map[string]func(t *testing.T) *sshResolver{
		"ssh -G": func(t *testing.T) *sshResolver {
			testenv.LookPath(t, "ssh")
			return &sshResolver{configFile: cfgFile, log: discardLogger}
		},
		"parser": func(t *testing.T) *sshResolver {
			return &sshResolver{configFile: cfgFile, forceParse: true, log: discardLogger}
		},
	}
	for name, newResolver := range paths {
		t.Run(name, func(t *testing.T) {
			resolve := func(dest string, opts ...string) *sshSettings {
				t.Helper()
				r := newResolver(t)
				r.options = opts
				d, err := parseDestination(dest)
				require.NoError(t, err)
				s, err := r.resolve(context.Background(), d)
				require.NoError(t, err)
				return s
			}
			s := resolve("login")
			assert.Equal(t, "login", s.Host)
			assert.Equal(t, "login.example.org", s.HostName)
			assert.Equal(t, 2222, s.Port)
			assert.Equal(t, "alice", s.User)
			assert.Equal(t, []string{filepath.Join(home, "keys/login.example.org_alice"), "/abs/key"}, s.IdentityFiles)
			assert.True(t, s.IdentitiesOnly)
			assert.Equal(t, []string{filepath.Join(home, "certs/c.pub")}, s.CertificateFiles)
			assert.Equal(t, "gw1,bob@gw2:2200", s.ProxyJump)
			assert.Equal(t, []string{filepath.Join(home, "kh1"), "/tmp/kh2"}, s.UserKnownHostsFiles)
			assert.Equal(t, []string{"/etc/kh"}, s.GlobalKnownHostsFiles)
			assert.Equal(t, "accept-new", s.StrictHostKeyChecking)
			assert.Equal(t, 7*time.Second, s.ConnectTimeout)
			assert.Equal(t, time.Minute, s.ServerAliveInterval)
			assert.Equal(t, 5, s.ServerAliveCountMax)
			assert.Equal(t, []string{"aes256-gcm@openssh.com", "aes128-ctr"}, s.Ciphers)
			assert.Equal(t, []string{"ssh-ed25519"}, s.HostKeyAlgorithms)
			assert.Equal(t, "loginalias", s.HostKeyAlias)
			assert.True(t, s.HashKnownHosts)
			assert.Equal(t, "none", s.IdentityAgent)
			assert.Equal(t, "login.example.org:2222", s.addr())

			// Defaults for a host the config barely mentions.
			s = resolve("node7.cluster")
			assert.Equal(t, "node7.cluster.example.org", s.HostName)
			assert.Equal(t, 22, s.Port)
			assert.Equal(t, "fallback", s.User)
			assert.Contains(t, s.IdentityFiles, filepath.Join(home, ".ssh/id_ed25519"))
			assert.Contains(t, s.IdentityFiles, filepath.Join(home, ".ssh/id_rsa"))
			assert.Equal(t, []string{filepath.Join(home, ".ssh/known_hosts"), filepath.Join(home, ".ssh/known_hosts2")}, s.UserKnownHostsFiles)
			assert.Equal(t, "ask", s.StrictHostKeyChecking)
			assert.Zero(t, s.ConnectTimeout)
			assert.Zero(t, s.ServerAliveInterval)
			assert.Equal(t, 3, s.ServerAliveCountMax)
			assert.Nil(t, s.Ciphers, "default ciphers must read as unset")
			assert.Nil(t, s.HostKeyAlgorithms, "default host key algorithms must read as unset")
			assert.Empty(t, s.ProxyJump)

			// SSHOptions beat the config; the destination's parts beat both.
			s = resolve("login", "User=dave", "Port=4444", "ConnectTimeout=3", "ProxyJump=none")
			assert.Equal(t, "dave", s.User)
			assert.Equal(t, 4444, s.Port)
			assert.Equal(t, 3*time.Second, s.ConnectTimeout)
			assert.Empty(t, s.ProxyJump)
			s = resolve("carol@login:3333", "User=dave", "Port=4444")
			assert.Equal(t, "carol", s.User)
			assert.Equal(t, 3333, s.Port)
		})
	}
}

// TestResolveNoBinary checks the fallback to the parser when the ssh
// binary is missing.
func TestResolveNoBinary(t *testing.T) {
	cfgFile := filepath.Join(t.TempDir(), "config")
	require.NoError(t, os.WriteFile(cfgFile, []byte(testConfig), 0o600))
	r := &sshResolver{binary: filepath.Join(t.TempDir(), "no-ssh"), configFile: cfgFile, log: discardLogger}
	s, err := r.resolve(context.Background(), destination{Host: "login"})
	require.NoError(t, err)
	assert.Equal(t, "ssh_config parser", s.Source)
	assert.Equal(t, "login.example.org", s.HostName)
}

func TestResolveParserHome(t *testing.T) {
	// The parser reads ~/.ssh/config from the passwd home it is given,
	// whatever $HOME says.
	home := t.TempDir()
	t.Setenv("HOME", t.TempDir())
	require.NoError(t, os.MkdirAll(filepath.Join(home, ".ssh"), 0o700))
	require.NoError(t, os.WriteFile(filepath.Join(home, ".ssh", "config"), []byte("Host x\n  HostName y.example\n"), 0o600))
	r := &sshResolver{forceParse: true, home: home, localUser: "me", log: discardLogger}
	s, err := r.resolve(context.Background(), destination{Host: "x"})
	require.NoError(t, err)
	assert.Equal(t, "y.example", s.HostName)
	assert.Equal(t, "me", s.User)
	assert.Equal(t, filepath.Join(home, ".ssh/known_hosts"), s.UserKnownHostsFiles[0])
}

func TestResolveParserRejectsMatchExec(t *testing.T) {
	cfgFile := filepath.Join(t.TempDir(), "config")
	require.NoError(t, os.WriteFile(cfgFile, []byte("Match exec true\n  User x\n"), 0o600))
	r := &sshResolver{configFile: cfgFile, forceParse: true, log: discardLogger}
	_, err := r.resolve(context.Background(), destination{Host: "h"})
	require.ErrorContains(t, err, "Match")
}

func TestJumpHops(t *testing.T) {
	hops, err := jumpHops("gw1, bob@gw2:2200,ssh://carol@gw3")
	require.NoError(t, err)
	assert.Equal(t, []destination{{Host: "gw1"}, {User: "bob", Host: "gw2", Port: 2200}, {User: "carol", Host: "gw3"}}, hops)
	hops, err = jumpHops("none")
	require.NoError(t, err)
	assert.Empty(t, hops)
	_, err = jumpHops("gw1,,gw2")
	assert.Error(t, err)
}

func TestParseSeconds(t *testing.T) {
	for in, want := range map[string]time.Duration{
		"": 0, "none": 0, "0": 0, "15": 15 * time.Second, "1m30s": 90 * time.Second, "2h": 2 * time.Hour, "1M": time.Minute,
	} {
		got, err := parseSeconds("X", in)
		require.NoError(t, err, in)
		assert.Equal(t, want, got, in)
	}
	for _, in := range []string{"-1", "abc", "5x"} {
		_, err := parseSeconds("X", in)
		assert.Error(t, err, in)
	}
}
