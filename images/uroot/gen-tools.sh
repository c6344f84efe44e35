#!/bin/sh
# Regenerate tools.go (the list of u-root core commands pinned by this
# module) and tidy go.mod/go.sum. Run after changing the u-root version:
#   go get github.com/u-root/u-root@vX && ./gen-tools.sh
set -eu
cd "$(dirname "$0")"
export GOTOOLCHAIN=local GOWORK=off GOFLAGS=-mod=mod
dir=$(go list -m -f '{{.Dir}}' github.com/u-root/u-root)
{
	sed -n '1,/^import (/p' tools.go
	printf '\t_ "github.com/u-root/u-root"\n'
	for d in "$dir"/cmds/core/*/; do
		ls "$d"*.go >/dev/null 2>&1 || continue
		printf '\t_ "github.com/u-root/u-root/cmds/core/%s"\n' "$(basename "$d")"
	done
	echo ")"
} > tools.go.new
mv tools.go.new tools.go
gofmt -l tools.go
go mod tidy
