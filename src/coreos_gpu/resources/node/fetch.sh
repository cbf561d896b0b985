#!/bin/sh
# Keeps the node's driver ahead of its OS: fetches from the bundle repository the bundle for
# another kernel or OS release and stages it beside `current` (install_nvidia.sh --stage of
# the fetched bundle: the one install path), so that the boot of that kernel switches to it.
#
#   fetch.sh --kernel KERNEL   stage the bundle for this kernel release (startup.sh at boot)
#   fetch.sh --update          when update-engine has an update waiting for its reboot
#                              (UPDATE_STATUS_UPDATED_NEED_REBOOT), stage the bundle for its
#                              NEW_VERSION, so that the next boot needs no network
#   fetch.sh --watch           --update now, then at every status change update-engine
#                              signals (nvidia-stage.service)
#   fetch.sh --retry           start nvidia.service again if it failed, with a backoff (not
#                              after a failure no retry can fix), and --update (nvidia-retry.timer)
#   fetch.sh --index           read and check the index only, and say what it has for this
#                              node (nvidia-doctor; changes nothing, needs no root)
#
# Whom it trusts: only an index signed by the key this bundle carries (node/repository.pub,
# checked with `openssl dgst -sha256 -verify`), and only a bundle whose sha256 and size that
# index gives. The repository is the bundle's (REPOSITORY_URL); /etc/default/nvidia's
# NVIDIA_REPOSITORY_URL overrides it (a mirror), and NVIDIA_REPOSITORY_URL=none turns fetching
# off. The key cannot be overridden. Downloads are bounded: NVIDIA_FETCH_TIMEOUT seconds for
# the bundle (default 180), a tenth of it (at least 10) for each index file.
#
# Exit codes: node/exit-codes.sh's FETCH_*, REPO_* (provision.sh's too, which fetches a
# node's first bundle the same way) and the shared ones; made, as is
# docs/reference/exit-codes.md, from coreos-gpu's one table of them.
# "A && B || die …" means: die when either fails.
# shellcheck disable=SC2015
set -u
PROG=fetch.sh

usage() {
	cat <<'EOF'
usage: fetch.sh [--root DIR] (--kernel KERNEL | --update | --watch | --retry | --index)
  --root DIR       act on the tree under DIR instead of /
  --kernel KERNEL  stage the repository's bundle for this kernel release
  --update         stage the bundle for the OS update waiting for its reboot, if any
  --watch          --update, then again at each update-engine status change (a service)
  --retry          start nvidia.service if it failed (with a backoff; not when no retry
                   can fix the failure), then --update
  --index          check the repository's index and say what it has for this node
EOF
}

# shellcheck source=options.sh
. "${0%/*}/options.sh" # coreos-gpu: inline
ROOT=
MODE=
KERNEL=
while [ $# -gt 0 ]; do
	case $1 in
	--root | --root=*) option_value "$@"; ROOT=$VALUE; shift "$SHIFT" ;;
	--kernel | --kernel=*) option_value "$@"; MODE=kernel; KERNEL=$VALUE; shift "$SHIFT" ;;
	--update | --watch | --retry | --index) MODE=${1#--} ;;
	-h | --help) usage; exit 0 ;;
	*) printf '%s: error: unknown argument %s\n' "$PROG" "$1" >&2; usage >&2; exit "$USAGE" ;;
	esac
	shift
done
[ -n "$MODE" ] || { usage >&2; exit "$USAGE"; }

HERE=$(dirname "$(dirname "$(readlink -f "$0")")")  # the driver folder: this is node/fetch.sh
[ -r "$HERE/node/lib.sh" ] && [ -r "$HERE/node/repository.sh" ] && [ -r "$HERE/node/bundle.env" ] || {
	printf '%s: error: %s/node/lib.sh, repository.sh or bundle.env is missing: the installation is incomplete; run install_nvidia.sh again\n' "$PROG" "$HERE" >&2
	exit "$FETCH_NO_REPOSITORY"
}
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/node/lib.sh"
# shellcheck source-path=SCRIPTDIR source=repository.sh
. "$HERE/node/repository.sh"
ROOT=$(parse_root "$ROOT")
case $KERNEL in
*[!A-Za-z0-9._+~-]*) die "$USAGE" "--kernel $KERNEL is not a kernel release (e.g. 6.6.54-flatcar)" ;;
esac
DRIVER_VERSION=$(bundle_value DRIVER_VERSION "$HERE/node/bundle.env")
FLAVOUR=$(bundle_value FLAVOUR "$HERE/node/bundle.env")
PROFILE=$(bundle_value PROFILE "$HERE/node/bundle.env")
OS=$(bundle_value OS "$HERE/node/bundle.env")
KEY=$HERE/node/repository.pub
URL=$(repository_url "$HERE")
TIMEOUT=${NVIDIA_FETCH_TIMEOUT:-180}
case $TIMEOUT in "" | *[!0-9]* | 0) die "$USAGE" "NVIDIA_FETCH_TIMEOUT=$TIMEOUT is not a number of seconds" ;; esac
INDEX_TIMEOUT=$((TIMEOUT / 10))
[ "$INDEX_TIMEOUT" -ge 10 ] || INDEX_TIMEOUT=10
[ "$INDEX_TIMEOUT" -le "$TIMEOUT" ] || INDEX_TIMEOUT=$TIMEOUT

# repository_set: a repository URL and its key are there (else fetching is off).
repository_set() {
	[ -n "$URL" ]
}

# fetch_index: the repository's signed index, as $WORK/index.txt (node/repository.sh).
fetch_index() {
	repo_index "$URL" "$KEY" "$WORK" "$INDEX_TIMEOUT"
}

# extract_bundle ARCHIVE FOLDER: a bundle archive (.tar.gz, .tar.xz, .tar.zst) into FOLDER.
extract_bundle() {
	case $1 in
	*.xz) eb_err=$(tar -xJf "$1" --no-same-owner -C "$2" 2>&1) ;;
	*.zst) eb_err=$({ zstd -dc "$1" | tar -xf - --no-same-owner -C "$2"; } 2>&1) ;;
	*) eb_err=$(tar -xzf "$1" --no-same-owner -C "$2" 2>&1) ;;
	esac || die "$REPO_BAD_BUNDLE" "cannot extract $1: $(first_reason "$eb_err")"
}

# first_reason TEXT: the line of tar's (or gzip's) complaint that names the problem (a
# truncated archive, not gzip, a member it refused), not the summary it ends with.
first_reason() {
	printf '%s\n' "$1" | awk '
		NF && !/Error is not recoverable|Exiting with failure status|Child returned status/ {
			print; found = 1; exit
		}
		NF { last = $0 }
		END { if (!found) print last }'
}

# --- one fetch: index, bundle, install --stage ----------------------------------------------
# stage_bundle kernel KERNEL | stage_bundle release RELEASE
stage_bundle() {
	sb_by=$1
	sb_want=$2
	sb_what="$sb_by $sb_want"
	[ "$sb_by" = kernel ] || sb_what="OS release $sb_want"
	lock_fetch
	if [ "$sb_by" = kernel ]; then
		sb_have=$(installed_for "$sb_want")
	else
		sb_have=$(staged_for "$sb_want")
	fi
	if [ -n "$sb_have" ]; then
		if [ "$sb_by" = kernel ]; then
			say "driver $DRIVER_VERSION for kernel $sb_want is installed already ($OPT/$sb_have)"
		else
			say "the driver for $sb_what is staged already ($OPT/$sb_have)"
		fi
		return 0
	fi
	fetch_index
	CHOSEN=$(repo_pick "$WORK/index.txt" "$sb_by" "$sb_want" "$DRIVER_VERSION" "$FLAVOUR" "$PROFILE" "$OS")
	[ -n "$CHOSEN" ] ||
		die "$REPO_NO_BUNDLE" "$URL has no bundle for $sb_what, driver $DRIVER_VERSION, ${FLAVOUR} modules, profile $PROFILE, $OS: build and publish one (coreos-gpu build … && coreos-gpu publish …); nothing was installed"
	read -r sb_path sb_sha sb_size sb_kernel <<EOF
$CHOSEN
EOF
	sb_installed=$(installed_for "$sb_kernel")
	if [ -n "$sb_installed" ]; then
		# Another release with the same kernel: the installed folder serves it (staged
		# for it, unless it is the one in use).
		if [ "$sb_by" = release ] && [ "$sb_installed" != "$(readlink "$ROOT$OPT/current")" ]; then
			lock_install "$LOCKED"
			clear_leftovers_in_opt
			record_staged "$sb_installed" "$sb_want" || die "$STEP_FAILED" "cannot write $ROOT$STAGED"
			exec 9<&-
		fi
		say "driver $DRIVER_VERSION for kernel $sb_kernel ($sb_what) is installed already ($OPT/$sb_installed)"
		return 0
	fi
	sb_free=$(df -Pk "$WORK" | awk 'NR == 2 { print $4 }')
	[ $(( ${sb_free:-0} * 1024 )) -gt $((sb_size * 4)) ] ||
		die "$FETCH_NO_SPACE" "not enough space in $ROOT$OPT to fetch the driver for $sb_what: $((sb_size * 4 / 1048576)) MiB needed (the archive and its extracted copy), $((${sb_free:-0} / 1024)) MiB free"
	say "fetching the driver for $sb_what: $URL/$sb_path ($((sb_size / 1048576)) MiB)"
	sb_archive=$WORK/${sb_path##*/}
	repo_bundle "$URL" "$sb_path" "$sb_sha" "$sb_size" "$sb_archive" "$TIMEOUT"
	mkdir "$WORK/bundle" || die "$STEP_FAILED" "cannot create $WORK/bundle"
	extract_bundle "$sb_archive" "$WORK/bundle"
	rm -f "$sb_archive"
	# Signed, but still to be checked for what the index promises: a bundle to run, with
	# modules for the kernel it is listed for (else the boot into it would fail once more).
	[ -f "$WORK/bundle/install_nvidia.sh" ] && [ -x "$WORK/bundle/install_nvidia.sh" ] ||
		die "$REPO_BAD_BUNDLE" "the bundle from $URL/$sb_path has no executable install_nvidia.sh: it is not a coreos-gpu bundle; nothing was installed"
	[ -d "$WORK/bundle/payload/$DRIVER_VERSION/modules/$sb_kernel" ] ||
		die "$REPO_BAD_BUNDLE" "the bundle from $URL/$sb_path has no modules for kernel $sb_kernel, which the signed index lists it for: publish the right bundle for it; nothing was installed"
	set --
	[ -z "$ROOT" ] || set -- --root "$ROOT"
	[ "$sb_by" = kernel ] || set -- "$@" --release "$sb_want"
	"$WORK/bundle/install_nvidia.sh" "$@" --stage
	sb_rc=$?
	[ "$sb_rc" = 0 ] ||
		die "$REPO_BAD_BUNDLE" "the driver fetched for $sb_what did not install (install_nvidia.sh --stage exit $sb_rc, see above)"
}

# lock_fetch: one fetch at a time (boot, the watcher, the timer); clears what a killed one
# left. install_nvidia.sh has its own lock, taken by the install this runs.
lock_fetch() {
	[ -z "${WORK:-}" ] || return 0
	[ -d "$ROOT$OPT" ] || die "$FETCH_NO_REPOSITORY" "$ROOT$OPT is missing: install a driver first"
	lock_file 8 "$ROOT$OPT/.fetch.lock" 900 6 "another fetch.sh kept $ROOT$OPT/.fetch.lock for 15 minutes"
	for lf_left in "$ROOT$OPT"/.fetch.*; do
		[ "$lf_left" = "$ROOT$OPT/.fetch.lock" ] || ! [ -e "$lf_left" ] || rm -rf "$lf_left"
	done
	# And what a killed install (this one's --stage, say) left, when no install runs: a fetch
	# that finds its driver staged already runs no install that would clear it.
	# A busy or unopenable lock: leave it to the next install.
	(lock_file 9 "$ROOT$OPT/.lock" 0 "" "" && clear_leftovers_in_opt) || :
	WORK=$(mktemp -d "$ROOT$OPT/.fetch.XXXXXX") || die "$STEP_FAILED" "cannot create a folder in $ROOT$OPT"
	trap 'rm -rf "$WORK"' EXIT
	trap 'exit "$FETCH_TERMINATED"' TERM
	trap 'exit "$FETCH_INTERRUPTED"' INT
}

# --- update-engine ------------------------------------------------------------------------
stage_update() {
	su_release=$(pending_release)
	if [ -z "$su_release" ]; then
		say "no OS update is waiting for a reboot: nothing to stage"
		return 0
	fi
	# shellcheck disable=SC2119 # the root's, not an argument's
	case $(os_release_of_node) in "$su_release")
		say "OS release $su_release is running already"
		return 0 ;;
	esac
	say "OS release $su_release is waiting for its reboot: staging its driver"
	stage_bundle release "$su_release"
}

# os_release_of_node: VERSION_ID of the running OS.
os_release_of_node() {
	sed -n 's/^VERSION_ID=//p' "$ROOT/etc/os-release" 2>/dev/null | tr -d '"'
}

# --- retry: nvidia.service again, after a failure worth retrying (fetch-retry.sh) ----------
# shellcheck source=fetch-retry.sh
. "${0%/*}/fetch-retry.sh" # coreos-gpu: inline

# --- main -----------------------------------------------------------------------------------
need_tools "$MISSING_COMMAND" openssl tar sha256sum flock mktemp awk sed df timeout
repository_set || [ "$MODE" = retry ] ||
	die "$FETCH_NO_REPOSITORY" "no bundle repository is configured: the bundle in $HERE was built without --repository (or /etc/default/nvidia says NVIDIA_REPOSITORY_URL=none)"
case $URL in http://* | https://*) command -v curl >/dev/null 2>&1 || need_tools "$MISSING_COMMAND" wget ;; esac
case $MODE in
kernel) stage_bundle kernel "$KERNEL" ;;
index)
	WORK=$(mktemp -d) || die "$STEP_FAILED" "cannot create a temporary folder"
	trap 'rm -rf "$WORK"' EXIT
	REPO_CHECK_ONLY=1 # checked against the generation remembered, and not remembered
	fetch_index
	read -r ix_gen _ ix_exp <<EOF
$(repo_check "$WORK/index.txt")
EOF
	ix_running=$(uname -r)
	ix_count=0
	ix_kernels=
	ix_here="none for the running kernel $ix_running"
	for ix_kernel in $(repo_kernels "$WORK/index.txt" "$DRIVER_VERSION" "$FLAVOUR" "$PROFILE" "$OS"); do
		ix_count=$((ix_count + 1))
		ix_kernels="$ix_kernels $ix_kernel"
		[ "$ix_kernel" != "$ix_running" ] || ix_here="one for the running kernel $ix_running"
	done
	printf '%s\n' "generation $ix_gen (valid until $ix_exp), signed by this bundle's key; bundles of this driver for $ix_count kernel(s):$ix_kernels; $ix_here" ;;
update) stage_update ;;
retry)
	retry
	RC=$?
	! repository_set || (stage_update) || RC=$?
	exit "$RC" ;;
watch)
	(stage_update)
	command -v update_engine_client >/dev/null 2>&1 ||
		{ say "update_engine_client is missing: no OS updates to watch"; exit 0; }
	# update_engine_client logs each status signal to stderr and never returns.
	update_engine_client -watch_for_updates 2>&1 | while read -r line; do
		case $line in *UPDATE_STATUS_UPDATED_NEED_REBOOT*) (stage_update) ;; esac
	done
	die "$STEP_FAILED" "update_engine_client -watch_for_updates ended" ;;
esac
