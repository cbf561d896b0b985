# shellcheck shell=sh
# shellcheck disable=SC2015 # "A && B || C" means C when either fails
# What a node has installed: driver folders, `current`, `previous` and the staged ones, and
# what the node boots next (lib.sh's theme).
# Copied in by the build (node.py inline_sources) at its line in lib.sh;
# never run or sourced by itself.

# The kernel releases a bundle or installation carries modules for.
kernel_releases_in() {
	for kr_dir in "$1"/modules/*/; do
		[ -d "$kr_dir" ] || continue
		kr_dir=${kr_dir%/}
		printf '%s ' "${kr_dir##*/}"
	done
}

# installed_folder NAME: NAME is an installed driver folder of $OPT (a plain name, a folder,
# with its node/bundle.env).
installed_folder() {
	case $1 in "" | */* | . | ..) return 1 ;; esac
	[ -d "$ROOT$OPT/$1" ] && [ ! -L "$ROOT$OPT/$1" ] && [ -f "$ROOT$OPT/$1/node/bundle.env" ]
}

# link_of PATH: the target of the link PATH ("" when PATH is not a link); fails when PATH is
# a link that cannot be read: a "" then would read as "no link" and lose what it names.
link_of() {
	[ -L "$1" ] || return 0
	lo_target=$(readlink "$1") && [ -n "$lo_target" ] || return 1
	printf '%s' "$lo_target"
}

# run_ldconfig: refresh the ld.so cache of the node (or of the tree under $ROOT).
run_ldconfig() {
	if [ -n "$ROOT" ]; then
		act ldconfig -r "$ROOT"
	else
		act ldconfig
	fi
}

# current_problem: why $OPT/current cannot be booted from, in a few words ("" when it can, or
# when there is no `current` at all). It must be a link to an installed driver folder of
# $OPT whose startup.sh can run: a hand-made link, a folder, or a folder half removed is not.
current_problem() {
	cp_link=$ROOT$OPT/current
	[ -e "$cp_link" ] || [ -L "$cp_link" ] || return 0
	if [ ! -L "$cp_link" ]; then
		printf '%s is not a link to a driver folder' "$OPT/current"
		return 0
	fi
	cp_name=$(readlink "$cp_link")
	if ! installed_folder "$cp_name"; then
		if [ -e "$cp_link" ]; then
			printf '%s points at %s, not a driver folder of %s' "$OPT/current" "$cp_name" "$OPT"
		else
			printf '%s points at %s, which is not there' "$OPT/current" "$cp_name"
		fi
	elif ! bootable "$cp_name"; then
		printf '%s points at %s, which lacks its startup.sh or node/lib.sh' "$OPT/current" "$cp_name"
	fi
}

# bootable NAME: NAME is an installed driver folder whose startup.sh can run.
bootable() {
	installed_folder "$1" && [ -x "$ROOT$OPT/$1/startup.sh" ] && [ -r "$ROOT$OPT/$1/node/lib.sh" ]
}

# switch_current NAME: point $OPT/current at the driver folder NAME in one rename. `previous`
# names the driver before the last switch: kept for a rollback, and set before the switch
# so that a run stopped after it keeps the same one. Only an installed folder becomes
# `previous`: a dangling or foreign `current` (an old tool's, a hand-made link) leaves the
# `previous` there was.
switch_current() {
	sc_was=$(link_of "$ROOT$OPT/current") || return 1
	if [ -n "$sc_was" ] && [ "$sc_was" != "$1" ]; then
		if installed_folder "$sc_was"; then
			replace_link "$sc_was" "$ROOT$OPT/previous" || return 1
		else
			warn "$OPT/current pointed at $sc_was, not an installed driver folder: $OPT/previous stays as it was"
		fi
	fi
	replace_link "$1" "$ROOT$OPT/current" || return 1
	[ "$sc_was" = "$1" ] || [ "${DRY:-0}" = 1 ] || say "$OPT/current is now $1${sc_was:+ (was $sc_was)}"
}

# --- staged drivers and what a node keeps ---------------------------------------------------
# $OPT/staged lists the driver folders installed beside `current` for a kernel the node has
# not booted yet (an OS update waiting for its reboot, or a fetch at boot just before the
# switch), one "<folder> <OS release or ->" line each.
STAGED=$OPT/staged

# record_staged NAME RELEASE: add (or replace) NAME's line, in one rename.
record_staged() {
	rs_file=$ROOT$STAGED
	{
		[ ! -f "$rs_file" ] || awk -v n="$1" '$1 != n' "$rs_file"
		printf '%s %s\n' "$1" "${2:--}"
	} >"$rs_file.tmp.$$" && mv -f "$rs_file.tmp.$$" "$rs_file"
}

# staged_for RELEASE: the staged folder recorded for that OS release, if it is still there.
staged_for() {
	[ -f "$ROOT$STAGED" ] || return 0
	awk -v r="$1" '$2 == r { print $1 }' "$ROOT$STAGED" | while read -r sf_name; do
		[ -f "$ROOT$OPT/$sf_name/node/bundle.env" ] && { printf '%s\n' "$sf_name"; break; }
	done
}

# installed_for KERNEL: an installed folder of this DRIVER_VERSION and FLAVOUR with modules
# for KERNEL (current's first), if any.
installed_for() {
	for if_dir in "$ROOT$OPT/current" "$ROOT$OPT"/*/; do
		if_dir=${if_dir%/}
		[ -d "$if_dir/modules/$1" ] && [ -r "$if_dir/node/bundle.env" ] || continue
		[ "$(bundle_value DRIVER_VERSION "$if_dir/node/bundle.env")" = "$DRIVER_VERSION" ] &&
			[ "$(bundle_value FLAVOUR "$if_dir/node/bundle.env")" = "$FLAVOUR" ] || continue
		if_dir=$(readlink -f "$if_dir")
		printf '%s\n' "${if_dir##*/}"
		return 0
	done
}

# drop_unbootable: remove the driver folders no boot of this node can want any more. Kept:
# `current` (the running kernel's), `previous` (the release before: Flatcar falls back to
# its USR partition when a boot fails) and the staged ones (the update waiting for its
# reboot). Staged lines for folders now in use, or gone, are dropped. Call it under the lock.
drop_unbootable() {
	du_current=$(link_of "$ROOT$OPT/current") && du_previous=$(link_of "$ROOT$OPT/previous") ||
		return 1
	du_keep=" $du_current $du_previous "
	if [ -f "$ROOT$STAGED" ]; then
		du_lines=$(while read -r du_name du_release; do
			[ "$du_name" != "$du_current" ] && [ -d "$ROOT$OPT/$du_name" ] &&
				printf '%s %s\n' "$du_name" "$du_release"
		done <"$ROOT$STAGED")
		du_keep="$du_keep$(printf '%s\n' "$du_lines" | cut -d' ' -f1 | tr '\n' ' ')"
		if [ "${DRY:-0}" = 1 ]; then
			:
		elif [ -n "$du_lines" ]; then
			printf '%s\n' "$du_lines" >"$ROOT$STAGED.tmp.$$" && mv -f "$ROOT$STAGED.tmp.$$" "$ROOT$STAGED" || return 1
		else
			rm -f "$ROOT$STAGED" || return 1
		fi
	fi
	for du_dir in "$ROOT$OPT"/*/; do
		du_dir=${du_dir%/}
		du_name=${du_dir##*/}
		case $du_keep in *" $du_name "*) continue ;; esac
		[ -L "$du_dir" ] || [ ! -f "$du_dir/node/bundle.env" ] && continue
		# Out of sight first (one rename), then removed: a stop midway leaves no partial
		# driver folder under a real name, only a .gone.* that the next run clears.
		if act mv -T "$du_dir" "$ROOT$OPT/.gone.$du_name.$$" && act rm -rf "$ROOT$OPT/.gone.$du_name.$$"; then
			[ "${DRY:-0}" = 1 ] || say "removed $OPT/$du_name: not the running, the previous or a staged driver"
		fi
	done
}

# repository_url FOLDER: the bundle repository the driver in FOLDER fetches from, "" when it
# has none: the bundle's REPOSITORY_URL, or NVIDIA_REPOSITORY_URL from the environment or
# /etc/default/nvidia (a mirror; "none" turns fetching off). Only with the bundle's key.
repository_url() {
	if [ -n "${NVIDIA_REPOSITORY_URL+set}" ]; then
		ru_url=$NVIDIA_REPOSITORY_URL
	elif [ -f "$ROOT/etc/default/nvidia" ] &&  # a regular file: a FIFO would hang the boot
		grep -q '^NVIDIA_REPOSITORY_URL=' "$ROOT/etc/default/nvidia" 2>/dev/null; then
		ru_url=$(sed -n 's/^NVIDIA_REPOSITORY_URL=//p' "$ROOT/etc/default/nvidia" | tail -n 1 |
			sed "s/^\"\\(.*\\)\"\$/\\1/; s/^'\\(.*\\)'\$/\\1/")
	else
		ru_url=$(bundle_value REPOSITORY_URL "$1/node/bundle.env")
	fi
	[ "$ru_url" != none ] && [ -r "$1/node/repository.pub" ] || return 0
	printf '%s' "${ru_url%/}"
}

# pending_release: NEW_VERSION when update-engine has an update waiting for its reboot.
pending_release() {
	command -v update_engine_client >/dev/null 2>&1 || return 0
	update_engine_client -status 2>/dev/null | awk -F= '
		$1 == "CURRENT_OP" { op = $2 } $1 == "NEW_VERSION" { v = $2 }
		END { if (op == "UPDATE_STATUS_UPDATED_NEED_REBOOT" && v ~ /^[0-9]+\.[0-9]+\.[0-9]+/ && v != "0.0.0") print v }'
}
