"""Finding, building and loading the compiled extension ``fused_losses.backends.cuda._C``.

Where it comes from, first match wins:
1. the in-place / installed build next to this file (setup.py, or ``python -m
   fused_losses.backends.cuda.build``), unless ``csrc/`` is present and has changed since;
2. a just-in-time build from ``csrc/``, compiled on first use for the GPU at hand and cached under
   ``$FUSED_LOSSES_CACHE_DIR`` (default ``~/.cache/fused_losses``), keyed by the sources' digest.
   ``FUSED_LOSSES_CUDA_JIT=0`` turns this off.
Nothing here runs at import time.
"""

from __future__ import annotations

import fcntl
import importlib.machinery
import importlib.util
import logging
import os
import sysconfig
from pathlib import Path
from types import ModuleType
from typing import Optional, Sequence, Tuple

from fused_losses.backends.base import BackendUnavailable
from fused_losses.backends.cuda import build

MODULE_NAME = "fused_losses.backends.cuda._C"
HOW_TO_BUILD = (
    f"build it with `{build.BUILD_COMMAND}` or `FUSED_LOSSES_BUILD_CUDA=1 pip install .`"
)

_log = logging.getLogger(__name__)
_loaded: Optional[ModuleType] = None
_build_failure: Optional[str] = None  # why the just-in-time build failed, once it has


def _import_file(path: Path) -> ModuleType:
    loader = importlib.machinery.ExtensionFileLoader(MODULE_NAME, str(path))
    spec = importlib.util.spec_from_file_location(MODULE_NAME, str(path), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _is_fresh(module: ModuleType) -> bool:
    """A build is stale when the sources it came from are present and differ."""
    return not build.CSRC.is_dir() or module.source_hash == build.source_hash()


def _jit_enabled() -> bool:
    return os.environ.get("FUSED_LOSSES_CUDA_JIT", "1") != "0"


def jit_output(archs: Sequence[int]) -> Path:
    """Where the just-in-time build for ``archs`` of the current sources lives."""
    root = Path(os.environ.get("FUSED_LOSSES_CACHE_DIR") or Path.home() / ".cache" / "fused_losses")
    key = f"{build.source_hash()}-sm{'_'.join(str(a) for a in archs)}"
    return root / "cuda" / key / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))


def _arch(capability: Tuple[int, int]) -> int:
    return capability[0] * 10 + capability[1]


def _resolve(capability: Tuple[int, int], build_if_needed: bool) -> Optional[ModuleType]:
    """The extension for a GPU of this compute capability; None when it is not there yet but can be
    built just in time and build_if_needed is false. Raises BackendUnavailable when it cannot be had."""
    global _loaded
    if _loaded is not None:
        return _loaded
    if _build_failure is not None:
        raise BackendUnavailable(_build_failure)
    archs = [_arch(capability)]
    module = None
    stale = ""
    if build.IN_PLACE_OUTPUT.is_file():
        module = _import_file(build.IN_PLACE_OUTPUT)
        if not _is_fresh(module):
            module = None
            stale = f"{build.IN_PLACE_OUTPUT} was built from older sources than {build.CSRC}; "
    if module is None and _jit_enabled() and jit_output(archs).is_file():
        module = _import_file(jit_output(archs))
    if module is None:
        if not _jit_enabled():
            raise BackendUnavailable(
                f"{stale}the CUDA extension is not built (just-in-time builds are off: FUSED_LOSSES_CUDA_JIT=0); "
                f"{HOW_TO_BUILD}"
            )
        missing = build.missing_tools()
        if missing:
            raise BackendUnavailable(
                f"{stale}the CUDA extension is not built and cannot be built here (missing {'; '.join(missing)}); "
                f"{HOW_TO_BUILD}"
            )
        if not build_if_needed:
            return None
        module = _build_just_in_time(archs)
    if not build.covers_capability(build.parse_archs(module.cuda_archs), capability):
        raise BackendUnavailable(
            f"the CUDA extension was built for sm {module.cuda_archs}, not for this GPU (sm_{archs[0]}); "
            f"rebuild it with FUSED_LOSSES_CUDA_ARCHS={archs[0]}: {HOW_TO_BUILD}"
        )
    _loaded = module
    return module


def unavailable_reason(capability: Tuple[int, int]) -> Optional[str]:
    """None when the extension is loaded, loadable, or can be built just in time for a GPU of this
    compute capability; otherwise why not and how to fix it. Builds nothing."""
    try:
        _resolve(capability, build_if_needed=False)
    except BackendUnavailable as error:
        return str(error)
    return None


def load(capability: Tuple[int, int]) -> ModuleType:
    """The extension, built just in time for this compute capability if needed (once per process;
    concurrent processes wait for one another). Raises BackendUnavailable when it cannot be had."""
    return _resolve(capability, build_if_needed=True)


def _build_just_in_time(archs: Sequence[int]) -> ModuleType:
    global _build_failure
    output = jit_output(archs)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BackendUnavailable(f"cannot create the extension cache (set FUSED_LOSSES_CACHE_DIR): {error}") from error
    with open(output.parent / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same thing
        if not output.is_file():
            _log.warning("fused_losses: building the CUDA extension for sm_%s (first use; about a minute) in %s",
                         archs[0], output.parent)
            staging = output.with_name(output.name + f".{os.getpid()}.tmp")
            try:
                build.build(staging, archs, build_dir=output.parent / "build", verbose=False)
            except build.BuildError as error:
                _build_failure = f"the just-in-time build of the CUDA extension failed: {error}\n{HOW_TO_BUILD}"
                raise BackendUnavailable(_build_failure) from error
            os.replace(staging, output)
    return _import_file(output)


__all__ = ["HOW_TO_BUILD", "MODULE_NAME", "jit_output", "load", "unavailable_reason"]
