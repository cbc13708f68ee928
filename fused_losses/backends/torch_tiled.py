"""Backend ``torch``: the primitives in pure PyTorch, one bounded chunk of rows at a time.

Runs on any device and dtype; the CPU fallback. Each chunk of ``chunk_rows`` rows of S
(chunk_rows x M, statistics dtype) is formed by one GEMM on normalized, scaled copies of the
inputs (O((N + M) D) memory), reduced, and dropped; the backward forms it again once and takes
dQ and dK from it: 4 GEMMs in all. Chunk buffers are allocated once per call and reused, which
keeps the elementwise passes in cache-sized memory and away from the allocator.

One exponential per element serves both softmax directions, since the elementwise passes, not
the GEMMs, are what a chunked PyTorch implementation can still save:

- forward: E = exp(S - rowmax_i) gives the row sums; the column sums are w^T E with
  w_i = exp(rowmax_i - max_i rowmax_i) (a matrix-vector product). A column term can only be lost
  to underflow if it is below e^-87 of the chunk's largest entry; columns whose chunk sum falls
  under ``_TRUSTED_SUM`` (e^-50, so any loss is below 1e-13 relative) are recomputed exactly.
- backward: W = P * (g_row_i + alpha_i beta_j) with P = exp(S - lse_row_i),
  alpha_i = exp(lse_row_i - L), beta_j = g_col_j exp(L - lse_col_j), which equals
  g_row_i P_ij + g_col_j exp(S_ij - lse_col_j). It is used on chunks where the spread
  lse_row_i - lse_col_j stays under ``_SHARED_EXP_SPREAD`` (no overflow, lost terms below e^-27
  of their own weight); other chunks take one exponential per direction.

A label mask (``base.LabelMask``) is applied to each chunk by comparing the chunk's row labels
with all column labels (a chunk_rows x M boolean, dropped with the chunk).

Choosing between a fast path and its fallback reads values on the host: one sync per forward
chunk (any untrusted column?) and one per backward call (the spreads). Free on the CPU; a few
syncs per call on a GPU, where this backend is the fallback.
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fused_losses.backends.base import LABEL_MASK, LabelMask

FEATURES = frozenset({LABEL_MASK})

# About 64 MiB of fp32 per chunk buffer: large enough for GEMMs near full speed (measured on CPU).
_TARGET_CHUNK_ELEMENTS = 1 << 24
_TRUSTED_SUM = math.exp(-50.0)
_SHARED_EXP_SPREAD = 60.0


def unavailable_reason(device: torch.device, dtype: Optional[torch.dtype] = None) -> Optional[str]:
    return None


def make_kernels(chunk_size: Optional[int] = None) -> "TorchTiledKernels":
    return TorchTiledKernels(chunk_size)


def _finite_or_zero(x: Tensor) -> Tensor:
    """x where finite, else 0: a shift that keeps exp(-inf - shift) = 0 instead of NaN."""
    return torch.where(torch.isfinite(x), x, torch.zeros((), dtype=x.dtype, device=x.device))


def _exp_where_finite(exponent: Tensor, finite: Tensor) -> Tensor:
    """exp(exponent) where ``finite``, else 0 (a fully masked row / column has no weight)."""
    return torch.where(finite, torch.exp(exponent), torch.zeros((), dtype=exponent.dtype, device=exponent.device))


class _Chunks:
    """Normalized fp32/fp64 operands and the row chunks of S = u @ v.T * scale, masked.

    u = scale * r * q (N, D) and v = c * k (M, D) in the statistics dtype; ``similarity(start,
    stop)`` writes rows [start, stop) of S into a reused buffer and returns it.
    """

    def __init__(self, q, k, inv_norm_q, inv_norm_k, scale, diag_offset, chunk_size,
                 label_mask: Optional[LabelMask] = None):
        stat_dtype = inv_norm_q.dtype
        self.u = q.to(stat_dtype) * (inv_norm_q * scale)[:, None]
        self.v = k.to(stat_dtype) * inv_norm_k[:, None]
        self.v_transposed = self.v.T.contiguous()  # (D, M): the faster layout for the S GEMM
        self.n, self.m = q.shape[0], k.shape[0]
        self.diag_offset = diag_offset
        self.label_mask = label_mask
        if chunk_size is None:
            chunk_size = max(1, _TARGET_CHUNK_ELEMENTS // max(self.m, 1))
        self.chunk_rows = min(chunk_size, self.n)
        self.buffer = torch.empty(self.chunk_rows, self.m, dtype=stat_dtype, device=q.device)

    def ranges(self):
        for start in range(0, self.n, self.chunk_rows):
            yield start, min(start + self.chunk_rows, self.n)

    def view(self, buffer: Tensor, start: int, stop: int) -> Tensor:
        return buffer[: stop - start]

    def similarity(self, start: int, stop: int, minus: Optional[Tensor] = None) -> Tensor:
        """Rows [start, stop) of S, or of S - minus (``minus`` broadcast to them), masked."""
        out = self.view(self.buffer, start, stop)
        torch.mm(self.u[start:stop], self.v_transposed, out=out)
        if minus is not None:
            out.sub_(minus)
        if self.diag_offset is not None:
            rows = torch.arange(start, stop, device=out.device)
            cols = rows + self.diag_offset
            inside = (cols >= 0) & (cols < self.m)
            out[rows[inside] - start, cols[inside]] = float("-inf")
        if self.label_mask is not None:
            out.masked_fill_(self.label_masked(start, stop), float("-inf"))
        return out

    def label_masked(self, start: int, stop: int, cols=slice(None)) -> Tensor:
        """(stop - start, len(cols)) bool: the entries of rows [start, stop) the label mask removes."""
        row_labels, col_labels, exclude_same = self.label_mask
        same = row_labels[start:stop, None] == col_labels[None, cols]
        return same if exclude_same else same.logical_not_()

    def column_lse(self, start: int, stop: int, cols: Tensor) -> Tensor:
        """Exact log-sum-exp over rows [start, stop) of the columns ``cols`` of S."""
        s = self.u[start:stop] @ self.v[cols].T
        if self.diag_offset is not None:
            rows = torch.arange(start, stop, device=s.device)
            s = s.masked_fill(cols[None, :] == rows[:, None] + self.diag_offset, float("-inf"))
        if self.label_mask is not None:
            s = s.masked_fill(self.label_masked(start, stop, cols), float("-inf"))
        return torch.logsumexp(s, dim=0)

    def grads_from_weights(self, weights: Tensor, start: int, stop: int, grad_v: Tensor) -> Tensor:
        """U rows [start, stop) = W @ v (times scale later); accumulate scale W^T u into grad_v."""
        grad_v.addmm_(weights.T, self.u[start:stop])
        return weights @ self.v


class TorchTiledKernels:
    """SimilarityKernels in chunked PyTorch; ``chunk_size`` rows of S at once (default ~16M elements)."""

    name = "torch"

    def __init__(self, chunk_size: Optional[int] = None):
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        self.chunk_size = chunk_size

    def _chunks(self, q, k, inv_norm_q, inv_norm_k, scale, diag_offset, label_mask=None) -> _Chunks:
        return _Chunks(q, k, inv_norm_q, inv_norm_k, scale, diag_offset, self.chunk_size, label_mask)

    def lse_forward(self, q, k, inv_norm_q, inv_norm_k, scale, diag_offset, want_rows, want_cols,
                    label_mask: Optional[LabelMask] = None):
        chunks = self._chunks(q, k, inv_norm_q, inv_norm_k, scale, diag_offset, label_mask)
        stat_dtype = inv_norm_q.dtype
        lse_row = torch.empty(chunks.n, dtype=stat_dtype, device=q.device) if want_rows else None
        lse_col = torch.full((chunks.m,), float("-inf"), dtype=stat_dtype, device=q.device) if want_cols else None
        for start, stop in chunks.ranges():
            s = chunks.similarity(start, stop)
            row_max = s.amax(dim=1)
            row_shift = _finite_or_zero(row_max)
            exps = s.sub_(row_shift[:, None]).exp_()
            if want_rows:
                lse_row[start:stop] = exps.sum(dim=1).log_().add_(row_shift)
            if want_cols:
                chunk_shift = _finite_or_zero(row_max.amax())
                col_sum = torch.mv(exps.T, _exp_where_finite(row_max - chunk_shift, torch.isfinite(row_max)))
                untrusted = col_sum < _TRUSTED_SUM
                chunk_lse = col_sum.log_().add_(chunk_shift)
                if bool(untrusted.any()):
                    if label_mask is not None:
                        # A column the labels mask entirely in this chunk is exactly -inf already
                        # (with "keep only same labels", that is most columns).
                        untrusted &= ~chunks.label_masked(start, stop).all(dim=0)
                    cols = untrusted.nonzero().squeeze(1)
                    chunk_lse[cols] = chunks.column_lse(start, stop, cols)
                torch.logaddexp(lse_col, chunk_lse, out=lse_col)
        return lse_row, lse_col

    def lse_backward(self, q, k, inv_norm_q, inv_norm_k, scale, diag_offset,
                     lse_row, lse_col, grad_row, grad_col, label_mask: Optional[LabelMask] = None):
        chunks = self._chunks(q, k, inv_norm_q, inv_norm_k, scale, diag_offset, label_mask)
        grad_u = torch.empty_like(chunks.u)
        grad_v = torch.zeros_like(chunks.v)
        row_shift = _finite_or_zero(lse_row) if grad_row is not None else None
        col_shift = _finite_or_zero(lse_col) if grad_col is not None else None
        both = grad_row is not None and grad_col is not None
        if both:
            finite_cols = torch.isfinite(lse_col)
            shared_exp_shifts = self._shared_exp_shifts(chunks, lse_row, lse_col, finite_cols)
            factors = torch.empty_like(chunks.buffer)
        for index, (start, stop) in enumerate(chunks.ranges()):
            if grad_row is None:
                weights = chunks.similarity(start, stop, col_shift[None, :]).exp_().mul_(grad_col)
            elif not both:
                weights = chunks.similarity(start, stop, row_shift[start:stop, None]).exp_()
                weights.mul_(grad_row[start:stop, None])
            elif shared_exp_shifts[index] is None:  # one exponential per direction
                weights = chunks.similarity(start, stop, row_shift[start:stop, None])
                col_part = torch.add(weights, row_shift[start:stop, None], out=chunks.view(factors, start, stop))
                col_part.sub_(col_shift).exp_().mul_(grad_col)
                weights.exp_().mul_(grad_row[start:stop, None]).add_(col_part)
            else:
                shift, rows = shared_exp_shifts[index], lse_row[start:stop]
                alpha = _exp_where_finite(rows - shift, torch.isfinite(rows))
                beta = grad_col * _exp_where_finite(shift - lse_col, finite_cols)
                factor = torch.addcmul(grad_row[start:stop, None], alpha[:, None], beta[None, :],
                                       out=chunks.view(factors, start, stop))
                weights = chunks.similarity(start, stop, row_shift[start:stop, None]).exp_().mul_(factor)
            grad_u[start:stop] = chunks.grads_from_weights(weights, start, stop, grad_v)
        return grad_u.mul_(scale), grad_v

    @staticmethod
    def _shared_exp_shifts(chunks: _Chunks, lse_row: Tensor, lse_col: Tensor,
                           finite_cols: Tensor) -> List[Optional[float]]:
        """Per chunk: the shift L of the one-exponential backward, or None where the spread of
        lse_row over the chunk and lse_col is too wide for it. One host sync for all chunks."""
        finite_rows = torch.where(torch.isfinite(lse_row), lse_row, float("-inf"))
        padding = (-chunks.n) % chunks.chunk_rows
        chunk_max = F.pad(finite_rows, (0, padding), value=float("-inf")).view(-1, chunks.chunk_rows).amax(1)
        col_min = torch.where(finite_cols, lse_col, float("inf")).amin()
        maxima, lowest = torch.cat([chunk_max, col_min[None]]).tolist()[:-1], col_min.item()
        return [None if top - lowest > _SHARED_EXP_SPREAD else (top if math.isfinite(top) else 0.0)
                for top in maxima]

    def softplus_forward(self, q, k, inv_norm_q, inv_norm_k, scale, bias, diag_offset):
        chunks = self._chunks(q, k, inv_norm_q, inv_norm_k, scale, diag_offset)
        sp_row = torch.empty(chunks.n, dtype=inv_norm_q.dtype, device=q.device)
        tails = torch.empty_like(chunks.buffer)
        for start, stop in chunks.ranges():
            s = chunks.similarity(start, stop).add_(bias)
            # softplus(x) = max(x, 0) + log1p(exp(-|x|)): exact, no overflow, 0 at x = -inf.
            tail = torch.abs(s, out=chunks.view(tails, start, stop)).neg_().exp_().log1p_()
            sp_row[start:stop] = tail.add_(s.clamp_(min=0)).sum(dim=1)
        return sp_row

    def softplus_backward(self, q, k, inv_norm_q, inv_norm_k, scale, bias, diag_offset, grad_row):
        chunks = self._chunks(q, k, inv_norm_q, inv_norm_k, scale, diag_offset)
        grad_u = torch.empty_like(chunks.u)
        grad_v = torch.zeros_like(chunks.v)
        grad_bias = torch.zeros((), dtype=inv_norm_q.dtype, device=q.device)
        for start, stop in chunks.ranges():
            w = chunks.similarity(start, stop).add_(bias).sigmoid_().mul_(grad_row[start:stop, None])
            grad_bias += w.sum()
            grad_u[start:stop] = chunks.grads_from_weights(w, start, stop, grad_v)
        return grad_u.mul_(scale), grad_v, grad_bias
