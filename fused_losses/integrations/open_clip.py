"""open_clip's ClipLoss and SigLipLoss (open_clip/loss.py, open_clip_torch 3.x), fused.

    from fused_losses.integrations.open_clip import ClipLoss, SigLipLoss

Same constructors, ``forward(image_features, text_features, logit_scale, logit_bias, output_dict)``
and values, distributed included. Like open_clip, the features are used as given (normalize them
in the model) and ``logit_scale`` is already exponentiated. Gathering goes through
torch.distributed (``rank`` and ``world_size`` must match its default group). Unlike open_clip,
ranks may hold different batch sizes. ClipLoss with ``use_horovod=True`` and ``world_size > 1``
(gathering through horovod) is computed by open_clip's own ClipLoss, after a ``FallbackWarning``
(with ``world_size=1`` the option has no effect, in open_clip as here). Importing this module does
not import open_clip.
"""

from __future__ import annotations

from typing import Dict, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fused_losses import _validation as check
from fused_losses import distributed, functional
from fused_losses._typing import Scalar
from fused_losses.integrations._fallback import original_class, warn_fallback


def _check_world(rank: int, world_size: int) -> None:
    """``rank`` / ``world_size`` as given to open_clip's losses must be torch.distributed's."""
    initialized = dist.is_available() and dist.is_initialized()
    if not initialized or (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
        actual = (f"rank {dist.get_rank()} of world_size {dist.get_world_size()}" if initialized
                  else "torch.distributed not initialized")
        raise ValueError(f"rank={rank} and world_size={world_size} must match the default "
                         f"torch.distributed process group, got {actual}")


_HOROVOD = "use_horovod=True with world_size > 1"


def _check_options(flags: Dict[str, object], rank: int, world_size: int, backend: str) -> None:
    """Constructor options: ``flags`` bools, rank in [0, world_size), a known backend."""
    for name, value in flags.items():
        check.check_flag(name, value)
    for name, value, low in (("world_size", world_size, 1), ("rank", rank, 0)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {check.describe(value)}")
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if rank >= world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    check.check_backend(backend)


def _as_output(loss: Tensor, output_dict: bool) -> Union[Tensor, Dict[str, Tensor]]:
    return {"contrastive_loss": loss} if output_dict else loss


class ClipLoss(nn.Module):
    """open_clip.loss.ClipLoss: CLIP's symmetric cross-entropy, fused.

    With world_size > 1, as in open_clip:
      gather_with_grad=True: the fused distributed loss (``functional.clip_loss`` with
        gather_distributed: one N_local x N_global similarity pass per rank, texts gathered;
        fused_losses.distributed states the gradient semantics); with local_loss=False its mean
        over the ranks (one scalar all-reduce), which is the global batch's loss that open_clip
        computes whole on every rank. open_clip's loss and feature gradients on every rank; a
        tensor logit_scale's gradients split differently between the ranks, with the same sum
        (what DDP averages).
      local_loss=True, gather_with_grad=False: this rank's rows against gathered copies that
        carry no gradient (this rank's own copy included), so each feature gets the gradient of
        its own row only.
      local_loss=False, gather_with_grad=False: the loss of the whole global batch on every rank;
        only this rank's own rows carry gradients.
    cache_labels has nothing to cache here. logit_bias shifts every logit of a row by the same
    amount, which cross-entropy ignores: it is accepted and has no effect (as in open_clip).
    use_horovod with world_size > 1: open_clip's ClipLoss computes the loss (see the module).
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False,
                 cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 use_horovod: bool = False, *, backend: str = "auto"):
        super().__init__()
        _check_options(dict(local_loss=local_loss, gather_with_grad=gather_with_grad,
                            cache_labels=cache_labels, use_horovod=use_horovod),
                       rank, world_size, backend)
        self.local_loss, self.gather_with_grad = local_loss, gather_with_grad
        self.cache_labels = cache_labels
        self.rank, self.world_size, self.use_horovod = rank, world_size, use_horovod
        self.backend = backend
        self._original = None
        if use_horovod and world_size > 1:
            original = original_class("open_clip.loss", "ClipLoss", _HOROVOD)
            self._original = original(local_loss, gather_with_grad, cache_labels, rank, world_size,
                                      use_horovod)

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Scalar,
                logit_bias: Optional[Tensor] = None,
                output_dict: bool = False) -> Union[Tensor, Dict[str, Tensor]]:
        if self._original is not None:
            warn_fallback(self, _HOROVOD, "open_clip.loss.ClipLoss")
            return self._original(image_features, text_features, logit_scale, logit_bias, output_dict)
        loss = self._contrastive_loss(image_features, text_features, logit_scale)
        return _as_output(loss, output_dict)

    def _contrastive_loss(self, image_features: Tensor, text_features: Tensor, logit_scale: Scalar) -> Tensor:
        if self.world_size == 1:
            return functional.clip_loss(image_features, text_features, logit_scale,
                                        normalize=False, backend=self.backend)
        _check_world(self.rank, self.world_size)
        if self.gather_with_grad:
            local_share = functional.clip_loss(image_features, text_features, logit_scale,
                                               normalize=False, backend=self.backend,
                                               gather_distributed=True)
            if self.local_loss:
                return local_share
            # The global loss is the mean of the ranks' shares; through the all-reduce every
            # feature gets the gradient summed over the ranks, as open_clip's gathering gives it.
            return distributed.sum_across_ranks(local_share) / self.world_size
        pairs = torch.cat([image_features, text_features], dim=1)
        gathered = distributed.gather_rows(pairs.detach())
        rows, offset = gathered.rows, gathered.offset
        if self.local_loss:
            if 0 in gathered.row_counts:  # every rank sees the counts: all raise alike
                raise ValueError(f"local_loss=True with gather_with_grad=False averages each rank's "
                                 f"own rows, so every rank needs one; got row counts "
                                 f"{gathered.row_counts}")
            all_images, all_texts = rows.split(image_features.shape[1], dim=1)
            targets = torch.arange(offset, offset + pairs.shape[0], device=pairs.device)
            temperature = 1 / logit_scale
            return 0.5 * (
                functional.info_nce(image_features, all_texts, temperature, targets=targets,
                                    normalize=False, backend=self.backend)
                + functional.info_nce(text_features, all_images, temperature, targets=targets,
                                      normalize=False, backend=self.backend))
        rows = torch.cat([rows[:offset], pairs, rows[offset + pairs.shape[0]:]])
        all_images, all_texts = rows.split(image_features.shape[1], dim=1)
        return functional.clip_loss(all_images, all_texts, logit_scale, normalize=False,
                                    backend=self.backend)


class SigLipLoss(nn.Module):
    """open_clip.loss.SigLipLoss: SigLIP's pairwise sigmoid loss, fused.

    With world_size > 1 every dist_impl ('bidir', 'shift', 'reduce', 'gather') gives the same
    numbers in open_clip; here the texts of all ranks are gathered once (with gradients) and this
    rank's images are scored against them. cache_labels has nothing to cache here.
    """

    DIST_IMPLS = ("bidir", "shift", "reduce", "gather")

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 dist_impl: Optional[str] = None, *, backend: str = "auto"):
        super().__init__()
        _check_options(dict(cache_labels=cache_labels), rank, world_size, backend)
        dist_impl = dist_impl or "bidir"
        if dist_impl not in self.DIST_IMPLS:
            raise ValueError(f"dist_impl must be None or one of {self.DIST_IMPLS}, "
                             f"got {dist_impl!r}")
        self.cache_labels, self.rank, self.world_size = cache_labels, rank, world_size
        self.dist_impl, self.backend = dist_impl, backend

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Scalar,
                logit_bias: Optional[Scalar], output_dict: bool = False) -> Union[Tensor, Dict[str, Tensor]]:
        if self.world_size > 1:
            _check_world(self.rank, self.world_size)
        loss = functional.siglip_loss(
            image_features, text_features, logit_scale, 0.0 if logit_bias is None else logit_bias,
            normalize=False, backend=self.backend, gather_distributed=self.world_size > 1)
        return _as_output(loss, output_dict)
