"""Input checks shared by the primitives, losses and modules.

Every check raises before any compute, with a message naming the argument, what was received and
what is allowed: TypeError for a wrong kind of value, ValueError for a wrong shape or value.
Checks that must read a tensor's value (a tensor scale's sign, a label's range) cost one device
sync; they are skipped while torch.compile traces, where reading a value would break the graph.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Union

import torch
from torch import Tensor

from fused_losses.backends import BACKEND_CHOICES

REDUCTIONS = ("mean", "sum", "none")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

Scalar = Union[float, Tensor]


def _reads_values() -> bool:
    return not torch.compiler.is_compiling()


def _describe(x) -> str:
    if isinstance(x, Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)} on {x.device}"
    return f"{type(x).__name__} {x!r}"


def check_embeddings(name: str, x) -> None:
    """``x`` must be a non-empty 2-D floating tensor (rows are embeddings)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (batch, dim), got {_describe(x)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (batch, dim), got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must have at least one row and one column, got shape {tuple(x.shape)}")


def check_compatible(name_a: str, a: Tensor, name_b: str, b: Tensor, *, same_rows: bool) -> None:
    """Two embedding matrices: same dim, dtype and device, and the same batch if ``same_rows``."""
    check_embeddings(name_a, a)
    check_embeddings(name_b, b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{name_a} and {name_b} must have the same embedding dim, got shapes "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    if same_rows and a.shape[0] != b.shape[0]:
        raise ValueError(f"{name_a} and {name_b} must hold the same number of rows (pairs), got "
                         f"shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"{name_a} and {name_b} must have the same dtype, got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"{name_a} and {name_b} must be on the same device, got {a.device} and {b.device}")


def _check_scalar(name: str, value, device: torch.device, allowed: str, is_ok) -> None:
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.dim() > 1:
            raise ValueError(f"{name} must be a float or a 0-d tensor, got {_describe(value)}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
        if value.device != device and value.device.type != "cpu":
            raise ValueError(f"{name} must be on {device} (or the CPU), got {value.device}")
        if _reads_values() and not is_ok(float(value.detach())):
            raise ValueError(f"{name} must be {allowed}, got {float(value.detach())}")
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float or a 0-d tensor, got {_describe(value)}")
    if not is_ok(float(value)):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def check_positive_scalar(name: str, value: Scalar, device: torch.device) -> None:
    """A temperature or scale: a float or 0-d float tensor, finite and > 0."""
    _check_scalar(name, value, device, "finite and > 0", lambda v: math.isfinite(v) and v > 0)


def check_finite_scalar(name: str, value: Scalar, device: torch.device) -> None:
    """A bias: a float or 0-d float tensor, finite."""
    _check_scalar(name, value, device, "finite", math.isfinite)


def check_label_smoothing(value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"label_smoothing must be a float in [0, 1), got {_describe(value)}")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {value!r}")


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_backend(backend: str) -> None:
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")


def check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {_describe(value)}")


def check_eps(eps: float) -> None:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (0 < eps < math.inf):
        raise ValueError(f"eps must be a finite float > 0, got {eps!r}")


def check_diag_offset(diag_offset: Optional[int]) -> None:
    if diag_offset is not None and (isinstance(diag_offset, bool) or not isinstance(diag_offset, int)):
        raise TypeError(f"diag_offset must be an int or None, got {_describe(diag_offset)}")


def check_class_indices(name: str, indices, length: int, device: torch.device,
                        num_classes: Optional[int] = None) -> None:
    """Integer class indices of shape (length,), on ``device``, in [0, num_classes) if given."""
    if not isinstance(indices, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer class indices, got {_describe(indices)}")
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (e.g. torch.long), got {indices.dtype}")
    if tuple(indices.shape) != (length,):
        raise ValueError(f"{name} must have shape ({length},), got {tuple(indices.shape)}")
    if indices.device != device:
        raise ValueError(f"{name} must be on {device} like the embeddings, got {indices.device}")
    if num_classes is not None and _reads_values() and length > 0:
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= num_classes:
            raise ValueError(f"{name} must lie in [0, {num_classes}), got values in [{low}, {high}]")
