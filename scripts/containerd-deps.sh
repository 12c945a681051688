#!/usr/bin/env bash
# containerd-deps.sh: install what cowmig's containerd tests, demo and
# benchmark drive: runc, containerd, ctr, containerd-shim-runc-v2 and nerdctl.
# Idempotent: it only acts on what is missing or at another version, and says
# what it did. Run it as root. `containerd-deps.sh --check` reports what it
# would do and changes nothing.
#
# No container registry is reachable from the project's machines; the Go
# module proxy and Debian apt are. So:
#   - runc comes from Debian (1.1.5 on Debian 12; it works on this host's
#     cgroup v1+v2 hybrid). apt also installs criu 3.17.1 with it (a
#     Recommends); cowmig never runs it, but containerd's CRI plugin checks
#     for a criu >= 3.16 before any checkpoint, so it is kept.
#   - containerd, ctr and containerd-shim-runc-v2 are built from the module
#     proxy with `go install ...@v2.4.2` (~2 min cold).
#   - nerdctl cannot be `go install`ed at v2.2.2: its go.mod has
#       replace github.com/containerd/nerdctl/mod/tigron v0.0.0 => ./mod/tigron
#     and `go install pkg@version` refuses modules with replace directives.
#     (Here it fails even earlier: "loading deprecation for
#     github.com/containerd/nerdctl/v2: ... reading .../@v/list: 403
#     Forbidden": this proxy serves versions, not version lists.) tigron (nerdctl's test framework, a nested
#     module) is not on the proxy at all: `go list -m -versions
#     github.com/containerd/nerdctl/mod/tigron` and `.../tigron@<v2.2.2
#     commit>` both answer "403 Forbidden: This module version is not
#     available". A throwaway module requiring nerdctl v2.2.2 with tigron
#     replaced by an empty local module does not build either: the binary
#     really links tigron through cmd/nerdctl/helpers/testing_linux.go ->
#     pkg/testutil -> mod/tigron/{tig,test,expect,require} ("module
#     github.com/containerd/nerdctl/mod/tigron/tig: ... 403 Forbidden"), and
#     `go build -overlay` may not replace files under GOMODCACHE. What
#     works: copy nerdctl v2.2.2's module source (from the proxy, via the
#     module cache) to a temp dir, delete cmd/nerdctl/helpers/testing_linux.go
#     (test-only helpers: only _test.go files use its NewCosignKeyPair and
#     ComposeUp, so nothing the binary runs changes), put an empty module at
#     ./mod/tigron for the replace, and `go build ./cmd/nerdctl` with
#     nerdctl's own go.mod and go.sum as the main module, i.e. exactly its
#     pinned dependency versions.
set -euo pipefail

CONTAINERD_VERSION=v2.4.2
NERDCTL_VERSION=v2.2.2
BINDIR=/usr/local/bin
GO=/usr/local/go/bin/go

CONTAINERD_MOD=github.com/containerd/containerd/v2
NERDCTL_MOD=github.com/containerd/nerdctl/v2
TIGRON_MOD=github.com/containerd/nerdctl/mod/tigron

SAY_PREFIX=containerd-deps
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if [ ! -x "$GO" ]; then
	say "Go is not installed at $GO; run scripts/deps.sh first" >&2
	exit 1
fi

# modversion BIN MODULE prints the version of MODULE that Go binary BIN was
# built from (its main module or a dependency), or nothing. The embedded
# build info is more reliable than `--version`, which `go install` leaves
# at the source's placeholder unless -ldflags sets it.
modversion() {
	[ -x "$1" ] || return 0
	"$GO" version -m "$1" 2>/dev/null | awk -v m="$2" '($1 == "mod" || $1 == "dep") && $2 == m { print $3; exit }'
}

# 1. runc from Debian.
if ! command -v runc >/dev/null 2>&1; then
	apt_install runc
fi

# 2. containerd, ctr, containerd-shim-runc-v2.
ctr_missing=()
for b in containerd ctr containerd-shim-runc-v2; do
	v=$(modversion "$BINDIR/$b" "$CONTAINERD_MOD")
	if [ "$v" != "$CONTAINERD_VERSION" ]; then
		ctr_missing+=("$b")
	fi
done
if [ ${#ctr_missing[@]} -gt 0 ]; then
	if [ $check -eq 1 ]; then
		did+=("would go install ${ctr_missing[*]} @$CONTAINERD_VERSION into $BINDIR")
	else
		need_root "install into $BINDIR"
		pkgs=()
		for b in "${ctr_missing[@]}"; do pkgs+=("$CONTAINERD_MOD/cmd/$b@$CONTAINERD_VERSION"); done
		say "go install ${pkgs[*]} (a few minutes when cold)"
		# The version variables make `containerd --version` and `ctr version`
		# print the real release instead of "2.4.2+unknown".
		GOBIN=$BINDIR GOFLAGS=-buildvcs=false "$GO" install \
			-ldflags "-X $CONTAINERD_MOD/version.Version=$CONTAINERD_VERSION" "${pkgs[@]}"
		did+=("installed ${ctr_missing[*]} $CONTAINERD_VERSION into $BINDIR")
	fi
fi

# 3. nerdctl, from a patched copy of its module source (see the header).
# Its build info says "(devel)" for the main module, so ask the binary.
if [ "$("$BINDIR/nerdctl" --version 2>/dev/null || true)" != "nerdctl version ${NERDCTL_VERSION#v}" ]; then
	if [ $check -eq 1 ]; then
		did+=("would build nerdctl $NERDCTL_VERSION into $BINDIR/nerdctl")
	else
		need_root "install into $BINDIR"
		say "building nerdctl $NERDCTL_VERSION (a few minutes when cold)"
		tmp=$(mktemp -d /tmp/cowmig-nerdctl.XXXXXX)
		trap 'rm -rf "$tmp"' EXIT
		(
			cd "$tmp"
			export GOFLAGS=-buildvcs=false
			src=$("$GO" mod download -json "$NERDCTL_MOD@$NERDCTL_VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
			if [ -z "$src" ] || [ ! -f "$src/go.mod" ]; then
				say "go mod download $NERDCTL_MOD@$NERDCTL_VERSION gave no source directory" >&2
				exit 1
			fi
			cp -r "$src" "$tmp/src"
			chmod -R u+w "$tmp/src" # the module cache is read-only
			cd "$tmp/src"
			rm cmd/nerdctl/helpers/testing_linux.go
			mkdir -p mod/tigron
			printf 'module %s\n\ngo 1.24\n' "$TIGRON_MOD" >mod/tigron/go.mod
			"$GO" build -o "$tmp/nerdctl" \
				-ldflags "-X $NERDCTL_MOD/pkg/version.Version=$NERDCTL_VERSION" ./cmd/nerdctl
		)
		install -m 0755 "$tmp/nerdctl" "$BINDIR/nerdctl"
		rm -rf "$tmp"
		trap - EXIT
		did+=("built nerdctl $NERDCTL_VERSION into $BINDIR/nerdctl")
	fi
fi

report_done "nothing to do"

# Versions, as the tools report them.
if [ $check -eq 0 ]; then
	say "runc: $(runc --version | head -1)"
	say "containerd: $("$BINDIR/containerd" --version)"
	say "ctr: $("$BINDIR/ctr" --version)"
	say "containerd-shim-runc-v2: $(modversion "$BINDIR/containerd-shim-runc-v2" "$CONTAINERD_MOD")"
	say "nerdctl: $("$BINDIR/nerdctl" --version)"
fi
