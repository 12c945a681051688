#!/usr/bin/env bash
# demo.sh (`make demo`): live-migrate a running container between two
# containerd hosts with cowmig's shim, using only ctr.
#
# Host A and host B are two network namespaces joined by a veth pair, each
# with its own containerd (the shim and runc from `make deps build`). A
# container holding 256 MiB of state and answering over TCP runs on A; it
# is checkpointed live (`ctr container checkpoint --task`: frozen only for
# the snapshot), the checkpoint image moves to B (`ctr image export` /
# `import`), and `ctr container restore --live` starts the clone on B at
# once while its memory streams from A's page server. The demo prints the
# freeze time, the restore-to-running time, the bytes pulled, and checks
# that the clone answers with exactly the state A had at the snapshot.
# Everything it started is stopped and removed at the end.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ "$(id -u)" -eq 0 ] || { echo "demo: run as root (containerd, network namespaces)" >&2; exit 1; }
GO=${GO:-/usr/local/go/bin/go}
MIB=${DEMO_MIB:-256}
PORT=7070
RT=io.containerd.cowmig.v2
REPO=$PWD
work=$(mktemp -d /tmp/cowmig-demo.XXXXXX)
run=/run/cowmig-demo-$$ # short socket paths
NS_A=cowmig-demo-a-$$ NS_B=cowmig-demo-b-$$
IP_A=10.78.0.1 IP_B=10.78.0.2
pids=()

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
ctr_() { local h=$1; shift; ctr -a "$run/$h/containerd.sock" -n demo "$@" 2>/dev/null; }
# ask NETNS IP CMD: one request to the kvserver, one line back.
ask() {
	ip netns exec "$1" bash -c "exec 3<>/dev/tcp/$2/$PORT && echo $3 >&3 && head -n1 <&3" 2>/dev/null
}
now_ms() { date +%s%3N; }
field() { sed -n "s/.*$1=\([^ ]*\).*/\1/p" <<<"$2"; }
json() { sed -n "s/.*\"$1\":\([^,}]*\).*/\1/p" "$2" | tr -d '"'; }

cleanup() {
	set +e
	for h in a b; do
		[ -S "$run/$h/containerd.sock" ] || continue
		for t in $(ctr_ "$h" task ls -q); do ctr_ "$h" task kill -s KILL "$t"; done
		sleep 0.3
		for t in $(ctr_ "$h" task ls -q); do ctr_ "$h" task rm -f "$t"; done
		for c in $(ctr_ "$h" c ls -q); do ctr_ "$h" c rm "$c"; done
	done
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
	for p in "${pids[@]}"; do wait "$p" 2>/dev/null; done
	# Page servers of the snapshots (they would time out by themselves).
	for ns in "$NS_A" "$NS_B"; do
		for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
	done
	grep -o " $work[^ ]*\| $run[^ ]*" /proc/self/mounts | sort -r | while read -r m; do umount -l "$m"; done
	ip netns del "$NS_A" 2>/dev/null
	ip netns del "$NS_B" 2>/dev/null
	rm -rf "$work" "$run" /run/containerd/runc/demo-$$-*
}
trap cleanup EXIT

say "building the workload image (kvserver: $MIB MiB of state, answers over TCP)"
"$GO" run ./internal/ctrtest/kvimage -o "$work/kvserver.tar" >/dev/null
IMAGE=docker.io/cowmig/kvserver:test

say "host A ($IP_A) and host B ($IP_B): two network namespaces joined by veth"
ip netns add "$NS_A"
ip netns add "$NS_B"
ip link add cmdemo$$a netns "$NS_A" type veth peer name cmdemo$$b netns "$NS_B"
ip -n "$NS_A" addr add $IP_A/24 dev cmdemo$$a
ip -n "$NS_B" addr add $IP_B/24 dev cmdemo$$b
for ns in "$NS_A" "$NS_B"; do
	ip -n "$ns" link set lo up
done
ip -n "$NS_A" link set cmdemo$$a up
ip -n "$NS_B" link set cmdemo$$b up

start_host() { # start_host a|b NETNS IP
	local h=$1 ns=$2 ip=$3 d="$work/$1" r="$run/$1"
	mkdir -p "$d" "$r"
	cat >"$d/cowmig.toml" <<EOT
# The shim's config (COWMIG_CONFIG): page servers listen on this host's
# address so that clones on other hosts can pull pages.
listen = "tcp:$ip:0"
runc_root = "$r/runc"
state_dir = "$r/cowmig"
EOT
	cat >"$d/config.toml" <<EOT
version = 3
root = "$d/root"
state = "$r/state"
imports = ["$REPO/config/cowmig.toml"]
disabled_plugins = ["io.containerd.nri.v1.nri"]
[grpc]
  address = "$r/containerd.sock"
[ttrpc]
  address = "$r/containerd.sock.ttrpc"
EOT
	nsenter --net="/run/netns/$ns" env PATH="$REPO/bin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
		COWMIG_CONFIG="$d/cowmig.toml" containerd --config "$d/config.toml" >"$d/containerd.log" 2>&1 &
	pids+=($!)
	for _ in $(seq 100); do ctr_ "$h" version >/dev/null && break; sleep 0.1; done
	ctr_ "$h" version >/dev/null || { echo "containerd on host $h did not start; see $d/containerd.log" >&2; exit 1; }
	ctr_ "$h" image import "$work/kvserver.tar" >/dev/null
	echo "host $h: containerd $(ctr_ "$h" version | awk '/Version/{print $2; exit}') in netns $ns, shim config $d/cowmig.toml"
}
start_host a "$NS_A" $IP_A
start_host b "$NS_B" $IP_B

say "host A: ctr run --runtime $RT ... $IMAGE kv (${MIB} MiB)"
ctr_ a run -d --net-host --runtime $RT --log-uri "file://$work/a/kv.log" $IMAGE kv /kvserver -mib "$MIB" -port $PORT
for _ in $(seq 300); do ask "$NS_B" $IP_A GET | grep -q ^count && break; sleep 0.1; done
echo "from host B: $(ask "$NS_B" $IP_A GET)"

say "host A: ctr container checkpoint --task kv demo/kv:1 (live)"
src=$(ask "$NS_B" $IP_A PAUSE) # writers park at a safe point: the state to compare
echo "source state at the snapshot: $src"
t0=$(now_ms)
ctr_ a container checkpoint --task kv demo/kv:1 >/dev/null
t1=$(now_ms)
ask "$NS_B" $IP_A RESUME >/dev/null
freeze=$(grep -o 'cowmig checkpoint: live, froze [0-9.]* ms' "$work/a/containerd.log" | tail -1 | awk '{print $5}')
echo "checkpoint took $((t1 - t0)) ms in ctr; the container was frozen for $freeze ms"
echo "the source keeps serving: $(ask "$NS_B" $IP_A GET)"

say "move the checkpoint: ctr image export (A) → ctr image import (B)"
ctr_ a image export --local --skip-manifest-json "$work/ckpt.tar" demo/kv:1
ctr_ b image import "$work/ckpt.tar" >/dev/null
echo "checkpoint image: $(du -h "$work/ckpt.tar" | cut -f1) (memory stays on A until B asks)"

say "host B: ctr container restore --live clone demo/kv:1"
t0=$(now_ms)
ctr_ b container restore --live clone demo/kv:1
t1=$(now_ms)
answer=$(ask "$NS_A" $IP_B GET)
t2=$(now_ms)
first=$(ask "$NS_A" $IP_B VERIFY) # reads all 256 MiB: waits for the pages
rdir="$run/b/state/io.containerd.runtime.v2.task/demo/clone"
echo "ctr c restore returned after $((t1 - t0)) ms; the shim's Start took $(json start_ms "$rdir/cowmig-restore.json") ms (morph $(json restore_ms "$rdir/cowmig-restore.json") ms)"
echo "first answer from the clone $((t2 - t0)) ms after the restore began: $answer"

say "check: the clone holds exactly the snapshot's state"
if [ "$(field count "$first")" = "$(field count "$src")" ] && [ "$(field sum "$first")" = "$(field sum "$src")" ] && [[ $first == "verify ok"* ]]; then
	echo "OK: clone count=$(field count "$first") sum=$(field sum "$first") = source at the snapshot"
else
	echo "MISMATCH: clone '$first' vs source '$src'" >&2
	exit 1
fi
ask "$NS_A" $IP_B RESUME >/dev/null
for _ in $(seq 600); do grep -q 'lazy pages local' "$rdir/cowmig-pager.log" 2>/dev/null && break; sleep 0.1; done
lazy=$(json lazy_pages "$rdir/cowmig-restore.json")
echo "pager: $(cat "$rdir/cowmig-pager.log")"
echo "bytes pulled from A: $((lazy * 4096 / 1048576)) MiB ($lazy pages)"
echo "clone runs on: $(ask "$NS_A" $IP_B VERIFY)"
echo "source runs on: $(ask "$NS_B" $IP_A VERIFY)"

say "summary"
printf '%-28s %s\n' "freeze (source)" "$freeze ms" "restore-to-running (B)" "$((t1 - t0)) ms (ctr) / $(json start_ms "$rdir/cowmig-restore.json") ms (shim)" \
	"bytes pulled" "$((lazy * 4096 / 1048576)) MiB" "clone state" "identical to the snapshot"
