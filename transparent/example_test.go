package transparent_test

import (
	"context"
	"log"
	"os"
	"os/exec"

	"github.com/hpcproxy/hpcproxy"
	"github.com/hpcproxy/hpcproxy/transparent"
)

// A program that embeds hpcproxy runs a command transparently through its
// own tunnel: every TCP connection of the command, and its DNS, goes
// through tun.Dial, names resolved on the login node. main must call
// transparent.Init first.
func Example() {
	transparent.Init() // first thing in main: the namespace stage runs here

	ctx := context.Background()
	tun, err := hpcproxy.EstablishTunnel(ctx, hpcproxy.TunnelConfig{Destination: "login1"})
	if err != nil {
		log.Fatal(err)
	}
	defer tun.Close()

	cmd := exec.Command("java", "-jar", "tool.jar")
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	s, err := transparent.Start(transparent.Config{Dial: tun.Dial}, cmd)
	if err != nil {
		log.Fatal(err) // a *transparent.SetupError names the node's setting
	}
	err = cmd.Wait()
	s.Close()
	if err != nil {
		log.Fatal(err)
	}
}
