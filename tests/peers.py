"""Peer implementations that tests compare against, loaded without their heavy dependencies.

Each loader returns the peer's loss class, or skips the calling test (``pytest.skip``) with the
reason and the install command when the package is missing. Versions tested against:
pytorch-metric-learning 2.9.0, open_clip_torch 3.3.0, lightly 1.6.0.

open_clip and lightly import torchvision at package import, and torchvision has no build for
every torch. Their loss files need only torch, so those files are loaded on their own from the
installed package directory, without importing the package.
"""

import contextlib
import functools
import importlib.util
import pathlib
import sys
import types

import pytest

PML_PIP = "pytorch-metric-learning==2.9.0"
OPEN_CLIP_PIP = "--no-deps open_clip_torch==3.3.0"
LIGHTLY_PIP = "--no-deps lightly==1.6.0"


def _skip_reason(distribution, pip_arguments):
    return f"peer {distribution} is not installed (pip install {pip_arguments})"


def _package_dir(package, distribution, pip_arguments):
    """Directory of an installed package, found without importing it; skip if it is missing."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        pytest.skip(_skip_reason(distribution, pip_arguments))
    return pathlib.Path(next(iter(spec.submodule_search_locations)))


def _load_file(module_name, path):
    """Execute the Python file ``path`` as a fresh module named ``module_name``."""
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _modules_in_place(modules):
    """Make ``modules`` ({name: module}) importable for the duration, then restore sys.modules."""
    previous = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name, module in previous.items():
            if module is None:
                del sys.modules[name]
            else:
                sys.modules[name] = module


def pml_module(name):
    """A pytorch_metric_learning submodule, e.g. "losses", "reducers", "distances"."""
    return pytest.importorskip(
        f"pytorch_metric_learning.{name}", reason=_skip_reason("pytorch-metric-learning", PML_PIP))


def pml_loss(name):
    """pytorch_metric_learning.losses.<name>, e.g. "NTXentLoss", "SupConLoss", "NPairsLoss"."""
    return getattr(pml_module("losses"), name)


@functools.cache
def _open_clip_loss_module():
    # open_clip/loss.py imports only torch (horovod optionally); `import open_clip` needs torchvision.
    package_dir = _package_dir("open_clip", "open_clip_torch", OPEN_CLIP_PIP)
    return _load_file("_peer_open_clip_loss", package_dir / "loss.py")


def open_clip_loss(name):
    """open_clip.loss.<name>, e.g. "ClipLoss", "SigLipLoss" (features are used as given)."""
    return getattr(_open_clip_loss_module(), name)


@functools.cache
def lightly_ntxent_loss():
    """lightly.loss.NTXentLoss (normalizes its inputs; mean over the 2N views)."""
    package_dir = _package_dir("lightly", "lightly", LIGHTLY_PIP)
    # ntx_ent_loss.py needs lightly.models.modules.memory_bank, which needs lightly.models.utils;
    # importing either package pulls torchvision. memory_bank uses that utils module only to gather
    # across processes, never on the single-process path tested here, so an empty stand-in serves.
    models_stand_in = types.ModuleType("lightly.models")
    models_stand_in.utils = types.ModuleType("lightly.models.utils")
    with _modules_in_place({"lightly.models": models_stand_in}):
        memory_bank = _load_file(
            "lightly.models.modules.memory_bank", package_dir / "models" / "modules" / "memory_bank.py")
    with _modules_in_place({"lightly.models.modules.memory_bank": memory_bank}):
        return _load_file("_peer_lightly_ntx_ent_loss", package_dir / "loss" / "ntx_ent_loss.py").NTXentLoss
