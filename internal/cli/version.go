package cli

import (
	"fmt"
	"runtime"
	"runtime/debug"
)

// version optionally overrides the version the build info gives; the
// release build (scripts/release.sh) sets it at link time:
//
//	go build -ldflags "-X github.com/hpcproxy/hpcproxy/internal/cli.version=v1.2.0" ./examples/perjob
var version string

// Version returns the version of this binary: the link-time override if
// set; else the main module's version from the build info, which `go
// install .../examples/perjob@v1.2.0` stamps as "v1.2.0" and a build in a
// git clone as a pseudo-version of its commit (with "+dirty" for
// uncommitted changes); else the VCS revision; else "devel".
func Version() string {
	if version != "" {
		return version
	}
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "devel"
	}
	return versionFrom(bi)
}

func versionFrom(bi *debug.BuildInfo) string {
	if v := bi.Main.Version; v != "" && v != "(devel)" {
		return v
	}
	var rev string
	var dirty bool
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			dirty = s.Value == "true"
		}
	}
	switch {
	case rev == "":
		return "devel"
	case dirty:
		return rev + "+dirty"
	}
	return rev
}

// versionLine is what `NAME version` and `NAME --version` print.
func (a *App) versionLine() string {
	return fmt.Sprintf("%s %s (%s %s/%s)\n", a.Name, Version(), runtime.Version(), runtime.GOOS, runtime.GOARCH)
}

func (a *App) printVersion(args []string) error {
	f := a.cmdFlags("version")
	if err := f.parse(args); err != nil {
		return err
	}
	if f.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q (see --help)", f.Args())
	}
	_, err := fmt.Fprint(a.Stdout, a.versionLine())
	return err
}
