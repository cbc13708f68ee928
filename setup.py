"""Build fused_losses: the metadata is in pyproject.toml; this file adds the CUDA extension.

    pip install .            # the package; the CUDA extension too where nvcc is found
    pip install .[test]      # plus what the tests need

The CUDA extension (backend="cuda", kernels in csrc/) is built with nvcc, ninja and pybind11 (the
last two come with the build requirements in pyproject.toml) when nvcc is found, and skipped
otherwise. FUSED_LOSSES_BUILD_CUDA=1 requires it (a missing tool or a compile error fails the
build), =0 skips it. FUSED_LOSSES_CUDA_ARCHS picks the GPU archs (default "80;90"), MAX_JOBS the
parallel compile jobs.
"""

import importlib.util
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _load_cuda_build():
    """fused_losses/backends/cuda/build.py, loaded by path: importing the package would need torch."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fused_losses", "backends", "cuda", "build.py")
    spec = importlib.util.spec_from_file_location("fused_losses_cuda_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cuda_build = _load_cuda_build()


class BuildCudaExtension(build_ext):
    """Builds the CUDA extension with fused_losses/backends/cuda/build.py (nvcc + ninja)."""

    def build_extension(self, ext):
        # An editable install builds in the checkout: keep the objects where the in-place build
        # does, so that compile_check reads them and a later in-place build has nothing to redo.
        in_checkout = self.inplace or getattr(self, "editable_mode", False)
        build_dir = cuda_build.BUILD_DIR if in_checkout else os.path.join(os.path.abspath(self.build_temp),
                                                                         "fused_losses_cuda")
        try:
            cuda_build.build(self.get_ext_fullpath(ext.name), build_dir=build_dir)
        except cuda_build.BuildError as error:
            sys.exit(f"error: {error}")


def cuda_extensions():
    mode = os.environ.get("FUSED_LOSSES_BUILD_CUDA", "")
    if mode == "0":
        return []
    missing = cuda_build.missing_tools()
    if missing:
        message = "the CUDA extension needs " + "; ".join(missing)
        if mode == "1":
            sys.exit(f"error: FUSED_LOSSES_BUILD_CUDA=1 but {message}")
        print(f"fused_losses: skipping the CUDA extension: {message}", file=sys.stderr)
        return []
    return [Extension("fused_losses.backends.cuda._C", sources=[])]


setup(ext_modules=cuda_extensions(), cmdclass={"build_ext": BuildCudaExtension})
