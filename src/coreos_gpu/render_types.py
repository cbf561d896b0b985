"""What `coreos-gpu render` writes and from what: the kinds of file, the Ignition specs, the
settings that pin the bundle a repository node takes, and the bundle or repository a node takes
it from (BundleSource, RepositorySource).

Values only, on config.py's: the parser reads the kinds and defaults from here without loading
what render calls (inspection, keys), provision.py writes its files from the sources, and
render.py builds and checks them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from coreos_gpu.config import DEFAULT_AGENT_UNITS, KernelModuleType, OsName, Profile


class Kind(StrEnum):
    IGNITION = "ignition"
    BUTANE = "butane"
    TERRAFORM = "terraform"
    MARATHON_APP = "marathon-app"
    METRONOME_JOB = "metronome-job"
    K8S_SMOKE_POD = "k8s-smoke-pod"


PROVISIONING = (Kind.IGNITION, Kind.BUTANE, Kind.TERRAFORM)
# The settings render takes (config.py declares each: flag, check, default). They pin the
# bundle a repository node takes; given as flags, they are checked against a bundle file.
SETTINGS = ("driver_version", "kernel_module_type", "profile")
# The settings that name the units the provisioning unit runs before (the bundle's agent
# units): given as flags or in the config file, they must be a bundle file's own.
AGENT_SETTINGS = ("agents", "agent_units")
# Ignition spec versions rendered: 2.2.0 is what CoreOS Container Linux's Ignition (v0.22 and
# later) and Flatcar before 3185.0.0 read; 3.3.0 is what Flatcar reads from 3185.0.0 on
# (Ignition v2.11+), and what Butane's flatcar 1.0.0 variant translates to.
IGNITION_SPECS = ("2.2.0", "3.3.0")
DEFAULT_SPEC = {OsName.COREOS: "2.2.0", OsName.FLATCAR: "3.3.0"}
# nvidia-smi comes from the host: Mesos's GPU isolator mounts the driver's tools and libraries
# at /usr/local/nvidia in images that set NVIDIA_VISIBLE_DEVICES (nvidia/cuda images do).
DEFAULT_IMAGE = "nvidia/cuda:12.2.2-base-ubuntu22.04"


@dataclass(frozen=True)
class BundleSource:
    """A bundle nodes download from url; sha512, contents_sha256 (of its SHA256SUMS: what
    install_nvidia.sh --expect-sha256 takes) and the manifest's facts when the file was at
    hand, "" and () when only its URL and sha256 were given."""

    url: str
    sha256: str
    sha512: str = ""
    contents_sha256: str = ""
    driver_version: str = ""
    flavour: str = ""
    profile: str = ""
    os: str = ""
    kernel_releases: tuple[str, ...] = ()
    agent_units: tuple[str, ...] = DEFAULT_AGENT_UNITS


@dataclass(frozen=True)
class RepositorySource:
    """A repository the node fetches the bundle for its own kernel from: the bundle of this
    driver, flavour and profile (node/repository.sh repo_pick)."""

    url: str
    public_key_pem: bytes
    fingerprint: str
    driver_version: str
    flavour: KernelModuleType
    profile: Profile
    agent_units: tuple[str, ...] = DEFAULT_AGENT_UNITS

    def pinned(self) -> str:
        return (f"driver {self.driver_version}, {self.flavour.value} modules, "
                f"{self.profile.value} profile")
