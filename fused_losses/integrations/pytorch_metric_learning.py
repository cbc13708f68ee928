"""pytorch-metric-learning's NTXentLoss, SupConLoss and NPairsLoss (2.x), fused.

    from fused_losses.integrations.pytorch_metric_learning import NTXentLoss, SupConLoss, NPairsLoss

``forward(embeddings, labels)`` as in pytorch-metric-learning, with its default distance (cosine
similarity; NPairsLoss: dot product of normalized embeddings) and default reducer, and the same
values. Embeddings with equal labels are positives of each other. Miners (``indices_tuple``) and
reference embeddings (``ref_emb``, ``ref_labels``) are not supported: these losses score all pairs.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from fused_losses import _validation as check
from fused_losses import functional
from fused_losses._typing import Scalar


def _check_forward(embeddings: Tensor, labels: Tensor, indices_tuple: object, ref_emb: object,
                   ref_labels: object) -> None:
    unsupported = {"indices_tuple": indices_tuple, "ref_emb": ref_emb, "ref_labels": ref_labels}
    for name, value in unsupported.items():
        if value is not None:
            raise ValueError(f"{name} is not supported by the fused losses, which score every pair "
                             f"of the batch; got {type(value).__name__}, pass None")
    check.check_embeddings("embeddings", embeddings)
    check.check_class_indices("labels", labels, embeddings.shape[0], embeddings.device)


def _first_two_of_each_label(labels: Tensor) -> Tuple[Tensor, Tensor]:
    """Indices (first, second) of the first two occurrences of every label occurring at least
    twice, ordered by label value (pytorch-metric-learning's unique positive pairs)."""
    sorted_labels, order = labels.sort(stable=True)
    starts_group = torch.ones_like(sorted_labels, dtype=torch.bool)
    starts_group[1:] = sorted_labels[1:] != sorted_labels[:-1]
    has_second = torch.zeros_like(starts_group)
    has_second[:-1] = sorted_labels[1:] == sorted_labels[:-1]
    first_positions = torch.nonzero(starts_group & has_second).squeeze(1)
    return order[first_positions], order[first_positions + 1]


def _zero_loss(embeddings: Tensor) -> Tensor:
    """pytorch-metric-learning's loss of a batch without any pair to score: 0, differentiable."""
    return (embeddings * 0).sum()


class NTXentLoss(nn.Module):
    """pytorch_metric_learning.losses.NTXentLoss (SimCLR's NT-Xent), fused.

    Every label must occur exactly twice: the two views of one sample (``functional.nt_xent``).
    """

    def __init__(self, temperature: Scalar = 0.07, *, backend: str = "auto"):
        super().__init__()
        self.temperature, self.backend = temperature, backend

    def forward(self, embeddings: Tensor, labels: Tensor, indices_tuple: Optional[Tuple[Tensor, ...]] = None,
                ref_emb: Optional[Tensor] = None, ref_labels: Optional[Tensor] = None) -> Tensor:
        _check_forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        values, counts = labels.unique(return_counts=True)
        if not bool((counts == 2).all()):
            odd = counts != 2
            raise ValueError(f"labels must hold every label exactly twice (two views per sample) "
                             f"for NTXentLoss, got labels {values[odd][:5].tolist()} occurring "
                             f"{counts[odd][:5].tolist()} times; SupConLoss takes any labels")
        first, second = _first_two_of_each_label(labels)
        return functional.nt_xent(embeddings[first], embeddings[second], self.temperature,
                                  backend=self.backend)


class SupConLoss(nn.Module):
    """pytorch_metric_learning.losses.SupConLoss, fused (``functional.supcon_loss``); any labels.

    As in pytorch-metric-learning the mean runs over the anchors that have a positive, and a batch
    without any negative pair (a single label) has loss 0.
    """

    def __init__(self, temperature: Scalar = 0.1, *, backend: str = "auto"):
        super().__init__()
        self.temperature, self.backend = temperature, backend

    def forward(self, embeddings: Tensor, labels: Tensor, indices_tuple: Optional[Tuple[Tensor, ...]] = None,
                ref_emb: Optional[Tensor] = None, ref_labels: Optional[Tensor] = None) -> Tensor:
        _check_forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        loss = functional.supcon_loss(embeddings, labels, self.temperature, backend=self.backend)
        has_negative = (labels != labels[0]).any()
        return torch.where(has_negative, loss, torch.zeros_like(loss))


class NPairsLoss(nn.Module):
    """pytorch_metric_learning.losses.NPairsLoss, fused (``functional.npairs_loss``); any labels.

    As in pytorch-metric-learning, each label occurring at least twice contributes one pair: its
    first occurrence is the anchor, its second the positive; other embeddings are not used.
    """

    def __init__(self, *, backend: str = "auto"):
        super().__init__()
        self.backend = backend

    def forward(self, embeddings: Tensor, labels: Tensor, indices_tuple: Optional[Tuple[Tensor, ...]] = None,
                ref_emb: Optional[Tensor] = None, ref_labels: Optional[Tensor] = None) -> Tensor:
        _check_forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        anchors, positives = _first_two_of_each_label(labels)
        if anchors.numel() == 0:
            return _zero_loss(embeddings)
        return functional.npairs_loss(embeddings[anchors], embeddings[positives],
                                      backend=self.backend)
