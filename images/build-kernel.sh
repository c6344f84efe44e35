#!/bin/bash
# Build the gokvm-ft guest kernel from Debian's linux-source-6.1, cached.
#
#   build-kernel.sh OUTDIR
#
# Cache: $CACHE/kernel/<key>/{bzImage,vmlinux,config}, key = sha256 of the
# config fragment, the patches (names and contents, in order), this script,
# the linux-source package version and the compiler version. A hit copies
# the files; a miss unpacks the source into $CACHE/kernel/<key>.build,
# patches, configures, builds and then publishes the result atomically.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=$(mkdir -p "${1:?usage: build-kernel.sh OUTDIR}" && cd "$1" && pwd)
cache=${GOKVM_CACHE:-$HOME/.cache/gokvm-ft}
jobs=${JOBS:-$(( $(nproc) + 1 ))}
tarball=/usr/src/linux-source-6.1.tar.xz

srcver=$(dpkg-query -W -f='${Version}' linux-source-6.1)
key=$( {
	echo "linux-source-6.1 $srcver"
	gcc --version | head -1
	sha256sum "$here/kernel.config" "$here/build-kernel.sh" "$here/check-config.sh"
	for p in "$here"/patches/*.patch; do
		[ -e "$p" ] && sha256sum "$p"
	done
} | sed "s|$here/||" | sha256sum | cut -c1-16)
dir=$cache/kernel/$key
mkdir -p "$out"

# One builder per key at a time (parallel makes, several checkouts).
mkdir -p "$(dirname "$dir")"
exec 9>"$dir.lock"
flock 9
if [ ! -f "$dir/vmlinux" ]; then
	echo "kernel: cache miss ($key), building linux-source-6.1 $srcver with -j$jobs" >&2
	t0=$(date +%s)
	b=$dir.build
	rm -rf "$b"
	mkdir -p "$b"
	tar -C "$b" -xJf "$tarball"
	src=$b/linux-source-6.1
	for p in "$here"/patches/*.patch; do
		[ -e "$p" ] || continue
		echo "kernel: applying $(basename "$p")" >&2
		patch -d "$src" -p1 --quiet --forward < "$p"
	done
	obj=$b/obj
	# Reproducible: fixed user/host, timestamp = the source tarball's mtime.
	export KBUILD_BUILD_USER=gokvm-ft KBUILD_BUILD_HOST=gokvm-ft
	KBUILD_BUILD_TIMESTAMP=$(LC_ALL=C date -u -d "@$(stat -c %Y "$tarball")")
	export KBUILD_BUILD_TIMESTAMP
	# Do not inherit a parent make's flags/jobserver (make -C images -jN).
	unset MAKEFLAGS MFLAGS MAKELEVEL MAKEOVERRIDES
	mk() { make -C "$src" O="$obj" ARCH=x86_64 "$@"; }
	log=$dir.log
	echo "kernel: build log in $log" >&2
	{
		mk -s tinyconfig
		"$src"/scripts/kconfig/merge_config.sh -m -O "$obj" "$obj/.config" "$here/kernel.config"
		mk -s olddefconfig
	} >"$log" 2>&1 || { tail -n 30 "$log" >&2; exit 1; }
	"$here/check-config.sh" "$here/kernel.config" "$obj/.config"
	mk -j"$jobs" bzImage >>"$log" 2>&1 || { tail -n 50 "$log" >&2; exit 1; }
	mkdir -p "$dir.tmp"
	cp "$obj/arch/x86/boot/bzImage" "$obj/vmlinux" "$dir.tmp/"
	cp "$obj/.config" "$dir.tmp/config"
	cp "$obj/System.map" "$dir.tmp/System.map"
	rm -rf "$dir"
	mv "$dir.tmp" "$dir"
	rm -rf "$b"
	echo "kernel: built in $(( $(date +%s) - t0 ))s -> $dir" >&2
else
	echo "kernel: cache hit ($key)" >&2
fi
for f in bzImage vmlinux config System.map; do
	cmp -s "$dir/$f" "$out/$f" 2>/dev/null || cp "$dir/$f" "$out/$f"
done
