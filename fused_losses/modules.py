"""nn.Module front-ends of ``fused_losses.functional``: options in the constructor, tensors in
forward. ClipLoss and SigLipLoss can own the learnable logit scale (and bias) the way CLIP and
SigLIP train them, so a model needs no extra code for it.

The pair-scoring losses take ``gather_distributed`` and ``process_group`` (see
``fused_losses.distributed``): under DDP, each rank's loss scores its rows against every rank's
and the averaged gradients equal those of the loss on the global batch.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor, nn

from fused_losses import _validation as check
from fused_losses import functional
from fused_losses._typing import ProcessGroup, Scalar


def _check_constructor_options(normalize: bool, reduction: str, backend: str,
                               gather_distributed: bool = False,
                               process_group: Optional[ProcessGroup] = None,
                               temperature: Optional[Scalar] = None) -> None:
    """Fail at construction, not at the first forward, on options that are wrong already. A
    temperature (float or tensor) is checked for float64 math here; forward checks it again, in
    the dtype the inputs' loss is computed in."""
    functional.check_loss_options(normalize, reduction, backend, gather_distributed, process_group)
    if temperature is not None:
        check.check_positive_scalar("temperature", temperature, None, reciprocal=True)


class _LearnableLogitScale(nn.Module):
    """A logit scale learned in log space, as in CLIP: scale = exp(min(log_scale, log(max_scale))).

    The clamp caps the scale (CLIP: 100) and stops its gradient while capped, which is what
    CLIP's in-place clamp after each optimizer step amounts to.
    """

    def __init__(self, init_scale: float, max_scale: float):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.max_log_scale = math.log(max_scale)

    def forward(self) -> Tensor:
        return self.log_scale.clamp(max=self.max_log_scale).exp()


def _learnable_logit_scale(learn: bool, init_scale: float,
                           max_scale: float) -> Optional[_LearnableLogitScale]:
    """The module's own logit scale if ``learn``; the options are checked either way."""
    check.check_flag("learn_logit_scale", learn)
    check.check_real("max_logit_scale", max_scale, "a finite float > 0", lambda v: 0 < v < math.inf)
    check.check_real("init_logit_scale", init_scale, f"a float in (0, max_logit_scale={max_scale}]",
                     lambda v: 0 < v <= max_scale)
    return _LearnableLogitScale(init_scale, max_scale) if learn else None


def _scale_from(module: Union[ClipLoss, SigLipLoss], logit_scale: Optional[Scalar]) -> Scalar:
    """The module's own learnable scale, or the one passed to forward (exactly one of the two)."""
    owned = module.learnable_logit_scale
    if owned is not None:
        if logit_scale is not None:
            raise ValueError("logit_scale was passed to forward, but this loss learns its own "
                             "(learn_logit_scale=True); pass one or the other")
        return owned()
    if logit_scale is None:
        raise ValueError("forward needs logit_scale (or build the loss with learn_logit_scale=True)")
    return logit_scale


class ClipLoss(nn.Module):
    """CLIP's symmetric InfoNCE (``functional.clip_loss``).

    ClipLoss(learn_logit_scale=True) owns a logit scale initialised to 1/0.07 and capped at 100 as
    in CLIP; then forward(image_features, text_features). Otherwise forward takes the (already
    exponentiated) logit_scale as its third argument, like open_clip's ClipLoss.
    """

    def __init__(self, *, learn_logit_scale: bool = False, init_logit_scale: float = 1 / 0.07,
                 max_logit_scale: float = 100.0, normalize: bool = True,
                 label_smoothing: float = 0.0, reduction: str = "mean", backend: str = "auto",
                 gather_distributed: bool = False, process_group: Optional[ProcessGroup] = None):
        super().__init__()
        _check_constructor_options(normalize, reduction, backend, gather_distributed, process_group)
        check.check_label_smoothing(label_smoothing)
        self.learnable_logit_scale = _learnable_logit_scale(learn_logit_scale, init_logit_scale,
                                                            max_logit_scale)
        self.normalize, self.label_smoothing = normalize, label_smoothing
        self.reduction, self.backend = reduction, backend
        self.gather_distributed, self.process_group = gather_distributed, process_group

    def forward(self, image_features: Tensor, text_features: Tensor,
                logit_scale: Optional[Scalar] = None) -> Tensor:
        return functional.clip_loss(
            image_features, text_features, _scale_from(self, logit_scale), normalize=self.normalize,
            label_smoothing=self.label_smoothing, reduction=self.reduction, backend=self.backend,
            gather_distributed=self.gather_distributed, process_group=self.process_group)


class SigLipLoss(nn.Module):
    """SigLIP's pairwise sigmoid loss (``functional.siglip_loss``).

    SigLipLoss(learn_logit_scale=True) owns log-space scale and bias initialised as in SigLIP
    (scale 10, bias -10; scale capped at max_logit_scale); then forward(image_features,
    text_features). Otherwise forward takes logit_scale and logit_bias like open_clip's SigLipLoss.
    """

    def __init__(self, *, learn_logit_scale: bool = False, init_logit_scale: float = 10.0,
                 init_logit_bias: float = -10.0, max_logit_scale: float = 100.0,
                 normalize: bool = True, reduction: str = "mean", backend: str = "auto",
                 gather_distributed: bool = False, process_group: Optional[ProcessGroup] = None):
        super().__init__()
        _check_constructor_options(normalize, reduction, backend, gather_distributed, process_group)
        check.check_real("init_logit_bias", init_logit_bias, "a finite float",
                         lambda v: -math.inf < v < math.inf)
        self.learnable_logit_scale = _learnable_logit_scale(learn_logit_scale, init_logit_scale,
                                                            max_logit_scale)
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias))) if learn_logit_scale else None
        self.normalize, self.reduction, self.backend = normalize, reduction, backend
        self.gather_distributed, self.process_group = gather_distributed, process_group

    def forward(self, image_features: Tensor, text_features: Tensor,
                logit_scale: Optional[Scalar] = None, logit_bias: Optional[Scalar] = None) -> Tensor:
        scale = _scale_from(self, logit_scale)
        if self.logit_bias is not None and logit_bias is not None:
            raise ValueError("logit_bias was passed to forward, but this loss learns its own")
        bias = self.logit_bias if self.logit_bias is not None else logit_bias
        if bias is None:
            raise ValueError("forward needs logit_bias (or build the loss with learn_logit_scale=True)")
        return functional.siglip_loss(image_features, text_features, scale, bias,
                                      normalize=self.normalize, reduction=self.reduction,
                                      backend=self.backend,
                                      gather_distributed=self.gather_distributed,
                                      process_group=self.process_group)


class InfoNCELoss(nn.Module):
    """One-way InfoNCE (``functional.info_nce``); forward(query, keys, targets=None).

    temperature: a float, or a 0-d tensor / nn.Parameter to learn it.
    """

    def __init__(self, temperature: Scalar = 0.07, *, label_smoothing: float = 0.0, normalize: bool = True,
                 reduction: str = "mean", backend: str = "auto", gather_distributed: bool = False,
                 process_group: Optional[ProcessGroup] = None):
        super().__init__()
        _check_constructor_options(normalize, reduction, backend, gather_distributed, process_group,
                                   temperature)
        check.check_label_smoothing(label_smoothing)
        self.temperature, self.label_smoothing = temperature, label_smoothing
        self.normalize, self.reduction, self.backend = normalize, reduction, backend
        self.gather_distributed, self.process_group = gather_distributed, process_group

    def forward(self, query: Tensor, keys: Tensor, targets: Optional[Tensor] = None) -> Tensor:
        return functional.info_nce(query, keys, self.temperature, targets=targets,
                                   label_smoothing=self.label_smoothing, normalize=self.normalize,
                                   reduction=self.reduction, backend=self.backend,
                                   gather_distributed=self.gather_distributed,
                                   process_group=self.process_group)


class NTXentLoss(nn.Module):
    """SimCLR's NT-Xent (``functional.nt_xent``); forward(z1, z2) with the two views' embeddings."""

    def __init__(self, temperature: Scalar = 0.5, *, normalize: bool = True, reduction: str = "mean",
                 backend: str = "auto", gather_distributed: bool = False,
                 process_group: Optional[ProcessGroup] = None):
        super().__init__()
        _check_constructor_options(normalize, reduction, backend, gather_distributed, process_group,
                                   temperature)
        self.temperature, self.normalize = temperature, normalize
        self.reduction, self.backend = reduction, backend
        self.gather_distributed, self.process_group = gather_distributed, process_group

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        return functional.nt_xent(z1, z2, self.temperature, normalize=self.normalize,
                                  reduction=self.reduction, backend=self.backend,
                                  gather_distributed=self.gather_distributed,
                                  process_group=self.process_group)


class SupConLoss(nn.Module):
    """Supervised contrastive loss (``functional.supcon_loss``); forward(features, labels)."""

    def __init__(self, temperature: Scalar = 0.1, *, normalize: bool = True, reduction: str = "mean",
                 backend: str = "auto", gather_distributed: bool = False,
                 process_group: Optional[ProcessGroup] = None):
        super().__init__()
        _check_constructor_options(normalize, reduction, backend, gather_distributed, process_group,
                                   temperature)
        self.temperature, self.normalize = temperature, normalize
        self.reduction, self.backend = reduction, backend
        self.gather_distributed, self.process_group = gather_distributed, process_group

    def forward(self, features: Tensor, labels: Tensor) -> Tensor:
        return functional.supcon_loss(features, labels, self.temperature, normalize=self.normalize,
                                      reduction=self.reduction, backend=self.backend,
                                      gather_distributed=self.gather_distributed,
                                      process_group=self.process_group)


class NPairsLoss(nn.Module):
    """Multi-class N-pair loss (``functional.npairs_loss``); forward(anchors, positives)."""

    def __init__(self, *, temperature: Scalar = 1.0, normalize: bool = True, l2_reg: float = 0.0,
                 reduction: str = "mean", backend: str = "auto", gather_distributed: bool = False,
                 process_group: Optional[ProcessGroup] = None):
        super().__init__()
        _check_constructor_options(normalize, reduction, backend, gather_distributed, process_group,
                                   temperature)
        functional.check_l2_reg(l2_reg)
        self.temperature, self.normalize, self.l2_reg = temperature, normalize, l2_reg
        self.reduction, self.backend = reduction, backend
        self.gather_distributed, self.process_group = gather_distributed, process_group

    def forward(self, anchors: Tensor, positives: Tensor) -> Tensor:
        return functional.npairs_loss(anchors, positives, temperature=self.temperature,
                                      normalize=self.normalize, l2_reg=self.l2_reg,
                                      reduction=self.reduction, backend=self.backend,
                                      gather_distributed=self.gather_distributed,
                                      process_group=self.process_group)


class CosineEmbeddingLoss(nn.Module):
    """``functional.cosine_embedding_loss`` as a module; forward(x1, x2, target)."""

    def __init__(self, margin: float = 0.0, reduction: str = "mean"):
        super().__init__()
        functional.check_margin(margin)
        check.check_reduction(reduction)
        self.margin, self.reduction = margin, reduction

    def forward(self, x1: Tensor, x2: Tensor, target: Tensor) -> Tensor:
        return functional.cosine_embedding_loss(x1, x2, target, self.margin, self.reduction)
