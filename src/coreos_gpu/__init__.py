"""coreos-gpu: NVIDIA drivers for Mesos/DC/OS agents on Flatcar and CoreOS Container Linux."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("coreos-gpu")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
