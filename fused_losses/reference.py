"""Textbook ground truth for every fused_losses loss.

Each function materializes the full logit matrix and applies the plain torch.nn.functional ops
(cross_entropy, log_softmax, logsigmoid) in the dtype it is given: feed float64 for ground truth.
Memory is O(N * M), so use it for tests and benchmarks only. It deliberately shares no code with
the fast paths, so that a mistake in the primitives cannot hide in both.

Shapes: N anchors / queries, M keys, D features. ``temperature``, ``logit_scale`` and
``logit_bias`` may be a float or a 0-d tensor (the gradient flows to a tensor). With
``normalize=True`` every embedding is divided by max(|x|, 1e-12) first (``F.normalize``).
``reduction`` is "mean", "sum" or "none".
"""

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

# A float or a 0-d tensor (written out: this module imports nothing from the package).
Scalar = Union[float, Tensor]


def _embed(x: Tensor, normalize: bool) -> Tensor:
    """x (rows, D) as used in the similarities: unit rows if ``normalize``, else as given."""
    return F.normalize(x, dim=-1, eps=1e-12) if normalize else x


def _reduce(per_item: Tensor, reduction: str) -> Tensor:
    """Reduce per-item losses (K,) to their mean or sum, or return them unchanged for "none"."""
    if reduction == "mean":
        return per_item.mean()
    if reduction == "sum":
        return per_item.sum()
    if reduction == "none":
        return per_item
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _self_mask(n: int, device: torch.device) -> Tensor:
    """(n, n) bool, True on the diagonal: the pairs of an embedding with itself."""
    return torch.eye(n, dtype=torch.bool, device=device)


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale: Scalar, *, normalize: bool = True,
              label_smoothing: float = 0.0, reduction: str = "mean") -> Tensor:
    """Symmetric InfoNCE of CLIP.

    image_features, text_features: (N, D), pair i matches pair i. logit_scale: already
    exponentiated. logits = logit_scale * u @ v.T; the loss of pair i is 1/2 (cross entropy of
    row i + cross entropy of column i), both with target i and ``label_smoothing`` (torch
    semantics). "none" -> (N,); "mean" -> their mean (open_clip's ClipLoss); "sum" -> their sum.
    """
    logits = logit_scale * _embed(image_features, normalize) @ _embed(text_features, normalize).T
    targets = torch.arange(len(logits), device=logits.device)
    per_image = F.cross_entropy(logits, targets, label_smoothing=label_smoothing, reduction="none")
    per_text = F.cross_entropy(logits.T, targets, label_smoothing=label_smoothing, reduction="none")
    return _reduce((per_image + per_text) / 2, reduction)


def info_nce(query: Tensor, keys: Tensor, temperature: Scalar = 0.07, *, targets: Optional[Tensor] = None,
             label_smoothing: float = 0.0, normalize: bool = True, reduction: str = "mean") -> Tensor:
    """One-way InfoNCE: cross entropy of the rows of u @ v.T / temperature.

    query: (N, D); keys: (M, D) with M >= N allowed (extra negatives); targets: (N,) key index of
    each query's positive, default arange(N). Torch cross-entropy semantics for
    ``label_smoothing`` and ``reduction`` ("none" -> (N,)).
    """
    logits = _embed(query, normalize) @ _embed(keys, normalize).T / temperature
    if targets is None:
        targets = torch.arange(len(logits), device=logits.device)
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing, reduction=reduction)


def nt_xent(z1: Tensor, z2: Tensor, temperature: Scalar = 0.5, *, normalize: bool = True,
            reduction: str = "mean") -> Tensor:
    """SimCLR's NT-Xent over the 2N views Z = cat([z1, z2]).

    z1, z2: (N, D), two views of the same N samples. With S = u @ u.T / temperature over Z, view
    i's loss is -log(exp(S[i, pos]) / sum_{j != i} exp(S[i, j])), pos its other view (i +- N).
    "none" -> (2N,) in the order of Z; "mean" / "sum" over the 2N views.
    """
    n = len(z1)
    views = _embed(torch.cat([z1, z2]), normalize)
    logits = (views @ views.T / temperature).masked_fill(_self_mask(2 * n, views.device), float("-inf"))
    other_view = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(views.device)
    return _reduce(F.cross_entropy(logits, other_view, reduction="none"), reduction)


def supcon_loss(features: Tensor, labels: Tensor, temperature: Scalar = 0.1, *, normalize: bool = True,
                reduction: str = "mean") -> Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, pytorch-metric-learning's SupConLoss).

    features: (N, D); labels: (N,) integer classes. With S = u @ u.T / temperature and
    P(i) = {p != i : labels[p] == labels[i]}, anchor i's loss is
    -(1/|P(i)|) sum_{p in P(i)} log(exp(S[i, p]) / sum_{a != i} exp(S[i, a])).
    Anchors without a positive do not count: "none" -> (N,) with 0 for them; "mean" -> mean over
    the anchors that have a positive (0.0, still differentiable, when none has); "sum" -> sum.
    """
    u = _embed(features, normalize)
    self_mask = _self_mask(len(u), u.device)
    log_prob = (u @ u.T / temperature).masked_fill(self_mask, float("-inf")).log_softmax(dim=1)
    positive_mask = (labels[:, None] == labels[None, :]) & ~self_mask
    positive_count = positive_mask.sum(dim=1)
    # where() rather than a product: the -inf of the diagonal must not reach the sum or its gradient.
    positive_nll_sum = torch.where(positive_mask, -log_prob, 0.0).sum(dim=1)
    per_anchor = positive_nll_sum / positive_count.clamp(min=1)
    if reduction == "mean":
        return per_anchor.sum() / (positive_count > 0).sum().clamp(min=1)
    return _reduce(per_anchor, reduction)


def npairs_loss(anchors: Tensor, positives: Tensor, *, temperature: Scalar = 1.0, normalize: bool = True,
                l2_reg: float = 0.0, reduction: str = "mean") -> Tensor:
    """Multi-class N-pair loss (Sohn 2016).

    anchors, positives: (N, D), anchor i matches positive i. Anchor i's loss is the cross entropy
    of the row (u_i . v_j / temperature)_j with target i, plus l2_reg * (|a_i|^2 + |p_i|^2) on the
    raw embeddings. "none" -> (N,); "mean" / "sum" over the anchors. The defaults equal
    pytorch-metric-learning's NPairsLoss(); normalize=False with l2_reg > 0 is Sohn's form.
    """
    logits = _embed(anchors, normalize) @ _embed(positives, normalize).T / temperature
    targets = torch.arange(len(logits), device=logits.device)
    squared_norms = anchors.pow(2).sum(dim=-1) + positives.pow(2).sum(dim=-1)
    return _reduce(F.cross_entropy(logits, targets, reduction="none") + l2_reg * squared_norms, reduction)


def siglip_loss(image_features: Tensor, text_features: Tensor, logit_scale: Scalar, logit_bias: Scalar, *,
                normalize: bool = True, reduction: str = "mean") -> Tensor:
    """Sigmoid loss of SigLIP (Zhai et al. 2023).

    image_features, text_features: (N, D), pair i matches pair i. logits = logit_scale * u @ v.T +
    logit_bias; each of the N * N pairs costs -logsigmoid(+logit) if it matches, else
    -logsigmoid(-logit). "none" -> (N,) sums over each image's row; "mean" -> total / N
    (open_clip's SigLipLoss); "sum" -> total.
    """
    u, v = _embed(image_features, normalize), _embed(text_features, normalize)
    logits = logit_scale * u @ v.T + logit_bias
    signs = 2 * torch.eye(len(logits), dtype=logits.dtype, device=logits.device) - 1
    return _reduce(-F.logsigmoid(signs * logits).sum(dim=1), reduction)


def cosine_embedding_loss(x1: Tensor, x2: Tensor, target: Tensor, margin: float = 0.0,
                          reduction: str = "mean") -> Tensor:
    """torch.nn.CosineEmbeddingLoss written out.

    x1, x2: (N, D); target: (N,) of +1 / -1. With
    cos = x1 . x2 / sqrt((|x1|^2 + 1e-12) (|x2|^2 + 1e-12)), pair i costs 1 - cos for target 1 and
    max(0, cos - margin) for target -1. "none" -> (N,); "mean" / "sum" over the pairs.
    """
    eps = 1e-12
    squared_norms_product = (x1.pow(2).sum(dim=-1) + eps) * (x2.pow(2).sum(dim=-1) + eps)
    cos = (x1 * x2).sum(dim=-1) / squared_norms_product.sqrt()
    return _reduce(torch.where(target == 1, 1 - cos, (cos - margin).clamp(min=0)), reduction)
