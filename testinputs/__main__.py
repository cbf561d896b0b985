"""`python -m testinputs NAME`: build (or find in the cache) a test input, print its path."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from coreos_gpu.errors import CoreosGpuError
from testinputs.flatcar import build_flatcar_release
from testinputs.nvidia_branches import R470
from testinputs.nvidia_run import build_nvidia_run
from testinputs.vm import build_vm_image


def build_flatcar_server_root() -> Path:
    """The folder to serve as the mirror (its layout: `<root>/HOST/PATH`)."""
    return build_flatcar_release().server_root


def build_vm_image_dir() -> Path:
    """The folder with root.img and kernels/<release>/{vmlinuz,initrd.img}."""
    return build_vm_image().root_image.parent


BUILDERS: dict[str, Callable[[], Path]] = {
    "nvidia-run": build_nvidia_run,
    "nvidia-run-470": lambda: build_nvidia_run(R470),
    "flatcar-release": build_flatcar_server_root,
    "vm-image": build_vm_image_dir,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testinputs", description=__doc__)
    parser.add_argument("input", choices=sorted(BUILDERS), help="the test input to build")
    args = parser.parse_args(argv)
    try:
        path = BUILDERS[args.input]()
    except (CoreosGpuError, RuntimeError, OSError) as e:
        hint = f" ({e.hint})" if isinstance(e, CoreosGpuError) and e.hint else ""
        print(f"testinputs: {args.input}: {e}{hint}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
