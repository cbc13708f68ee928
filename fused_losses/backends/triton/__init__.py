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

import contextlib
import importlib.util
import os
import warnings
from typing import Optional

import torch

from fused_losses.backends.base import LABEL_MASK

INTERPRETER_ENV = "TRITON_INTERPRET"
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Optional features of the contract (fused_losses.backends.base) implemented here.
FEATURES = frozenset({LABEL_MASK})


def interpreter_active() -> bool:
    """Whether triton runs kernels in its CPU interpreter (numpy) instead of compiling them."""
    return os.environ.get(INTERPRETER_ENV, "").lower() in ("1", "true", "on")


def unavailable_reason(device: torch.device, dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """None when the kernels can run on tensors of ``device`` (and ``dtype``, when given);
    otherwise why not and what to do."""
    if dtype is not None and dtype not in SUPPORTED_DTYPES:
        return f"the triton kernels take float16, bfloat16 or float32 inputs, not {dtype} (use backend='torch')"
    if dtype == torch.bfloat16 and interpreter_active():
        return (f"triton's interpreter ({INTERPRETER_ENV}=1) computes bfloat16 tl.dot wrongly (an "
                f"upstream bug; the results are garbage): use float16 / float32 inputs or "
                f"backend='torch' there")
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "CUDA is not available to torch"
    if device.type == "cpu":
        if interpreter_active():
            return None
        return (f"triton runs on CPU tensors only in its interpreter: set {INTERPRETER_ENV}=1 "
                "before triton is imported (slow; meant for tests)")
    return f"triton kernels run on CUDA devices, not {device.type}"


@contextlib.contextmanager
def interpreter_warnings_silenced():
    """Inside: no numpy RuntimeWarning from triton's interpreter, which evaluates masked-off lanes
    too (-inf - -inf, 0 / 0, log2(0)) where the compiled kernels never look at the result.
    Narrow on purpose: that module and those messages only, and nothing without the interpreter."""
    if not interpreter_active():
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", category=RuntimeWarning, module=r"triton\.runtime\.interpreter",
            message=r"(invalid value|divide by zero|overflow) encountered in")
        yield


def make_kernels(deterministic: bool = True, gradient: str = "chunked"):
    """The triton SimilarityKernels. ``gradient="chunked"`` (default) or ``"fused"``: how the
    backward runs; ``deterministic=False`` allows fp32 atomics in the fused backward."""
    from fused_losses.backends.triton.kernels import TritonKernels

    return TritonKernels(deterministic=deterministic, gradient=gradient)
