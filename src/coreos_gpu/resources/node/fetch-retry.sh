# shellcheck shell=sh
# shellcheck disable=SC2015 # "A && B || C" means C when either fails
# fetch.sh --retry (nvidia-retry.timer): start nvidia.service again after a failure a retry
# can fix; restarting the service, where fetch.sh proper fetches bundles.
# Copied in by the build (node.py inline_sources) at its line in fetch.sh;
# never run or sourced by itself.

# The backoff lives in /run (a boot starts afresh): "<failures> <no retry before (epoch)>".
# 2, 4, 8, 16 then 30 minutes between attempts; the timer wakes every 2 minutes.
# A failure no retry can fix (unfixable_failure) stops the retries: said once, in one line,
# and /run/coreos-gpu/retry-stopped holds "<nvidia.service's run> <current>" until the
# failure changes: nvidia.service runs again (a boot, an install that starts it, systemctl
# restart) or `current` names another folder (an install with --no-start: started then).

# unfixable_failure: when nvidia.service last failed in a way that starting it again cannot
# change (startup.sh's code for something on the node: no usable GPU, a module the kernel
# refused, another driver loaded), one line: what, and what to do; else nothing. A fetch
# that failed (21 and up: a later publish, the network, space), an install's lock held (3),
# nvidia-smi not answering yet (7), a timeout or a signal: all worth retrying.
unfixable_failure() {
	# Only with Result=exit-code is ExecMainStatus startup.sh's exit code; after a timeout
	# or a signal it is the signal's number.
	[ "$(systemctl show -p Result --value nvidia.service 2>/dev/null)" = exit-code ] || return 0
	uf_code=$(systemctl show -p ExecMainStatus --value nvidia.service 2>/dev/null)
	case $uf_code in
	"$USAGE") uf_what="bad command line (not the ExecStart install_nvidia.sh wrote)"; uf_do="install the bundle again (install_nvidia.sh)" ;;
	"$STARTUP_KERNEL_REFUSED") uf_what="kernel $(uname -r) does not take the modules: none for it, built for another, or unsigned where it loads only signed ones (Secure Boot)"; uf_do="journalctl -u nvidia.service says which: install a bundle built for kernel $(uname -r), or one with modules it trusts" ;;
	"$STARTUP_LOAD_FAILED") uf_what="a module failed to load"; uf_do="journalctl -u nvidia.service and dmesg say why; fix it, then systemctl restart nvidia.service" ;;
	"$STARTUP_NO_DEVICE_NODES") uf_what="device nodes could not be made"; uf_do="journalctl -u nvidia.service says which; fix it, then systemctl restart nvidia.service" ;;
	"$STARTUP_NO_GPU") uf_what="the driver found no usable GPU"; uf_do="check that driver $DRIVER_VERSION ($FLAVOUR modules) supports the GPU, then systemctl restart nvidia.service" ;;
	"$STARTUP_OTHER_DRIVER") uf_what="another NVIDIA driver version is loaded, or Flatcar's NVIDIA sysext is enabled"; uf_do="reboot to load $DRIVER_VERSION, or disable the sysext as journalctl -u nvidia.service says" ;;
	*) return 0 ;;
	esac
	printf '%s\n' "nvidia.service failed (startup.sh exit $uf_code: $uf_what) and no retry can fix that: not starting it again until it runs again or $OPT/current changes; $uf_do (nvidia-doctor checks the node)"
}

retry() {
	rt_state=$ROOT/run/coreos-gpu/retry
	rt_stopped=$ROOT/run/coreos-gpu/retry-stopped
	if systemctl is-active -q nvidia.service 2>/dev/null; then
		rm -f "$rt_state" "$rt_stopped"
		return 0
	fi
	rt_unfixable=$(unfixable_failure)
	if [ -n "$rt_unfixable" ]; then
		rt_run=$(systemctl show -p InvocationID --value nvidia.service 2>/dev/null)
		rt_current=$(readlink "$ROOT$OPT/current" 2>/dev/null)
		{ read -r rt_was_run rt_was_current <"$rt_stopped"; } 2>/dev/null || rt_was_run=
		if [ "${rt_run:--}" != "$rt_was_run" ]; then
			# Exit 0: nothing failed in this run, and a failed retry unit would add its own
			# lines to the journal every 2 minutes.
			rm -f "$rt_state"
			mkdir -p "${rt_stopped%/*}" && printf '%s %s\n' "${rt_run:--}" "${rt_current:--}" >"$rt_stopped" ||
				warn "cannot write $rt_stopped"
			warn "$rt_unfixable"
			return 0
		fi
		[ "${rt_current:--}" != "$rt_was_current" ] || return 0
		say "$OPT/current is ${rt_current:-gone} now, $rt_was_current when nvidia.service failed"
		rm -f "$rt_state"
	fi
	rm -f "$rt_stopped"
	{ read -r rt_failures rt_next <"$rt_state"; } 2>/dev/null || { rt_failures=0; rt_next=0; }
	rt_now=$(date +%s)
	if [ "$rt_now" -lt "$rt_next" ]; then
		say "nvidia.service failed; next attempt in $((rt_next - rt_now)) s (attempt $((rt_failures + 1)))"
		return 0
	fi
	say "nvidia.service failed; starting it again (attempt $((rt_failures + 1)))"
	if systemctl start nvidia.service; then
		rm -f "$rt_state"
		say "nvidia.service started: the driver is loaded"
		if [ "$(bundle_value ON_DRIVER_FAILURE "$HERE/node/bundle.env")" = wait ]; then
			# on_driver_failure = wait: the agent did not start without the driver; now it can.
			# shellcheck disable=SC2046 # a list of unit names
			systemctl start --no-block $(bundle_value AGENT_UNITS "$HERE/node/bundle.env") ||
				warn "cannot start $(bundle_value AGENT_UNITS "$HERE/node/bundle.env")"
		else
			say "a Mesos agent that started without GPUs sees them once restarted (systemctl restart $(bundle_value AGENT_UNITS "$HERE/node/bundle.env"))"
		fi
		return 0
	fi
	rt_failures=$((rt_failures + 1))
	rt_delay=$((120 << (rt_failures > 4 ? 4 : rt_failures - 1)))
	[ "$rt_delay" -le 1800 ] || rt_delay=1800
	mkdir -p "${rt_state%/*}" && printf '%s %s\n' "$rt_failures" "$((rt_now + rt_delay))" >"$rt_state" ||
		warn "cannot write $rt_state"
	warn "nvidia.service failed again (journalctl -u nvidia.service); next attempt in $rt_delay s"
	return 1
}
