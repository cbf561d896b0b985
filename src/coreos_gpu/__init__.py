"""coreos-gpu: NVIDIA drivers for Mesos/DC/OS agents on Flatcar and CoreOS Container Linux."""

from __future__ import annotations


def __getattr__(name: str) -> str:
    """`__version__`, looked up on first use (PEP 562): importing importlib.metadata takes
    some 30 ms, where all of `coreos-gpu --help` takes 70."""
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("coreos-gpu")
    except PackageNotFoundError:  # running from a source tree that was never installed
        found = "0.0.0+unknown"
    globals()["__version__"] = found
    return found
