"""What the render tests check rendered files with: the formats' own JSON schemas
(tests/data/schemas), Ignition's way of writing files onto a node, Butane's translation of
the fields render uses, and Terraform's HCL strings."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import re
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import hcl2
from jsonschema import Draft4Validator

SCHEMAS = Path(__file__).resolve().parent / "data" / "schemas"
SCHEMA_FILES = {"ignition 2.2.0": "ignition-2.2.0.json", "ignition 3.3.0": "ignition-3.3.0.json",
                "marathon": "marathon-1.7-AppDefinition.json",
                "metronome": "metronome-0.6.44-jobspec.schema.json"}


def schema(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((SCHEMAS / SCHEMA_FILES[name]).read_text())
    return data


def _resolve(node: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        target: Any = root
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def _properties(node: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    node = _resolve(node, root)
    found = dict(node.get("properties", {}))
    for branch in node.get("allOf", []):
        found.update(_properties(branch, root))
    return found


def unknown_keys(instance: Any, node: dict[str, Any], root: dict[str, Any],
                 where: str = "") -> list[str]:
    """Every key of instance its schema does not name (Ignition only warns about them)."""
    node = _resolve(node, root)
    if isinstance(instance, dict):
        known = _properties(node, root)
        # A map (labels, env): any key, each value by the additionalProperties schema.
        other = node.get("additionalProperties")
        found = [] if isinstance(other, dict) or other is True else [
            f"{where}/{k}" for k in instance if k not in known]
        for key, value in instance.items():
            if key in known or isinstance(other, dict):
                found += unknown_keys(value, known.get(key, other), root, f"{where}/{key}")
        return found
    if isinstance(instance, list) and isinstance(node.get("items"), dict):
        return [bad for i, item in enumerate(instance)
                for bad in unknown_keys(item, node["items"], root, f"{where}/{i}")]
    return []


def schema_problems(instance: Any, name: str) -> list[str]:
    """What the schema refuses, plus every key it does not name."""
    root = schema(name)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in Draft4Validator(root).iter_errors(instance)]
    return errors + [f"{path}: not in the schema" for path in unknown_keys(instance, root, root)]


# --- Ignition ------------------------------------------------------------------------------

def decode_data_url(url: str) -> bytes:
    """RFC 2397, as Ignition's fetcher reads it."""
    assert url.startswith("data:"), url
    meta, _, payload = url[5:].partition(",")
    if meta.endswith(";base64"):
        return base64.b64decode(payload)
    return urllib.parse.unquote_to_bytes(payload)


def fetch(contents: dict[str, Any]) -> bytes:
    """A resource's bytes: data URLs decoded, http(s) downloaded, compression undone."""
    source = contents["source"]
    if source.startswith("data:"):
        data = decode_data_url(source)
    else:
        assert source.startswith(("http://127.0.0.1:", "https://127.0.0.1:")), source
        with urllib.request.urlopen(source, timeout=30) as response:
            data = response.read()
    if contents.get("compression") == "gzip":
        data = gzip.decompress(data)
    return data


class HashMismatch(Exception):
    pass


def check_hash(data: bytes, expected: str) -> None:
    """verification.hash: `<type>-<hex>`, sha512 (every spec) or sha256 (3.1 on)."""
    kind, _, digest = expected.partition("-")
    assert kind in ("sha512", "sha256"), expected
    actual = hashlib.new(kind, data).hexdigest()
    if actual != digest:
        raise HashMismatch(f"{kind} {actual}, expected {digest}")


def ignite(config: dict[str, Any], root: Path) -> None:
    """Write what an Ignition config says onto the tree under root, as Ignition's files
    stage does: each directory and file with its mode (files owned by root), a file only
    after its contents passed verification.hash, each unit into /etc/systemd/system and an
    enabled one into Ignition's preset file. Nothing is written when any check fails."""
    spec = config["ignition"]["version"]
    storage, units = config.get("storage", {}), config.get("systemd", {}).get("units", [])
    writes: list[tuple[Path, bytes, int]] = []
    for entry in storage.get("files", []):
        if spec.startswith("2."):
            assert entry["filesystem"] == "root", entry
        data = fetch(entry["contents"])
        if (expected := entry["contents"].get("verification", {}).get("hash")) is not None:
            check_hash(data, expected)
        writes.append((root / entry["path"].lstrip("/"), data, entry.get("mode", 0o644)))
    for entry in storage.get("directories", []):
        path = root / entry["path"].lstrip("/")
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(entry.get("mode", 0o755))
    for path, data, mode in writes:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.chown(path, 0, 0)
        path.chmod(mode)
    presets = []
    for unit in units:
        path = root / "etc/systemd/system" / unit["name"]
        path.parent.mkdir(parents=True, exist_ok=True)
        if unit.get("mask"):  # Ignition masks a unit with a link to /dev/null
            path.symlink_to("/dev/null")
            continue
        path.write_text(unit["contents"])
        if unit.get("enabled") or unit.get("enable"):
            presets.append(f"enable {unit['name']}\n")
    if presets:
        preset = root / "etc/systemd/system-preset/20-ignition.preset"
        preset.parent.mkdir(parents=True, exist_ok=True)
        preset.write_text("".join(presets))


def unit_setting(unit_text: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in unit_text.splitlines()
            if line.startswith(f"{key}=")]


# --- Butane --------------------------------------------------------------------------------

BUTANE_SPECS = {("flatcar", "1.0.0"): "3.3.0", ("flatcar", "1.1.0"): "3.4.0"}


def _snake_to_camel(key: str) -> str:
    head, *rest = key.split("_")
    return head + "".join(word.capitalize() for word in rest)


def butane_to_ignition(doc: dict[str, Any]) -> dict[str, Any]:
    """Butane's translation, for the fields render writes: variant and version give the
    Ignition version, snake_case keys become camelCase, and `inline` text becomes a data URL
    with an empty compression (Butane may pick base64 or gzip instead: normalise compares
    the decoded text)."""
    def convert(value: Any) -> Any:
        if isinstance(value, dict) and "inline" in value:
            return {"compression": "", "source": "data:," + urllib.parse.quote(
                value["inline"], safe=""), **convert({k: v for k, v in value.items()
                                                      if k != "inline"})}
        if isinstance(value, dict):
            return {_snake_to_camel(k): convert(v) for k, v in value.items()}
        if isinstance(value, list):
            return [convert(v) for v in value]
        return value

    body = {k: v for k, v in doc.items() if k not in ("variant", "version")}
    return {"ignition": {"version": BUTANE_SPECS[(doc["variant"], doc["version"])]},
            **convert(body)}


def normalise(config: dict[str, Any]) -> dict[str, Any]:
    """A config with every inline or data-URL resource replaced by its text, and an empty
    compression (Butane writes one) dropped: what Ignition writes either way."""
    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            if "inline" in value:
                return {"text": value["inline"]}
            if str(value.get("source", "")).startswith("data:"):
                return {"text": fetch(value).decode()}
            return {k: walk(v) for k, v in value.items() if (k, v) != ("compression", "")}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value

    result: dict[str, Any] = walk(config)
    return result


# --- Terraform -----------------------------------------------------------------------------

_ESCAPE = re.compile(r'\\(["\\nrt]|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8})')


def hcl_value(literal: str) -> str:
    """The value of a quoted HCL string as python-hcl2 returns it (quotes and escapes kept):
    escapes decoded, $${ and %%{ made literal; a ${ or %{ left is a template Terraform
    would evaluate, which render must never write."""
    assert literal.startswith('"') and literal.endswith('"'), literal
    body = literal[1:-1]
    if re.search(r"(?<!\$)\$\{|(?<!%)%\{", body.replace("$${", "").replace("%%{", "")):
        raise AssertionError(f"a template in {literal}")
    simple = {'"': '"', "\\": "\\", "n": "\n", "r": "\r", "t": "\t"}
    text = _ESCAPE.sub(lambda m: simple.get(m.group(1)) or chr(int(m.group(1)[1:], 16)), body)
    return text.replace("$${", "${").replace("%%{", "%{")


def remote_exec_inline(text: str) -> list[str]:
    """The inline commands of the one remote-exec provisioner block in text."""
    parsed = hcl2.loads(text)
    [block] = parsed["provisioner"]
    assert list(block) == ['"remote-exec"'], block
    return [hcl_value(item) for item in block['"remote-exec"']["inline"]]
