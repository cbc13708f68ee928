"""Input checks shared by the primitives, losses and modules.

Every check raises before any compute, with a message naming the argument, what was received and
what is allowed: TypeError for a wrong kind of value, ValueError for a wrong shape or value.
Checks that must read a tensor's value (a tensor scale's sign, a label's range) cost one device
sync; they are skipped while torch.compile traces, where reading a value would break the graph.
Checks of Python floats are comparisons, which torch.compile(dynamic=True) turns into guards.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Union, cast

import torch
from torch import Tensor

from fused_losses.backends import BACKEND_CHOICES

REDUCTIONS = ("mean", "sum", "none")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

Scalar = Union[float, Tensor]


def _reads_values() -> bool:
    return not torch.compiler.is_compiling()


def describe(x) -> str:
    if isinstance(x, Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)} on {x.device}"
    return f"{type(x).__name__} {_shown(x)}"


def _shown(value) -> str:
    """``repr(value)``; a placeholder while torch.compile traces, where a Python float may be
    symbolic and cannot be formatted (the check itself still runs: a comparison is a guard)."""
    return repr(value) if _reads_values() else "(a value traced by torch.compile)"


def check_dense(name: str, x: Tensor) -> None:
    """``x`` must be an ordinary (strided, non-nested) tensor: the kernels read raw strides."""
    if x.is_nested:
        raise TypeError(f"{name} must be a dense (strided) tensor, got a nested tensor; pad its "
                        f"pieces into one tensor (torch.nested.to_padded_tensor)")
    if x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout}; convert "
                        f"it with .to_dense()")


def check_embeddings(name: str, x, allow_empty_rows: bool = False) -> None:
    """``x`` must be a 2-D floating tensor (rows are embeddings) with at least one column and,
    unless ``allow_empty_rows`` (a rank's share of a distributed batch), at least one row."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (batch, dim), got {describe(x)}")
    check_dense(name, x)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (batch, dim), got shape {tuple(x.shape)}")
    if (x.shape[0] == 0 and not allow_empty_rows) or x.shape[1] == 0:
        raise ValueError(f"{name} must have at least one row and one column, got shape {tuple(x.shape)}")


def check_compatible(name_a: str, a: Tensor, name_b: str, b: Tensor, *, same_rows: bool,
                     allow_empty_rows: bool = False) -> None:
    """Two embedding matrices: same dim, dtype and device, and the same batch if ``same_rows``."""
    check_embeddings(name_a, a, allow_empty_rows)
    check_embeddings(name_b, b, allow_empty_rows)
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


def check_real(name: str, value, allowed: str, is_ok: Callable[[float], bool]) -> None:
    """A Python real (not a bool) with ``is_ok(value)``; ``allowed`` describes the valid values.

    ``is_ok`` must be made of comparisons (False for NaN), never math.isfinite: under
    torch.compile(dynamic=True) a float option is symbolic and a comparison becomes a guard.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {allowed}, got {describe(value)}")
    if not is_ok(cast(float, value)):  # not float(value): that would specialize a symbolic float
        raise ValueError(f"{name} must be {allowed}, got {_shown(value)}")


def _finite(v) -> bool:
    return -math.inf < v < math.inf


def _check_scalar_kind(name: str, value, device: Optional[torch.device]) -> None:
    """A float or a 1-element floating tensor (on ``device`` or the CPU, if a device is given)."""
    if isinstance(value, Tensor):
        check_dense(name, value)
        if value.numel() != 1 or value.dim() > 1:
            raise ValueError(f"{name} must be a float or a 0-d tensor, got {describe(value)}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
        if device is not None and value.device != device and value.device.type != "cpu":
            raise ValueError(f"{name} must be on {device} (or the CPU), got {value.device}")
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float or a 0-d tensor, got {describe(value)}")


def _scalar_value(value):
    """The value to check: a Python real as is, a tensor read on the host (one sync); None while
    torch.compile traces a tensor, whose value cannot be read there."""
    if isinstance(value, Tensor):
        return float(value.detach()) if _reads_values() else None
    return value


def check_positive_scalar(name: str, value: Scalar, device: Optional[torch.device],
                          dtype: torch.dtype = torch.float64, reciprocal: bool = False) -> None:
    """A temperature or scale: a float or 0-d float tensor, finite and > 0, that the math of
    ``dtype`` (the statistics dtype of the inputs) can hold without overflow or underflow: between
    the smallest normal and the largest finite number of ``dtype``, and so is its reciprocal when
    ``reciprocal`` (a temperature, used as 1 / temperature)."""
    _check_scalar_kind(name, value, device)
    v = _scalar_value(value)
    if v is None:
        return
    if not 0 < v < math.inf:
        raise ValueError(f"{name} must be finite and > 0, got {_shown(v)}")
    info = torch.finfo(dtype)
    low, high = (1 / info.max, 1 / info.tiny) if reciprocal else (info.tiny, info.max)
    low, high = max(low, info.tiny), min(high, info.max)
    if not low <= v <= high:
        raise ValueError(f"{name} must lie in [{low:.4g}, {high:.4g}] for losses computed in "
                         f"{dtype} (its {'reciprocal ' if reciprocal else ''}value would "
                         f"overflow or vanish there), got {_shown(v)}")


def check_finite_scalar(name: str, value: Scalar, device: Optional[torch.device],
                        dtype: torch.dtype = torch.float64) -> None:
    """A bias: a float or 0-d float tensor, finite in ``dtype`` (the statistics dtype)."""
    _check_scalar_kind(name, value, device)
    v = _scalar_value(value)
    if v is None:
        return
    if not _finite(v):
        raise ValueError(f"{name} must be finite, got {_shown(v)}")
    limit = torch.finfo(dtype).max
    if not -limit <= v <= limit:
        raise ValueError(f"{name} must lie in [{-limit:.4g}, {limit:.4g}] for losses computed in "
                         f"{dtype}, got {_shown(v)}")


def check_label_smoothing(value: float) -> None:
    check_real("label_smoothing", value, "a float in [0, 1)", lambda v: 0 <= v < 1)


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_backend(backend: str) -> None:
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")


def check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {describe(value)}")


def check_eps(eps: float, dtype: torch.dtype = torch.float64) -> None:
    """The norm floor: a float > 0 that ``dtype`` (the statistics dtype) holds as a normal number,
    so that it never rounds to 0 there (a zero row would then divide by 0)."""
    check_real("eps", eps, "a finite float > 0", lambda v: 0 < v < math.inf)
    info = torch.finfo(dtype)
    check_real("eps", eps, f"in [{info.tiny:.4g}, {info.max:.4g}] for losses computed in {dtype}",
               lambda v: info.tiny <= v <= info.max)


def check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= 1, got {describe(value)}")
    if value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value}")


def check_diag_offset(diag_offset: Optional[int]) -> None:
    if diag_offset is not None and (isinstance(diag_offset, bool) or not isinstance(diag_offset, int)):
        raise TypeError(f"diag_offset must be an int or None, got {describe(diag_offset)}")


def class_indices(name: str, indices, length: int, device: torch.device,
                  num_classes: Optional[int] = None) -> Tensor:
    """``indices`` checked and as int64: integer class indices of shape (length,) on ``device``,
    in [0, num_classes) if given. Every integer dtype counts as class indices (never as a mask,
    which is what indexing with uint8 would do); bool is refused."""
    if not isinstance(indices, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer class indices, got {describe(indices)}")
    check_dense(name, indices)
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (e.g. torch.long), got {indices.dtype}")
    if tuple(indices.shape) != (length,):
        raise ValueError(f"{name} must have shape ({length},), got {tuple(indices.shape)}")
    if indices.device != device:
        raise ValueError(f"{name} must be on {device} like the embeddings, got {indices.device}")
    indices = indices.to(torch.int64)
    if num_classes is not None and _reads_values() and length > 0:
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= num_classes:
            raise ValueError(f"{name} must lie in [0, {num_classes}), got values in [{low}, {high}]")
    return indices
