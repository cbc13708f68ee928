"""The contrastive losses, each one similarity primitive plus O((N + M) D) PyTorch terms.

Every loss is computed without an N x M matrix: the log-sum-exp (or softplus) statistics come from
``fused_losses.primitives`` on the chosen backend; the positive terms are row dots of normalized
embeddings in the statistics dtype (float32 even for fp16 / bf16 inputs, float64 for float64), and
autograd differentiates them. Losses are returned in that statistics dtype. Every loss here is >= 0
exactly; a value that rounding puts below zero (a log-sum-exp and a positive logit rounded
differently) is returned as 0, with the gradient of the computed loss unchanged.

Common keyword arguments: ``normalize`` (L2-normalize the embeddings first, gradient taken through
the normalization), ``reduction`` ("mean" | "sum" | "none"), ``backend`` ("auto" | "triton" |
"cuda" | "torch"). Temperatures, scales and biases are floats or 0-d tensors; a tensor that
requires grad gets one. The pair-scoring losses also take ``gather_distributed`` and
``process_group``: this rank's rows against the keys of every rank, with the reductions and
gradient semantics described in ``fused_losses.distributed``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fused_losses import _validation as check
from fused_losses import distributed
from fused_losses._typing import ProcessGroup, Scalar
from fused_losses.primitives import (
    DEFAULT_EPS, as_scalar_tensor, lse_statistics, softplus_statistics, statistics_dtype,
)


def check_loss_options(normalize: bool, reduction: str, backend: str, gather_distributed: bool = False,
                       process_group: Optional[ProcessGroup] = None) -> bool:
    """Check the options every pair loss takes; return whether this call gathers over more than
    one rank (then this rank may hold no rows, as long as the global batch has some)."""
    check.check_flag("normalize", normalize)
    check.check_reduction(reduction)
    check.check_backend(backend)
    distributed.check_options(gather_distributed, process_group)
    return distributed.world_size(gather_distributed, process_group) > 1


def check_l2_reg(l2_reg: float) -> None:
    check.check_real("l2_reg", l2_reg, "a finite float >= 0", lambda v: 0 <= v < math.inf)


def check_margin(margin: float) -> None:
    check.check_real("margin", margin, "a float in [-1, 1]", lambda v: -1 <= v <= 1)


def _reduce(per_item: Tensor, reduction: str, world_size: int = 1,
            global_count: Optional[int] = None) -> Tensor:
    """Mean, sum or the items themselves. Over world_size > 1 ranks the mean and sum are scaled so
    that their mean over the ranks is the mean (over ``global_count`` items) or sum of the global
    batch (``fused_losses.distributed``)."""
    if reduction == "none":
        return per_item
    if world_size == 1:
        return per_item.mean() if reduction == "mean" else per_item.sum()
    total = world_size * per_item.sum()
    if reduction == "sum":
        return total
    assert global_count is not None, "a mean over ranks needs the global number of items"
    return total / global_count


def nonnegative(loss: Tensor) -> Tensor:
    """``loss``, exactly >= 0 in exact arithmetic, with what rounding put below zero set to 0. The
    gradient stays that of ``loss`` (the true loss's, which is not 0 there); NaN stays NaN."""
    return torch.where(loss < 0, loss - loss.detach(), loss)


def _embed(x: Tensor, normalize: bool) -> Tensor:
    """x in its statistics dtype, L2-normalized like the primitives when ``normalize``."""
    x = x.to(statistics_dtype(x.dtype))
    return F.normalize(x, dim=1, eps=DEFAULT_EPS) if normalize else x


def inverse_temperature(name: str, temperature: Scalar, like: Tensor) -> Tensor:
    """1 / temperature (argument ``name``) as a 0-d tensor of the statistics dtype of ``like``,
    checked in that dtype (TypeError / ValueError)."""
    dtype = statistics_dtype(like.dtype)
    check.check_positive_scalar(name, temperature, like.device, dtype, reciprocal=True)
    return as_scalar_tensor(temperature, dtype, like.device).reciprocal()


def _scale(name: str, value: Scalar, like: Tensor) -> Tensor:
    """``value`` as a 0-d tensor of the statistics dtype of ``like``, checked there."""
    dtype = statistics_dtype(like.dtype)
    check.check_positive_scalar(name, value, like.device, dtype)
    return as_scalar_tensor(value, dtype, like.device)


def _smoothed_cross_entropy(lse: Tensor, positive: Tensor, u: Tensor, scale: Tensor,
                            label_smoothing: float, key_mean: Callable[[], Tensor]) -> Tensor:
    """Per-row torch cross-entropy semantics: lse_i - (1 - e) S_i,t - e mean_j S_ij, with
    ``key_mean()`` the mean (D,) of the rows' embedded keys (called only when e > 0)."""
    if label_smoothing == 0:
        return nonnegative(lse - positive)
    return nonnegative(lse - (1 - label_smoothing) * positive
                        - label_smoothing * scale * (u @ key_mean()))


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale: Scalar, *, normalize: bool = True,
              label_smoothing: float = 0.0, reduction: str = "mean", backend: str = "auto",
              gather_distributed: bool = False, process_group: Optional[ProcessGroup] = None) -> Tensor:
    """Symmetric InfoNCE of CLIP: 1/2 (cross-entropy over rows + over columns) of
    logit_scale * u @ v.T with pairs on the diagonal.

    image_features, text_features: (N, D). logit_scale: already exponentiated (> 0). On normalized
    inputs with normalize=False this equals open_clip's ClipLoss. reduction="none" gives (N,):
    1/2 (row loss_i + column loss_i). gather_distributed: the loss of the ranks' global batch
    split by rank (the numbers of open_clip's local loss with gradients), computed by scoring
    this rank's images against every rank's texts once (``distributed.symmetric_lse``).
    """
    across_ranks = check_loss_options(normalize, reduction, backend, gather_distributed, process_group)
    check.check_compatible("image_features", image_features, "text_features", text_features,
                           same_rows=True, allow_empty_rows=across_ranks)
    check.check_label_smoothing(label_smoothing)
    scale = _scale("logit_scale", logit_scale, image_features)
    stats = distributed.symmetric_lse(image_features, text_features, scale, normalize=normalize,
                                      gather_distributed=gather_distributed,
                                      process_group=process_group, backend=backend)
    all_texts, pairs = stats.keys.rows, stats.keys.rows.shape[0]
    u, v = _embed(image_features, normalize), _embed(text_features, normalize)
    positive = scale * (u * v).sum(dim=1)
    image_loss = _smoothed_cross_entropy(stats.lse_row, positive, u, scale, label_smoothing,
                                         lambda: _embed(all_texts, normalize).mean(dim=0))
    text_loss = _smoothed_cross_entropy(
        stats.lse_col, positive, v, scale, label_smoothing,
        lambda: distributed.sum_across_ranks(u.sum(dim=0), gather_distributed,
                                             process_group) / pairs)
    return _reduce(0.5 * (image_loss + text_loss), reduction, stats.keys.world_size, pairs)


def _info_nce_per_query(query: Tensor, keys: Tensor, scale: Tensor, targets: Optional[Tensor],
                        label_smoothing: float, normalize: bool, backend: str, gather_distributed: bool,
                        process_group: Optional[ProcessGroup]) -> Tuple[Tensor, int, int]:
    """Per-query losses (N,) against the (gathered) keys, the world size and the global number of
    queries; arguments already checked."""
    gathered = distributed.gather_rows(keys, gather_distributed, process_group)
    lse_row, _ = lse_statistics(query, gathered.rows, scale, rows=True, cols=False,
                                normalize=normalize, backend=backend)
    u = _embed(query, normalize)
    positive_keys = keys[: query.shape[0]] if targets is None else keys[targets]
    positive = scale * (u * _embed(positive_keys, normalize)).sum(dim=1)
    per_query = _smoothed_cross_entropy(lse_row, positive, u, scale, label_smoothing,
                                        lambda: _embed(gathered.rows, normalize).mean(dim=0))
    global_queries = distributed.global_row_count(query, gathered.world_size > 1, process_group)
    return per_query, gathered.world_size, global_queries


def info_nce(query: Tensor, keys: Tensor, temperature: Scalar = 0.07, *, targets: Optional[Tensor] = None,
             label_smoothing: float = 0.0, normalize: bool = True, reduction: str = "mean",
             backend: str = "auto", gather_distributed: bool = False,
             process_group: Optional[ProcessGroup] = None) -> Tensor:
    """One-way InfoNCE: F.cross_entropy(u @ v.T / temperature, targets, label_smoothing, reduction).

    query: (N, D); keys: (M, D), M may exceed N (extra negatives, a queue). targets: (N,) integer
    indices into keys, default arange(N) (then M >= N is required). gather_distributed: this
    rank's queries against every rank's keys; targets still index this rank's keys.
    """
    across_ranks = check_loss_options(normalize, reduction, backend, gather_distributed, process_group)
    check.check_compatible("query", query, "keys", keys, same_rows=False, allow_empty_rows=across_ranks)
    check.check_label_smoothing(label_smoothing)
    n, m = query.shape[0], keys.shape[0]
    if targets is None:
        if m < n:
            raise ValueError(f"keys must have at least as many rows as query when targets is None "
                             f"(the positive of query i is keys[i]), got {m} keys for {n} queries")
    else:
        targets = check.class_indices("targets", targets, n, query.device, num_classes=m)
    scale = inverse_temperature("temperature", temperature, query)
    per_query, world_size, global_queries = _info_nce_per_query(
        query, keys, scale, targets, label_smoothing, normalize, backend, gather_distributed,
        process_group)
    return _reduce(per_query, reduction, world_size, global_queries)


def nt_xent(z1: Tensor, z2: Tensor, temperature: Scalar = 0.5, *, normalize: bool = True,
            reduction: str = "mean", backend: str = "auto", gather_distributed: bool = False,
            process_group: Optional[ProcessGroup] = None) -> Tensor:
    """SimCLR's NT-Xent over the 2N views Z = cat([z1, z2]): each view's positive is its partner,
    its negatives all other 2N - 2 views (self excluded).

    z1, z2: (N, D). reduction="none" gives (2N,) in the order of Z. gather_distributed: this
    rank's 2N views against the views of every rank (pairs never span ranks).
    """
    across_ranks = check_loss_options(normalize, reduction, backend, gather_distributed, process_group)
    check.check_compatible("z1", z1, "z2", z2, same_rows=True, allow_empty_rows=across_ranks)
    scale = inverse_temperature("temperature", temperature, z1)
    views = torch.cat([z1, z2])
    # Gathered rank by rank, every rank's views sit contiguously: self is at the rank's offset.
    all_views = distributed.gather_rows(views, gather_distributed, process_group)
    lse_row, _ = lse_statistics(views, all_views.rows, scale, rows=True, cols=False,
                                normalize=normalize, diag_offset=all_views.offset, backend=backend)
    u = _embed(views, normalize)
    partners = torch.cat([u[z1.shape[0]:], u[: z1.shape[0]]])
    positive = scale * (u * partners).sum(dim=1)
    return _reduce(nonnegative(lse_row - positive), reduction, all_views.world_size, all_views.rows.shape[0])


def _class_sums(u: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-row sum of the u of its class and the class size, with static shapes (no host sync)."""
    sorted_labels, order = labels.sort()
    starts_new_class = torch.ones_like(sorted_labels, dtype=torch.long)
    starts_new_class[1:] = (sorted_labels[1:] != sorted_labels[:-1]).long()
    class_of_sorted = starts_new_class.cumsum(0) - 1
    class_index = torch.empty_like(class_of_sorted).scatter_(0, order, class_of_sorted)
    sums = torch.zeros_like(u).index_add_(0, class_index, u)
    sizes = torch.zeros(u.shape[0], dtype=u.dtype, device=u.device).index_add_(
        0, class_index, torch.ones_like(u[:, 0]))
    return sums[class_index], sizes[class_index]


def supcon_loss(features: Tensor, labels: Tensor, temperature: Scalar = 0.1, *, normalize: bool = True,
                reduction: str = "mean", backend: str = "auto", gather_distributed: bool = False,
                process_group: Optional[ProcessGroup] = None) -> Tensor:
    """Supervised contrastive loss (Khosla et al. 2020; pytorch-metric-learning's SupConLoss):

        loss_i = lse_{a != i} S_ia - mean_{p != i, y_p = y_i} S_ip

    features: (N, D); labels: (N,) integers. Anchors without a positive do not count: "none" gives
    0 for them, "mean" averages over the others (0 when there are none). gather_distributed: this
    rank's anchors against the features and labels of every rank.
    """
    across_ranks = check_loss_options(normalize, reduction, backend, gather_distributed, process_group)
    check.check_embeddings("features", features, allow_empty_rows=across_ranks)
    labels = check.class_indices("labels", labels, features.shape[0], features.device)
    scale = inverse_temperature("temperature", temperature, features)
    gathered = distributed.gather_rows(features, gather_distributed, process_group)
    all_labels = distributed.gather_rows(labels, gather_distributed, process_group,
                                         counts=gathered.row_counts).rows
    lse_row, _ = lse_statistics(features, gathered.rows, scale, rows=True, cols=False,
                                normalize=normalize, diag_offset=gathered.offset, backend=backend)
    all_u = _embed(gathered.rows, normalize)
    class_sum, class_size = _class_sums(all_u, all_labels)
    anchors = slice(gathered.offset, gathered.offset + features.shape[0])
    u = all_u[anchors]
    positives = class_size - 1
    has_positive = positives > 0
    positive_mean = (scale * (u * (class_sum[anchors] - u)).sum(dim=1)
                     / positives[anchors].clamp(min=1))
    per_anchor = torch.where(has_positive[anchors], nonnegative(lse_row - positive_mean),
                             torch.zeros_like(lse_row))
    if reduction == "mean":
        return gathered.world_size * per_anchor.sum() / has_positive.sum().clamp(min=1)
    return _reduce(per_anchor, reduction, gathered.world_size)


def npairs_loss(anchors: Tensor, positives: Tensor, *, temperature: Scalar = 1.0, normalize: bool = True,
                l2_reg: float = 0.0, reduction: str = "mean", backend: str = "auto",
                gather_distributed: bool = False, process_group: Optional[ProcessGroup] = None) -> Tensor:
    """Multi-class N-pair loss (Sohn, NIPS 2016): per anchor, cross-entropy of its similarities to
    all positives with its own as target, plus l2_reg * (|a_i|^2 + |p_i|^2) on the raw embeddings.

    anchors, positives: (N, D). With the defaults this equals pytorch-metric-learning's NPairsLoss
    on cat([anchors, positives]) with labels arange(N) repeated; normalize=False with l2_reg > 0 is
    Sohn's inner-product form. gather_distributed: this rank's anchors against every rank's
    positives.
    """
    check_l2_reg(l2_reg)
    across_ranks = check_loss_options(normalize, reduction, backend, gather_distributed, process_group)
    check.check_compatible("anchors", anchors, "positives", positives, same_rows=True,
                           allow_empty_rows=across_ranks)
    scale = inverse_temperature("temperature", temperature, anchors)
    per_anchor, world_size, global_anchors = _info_nce_per_query(
        anchors, positives, scale, None, 0.0, normalize, backend, gather_distributed, process_group)
    if l2_reg > 0:
        squared_norms = (_embed(anchors, False).square().sum(dim=1)
                         + _embed(positives, False).square().sum(dim=1))
        per_anchor = per_anchor + l2_reg * squared_norms
    return _reduce(per_anchor, reduction, world_size, global_anchors)


def siglip_loss(image_features: Tensor, text_features: Tensor, logit_scale: Scalar, logit_bias: Scalar, *,
                normalize: bool = True, reduction: str = "mean", backend: str = "auto",
                gather_distributed: bool = False, process_group: Optional[ProcessGroup] = None) -> Tensor:
    """SigLIP's pairwise sigmoid loss: sum_ij -logsigmoid(l_ij (scale u_i . v_j + bias)) with
    l_ii = 1 and l_ij = -1 otherwise, divided by N for "mean" (open_clip's SigLipLoss).

    image_features, text_features: (N, D). reduction="none" gives the (N,) row sums.
    gather_distributed: this rank's images against every rank's texts (open_clip's SigLipLoss
    exchanges the texts between neighbours to the same effect).
    """
    across_ranks = check_loss_options(normalize, reduction, backend, gather_distributed, process_group)
    check.check_compatible("image_features", image_features, "text_features", text_features,
                           same_rows=True, allow_empty_rows=across_ranks)
    scale = _scale("logit_scale", logit_scale, image_features)
    check.check_finite_scalar("logit_bias", logit_bias, image_features.device, scale.dtype)
    bias = as_scalar_tensor(logit_bias, scale.dtype, image_features.device)
    all_texts = distributed.gather_rows(text_features, gather_distributed, process_group)
    softplus_row = softplus_statistics(image_features, all_texts.rows, scale, bias,
                                       normalize=normalize, backend=backend)
    u, v = _embed(image_features, normalize), _embed(text_features, normalize)
    # -logsigmoid(z) = softplus(-z) = softplus(z) - z: the positive pair's softplus is in the sum.
    per_row = nonnegative(softplus_row - (scale * (u * v).sum(dim=1) + bias))
    return _reduce(per_row, reduction, all_texts.world_size, all_texts.rows.shape[0])


def _one_pair_as_batch(x1: Any, x2: Any, target: Any) -> Tuple[Any, Any, Any]:
    """A single pair x1 (D,), x2 (D,), target 0-d (or (1,)) as a batch of one; anything else as
    given, for the checks."""
    if not (isinstance(x1, Tensor) and x1.dim() == 1):
        return x1, x2, target
    if not (isinstance(x2, Tensor) and x2.dim() == 1):
        raise ValueError(f"x1 and x2 must both be (N, D) or both (D,) (one pair), got x1 of shape "
                         f"{tuple(x1.shape)} and x2 {check.describe(x2)}")
    if isinstance(target, Tensor) and target.numel() == 1 and target.dim() <= 1:
        target = target.reshape(1)
    return x1[None], x2[None], target


def _check_signs(target: Any, rows: int, device: torch.device) -> None:
    """``target``: a real tensor of shape (rows,) on ``device`` holding only 1 and -1."""
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a tensor of shape ({rows},) holding 1 or -1, got "
                        f"{check.describe(target)}")
    check.check_dense("target", target)
    if target.dtype.is_complex:
        raise TypeError(f"target must be a real tensor holding 1 or -1, got {target.dtype}")
    if tuple(target.shape) != (rows,):
        raise ValueError(f"target must be a tensor of shape ({rows},) holding 1 or -1, got shape "
                         f"{tuple(target.shape)}")
    if target.device != device:
        raise ValueError(f"target must be on {device} like x1, got {target.device}")
    if not torch.compiler.is_compiling() and not bool(((target == 1) | (target == -1)).all()):
        raise ValueError(f"target must hold only 1 or -1, got values {target.unique().tolist()}")


def cosine_embedding_loss(x1: Tensor, x2: Tensor, target: Tensor, margin: float = 0.0,
                          reduction: str = "mean") -> Tensor:
    """torch.nn.functional.cosine_embedding_loss in one pass over the rows (no N x N):
    1 - cos(x1_i, x2_i) where target_i = 1, max(0, cos - margin) where target_i = -1.

    x1, x2: (N, D), target (N,); or one pair: x1, x2 (D,), target 0-d.
    """
    single = isinstance(x1, Tensor) and x1.dim() == 1
    x1, x2, target = _one_pair_as_batch(x1, x2, target)
    check.check_compatible("x1", x1, "x2", x2, same_rows=True)
    check.check_reduction(reduction)
    check_margin(margin)
    _check_signs(target, x1.shape[0], x1.device)
    a, b = _embed(x1, False), _embed(x2, False)
    cosine = (a * b).sum(dim=1) / ((a.square().sum(dim=1) + 1e-12) * (b.square().sum(dim=1) + 1e-12)).sqrt()
    per_pair = torch.where(target == 1, nonnegative(1 - cosine), (cosine - margin).clamp(min=0))
    if single and reduction == "none":
        return per_pair[0]
    return _reduce(per_pair, reduction)
