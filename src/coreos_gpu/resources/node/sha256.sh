# shellcheck shell=sh
# The sha256 of a file, computed one way wherever the node computes one: install_nvidia.sh
# (the bundle id, --expect-sha256, SHA256SUMS), repository.sh (the index, a fetched bundle)
# and provision.sh (a first bundle).
# Copied in by the build (node.py inline_sources) at its line in lib.sh (and provision.sh);
# never run or sourced by itself.

# sha256_command: SHA256_TOOL is the command (with its options) that hashes the files it is
# given, or stdin: openssl's, which uses the CPU's SHA instructions (4x coreutils' sha256sum,
# a 100 MiB bundle in a tenth of a second), sha256sum where openssl is missing. Both print
# "<sum> <path>" per file, a " " or "*" before the path (openssl -r: "*").
sha256_command() {
	if command -v openssl >/dev/null 2>&1; then
		SHA256_TOOL="openssl dgst -sha256 -r"
	else
		SHA256_TOOL=sha256sum
	fi
}

# sha256_of FILE: FILE's sha256, 64 lower-case hex digits; fails when FILE cannot be read.
sha256_of() {
	[ -n "${SHA256_TOOL:-}" ] || sha256_command
	# shellcheck disable=SC2086 # a command and its options
	so_sum=$($SHA256_TOOL <"$1") || return 1
	printf '%s\n' "${so_sum%% *}"
}
