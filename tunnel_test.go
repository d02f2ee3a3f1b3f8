package hpcproxy

import (
	"flag"
	"io"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestMethodStringSet(t *testing.T) {
	all := []Method{MethodGoSSH, MethodControlMaster, MethodSOCKSUnix, MethodSOCKSTCP, MethodExec, MethodDirect}
	names := []string{"gossh", "controlmaster", "socks-unix", "socks-tcp", "exec", "direct"}
	for i, m := range all {
		assert.Equal(t, names[i], m.String())
		var got Method
		require.NoError(t, got.Set(m.String()))
		assert.Equal(t, m, got, "round trip of %s", m)
		got = 0
		require.NoError(t, got.Set(strings.ToUpper(names[i])), "case is ignored")
		assert.Equal(t, m, got)
	}
	assert.Equal(t, "Method(0)", Method(0).String())
	assert.Equal(t, "Method(42)", Method(42).String())

	for _, bad := range []string{"", "ssh", "gossh,exec", "Method(1)", "socks"} {
		m := MethodExec
		err := m.Set(bad)
		assert.ErrorContains(t, err, "unknown tunnel method", "%q", bad)
		assert.ErrorContains(t, err, "gossh, controlmaster, socks-unix, socks-tcp, exec, direct")
		assert.Equal(t, MethodExec, m, "a failed Set must leave the value alone")
	}

	// Through the flag package, as a command line uses it.
	fs := flag.NewFlagSet("x", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	var m Method
	fs.Var(&m, "method", "")
	require.NoError(t, fs.Parse([]string{"-method", "socks-tcp"}))
	assert.Equal(t, MethodSOCKSTCP, m)
	assert.Error(t, fs.Parse([]string{"-method", "nope"}))
}

func TestMethodsStringSet(t *testing.T) {
	var ms Methods
	require.NoError(t, ms.Set("gossh, exec,,direct"))
	assert.Equal(t, Methods{MethodGoSSH, MethodExec, MethodDirect}, ms)
	assert.Equal(t, "gossh,exec,direct", ms.String())

	var back Methods
	require.NoError(t, back.Set(ms.String()))
	assert.Equal(t, ms, back, "round trip")
	require.NoError(t, back.Set(Methods(DefaultMethods).String()))
	assert.Equal(t, Methods(DefaultMethods), back)

	assert.Equal(t, "", Methods(nil).String())
	for _, bad := range []string{"", " , ", "gossh,nope"} {
		before := Methods{MethodExec}
		err := before.Set(bad)
		assert.Error(t, err, "%q", bad)
		assert.Equal(t, Methods{MethodExec}, before, "a failed Set must leave the list alone")
	}
	assert.EqualError(t, new(Methods).Set(","), "hpcproxy: empty tunnel method list")
	assert.ErrorContains(t, new(Methods).Set("gossh,nope"), `unknown tunnel method "nope"`)
}

func TestHostKeyPolicyStringSet(t *testing.T) {
	for _, p := range []HostKeyPolicy{HostKeyStrict, HostKeyAcceptNew} {
		var got HostKeyPolicy = 7
		require.NoError(t, got.Set(p.String()))
		assert.Equal(t, p, got, "round trip of %s", p)
	}
	assert.Equal(t, "strict", HostKeyStrict.String())
	assert.Equal(t, "accept-new", HostKeyAcceptNew.String())
	assert.Equal(t, "HostKeyPolicy(5)", HostKeyPolicy(5).String())
	for in, want := range map[string]HostKeyPolicy{"yes": HostKeyStrict, "STRICT": HostKeyStrict, "Accept-New": HostKeyAcceptNew} {
		got := HostKeyAcceptNew
		if want == HostKeyAcceptNew {
			got = HostKeyStrict
		}
		require.NoError(t, got.Set(in), in)
		assert.Equal(t, want, got, in)
	}
	// "no" and "ask" are not policies: host keys are always checked.
	for _, bad := range []string{"no", "off", "ask", "", "accept"} {
		p := HostKeyAcceptNew
		err := p.Set(bad)
		assert.ErrorContains(t, err, "unknown host key policy", "%q", bad)
		assert.Equal(t, HostKeyAcceptNew, p)
	}
}
