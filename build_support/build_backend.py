"""The PEP 517 build backend of this project: setuptools', plus torch and ninja in the isolated build
environment where the C++ CPU kernels will be compiled.

A plain ``pip install .`` or ``pip install -e .`` builds in an isolated environment that has only
what the build asks for. The CPU kernels (``csrc/cpu/``) compile against torch's stable-ABI headers
at level 2.10, so any torch >= 2.10 there gives a library that loads under every torch >= 2.10 the
package later runs with (the build's torch need not be the user's). Asking for torch only where a
C++ compiler exists keeps a machine without one from downloading torch twice for nothing; ninja
compiles the instruction-set files in parallel. ``LINEARPATCH_BUILD_CPU=0`` asks for neither.
``--no-build-isolation`` builds use the torch already installed and never call this.
"""

from __future__ import annotations

import os
import shutil
import sysconfig

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403 - the rest of the PEP 517 interface, unchanged

CPU_ENV_FLAG = "LINEARPATCH_BUILD_CPU"
CPU_BUILD_REQUIRES = ["torch>=2.10", "ninja"]


def find_cxx_compiler() -> str | None:
    """The C++ compiler a build would use (``CXX``, else Python's configured one, else c++/g++/clang++)."""
    candidates = [os.environ.get("CXX"), (sysconfig.get_config_var("CXX") or "").split(" ")[0], "c++", "g++", "clang++"]
    for name in candidates:
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_requires() -> list[str]:
    if (os.environ.get(CPU_ENV_FLAG) or "").strip() == "0" or find_cxx_compiler() is None:
        return []
    return list(CPU_BUILD_REQUIRES)


REQUIRES_ONLY_ENV = "LINEARPATCH_REQUIRES_ONLY"


def _setuptools_requires(hook, config_settings):
    # setuptools runs setup.py to collect its requirements, before torch is in the environment:
    # tell it to skip probing for the extensions (and printing that it will not build them).
    os.environ[REQUIRES_ONLY_ENV] = "1"
    try:
        return hook(config_settings)
    finally:
        del os.environ[REQUIRES_ONLY_ENV]


def get_requires_for_build_wheel(config_settings=None):
    return _setuptools_requires(_setuptools.get_requires_for_build_wheel, config_settings) + _cpu_requires()


def get_requires_for_build_editable(config_settings=None):
    return _setuptools_requires(_setuptools.get_requires_for_build_editable, config_settings) + _cpu_requires()
