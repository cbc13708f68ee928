"""pytorch-metric-learning's NTXentLoss, SupConLoss and NPairsLoss (2.x), fused.

    from fused_losses.integrations.pytorch_metric_learning import NTXentLoss, SupConLoss, NPairsLoss

Subclasses of pytorch-metric-learning's classes (same names, so its wrappers accept them), with
their constructors (plus ``backend``), ``forward(embeddings, labels=None, indices_tuple=None,
ref_emb=None, ref_labels=None)``, reducers, embedding regularizers and records. Only the scoring
(``compute_loss``) is replaced: it hands the reducer the per-pair or per-anchor losses
pytorch-metric-learning computes, without its N x M distance matrix. Importing this module imports
pytorch_metric_learning.

Fused: any labels (several positives per anchor); ``ref_emb`` with ``ref_labels`` (as
CrossBatchMemory and SelfSupervisedLoss pass them); distances CosineSimilarity (the default),
DotProductSimilarity and LpDistance(power=2), normalizing or not (a squared L2 distance is an affine
function of the dot product up to a per-anchor constant, which these losses cancel); every reducer
and embedding regularizer; an ``indices_tuple`` whose negative pairs are all pairs of different
labels (what CrossBatchMemory passes without a miner), and for NPairsLoss any ``indices_tuple``.
Computed by pytorch-metric-learning's own class instead (its exact numbers), after a
``FallbackWarning`` naming the option, once per loss object: other distances or distance settings,
an ``indices_tuple`` from a miner, no labels, ``ref_emb`` without ``ref_labels``, non-integer
labels, a temperature that is not a positive number.
"""

from __future__ import annotations

import math
from typing import Any, Dict, NamedTuple, Optional, Tuple, Type, Union

import torch
import torch.nn.functional as F
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu
from torch import Tensor

from fused_losses import _validation as check
from fused_losses.functional import _embed, inverse_temperature, nonnegative
from fused_losses.integrations._fallback import warn_fallback
from fused_losses.integrations._pair_scoring import (
    ClassIds, pair_dots, row_logsumexp, unique_pairs,
)
from fused_losses.primitives import lse_statistics, statistics_dtype

# A reason a call is not fused: the option responsible, as the fallback warning names it.
Reason = str
# What pytorch-metric-learning's compute_loss returns: {"loss": {"losses", "indices",
# "reduction_type"}}.
LossDict = Dict[str, Dict[str, Any]]
# A miner's (anchors, positives, negatives) or (anchors, positives, anchors', negatives) indices.
IndicesTuple = Tuple[Tensor, ...]


class _FusedDistance(NamedTuple):
    """A pytorch-metric-learning distance as the fused similarity S = scale * u . v, where
    -distance (or the similarity) = S + a constant per query row.

    LpDistance(power=2): -|x - y|^2 = 2 x . y - |x|^2 - |y|^2; normalized, |x| = |y| = 1; else the
    reference rows carry -|y|^2 / 2 in an extra column (the queries a 1) and normalize=False.
    """

    normalize: bool
    scale_factor: float
    squared_norm_column: bool

    def query_operand(self, x: Tensor) -> Tensor:
        return torch.cat([x, x.new_ones(x.shape[0], 1)], 1) if self.squared_norm_column else x

    def reference_operand(self, y: Tensor) -> Tensor:
        if not self.squared_norm_column:
            return y
        return torch.cat([y, -0.5 * y.square().sum(dim=1, keepdim=True)], 1)


def _fused_distance(distance: pml_distances.BaseDistance) -> Union[_FusedDistance, Reason]:
    kind = type(distance)
    described = (f"distance={kind.__name__}(normalize_embeddings={distance.normalize_embeddings}, "
                 f"p={distance.p}, power={distance.power})")
    l2 = distance.p == 2
    if kind in (pml_distances.CosineSimilarity, pml_distances.DotProductSimilarity):
        if distance.power == 1 and (l2 or not distance.normalize_embeddings):
            return _FusedDistance(distance.normalize_embeddings, 1.0, False)
    elif kind is pml_distances.LpDistance and l2 and distance.power == 2:
        return _FusedDistance(distance.normalize_embeddings, 2.0, not distance.normalize_embeddings)
    return described


def _inverse_temperature(temperature: Any, like: Tensor) -> Union[Tensor, Reason]:
    """1 / temperature as a 0-d statistics tensor (differentiable if the temperature is), or the
    reason there is none: not a number > 0 that the loss's dtype can hold."""
    try:
        return inverse_temperature("temperature", temperature, like)
    except (TypeError, ValueError):
        return f"temperature={temperature!r}"


def _record_distance_stats(distance: pml_distances.BaseDistance, query: Tensor,
                           reference: Tensor) -> None:
    """The statistics the distance records when it computes a matrix (with collect_stats)."""
    if distance.collect_stats:
        distance.reset_stats()
        distance.set_default_stats(query, reference, distance.maybe_normalize(query),
                                   distance.maybe_normalize(reference))


class _Scorer:
    """The fused similarities of one call: S_ij = scale * u_i . v_j for rows (N) against
    references (M), through the primitive or for listed pairs."""

    def __init__(self, distance: _FusedDistance, inverse_temperature: Tensor, rows: Tensor,
                 references: Tensor, backend: str) -> None:
        self.q, self.k = distance.query_operand(rows), distance.reference_operand(references)
        self.normalize, self.backend = distance.normalize, backend
        self.scale = distance.scale_factor * inverse_temperature
        self.u, self.v = _embed(self.q, self.normalize), _embed(self.k, self.normalize)

    def row_lse(self, **mask: Any) -> Tensor:
        """(N,) log sum_j exp(S_ij) over the entries ``mask`` (lse_statistics' masks) keeps."""
        lse_row, _ = lse_statistics(self.q, self.k, self.scale, rows=True, cols=False,
                                    normalize=self.normalize, backend=self.backend, **mask)
        return lse_row

    def pair_scores(self, rows: Tensor, refs: Tensor) -> Tensor:
        """(P,) S at the pairs (rows[p], refs[p])."""
        return self.scale * pair_dots(self.u, self.v, rows, refs)


class _PairCall(NamedTuple):
    """A GenericPairLoss call in fused form: classes of rows and references, whether (i, i) is
    excluded (rows are their own references), the pair counts, and the positive pairs when given
    by an indices_tuple (None: all same-label pairs)."""

    scorer: _Scorer
    classes: ClassIds
    exclude_self: bool
    positive_count: int
    negative_count: int
    positive_pairs: Optional[Tuple[Tensor, Tensor]]

    def has_no_loss(self) -> bool:
        """pytorch-metric-learning's zero-loss cases: no pair of one kind, or at most one of each."""
        return (self.positive_count == 0 or self.negative_count == 0
                or (self.positive_count <= 1 and self.negative_count <= 1))

    def negative_lse(self) -> Tensor:
        """(N,) log-sum-exp of each row over its negatives (-inf for a row without any)."""
        return self.scorer.row_lse(row_labels=self.classes.rows, col_labels=self.classes.refs,
                                   same_label="exclude")


def _class_ids(labels: Optional[Tensor], ref_labels: Optional[Tensor]) -> Union[ClassIds, Reason]:
    """The labels as class indices, or why they are not fused: missing, or not integers."""
    if labels is None or ref_labels is None:
        return "labels=None" if labels is None else "ref_labels=None"
    for name, value in (("labels", labels), ("ref_labels", ref_labels)):
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            return f"{name} of dtype {value.dtype}"
    return ClassIds.of(labels, ref_labels)


def _pair_call(loss: _FusedPairLoss, embeddings: Tensor, labels: Optional[Tensor],
               indices_tuple: Optional[IndicesTuple], ref_emb: Tensor, ref_labels: Optional[Tensor],
               same_label_positives: bool) -> Union[_PairCall, Reason]:
    """The fused form of a GenericPairLoss call (NTXentLoss, SupConLoss), or why there is none.
    ``same_label_positives``: the loss needs given positive pairs to have equal labels (else
    pytorch-metric-learning raises, and should)."""
    distance = _fused_distance(loss.distance)
    if isinstance(distance, Reason):
        return distance
    inverse_temperature = _inverse_temperature(loss.temperature, embeddings)
    if isinstance(inverse_temperature, Reason):
        return inverse_temperature
    if ref_emb is not embeddings and ref_labels is None:
        return "ref_emb without ref_labels"
    classes = _class_ids(labels, ref_labels)
    if isinstance(classes, Reason):
        return classes
    exclude_self = ref_labels is labels  # as pytorch-metric-learning decides it
    positive_count, negative_count = classes.pair_counts(exclude_self)
    positive_pairs = None
    if indices_tuple is not None:
        rows, refs, negative_rows, negative_refs = lmu.convert_to_pairs(indices_tuple, labels, ref_labels)
        if not classes.are_all_negative_pairs(negative_rows, negative_refs):
            return "indices_tuple whose negative pairs are not all pairs of different labels (a miner's)"
        if same_label_positives and not bool((classes.rows[rows] == classes.refs[refs]).all()):
            return "indices_tuple with a positive pair of different labels"
        positive_pairs, positive_count = (rows, refs), rows.numel()
    scorer = _Scorer(distance, inverse_temperature, embeddings, ref_emb, loss.backend)
    return _PairCall(scorer, classes, exclude_self, positive_count, negative_count, positive_pairs)


class _Fused(pml_losses.BaseMetricLossFunction):
    """Shared by the three losses: the ``backend`` keyword (the other arguments are those of
    ``_original``, the pytorch-metric-learning class a loss subclasses) and the fallback to it."""

    _original: Type[pml_losses.BaseMetricLossFunction]

    def __init__(self, *args: Any, backend: str = "auto", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        check.check_backend(backend)
        self.backend = backend

    def _fallback(self, reason: Reason, *arguments: Any) -> LossDict:
        warn_fallback(self, reason, f"pytorch_metric_learning.losses.{self._original.__name__}")
        return self._original.compute_loss(self, *arguments)


class _FusedPairLoss(_Fused):
    """NTXentLoss and SupConLoss (GenericPairLoss): fused calls are scored by ``_losses``."""

    # Whether given positive pairs must have equal labels (else the original raises, and should).
    _same_label_positives: bool

    def compute_loss(self, embeddings: Tensor, labels: Optional[Tensor],
                     indices_tuple: Optional[IndicesTuple], ref_emb: Tensor,
                     ref_labels: Optional[Tensor]) -> LossDict:
        call = _pair_call(self, embeddings, labels, indices_tuple, ref_emb, ref_labels,
                          self._same_label_positives)
        if isinstance(call, Reason):
            return self._fallback(call, embeddings, labels, indices_tuple, ref_emb, ref_labels)
        if call.has_no_loss():
            return self.zero_losses()
        _record_distance_stats(self.distance, embeddings, ref_emb)
        return {"loss": self._losses(call, embeddings)}

    def _losses(self, call: _PairCall, embeddings: Tensor) -> Dict[str, Any]:
        """The loss entry (losses, indices, reduction_type) of pytorch-metric-learning's loss dict."""
        raise NotImplementedError


class NTXentLoss(_FusedPairLoss, pml_losses.NTXentLoss):
    """pytorch_metric_learning.losses.NTXentLoss, fused. Per positive pair (a, p):

        loss_ap = -log(exp(S_ap) / (exp(S_ap) + sum_{n: y_n != y_a} exp(S_an)) + tiny)

    the sum a label-masked log-sum-exp of row a, S_ap an O(D) dot product.
    """

    _original = pml_losses.NTXentLoss
    _same_label_positives = False

    def _losses(self, call: _PairCall, embeddings: Tensor) -> Dict[str, Any]:
        rows, refs = call.positive_pairs or call.classes.positive_pairs(call.exclude_self)
        log_ratio = F.logsigmoid(call.scorer.pair_scores(rows, refs) - call.negative_lse()[rows])
        tiny = torch.finfo(embeddings.dtype).tiny
        losses = -torch.logaddexp(log_ratio, torch.full_like(log_ratio, math.log(tiny)))
        return {"losses": losses.to(embeddings.dtype), "indices": (rows, refs),
                "reduction_type": "pos_pair"}


class SupConLoss(_FusedPairLoss, pml_losses.SupConLoss):
    """pytorch_metric_learning.losses.SupConLoss, fused. Per anchor i with positives P_i:

        loss_i = lse_{j in P_i or negative} S_ij - mean_{p in P_i} S_ip     (0 without positives)

    with all labels: the log-sum-exp over the row (less (i, i)) and the positives' mean from class
    sums, O((N + M) D); with given positive pairs: the row's negatives (label-masked) and the
    pairs' scores.
    """

    _original = pml_losses.SupConLoss
    _same_label_positives = True

    def _losses(self, call: _PairCall, embeddings: Tensor) -> Dict[str, Any]:
        if call.positive_pairs is None:
            count, positive_sum, lse = self._all_label_terms(call)
        else:
            count, positive_sum, lse = self._given_pair_terms(call, call.positive_pairs)
        # Like pytorch-metric-learning: a row without positives has loss 0 / tiny = 0; masking both
        # terms keeps its gradient 0 (1 / tiny times a zero vector would overflow to NaN).
        without = count == 0
        numerator = count * lse.masked_fill(without, 0.0) - positive_sum.masked_fill(without, 0.0)
        losses = nonnegative(numerator / (count + torch.finfo(embeddings.dtype).tiny))
        return {"losses": losses.to(embeddings.dtype),
                "indices": c_f.torch_arange_from_size(embeddings), "reduction_type": "element"}

    @staticmethod
    def _all_label_terms(call: _PairCall) -> Tuple[Tensor, Tensor, Tensor]:
        scorer, classes = call.scorer, call.classes
        count = classes.positives_per_row(call.exclude_self).to(scorer.u.dtype)
        class_sums = scorer.v.new_zeros(classes.ref_counts.numel(), scorer.v.shape[1])
        class_sums = class_sums.index_add(0, classes.refs, scorer.v)[classes.rows]
        if call.exclude_self:
            class_sums = class_sums - scorer.v
        positive_sum = scorer.scale * torch.linalg.vecdot(scorer.u, class_sums)
        lse = scorer.row_lse(diag_offset=0 if call.exclude_self else None)
        return count, positive_sum, lse

    @staticmethod
    def _given_pair_terms(call: _PairCall,
                          positive_pairs: Tuple[Tensor, Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
        scorer, num_rows = call.scorer, call.classes.rows.numel()
        rows, refs = unique_pairs(*positive_pairs, call.classes.refs.numel())
        scores = scorer.pair_scores(rows, refs)
        count = torch.bincount(rows, minlength=num_rows).to(scores.dtype)
        positive_sum = scores.new_zeros(num_rows).index_add(0, rows, scores)
        positive_lse = row_logsumexp(scores, rows, num_rows)
        lse = torch.logaddexp(call.negative_lse(),
                              torch.where(count > 0, positive_lse, torch.zeros_like(positive_lse)))
        return count, positive_sum, lse


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


class NPairsLoss(_Fused, pml_losses.NPairsLoss):
    """pytorch_metric_learning.losses.NPairsLoss, fused: one (anchor, positive) pair per label,
    and per anchor the cross-entropy of its similarities to all positives (own positive the
    target), from one row log-sum-exp."""

    _original = pml_losses.NPairsLoss

    def compute_loss(self, embeddings: Tensor, labels: Optional[Tensor],
                     indices_tuple: Optional[IndicesTuple], ref_emb: Tensor,
                     ref_labels: Optional[Tensor]) -> LossDict:
        c_f.labels_required(labels)
        assert labels is not None  # labels_required raised otherwise (mypy cannot see it)
        c_f.ref_not_supported(embeddings, labels, ref_emb, ref_labels)
        distance = _fused_distance(self.distance)
        if isinstance(distance, Reason):
            return self._fallback(distance, embeddings, labels, indices_tuple, ref_emb, ref_labels)
        if indices_tuple is None:
            anchor_idx, positive_idx = _first_two_of_each_label(labels)
        else:
            anchor_idx, positive_idx = lmu.convert_to_pos_pairs_with_unique_labels(indices_tuple, labels)
        self.num_pairs = len(anchor_idx)
        if self.num_pairs == 0:
            return self.zero_losses()
        anchors, positives = embeddings[anchor_idx], embeddings[positive_idx]
        _record_distance_stats(self.distance, anchors, positives)
        one = torch.ones((), dtype=statistics_dtype(embeddings.dtype), device=embeddings.device)
        scorer = _Scorer(distance, one, anchors, positives, self.backend)
        positive = scorer.scale * torch.linalg.vecdot(scorer.u, scorer.v)
        return {"loss": {"losses": nonnegative(scorer.row_lse() - positive).to(embeddings.dtype),
                         "indices": anchor_idx, "reduction_type": "element"}}
