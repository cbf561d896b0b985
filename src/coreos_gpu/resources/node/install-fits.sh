# shellcheck shell=sh
# shellcheck disable=SC2034,SC2015 # variables for the script it is copied into; "A && B || C" means C when either fails
# install_nvidia.sh: whether the bundle fits this node (its OS, machine, kernel, the other
# drivers there) and its space.
# Copied in by the build (node.py inline_sources) at its line in install_nvidia.sh;
# never run or sourced by itself.

# check_fits_node: refuse (8) a bundle for another OS or machine; and decide what a bundle
# without modules for the running kernel does. Making it current would leave the node
# without a driver that loads until it boots one of those kernels, so it is staged beside
# the installed driver (startup.sh switches to it at that boot), as --stage does. Where it
# cannot be (no driver of its version and flavour is current), it is refused, unless
# --force; where no driver is installed, the node has nothing to lose: it becomes current.
check_fits_node() {
	cf_env=$BUNDLE/node/bundle.env
	# `current` is switched by renaming a link over it: a folder or file there (an earlier
	# tool's) would stop the switch, after the driver folder has landed.
	[ ! -e "$ROOT$OPT/current" ] || [ -L "$ROOT$OPT/current" ] ||
		die "$STEP_FAILED" "$ROOT$OPT/current is not a link (an earlier tool's folder?): move it out of $OPT and run me again"
	cf_os=$(os_release ID)
	case $cf_os in
	flatcar | coreos)
		[ "$cf_os" = "$(bundle_value OS "$cf_env")" ] ||
			die "$INSTALL_NOT_FOR_NODE" "this bundle is for $(bundle_value OS "$cf_env"), but this node runs $cf_os; build one with --os $cf_os" ;;
	esac
	cf_arch=$(uname -m) && [ -n "$cf_arch" ] || die "$STEP_FAILED" "uname -m failed: cannot tell this node's machine"
	[ "$cf_arch" = "$(bundle_value ARCH "$cf_env")" ] ||
		die "$INSTALL_NOT_FOR_NODE" "this bundle is for $(bundle_value ARCH "$cf_env") machines, but this node is $cf_arch; install a bundle built for $cf_arch"
	cf_kernels=$(kernel_releases_in "$PAYLOAD")
	cf_running=$(uname -r) && [ -n "$cf_running" ] || die "$STEP_FAILED" "uname -r failed: cannot tell the running kernel"
	# Flatcar's own NVIDIA driver as a sysext: two drivers never load on one node.
	find_nvidia_sysext "$cf_running"
	[ -z "$SYSEXT" ] ||
		die "$INSTALL_NOT_FOR_NODE" "$SYSEXT: its driver and this one must not both load, so nothing was changed; to install this bundle, $SYSEXT_FIX, and run me again (or keep the sysext, Flatcar's signed driver, and do not install this one)"
	case " $cf_kernels" in *" $cf_running "*)
		# A driver made current that this kernel will not load (it loads only signed
		# modules): refused now, not at every boot. A staged one is startup.sh's to judge at
		# its boot.
		[ "$STAGE_ONLY" = 0 ] || return 0
		read_lockdown
		[ -n "$LOCKDOWN" ] || return 0
		cf_unsigned=$(first_unsigned "$PAYLOAD/modules/$cf_running"/*.ko)
		[ -z "$cf_unsigned" ] ||
			die "$INSTALL_NOT_FOR_NODE" "this kernel loads only signed modules ($LOCKDOWN), and this bundle's ${cf_unsigned#"$BUNDLE/"} is unsigned: its driver cannot load here, so nothing was changed; $LOCKDOWN_CHOICES"
		return 0 ;;
	esac
	[ "$STAGE_ONLY" = 0 ] && [ "$FORCE" = 0 ] || return 0
	cf_current=$(link_of "$ROOT$OPT/current") || die "$STEP_FAILED" "cannot read the link $ROOT$OPT/current"
	installed_folder "$cf_current" || return 0
	[ "$cf_current" != "$NAME" ] || return 0  # current already: nothing to switch
	if [ "$(bundle_value DRIVER_VERSION "$ROOT$OPT/$cf_current/node/bundle.env")" = "$DRIVER_VERSION" ] &&
		[ "$(bundle_value FLAVOUR "$ROOT$OPT/$cf_current/node/bundle.env")" = "$(bundle_value FLAVOUR "$cf_env")" ]; then
		say "this node runs kernel $cf_running, and the bundle has modules only for ${cf_kernels% }: staging it beside $OPT/current, which stays $cf_current until the node boots one of those (--force makes it current now)"
		STAGE_ONLY=1
		START=0
		ENABLE=0
		return 0
	fi
	die "$INSTALL_NOT_FOR_NODE" "this node runs kernel $cf_running, but the bundle has modules only for ${cf_kernels% }, and the installed driver ($cf_current) is another version or flavour, so it cannot be staged beside it; install a bundle built for kernel $cf_running, or give --force to switch to it anyway (the driver will not load until the node boots one of those kernels)"
}

# check_space: a new driver folder fits in $OPT (with 1 MiB to spare); else die INSTALL_NO_SPACE.
check_space() {
	if [ ! -d "$DEST" ]; then
		NEED=$(du -sk "$PAYLOAD" "$BUNDLE/node" | awk '{ s += $1 } END { print s + 1024 }')
		SPACE=$ROOT$OPT
		while [ ! -d "$SPACE" ]; do SPACE=$(dirname "$SPACE"); done  # the first install makes it
		FREE=$(df -Pk "$SPACE" | awk 'NR == 2 { print $4 }')
		case $NEED:$FREE in
		:* | *: | *[!0-9:]*) die "$STEP_FAILED" "cannot tell the space the driver needs (du) or the space free in $ROOT$OPT (df)" ;;
		esac
		[ "$FREE" -ge "$NEED" ] ||
			die "$INSTALL_NO_SPACE" "not enough space for the driver in $ROOT$OPT: $((NEED / 1024)) MiB needed, $((FREE / 1024)) MiB free; free some space and run me again"
	fi
}

# check_stage_fits: a bundle to --stage is of current's driver and flavour, the only ones
# startup.sh switches among.
check_stage_fits() {
	if [ "$STAGE_ONLY" = 1 ]; then
		for key in DRIVER_VERSION FLAVOUR; do
			[ "$(bundle_value "$key" "$ROOT$OPT/current/node/bundle.env")" = "$(bundle_value "$key" "$BUNDLE/node/bundle.env")" ] ||
				die "$USAGE" "--stage: this bundle's $key is $(bundle_value "$key" "$BUNDLE/node/bundle.env"), the installed driver's $(bundle_value "$key" "$ROOT$OPT/current/node/bundle.env"); startup.sh would never switch to it: install it without --stage"
		done
	fi
}
