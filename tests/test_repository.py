"""The repository's index (both forms), its signature as a node checks it with openssl, and
`keygen`, `repository list` and `repository verify` on folders and over HTTP."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from coreos_gpu.errors import CoreosGpuError, ExitCode
from coreos_gpu.keys import (
    fingerprint,
    fingerprint_of_pem,
    load_private_key,
    load_public_key,
    sign,
    signature_matches,
    write_key_pair,
)
from coreos_gpu.publish import _write_index, refresh_if_due
from coreos_gpu.publish import publish as publish_index
from coreos_gpu.repository import (
    Entry,
    Index,
    Release,
    expiry_problem,
    load_index,
    load_trust,
    parse_json,
    parse_text,
    render_json,
    render_pointer,
    render_text,
)
from coreos_gpu.stores import FolderStore

from .bundletools import CLOUD, KERNEL, VERSION
from .conftest import CliResult, Mirror
from .repotools import REPOSITORY_SH, Bundles, current_text, node_check

Cli = Callable[..., CliResult]
SHA_A, SHA_B = "a" * 64, "b" * 64


def pub(key: Path) -> Path:
    return key.with_name(key.name + ".pub")


def publish(cli: Cli, repo: Path | str, key: Path, *archives: Path) -> CliResult:
    result = cli("publish", *archives, "--to", repo, "--key", key)
    assert result.code == 0, result.stderr
    return result


def error(result: CliResult, code: ExitCode) -> str:
    """The one error line of a failed command, after checking its exit code."""
    assert result.code == code, (result.code, result.stderr)
    errors = [line for line in result.error_lines if ": error: " in line]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return errors[0]


# --- keys ----------------------------------------------------------------------------------

def test_keygen_writes_a_p256_pair_that_openssl_reads(cli: Cli, tmp_path: Path) -> None:
    result = cli("keygen", "--output", "k/repo.key", "--json")
    assert result.code == 0, result.stderr
    private, public = tmp_path / "k/repo.key", tmp_path / "k/repo.key.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    text = subprocess.run(["openssl", "pkey", "-pubin", "-in", public, "-noout", "-text"],
                          capture_output=True, text=True, check=True).stdout
    assert "prime256v1" in text or "P-256" in text
    der = subprocess.run(["openssl", "pkey", "-pubin", "-in", public, "-outform", "DER"],
                         capture_output=True, check=True).stdout
    shown = json.loads(result.stdout)
    assert shown["fingerprint"] == "sha256:" + hashlib.sha256(der).hexdigest()
    assert shown["public_key"] == "k/repo.key.pub"


def test_keygen_never_overwrites_a_key(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "repo.key").write_text("the old key")
    assert "never overwrites" in error(cli("keygen", "--output", "repo.key"), ExitCode.KEY)
    assert (tmp_path / "repo.key").read_text() == "the old key"
    assert not (tmp_path / "repo.key.pub").exists()
    (tmp_path / "other.key.pub").write_text("an old public key")
    error(cli("keygen", "--output", "other.key"), ExitCode.KEY)
    assert not (tmp_path / "other.key").exists()  # no private key without its public half


def test_a_signature_is_what_openssl_dgst_verifies(tmp_path: Path) -> None:
    ec_key = write_key_pair(tmp_path / "ec.key")
    rsa_key = tmp_path / "rsa.key"
    rsa_key.write_bytes(rsa.generate_private_key(public_exponent=65537, key_size=2048)
                        .private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    subprocess.run(["openssl", "pkey", "-in", rsa_key, "-pubout", "-out", f"{rsa_key}.pub"],
                   check=True)
    data = tmp_path / "data"
    data.write_bytes(b"coreos-gpu-index 1\n")
    for private in (ec_key.private, rsa_key):
        signature = tmp_path / "sig"
        signature.write_bytes(sign(load_private_key(private), data.read_bytes()))
        check = subprocess.run(["openssl", "dgst", "-sha256", "-verify", pub(private),
                                "-signature", signature, data], capture_output=True, text=True)
        assert check.returncode == 0 and "Verified OK" in check.stdout, check
        assert signature_matches(load_public_key(pub(private)), data.read_bytes(),
                                 signature.read_bytes())
        assert not signature_matches(load_public_key(pub(private)), b"other bytes",
                                     signature.read_bytes())


@pytest.mark.parametrize(("content", "loader", "message"), [
    (b"not a key at all\n", load_public_key, "is not a public key"),
    (b"", load_private_key, "is not a private key"),
    ("private", load_public_key, "it is a private key"),
    ("public", load_private_key, "it is a public key"),
    ("p384", load_private_key, "secp384r1"),
    ("rsa1024", load_public_key, "1024 bits"),
], ids=["garbage", "empty", "private-for-public", "public-for-private", "p384", "rsa1024"])
def test_a_key_that_is_not_a_usable_key(tmp_path: Path, content: bytes | str,
                                        loader: Callable[[Path], object], message: str) -> None:
    path = tmp_path / "key.pem"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        private = {"private": ec.generate_private_key(ec.SECP256R1()),
                   "public": ec.generate_private_key(ec.SECP256R1()),
                   "p384": ec.generate_private_key(ec.SECP384R1()),
                   "rsa1024": rsa.generate_private_key(public_exponent=65537, key_size=1024),
                   }[content]
        if content in ("public", "rsa1024"):
            path.write_bytes(private.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        else:
            path.write_bytes(private.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()))
    with pytest.raises(CoreosGpuError) as caught:
        loader(path)
    assert caught.value.code == ExitCode.KEY
    assert message in caught.value.message


# --- the index forms -----------------------------------------------------------------------

ENTRY_A = Entry(sha256=SHA_A, path=f"bundles/{SHA_A}/nvidia.tar.gz", size=1234,
                published="2025-01-31T12:00:00Z", os="flatcar", driver_version=VERSION,
                flavour="proprietary", profile="compute", kernel_releases=(KERNEL, CLOUD),
                releases=(Release("stable", "3975.2.2", KERNEL),
                          Release("stable", "3975.2.3", KERNEL),
                          Release("beta", "4081.1.0", CLOUD)), tool_version="0.1.0")
ENTRY_B = Entry(sha256=SHA_B, path=f"bundles/{SHA_B}/nvidia.tar.zst", size=99,
                published="2025-02-01T08:30:00Z", os="coreos", driver_version="470.256.02",
                flavour="open", profile="full", kernel_releases=("4.19.106-coreos",),
                releases=(), tool_version="0.1.0")
INDEX = Index(generation=7, created="2025-02-01T08:30:00Z", key="sha256:" + "c" * 64,
              entries=(ENTRY_A, ENTRY_B), expires="2025-02-22T08:30:00Z")
EXPECTED_TEXT = f"""\
coreos-gpu-index 1
generation 7
created 2025-02-01T08:30:00Z
expires 2025-02-22T08:30:00Z
key sha256:{"c" * 64}
json index/{"d" * 64}.json {"d" * 64}
bundle {VERSION} proprietary compute flatcar 3975.2.2,3975.2.3 {KERNEL} bundles/{SHA_A}/nvidia.tar.gz {SHA_A} 1234 2025-01-31T12:00:00Z
bundle {VERSION} proprietary compute flatcar 4081.1.0 {CLOUD} bundles/{SHA_A}/nvidia.tar.gz {SHA_A} 1234 2025-01-31T12:00:00Z
bundle 470.256.02 open full coreos - 4.19.106-coreos bundles/{SHA_B}/nvidia.tar.zst {SHA_B} 99 2025-02-01T08:30:00Z
"""  # noqa: E501


def test_the_text_index_has_one_line_per_bundle_and_kernel() -> None:
    text = render_text(INDEX, "d" * 64)
    assert text.decode() == EXPECTED_TEXT
    parsed = parse_text(text, "here")
    assert (parsed.generation, parsed.created, parsed.expires, parsed.key,
            parsed.json_sha256) == (7, INDEX.created, INDEX.expires, INDEX.key, "d" * 64)


def test_an_index_from_before_expiry_reads_and_is_called_expired() -> None:
    """Format 1 indexes written before `expires` have no such line: they still read (the
    publisher builds on them), and every reader calls them expired, as nodes do."""
    old = replace(INDEX, expires="")
    text = render_text(old, "d" * 64)
    assert b"expires" not in text and parse_text(text, "here").expires == ""
    assert "no expiry" in expiry_problem(old, "2025-02-02T00:00:00Z")
    assert expiry_problem(INDEX, "2025-02-22T08:30:00Z") == ""
    assert "expired at 2025-02-22T08:30:00Z" in expiry_problem(INDEX, "2025-02-22T08:30:01Z")


@pytest.mark.parametrize(("kernel", "os_name", "expected"), [
    (KERNEL, "flatcar", f"bundles/{SHA_A}/nvidia.tar.gz {SHA_A} 1234"),
    (CLOUD, "flatcar", f"bundles/{SHA_A}/nvidia.tar.gz {SHA_A} 1234"),
    ("4.19.106-coreos", "coreos", f"bundles/{SHA_B}/nvidia.tar.zst {SHA_B} 99"),
    ("6.6.0-other", "flatcar", ""),
])
def test_a_node_finds_its_kernel_with_awk(tmp_path: Path, kernel: str, os_name: str,
                                          expected: str) -> None:
    """The node's own reader (node/repository.sh: repo_check, repo_pick) on the text index."""
    index = tmp_path / "index.txt"
    index.write_bytes(render_text(INDEX, "d" * 64))
    found = subprocess.run(
        ["sh", "-c", '. "$1"; repo_check "$2" && repo_pick "$2" kernel "$3" "" "" "" "$4"',
         "node", REPOSITORY_SH, index, kernel, os_name],
        capture_output=True, text=True, check=True).stdout.splitlines()
    assert found[0] == f"7 {'c' * 64} {INDEX.expires}"
    assert " ".join(found[1:]) == (f"{expected} {kernel}" if expected else "")


def test_the_json_index_carries_the_same_and_reads_back() -> None:
    data = json.loads(render_json(INDEX))
    assert data["format"] == 1 and data["generation"] == 7
    assert [b["path"] for b in data["bundles"]] == [ENTRY_A.path, ENTRY_B.path]
    assert data["bundles"][0]["kernel_releases"] == [KERNEL, CLOUD]
    assert data["bundles"][0]["releases"][2] == {"channel": "beta", "version": "4081.1.0",
                                                 "kernel_release": CLOUD}
    assert parse_json(render_json(INDEX), "here") == INDEX


@pytest.mark.parametrize("change", [
    lambda d: d.update(format=2),
    lambda d: d["bundles"][0].update(path="../../etc/passwd"),
    lambda d: d["bundles"][0].update(kernel_releases=["6.1 0"]),
    lambda d: d["bundles"][0].pop("sha256"),
], ids=["format", "path", "space-in-a-field", "no-sha256"])
def test_a_malformed_json_index_is_no_repository(change: Callable[[dict[str, object]], None]
                                                ) -> None:
    data = json.loads(render_json(INDEX))
    change(data)
    with pytest.raises(CoreosGpuError) as caught:
        parse_json(json.dumps(data).encode(), "here")
    assert caught.value.code == ExitCode.REPOSITORY


# --- a folder repository, as a node and as `repository verify` see it -------------------------

def test_a_node_checks_the_published_index_with_openssl(cli: Cli, tmp_path: Path, key: Path,
                                                        bundles: Bundles) -> None:
    repo = tmp_path / "repo"
    publish(cli, repo, key, bundles.amd64, bundles.cloud)
    check = node_check(repo, pub(key))
    # 0: openssl verified the signature (repo_index), and the node took a bundle
    assert check.returncode == 0, check.stderr
    path, sha, size, kernel = check.stdout.split()
    assert kernel == KERNEL
    bundle = repo / path
    assert hashlib.sha256(bundle.read_bytes()).hexdigest() == sha
    assert bundle.stat().st_size == int(size)
    assert bundle.read_bytes() == bundles.amd64.read_bytes()
    assert node_check(repo, pub(key), CLOUD).stdout.split()[0] != path


def test_a_tampered_index_fails_openssl_and_verify(cli: Cli, tmp_path: Path, key: Path,
                                                   bundles: Bundles) -> None:
    repo = tmp_path / "repo"
    publish(cli, repo, key, bundles.amd64)
    assert cli("repository", "verify", repo, "--key", pub(key)).code == 0
    text = current_text(repo)
    os.chmod(text, 0o644)
    # Another bundle for the node's kernel, as an attacker who can write the folder would add.
    text.write_text(text.read_text().replace(" 3975.2.2,", " 3975.2.9,"))
    check = node_check(repo, pub(key))
    assert check.returncode == 23 and "Verification failure" in check.stdout + check.stderr
    line = error(cli("repository", "verify", repo, "--key", pub(key)), ExitCode.SIGNATURE)
    assert "does not match its signature" in line


def test_a_signature_by_another_key_fails_openssl_and_verify(
        cli: Cli, tmp_path: Path, key: Path, bundles: Bundles) -> None:
    repo = tmp_path / "repo"
    publish(cli, repo, key, bundles.amd64)
    other = write_key_pair(tmp_path / "other.key")
    assert node_check(repo, other.public).returncode == 23
    line = error(cli("repository", "verify", repo, "--key", other.public), ExitCode.SIGNATURE)
    assert "signed by another key" in line
    assert fingerprint(load_public_key(pub(key))) in line


def test_a_tampered_bundle_fails_verify(cli: Cli, tmp_path: Path, key: Path,
                                        bundles: Bundles) -> None:
    repo = tmp_path / "repo"
    publish(cli, repo, key, bundles.amd64, bundles.cloud)
    entries = json.loads(cli("repository", "list", repo, "--json").stdout)["bundles"]
    victim = repo / entries[0]["path"]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    result = cli("repository", "verify", repo, "--key", pub(key))
    line = error(result, ExitCode.DIGEST)
    assert "1 of 2 bundles" in line and entries[0]["path"] in line
    # the node-side check: the sha256 the signed index gives, against the file
    sums = f"{entries[0]['sha256']}  {victim}\n"
    assert subprocess.run(["sha256sum", "-c", "-"], input=sums, text=True,
                          capture_output=True).returncode != 0


def test_a_tampered_json_index_fails_verify(cli: Cli, tmp_path: Path, key: Path,
                                            bundles: Bundles) -> None:
    repo = tmp_path / "repo"
    publish(cli, repo, key, bundles.amd64)
    (json_file,) = (repo / "index").glob("*.json")
    json_file.write_text(json_file.read_text().replace('"flatcar"', '"coreos"'))
    line = error(cli("repository", "verify", repo, "--key", pub(key)), ExitCode.DIGEST)
    assert json_file.name in line
    assert error(cli("repository", "list", repo), ExitCode.DIGEST)


def test_a_missing_bundle_fails_verify(cli: Cli, tmp_path: Path, key: Path,
                                       bundles: Bundles) -> None:
    repo = tmp_path / "repo"
    publish(cli, repo, key, bundles.amd64)
    shutil.rmtree(repo / "bundles")
    assert "missing" in error(cli("repository", "verify", repo, "--key", pub(key)),
                              ExitCode.REPOSITORY)


def test_list_shows_every_bundle(cli: Cli, tmp_path: Path, key: Path,
                                 bundles: Bundles) -> None:
    repo = tmp_path / "repo"
    publish(cli, repo, key, bundles.amd64, bundles.both)
    listed = json.loads(cli("repository", "list", repo, "--json").stdout)
    assert listed["signature"] == "not checked (no --key)"
    by_tool = {b["tool_version"]: b for b in listed["bundles"]}
    assert by_tool["0.1.0"]["kernel_releases"] == [KERNEL]
    assert [r["version"] for r in by_tool["0.1.0"]["releases"]] == ["3975.2.2", "3975.2.3"]
    assert by_tool["0.1.1"]["kernel_releases"] == [KERNEL, CLOUD]
    checked = json.loads(cli("repository", "list", repo, "--key", pub(key), "--json").stdout)
    assert checked["signature"].startswith("OK")
    text = cli("repository", "list", repo)
    assert text.code == 0 and "3975.2.2,3975.2.3" in text.stdout and CLOUD in text.stdout


@pytest.mark.parametrize("setup", ["empty", "missing", "garbage pointer", "other format",
                                   "pointer to nothing"])
def test_a_url_that_is_no_repository(cli: Cli, tmp_path: Path, key: Path, bundles: Bundles,
                                     setup: str) -> None:
    repo = tmp_path / "repo"
    if setup != "missing":
        repo.mkdir()
    if setup == "garbage pointer":
        (repo / "index.current").write_text("<html>not found</html>\n")
    elif setup == "other format":
        (repo / "index.current").write_text(f"coreos-gpu-repository 2 {'a' * 64}\n")
    elif setup == "pointer to nothing":
        (repo / "index.current").write_text(f"coreos-gpu-repository 1 {'a' * 64}\n")
    for verb in (["list"], ["verify", "--key", pub(key)]):
        error(cli("repository", *verb, repo), ExitCode.REPOSITORY)
    if setup in ("garbage pointer", "other format"):  # publish does not build on it either
        error(cli("publish", bundles.amd64, "--to", repo, "--key", key), ExitCode.REPOSITORY)
        assert not (repo / "bundles").exists()


def test_verify_needs_a_key_that_is_a_public_key(cli: Cli, tmp_path: Path, key: Path,
                                                 bundles: Bundles) -> None:
    repo = tmp_path / "repo"
    publish(cli, repo, key, bundles.amd64)
    assert "private key" in error(cli("repository", "verify", repo, "--key", key),
                                  ExitCode.KEY)
    (tmp_path / "junk.pem").write_text("junk")
    error(cli("repository", "verify", repo, "--key", tmp_path / "junk.pem"), ExitCode.KEY)
    error(cli("repository", "verify", repo, "--key", tmp_path / "absent.pem"), ExitCode.KEY)
    error(cli("repository", "verify", repo), ExitCode.CONFIG)  # --key is required


# --- over HTTP -----------------------------------------------------------------------------

def test_a_repository_served_over_http(cli: Cli, http_dir: Mirror, key: Path,
                                       bundles: Bundles) -> None:
    publish(cli, http_dir.root, key, bundles.amd64, bundles.cloud)
    listed = json.loads(cli("repository", "list", http_dir.url, "--key", pub(key),
                            "--json").stdout)
    assert len(listed["bundles"]) == 2 and listed["signature"].startswith("OK")
    verified = cli("repository", "verify", http_dir.url, "--key", pub(key), "--json")
    assert verified.code == 0, verified.stderr
    assert [b["ok"] for b in json.loads(verified.stdout)["bundles"]] == [True, True]
    # Tampered after a verify that downloaded (and could have cached) every file: verify
    # checks what the server holds now.
    victim = http_dir.root / listed["bundles"][1]["path"]
    victim.write_bytes(victim.read_bytes()[:-10])
    error(cli("repository", "verify", http_dir.url, "--key", pub(key)), ExitCode.DIGEST)
    text = current_text(http_dir.root)
    text.write_bytes(text.read_bytes().replace(b"generation 1", b"generation 9"))
    error(cli("repository", "verify", http_dir.url, "--key", pub(key)), ExitCode.SIGNATURE)


def test_http_urls_that_are_no_repository(cli: Cli, http_dir: Mirror, key: Path) -> None:
    assert "no index.current" in error(cli("repository", "list", http_dir.url),
                                       ExitCode.REPOSITORY)
    (http_dir.root / "index.current").write_text("<html>a web page</html>")
    error(cli("repository", "list", http_dir.url), ExitCode.REPOSITORY)
    # nothing listens there
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    assert "cannot read" in error(cli("repository", "list", closed), ExitCode.REPOSITORY)


def test_a_folder_store_reads_what_it_wrote(tmp_path: Path) -> None:
    store = FolderStore(tmp_path / "repo")
    with store.locked():
        store.put_bytes("index/x", b"data")
    assert store.read("index/x") == b"data"
    assert store.digest("index/x") == (hashlib.sha256(b"data").hexdigest(), 4)
    assert stat.S_IMODE((tmp_path / "repo/index/x").stat().st_mode) == 0o644


# --- what a bundle built with --repository carries -----------------------------------------

def test_load_trust_takes_both_settings_or_neither(tmp_path: Path, key: Path) -> None:
    assert load_trust("", "") is None
    trust = load_trust("https://repo.example/gpu/", str(pub(key)))
    assert trust is not None
    assert trust.url == "https://repo.example/gpu"
    assert trust.public_key_pem == pub(key).read_bytes()
    assert trust.fingerprint == fingerprint(load_public_key(pub(key)))
    assert fingerprint_of_pem(trust.public_key_pem) == trust.fingerprint
    assert fingerprint_of_pem(b"junk") == fingerprint_of_pem(key.read_bytes()) == ""
    for url, key_path, code in (("https://repo.example", "", ExitCode.CONFIG),
                                ("", str(pub(key)), ExitCode.CONFIG),
                                ("https://repo.example", str(key), ExitCode.KEY)):
        with pytest.raises(CoreosGpuError) as caught:
            load_trust(url, key_path)
        assert caught.value.code == code


def test_an_index_replaced_by_garbage_is_a_signature_failure(
        cli: Cli, tmp_path: Path, key: Path, bundles: Bundles) -> None:
    repo = tmp_path / "repo"
    publish(cli, repo, key, bundles.amd64)
    current_text(repo).write_bytes(b"\x00\xff not an index at all")
    assert "does not match its signature" in error(
        cli("repository", "verify", repo, "--key", pub(key)), ExitCode.SIGNATURE)


# --- freshness: expiry, refresh --------------------------------------------------------------


def index_of(repo: Path) -> Index:
    loaded = load_index(FolderStore(repo), None)
    assert loaded is not None
    return loaded.index


def moment(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S%z")


def test_publish_signs_an_expiry_and_refresh_renews_it(cli: Cli, tmp_path: Path, key: Path,
                                                        bundles: Bundles) -> None:
    """The expiry is index_lifetime days after the index was made; refresh signs the same
    entries again as the next generation, valid from now, and nodes' openssl accepts it."""
    repo = tmp_path / "repo"
    result = cli("publish", bundles.amd64, "--to", repo, "--key", key, "--index-lifetime", "3")
    assert result.code == 0, result.stderr
    first = index_of(repo)
    assert moment(first.expires) - moment(first.created) == timedelta(days=3)
    (tmp_path / "coreos-gpu.toml").write_text(
        f'publish_to = "{repo}"\npublish_key = "{key}"\n')  # refresh's defaults, as sync's
    renewed = cli("repository", "refresh", "--json")
    assert renewed.code == 0, renewed.stderr
    assert json.loads(renewed.stdout)["generation"] == 2
    second = index_of(repo)
    assert second.entries == first.entries and second.generation == 2
    assert moment(second.expires) - moment(second.created) == timedelta(days=21)
    assert node_check(repo, pub(key)).returncode == 0
    listed = cli("repository", "list", repo)
    assert second.expires in listed.stdout
    assert cli("repository", "verify", repo, "--key", pub(key)).code == 0


def test_refresh_needs_an_index(cli: Cli, tmp_path: Path, key: Path) -> None:
    (tmp_path / "empty").mkdir()
    line = error(cli("repository", "refresh", "--to", tmp_path / "empty", "--key", key),
                 ExitCode.REPOSITORY)
    assert "has no index to refresh" in line


def test_verify_refuses_an_expired_index(tmp_path: Path, key: Path, cli: Cli,
                                         bundles: Bundles) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    publish_index([bundles.amd64], FolderStore(repo), load_private_key(key),
                  lifetime=timedelta(seconds=-1))
    line = error(cli("repository", "verify", repo, "--key", pub(key)), ExitCode.REPOSITORY)
    assert f"expired at {index_of(repo).expires}" in line


def test_sync_refreshes_once_a_day(tmp_path: Path, key: Path, bundles: Bundles) -> None:
    """refresh_if_due (sync's last step): not for an index made today, and for one made more
    than a day ago or without an expiry; each refresh is a new generation."""
    repo = tmp_path / "repo"
    repo.mkdir()
    store, private = FolderStore(repo), load_private_key(key)
    publish_index([bundles.amd64], store, private)
    assert not refresh_if_due(store, private) and index_of(repo).generation == 1
    for aged in ({"created": "2020-01-01T00:00:00Z"}, {"expires": ""}):
        old = replace(index_of(repo), **aged)
        (repo / "index.current").write_bytes(render_pointer(_write_index(store, old, private)))
        assert refresh_if_due(store, private)
        fresh = index_of(repo)
        assert fresh.generation == old.generation + 1 and fresh.entries == old.entries
        assert moment(fresh.expires) > datetime.now(UTC) + timedelta(days=20)
