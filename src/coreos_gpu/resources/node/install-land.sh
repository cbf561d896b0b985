# shellcheck shell=sh
# shellcheck disable=SC2034,SC2153,SC2015 # variables for the script it is copied into; names another part defines; "A && B || C" means C when either fails
# install_nvidia.sh: $OPT and its lock, and the driver folder landed in it.
# Copied in by the build (node.py inline_sources) at its line in install_nvidia.sh;
# never run or sourced by itself.

# make_opt: $OPT (and /opt) appear in one rename, with the record of the folders made.
make_opt() {
	[ -d "$ROOT$OPT" ] && return 0
	if [ "$DRY" = 1 ]; then
		say "would create $OPT"
		return 0
	fi
	mo_top=$ROOT$OPT
	while [ ! -d "$(dirname "$mo_top")" ]; do mo_top=$(dirname "$mo_top"); done
	mo_tmp=$mo_top.tmp.$$
	mo_rest=$ROOT$OPT
	mo_rest=${mo_rest#"$mo_top"}  # "/nvidia" when /opt is missing too, else ""
	mkdir -p "$mo_tmp$mo_rest" || return 1
	if [ -n "$mo_rest" ]; then
		printf '%s\n' "${mo_top#"$ROOT"}" >"$mo_tmp$mo_rest/.created-dirs" || return 1
	fi
	# Another run may have made it meanwhile: then theirs stands.
	mv -T "$mo_tmp" "$mo_top" 2>/dev/null || rm -rf "$mo_tmp"
	[ -d "$ROOT$OPT" ]
}

# lock: serialise against a concurrent run; the lock file lives with the installation
# (lib-lock.sh's lock_file: it also copes with a holder that removes the file).
lock() {
	if [ "$DRY" = 1 ]; then
		make_opt
		return 0
	fi
	[ -e "$ROOT$OPT/.lock" ] || LOCK_MADE=1
	lock_file 9 "$ROOT$OPT/.lock" 600 6 \
		"another install_nvidia.sh holds $ROOT$OPT/.lock; wait for it to finish" lock_prepare
}

# lock_prepare: $OPT, where the lock file lives, before each try (an --uninstall that held the
# lock may have removed it).
lock_prepare() {
	make_opt || die "$STEP_FAILED" "cannot create $OPT under ${ROOT:-/}"
}

# A run that was killed leaves temporary names behind: clear them under the lock.
clean_leftovers() {
	for left in "$ROOT$OPT"/.stage.* "$ROOT$OPT"/.undo.* "$ROOT$OPT"/.gone.* "$ROOT$OPT"/*.tmp.* "$ROOT/opt/bin"/*.tmp.* \
		"$ROOT/opt".tmp.* "$ROOT$OPT".tmp.* \
		"$UNITS"/*.tmp.* "$UNITS"/*.d/*.tmp.* "$LDCONF".tmp.*; do
		[ -e "$left" ] || [ -L "$left" ] || continue
		act rm -rf "$left"
	done
}

# land_bundle: the bundle's parts, into the staging folder: copied (-P: links stay links; no
# -p: the copies are root's, not the extracting user's), or, for a bundle fetch.sh extracted
# (fetched_bundle), moved: one rename each, the payload's folder over the empty staging one.
land_bundle() {
	if [ "$LAND" = move ]; then
		# shellcheck disable=SC2086 # the names are word-split on purpose
		mv -T "$PAYLOAD" "$STAGE" && (cd "$BUNDLE" && mv node $TOP_NAMES "$STAGE/")
	else
		# shellcheck disable=SC2086 # the names are word-split on purpose
		cp -RP "$PAYLOAD/." "$STAGE/" && (cd "$BUNDLE" && cp -RP node $TOP_NAMES "$STAGE/")
	fi
}

# fetched_bundle: the extracted bundle lies in a work folder of node/fetch.sh's: directly in
# $OPT, named .fetch.*, mode 0700 and owned as $OPT is, on its file system. Nobody but root
# could reach it from the moment the archive, verified against the signed index, was
# extracted there, and fetch.sh removes it after this run: moving its files saves a copy of
# every byte, and the staging folder is checked all the same (shape, owner, modes, sums).
# Any other folder, the extracting user's above all, is copied from.
fetched_bundle() {
	fb_parent=${BUNDLE%/*}
	fb_opt=$(readlink -f "$ROOT$OPT" 2>/dev/null) && [ "${fb_parent%/*}" = "$fb_opt" ] || return 1
	case ${fb_parent##*/} in .fetch.*) ;; *) return 1 ;; esac
	[ ! -L "$fb_parent" ] && [ "$(stat -c '%u %a %d' "$fb_parent" 2>/dev/null)" = "$(stat -c '%u 700 %d' "$fb_opt" 2>/dev/null)" ]
}

# set_modes: the modes the bundle lists, one chmod call per mode (links have no mode of
# their own; folders are 0755). check_tree … modes then checks that every file has its own.
set_modes() {
	(cd "$STAGE" && find . -type d -exec chmod 0755 {} + &&
		awk -v strip="payload/$DRIVER_VERSION/" '$2 == "file" {
			if (index($3, strip) == 1) $3 = substr($3, length(strip) + 1); print $1, $3 }' node/contents |
		sort | awk '$1 != mode { if (mode != "") print ""; mode = $1; printf "%s", mode } { printf " %s", $2 } END { print "" }' |
		while read -r mode files; do
			# shellcheck disable=SC2086 # a list of plain relative paths
			chmod "$mode" $files || exit 1
		done)
}

# land_driver: the driver folder $DEST, from the bundle (copied or moved into a staging folder,
# checked there, renamed into place), or as it is when installed already; FROM is where the
# rest of the install reads the bundle's files: $DEST (the extracted bundle on a dry run).
land_driver() {
	if [ -d "$DEST" ]; then
		check_expected "$DEST" "the bundle in $BUNDLE (installed already in $OPT/$NAME)"
		say "driver $DRIVER_VERSION ($ID) is installed already in $OPT/$NAME"
		FROM=$DEST
	elif [ "$DRY" = 1 ]; then
		say "would install driver $DRIVER_VERSION ($ID) into $OPT/$NAME"
		FROM=$BUNDLE
		BAD=$(check_settings "$FROM/node/bundle.env")
		[ -z "$BAD" ] || die "$INSTALL_CORRUPT" "the bundle in $BUNDLE is unsafe: $BAD; rebuild it with coreos-gpu build"
		check_expected "$BUNDLE" "the extracted bundle in $BUNDLE"
	else
		STAGE=$(mktemp -d "$ROOT$OPT/.stage.XXXXXX") || die "$STEP_FAILED" "cannot create a folder in $ROOT$OPT"
		txn_note tree "$STAGE"
		LAND=copy
		! fetched_bundle || LAND=move
		quietly land_bundle ||
			die "$INSTALL_CORRUPT" "cannot $LAND the bundle in $BUNDLE into $STAGE; extract the whole archive again"
		# Its shape before anything follows a path in it (chmod would follow a link), then
		# owner and modes, then the sums.
		BAD=$(cd "$STAGE" && check_bundle "payload/$DRIVER_VERSION/" structure)
		[ -z "$BAD" ] ||
			die "$INSTALL_CORRUPT" "the bundle in $BUNDLE changed after it was extracted: $BAD; download and extract it again, where only root can write"
		quietly chown -R -h 0:0 "$STAGE" || die "$STEP_FAILED" "cannot make $STAGE root's"
		quietly set_modes || die "$STEP_FAILED" "cannot set the modes of the files in $STAGE"
		BAD=$(cd "$STAGE" && verdict "$(check_tree "payload/$DRIVER_VERSION/" modes)" "the files' modes")
		[ -z "$BAD" ] || die "$STEP_FAILED" "cannot set the modes of the files in $STAGE: $BAD"
		BAD=$(cd "$STAGE" && verdict "$(check_sums "payload/$DRIVER_VERSION/")" "the bundle's sums")
		[ -z "$BAD" ] ||
			die "$INSTALL_CORRUPT" "the bundle in $BUNDLE is corrupt: $BAD (in its root-owned copy); download and extract it again"
		# The sums passed, so this one SHA256SUMS speaks for the whole copy.
		check_expected "$STAGE" "the extracted bundle in $BUNDLE"
		BAD=$(check_settings "$STAGE/node/bundle.env")
		[ -z "$BAD" ] ||
			die "$INSTALL_CORRUPT" "the bundle in $BUNDLE is unsafe: $BAD; rebuild it with coreos-gpu build"
		# The soname links (libnvidia-ml.so.1 -> …) are ldconfig's to make, in the new folder
		# before it goes live; the cache itself is refreshed once current points there.
		[ ! -d "$STAGE/lib64" ] || quietly ldconfig -n "$STAGE/lib64" || die "$STEP_FAILED" "ldconfig -n $STAGE/lib64 failed"
		quietly chmod 0755 "$STAGE" && quietly sync -f "$STAGE" || die "$STEP_FAILED" "cannot write $STAGE to disk"
		txn_note tree "$DEST"
		quietly mv -T "$STAGE" "$DEST" || die "$STEP_FAILED" "cannot rename $STAGE to $DEST"
		say "installed driver $DRIVER_VERSION ($ID) into $OPT/$NAME"
		FROM=$DEST
	fi
}

# stage_driver: with --stage, record the landed driver folder in $STAGED, for startup.sh to
# switch to at the boot of its kernel; and end the run there.
stage_driver() {
	if [ "$STAGE_ONLY" = 1 ]; then
		CURRENT=$(readlink "$ROOT$OPT/current" 2>/dev/null || true)
		if [ "$CURRENT" = "$NAME" ]; then
			say "driver $DRIVER_VERSION ($ID) is the current one already: nothing to stage"
		elif [ "$DRY" = 1 ]; then
			say "would record $OPT/$NAME in $STAGED as staged for release $STAGE_RELEASE"
		else
			txn_save "$ROOT$STAGED"
			record_staged "$NAME" "$STAGE_RELEASE" || die "$STEP_FAILED" "cannot write $ROOT$STAGED"
			say "staged driver $DRIVER_VERSION ($ID) for kernel $KERNEL_RELEASES in $OPT/$NAME; $OPT/current stays $CURRENT until the node boots that kernel"
		fi
		txn_commit
		exit 0
	fi
}
