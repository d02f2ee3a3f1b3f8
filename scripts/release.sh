#!/usr/bin/env bash
# Builds the release: perjob and shared for linux/amd64, linux/arm64 and
# linux/ppc64le, static (CGO_ENABLED=0: no glibc version needed on the
# cluster) and reproducible (-trimpath, no VCS stamp, no build ID, fixed
# tar metadata: the same commit and Go version give the same bytes), one
# tarball per architecture and their SHA256SUMS, into dist/.
#
#	bash scripts/release.sh                 # version: git describe
#	VERSION=v1.2.0 bash scripts/release.sh  # or say it
#
# DIST (default dist) is the output directory, emptied first; ARCHES
# (default "amd64 arm64 ppc64le") the architectures. The version is linked
# in (internal/cli.version): `perjob --version` prints it.
set -euo pipefail
cd "$(dirname "$0")/.."

version=${VERSION:-$(git describe --tags --always --dirty 2>/dev/null || echo devel)}
dist=${DIST:-dist}
arches=${ARCHES:-amd64 arm64 ppc64le}
case $version in
*[!A-Za-z0-9._+-]*) echo "release: version $version: use letters, digits and ._+- only" >&2; exit 2 ;;
esac
# File times in the tarballs: the commit's, so that a rebuild matches.
epoch=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}

rm -rf "$dist"
mkdir -p "$dist"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

for arch in $arches; do
	name=hpcproxy-$version-linux-$arch
	dir=$work/$name
	mkdir -p "$dir/bin"
	CGO_ENABLED=0 GOOS=linux GOARCH=$arch go build -trimpath -buildvcs=false \
		-ldflags "-s -w -buildid= -X github.com/hpcproxy/hpcproxy/internal/cli.version=$version" \
		-o "$dir/bin/" ./examples/perjob ./examples/shared
	cp README.md "$dir/"
	cp -R contrib "$dir/"
	chmod -R u=rwX,go=rX "$dir"
	tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$epoch" \
		-C "$work" -cf - "$name" | gzip -n -9 >"$dist/$name.tar.gz"
	echo "$dist/$name.tar.gz"
done
(cd "$dist" && sha256sum -- *.tar.gz >SHA256SUMS)
echo "$dist/SHA256SUMS"
