"""Backend registry: which implementations of the primitives exist, which can run, and the choice
behind ``backend="auto"``.

Every backend is a module exposing

    unavailable_reason(device: torch.device, dtype: Optional[torch.dtype] = None) -> Optional[str]
        None when the backend can run on tensors of ``device`` (and of ``dtype``, when given: a
        backend may support only some dtypes, or compute some wrongly in a given setting);
        otherwise why not and how to fix it.
    make_kernels(**options) -> SimilarityKernels          (see ``fused_losses.backends.base``)
    FEATURES: frozenset of the optional features it implements (``base.OPTIONAL_FEATURES``)

A call names the optional features it needs; ``backend="auto"`` then takes the fastest backend
that can run on the device *and* implements them, and a backend asked for by name that lacks one
raises ``FeatureUnsupported``.

Backend modules are imported lazily, so importing fused_losses never imports triton, builds the
CUDA extension or queries a GPU.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import AbstractSet, Any, Dict, Iterable, List, Optional, Union

import torch

from fused_losses.backends.base import (
    OPTIONAL_FEATURES, BackendUnavailable, FeatureUnsupported, SimilarityKernels,
)

BACKENDS = ("triton", "cuda", "torch")
BACKEND_CHOICES = ("auto",) + BACKENDS

_MODULES = {
    "triton": "fused_losses.backends.triton",
    "cuda": "fused_losses.backends.cuda",
    "torch": "fused_losses.backends.torch_tiled",
}

# Fastest first; "auto" takes the first one that can run on the tensors' device and dtype.
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("torch",)}


def _module(name: str) -> ModuleType:
    return importlib.import_module(_MODULES[name])


def unavailable_reason(name: str, device: Union[torch.device, str, None] = None,
                       dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """None if backend ``name`` can run on ``device`` (default: CUDA if present, else CPU) and,
    when given, inputs of ``dtype``."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        module = _module(name)
    except ImportError as error:
        return f"fused_losses.backends.{name} failed to import ({error})"
    return module.unavailable_reason(torch.device(device), dtype)


def backend_status(device: Union[torch.device, str, None] = None,
                   dtype: Optional[torch.dtype] = None) -> Dict[str, Optional[str]]:
    """For every backend: None when it can run on ``device`` (and ``dtype``), else the reason."""
    return {name: unavailable_reason(name, device, dtype) for name in BACKENDS}


def available_backends(device: Union[torch.device, str, None] = None,
                       dtype: Optional[torch.dtype] = None) -> List[str]:
    """Names of the backends that can run on ``device`` (default: CUDA if present, else CPU) and,
    when given, inputs of ``dtype``."""
    return [name for name, reason in backend_status(device, dtype).items() if reason is None]


def missing_features(name: str, features: AbstractSet[str]) -> List[str]:
    """The optional ``features`` that backend ``name`` does not implement, sorted."""
    return sorted(set(features) - _module(name).FEATURES)


def _describe_features(features: Iterable[str]) -> str:
    return " and ".join(OPTIONAL_FEATURES[feature] for feature in features)


def select_backend(backend: str, device: torch.device, features: AbstractSet[str] = frozenset(),
                   dtype: Optional[torch.dtype] = None) -> str:
    """Resolve ``backend`` ("auto" or a name) for tensors on ``device`` (of ``dtype``, when given)
    and a call that needs the optional ``features``; raise if it cannot run or lacks one of them."""
    device = torch.device(device)
    if backend == "auto":
        order = _AUTO_ORDER.get(device.type, ("torch",))
        for name in order:
            if unavailable_reason(name, device, dtype) is None and not missing_features(name, features):
                return name
        needs = f" with {_describe_features(sorted(features))}" if features else ""
        inputs = "" if dtype is None else f" for {dtype} inputs"
        raise BackendUnavailable(f"no backend can run on device {device}{needs}{inputs} "
                                 f"(tried {', '.join(order)})")
    reason = unavailable_reason(backend, device, dtype)
    if reason is not None:
        raise BackendUnavailable(f"backend={backend!r} is not available on {device}: {reason}")
    missing = missing_features(backend, features)
    if missing:
        implementing = [name for name in BACKENDS if not missing_features(name, features)]
        raise FeatureUnsupported(
            f"backend={backend!r} does not implement {_describe_features(missing)}; backends that "
            f"do: {', '.join(implementing) or 'none'} (backend='auto' picks one that runs here)")
    return backend


def get_kernels(backend: str, device: torch.device, features: AbstractSet[str] = frozenset(),
                dtype: Optional[torch.dtype] = None, **options: Any) -> SimilarityKernels:
    """The kernels of ``backend`` ("auto" or a name) for tensors on ``device`` (of ``dtype``) and a
    call that needs the optional ``features``."""
    return _module(select_backend(backend, device, features, dtype)).make_kernels(**options)


__all__ = [
    "BACKENDS", "BACKEND_CHOICES", "BackendUnavailable", "FeatureUnsupported", "SimilarityKernels",
    "available_backends", "backend_status", "get_kernels", "missing_features", "select_backend",
    "unavailable_reason",
]
