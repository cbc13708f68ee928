"""Backend ``torch``: the primitives in pure PyTorch, one bounded chunk of rows at a time.

Runs on any device and dtype; the CPU fallback. Each chunk of ``chunk_rows`` rows of S
(chunk_rows x M, statistics dtype) is formed by one GEMM on normalized, scaled copies of the
inputs (O((N + M) D) memory), reduced, and dropped; the backward forms it again once and takes
dQ and dK from it. Chunk buffers are allocated once per call and reused, which keeps every
elementwise pass in cache-sized memory and away from the allocator.

Forward: 1 GEMM per chunk; backward: 3 (recompute, W v, W^T u). Column statistics are merged
across chunks with a running max and sum.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

# About 16 MiB of fp32 per chunk buffer: large enough for efficient GEMMs, small enough for cache.
_TARGET_CHUNK_ELEMENTS = 1 << 22


def unavailable_reason(device: torch.device) -> Optional[str]:
    return None


def make_kernels(chunk_size: Optional[int] = None) -> "TorchTiledKernels":
    return TorchTiledKernels(chunk_size)


def _finite_or_zero(x: Tensor) -> Tensor:
    """x where finite, else 0: a shift that keeps exp(-inf - shift) = 0 instead of NaN."""
    return torch.where(torch.isfinite(x), x, torch.zeros((), dtype=x.dtype, device=x.device))


class _Chunks:
    """Normalized fp32/fp64 operands and the row chunks of S = u @ v.T * scale, masked.

    u = scale * r * q (N, D) and v = c * k (M, D) in the statistics dtype; ``similarity(start,
    stop, out)`` writes rows [start, stop) of S into ``out`` (a reused buffer) and returns it.
    """

    def __init__(self, q, k, inv_norm_q, inv_norm_k, scale, diag_offset, chunk_size):
        stat_dtype = inv_norm_q.dtype
        self.u = q.to(stat_dtype) * (inv_norm_q * scale)[:, None]
        self.v = k.to(stat_dtype) * inv_norm_k[:, None]
        self.n, self.m = q.shape[0], k.shape[0]
        self.diag_offset = diag_offset
        if chunk_size is None:
            chunk_size = max(1, _TARGET_CHUNK_ELEMENTS // max(self.m, 1))
        self.chunk_rows = min(chunk_size, self.n)
        self.buffer = torch.empty(self.chunk_rows, self.m, dtype=stat_dtype, device=q.device)

    def ranges(self):
        for start in range(0, self.n, self.chunk_rows):
            yield start, min(start + self.chunk_rows, self.n)

    def view(self, buffer: Tensor, start: int, stop: int) -> Tensor:
        return buffer[: stop - start]

    def similarity(self, start: int, stop: int) -> Tensor:
        out = self.view(self.buffer, start, stop)
        torch.mm(self.u[start:stop], self.v.T, out=out)
        if self.diag_offset is not None:
            rows = torch.arange(start, stop, device=out.device)
            cols = rows + self.diag_offset
            inside = (cols >= 0) & (cols < self.m)
            out[rows[inside] - start, cols[inside]] = float("-inf")
        return out

    def grads_from_weights(self, weights: Tensor, start: int, stop: int, grad_v: Tensor) -> Tensor:
        """U rows [start, stop) = W @ (scale v); accumulate scale W^T u into grad_v in place."""
        grad_v.addmm_(weights.T, self.u[start:stop])
        return weights @ self.v


class TorchTiledKernels:
    """SimilarityKernels in chunked PyTorch; ``chunk_size`` rows of S at once (default ~4M elements)."""

    name = "torch"

    def __init__(self, chunk_size: Optional[int] = None):
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        self.chunk_size = chunk_size

    def _chunks(self, q, k, inv_norm_q, inv_norm_k, scale, diag_offset) -> _Chunks:
        return _Chunks(q, k, inv_norm_q, inv_norm_k, scale, diag_offset, self.chunk_size)

    def lse_forward(self, q, k, inv_norm_q, inv_norm_k, scale, diag_offset, want_rows, want_cols):
        chunks = self._chunks(q, k, inv_norm_q, inv_norm_k, scale, diag_offset)
        stat_dtype = inv_norm_q.dtype
        lse_row = torch.empty(chunks.n, dtype=stat_dtype, device=q.device) if want_rows else None
        if want_cols:
            col_max = torch.full((chunks.m,), float("-inf"), dtype=stat_dtype, device=q.device)
            col_sum = torch.zeros(chunks.m, dtype=stat_dtype, device=q.device)
        exps = torch.empty_like(chunks.buffer)
        for start, stop in chunks.ranges():
            s = chunks.similarity(start, stop)
            e = chunks.view(exps, start, stop)
            if want_rows:
                row_max = _finite_or_zero(s.amax(dim=1))
                torch.sub(s, row_max[:, None], out=e).exp_()
                lse_row[start:stop] = e.sum(dim=1).log_().add_(row_max)
            if want_cols:
                new_max = torch.maximum(col_max, s.amax(dim=0))
                shift = _finite_or_zero(new_max)
                torch.sub(s, shift, out=e).exp_()
                col_sum.mul_(torch.exp(col_max - shift)).add_(e.sum(dim=0))
                col_max = new_max
        lse_col = col_sum.log_().add_(_finite_or_zero(col_max)) if want_cols else None
        return lse_row, lse_col

    def lse_backward(self, q, k, inv_norm_q, inv_norm_k, scale, diag_offset,
                     lse_row, lse_col, grad_row, grad_col):
        chunks = self._chunks(q, k, inv_norm_q, inv_norm_k, scale, diag_offset)
        grad_u = torch.empty_like(chunks.u)
        grad_v = torch.zeros_like(chunks.v)
        row_shift = _finite_or_zero(lse_row) if grad_row is not None else None
        col_shift = _finite_or_zero(lse_col) if grad_col is not None else None
        weights = torch.empty_like(chunks.buffer)
        for start, stop in chunks.ranges():
            s = chunks.similarity(start, stop)
            if grad_row is not None:
                w = torch.sub(s, row_shift[start:stop, None], out=chunks.view(weights, start, stop))
                w.exp_().mul_(grad_row[start:stop, None])
                if grad_col is not None:
                    w.add_(s.sub_(col_shift).exp_().mul_(grad_col))
            else:
                w = s.sub_(col_shift).exp_().mul_(grad_col)
            grad_u[start:stop] = chunks.grads_from_weights(w, start, stop, grad_v)
        return grad_u.mul_(scale), grad_v

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
