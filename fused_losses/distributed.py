"""Losses over the ranks of a torch.distributed process group (NCCL on GPUs, gloo on CPU).

Every loss that scores pairs takes ``gather_distributed=False`` and ``process_group=None``. With
gathering on, each of the W ranks scores its *local* rows against the rows of *all* ranks (what
open_clip calls the "local loss"): the keys / columns are all-gathered with
torch.distributed.nn.functional.all_gather, whose backward sends every rank's gradient for a
gathered row back to the row's owner and sums it there. Ranks may hold different batch sizes,
and some may hold none (their loss is 0 and they still take part in the collectives).
The global batch is the concatenation of the ranks' batches in rank order.

Reductions: the per-rank loss L_r is scaled so that the mean of L_r over the ranks is the loss of
one process on the global batch:

    "mean"  L_r = W * (sum of rank r's items) / (number of items in the global batch)
            (the local mean when all ranks hold as many items, as in open_clip and lightly;
            SupCon counts the anchors that have a positive in the global batch)
    "sum"   L_r = W * (sum of rank r's items)
    "none"  rank r's items, each equal to its value in the global-batch loss

Gradient semantics ("mean" and "sum"): the gradient reaching rank r's embeddings x_r is
d(sum_r' L_r') / dx_r, that is W times the gradient of the global-batch loss for those rows. A
tensor scale / temperature / bias is not gathered; its gradients on the ranks sum to
d(sum_r' L_r') / ds (each rank takes the part from the similarities it scores; for all losses but
CLIP that is dL_r / ds). DDP averages parameter gradients over the W ranks, so every parameter
(the encoders', a learnable logit scale or bias) gets exactly the gradient that one process
computing the loss on the global batch would get.

How each loss splits: CLIP scores this rank's images against all texts once (``symmetric_lse``):
complete image -> text statistics for its images, and partial text -> image statistics for every
text, merged over the ranks by an O(N) all-reduce; only the texts are gathered (with label
smoothing, the sum of the image embeddings is all-reduced too: D floats). SigLIP scores this
rank's images against all texts (open_clip passes the texts from neighbour to neighbour instead:
same numbers); InfoNCE and N-pairs this rank's queries against all keys; NT-Xent this rank's 2N
views against all views, gathered rank by rank so that a view's partner is on its own rank and its
self-similarity sits at the rank's offset; SupCon this rank's anchors against all features, with
the labels gathered too. Each of these needs row statistics only and scores every pair of the
global matrix once over the ranks already: the symmetric scheme has nothing to halve there.

Without an initialized process group (or with one rank) gathering is a no-op, so the same code
runs in one process. The collectives cannot be traced by torch.compile.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from fused_losses.primitives import as_scalar_tensor, lse_statistics, statistics_dtype


@dataclass(frozen=True)
class GatheredRows:
    """Rows of one tensor gathered from every rank of a group.

    rows: every rank's rows, in rank order (the local tensor itself when not gathering).
    offset: index in ``rows`` of this rank's first row.
    row_counts: rows held by each rank.
    """

    rows: Tensor
    offset: int
    row_counts: List[int]

    @property
    def world_size(self) -> int:
        return len(self.row_counts)


def check_options(gather_distributed, process_group) -> None:
    """``gather_distributed`` a bool; ``process_group`` None or a torch.distributed ProcessGroup."""
    if not isinstance(gather_distributed, bool):
        raise TypeError(f"gather_distributed must be a bool, got "
                        f"{type(gather_distributed).__name__} {gather_distributed!r}")
    if process_group is None:
        return
    if not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
        raise TypeError(f"process_group must be None (the default group) or a "
                        f"torch.distributed.ProcessGroup, got {type(process_group).__name__}")
    if not gather_distributed:
        raise ValueError("process_group was given but gather_distributed=False; pass "
                         "gather_distributed=True to gather over the group")


def world_size(gather_distributed: bool, process_group=None) -> int:
    """Ranks a loss with these options gathers from: 1 when not gathering or not initialized."""
    if not (gather_distributed and dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


def row_counts(x: Tensor, process_group=None) -> List[int]:
    """Number of rows of ``x`` on every rank of the group (one small all_gather). A rank may hold
    none; if all do, every rank raises the same ValueError (none is left waiting in a collective)."""
    local = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(gathered, local, group=process_group)
    counts: List[int] = torch.cat(gathered).tolist()
    if sum(counts) == 0:
        raise ValueError(f"the global batch is empty: every one of the {len(counts)} ranks passed "
                         f"0 rows (shape {tuple(x.shape)} here); a rank may hold no rows, but "
                         f"not all of them")
    return counts


def _quietly(autograd_collective, *args, **kwargs):
    """Call a torch.distributed.nn.functional collective. Newer torch releases mark them deprecated
    in favour of the functional collectives; they are still the autograd-aware ones that work on
    every backend (gloo included)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning,
                                message=".*torch.distributed.nn.functional")
        return autograd_collective(*args, **kwargs)


def gather_rows(x: Tensor, gather_distributed: bool = True, process_group=None,
                counts: Optional[List[int]] = None) -> GatheredRows:
    """All ranks' rows of ``x`` (N_r, ...) as one tensor, differentiable with respect to ``x``.

    Uneven row counts are padded to the largest for the collective and cut back after it.
    counts: the ranks' row counts when already known (skips exchanging them).
    """
    size = world_size(gather_distributed, process_group)
    if size == 1:
        return GatheredRows(x, 0, [x.shape[0]])
    counts = row_counts(x, process_group) if counts is None else counts
    import torch.distributed.nn.functional as autograd_collectives  # only where dist is available

    padding = max(counts) - x.shape[0]
    padded = torch.cat([x, x.new_zeros((padding,) + tuple(x.shape[1:]))]) if padding else x
    pieces = _quietly(autograd_collectives.all_gather, padded, group=process_group)
    rank = dist.get_rank(process_group)
    rows = torch.cat([piece[:count] for piece, count in zip(pieces, counts)])
    return GatheredRows(rows, sum(counts[:rank]), counts)


def global_row_count(x: Tensor, gather_distributed: bool, process_group=None) -> int:
    """Rows of ``x`` summed over the ranks gathered from (x.shape[0] when not gathering)."""
    if world_size(gather_distributed, process_group) == 1:
        return x.shape[0]
    return sum(row_counts(x, process_group))


def sum_across_ranks(x: Tensor, gather_distributed: bool = True, process_group=None) -> Tensor:
    """Elementwise sum of ``x`` (same shape on every rank) over the ranks, on every rank.

    Differentiable: the gradient reaching ``x`` on each rank is the sum of the ranks' upstream
    gradients (an all-reduce each way). ``x`` itself when not gathering.
    """
    if world_size(gather_distributed, process_group) == 1:
        return x
    import torch.distributed.nn.functional as autograd_collectives  # only where dist is available

    return _quietly(autograd_collectives.all_reduce, x, group=process_group)


def _merge_partial_lse(partial: Tensor, process_group) -> Tensor:
    """log sum_r exp(partial_r), elementwise over the ranks, on every rank; differentiable.

    Shifted by the maximum over the ranks, so no term overflows; the shift needs no gradient,
    since the result does not depend on it.
    """
    shift = partial.detach().clone()
    dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=process_group)
    return sum_across_ranks((partial - shift).exp(), True, process_group).log() + shift


@dataclass(frozen=True)
class SymmetricLse:
    """Both log-sum-exps of the global S = scale * normalize(Q) @ normalize(K).T, per rank.

    lse_row: (N_r,) log sum_j exp(S_ij) over all M global columns, for this rank's rows i.
    lse_col: (M_r,) log sum_i exp(S_ij) over all N global rows, for this rank's columns j.
    keys: the columns K of every rank (M, D), gathered with gradients (``gather_rows``).
    """

    lse_row: Tensor
    lse_col: Tensor
    keys: GatheredRows


def symmetric_lse(q: Tensor, k: Tensor, scale, *, normalize: bool, gather_distributed: bool = True,
                  process_group=None, backend: str = "auto") -> SymmetricLse:
    """Row and column log-sum-exps of one similarity matrix over the ranks' global batch, with one
    similarity pass per rank and only the columns gathered: the core of a symmetric loss (CLIP's
    image -> text and text -> image directions) across ranks.

    q: (N_r, D) this rank's rows (e.g. images); k: (M_r, D) its columns (e.g. texts), same dtype
    and device; N_r and M_r may differ between ranks and from each other. The global Q and K are
    the ranks' rows in rank order. Columns that only one direction scores (hard negatives) go
    into k after the paired ones: with k = cat([positives, negatives]), lse_row scores every
    global positive and negative, and lse_col[:N_r] is each local positive against all queries. scale: float or 0-d tensor > 0 (may require grad). Arguments
    are not checked here: the calling loss validates them.

    How: k is all-gathered once; this rank's q against all of K gives complete row statistics and,
    over its own rows, partial column statistics for every column, which an all-reduce merges
    (max, then sum of exp(partial - max)). Per step and rank: one N_r x M similarity pass forward
    and one backward; communication: K (M x D) gathered, its gradient reduce-scattered back to
    its owners, the ranks' row counts (W integers), and three all-reduces of M floats (two forward,
    one backward: the upstream gradients of every rank's lse_col, which the column-softmax
    weights need).

    Gradients follow ``fused_losses.distributed``: with a loss L_r on each rank built from its
    outputs, q and k on rank r get d(sum_r' L_r') / d(q_r, k_r). A tensor scale gets, on each
    rank, the part of that derivative from the similarity entries scored there (its rows): the
    ranks' parts sum to d(sum_r' L_r') / d scale, so DDP's average is the global gradient.
    Without gathering (or on one rank) this is ``similarity_lse(q, k, rows=True, cols=True)``.
    """
    scale = as_scalar_tensor(scale, statistics_dtype(q.dtype), q.device)
    keys = gather_rows(k, gather_distributed, process_group)
    lse_row, lse_col = lse_statistics(q, keys.rows, scale, rows=True, cols=True,
                                      normalize=normalize, backend=backend)
    if keys.world_size > 1:
        lse_col = _merge_partial_lse(lse_col, process_group)[keys.offset: keys.offset + k.shape[0]]
    return SymmetricLse(lse_row, lse_col, keys)
