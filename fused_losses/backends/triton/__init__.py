"""Backend ``triton``: fused triton kernels for the similarity primitives.

Importing this package imports neither triton nor the kernels; ``make_kernels`` does. Modules:
``kernels`` (the SimilarityKernels class), ``operands`` (checked inputs), ``launch`` (tile
configurations, occupancy, grid splits, scratch bounds, autotuning), ``tiles`` (device helpers
shared by all kernels), ``lse`` and ``softplus`` (forward kernels and the primitives' W),
``gradient`` (backward dispatch) with ``chunked_gradient`` (the weights writer of
``fused_losses.backends.chunked_backward``, default) and ``fused_gradient`` (W on chip, an option),
``compile_check`` (compiles for sm_90 exactly what the losses launch and reports resources).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

from fused_losses.backends.base import LABEL_MASK

INTERPRETER_ENV = "TRITON_INTERPRET"

# Optional features of the contract (fused_losses.backends.base) implemented here.
FEATURES = frozenset({LABEL_MASK})


def unavailable_reason(device: torch.device) -> Optional[str]:
    """None when the kernels can run on tensors of ``device``; otherwise why not and what to do."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "CUDA is not available to torch"
    if device.type == "cpu":
        if os.environ.get(INTERPRETER_ENV, "").lower() in ("1", "true", "on"):
            return None
        return (f"triton runs on CPU tensors only in its interpreter: set {INTERPRETER_ENV}=1 "
                "before triton is imported (slow; meant for tests)")
    return f"triton kernels run on CUDA devices, not {device.type}"


def make_kernels(deterministic: bool = True, gradient: str = "chunked"):
    """The triton SimilarityKernels. ``gradient="chunked"`` (default) or ``"fused"``: how the
    backward runs; ``deterministic=False`` allows fp32 atomics in the fused backward."""
    from fused_losses.backends.triton.kernels import TritonKernels

    return TritonKernels(deterministic=deterministic, gradient=gradient)
