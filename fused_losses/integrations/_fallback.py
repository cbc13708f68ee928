"""What a drop-in does with a call it cannot fuse: the original library computes it, and the user is
told once, by a ``FallbackWarning`` that names the option responsible."""

from __future__ import annotations

import importlib
import warnings

from torch import nn


class FallbackWarning(UserWarning):
    """A drop-in loss computed a call with the original library's implementation (exactly its
    numbers, and its memory cost) because an option it was given is not fused."""


def warn_fallback(loss: nn.Module, option: str, original: str) -> None:
    """Warn, once per loss object and option, that ``option`` made ``loss`` use ``original``."""
    warned = loss.__dict__.setdefault("_fallback_options_warned", set())
    if option in warned:
        return
    warned.add(option)
    warnings.warn(f"fused_losses {type(loss).__name__}: {option} is not fused, so this call is "
                  f"computed by {original} (its numbers and its N x M memory); shown once per "
                  f"loss object and option", FallbackWarning, stacklevel=3)


def original_class(module_name: str, class_name: str, option: str) -> type:
    """The original library's class, imported now; an ImportError that names ``option`` (what needs
    it) when the library cannot be imported."""
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except ImportError as error:
        raise ImportError(f"{option} is computed by {module_name}.{class_name}, which failed to "
                          f"import ({error}); install the library with its dependencies or drop "
                          f"the option") from error
