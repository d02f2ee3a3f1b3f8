package hpcproxy

import (
	"bytes"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/crypto/ssh"
	xknownhosts "golang.org/x/crypto/ssh/knownhosts"

	"github.com/hpcproxy/hpcproxy/internal/sshtest"
)

func newTestKey(t *testing.T, typ string) ssh.PublicKey {
	t.Helper()
	s, err := ssh.NewSignerFromKey(sshtest.GenerateKey(t, typ))
	require.NoError(t, err)
	return s.PublicKey()
}

func writeLines(t *testing.T, lines ...string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "known_hosts")
	require.NoError(t, os.WriteFile(p, []byte(strings.Join(lines, "\n")+"\n"), 0o600))
	return p
}

func TestHostKeyVerifier(t *testing.T) {
	ed := newTestKey(t, "ed25519")
	ec := newTestKey(t, "ecdsa")
	remote := &net.TCPAddr{IP: net.IPv4(10, 1, 2, 3), Port: 2222}
	settings := func(user []string, global ...string) *sshSettings {
		return &sshSettings{Host: "login", HostName: "login.example.org", Port: 2222,
			UserKnownHostsFiles: user, GlobalKnownHostsFiles: global}
	}
	verify := func(t *testing.T, s *sshSettings, policy HostKeyPolicy, key ssh.PublicKey) error {
		t.Helper()
		v, err := newHostKeyVerifier(s, policy, discardLogger)
		require.NoError(t, err)
		return v.callback()("ignored:22", remote, key)
	}

	t.Run("known in the global file, user file missing", func(t *testing.T) {
		global := writeLines(t, xknownhosts.Line([]string{"[login.example.org]:2222"}, ed))
		require.NoError(t, verify(t, settings([]string{"/nonexistent/known_hosts"}, global), HostKeyStrict, ed))
	})
	t.Run("port 22 has no brackets", func(t *testing.T) {
		f := writeLines(t, xknownhosts.Line([]string{"login.example.org"}, ed))
		s := settings([]string{f})
		s.Port = 22
		require.NoError(t, verify(t, s, HostKeyStrict, ed))
	})
	t.Run("HostKeyAlias is the name looked up", func(t *testing.T) {
		f := writeLines(t, xknownhosts.Line([]string{"[alias]:2222"}, ed))
		s := settings([]string{f})
		s.HostKeyAlias = "alias"
		require.NoError(t, verify(t, s, HostKeyStrict, ed))
	})
	t.Run("recorded by address only", func(t *testing.T) {
		f := writeLines(t, xknownhosts.Line([]string{"[10.1.2.3]:2222"}, ed))
		require.NoError(t, verify(t, settings([]string{f}), HostKeyStrict, ed))
		var ce *HostKeyChangedError
		require.ErrorAs(t, verify(t, settings([]string{f}), HostKeyStrict, newTestKey(t, "ed25519")), &ce)
		assert.Equal(t, "[10.1.2.3]:2222", ce.Host)
	})
	t.Run("wildcard pattern", func(t *testing.T) {
		f := writeLines(t, xknownhosts.Line([]string{"*.example.org"}, ed))
		require.NoError(t, verify(t, settings([]string{f}), HostKeyStrict, ed))
	})
	t.Run("unknown, no files at all", func(t *testing.T) {
		err := verify(t, settings([]string{"/nonexistent/kh"}), HostKeyStrict, ed)
		var ue *UnknownHostError
		require.ErrorAs(t, err, &ue)
		assert.Equal(t, "[login.example.org]:2222", ue.Host)
		assert.Equal(t, "ssh-ed25519", ue.KeyType)
		assert.Equal(t, ssh.FingerprintSHA256(ed), ue.Fingerprint)
		assert.Contains(t, err.Error(), "/nonexistent/kh")
		assert.Contains(t, err.Error(), "ssh -p 2222 login.example.org")
	})
	t.Run("other key type recorded is a change", func(t *testing.T) {
		f := writeLines(t, xknownhosts.Line([]string{"[login.example.org]:2222"}, ec))
		var ce *HostKeyChangedError
		require.ErrorAs(t, verify(t, settings([]string{f}), HostKeyAcceptNew, ed), &ce)
		assert.Contains(t, ce.Known[0], "ecdsa-sha2-nistp256")
	})
	t.Run("accept-new hashes when HashKnownHosts", func(t *testing.T) {
		f := filepath.Join(t.TempDir(), "sub", "known_hosts")
		s := settings([]string{f})
		s.HashKnownHosts = true
		require.NoError(t, verify(t, s, HostKeyAcceptNew, ed))
		b, err := os.ReadFile(f)
		require.NoError(t, err)
		assert.True(t, strings.HasPrefix(string(b), "|1|"), "got %q", b)
		require.NoError(t, verify(t, s, HostKeyStrict, ed))
	})
	t.Run("accept-new appends after a line without newline", func(t *testing.T) {
		f := filepath.Join(t.TempDir(), "known_hosts")
		other := xknownhosts.Line([]string{"other"}, ec)
		require.NoError(t, os.WriteFile(f, []byte(other), 0o600))
		require.NoError(t, verify(t, settings([]string{f}), HostKeyAcceptNew, ed))
		b, err := os.ReadFile(f)
		require.NoError(t, err)
		assert.Equal(t, other+"\n"+xknownhosts.Line([]string{"[login.example.org]:2222"}, ed)+"\n", string(b))
	})
}

func TestHostKeyAlgorithms(t *testing.T) {
	ed := newTestKey(t, "ed25519")
	rsa := newTestKey(t, "rsa")
	ca := newTestKey(t, "ed25519")
	f := writeLines(t,
		xknownhosts.Line([]string{"[a]:2222"}, ed),
		xknownhosts.Line([]string{"b"}, rsa),
		"@cert-authority c "+strings.TrimSpace(string(ssh.MarshalAuthorizedKey(ca))),
	)
	algos := func(host string, port int, configured []string) []string {
		v, err := newHostKeyVerifier(&sshSettings{HostName: host, Port: port, UserKnownHostsFiles: []string{f}}, HostKeyStrict, discardLogger)
		require.NoError(t, err)
		return v.algorithms("", configured)
	}
	got := algos("a", 2222, nil)
	assert.Equal(t, ssh.KeyAlgoED25519, got[0])
	assert.NotContains(t, got, ssh.CertAlgoED25519v01, "no CA covers a: no certificate algorithms")
	assert.Contains(t, got, ssh.KeyAlgoECDSA256, "other algorithms follow, so a different key type reads as a change, not a negotiation failure")

	got = algos("b", 22, nil)
	assert.Equal(t, []string{ssh.KeyAlgoRSASHA512, ssh.KeyAlgoRSASHA256}, got[:2])

	got = algos("c", 22, nil)
	assert.Equal(t, ssh.CertAlgoED25519v01, got[0])

	got = algos("unknown", 22, nil)
	assert.NotEmpty(t, got)
	for _, a := range got {
		assert.NotContains(t, a, "-cert-")
	}

	got = algos("a", 2222, []string{ssh.KeyAlgoECDSA256, ssh.KeyAlgoED25519})
	assert.Equal(t, []string{ssh.KeyAlgoED25519, ssh.KeyAlgoECDSA256}, got)
}

func TestHostKeyPolicyFromConfig(t *testing.T) {
	var buf bytes.Buffer
	log := slog.New(slog.NewTextHandler(&buf, nil))
	for in, want := range map[string]HostKeyPolicy{
		"yes": HostKeyStrict, "ask": HostKeyStrict, "accept-new": HostKeyAcceptNew, "no": HostKeyStrict, "off": HostKeyStrict,
	} {
		assert.Equal(t, want, hostKeyPolicy(HostKeyStrict, &sshSettings{StrictHostKeyChecking: in}, log), in)
	}
	assert.Contains(t, buf.String(), "level=WARN")
	assert.Contains(t, buf.String(), "always verifies host keys")
	assert.Equal(t, HostKeyAcceptNew, hostKeyPolicy(HostKeyAcceptNew, &sshSettings{StrictHostKeyChecking: "yes"}, log))
}
