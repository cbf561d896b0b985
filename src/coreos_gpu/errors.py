"""The one error type for problems the user can fix, and the exit codes it maps to."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Distinct exit codes, documented in docs/reference/exit-codes.md; scripts may rely on them."""

    OK = 0
    FAILED = 1  # a step failed for a reason outside the other classes
    CONFIG = 2  # bad configuration, flag or command line
    DRIVER = 3  # the NVIDIA .run or its .manifest is unusable
    TOOL = 4  # a tool this verb needs is missing
    COMMAND = 5  # an external command failed
    DOWNLOAD = 6  # a download failed (HTTP error, network) or offline and not cached
    DIGEST = 7  # a download does not match its published checksum
    SIGNATURE = 8  # a signature does not verify, or the signing key is not the pinned one
    UNVERIFIABLE = 9  # the checksum or signature to verify a download with is missing
    INCOMPLETE = 10  # a download stopped short of its announced size, even after resuming
    IMAGE = 11  # the developer container image or its kernel build tree is unusable
    BUNDLE = 12  # a bundle cannot be assembled from its inputs, or fails inspection
    MODULES = 13  # the module build produced no or wrong kernel modules
    # A bundle repository cannot be reached, read or written (folder not writable, S3 bucket
    # missing or access denied), or a URL holds no repository (or a broken one).
    REPOSITORY = 14
    KEY = 15  # a key file is not a usable key (not PEM, wrong kind), or keygen would overwrite
    INTERNAL = 70  # a bug in coreos-gpu (EX_SOFTWARE)
    INTERRUPTED = 130
    # stdout was closed before all was written (`coreos-gpu releases | head -1`): 128 + SIGPIPE,
    # what any Unix tool that dies of the signal reports, so `set -o pipefail` sees it alike.
    BROKEN_PIPE = 141


class CoreosGpuError(Exception):
    """A problem the user can act on: one line of message, an optional hint, an exit code."""

    def __init__(self, message: str, *, hint: str = "", code: ExitCode = ExitCode.FAILED) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.code = code

    def __str__(self) -> str:
        return self.message


class DownloadError(CoreosGpuError):
    """A download that failed; `status` is the HTTP status where a server answered, so callers
    tell a missing file from a failing server without reading the message. `missing`: a local
    file (a file:// mirror's) that does not exist."""

    def __init__(self, message: str, *, status: int | None = None, missing: bool = False,
                 hint: str = "") -> None:
        super().__init__(message, hint=hint, code=ExitCode.DOWNLOAD)
        self.status = status
        self.missing = missing

    @property
    def not_found(self) -> bool:
        return self.missing or self.status in (404, 410)


class KernelTreeNotPrepared(CoreosGpuError):
    """A kernel build tree without .config, Module.symvers or generated headers: CoreOS's
    developer containers ship one like that, and it can be prepared."""

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message, hint=hint, code=ExitCode.IMAGE)


class SignatureError(CoreosGpuError):
    """A signature that does not verify. `file_changed` when gpg showed that the pinned key
    signed other bytes (BADSIG), rather than that the key file cannot check the signature."""

    def __init__(self, message: str, *, file_changed: bool, hint: str = "") -> None:
        super().__init__(message, hint=hint, code=ExitCode.SIGNATURE)
        self.file_changed = file_changed
