// Command demo shows hpcproxy's whole path on one machine, with no setup:
// an embedded SSH server on 127.0.0.1 stands in for the login node, a
// per-job hpcproxy daemon tunnels through it (host key verified against a
// known_hosts file, public-key login), and a web server behind the "login
// node" is fetched through the daemon's one port with SOCKS5, SOCKS4a,
// HTTP CONNECT and plain HTTP. It prints each step.
//
//	go run ./examples/demo
package main

import (
	"bufio"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/binary"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/knownhosts"
	"golang.org/x/net/proxy"

	"github.com/hpcproxy/hpcproxy"
	"github.com/hpcproxy/hpcproxy/internal/sshserver"
)

func main() {
	log.SetFlags(0)
	log.SetPrefix("demo: ")
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	err := run(ctx, os.Stdout, "")
	stop()
	if err != nil {
		log.Fatal(err) // after run's deferred clean-up, key files included
	}
}

// run is the demo, printing to out, with its files (a private key among
// them) in a temporary directory under tmpBase ("" for the default),
// removed before it returns, whether it succeeded or not.
func run(ctx context.Context, out io.Writer, tmpBase string) error {
	dir, err := os.MkdirTemp(tmpBase, "hpcproxy-demo")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)

	// 1. The "login node": an SSH server with its own host key, accepting
	// one client key.
	hostKey, err := newSigner()
	if err != nil {
		return err
	}
	clientKeyFile := filepath.Join(dir, "id_ed25519")
	clientKey, err := writeKey(clientKeyFile)
	if err != nil {
		return err
	}
	login := sshserver.New(hostKey, clientKey.PublicKey())
	sshLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	login.Start(sshLn)
	defer login.Close()
	sshAddr := sshLn.Addr().String()
	fmt.Fprintf(out, "1. login node (embedded SSH server) on %s, host key %s\n", sshAddr, ssh.FingerprintSHA256(hostKey.PublicKey()))

	// The user's side: the host key recorded in known_hosts, and an
	// ssh_config naming the login node, as ~/.ssh would on a cluster.
	knownHosts := filepath.Join(dir, "known_hosts")
	if err := os.WriteFile(knownHosts, []byte(knownhosts.Line([]string{knownhosts.Normalize(sshAddr)}, hostKey.PublicKey())+"\n"), 0o600); err != nil {
		return err
	}
	_, sshPort, _ := net.SplitHostPort(sshAddr)
	sshConfig := filepath.Join(dir, "ssh_config")
	if err := os.WriteFile(sshConfig, []byte(strings.Join([]string{
		"Host login1",
		"  HostName 127.0.0.1",
		"  Port " + sshPort,
		"  User demo",
		"  IdentityFile " + clientKeyFile,
		"  IdentitiesOnly yes",
		"  UserKnownHostsFile " + knownHosts,
		"  GlobalKnownHostsFile /dev/null",
		"  StrictHostKeyChecking yes",
		"",
	}, "\n")), 0o600); err != nil {
		return err
	}

	// 2. The destination: a web server that only the login node needs to
	// reach.
	webLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	web := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello from the web server (%s %s, Via: %q)", r.Method, r.URL.Path, r.Header.Get("Via"))
	})}
	go web.Serve(webLn)
	defer web.Close()
	webAddr := webLn.Addr().String()
	_, webPort, _ := net.SplitHostPort(webAddr)
	fmt.Fprintln(out, "2. web server on", webAddr)

	// 3. The per-job daemon, tunnelling to login1 by the first method of the
	// fallback chain that works.
	statePath := filepath.Join(dir, "state", "proxy.json")
	ready := make(chan net.Addr, 1)
	daemon := &hpcproxy.Daemon{
		Mode:      hpcproxy.ModePerJob,
		Tunnel:    hpcproxy.TunnelConfig{Destination: "login1", SSHConfigFile: sshConfig},
		StatePath: statePath,
		OnReady:   func(a net.Addr) { ready <- a },
	}
	ctx, stopDaemon := context.WithCancel(ctx)
	var daemonErr error
	stopped := make(chan struct{})
	go func() {
		daemonErr = daemon.Run(ctx)
		close(stopped)
	}()
	// Whatever happens, the daemon stops (and removes its state file)
	// before dir goes.
	defer func() {
		stopDaemon()
		<-stopped
	}()
	var proxyAddr string
	select {
	case a := <-ready:
		proxyAddr = a.String()
	case <-stopped:
		if daemonErr == nil {
			return errors.New("the daemon stopped before it was ready")
		}
		return daemonErr
	}
	state, err := hpcproxy.ReadPidFileAt(statePath)
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "3. per-job hpcproxy on %s, tunnel %s via login1 (state file %s)\n", proxyAddr, state.Method, statePath)

	// SOCKS5 (x/net/proxy), with the name "localhost" sent unresolved and
	// resolved on the login node (socks5h). Per-job mode lets the owner in
	// without the token; other users would need it.
	d, err := proxy.SOCKS5("tcp", proxyAddr, nil, proxy.Direct)
	if err != nil {
		return err
	}
	tr5 := &http.Transport{DialContext: d.(proxy.ContextDialer).DialContext}
	got, err := get(&http.Client{Transport: tr5}, "http://localhost:"+webPort+"/socks5")
	tr5.CloseIdleConnections()
	if err != nil {
		return fmt.Errorf("SOCKS5: %w", err)
	}
	fmt.Fprintln(out, "4. SOCKS5:      ", got)

	// SOCKS4a, spoken by hand (x/net/proxy has no SOCKS4).
	c, err := dialSOCKS4a(proxyAddr, "localhost", webPort)
	if err != nil {
		return err
	}
	if got, err = getOver(c, "localhost:"+webPort, "/socks4a"); err != nil {
		return fmt.Errorf("SOCKS4a: %w", err)
	}
	fmt.Fprintln(out, "5. SOCKS4a:     ", got)

	// HTTP CONNECT, then a request through the tunnel.
	if c, err = dialCONNECT(proxyAddr, webAddr); err != nil {
		return err
	}
	if got, err = getOver(c, webAddr, "/connect"); err != nil {
		return fmt.Errorf("HTTP CONNECT: %w", err)
	}
	fmt.Fprintln(out, "6. HTTP CONNECT:", got)

	// Plain HTTP: net/http sends http:// URLs to a proxy in absolute form;
	// this time with the token in the proxy URL, as ProxyEnvList exports it.
	pu, err := url.Parse(state.URL("http"))
	if err != nil {
		return err
	}
	trh := &http.Transport{Proxy: http.ProxyURL(pu)}
	got, err = get(&http.Client{Transport: trh}, "http://"+webAddr+"/plain")
	trh.CloseIdleConnections()
	if err != nil {
		return fmt.Errorf("plain HTTP: %w", err)
	}
	fmt.Fprintln(out, "7. plain HTTP:  ", got)

	fmt.Fprintf(out, "8. the login node was asked for: %s\n", strings.Join(login.Targets(), ", "))
	fmt.Fprintln(out, "9. environment for the job's programs (eval \"$(perjob env)\" prints these as export lines):")
	for _, kv := range hpcproxy.ProxyEnvListFor(state, hpcproxy.EnvOptions{}) {
		if k, _, _ := strings.Cut(kv, "="); k == strings.ToLower(k) {
			fmt.Fprintln(out, "     "+kv)
		}
	}

	stopDaemon()
	<-stopped
	if daemonErr != nil {
		return daemonErr
	}
	if _, err := os.Stat(statePath); os.IsNotExist(err) {
		fmt.Fprintln(out, "10. daemon stopped, state file removed")
	}
	return nil
}

func newSigner() (ssh.Signer, error) {
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, err
	}
	return ssh.NewSignerFromKey(priv)
}

// writeKey makes a client key and writes it in OpenSSH format, mode 0600.
func writeKey(path string) (ssh.Signer, error) {
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, err
	}
	block, err := ssh.MarshalPrivateKey(priv, "")
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(path, pem.EncodeToMemory(block), 0o600); err != nil {
		return nil, err
	}
	return ssh.NewSignerFromKey(priv)
}

func get(c *http.Client, u string) (string, error) {
	resp, err := c.Get(u)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	return resp.Status + ": " + string(b), nil
}

// getOver sends one GET over an established tunnel.
func getOver(c net.Conn, host, path string) (string, error) {
	defer c.Close()
	req, err := http.NewRequest("GET", "http://"+host+path, nil)
	if err != nil {
		return "", err
	}
	req.Close = true
	if err := req.Write(c); err != nil {
		return "", err
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	return resp.Status + ": " + string(b), nil
}

func dialSOCKS4a(proxyAddr, host, port string) (net.Conn, error) {
	p, err := strconv.ParseUint(port, 10, 16)
	if err != nil {
		return nil, err
	}
	c, err := net.Dial("tcp", proxyAddr)
	if err != nil {
		return nil, err
	}
	req := binary.BigEndian.AppendUint16([]byte{4, 1}, uint16(p))
	req = append(req, 0, 0, 0, 1, 0) // 0.0.0.1: a name follows; empty user ID
	req = append(append(req, host...), 0)
	reply := make([]byte, 8)
	if _, err := c.Write(req); err != nil {
		c.Close()
		return nil, err
	}
	if _, err := io.ReadFull(c, reply); err != nil || reply[1] != 0x5a {
		c.Close()
		return nil, fmt.Errorf("socks4a refused: %x %v", reply, err)
	}
	return c, nil
}

func dialCONNECT(proxyAddr, target string) (net.Conn, error) {
	c, err := net.Dial("tcp", proxyAddr)
	if err != nil {
		return nil, err
	}
	fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", target, target)
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
	if err != nil || resp.StatusCode != 200 || br.Buffered() > 0 {
		c.Close()
		return nil, fmt.Errorf("CONNECT refused: %v %v", resp, err)
	}
	return c, nil
}
