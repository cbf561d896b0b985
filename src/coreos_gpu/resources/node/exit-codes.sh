# shellcheck shell=sh
# Exit codes of the node's programs, made from coreos-gpu's one table of them
# (src/coreos_gpu/resources/exit-codes.toml, which the docs and the man pages come from
# too): do not edit, change the table and run `python scripts/exit_codes.py`.
# Constants only, the same in every script that sources it: die "$INSTALL_CORRUPT" ….
# One { } group, so that shellcheck's directive, which a script's parts lose once copied
# into its middle, covers every assignment wherever it stands.
# shellcheck disable=SC2034  # each script uses only some
{

# install_nvidia.sh: installed (and started, unless --no-start; a repository's watcher or retry
#   timer, or the persistence daemon, that would not start is a warning), or uninstalled; or
#   staged, when the bundle has no modules for the running kernel (see --force)
# startup.sh: the driver is loaded and answers, or there is no NVIDIA GPU (nothing is loaded)
# node/fetch.sh: staged, or nothing to do (installed or staged already; no update waiting)
# nvidia-doctor: every check passed
# provision.sh: installed, or installed before (the stamp is there)
SUCCESS=0

# install_nvidia.sh: a step failed (the message says which, and why); the node is as it was before
#   the run
# node/fetch.sh: a step failed (the message says which): a folder or file under /opt/nvidia could
#   not be made or written, or --watch's update_engine_client ended
# provision.sh: a step failed (the message says which): a folder could not be made, or the
#   downloaded bundle not moved into it
STEP_FAILED=1

# nvidia-doctor: a check failed (each FAIL line names its fix)
DOCTOR_CHECK_FAILED=1

# install_nvidia.sh, startup.sh, nvidia-doctor, provision.sh: bad command line
# node/fetch.sh: bad command line or setting (NVIDIA_FETCH_TIMEOUT)
USAGE=2

# install_nvidia.sh: not run as root
INSTALL_NOT_ROOT=3

# startup.sh: the installation is incomplete, or current is broken and there is no whole previous
#   to fall back to; run install_nvidia.sh again
STARTUP_INCOMPLETE=3

# node/fetch.sh: no repository configured (built without --repository, or
#   NVIDIA_REPOSITORY_URL=none), or this installation is incomplete
FETCH_NO_REPOSITORY=3

# nvidia-doctor: current is broken: /opt/nvidia/current is not a link to a whole driver folder
#   (every check still runs, and says how to repair it)
DOCTOR_BROKEN=3

# install_nvidia.sh: the bundle is corrupt, incomplete or unsafe (a file does not match
#   SHA256SUMS, a link leaves the bundle, a file is missing or not part of the bundle), or not the
#   one --expect-sha256 names; extract the archive again, where only root can write
INSTALL_CORRUPT=4

# startup.sh: the kernel does not take these modules: kernel mismatch (no modules for the running
#   kernel, or refused as built for another, "Invalid module format"; the message names both
#   kernel releases), or it loads only signed modules (lockdown, Secure Boot) and these are
#   unsigned (said before any insmod) or signed with a key it rejects
STARTUP_KERNEL_REFUSED=4

# install_nvidia.sh: not enough free space in /opt
INSTALL_NO_SPACE=5

# startup.sh: a module failed to load for another reason, or the firmware search path could not be
#   set
STARTUP_LOAD_FAILED=5

# install_nvidia.sh: another install_nvidia.sh kept the lock for 10 minutes
# node/fetch.sh: another fetch kept its lock for 15 minutes
LOCKED=6

# startup.sh: device nodes could not be made
STARTUP_NO_DEVICE_NODES=6

# install_nvidia.sh: a command it needs is missing
# node/fetch.sh: a command it needs is missing (curl or wget, openssl, tar, …)
MISSING_COMMAND=7

# startup.sh: nvidia-smi does not answer
STARTUP_NO_ANSWER=7

# install_nvidia.sh: the bundle is not for this node: another machine or OS, or no modules for the
#   running kernel while another driver version or flavour is current, so it cannot be staged
#   beside it (--force to switch anyway); or the node is not for it: Flatcar's NVIDIA sysext is
#   enabled or merged (two drivers), or the kernel loads only signed modules (lockdown, Secure
#   Boot) and the bundle's are unsigned (Secure Boot)
INSTALL_NOT_FOR_NODE=8

# startup.sh: the driver loaded but found no usable GPU ("No such device")
STARTUP_NO_GPU=8

# startup.sh: another NVIDIA driver: another version is loaded already (reboot to switch), or
#   Flatcar's NVIDIA sysext is enabled or merged (nothing is loaded; the line says how to disable
#   it)
STARTUP_OTHER_DRIVER=9

# install_nvidia.sh: installed, but the driver did not start: 10 + startup.sh's exit code 3–9 (14:
#   kernel mismatch, 15: a module failed to load, 18: no usable GPU, …); 11 for any other
INSTALL_NOT_STARTED_FIRST=11
INSTALL_NOT_STARTED_LAST=19
INSTALL_NOT_STARTED_OFFSET=10

# install_nvidia.sh: installed, and startup.sh loaded the driver, but systemctl start
#   nvidia.service failed; journalctl -u nvidia.service says why
INSTALL_SERVICE_FAILED=20

# install_nvidia.sh: installed, but the bundle has no modules for the running kernel and fetching
#   them from the repository failed: startup.sh's code
INSTALL_FETCH_FAILED_FIRST=21
INSTALL_FETCH_FAILED_LAST=29

# startup.sh: no installed folder has modules for this kernel, and fetching them failed:
#   node/fetch.sh's code (below)
STARTUP_FETCH_FAILED_FIRST=21
STARTUP_FETCH_FAILED_LAST=29

# node/fetch.sh: the downloaded bundle is larger than the signed index gives, or of its size but
#   not its sha256; nothing was installed
# provision.sh: the bundle does not match its sha256 (or the size the index lists); nothing was
#   installed
REPO_BUNDLE_MISMATCH=21

# node/fetch.sh: the repository cannot be reached, a download failed, timed out, came back empty
#   (what wget makes of a 416) or short of the bundle's signed size, or the URL holds no
#   coreos-gpu repository
# provision.sh: the repository cannot be read (each index file within a minute, the bundle within
#   20), or is no coreos-gpu repository
REPO_UNREACHABLE=22

# node/fetch.sh: the index is not signed by the bundle's key, or is not the index index.current
#   names
# provision.sh: the repository's index does not match its signature by the key in repository.pub
REPO_UNSIGNED=23

# node/fetch.sh: the repository has no bundle for this kernel (or release), driver, flavour,
#   profile and OS
# provision.sh: the index lists no bundle for this node's OS and kernel of the pinned driver,
#   flavour and profile, or only under a malformed path
REPO_NO_BUNDLE=24

# node/fetch.sh: the downloaded bundle cannot be extracted (the line names why: truncated, not
#   gzip, …), lacks what the signed index promises (an executable install_nvidia.sh, modules for
#   the kernel it is listed for), or did not install (its message says why)
# provision.sh: the bundle cannot be extracted
REPO_BAD_BUNDLE=25

# node/fetch.sh: not enough free space for the download
FETCH_NO_SPACE=26

# startup.sh: fetching failed for another reason (the line before says which)
STARTUP_FETCH_OTHER=27

# node/fetch.sh: the index is older (a lower generation) than one this node accepted before: a
#   mirror or cache replays an old copy, or index.current was rolled back (see Publish)
# provision.sh: the index is older than one this node accepted before (fetch.sh's 28)
REPO_ROLLED_BACK=28

# node/fetch.sh: the index has expired, or has no expiry: the repository was not refreshed
#   (coreos-gpu repository refresh; sync does it), or the node's clock is wrong
# provision.sh: the index has expired, or has no expiry (fetch.sh's 29)
REPO_EXPIRED=29

# node/fetch.sh: stopped by SIGINT (Ctrl-C); its temporary folder is removed
FETCH_INTERRUPTED=130

# node/fetch.sh: stopped by SIGTERM (systemctl stop, a unit's timeout); its temporary folder is
#   removed
FETCH_TERMINATED=143
}
