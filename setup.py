# Kept for tools that still call setup.py; the metadata lives in pyproject.toml.
from setuptools import setup

setup(package_dir={"fused_attn": "fused_attn", "fused_attn.kernels": "kernels"})
