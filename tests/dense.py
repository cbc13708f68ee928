"""Dense float64 versions of the primitives' contract (fused_losses/backends/base.py), for tests.

They materialize S and take every statistic and gradient from it directly.
"""

from typing import Optional

import torch


def similarity(q, k, scale, normalize=True, diag_offset: Optional[int] = None, eps=1e-12,
               labels=None):
    """S (N, M) in float64 with masked entries at -inf; ``labels``: None or (row_labels,
    col_labels, exclude_same) masking (i, j) where (row_labels[i] == col_labels[j]) == exclude_same."""
    q, k = q.double(), k.double()
    if normalize:
        q = torch.nn.functional.normalize(q, dim=1, eps=eps)
        k = torch.nn.functional.normalize(k, dim=1, eps=eps)
    s = torch.as_tensor(scale, dtype=torch.float64) * (q @ k.T)
    if diag_offset is not None:
        rows = torch.arange(s.shape[0])
        cols = rows + diag_offset
        inside = (cols >= 0) & (cols < s.shape[1])
        mask = torch.zeros_like(s, dtype=torch.bool)
        mask[rows[inside], cols[inside]] = True
        s = s.masked_fill(mask, float("-inf"))
    if labels is not None:
        row_labels, col_labels, exclude_same = labels
        s = s.masked_fill((row_labels[:, None] == col_labels[None, :]) == exclude_same, float("-inf"))
    return s


def _logsumexp(s, dim):
    """torch.logsumexp, with -inf and a zero gradient (not NaN) where every entry is masked."""
    empty = torch.isneginf(s).all(dim=dim, keepdim=True)
    out = torch.logsumexp(s.masked_fill(empty, 0.0), dim=dim)
    return out.masked_fill(empty.squeeze(dim), float("-inf"))


def lse(q, k, scale, normalize=True, diag_offset=None, labels=None):
    """(lse_row (N,), lse_col (M,)) in float64; ``labels`` as for ``similarity``."""
    s = similarity(q, k, scale, normalize, diag_offset, labels=labels)
    return _logsumexp(s, 1), _logsumexp(s, 0)


def softplus_rows(q, k, scale, bias, normalize=True, diag_offset=None):
    """sum_j softplus(S_ij + bias), (N,) in float64."""
    logits = similarity(q, k, scale, normalize, diag_offset) + bias
    return torch.logaddexp(logits, torch.zeros_like(logits)).sum(dim=1)
