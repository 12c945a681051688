# lib.sh: what the idempotent installers (deps.sh, containerd-deps.sh)
# share. Source it after setting SAY_PREFIX; it parses the script's
# arguments ([--check]) into $check and starts the list of what was done.

check=0
case "${1:-}" in
--check) check=1 ;;
"") ;;
*)
	echo "usage: $0 [--check]" >&2
	exit 2
	;;
esac

did=()
say() { echo "$SAY_PREFIX: $*"; }

need_root() {
	if [ "$(id -u)" -ne 0 ]; then
		say "must run as root to $1" >&2
		exit 1
	fi
}

# apt_install PKG...: installs the packages (or, with --check, records
# that it would).
apt_install() {
	if [ $check -eq 1 ]; then
		did+=("would install: $*")
		return
	fi
	need_root "install $*"
	say "installing $* (apt)"
	apt-get update
	DEBIAN_FRONTEND=noninteractive apt-get install -y "$@"
	did+=("installed: $*")
}

# report_done NOTHING: says what was done, or NOTHING if nothing was.
report_done() {
	if [ ${#did[@]} -eq 0 ]; then
		say "$1"
	else
		for d in "${did[@]}"; do say "$d"; done
	fi
}
