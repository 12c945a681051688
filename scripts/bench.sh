#!/usr/bin/env bash
# bench.sh: cowmig's benchmarks (`make bench`). Runs the end-to-end harness
# (bench/cowbench: live, full and stop checkpoints of 256 MiB, 1 GiB, 4 GiB
# and a 4 GiB THP workload, with restore; medians, ratios and the targets),
# then the Go micro-benchmarks of the uffd and transport packages.
#
#   scripts/bench.sh [cowbench flags]      e.g. -sizes 1G -reps 5 -json
#
# Needs root and gcc. COWBENCH_MICRO=0 skips the micro-benchmarks.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
GO=${GO:-/usr/local/go/bin/go}
export PATH="$(dirname "$GO"):$PATH"

if [ "$(id -u)" -ne 0 ]; then
	echo "bench.sh: must run as root (ptrace, userfaultfd, clone3 set_tid)" >&2
	exit 1
fi

status=0
echo "== cowbench: $GO run ./bench/cowbench $*"
"$GO" run ./bench/cowbench "$@" || status=$?

if [ "${COWBENCH_MICRO:-1}" != 0 ]; then
	# Only packages that have benchmarks; -run '^$' skips their tests.
	pkgs=()
	for p in uffd transport; do
		if grep -qs '^func Benchmark' "$p"/*_test.go; then
			pkgs+=("./$p/")
		fi
	done
	if [ ${#pkgs[@]} -gt 0 ]; then
		echo
		echo "== micro-benchmarks: $GO test -run '^\$' -bench . -benchtime 3x ${pkgs[*]}"
		"$GO" test -run '^$' -bench . -benchtime 3x "${pkgs[@]}" || status=$?
	fi
fi

# The containerd benchmark (bench/ctrbench): checkpoint downtime seen by a
# client of a kvserver container (ctr task / ctr container checkpoint,
# cowmig checkpoint live and stop) and restore-to-running on a second
# containerd host. Needs containerd, ctr and runc (make deps).
# COWBENCH_CTR=0 skips it; COWMIG_CTRBENCH_REPS and COWMIG_CTRBENCH_SIZES
# size it.
if [ "${COWBENCH_CTR:-1}" != 0 ]; then
	echo
	echo "== containerd: COWMIG_BENCH=1 $GO test -count=1 -v -run TestContainerdBench -timeout 30m ./bench/ctrbench"
	COWMIG_BENCH=1 "$GO" test -count=1 -v -run TestContainerdBench -timeout 30m ./bench/ctrbench || status=$?
fi
exit "$status"
