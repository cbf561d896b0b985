# shellcheck shell=sh
# shellcheck disable=SC2015 # "A && B || C" means C when either fails
# install_nvidia.sh: starting the installed driver and the bundle's units.
# Copied in by the build (node.py inline_sources) at its line in install_nvidia.sh;
# never run or sourced by itself.

# start_bundle_units: the stage watcher, the retry timer and the persistence daemon, now:
# enabled, they start only at the next boot, and an OS update downloaded before it would go
# unstaged. After nvidia.service (an elapsed OnBootSec fires the timer at once, and its
# fetch.sh --retry must not race the install's own start). The timer and the watcher start
# whether or not the driver started (the retry timer is for that case); the daemon only when
# it did: its Requires= would start nvidia.service again, in the background, for a driver
# that just failed to load. The watcher is restarted: it runs the fetch.sh, settings and key
# of the driver that was current when it started; a running daemon is left alone (the same
# driver is loaded: another version needs a reboot). --no-block: the watcher is ordered after
# update-engine and the network, and must not hold the first boot's provisioning unit.
# A failure is a warning: the driver is installed, and they start at the next boot.
start_bundle_units() {
	for sbu_unit in $ENABLED_BUNDLE_UNITS; do
		[ -f "$FROM/node/$sbu_unit" ] || continue
		case $sbu_unit in
		nvidia-persistenced.service)
			[ "$STARTED:$UNIT_STARTED" = 0:1 ] || continue
			sbu_verb=start ;;
		*.service) sbu_verb=restart ;;
		*) sbu_verb=start ;;
		esac
		quietly systemctl_root "$sbu_verb" --no-block "$sbu_unit" ||
			warn "cannot start $sbu_unit (${CAUSE:-systemctl $sbu_verb failed}); it starts at the next boot, or now with: systemctl start $sbu_unit"
		CAUSE=
	done
}

# start_driver: startup.sh here, so its words reach the terminal; then the unit, so systemd
# knows; then the bundle's units. Dies with startup.sh's code shown through.
start_driver() {
	act "$ROOT$OPT/startup.sh"
	STARTED=$?
	UNIT_STARTED=1
	[ "$STARTED" != 0 ] || systemctl_root start nvidia.service || UNIT_STARTED=0
	start_bundle_units
	# startup.sh's own code shows through: INSTALL_NOT_STARTED_OFFSET + its 3..9 (STARTUP_*;
	# any other: INSTALL_NOT_STARTED_FIRST), and its REPO_* (21-29) as they are.
	case $STARTED in
	0) ;;
	[3-9]) die $((INSTALL_NOT_STARTED_OFFSET + STARTED)) "installed driver $DRIVER_VERSION, but it did not start (startup.sh exit $STARTED): see above, fix it, then: systemctl restart nvidia.service" ;;
	2[1-9]) die "$STARTED" "installed driver $DRIVER_VERSION, but it has no modules for this kernel and none could be fetched (startup.sh exit $STARTED): see above" ;;
	*) die "$INSTALL_NOT_STARTED_FIRST" "installed driver $DRIVER_VERSION, but startup.sh failed (exit $STARTED): see above, fix it, then: systemctl restart nvidia.service" ;;
	esac
	[ "$UNIT_STARTED" = 1 ] || die "$INSTALL_SERVICE_FAILED" "installed driver $DRIVER_VERSION and startup.sh loaded it, but systemctl start nvidia.service failed: journalctl -u nvidia.service"
}
