"""The contract every backend implements: the two similarity primitives, forward and backward.

Notation (see DESIGN.md section 2). Inputs q (N, D) and k (M, D) share one float dtype and device
and may be non-contiguous. ``inv_norm_q`` (N,) and ``inv_norm_k`` (M,) are the inverse norms
r_i = 1 / max(|q_i|, eps) and c_j (all ones when not normalizing), contiguous, in the *statistics
dtype*: float64 for float64 inputs, float32 otherwise. ``scale`` and ``bias`` are 0-d tensors of
the statistics dtype on the inputs' device (never read on the host, so no device sync).

    u_i = r_i q_i        v_j = c_j k_j        S_ij = scale * (u_i . v_j)

The dot products are accumulated in (at least) the statistics dtype. With ``diag_offset`` an int,
the entries (i, i + diag_offset) that lie inside the N x M matrix are masked: S_ij = -inf, so they
drop out of every sum below. ``diag_offset=None`` masks nothing.

Similarity log-sum-exp (softmax losses):
    lse_forward  -> (lse_row (N,) or None, lse_col (M,) or None)
        lse_row_i = log sum_j exp(S_ij), lse_col_j = log sum_i exp(S_ij); only the directions asked
        for are returned. A row or column whose entries are all masked gets -inf.
    lse_backward -> (U (N, D), V (M, D)), statistics dtype
        W_ij = grad_row_i exp(S_ij - lse_row_i) + grad_col_j exp(S_ij - lse_col_j)
        (a term is absent when its grad is None; entries of a -inf row / column contribute 0)
        U_i = dL/du_i = scale * sum_j W_ij v_j      V_j = dL/dv_j = scale * sum_i W_ij u_i

Similarity softplus-sum (SigLIP):
    softplus_forward  -> sp_row (N,)  with sp_row_i = sum_j softplus(S_ij + bias)
    softplus_backward -> (U (N, D), V (M, D), grad_bias 0-d)
        W_ij = grad_row_i * sigmoid(S_ij + bias), grad_bias = sum_ij W_ij, U and V as above.

The chain rule through the normalization and to ``scale`` is done once, for every backend, in
``fused_losses.primitives`` from U and V; backends never see it. Nothing of size N x M may be
kept beyond one bounded tile or chunk.
"""

from __future__ import annotations

from typing import Optional, Protocol, Tuple

from torch import Tensor


class SimilarityKernels(Protocol):
    """One backend's implementation of the two primitives (see the module docstring)."""

    name: str

    def lse_forward(
        self, q: Tensor, k: Tensor, inv_norm_q: Tensor, inv_norm_k: Tensor, scale: Tensor,
        diag_offset: Optional[int], want_rows: bool, want_cols: bool,
    ) -> Tuple[Optional[Tensor], Optional[Tensor]]: ...

    def lse_backward(
        self, q: Tensor, k: Tensor, inv_norm_q: Tensor, inv_norm_k: Tensor, scale: Tensor,
        diag_offset: Optional[int], lse_row: Optional[Tensor], lse_col: Optional[Tensor],
        grad_row: Optional[Tensor], grad_col: Optional[Tensor],
    ) -> Tuple[Tensor, Tensor]: ...

    def softplus_forward(
        self, q: Tensor, k: Tensor, inv_norm_q: Tensor, inv_norm_k: Tensor, scale: Tensor,
        bias: Tensor, diag_offset: Optional[int],
    ) -> Tensor: ...

    def softplus_backward(
        self, q: Tensor, k: Tensor, inv_norm_q: Tensor, inv_norm_k: Tensor, scale: Tensor,
        bias: Tensor, diag_offset: Optional[int], grad_row: Tensor,
    ) -> Tuple[Tensor, Tensor, Tensor]: ...


class BackendUnavailable(RuntimeError):
    """A backend was requested explicitly but cannot run here; the message says why and how."""
