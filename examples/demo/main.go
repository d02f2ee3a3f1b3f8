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
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/url"
	"os"
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
	dir, err := os.MkdirTemp("", "hpcproxy-demo")
	check(err)
	defer os.RemoveAll(dir)

	// 1. The "login node": an SSH server with its own host key, accepting
	// one client key.
	hostKey, clientKeyFile := newSigner(), filepath.Join(dir, "id_ed25519")
	clientKey := writeKey(clientKeyFile)
	login := sshserver.New(hostKey, clientKey.PublicKey())
	sshLn, err := net.Listen("tcp", "127.0.0.1:0")
	check(err)
	login.Start(sshLn)
	defer login.Close()
	sshAddr := sshLn.Addr().String()
	fmt.Printf("1. login node (embedded SSH server) on %s, host key %s\n", sshAddr, ssh.FingerprintSHA256(hostKey.PublicKey()))

	// The user's side: the host key recorded in known_hosts, and an
	// ssh_config naming the login node, as ~/.ssh would on a cluster.
	knownHosts := filepath.Join(dir, "known_hosts")
	check(os.WriteFile(knownHosts, []byte(knownhosts.Line([]string{knownhosts.Normalize(sshAddr)}, hostKey.PublicKey())+"\n"), 0o600))
	_, sshPort, _ := net.SplitHostPort(sshAddr)
	sshConfig := filepath.Join(dir, "ssh_config")
	check(os.WriteFile(sshConfig, []byte(strings.Join([]string{
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
	}, "\n")), 0o600))

	// 2. The destination: a web server that only the login node needs to
	// reach.
	webLn, err := net.Listen("tcp", "127.0.0.1:0")
	check(err)
	web := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello from the web server (%s %s, Via: %q)", r.Method, r.URL.Path, r.Header.Get("Via"))
	})}
	go web.Serve(webLn)
	defer web.Close()
	webAddr := webLn.Addr().String()
	_, webPort, _ := net.SplitHostPort(webAddr)
	fmt.Println("2. web server on", webAddr)

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
	ctx, stop := context.WithCancel(context.Background())
	stopped := make(chan error, 1)
	go func() { stopped <- daemon.Run(ctx) }()
	var proxyAddr string
	select {
	case a := <-ready:
		proxyAddr = a.String()
	case err := <-stopped:
		check(err)
	}
	state, err := hpcproxy.ReadPidFileAt(statePath)
	check(err)
	fmt.Printf("3. per-job hpcproxy on %s, tunnel %s via login1 (state file %s)\n", proxyAddr, state.Method, statePath)

	// SOCKS5 (x/net/proxy), with the name "localhost" sent unresolved and
	// resolved on the login node (socks5h). Per-job mode lets the owner in
	// without the token; other users would need it.
	d, err := proxy.SOCKS5("tcp", proxyAddr, nil, proxy.Direct)
	check(err)
	tr5 := &http.Transport{DialContext: d.(proxy.ContextDialer).DialContext}
	fmt.Println("4. SOCKS5:      ", get(&http.Client{Transport: tr5}, "http://localhost:"+webPort+"/socks5"))
	tr5.CloseIdleConnections()

	// SOCKS4a, spoken by hand (x/net/proxy has no SOCKS4).
	c, err := dialSOCKS4a(proxyAddr, "localhost", webPort)
	check(err)
	fmt.Println("5. SOCKS4a:     ", getOver(c, "localhost:"+webPort, "/socks4a"))

	// HTTP CONNECT, then a request through the tunnel.
	c, err = dialCONNECT(proxyAddr, webAddr)
	check(err)
	fmt.Println("6. HTTP CONNECT:", getOver(c, webAddr, "/connect"))

	// Plain HTTP: net/http sends http:// URLs to a proxy in absolute form;
	// this time with the token in the proxy URL, as ProxyEnvList exports it.
	trh := &http.Transport{Proxy: http.ProxyURL(mustParse(state.URL("http")))}
	fmt.Println("7. plain HTTP:  ", get(&http.Client{Transport: trh}, "http://"+webAddr+"/plain"))
	trh.CloseIdleConnections()

	fmt.Printf("8. the login node was asked for: %s\n", strings.Join(login.Targets(), ", "))
	fmt.Println("9. environment for the job's programs (eval \"$(perjob env)\" prints these as export lines):")
	for _, kv := range hpcproxy.ProxyEnvListFor(state, hpcproxy.EnvOptions{}) {
		if k, _, _ := strings.Cut(kv, "="); k == strings.ToLower(k) {
			fmt.Println("     " + kv)
		}
	}

	stop()
	check(<-stopped)
	if _, err := os.Stat(statePath); os.IsNotExist(err) {
		fmt.Println("10. daemon stopped, state file removed")
	}
}

func mustParse(s string) *url.URL {
	u, err := url.Parse(s)
	check(err)
	return u
}

func newSigner() ssh.Signer {
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	check(err)
	s, err := ssh.NewSignerFromKey(priv)
	check(err)
	return s
}

// writeKey makes a client key and writes it in OpenSSH format, mode 0600.
func writeKey(path string) ssh.Signer {
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	check(err)
	block, err := ssh.MarshalPrivateKey(priv, "")
	check(err)
	check(os.WriteFile(path, pem.EncodeToMemory(block), 0o600))
	s, err := ssh.NewSignerFromKey(priv)
	check(err)
	return s
}

func get(c *http.Client, u string) string {
	resp, err := c.Get(u)
	check(err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	check(err)
	return resp.Status + ": " + string(b)
}

// getOver sends one GET over an established tunnel.
func getOver(c net.Conn, host, path string) string {
	defer c.Close()
	req, err := http.NewRequest("GET", "http://"+host+path, nil)
	check(err)
	req.Close = true
	check(req.Write(c))
	resp, err := http.ReadResponse(bufio.NewReader(c), req)
	check(err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	check(err)
	return resp.Status + ": " + string(b)
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

func check(err error) {
	if err != nil {
		log.Print(err)
		os.Exit(1)
	}
}
