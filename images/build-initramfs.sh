#!/bin/bash
# Build the u-root initramfs (newc cpio, uncompressed), cached.
#
#   build-initramfs.sh OUTDIR
#
# The u-root version and every dependency are pinned by images/uroot/go.mod
# and go.sum (module mode, -mod=readonly, GOTOOLCHAIN=local, GOWORK=off, so
# neither the environment's GOFLAGS nor a go.work can change the inputs).
# Besides u-root's core commands it builds our guest programs from
# uroot/cmds/ (gokvm-uinit, run by init as /bin/uinit before the shell, and
# gokvm-counter) into the same busybox; see README.md.
# Cache: $CACHE/uroot/<key>/initramfs.cpio, key = sha256 of go.mod, go.sum,
# tools.go, the non-test Go files under uroot/cmds (names and contents),
# this script and `go version`.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=$(mkdir -p "${1:?usage: build-initramfs.sh OUTDIR}" && cd "$1" && pwd)
cache=${GOKVM_CACHE:-$HOME/.cache/gokvm-ft}

export GOTOOLCHAIN=local GOWORK=off GOFLAGS=-mod=readonly CGO_ENABLED=0 GO111MODULE=on
# The u-root tool is built with -trimpath, so it cannot find GOROOT itself.
GOROOT=$(go env GOROOT)
export GOROOT
key=$( {
	go version
	cd "$here"
	sha256sum uroot/go.mod uroot/go.sum uroot/tools.go build-initramfs.sh
	find uroot/cmds -type f -name '*.go' ! -name '*_test.go' | LC_ALL=C sort | xargs -r sha256sum
} | sha256sum | cut -c1-16)
dir=$cache/uroot/$key
mkdir -p "$out"

# One builder per key at a time (parallel makes, several checkouts).
mkdir -p "$(dirname "$dir")"
exec 9>"$dir.lock"
flock 9
if [ ! -f "$dir/initramfs.cpio" ]; then
	echo "initramfs: cache miss ($key), building u-root $(awk 'NF >= 2 && $(NF-1) == "github.com/u-root/u-root" {print $NF}' "$here/uroot/go.mod")" >&2
	t0=$(date +%s)
	rm -rf "$dir.tmp"
	mkdir -p "$dir.tmp/tmp"
	cd "$here/uroot"
	go build -trimpath -o "$dir.tmp/u-root" github.com/u-root/u-root
	# Guest Go programs read the kernel's clock, not the TSC, for the
	# runtime's cputicks (profiling and lock-wait timestamps), as Go does
	# on linux/arm64: a replayed guest must not hold values that only the
	# host's TSC produced, and user-mode RDTSC cannot be trapped on every
	# host (see README.md, "Replay determinism"). Applied with -overlay to
	# the guest build only.
	mkdir -p "$dir.tmp/overlay"
	asm=$GOROOT/src/runtime/asm_amd64.s
	sed '/^TEXT runtime·cputicks(SB),NOSPLIT,\$0-0$/a\
	JMP	runtime·nanotime1(SB)' "$asm" >"$dir.tmp/overlay/asm_amd64.s"
	if [ "$(grep -c '^	JMP	runtime·nanotime1(SB)$' "$dir.tmp/overlay/asm_amd64.s")" != 1 ]; then
		echo "initramfs: cannot find runtime·cputicks in $asm (a new Go version?)" >&2
		exit 1
	fi
	printf '{"Replace":{"%s":"%s"}}\n' "$asm" "$dir.tmp/overlay/asm_amd64.s" >"$dir.tmp/overlay/overlay.json"
	# /init (u-root init) runs /bin/uinit -> gokvm-uinit (network and
	# counter service from the kernel command line; returns within seconds),
	# then the default shell (gosh) on the console. Our commands come from
	# this module (gokvm-ft/images/uroot), so the same go.mod pins their
	# dependencies. -go-build-tags=goshsmall: gosh's
	# plain line reader instead of its full-screen bubbletea editor, which
	# on the lab host (guest kernel emulated) hung at random after Enter
	# while shutting its renderer down (see README.md).
	GOFLAGS="$GOFLAGS -overlay=$dir.tmp/overlay/overlay.json" GOOS=linux GOARCH=amd64 "$dir.tmp/u-root" \
		-go-build-tags=goshsmall \
		-o "$dir.tmp/initramfs.cpio" -format cpio -build bb \
		-initcmd init -defaultsh gosh -uinitcmd gokvm-uinit \
		-tmp-dir "$dir.tmp/tmp" \
		github.com/u-root/u-root/cmds/core/... \
		gokvm-ft/images/uroot/cmds/gokvm-uinit \
		gokvm-ft/images/uroot/cmds/gokvm-counter
	rm -rf "$dir.tmp/tmp"
	rm -rf "$dir"
	mv "$dir.tmp" "$dir"
	echo "initramfs: built in $(( $(date +%s) - t0 ))s -> $dir" >&2
else
	echo "initramfs: cache hit ($key)" >&2
fi
cmp -s "$dir/initramfs.cpio" "$out/initramfs.cpio" 2>/dev/null || cp "$dir/initramfs.cpio" "$out/initramfs.cpio"
