"""`coreos-gpu render KIND`: provisioning and smoke-test files, correct by construction.

Every value that goes into them is checked first (URL schemes, hex lengths, names, image
references), so what comes out is either right or not written at all. The provisioning kinds
(ignition, butane, terraform: provision.py) install a bundle on a node before the DC/OS agent
starts; the smoke-test kinds (marathon-app, metronome-job) run `nvidia-smi` in a UCR container
with one GPU, which is what DC/OS schedules only on an agent whose GPUs Mesos found;
k8s-smoke-pod is the same for Kubernetes: a Pod that asks for one nvidia.com/gpu, which the
scheduler places only on a node whose device plugin offers GPUs.

A bundle comes from a file (its MANIFEST.json is read and checked through inspect_bundle, its
sha256 and sha512 computed, and its SHA256SUMS's, which the node checks too) plus the URL
nodes download it from, or from a URL and its sha256 alone; or the node fetches the bundle
for its own kernel from a repository (publish.py) whose index it checks with the repository's
public key: always the bundle of one driver, flavour and profile, pinned here from the
settings (flag > config file > default), never "the newest", which whoever serves the index
would choose.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from coreos_gpu import __version__, provision
from coreos_gpu.config import DEFAULT_AGENT_UNITS, SETTINGS_BY_KEY, BuildConfig, OsName
from coreos_gpu.driver import default_flavour
from coreos_gpu.errors import CoreosGpuError, ExitCode
from coreos_gpu.inspection import inspect_bundle
from coreos_gpu.keys import fingerprint, load_public_key, public_pem
from coreos_gpu.render_types import (
    AGENT_SETTINGS,
    DEFAULT_IMAGE,
    DEFAULT_SPEC,
    IGNITION_SPECS,
    PROVISIONING,
    SETTINGS,
    BundleSource,
    Kind,
    RepositorySource,
)

DEFAULT_APP_ID = {Kind.MARATHON_APP: "/coreos-gpu-smoke-test",
                  Kind.METRONOME_JOB: "coreos-gpu-smoke-test",
                  Kind.K8S_SMOKE_POD: "coreos-gpu-smoke-test"}

_HEX = re.compile(r"[0-9a-f]+")
# RFC 3986 characters only: a URL goes into JSON, YAML, HCL and sh, quoted for each.
_URL_CHARS = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+")
# A Docker image reference: [registry[:port]/]name[/name...][:tag][@sha256:digest].
_IMAGE = re.compile(r"([a-zA-Z0-9][a-zA-Z0-9.-]*(:[0-9]+)?/)?"
                    r"[a-z0-9]+([._-][a-z0-9]+)*(/[a-z0-9]+([._-][a-z0-9]+)*)*"
                    r"(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@sha256:[0-9a-f]{64})?")
# Marathon: names separated by slashes (digits, lowercase letters, dots, dashes; no dash at
# either end); Metronome: names separated by dots (digits, lowercase letters, dashes).
_NAME = r"[a-z0-9]+(-+[a-z0-9]+)*"
_APP_NAME = r"[a-z0-9]+([.-]+[a-z0-9]+)*"
_APP_ID = {Kind.MARATHON_APP: re.compile(rf"/?{_APP_NAME}(/{_APP_NAME})*"),
           Kind.METRONOME_JOB: re.compile(rf"{_NAME}(\.{_NAME})*"),
           # A Pod's name: a DNS subdomain (RFC 1123: lowercase, digits, dashes and dots).
           Kind.K8S_SMOKE_POD: re.compile(r"(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?"
                                          r"(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")}


@dataclass(frozen=True)
class RenderRequest:
    kind: Kind
    os: OsName
    source: BundleSource | RepositorySource | None  # None for the smoke tests without one
    ignition_spec: str
    image: str = DEFAULT_IMAGE
    app_id: str = ""
    driver_version: str = ""  # what the smoke test expects nvidia-smi to report
    tool_version: str = __version__


@dataclass(frozen=True)
class Rendered:
    text: str
    # What to run with the file next ("FILE" standing for its path), one command per line.
    next_steps: tuple[str, ...] = ()


def _bad(message: str, hint: str = "") -> CoreosGpuError:
    return CoreosGpuError(message, hint=hint, code=ExitCode.CONFIG)


def check_url(value: str, flag: str) -> str:
    """An http(s) URL with a host and nothing a quoting could trip on."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _bad(f"{flag} {value!r} is not an http:// or https:// URL",
                   "nodes download with curl (Terraform) or Ignition's fetcher over HTTP(S)")
    if not _URL_CHARS.fullmatch(value):
        raise _bad(f"{flag} {value!r} holds characters a URL may not (spaces, quotes, "
                   "non-ASCII)", "percent-encode them (%20 for a space)")
    return value


def check_hex(value: str, flag: str, bits: int) -> str:
    digest = value.strip().lower()
    if len(digest) != bits // 4 or not _HEX.fullmatch(digest):
        raise _bad(f"{flag} {value!r} is not a sha{bits} ({bits // 4} hex digits)",
                   f"sha{bits}sum nvidia.tar.gz prints it")
    return digest


def _sha512_of(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha512").hexdigest()


def bundle_source(path: Path | None, url: str, sha256: str, sha512: str, *,
                  need_url: bool = True,
                  agent_units: tuple[str, ...] = DEFAULT_AGENT_UNITS) -> BundleSource:
    """--bundle FILE --bundle-url URL, or --bundle-url URL --bundle-sha256 HEX. The smoke
    tests need no URL: only the driver version a file's manifest gives. agent_units: the
    settings', for a bundle known only by its URL (a file's manifest says its own)."""
    if not url and need_url:
        raise _bad("--bundle-url is missing: nodes need the URL they download the bundle from",
                   "upload nvidia.tar.gz (S3, any HTTP server) and give its URL")
    url = check_url(url, "--bundle-url") if url else ""
    sha256 = check_hex(sha256, "--bundle-sha256", 256) if sha256 else ""
    sha512 = check_hex(sha512, "--bundle-sha512", 512) if sha512 else ""
    if path is None:
        if not sha256:
            raise _bad("--bundle-url needs --bundle-sha256 (or --bundle FILE): nodes check "
                       "the download before anything in it runs",
                       "sha256sum nvidia.tar.gz prints it")
        return BundleSource(url=url, sha256=sha256, sha512=sha512, agent_units=agent_units)
    if not path.is_file():
        raise _bad(f"--bundle {path}: no such file")
    report = inspect_bundle(path)
    if not report.ok:
        raise CoreosGpuError(f"{path} fails inspect: {report.problems[0]}",
                             hint=f"coreos-gpu inspect {path} lists every problem",
                             code=ExitCode.BUNDLE)
    actual512 = _sha512_of(path)
    for flag, given, actual in (("--bundle-sha256", sha256, report.sha256),
                                ("--bundle-sha512", sha512, actual512)):
        if given and given != actual:
            raise _bad(f"{flag} {given} is not the hash of {path} ({actual})",
                       "give the file or its hash, not another bundle's")
    return BundleSource(url=url, sha256=report.sha256, sha512=actual512,
                        contents_sha256=report.contents_sha256,
                        driver_version=report.driver_version, flavour=report.flavour,
                        profile=report.profile, os=report.os,
                        kernel_releases=report.kernel_releases,
                        agent_units=report.agent_units or DEFAULT_AGENT_UNITS)


def repository_source(url: str, key: Path | None, settings: BuildConfig) -> RepositorySource:
    """The repository and what its nodes take: the settings' driver, flavour (unset: the one
    NVIDIA's installer defaults to for that driver, as build does) and profile."""
    if key is None:
        raise _bad("--repository needs --repository-key: a node trusts only an index signed "
                   "by the key it was given", "--repository-key repo.key.pub")
    public = load_public_key(key.expanduser())  # exit 15 for a file that is no usable key
    return RepositorySource(url=check_url(url, "--repository").rstrip("/"),
                            public_key_pem=public_pem(public), fingerprint=fingerprint(public),
                            driver_version=settings.driver_version,
                            flavour=(settings.kernel_module_type
                                     or default_flavour(settings.driver_version)),
                            profile=settings.profile, agent_units=settings.agent_units)


def _flags_given(settings: BuildConfig) -> dict[str, str]:
    """The settings a flag gave (not the config file or a default), as their values."""
    return {key: str(getattr(settings, key)) for key in SETTINGS
            if settings.sources.get(key) == SETTINGS_BY_KEY[key].flag}


def _agents_given(settings: BuildConfig) -> bool:
    """Whether a flag or the config file named the agents (not their default)."""
    return any(settings.sources.get(key, "default") != "default" for key in AGENT_SETTINGS)


def _check_agents_against_bundle(source: BundleSource, settings: BuildConfig) -> None:
    """Agents named for a bundle file must be the ones it was built for: the provisioning
    unit runs before the bundle's agent units, which the node's drop-ins order."""
    if (_agents_given(settings) and source.contents_sha256
            and set(settings.agent_units) != set(source.agent_units)):
        raise _bad(f"the settings name the agent units {' '.join(settings.agent_units)}, but "
                   f"the bundle was built for {' '.join(source.agent_units)}",
                   "build the bundle with these agents, or drop --agent/--agent-unit (and "
                   "agents, agent_units in the config file) to take the bundle's")


def _check_against_bundle(source: BundleSource | None, given: dict[str, str]) -> None:
    """A flag that pins what a repository node takes, given with a bundle file, must be the
    file's own; without a file or a repository there is nothing to pin or check."""
    known = source or BundleSource(url="", sha256="")
    facts = {"driver_version": ("driver", known.driver_version),
             "kernel_module_type": ("flavour", known.flavour),
             "profile": ("profile", known.profile)}
    for key, value in given.items():
        what, actual = facts[key]
        flag = SETTINGS_BY_KEY[key].flag
        if actual and value != actual:
            raise _bad(f"{flag} {value}, but the bundle holds {what} {actual}")
        if not actual and key != "driver_version":  # that one is the smoke test's too
            raise _bad(f"{flag} chooses the bundle a node takes from a repository: give it "
                       "with --repository", "or with --bundle FILE, which it is checked against")


def build_request(kind: Kind, *, os: str | None, bundle: Path | None, bundle_url: str,
                  bundle_sha256: str, bundle_sha512: str, repository: str,
                  repository_key: Path | None, settings: BuildConfig,
                  ignition_spec: str | None, image: str, app_id: str) -> RenderRequest:
    """The checked request, from the command line's values ("" or None: not given) and the
    settings (load_config: flag > config file > default)."""
    from_bundle = bundle is not None or bool(bundle_url or bundle_sha256 or bundle_sha512)
    if from_bundle and (repository or repository_key):
        raise _bad("give a bundle (--bundle, --bundle-url) or a repository (--repository), "
                   "not both")
    if repository_key and not repository:
        raise _bad("--repository-key needs --repository URL")
    source: BundleSource | RepositorySource | None = None
    if from_bundle:
        source = bundle_source(bundle, bundle_url, bundle_sha256, bundle_sha512,
                               need_url=kind in PROVISIONING, agent_units=settings.agent_units)
        _check_agents_against_bundle(source, settings)
    elif repository:
        source = repository_source(repository, repository_key, settings)
    elif kind in PROVISIONING:
        raise _bad(f"render {kind.value} needs a bundle or a repository",
                   "--bundle nvidia.tar.gz --bundle-url URL, --bundle-url URL --bundle-sha256 "
                   "HEX, or --repository URL --repository-key PUB.pem")
    known = source.os if isinstance(source, BundleSource) else ""
    if os is not None and os not in tuple(OsName):
        raise _bad(f"--os {os!r} is not one of {', '.join(OsName)}")
    target = OsName(os or known or OsName.FLATCAR)
    if known and known != target:
        raise _bad(f"the bundle is built for {known}, not --os {target.value}",
                   f"drop --os, or give a bundle built with --os {target.value}")
    spec = ignition_spec or DEFAULT_SPEC[target]
    if spec not in IGNITION_SPECS:
        raise _bad(f"--ignition-version {spec!r} is not one of {', '.join(IGNITION_SPECS)}")
    if kind is Kind.BUTANE and (target is OsName.COREOS or ignition_spec not in (None, "3.3.0")):
        raise _bad("Butane's flatcar variant translates to Ignition 3.3.0, which Flatcar "
                   "3185.0.0 and later read; CoreOS Container Linux reads spec 2.x",
                   "render ignition --os coreos writes the spec 2.2.0 config itself")
    if (kind in (Kind.IGNITION, Kind.BUTANE) and spec.startswith("2.")
            and isinstance(source, BundleSource) and not source.sha512):
        raise _bad(f"Ignition spec {spec} checks downloads by sha512 only, and only the "
                   "sha256 is given", "add --bundle-sha512 (sha512sum nvidia.tar.gz), or give "
                   "--bundle FILE")
    given = _flags_given(settings)
    if not isinstance(source, RepositorySource):
        _check_against_bundle(source, given)
    # What the smoke test expects: the bundle's driver, else --driver-version's (a default
    # is no fact about the node).
    expected = (source.driver_version if isinstance(source, BundleSource)
                and source.driver_version else given.get("driver_version", ""))
    if kind in DEFAULT_APP_ID:
        app_id = app_id or DEFAULT_APP_ID[kind]
        if not _APP_ID[kind].fullmatch(app_id):
            raise _bad(f"--id {app_id!r} is not a {kind.value} id",
                       "lowercase letters, digits and dashes, e.g. "
                       f"{DEFAULT_APP_ID[kind]}")
        if not _IMAGE.fullmatch(image):
            raise _bad(f"--image {image!r} is not a Docker image reference",
                       f"for example {DEFAULT_IMAGE}")
    return RenderRequest(kind=kind, os=target, source=source, ignition_spec=spec,
                         image=image, app_id=app_id, driver_version=expected)


# --- the smoke tests ---------------------------------------------------------------------

def smoke_command(driver_version: str, *, keep_running: bool) -> str:
    """nvidia-smi from the driver Mesos mounted, and the driver version it reports."""
    steps = ["export PATH=/usr/local/nvidia/bin:$PATH", "nvidia-smi -L", "nvidia-smi"]
    if driver_version:
        steps.append('test "$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | '
                     f'head -n 1)" = {driver_version}')
    steps.append("echo 'coreos-gpu smoke test: OK'")
    if keep_running:  # Marathon restarts an app whose task ends
        steps.append("sleep infinity")
    return " && ".join(steps)


def _labels(request: RenderRequest) -> dict[str, str]:
    return {"created-by": f"coreos-gpu {request.tool_version}",
            **({"driver-version": request.driver_version} if request.driver_version else {})}


def render_marathon_app(request: RenderRequest) -> Rendered:
    # GPUs need the Universal Container Runtime ("MESOS"): Docker's containerizer has none.
    app = {"id": request.app_id, "cmd": smoke_command(request.driver_version,
                                                      keep_running=True),
           "cpus": 0.1, "mem": 128, "disk": 0, "gpus": 1, "instances": 1,
           "container": {"type": "MESOS", "docker": {"image": request.image}},
           "labels": _labels(request)}
    app_path = "/" + request.app_id.lstrip("/")
    return Rendered(json.dumps(app, indent=2) + "\n", (
        "dcos marathon app add FILE",
        f"dcos task log --lines=20 {app_path.strip('/').replace('/', '_')}",
        f"dcos marathon app remove {app_path}"))


def render_metronome_job(request: RenderRequest) -> Rendered:
    job = {"id": request.app_id, "description": "coreos-gpu smoke test: nvidia-smi with one GPU",
           "labels": _labels(request),
           "run": {"cmd": smoke_command(request.driver_version, keep_running=False),
                   "cpus": 0.1, "mem": 128, "disk": 0, "gpus": 1,
                   "ucr": {"image": {"id": request.image, "kind": "docker"}},
                   "restart": {"policy": "NEVER"}}}
    return Rendered(json.dumps(job, indent=2) + "\n", (
        "dcos job add FILE", f"dcos job run {request.app_id}",
        f"dcos job history {request.app_id}"))


def pod_script(driver_version: str) -> list[str]:
    """The smoke pod's sh script. The GPU's device nodes are what every CDI spec for it adds
    (ours, or the device plugin's own); nvidia-smi is there when the spec mounts the driver's
    tools and puts them on PATH, as the node's spec does: it then lists the GPU and says the
    driver's version. Any failure ends the pod with a non-zero exit (set -e)."""
    lines = ["set -eu",
             "ls -l /dev/nvidiactl /dev/nvidia[0-9]*",
             "if command -v nvidia-smi >/dev/null 2>&1; then",
             "  nvidia-smi -L"]
    if driver_version:
        lines.append('  test "$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | '
                     f'head -n 1)" = {driver_version}')
    return [*lines,
            "else",
            "  echo 'no nvidia-smi in the container: the CDI spec that gave it the GPU mounts "
            "no tools'",
            "fi",
            "echo 'coreos-gpu smoke test: OK'"]


def render_k8s_smoke_pod(request: RenderRequest) -> Rendered:
    """A Pod (YAML) with one nvidia.com/gpu that runs pod_script once and ends."""
    name = request.app_id
    q = json.dumps  # a JSON string is a YAML double-quoted scalar
    annotations = {f"coreos-gpu/{k}": v for k, v in _labels(request).items()}
    script = "".join(f"          {line}\n" for line in pod_script(request.driver_version))
    text = (
        f"# Written by coreos-gpu {request.tool_version} (coreos-gpu render k8s-smoke-pod): one "
        "GPU through the\n# NVIDIA device plugin; it lists the GPU and ends (Succeeded) or "
        "fails (Failed).\n"
        "apiVersion: v1\n"
        "kind: Pod\n"
        "metadata:\n"
        f"  name: {q(name)}\n"
        "  labels:\n"
        "    app.kubernetes.io/name: coreos-gpu-smoke-test\n"
        "  annotations:\n"
        + "".join(f"    {q(k)}: {q(v)}\n" for k, v in annotations.items()) +
        "spec:\n"
        "  restartPolicy: Never\n"
        # GPU nodes are often tainted so that only GPU pods land there.
        "  tolerations:\n"
        "    - key: nvidia.com/gpu\n"
        "      operator: Exists\n"
        "      effect: NoSchedule\n"
        "  containers:\n"
        "    - name: smoke-test\n"
        f"      image: {q(request.image)}\n"
        "      command:\n"
        "        - sh\n"
        "        - -c\n"
        "        - |\n"
        f"{script}"
        "      resources:\n"
        "        limits:\n"
        "          nvidia.com/gpu: 1\n")
    return Rendered(text, ("kubectl apply -f FILE",
                           f"kubectl wait --for=jsonpath='{{.status.phase}}'=Succeeded "
                           f"pod/{name} --timeout=5m",
                           f"kubectl logs {name}", f"kubectl delete pod {name}"))


def render(request: RenderRequest) -> Rendered:
    if request.kind is Kind.MARATHON_APP:
        return render_marathon_app(request)
    if request.kind is Kind.METRONOME_JOB:
        return render_metronome_job(request)
    if request.kind is Kind.K8S_SMOKE_POD:
        return render_k8s_smoke_pod(request)
    assert request.source is not None  # build_request requires one for these kinds
    if request.kind is Kind.IGNITION:
        config = provision.ignition_config(request.source, spec=request.ignition_spec,
                                           os=request.os, tool_version=request.tool_version)
        return Rendered(json.dumps(config, indent=2) + "\n", (
            "give FILE to the node as its Ignition config (user data)",))
    if request.kind is Kind.BUTANE:
        return Rendered(provision.render_butane(request.source, os=request.os,
                                                tool_version=request.tool_version),
                        ("butane --strict FILE > config.ign",))
    return Rendered(provision.render_terraform(request.source, os=request.os,
                                               tool_version=request.tool_version),
                    ("paste FILE into the agent's resource, before DC/OS is installed",))
