#!/usr/bin/env bash
# demo-process.sh (`make demo-process`): clone a running Python process that holds 256 MiB
# of state, live, with cowmig's CLI, and show that the clone continues
# from the snapshot instant while the source keeps running.
#
# Steps: start the workload (internal/testworkload/pyworkload.py) → live
# checkpoint (the source is frozen only for freeze_ms) → restore a clone in
# a new pid namespace (it runs at once; pages arrive on demand and in the
# background from the source's page server) → both verify their memory →
# everything is stopped and removed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ "$(id -u)" -eq 0 ] || { echo "demo: run as root (ptrace, userfaultfd, pid namespaces)" >&2; exit 1; }
COWMIG=${COWMIG:-$PWD/bin/cowmig}
PY=/usr/bin/python3
MIB=${DEMO_MIB:-256}
work=$(mktemp -d /tmp/cowmig-demo.XXXXXX)
src_pid= clone_pid= server_pid=
cleanup() {
	[ -n "$clone_pid" ] && kill -9 "$clone_pid" 2>/dev/null || true
	[ -n "$src_pid" ] && kill -9 "$src_pid" 2>/dev/null || true
	[ -n "$server_pid" ] && "$COWMIG" release --image "$work/img" >/dev/null 2>&1 || true
	exec 3>&- 4>&- 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT

field() { sed -n "s/.*\"$1\":\([^,}]*\).*/\1/p" <<<"$2" | tr -d '"'; }
# ask FIFO_FD PID: send SIGUSR1, print the workload's next verify line.
ask() {
	local fd=$1 pid=$2 line
	kill -USR1 "$pid"
	while read -r -t 60 line <&"$fd"; do
		case $line in verify*) echo "$line"; return 0 ;; esac
	done
	echo "no answer from pid $pid" >&2
	return 1
}

mkfifo "$work/src.out" "$work/clone.out"
exec 3<>"$work/src.out" 4<>"$work/clone.out"
echo "== starting a Python workload with $MIB MiB of state"
$PY internal/testworkload/pyworkload.py "$MIB" >"$work/src.out" 2>/dev/null &
src_pid=$!
read -r -t 120 ready <&3
echo "   $ready"

echo "== live checkpoint: cowmig checkpoint --pid $src_pid --image $work/img --json"
ck=$("$COWMIG" checkpoint --pid "$src_pid" --image "$work/img" --json)
server_pid=$(field server_pid "$ck")
echo "   $ck"
echo "   source froze for $(field freeze_ms "$ck") ms; $(field pages_lazy "$ck") pages stay with the source's page server"

echo "== restore: cowmig restore --image $work/img --json"
rs=$("$COWMIG" restore --image "$work/img" --json --stdout "$work/clone.out")
clone_pid=$(field pid "$rs")
pager_pid=$(field pager_pid "$rs")
echo "   $rs"
echo "   clone runs as host pid $clone_pid (pid $(field ns_pid "$rs") in its own namespace), $(field restore_ms "$rs") ms after the restore started"

echo "== the clone verifies its state while its pages are still arriving:"
echo "   clone:  $(ask 4 "$clone_pid")"
start=$(date +%s%N)
while kill -0 "$pager_pid" 2>/dev/null; do sleep 0.05; done
echo "   every page local $(( ($(date +%s%N) - start) / 1000000 )) ms later (pager exited)"
echo "== both verify again:"
echo "   clone:  $(ask 4 "$clone_pid")"
echo "   source: $(ask 3 "$src_pid")"
echo "== inspect:"
"$COWMIG" inspect --image "$work/img" >"$work/inspect.txt"
head -12 "$work/inspect.txt"
"$COWMIG" release --image "$work/img" && server_pid=
echo "== done: snapshot released, processes stopped"
