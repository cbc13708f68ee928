"""The ``cuda`` backend: hand-written CUDA C++ kernels from ``csrc/``, bound with pybind11.

Registry interface (see ``fused_losses.backends``):

    unavailable_reason(device, dtype=None) -> None, or why the backend cannot run on ``device``
        (with ``dtype`` inputs) and how to fix it
    make_kernels(fp32_precision="split_tf32", workspace_limit_bytes=256 MiB) -> CudaKernels
    FEATURES: the optional features implemented (the label mask)

The extension is compiled ahead of time by setup.py (``FUSED_LOSSES_BUILD_CUDA=1``) or
``python -m fused_losses.backends.cuda.build``, or else just in time on first use from a source
checkout (see ``_extension``). Importing this package builds nothing and queries no GPU.
"""

from __future__ import annotations

from typing import Optional

import torch

from fused_losses.backends.base import LABEL_MASK

MIN_CAPABILITY = (8, 0)
# Shared memory one CTA of the tile kernels takes (csrc/launch_plan.h: 3 stages of 32 KiB, plus the
# epilogues' buffers and a label mask's labels, at most ~12 KiB; compile_check prints it per kernel,
# tests/test_cuda_host.py checks it against this): A100 / H100 / B200-class GPUs have it, sm_86 /
# sm_89 / sm_120 (99 KiB a block) do not.
MIN_SHARED_MEMORY_PER_BLOCK = 108 * 1024
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Optional features of the contract (fused_losses.backends.base) implemented here.
FEATURES: frozenset[str] = frozenset({LABEL_MASK})


def unavailable_reason(device: torch.device, dtype: Optional[torch.dtype] = None) -> Optional[str]:
    if dtype is not None and dtype not in SUPPORTED_DTYPES:
        return f"the cuda kernels take float16, bfloat16 or float32 inputs, not {dtype} (use backend='torch')"
    device = torch.device(device)
    if device.type != "cuda":
        return f"the cuda backend runs on CUDA tensors only (got device {device.type!r})"
    if torch.version.cuda is None:
        return "this build of torch has no CUDA support"
    if not torch.cuda.is_available():
        return "no CUDA device is available (torch.cuda.is_available() is False)"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return (f"the cuda backend needs compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer "
                f"(this GPU has {capability[0]}.{capability[1]})")
    shared = getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", None)
    if shared is not None and shared < MIN_SHARED_MEMORY_PER_BLOCK:
        return (f"the cuda backend's kernels need {MIN_SHARED_MEMORY_PER_BLOCK // 1024} KiB of shared memory per "
                f"block (sm_80, sm_90, sm_100 GPUs); this GPU has {shared // 1024} KiB: use backend='triton'")
    from fused_losses.backends.cuda import _extension

    return _extension.unavailable_reason(capability)


def make_kernels(**options):
    """The backend's SimilarityKernels; options as for CudaKernels (unknown ones: TypeError)."""
    from fused_losses.backends.cuda.kernels import CudaKernels

    return CudaKernels(**options)


__all__ = ["FEATURES", "make_kernels", "unavailable_reason"]
