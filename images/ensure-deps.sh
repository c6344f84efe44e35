#!/bin/sh
# Install the Debian packages the image build needs, only those missing,
# non-interactively (one apt-get update, then apt-get install). Go is not
# taken from Debian (too old): the repo's Go toolchain must be on PATH.
set -eu
pkgs="linux-source-6.1 build-essential bc flex bison libelf-dev libssl-dev cpio xz-utils lz4 patch"
missing=
for p in $pkgs; do
	dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing="$missing $p"
done
if [ -n "$missing" ]; then
	echo "deps: installing:$missing" >&2
	sudo=
	[ "$(id -u)" = 0 ] || sudo=sudo
	export DEBIAN_FRONTEND=noninteractive
	$sudo apt-get update -qq
	$sudo apt-get install -y -qq --no-install-recommends $missing
fi
command -v go >/dev/null || { echo "deps: go not found on PATH (need the repo's Go toolchain)" >&2; exit 1; }
