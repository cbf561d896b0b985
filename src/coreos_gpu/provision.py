"""Provisioning files that install a bundle on a node before the DC/OS agent starts:
an Ignition config (spec 2.2.0 for CoreOS Container Linux, 3.3.0 for Flatcar), the same as
Butane YAML (variant flatcar 1.0.0), and a Terraform remote-exec provisioner block.

Ignition downloads the bundle itself and checks it against `verification.hash` before it
writes it (sha512, or sha256 from spec 3.1 on); then coreos-gpu-provision.service (oneshot,
before the agent units, until a stamp file says it is done) runs provision.sh, which checks
the sha256 again, extracts the bundle into a new, empty, root-owned folder and runs its
install_nvidia.sh: the documented manual steps. With a repository instead, provision.sh fetches
the bundle for the node's kernel, of the driver, flavour and profile rendered in, after
checking the index's signature. Both files come from resources/provision/, with the settings
filled in.
"""

from __future__ import annotations

import json
import re
import shlex
from importlib.resources import files
from typing import Any
from urllib.parse import quote

from coreos_gpu.config import OsName
from coreos_gpu.node import default_node_files, inline_sources
from coreos_gpu.render_types import BundleSource, RepositorySource

DIR = "/opt/coreos-gpu"  # root's alone (0700): the bundle, provision.sh, the stamp
UNIT = "coreos-gpu-provision.service"
BUTANE_VERSION = "1.0.0"  # variant flatcar 1.0.0 translates to Ignition spec 3.3.0
_PLACEHOLDER = re.compile(r"@([A-Z0-9_]+)@")

Source = BundleSource | RepositorySource


def _template(name: str) -> str:
    return (files("coreos_gpu") / "resources" / "provision" / name).read_text()


def _fill(template: str, values: dict[str, str]) -> str:
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def render_script(source: Source, *, os: OsName, tool_version: str) -> str:
    """provision.sh with its settings: every value shell-quoted, though all are checked."""
    repository = source if isinstance(source, RepositorySource) else None
    settings = {"DIR": DIR, "OS": os.value,
                "BUNDLE_SHA256": source.sha256 if isinstance(source, BundleSource) else "",
                "CONTENTS_SHA256": (source.contents_sha256
                                    if isinstance(source, BundleSource) else ""),
                "REPOSITORY_URL": repository.url if repository else "",
                "DRIVER_VERSION": repository.driver_version if repository else "",
                "FLAVOUR": repository.flavour.value if repository else "",
                "PROFILE": repository.profile.value if repository else ""}
    values = {key: shlex.quote(value) if value else "''" for key, value in settings.items()}
    # The repository reader is the node's own (node/repository.sh), copied in.
    script = inline_sources(_template("provision.sh").encode(), default_node_files()).decode()
    return _fill(script, {**values, "TOOL_VERSION": tool_version})


def render_unit(source: Source, *, tool_version: str) -> str:
    # A repository is read over the network; a bundle Ignition downloaded is on disk already.
    network = ("" if isinstance(source, BundleSource)
               else "Wants=network-online.target\nAfter=network-online.target\n")
    text = _template(UNIT).replace("@NETWORK@\n", network)
    return _fill(text, {"DIR": DIR, "TOOL_VERSION": tool_version,
                        "AGENT_UNITS": " ".join(source.agent_units)})


def data_url(text: str) -> str:
    """RFC 2397, percent-encoded: what Ignition decodes for inline contents."""
    return "data:," + quote(text, safe="")


def _hash(source: BundleSource, spec: str) -> str:
    # Spec 2.x and 3.0 know sha512 only; sha256 came with 3.1.
    if source.sha512:
        return f"sha512-{source.sha512}"
    assert not spec.startswith(("2.", "3.0")), "build_request refuses sha256 for this spec"
    return f"sha256-{source.sha256}"


def ignition_config(source: Source, *, spec: str, os: OsName,
                    tool_version: str) -> dict[str, Any]:
    """The Ignition config as a dict (json.dumps writes it)."""
    # Spec 2.x names the file system of every path; "root" is the real root's.
    where = {"filesystem": "root"} if spec.startswith("2.") else {}
    files_: list[dict[str, Any]] = []
    if isinstance(source, BundleSource):
        files_.append({**where, "path": f"{DIR}/nvidia.tar.gz", "mode": 0o600,
                       "contents": {"source": source.url,
                                    "verification": {"hash": _hash(source, spec)}}})
    else:
        files_.append({**where, "path": f"{DIR}/repository.pub", "mode": 0o644,
                       "contents": {"source": data_url(source.public_key_pem.decode())}})
    files_.append({**where, "path": f"{DIR}/provision.sh", "mode": 0o700,
                   "contents": {"source": data_url(render_script(
                       source, os=os, tool_version=tool_version))}})
    units: list[dict[str, Any]] = [{"name": UNIT, "enabled": True,
                                    "contents": render_unit(source, tool_version=tool_version)}]
    if os is OsName.FLATCAR:
        # Flatcar's own nvidia.service (setup-nvidia, enabled in every image) would start
        # compiling another driver into /opt/nvidia at this first boot, beside the install.
        # Masked from the start (a link to /dev/null in /etc/systemd/system); the install
        # writes coreos-gpu's nvidia.service over the mask, and nvidia-uninstall's removal of
        # it hands the node back to Flatcar's.
        units.append({"name": "nvidia.service", "mask": True})
    return {
        "ignition": {"version": spec},
        "storage": {"directories": [{**where, "path": DIR, "mode": 0o700}], "files": files_},
        "systemd": {"units": units},
    }


# --- Butane ------------------------------------------------------------------------------

_PLAIN = re.compile(r"[A-Za-z/][A-Za-z0-9/_.@+-]*")
_NOT_PLAIN = {"y", "n", "yes", "no", "true", "false", "on", "off", "null"}  # YAML 1.1 words


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if _PLAIN.fullmatch(value) and value.lower() not in _NOT_PLAIN:
        return str(value)
    # A JSON string is a YAML double-quoted scalar (YAML 1.2 is a superset of JSON).
    return json.dumps(value)


def _block(text: str, indent: str) -> str | None:
    """A literal block scalar for multi-line text that one can be exact about."""
    lines = text.split("\n")
    if (not text.endswith("\n") or text.endswith("\n\n") or "\r" in text
            or lines[0].startswith((" ", "\t")) or any(c < " " and c not in "\t\n"
                                                        for c in text)):
        return None
    return "|\n" + "".join(f"{indent}{line}\n" if line else "\n" for line in lines[:-1])


def _yaml_lines(key: str, value: Any, indent: str) -> list[str]:
    if isinstance(value, dict):
        out = [f"{indent}{key}:\n"]
        for k, v in value.items():
            out += _yaml_lines(k, v, indent + "  ")
        return out
    if isinstance(value, list):
        out = [f"{indent}{key}:\n"]
        for item in value:
            first, *rest = [line for k, v in item.items()
                            for line in _yaml_lines(k, v, indent + "    ")]
            out += [f"{indent}  - {first.removeprefix(indent + '    ')}", *rest]
        return out
    if key == "mode":
        return [f"{indent}{key}: 0{value:o}\n"]  # octal, as Butane configs write modes
    if isinstance(value, str) and (block := _block(value, indent + "  ")):
        return [f"{indent}{key}: {block}"]
    return [f"{indent}{key}: {_yaml_scalar(value)}\n"]


def butane_config(source: Source, *, os: OsName, tool_version: str) -> dict[str, Any]:
    """The Butane config whose translation is ignition_config(spec 3.3.0): inline text
    where the Ignition config has a data URL, the rest field for field."""
    ignition = ignition_config(source, spec="3.3.0", os=os, tool_version=tool_version)
    script = render_script(source, os=os, tool_version=tool_version)
    key = (source.public_key_pem.decode() if isinstance(source, RepositorySource) else "")
    inline = {data_url(script): script, **({data_url(key): key} if key else {})}
    for entry in ignition["storage"]["files"]:
        text = inline.get(entry["contents"]["source"])
        if text is not None:
            entry["contents"] = {"inline": text}
    return {"variant": "flatcar", "version": BUTANE_VERSION,
            "storage": ignition["storage"], "systemd": ignition["systemd"]}


def render_butane(source: Source, *, os: OsName, tool_version: str) -> str:
    config = butane_config(source, os=os, tool_version=tool_version)
    lines = [f"# Written by coreos-gpu {tool_version} (coreos-gpu render butane): installs the "
             "NVIDIA driver\n# before the DC/OS agent starts. butane --strict FILE > config.ign\n"]
    for key, value in config.items():
        lines += _yaml_lines(key, value, "")
    return "".join(lines)


# --- Terraform ---------------------------------------------------------------------------

def hcl_string(text: str) -> str:
    """A quoted HCL string whose value is text exactly: no ${ or %{ is a template."""
    out = []
    for c in text:
        if c in '"\\':
            out.append("\\" + c)
        elif c == "\n":
            out.append("\\n")
        elif c == "\t":
            out.append("\\t")
        elif c < " " or c == "\x7f":
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out).replace("${", "$${").replace("%{", "%%{") + '"'


def _heredoc(path: str, text: str) -> str:
    end = "COREOS_GPU_EOF"
    assert end not in text
    return f"sudo tee {path} >/dev/null <<'{end}'\n{text.rstrip(chr(10))}\n{end}"


def terraform_commands(source: Source, *, os: OsName, tool_version: str) -> list[str]:
    """The remote-exec script, one line (or heredoc) per element, as Terraform joins them."""
    head = ["#!/bin/sh", "set -eu"]
    tail = ["systemctl is-enabled --quiet nvidia.service"]  # the install enabled the unit
    if isinstance(source, RepositorySource):
        return [*head, f"sudo mkdir -p -m 0700 {DIR}",
                _heredoc(f"{DIR}/repository.pub", source.public_key_pem.decode()),
                _heredoc(f"{DIR}/provision.sh", render_script(
                    source, os=os, tool_version=tool_version)),
                f"sudo chmod 0700 {DIR}/provision.sh", f"sudo {DIR}/provision.sh", *tail]
    # Root's own empty folder on disk (/tmp is RAM on these OSes): nobody else can change
    # the download between its check and its extraction.
    return [*head, "work=$(sudo mktemp -d /var/tmp/coreos-gpu.XXXXXX)",
            "sudo curl -fsSL --retry 5 --retry-delay 5 --connect-timeout 30 "
            f'-o "$work/nvidia.tar.gz" {shlex.quote(source.url)}',
            f"printf '%s  %s\\n' {source.sha256} \"$work/nvidia.tar.gz\" | sudo sha256sum -c -",
            'sudo mkdir "$work/bundle"',
            'sudo tar -xf "$work/nvidia.tar.gz" -C "$work/bundle"',
            'sudo "$work/bundle/install_nvidia.sh"' + _expect(source),
            'sudo rm -rf "$work"', *tail]


def _expect(source: BundleSource) -> str:
    # What the bundle file says its SHA256SUMS is: install_nvidia.sh checks the copy it
    # installs against it, a second lock behind sha256sum -c (provision.sh says why).
    return f" --expect-sha256 {source.contents_sha256}" if source.contents_sha256 else ""


def render_terraform(source: Source, *, os: OsName, tool_version: str) -> str:
    what = (f"NVIDIA driver {source.driver_version}" if isinstance(source, BundleSource)
            and source.driver_version else "the NVIDIA driver bundle")
    if isinstance(source, BundleSource) and source.kernel_releases:
        what += f" (kernels {', '.join(source.kernel_releases)})"
    if isinstance(source, RepositorySource):
        what = (f"NVIDIA driver {source.driver_version} ({source.flavour.value} modules, "
                f"{source.profile.value} profile) for the node's kernel from {source.url}")
    commands = terraform_commands(source, os=os, tool_version=tool_version)
    body = "".join(f"    {hcl_string(c)},\n" for c in commands)
    return (f"# Written by coreos-gpu {tool_version} (coreos-gpu render terraform): installs\n"
            f"# {what} on a {os.value} node over SSH.\n"
            "# Put it in the agent's resource (or a null_resource with a connection to the node)\n"
            "# before DC/OS is installed there: the agent then starts after nvidia.service,\n"
            "# with its GPUs. The download is checked (sha256sum -c) before anything in it runs.\n"
            'provisioner "remote-exec" {\n'
            "  inline = [\n"
            f"{body}"
            "  ]\n"
            "}\n")
