#!/usr/bin/env bash
# deps.sh: make a fresh Debian 12 machine ready to build and test cowmig.
# Idempotent: it only acts on what is missing or too low, and says what it
# did. Run it as root (only the steps that change something need root).
# `deps.sh --check` reports what it would do and changes nothing.
set -euo pipefail

# Debian packages the build and the tests need. Add new ones here.
PACKAGES="gcc make python3 iproute2 procps protobuf-compiler psmisc"

GOROOT_BIN=/usr/local/go/bin

# cowmig pins a snapshot's memory by vmsplice()ing it into pipes of 4 MiB,
# the largest size a process without CAP_SYS_RESOURCE may ask for with
# F_SETPIPE_SZ once fs.pipe-max-size allows it; lower limits mean more pipes
# (and fds) per GiB pinned.
PIPE_MAX_SIZE=4194304
SYSCTL_CONF=/etc/sysctl.d/90-cowmig.conf

SAY_PREFIX=deps
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# 1. Debian packages.
missing=()
for p in $PACKAGES; do
	if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
		missing+=("$p")
	fi
done
if [ ${#missing[@]} -gt 0 ]; then
	apt_install "${missing[@]}"
fi

# 2. Go. Debian 12's golang is too old for go.mod; Go lives in /usr/local/go.
if [ ! -x "$GOROOT_BIN/go" ]; then
	say "Go is not installed at $GOROOT_BIN/go; install the Go release named in go.mod there (https://go.dev/dl/)" >&2
	exit 1
fi
if ! command -v go >/dev/null 2>&1; then
	# Put go on PATH for every shell: login shells read profile.d; the
	# symlinks serve the rest (make uses the absolute path anyway).
	if [ $check -eq 1 ]; then
		did+=("would put $GOROOT_BIN on PATH (/etc/profile.d/go.sh and /usr/local/bin links)")
	else
		need_root "put Go on PATH"
		echo "export PATH=\"\$PATH:$GOROOT_BIN\"" >/etc/profile.d/go.sh
		for tool in go gofmt; do
			[ -e "/usr/local/bin/$tool" ] || ln -s "$GOROOT_BIN/$tool" "/usr/local/bin/$tool"
		done
		did+=("put $GOROOT_BIN on PATH (/etc/profile.d/go.sh, /usr/local/bin/{go,gofmt})")
	fi
fi
say "$("$GOROOT_BIN/go" version)"

# 3. fs.pipe-max-size, for the memory pins (see PIPE_MAX_SIZE above).
cur=$(sysctl -n fs.pipe-max-size)
if [ "$cur" -lt "$PIPE_MAX_SIZE" ]; then
	if [ $check -eq 1 ]; then
		did+=("would raise fs.pipe-max-size from $cur to $PIPE_MAX_SIZE")
	else
		need_root "raise fs.pipe-max-size"
		if sysctl -w "fs.pipe-max-size=$PIPE_MAX_SIZE" >/dev/null; then
			echo "fs.pipe-max-size = $PIPE_MAX_SIZE" >"$SYSCTL_CONF"
			did+=("raised fs.pipe-max-size from $cur to $PIPE_MAX_SIZE (persisted in $SYSCTL_CONF)")
		else
			say "WARNING: could not raise fs.pipe-max-size from $cur; snapshots will use smaller pipes" >&2
		fi
	fi
fi

report_done "nothing to do: packages present, Go on PATH, fs.pipe-max-size = $cur"
