// Command shared runs an hpcproxy on a login node, for the compute nodes of
// a cluster: all interfaces, a token required of every client, the state
// file in the user's data dir where jobs find it over NFS.
//
//	shared start            # relay directly from this login node
//	shared status
//	eval "$(shared env)"    # on a compute node: the proxy environment
//	shared stop
//	shared --version
//
// Run `shared --help` and `shared COMMAND --help` for the flags.
package main

import (
	"os"

	"github.com/hpcproxy/hpcproxy"
	"github.com/hpcproxy/hpcproxy/internal/cli"
)

func main() {
	app := &cli.App{Name: "shared", Mode: hpcproxy.ModeShared}
	os.Exit(app.Main(os.Args[1:]))
}
