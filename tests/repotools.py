"""Helpers for the repository tests: small real bundles, the node's own check of the index
(node/repository.sh: sh, awk and openssl), an S3 server (moto's) on 127.0.0.1, and publishers
that race each other in separate processes."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coreos_gpu.bundle import NodeSettings, assemble_bundle
from coreos_gpu.config import Compression, Profile
from coreos_gpu.layout import ReleaseInputs

from .bundletools import CLOUD, CLOUD_RELEASE, KERNEL, RELEASE, make_package, module_set
from .conftest import REPO

OTHER_RELEASE = ReleaseInputs(  # a second release on KERNEL: the index lists both
    os="flatcar", channel="stable", version="3975.2.3", kernel_release=KERNEL,
    image_url="https://stable.release.flatcar-linux.net/amd64-usr/3975.2.3/"
    "flatcar_developer_container.bin.bz2", image_sha256="5" * 64)


@dataclass(frozen=True)
class Bundles:
    amd64: Path  # KERNEL, releases 3975.2.2 and 3975.2.3
    cloud: Path  # CLOUD
    both: Path  # KERNEL and CLOUD in one bundle
    broken: Path  # amd64 with one payload file changed: fails inspect
    other_tool: Path  # amd64's inputs, another tool version: another bundle


def make_bundles(folder: Path, ko_dir: Path) -> Bundles:
    node_files = folder / "no-node-files"
    node_files.mkdir(parents=True)

    def one(name: str, kernels: tuple[str, ...], releases: tuple[ReleaseInputs, ...],
            tool_version: str = "0.1.0") -> Path:
        work = folder / name
        return assemble_bundle(
            package=make_package(work / "driver"),
            module_sets=[module_set(ko_dir, k) for k in kernels], profile=Profile.COMPUTE,
            compression=Compression.GZIP, output=work / "nvidia.tar.gz", releases=releases,
            node=NodeSettings(("dcos-mesos-slave.service",)), tool_version=tool_version,
            node_files=node_files).path

    amd64 = one("amd64", (KERNEL,), (RELEASE, OTHER_RELEASE))
    broken = folder / "broken" / "nvidia.tar.gz"
    broken.parent.mkdir()
    with tarfile.open(amd64) as old, tarfile.open(broken, "w:gz") as new:
        for member in old.getmembers():
            stream = old.extractfile(member)
            data = stream.read() if stream else b""
            if member.name.endswith("/bin/nvidia-smi"):
                data = b"not what SHA256SUMS says\n"
                member.size = len(data)
            new.addfile(member, io.BytesIO(data) if member.isreg() else None)
    return Bundles(amd64=amd64, cloud=one("cloud", (CLOUD,), (CLOUD_RELEASE,)),
                   both=one("both", (KERNEL, CLOUD), (RELEASE, CLOUD_RELEASE), "0.1.1"),
                   broken=broken,
                   other_tool=one("other-tool", (KERNEL,), (RELEASE,), "0.2.0"))


# --- what a node runs ------------------------------------------------------------------------

REPOSITORY_SH = REPO / "src/coreos_gpu/resources/node/repository.sh"
# What a node runs on its repository (fetch.sh and provision.sh source node/repository.sh):
# read index.current, check the index's signature with the repository's public key (openssl),
# its format, generation and expiry, then pick the bundle for a kernel. No copy of the node's
# reader: the node's own, with nothing remembered (REPO_CHECK_ONLY, a ROOT of its own).
NODE_CHECK = r"""
say() { printf '%s\n' "$*" >&2; }
die() { code=$1; shift; printf '%s\n' "$*" >&2; exit "$code"; }
. "${1%/*}/sha256.sh"  # sha256_of, which fetch.sh and provision.sh have from it too
. "${1%/*}/exit-codes.sh"  # the REPO_* codes it dies with, likewise
. "$1"
ROOT=$2/root REPO_CHECK_ONLY=1
repo_index "file://$3" "$4" "$2" 60
line=$(repo_pick "$2/index.txt" kernel "$5" "" "" "" "$6") && [ -n "$line" ] ||
	die 24 "no $6 bundle for kernel $5"
printf '%s\n' "$line"
"""


def node_check(repo: Path, key: Path, kernel: str = KERNEL,
               os_name: str = "flatcar") -> subprocess.CompletedProcess[str]:
    """node/repository.sh on a folder repository: "PATH SHA256 SIZE KERNEL" of the bundle a
    node of that OS takes for the kernel (exit 0), or its refusal: die's code (23 a signature
    or an index it does not accept, 24 no bundle, 28, 29), the message on stderr."""
    with tempfile.TemporaryDirectory() as work:
        return subprocess.run(
            ["sh", "-c", NODE_CHECK, "node-check", str(REPOSITORY_SH), work, str(repo),
             str(key), kernel, os_name], capture_output=True, text=True, check=False,
            timeout=60)


def current_text(repo: Path) -> Path:
    sha = (repo / "index.current").read_text().split()[2]
    return repo / "index" / f"{sha}.txt"


# --- S3 --------------------------------------------------------------------------------------

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
    # never the user's own profiles, files or endpoints
    "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}
AWS_UNSET = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


def aws_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in AWS_UNSET}
    return {**env, **AWS_ENV, **extra}


def s3_client(endpoint: str, **credentials: str) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id=credentials.get("key", "testing"),
                        aws_secret_access_key=credentials.get("secret", "testing"))


# --- racing publishers -----------------------------------------------------------------------

def race_main() -> None:
    """`coreos-gpu` whose publish waits, right before it swaps index.current the first time,
    until every rival has reached that point too (or RACE_WAIT seconds passed). Without a lock or a
    condition on the swap, both then write an index made from the same old one, and one
    entry is lost."""
    from coreos_gpu import cli, stores

    folder, name = Path(os.environ["RACE_DIR"]), os.environ["RACE_NAME"]
    peers, wait = int(os.environ["RACE_PEERS"]), float(os.environ["RACE_WAIT"])

    def patch(cls: Any) -> None:
        original = cls.swap_pointer

        def swap_pointer(self: Any, data: bytes, version: str) -> None:
            ready = folder / f"{name}.ready"
            if not ready.exists():
                ready.touch()
                deadline = time.monotonic() + wait
                while (len(list(folder.glob("*.ready"))) < peers
                       and time.monotonic() < deadline):
                    time.sleep(0.02)
            try:
                original(self, data, version)
            except stores.Conflict:
                (folder / f"{name}.conflict").touch()  # the retry path ran
                raise

        cls.swap_pointer = swap_pointer

    patch(stores.FolderStore)
    patch(stores.S3Store)
    sys.exit(cli.main(sys.argv[1:]))


def start_racer(race_dir: Path, name: str, peers: int, wait: float, *argv: str | Path,
                env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    code = "import sys; sys.path.insert(0, sys.argv.pop(1)); " \
           "from tests.repotools import race_main; race_main()"
    return subprocess.Popen(
        [sys.executable, "-c", code, str(REPO), *map(str, argv)], cwd=cwd, text=True,
        env={**env, "RACE_DIR": str(race_dir), "RACE_NAME": name, "RACE_PEERS": str(peers),
             "RACE_WAIT": str(wait)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
