"""Build and install fused_losses.

    pip install .            # pure Python package (the torch backend; triton if installed)
    pip install .[test]      # plus what the tests need
"""

from setuptools import find_packages, setup

setup(
    name="fused_losses",
    version="0.1.0",
    description="Fused GPU kernels for large-batch contrastive losses (CLIP, SimCLR, SupCon, SigLIP)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fused_losses", "fused_losses.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark>=4", "pytorch-metric-learning>=2.0"],
        "bench": ["matplotlib"],
    },
    entry_points={"console_scripts": ["fused-losses=fused_losses.cli:main"]},
)
