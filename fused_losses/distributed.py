"""Losses over the ranks of a torch.distributed process group (NCCL on GPUs, gloo on CPU).

Every loss that scores pairs takes ``gather_distributed=False`` and ``process_group=None``. With
gathering on, each of the W ranks scores its *local* rows against the rows of *all* ranks (what
open_clip calls the "local loss"): the keys / columns are all-gathered with
torch.distributed.nn.functional.all_gather, whose backward sends every rank's gradient for a
gathered row back to the row's owner and sums it there. Ranks may hold different batch sizes.
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
tensor scale / temperature / bias is not gathered; its gradient on rank r is dL_r / ds. DDP
averages parameter gradients over the W ranks, so every parameter (the encoders', a learnable
logit scale or bias) gets exactly the gradient that one process computing the loss on the global
batch would get.

How each loss splits: CLIP scores this rank's images against all texts and its texts against
all images; SigLIP this rank's images against all texts (open_clip passes the texts from
neighbour to neighbour instead: same numbers); InfoNCE and N-pairs this rank's queries against
all keys; NT-Xent this rank's 2N views against all views, gathered rank by rank so that a view's
partner is on its own rank and its self-similarity sits at the rank's offset; SupCon this rank's
anchors against all features, with the labels gathered too.

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
    """Number of rows of ``x`` on every rank of the group (one small all_gather)."""
    local = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    counts = [torch.empty_like(local) for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(counts, local, group=process_group)
    return torch.cat(counts).tolist()


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
    with warnings.catch_warnings():
        # Newer torch releases mark it deprecated in favour of the functional collectives; it
        # is still the autograd-aware all_gather that works on every backend (gloo included).
        warnings.filterwarnings("ignore", category=FutureWarning,
                                message=".*torch.distributed.nn.functional.all_gather")
        pieces = autograd_collectives.all_gather(padded, group=process_group)
    rank = dist.get_rank(process_group)
    rows = torch.cat([piece[:count] for piece, count in zip(pieces, counts)])
    return GatheredRows(rows, sum(counts[:rank]), counts)


def global_row_count(x: Tensor, gather_distributed: bool, process_group=None) -> int:
    """Rows of ``x`` summed over the ranks gathered from (x.shape[0] when not gathering)."""
    if world_size(gather_distributed, process_group) == 1:
        return x.shape[0]
    return sum(row_counts(x, process_group))
