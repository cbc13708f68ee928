"""Labelled pairs of rows (N) and reference rows (M) without an N x M matrix.

Rows with equal labels are positive pairs, rows with different labels negative pairs. The helpers
here count and list them from the labels alone (sorting, O((N + M) log) plus the pairs listed),
score a list of P pairs in O(P D) time and O(P) memory, and reduce pair values per row.
"""

from __future__ import annotations

from typing import Any, Iterator, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

# Pairs scored per step of ``pair_dots``: bounds its (pairs x D) temporaries.
_PAIR_CHUNK_ELEMENTS = 1 << 22


class ClassIds(NamedTuple):
    """Labels of rows and reference rows as indices into their union of classes."""

    rows: Tensor          # (N,) int64
    refs: Tensor          # (M,) int64
    ref_counts: Tensor    # (C,) reference rows per class

    @classmethod
    def of(cls, labels: Tensor, ref_labels: Tensor) -> "ClassIds":
        _, ids = torch.unique(torch.cat([labels.reshape(-1), ref_labels.reshape(-1)]),
                              return_inverse=True)
        rows, refs = ids[: labels.numel()], ids[labels.numel():]
        counts = torch.bincount(refs, minlength=int(ids.max()) + 1 if ids.numel() else 0)
        return cls(rows, refs, counts)

    def positives_per_row(self, exclude_self: bool) -> Tensor:
        """(N,) number of same-label reference rows of each row (less itself if ``exclude_self``)."""
        return self.ref_counts[self.rows] - int(exclude_self)

    def pair_counts(self, exclude_self: bool) -> Tuple[int, int]:
        """(positive pairs, negative pairs); with ``exclude_self`` (rows are the references), the
        pairs (i, i) are neither."""
        same = self.ref_counts[self.rows]
        positives = int(same.sum()) - (self.rows.numel() if exclude_self else 0)
        return positives, self.rows.numel() * self.refs.numel() - int(same.sum())

    def positive_pairs(self, exclude_self: bool) -> Tuple[Tensor, Tensor]:
        """Every positive pair (row, ref), ordered by row then ref (torch.where's order on the
        N x M equality matrix); without (i, i) if ``exclude_self``."""
        order = torch.argsort(self.refs, stable=True)
        class_start = torch.cumsum(self.ref_counts, 0) - self.ref_counts
        per_row = self.ref_counts[self.rows]
        rows = torch.repeat_interleave(torch.arange(self.rows.numel(), device=per_row.device), per_row)
        row_start = torch.cumsum(per_row, 0) - per_row
        within = torch.arange(rows.numel(), device=rows.device) - row_start[rows]
        refs = order[class_start[self.rows[rows]] + within]
        if exclude_self:
            keep = refs != rows
            rows, refs = rows[keep], refs[keep]
        return rows, refs

    def are_all_negative_pairs(self, rows: Tensor, refs: Tensor) -> bool:
        """Whether the pairs (rows[k], refs[k]) are exactly the negative pairs, each once."""
        _, negatives = self.pair_counts(exclude_self=False)
        if rows.numel() != negatives:
            return False
        if negatives == 0:
            return True
        if bool((self.rows[rows] == self.refs[refs]).any()):
            return False
        linear = rows.long() * self.refs.numel() + refs.long()
        return bool((linear[1:] > linear[:-1]).all()) or torch.unique(linear).numel() == negatives


def unique_pairs(rows: Tensor, refs: Tensor, num_refs: int) -> Tuple[Tensor, Tensor]:
    """The distinct pairs (rows[k], refs[k]), ordered by row then ref."""
    linear = torch.unique(rows.long() * num_refs + refs.long())
    return linear // num_refs, linear % num_refs


class _PairDots(torch.autograd.Function):
    """(u[rows] * v[cols]).sum(1), computed and differentiated a chunk of pairs at a time, so the
    gathered (P, D) rows are never kept for backward."""

    @staticmethod
    def forward(ctx: Any, u: Tensor, v: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        ctx.save_for_backward(u, v, rows, cols)
        out = u.new_empty(rows.numel())
        for part in _chunks(rows.numel(), u.shape[1]):
            out[part] = torch.linalg.vecdot(u[rows[part]], v[cols[part]])
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], Optional[Tensor], None, None]:
        u, v, rows, cols = ctx.saved_tensors
        grad_u = torch.zeros_like(u) if ctx.needs_input_grad[0] else None
        grad_v = torch.zeros_like(v) if ctx.needs_input_grad[1] else None
        for part in _chunks(rows.numel(), u.shape[1]):
            weight = grad[part, None]
            if grad_u is not None:
                grad_u.index_add_(0, rows[part], weight * v[cols[part]])
            if grad_v is not None:
                grad_v.index_add_(0, cols[part], weight * u[rows[part]])
        return grad_u, grad_v, None, None


def _chunks(pairs: int, dim: int) -> Iterator[slice]:
    step = max(1, _PAIR_CHUNK_ELEMENTS // max(dim, 1))
    return (slice(start, min(start + step, pairs)) for start in range(0, pairs, step))


def pair_dots(u: Tensor, v: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """(P,) dot products u[rows[k]] . v[cols[k]], differentiable in u and v, O(P) memory."""
    return _PairDots.apply(u, v, rows, cols)


def row_logsumexp(values: Tensor, rows: Tensor, num_rows: int) -> Tensor:
    """(num_rows,) log-sum-exp of the values of each row (-inf for a row without values, with a
    zero gradient)."""
    shift = torch.full((num_rows,), float("-inf"), dtype=values.dtype, device=values.device)
    shift = shift.scatter_reduce(0, rows, values.detach(), "amax")
    has_values = torch.isfinite(shift)
    shift = torch.where(has_values, shift, torch.zeros_like(shift))
    sums = torch.zeros_like(shift).index_add(0, rows, torch.exp(values - shift[rows]))
    safe = torch.where(has_values, sums, torch.ones_like(sums)).log() + shift
    return torch.where(has_values, safe, torch.full_like(safe, float("-inf")))
