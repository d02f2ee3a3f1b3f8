package sshtest

import (
	"net"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/agent"

	"github.com/hpcproxy/hpcproxy/internal/testenv"
)

// Agent is a real OpenSSH ssh-agent started for one test.
type Agent struct {
	Socket string // its socket: set SSH_AUTH_SOCK to this

	client agent.ExtendedAgent
	conn   net.Conn
}

// StartAgent runs `ssh-agent -D -a SOCK` and kills it in t.Cleanup. Without
// ssh-agent the test is skipped (fails under CI).
func StartAgent(t testing.TB) *Agent {
	t.Helper()
	bin := testenv.LookPath(t, "ssh-agent")
	a := &Agent{Socket: filepath.Join(privateTempDir(t), "agent.sock")}
	cmd := exec.Command(bin, "-D", "-a", a.Socket)
	if err := cmd.Start(); err != nil {
		t.Fatalf("sshtest: start ssh-agent: %v", err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		if a.conn != nil {
			_ = a.conn.Close()
		}
		_ = cmd.Process.Kill()
		<-exited
	})
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.Dial("unix", a.Socket)
		if err == nil {
			a.conn = c
			break
		}
		select {
		case <-exited:
			t.Fatalf("sshtest: ssh-agent exited at start")
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("sshtest: ssh-agent socket %s did not appear: %v", a.Socket, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	a.client = agent.NewClient(a.conn)
	return a
}

// Add loads a private key (as GenerateKey returns it) into the agent, with
// an optional certificate for it.
func (a *Agent) Add(t testing.TB, key any, cert *ssh.Certificate) {
	t.Helper()
	if err := a.client.Add(agent.AddedKey{PrivateKey: key, Certificate: cert}); err != nil {
		t.Fatalf("sshtest: agent add: %v", err)
	}
}

// Signers returns the agent's keys as signers.
func (a *Agent) Signers(t testing.TB) []ssh.Signer {
	t.Helper()
	s, err := a.client.Signers()
	if err != nil {
		t.Fatalf("sshtest: agent signers: %v", err)
	}
	return s
}
