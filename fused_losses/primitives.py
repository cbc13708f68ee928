"""The two similarity primitives (DESIGN.md section 2) as autograd Functions over any backend.

    similarity_lse(q, k, scale)            -> (lse_row (N,) or None, lse_col (M,) or None)
    similarity_softplus(q, k, scale, bias) -> sp_row (N,)

with S_ij = scale * (u_i . v_j), u_i = q_i / max(|q_i|, eps) and v_j likewise when normalizing.
Outputs are in the statistics dtype: float64 for float64 inputs, float32 otherwise.

A backend (``fused_losses.backends``) supplies the forward statistics and the gradients U = dL/du,
V = dL/dv. What follows from them is the same for every backend and is done here, in O((N + M) D):
the chain rule through the normalization and the gradient of the scale,

    dq_i = r_i (U_i - u_i (u_i . U_i))   (|q_i| > eps; else r_i U_i)
    d scale = (1 / scale) sum_i u_i . U_i
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from fused_losses import _validation as check
from fused_losses.backends import get_kernels

DEFAULT_EPS = 1e-12


def statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the statistics, gradients and positive terms for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_scalar_tensor(value, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A float or a (differentiable) 1-element tensor as a 0-d tensor of ``dtype`` on ``device``."""
    if isinstance(value, Tensor):
        return value.reshape(()).to(dtype=dtype, device=device)
    return torch.tensor(float(value), dtype=dtype, device=device)


def _norms(x: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.linalg.vector_norm(x, dim=1, dtype=dtype)


def _inverse_norms(x: Tensor, normalize: bool, eps: float, dtype: torch.dtype) -> Tensor:
    if not normalize:
        return torch.ones(x.shape[0], dtype=dtype, device=x.device)
    return _norms(x, dtype).clamp_min_(eps).reciprocal_()


def _input_grad(x: Tensor, inv_norm: Tensor, grad_u: Tensor, normalize: bool, eps: float):
    """(dL/dx in x's dtype, sum_i u_i . U_i) from U = dL/du, where u = inv_norm * x."""
    u = x.to(grad_u.dtype) * inv_norm[:, None]
    radial = (u * grad_u).sum(dim=1)
    if normalize:
        unclamped = _norms(x, grad_u.dtype) > eps
        grad_u = grad_u - u * torch.where(unclamped, radial, torch.zeros_like(radial))[:, None]
        grad_u = grad_u * inv_norm[:, None]
    return grad_u.to(x.dtype), radial.sum()


def _grad_scale(scale: Tensor, radial_sum: Tensor) -> Tensor:
    return radial_sum / scale


class _SimilarityLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, scale, kernels, normalize, eps, diag_offset, want_rows, want_cols):
        dtype = statistics_dtype(q.dtype)
        inv_norm_q = _inverse_norms(q, normalize, eps, dtype)
        inv_norm_k = _inverse_norms(k, normalize, eps, dtype)
        lse_row, lse_col = kernels.lse_forward(
            q, k, inv_norm_q, inv_norm_k, scale, diag_offset, want_rows, want_cols)
        ctx.save_for_backward(q, k, scale, inv_norm_q, inv_norm_k, lse_row, lse_col)
        ctx.options = (kernels, normalize, eps, diag_offset)
        return lse_row, lse_col

    @staticmethod
    def backward(ctx, grad_row, grad_col):
        q, k, scale, inv_norm_q, inv_norm_k, lse_row, lse_col = ctx.saved_tensors
        kernels, normalize, eps, diag_offset = ctx.options
        if lse_row is None:
            grad_row = None
        if lse_col is None:
            grad_col = None
        if grad_row is not None:
            grad_row = grad_row.to(inv_norm_q.dtype).contiguous()
        if grad_col is not None:
            grad_col = grad_col.to(inv_norm_q.dtype).contiguous()
        if grad_row is None and grad_col is None:
            return (None,) * 9
        grad_u, grad_v = kernels.lse_backward(
            q, k, inv_norm_q, inv_norm_k, scale, diag_offset, lse_row, lse_col, grad_row, grad_col)
        grad_q, radial_sum = _input_grad(q, inv_norm_q, grad_u, normalize, eps)
        grad_k, _ = _input_grad(k, inv_norm_k, grad_v, normalize, eps)
        grad_scale = _grad_scale(scale, radial_sum) if ctx.needs_input_grad[2] else None
        return grad_q, grad_k, grad_scale, None, None, None, None, None, None


class _SimilaritySoftplus(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, scale, bias, kernels, normalize, eps, diag_offset):
        dtype = statistics_dtype(q.dtype)
        inv_norm_q = _inverse_norms(q, normalize, eps, dtype)
        inv_norm_k = _inverse_norms(k, normalize, eps, dtype)
        sp_row = kernels.softplus_forward(q, k, inv_norm_q, inv_norm_k, scale, bias, diag_offset)
        ctx.save_for_backward(q, k, scale, bias, inv_norm_q, inv_norm_k)
        ctx.options = (kernels, normalize, eps, diag_offset)
        return sp_row

    @staticmethod
    def backward(ctx, grad_row):
        q, k, scale, bias, inv_norm_q, inv_norm_k = ctx.saved_tensors
        kernels, normalize, eps, diag_offset = ctx.options
        grad_row = grad_row.to(inv_norm_q.dtype).contiguous()
        grad_u, grad_v, grad_bias = kernels.softplus_backward(
            q, k, inv_norm_q, inv_norm_k, scale, bias, diag_offset, grad_row)
        grad_q, radial_sum = _input_grad(q, inv_norm_q, grad_u, normalize, eps)
        grad_k, _ = _input_grad(k, inv_norm_k, grad_v, normalize, eps)
        grad_scale = _grad_scale(scale, radial_sum) if ctx.needs_input_grad[2] else None
        grad_bias = grad_bias if ctx.needs_input_grad[3] else None
        return grad_q, grad_k, grad_scale, grad_bias, None, None, None, None


def _check_common(q, k, normalize, eps, diag_offset, backend, chunk_size) -> None:
    check.check_compatible("q", q, "k", k, same_rows=False)
    check.check_flag("normalize", normalize)
    check.check_eps(eps)
    check.check_diag_offset(diag_offset)
    check.check_backend(backend)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def _kernels(backend: str, device: torch.device, chunk_size: Optional[int]):
    if chunk_size is None:
        return get_kernels(backend, device)
    if backend not in ("torch", "auto"):
        raise ValueError(f"chunk_size applies to backend='torch' only, got backend={backend!r}")
    return get_kernels("torch", device, chunk_size=chunk_size)


def similarity_lse(
    q: Tensor, k: Tensor, scale=1.0, *, rows: bool = True, cols: bool = False,
    normalize: bool = True, eps: float = DEFAULT_EPS, diag_offset: Optional[int] = None,
    backend: str = "auto", chunk_size: Optional[int] = None,
) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Row and/or column log-sum-exp of S = scale * normalize(q) @ normalize(k).T without forming S.

    q: (N, D), k: (M, D), same float dtype and device. scale: float or 0-d tensor > 0 (gets a
    gradient if it requires one). diag_offset: mask S[i, i + diag_offset] (None: no mask).
    chunk_size: rows of S per chunk for backend "torch". Returns (lse_row (N,) if rows else None,
    lse_col (M,) if cols else None) in the statistics dtype.
    """
    _check_common(q, k, normalize, eps, diag_offset, backend, chunk_size)
    check.check_positive_scalar("scale", scale, q.device)
    check.check_flag("rows", rows)
    check.check_flag("cols", cols)
    if not (rows or cols):
        raise ValueError("similarity_lse needs rows=True or cols=True (got both False)")
    scale = as_scalar_tensor(scale, statistics_dtype(q.dtype), q.device)
    return lse_statistics(q, k, scale, rows=rows, cols=cols, normalize=normalize, eps=eps,
                          diag_offset=diag_offset, backend=backend, chunk_size=chunk_size)


def similarity_softplus(
    q: Tensor, k: Tensor, scale=1.0, bias=0.0, *, normalize: bool = True,
    eps: float = DEFAULT_EPS, diag_offset: Optional[int] = None, backend: str = "auto",
    chunk_size: Optional[int] = None,
) -> Tensor:
    """Row sums sp_row_i = sum_j softplus(S_ij + bias), S as in ``similarity_lse``.

    bias: float or finite 0-d tensor (gets a gradient if it requires one). Returns (N,) in the
    statistics dtype.
    """
    _check_common(q, k, normalize, eps, diag_offset, backend, chunk_size)
    check.check_positive_scalar("scale", scale, q.device)
    check.check_finite_scalar("bias", bias, q.device)
    dtype = statistics_dtype(q.dtype)
    scale = as_scalar_tensor(scale, dtype, q.device)
    bias = as_scalar_tensor(bias, dtype, q.device)
    return softplus_statistics(q, k, scale, bias, normalize=normalize, eps=eps,
                               diag_offset=diag_offset, backend=backend, chunk_size=chunk_size)


def lse_statistics(q, k, scale: Tensor, *, rows, cols, normalize, diag_offset=None,
                   eps=DEFAULT_EPS, backend="auto", chunk_size=None):
    """``similarity_lse`` on arguments already checked, with ``scale`` a 0-d statistics tensor."""
    kernels = _kernels(backend, q.device, chunk_size)
    return _SimilarityLSE.apply(q, k, scale, kernels, normalize, eps, diag_offset, rows, cols)


def softplus_statistics(q, k, scale: Tensor, bias: Tensor, *, normalize, diag_offset=None,
                        eps=DEFAULT_EPS, backend="auto", chunk_size=None):
    """``similarity_softplus`` on checked arguments; ``scale``, ``bias``: 0-d statistics tensors."""
    kernels = _kernels(backend, q.device, chunk_size)
    return _SimilaritySoftplus.apply(q, k, scale, bias, kernels, normalize, eps, diag_offset)
