"""The ``linearpatch`` command's entry point: ``--help`` and usage errors without importing torch.

Importing the package ``linearpatch_kernels`` registers its custom ops with torch and its patched
architectures with transformers (``import linearpatch_kernels`` is how a user gets both), so it
imports torch, transformers and the kernels: seconds of CPU before the first line of ``--help``.
The command's module, ``linearpatch_kernels/cli.py``, needs none of that to parse its arguments (it
imports everything else inside the commands), so this entry point loads that one file by itself,
without running the package's ``__init__``. Its relative imports then import the package as usual,
once a command runs. ``python -m linearpatch_kernels.cli`` runs the same code through a normal import.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

CLI_MODULE = "linearpatch_kernels.cli"


def load_cli():
    """The module ``linearpatch_kernels.cli``, loaded without importing its package."""
    module = sys.modules.get(CLI_MODULE)
    if module is not None:
        return module
    package = importlib.util.find_spec("linearpatch_kernels")  # a top-level name: finding it imports nothing
    if package is None or not package.submodule_search_locations:
        raise SystemExit("linearpatch: the package linearpatch_kernels is not installed")
    path = Path(list(package.submodule_search_locations)[0]) / "cli.py"
    spec = importlib.util.spec_from_file_location(CLI_MODULE, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[CLI_MODULE] = module  # the package finds it there when a command imports the package
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[CLI_MODULE]
        raise
    return module


def main(argv: list[str] | None = None) -> int:
    return load_cli().main(argv)


if __name__ == "__main__":
    sys.exit(main())
