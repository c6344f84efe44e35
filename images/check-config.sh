#!/bin/sh
# usage: check-config.sh FRAGMENT DOTCONFIG
# Fails unless every option of the fragment ended up in .config as asked:
# "CONFIG_X=v" must appear verbatim, "# CONFIG_X is not set" must be unset.
exec awk '
FNR == NR {
	if (match($0, /^CONFIG_[A-Za-z0-9_]+=/)) want[substr($0, 1, RLENGTH - 1)] = substr($0, RLENGTH + 1)
	else if ($0 ~ /^# CONFIG_[A-Za-z0-9_]+ is not set$/) want[$2] = "n"
	next
}
match($0, /^CONFIG_[A-Za-z0-9_]+=/) { got[substr($0, 1, RLENGTH - 1)] = substr($0, RLENGTH + 1) }
END {
	bad = 0
	for (k in want) {
		g = (k in got) ? got[k] : "n"
		if (g != want[k]) { printf "config: %s: requested %s, got %s\n", k, want[k], g > "/dev/stderr"; bad = 1 }
	}
	exit bad
}' "$1" "$2"
