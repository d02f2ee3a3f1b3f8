-- Lmod module file for hpcproxy: `module load hpcproxy` puts perjob and
-- shared on PATH.
--
-- Install: unpack a release tarball (hpcproxy-VERSION-linux-ARCH.tar.gz,
-- see scripts/release.sh) somewhere every node sees, then either add its
-- contrib/lmod directory to MODULEPATH, where this file finds the bin/
-- beside it by itself, or copy this file into your module tree (for
-- example as hpcproxy/VERSION.lua) and set root below to the unpacked
-- directory.
local root = "/opt/hpcproxy"

local here = myFileName():match("^(.*)/contrib/lmod/[^/]*$")
if here and isDir(pathJoin(here, "bin")) then
	root = here
end

whatis("Name: hpcproxy")
whatis("Description: a proxy through SSH to a login node for programs in batch jobs (curl, pip, git, Java)")
help([[
hpcproxy gives programs in a batch job a web proxy through SSH to a
login node.

In a job:
  perjob start --via LOGIN_NODE     (or HPCPROXY_VIA=LOGIN_NODE)
  eval "$(perjob env)"              (csh, tcsh: eval "`perjob env`";
                                     fish: perjob env | source)
  perjob stop                       (or let it end with the job)
On a login node, for all of your jobs:
  shared start
Every command has --help.
]])

prepend_path("PATH", pathJoin(root, "bin"))
