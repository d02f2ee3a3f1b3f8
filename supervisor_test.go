package hpcproxy

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/hpcproxy/hpcproxy/internal/sshtest"
)

// droppableTunnel is a direct tunnel whose link can be "cut" by the test,
// to drive the supervisor's state machine without waiting on real timeouts.
type droppableTunnel struct {
	directTunnel
	mu  sync.Mutex
	err error
}

func (t *droppableTunnel) drop(err error) {
	t.mu.Lock()
	t.err = err
	t.mu.Unlock()
	t.Close()
}

func (t *droppableTunnel) Err() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.err
}

// scriptedEstablish hands out droppable tunnels; while failing is set it
// fails instead, counting attempts. Its start is the per-method hook of
// establishChain: the methods in refuse fail.
type scriptedEstablish struct {
	mu      sync.Mutex
	failing bool
	refuse  map[Method]bool
	tunnels []*droppableTunnel
}

func (s *scriptedEstablish) establish(ctx context.Context, cfg TunnelConfig) (*Tunnel, error) {
	impl, err := s.start(ctx, &cfg, MethodDirect)
	if err != nil {
		return nil, err
	}
	return &Tunnel{method: MethodDirect, impl: impl}, nil
}

func (s *scriptedEstablish) start(_ context.Context, _ *TunnelConfig, m Method) (tunnelImpl, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case s.failing:
		return nil, errors.New("sshd unreachable")
	case s.refuse[m]:
		return nil, fmt.Errorf("%s refused", m)
	}
	dt := &droppableTunnel{directTunnel: directTunnel{done: make(chan struct{})}}
	s.tunnels = append(s.tunnels, dt)
	return dt, nil
}

func (s *scriptedEstablish) setRefused(m Method, v bool) {
	s.mu.Lock()
	s.refuse[m] = v
	s.mu.Unlock()
}

func (s *scriptedEstablish) setFailing(v bool) {
	s.mu.Lock()
	s.failing = v
	s.mu.Unlock()
}

func (s *scriptedEstablish) last() *droppableTunnel {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.tunnels[len(s.tunnels)-1]
}

func TestSupervisorFirstFailureIsReported(t *testing.T) {
	se := &scriptedEstablish{failing: true}
	_, err := SuperviseTunnel(context.Background(), SupervisorConfig{establish: se.establish})
	require.ErrorContains(t, err, "sshd unreachable")
}

func TestSupervisorReconnects(t *testing.T) {
	se := &scriptedEstablish{}
	var mu sync.Mutex
	var seen []TunnelStatus
	st, err := SuperviseTunnel(context.Background(), SupervisorConfig{
		establish:  se.establish,
		MinBackoff: 10 * time.Millisecond,
		MaxBackoff: 40 * time.Millisecond,
		DialGrace:  5 * time.Second,
		OnChange: func(s TunnelState, _ *Tunnel) {
			mu.Lock()
			seen = append(seen, s.Status)
			mu.Unlock()
		},
	})
	require.NoError(t, err)
	defer st.Close()
	echo := startEchoServer(t)

	// Drop the link while the "login node" is unreachable: dials made during
	// the outage wait for the tunnel and then succeed.
	se.setFailing(true)
	se.last().drop(errors.New("keepalive timeout"))
	require.Eventually(t, func() bool { return st.State().Attempts >= 3 }, 5*time.Second, 5*time.Millisecond)
	assert.Equal(t, TunnelReconnecting, st.State().Status)
	assert.ErrorContains(t, st.State().LastError, "sshd unreachable")

	dialed := make(chan error, 1)
	go func() {
		c, err := st.Dial(context.Background(), "tcp", echo)
		if err == nil {
			c.Close()
		}
		dialed <- err
	}()
	time.Sleep(50 * time.Millisecond)
	se.setFailing(false)
	select {
	case err := <-dialed:
		require.NoError(t, err, "a dial during the outage should succeed once the tunnel is back")
	case <-time.After(5 * time.Second):
		t.Fatal("dial during outage did not complete after reconnect")
	}
	state := st.State()
	assert.Equal(t, TunnelUp, state.Status)
	assert.Equal(t, 1, state.Reconnects)
	assert.Zero(t, state.Attempts)

	require.NoError(t, st.Close())
	mu.Lock()
	defer mu.Unlock()
	assert.Equal(t, TunnelUp, seen[0])
	assert.Contains(t, seen, TunnelReconnecting)
	assert.Equal(t, TunnelClosed, seen[len(seen)-1])
}

func TestSupervisorBackoffIsCapped(t *testing.T) {
	se := &scriptedEstablish{}
	waits := make(chan time.Duration, 100)
	st, err := SuperviseTunnel(context.Background(), SupervisorConfig{
		establish:  se.establish,
		MinBackoff: 100 * time.Millisecond,
		MaxBackoff: 800 * time.Millisecond,
		sleep: func(ctx context.Context, d time.Duration) bool {
			select {
			case waits <- d:
			case <-ctx.Done():
				return false
			}
			return ctx.Err() == nil
		},
	})
	require.NoError(t, err)
	defer st.Close()
	se.setFailing(true)
	se.last().drop(nil)
	// Each wait lies in [0, backoff] (full jitter); backoff doubles from
	// 100ms and stays at the 800ms cap.
	for i, upper := range []time.Duration{100, 200, 400, 800, 800, 800} {
		upper *= time.Millisecond
		got := <-waits
		assert.GreaterOrEqual(t, got, time.Duration(0), "wait %d", i)
		assert.LessOrEqual(t, got, upper, "wait %d", i)
	}
}

func TestSupervisorDialGraceExpires(t *testing.T) {
	se := &scriptedEstablish{}
	st, err := SuperviseTunnel(context.Background(), SupervisorConfig{
		Tunnel:     TunnelConfig{Destination: "login1"},
		establish:  se.establish,
		MinBackoff: 10 * time.Millisecond,
		DialGrace:  50 * time.Millisecond,
	})
	require.NoError(t, err)
	defer st.Close()
	se.setFailing(true)
	se.last().drop(errors.New("link down"))
	require.Eventually(t, func() bool { return st.State().Status == TunnelReconnecting }, time.Second, time.Millisecond)

	_, err = st.Dial(context.Background(), "tcp", "example.invalid:80")
	require.ErrorIs(t, err, ErrTunnelDown)
	assert.ErrorContains(t, err, "reconnecting to login1")

	// A cancelled ctx ends the wait early, and still says why.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err = st.Dial(ctx, "tcp", "example.invalid:80")
	require.ErrorIs(t, err, ErrTunnelDown)
	require.ErrorIs(t, err, context.Canceled)
}

func TestSupervisorCloseWakesWaitingDials(t *testing.T) {
	se := &scriptedEstablish{}
	st, err := SuperviseTunnel(context.Background(), SupervisorConfig{
		establish: se.establish, MinBackoff: 10 * time.Millisecond, DialGrace: time.Minute,
	})
	require.NoError(t, err)
	se.setFailing(true)
	se.last().drop(nil)
	require.Eventually(t, func() bool { return st.State().Status == TunnelReconnecting }, time.Second, time.Millisecond)
	dialed := make(chan error, 1)
	go func() {
		_, err := st.Dial(context.Background(), "tcp", "127.0.0.1:1")
		dialed <- err
	}()
	time.Sleep(20 * time.Millisecond)
	require.NoError(t, st.Close())
	select {
	case err := <-dialed:
		require.ErrorIs(t, err, ErrTunnelDown)
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not wake a waiting dial")
	}
	assert.Equal(t, TunnelClosed, st.State().Status)
	_, err = st.Dial(context.Background(), "tcp", "127.0.0.1:1")
	require.ErrorIs(t, err, ErrTunnelDown)
	require.NoError(t, st.Close(), "Close is idempotent")
}

// TestSupervisorReconnectFallsThroughChain drops a gossh tunnel while
// gossh cannot come back: the supervisor goes down the method chain and
// reconnects with controlmaster. On the next drop it starts from the top of
// the chain again, and gossh carries the tunnel once more.
func TestSupervisorReconnectFallsThroughChain(t *testing.T) {
	cs := &scriptedEstablish{refuse: map[Method]bool{}}
	ups := make(chan Method, 16)
	st, err := SuperviseTunnel(context.Background(), SupervisorConfig{
		Tunnel: TunnelConfig{Destination: "login1", Methods: []Method{MethodGoSSH, MethodControlMaster, MethodSOCKSUnix}},
		establish: func(ctx context.Context, cfg TunnelConfig) (*Tunnel, error) {
			return establishChain(ctx, cfg, cs.start)
		},
		MinBackoff: 10 * time.Millisecond,
		OnChange: func(s TunnelState, tun *Tunnel) {
			if s.Status == TunnelUp {
				ups <- tun.Method()
			}
		},
	})
	require.NoError(t, err)
	defer st.Close()
	require.Equal(t, MethodGoSSH, <-ups)

	// reconnect drops the tunnel and returns the method that came back.
	reconnect := func(why string) Method {
		t.Helper()
		cs.last().drop(errors.New(why))
		select {
		case m := <-ups:
			return m
		case <-time.After(5 * time.Second):
			t.Fatalf("no reconnect within 5s after %s", why)
			return 0
		}
	}

	cs.setRefused(MethodGoSSH, true) // the agent went away, say
	assert.Equal(t, MethodControlMaster, reconnect("keepalive timeout"), "the reconnect falls through to the next method")
	state := st.State()
	assert.Equal(t, MethodControlMaster, state.Method)
	assert.Equal(t, 1, state.Reconnects)
	assert.ErrorContains(t, state.LastError, "keepalive timeout")

	cs.setRefused(MethodGoSSH, false)
	assert.Equal(t, MethodGoSSH, reconnect("link down"), "each reconnect starts from the top of the chain")
	assert.Equal(t, 2, st.State().Reconnects)
}

// TestSupervisorSSHDRestart stops the real sshd under a gossh tunnel: the
// supervisor notices, reports reconnecting, dials during the outage fail
// with ErrTunnelDown once the grace is over, and after sshd is back a dial
// goes through again.
func TestSupervisorSSHDRestart(t *testing.T) {
	sshd := sshtest.StartSSHD(t, sshtest.Options{})
	echo := startEchoServer(t)
	changes := make(chan TunnelState, 1024)
	st, err := SuperviseTunnel(context.Background(), SupervisorConfig{
		Tunnel: TunnelConfig{
			Destination:       "sshtest",
			SSHConfigFile:     sshd.SSHConfigFile,
			Methods:           []Method{MethodGoSSH},
			KeepaliveInterval: 200 * time.Millisecond,
			KeepaliveCountMax: 2,
			ConnectTimeout:    2 * time.Second,
		},
		MinBackoff: 50 * time.Millisecond,
		MaxBackoff: 200 * time.Millisecond,
		DialGrace:  100 * time.Millisecond,
		OnChange:   func(s TunnelState, _ *Tunnel) { changes <- s },
	})
	require.NoError(t, err)
	defer st.Close()
	require.NoError(t, echoOnce(context.Background(), st.Current(), echo, []byte("before")))
	require.Equal(t, TunnelUp, (<-changes).Status)

	sshd.Stop()
	waitStatus(t, changes, TunnelReconnecting)
	_, err = st.Dial(context.Background(), "tcp", echo)
	require.ErrorIs(t, err, ErrTunnelDown)
	require.ErrorContains(t, err, "reconnecting")

	sshd.Start(t)
	waitStatus(t, changes, TunnelUp)
	c, err := st.Dial(context.Background(), "tcp", echo)
	require.NoError(t, err)
	c.Close()
	assert.Equal(t, 1, st.State().Reconnects)
	assert.Equal(t, MethodGoSSH, st.State().Method)
}

func waitStatus(t *testing.T, changes <-chan TunnelState, want TunnelStatus) {
	t.Helper()
	timeout := time.After(20 * time.Second)
	for {
		select {
		case s := <-changes:
			if s.Status == want {
				return
			}
		case <-timeout:
			t.Fatalf("status %v not reached within 20s", want)
		}
	}
}
