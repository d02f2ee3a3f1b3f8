// Command perjob runs an hpcproxy inside a batch job on a compute node:
// it tunnels through SSH to a login node and listens on 127.0.0.1 for the
// job's own processes, until the job ends.
//
//	perjob start --via login1     # or HPCPROXY_VIA, or the job's submit host
//	eval "$(perjob env)"          # http_proxy, https_proxy, all_proxy, no_proxy, JAVA_TOOL_OPTIONS
//	eval "`perjob env`"           # csh, tcsh (fish: perjob env | source)
//	perjob run -- pip install numpy
//	perjob run --transparent -- java -jar tool.jar   # programs that ignore proxy settings
//	git -c core.sshCommand='ssh -o ProxyCommand="perjob connect %h %p"' clone git@github.com:org/repo
//	perjob expose 8888            # the job's Jupyter on the login node; prints the ssh -L line
//	perjob forward 5432=db.internal:5432
//	perjob status
//	perjob stop
//	perjob --version
//
// Run `perjob --help` and `perjob COMMAND --help` for the flags.
package main

import (
	"os"

	"github.com/hpcproxy/hpcproxy"
	"github.com/hpcproxy/hpcproxy/internal/cli"
)

func main() {
	app := &cli.App{Name: "perjob", Mode: hpcproxy.ModePerJob}
	os.Exit(app.Main(os.Args[1:]))
}
