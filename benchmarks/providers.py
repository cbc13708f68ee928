"""Providers beyond fused_losses' built-in ones (our backends and the eager reference): the reference
under torch.compile and the peers. Importing this module registers them with
``fused_losses.benchmarking``.

Every provider computes the loss of ``fused_losses.reference`` with ``LOSS_PARAMETERS`` on the
inputs of ``loss_inputs``: embeddings as given (peers that take unit features get
``F.normalize``d ones, inside the timed step, as their users do), mean over the batch. Where a
peer's arithmetic differs, its ``semantics`` says so; ``run_sweep(check_parity=True)`` measures the
difference once per series. Versions used: open_clip_torch 3.3.0, inf-cl 1.2.1,
pytorch-metric-learning 2.9.0.

open_clip imports torchvision at package import; its loss file needs only torch, so that file is
loaded on its own from the installed package directory (found without importing the package).
"""

import functools
import importlib.util
import pathlib
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F

from fused_losses import reference
from fused_losses.backends import BACKENDS
from fused_losses.benchmarking import (
    LOSS_FUNCTION_NAMES, LOSS_PARAMETERS, LOSSES, Case, Provider, get_provider, register_provider,
    runs_anywhere,
)

PEERS = ("open_clip", "inf_cl", "pml")

# What each peer imports, and how to install it without pulling another torch.
_REQUIREMENTS = {
    "open_clip": (("open_clip",), "pip install --no-deps open_clip_torch==3.3.0"),
    "inf_cl": (("inf_cl", "triton", "numpy"), "pip install --no-deps inf-cl==1.2.1 triton numpy"),
    "pml": (("pytorch_metric_learning", "numpy", "scipy", "tqdm"),
            "pip install --no-deps pytorch-metric-learning==2.9.0 numpy scipy tqdm"),
}


def _not_installed(peer: str) -> Optional[str]:
    """Which modules ``peer`` needs are missing, and the install command; None if none is."""
    modules, install = _REQUIREMENTS[peer]
    missing = [module for module in modules if importlib.util.find_spec(module) is None]
    return f"{', '.join(missing)} not installed ({install})" if missing else None


@functools.cache
def _compiled_reference(loss: str):
    # dynamic=True: one compilation serves every n and d (static shapes would recompile at each
    # point and fall back to eager past torch._dynamo's recompile limit).
    return torch.compile(getattr(reference, LOSS_FUNCTION_NAMES[loss]), dynamic=True, fullgraph=True)


def compiled_reference_loss(case: Case) -> Callable[..., torch.Tensor]:
    return functools.partial(_compiled_reference(case.loss), **LOSS_PARAMETERS[case.loss])


@functools.cache
def _open_clip_losses():
    spec = importlib.util.find_spec("open_clip")
    loss_file = pathlib.Path(next(iter(spec.submodule_search_locations))) / "loss.py"
    file_spec = importlib.util.spec_from_file_location("_open_clip_loss", loss_file)
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    return module


def open_clip_loss(case: Case) -> Callable[..., torch.Tensor]:
    """open_clip's ClipLoss / SigLipLoss on unit features (its models normalize before the loss)."""
    losses = _open_clip_losses()
    if case.loss == "clip":
        clip = losses.ClipLoss()
        scale = LOSS_PARAMETERS["clip"]["logit_scale"]
        return lambda image, text: clip(F.normalize(image, dim=-1), F.normalize(text, dim=-1), scale)
    siglip = losses.SigLipLoss()
    parameters = LOSS_PARAMETERS["siglip"]
    return lambda image, text: siglip(F.normalize(image, dim=-1), F.normalize(text, dim=-1),
                                      parameters["logit_scale"], parameters["logit_bias"])


def open_clip_unavailable(device: torch.device, dtype: Optional[torch.dtype] = None) -> Optional[str]:
    return _not_installed("open_clip")


def _inf_cl_head_dim(d: int) -> int:
    """Inf-CL splits D into heads of 16, 32, 64, 128 or 256 features: the largest that divides d."""
    for head_dim in (256, 128, 64, 32, 16):
        if d % head_dim == 0:
            return head_dim
    raise ValueError(f"Inf-CL needs D divisible by 16, got D = {d}")


def inf_cl_loss(case: Case) -> Callable[..., torch.Tensor]:
    """Symmetric CLIP loss from two one-way ``cal_inf_loss`` calls, as Inf-CL's authors write it."""
    from inf_cl import cal_inf_loss

    head_dim = _inf_cl_head_dim(case.d)
    # A scale that requires no grad: Inf-CL's scale gradient all-reduces, which needs
    # torch.distributed; our providers get a constant scale too.
    scale = torch.tensor(LOSS_PARAMETERS["clip"]["logit_scale"], device=case.device)

    def symmetric(image, text):
        u, v = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
        return 0.5 * (cal_inf_loss(u, v, scale=scale, head_dim=head_dim)
                      + cal_inf_loss(v, u, scale=scale, head_dim=head_dim))
    return symmetric


def inf_cl_unavailable(device: torch.device, dtype: Optional[torch.dtype] = None) -> Optional[str]:
    if device.type != "cuda":
        return "Inf-CL's Triton kernels use inline PTX: CUDA only"
    return _not_installed("inf_cl")


def pml_loss(case: Case) -> Callable[..., torch.Tensor]:
    """pytorch-metric-learning: NTXentLoss / NPairsLoss on cat([z1, z2]) with labels arange(N)
    twice, SupConLoss on (features, labels); their default cosine similarity normalizes."""
    from pytorch_metric_learning import losses

    if case.loss == "supcon":
        return losses.SupConLoss(**LOSS_PARAMETERS["supcon"])
    pml = losses.NTXentLoss(**LOSS_PARAMETERS["nt_xent"]) if case.loss == "nt_xent" else losses.NPairsLoss()

    def paired(z1, z2):
        labels = torch.arange(len(z1), device=z1.device).repeat(2)
        return pml(torch.cat([z1, z2]), labels)
    return paired


def pml_unavailable(device: torch.device, dtype: Optional[torch.dtype] = None) -> Optional[str]:
    return _not_installed("pml")


for _provider in (
    Provider("reference_compiled", LOSSES, compiled_reference_loss, runs_anywhere,
             semantics="fused_losses.reference under torch.compile(dynamic=True, fullgraph=True)"),
    Provider("open_clip", ("clip", "siglip"), open_clip_loss, open_clip_unavailable,
             semantics="logits (and their softmax) in the input dtype: bf16 logits at bf16",
             distribution="open_clip_torch"),
    Provider("inf_cl", ("clip",), inf_cl_loss, inf_cl_unavailable,
             semantics="inputs cast to float32, products in TF32 (also at bf16); "
                       "a constant logit scale (its gradient needs torch.distributed)",
             distribution="inf-cl"),
    Provider("pml", ("nt_xent", "supcon", "npairs"), pml_loss, pml_unavailable,
             semantics="the same losses (SupCon's mean skips anchors whose loss is exactly 0)",
             distribution="pytorch-metric-learning"),
):
    register_provider(_provider)

ALL_PROVIDERS = BACKENDS + ("reference", "reference_compiled") + PEERS


def available_providers(names, device: str) -> Tuple[List[str], List[str]]:
    """(the providers of ``names`` that run on ``device``, a note for each one that does not)."""
    runnable, notes = [], []
    for name in names:
        reason = get_provider(name).unavailable_reason(torch.device(device))
        if reason is None:
            runnable.append(name)
        else:
            notes.append(f"skipping {name}: {reason}")
    return runnable, notes
