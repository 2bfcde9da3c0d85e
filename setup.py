"""Build script. The pure-Python package needs nothing compiled; the CUDA extension is optional."""

from setuptools import setup

setup()
