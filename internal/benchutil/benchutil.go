// Package benchutil holds what the side-by-side benchmarks (cmd/bootbench,
// cmd/netbench) print alike: the host they ran on, their command lines, and
// medians.
package benchutil

import (
	"cmp"
	"os"
	"slices"
	"strings"
)

// Median is the median of v (the upper of the middle two for an even
// count); zero for none.
func Median[T cmp.Ordered](v []T) T {
	var zero T
	if len(v) == 0 {
		return zero
	}
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}

// Quote quotes the arguments a shell would split, for printing a command.
func Quote(args []string) []string {
	out := make([]string, len(args))
	for i, a := range args {
		if strings.ContainsAny(a, " ,=") && !strings.HasPrefix(a, "-") {
			a = "'" + a + "'"
		}
		out[i] = a
	}
	return out
}

// Uname is the host kernel, as "Linux 6.1.0".
func Uname() string {
	b, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	return "Linux " + strings.TrimSpace(string(b))
}

// CPUModel is the host CPU's model name.
func CPUModel() string {
	b, _ := os.ReadFile("/proc/cpuinfo")
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "model name") {
			_, v, _ := strings.Cut(l, ":")
			return strings.TrimSpace(v)
		}
	}
	return "unknown CPU"
}
