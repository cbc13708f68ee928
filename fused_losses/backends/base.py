"""The contract every backend implements: the two similarity primitives, forward and backward.

The math every backend agrees on is stated here (the losses built on it: fused_losses/functional.py;
the chain rule to the raw inputs: fused_losses/primitives.py). Inputs q (N, D) and k (M, D) share
one float dtype and device and may be non-contiguous. ``inv_norm_q`` (N,) and ``inv_norm_k`` (M,)
are the inverse norms r_i = 1 / max(|q_i|, eps) and c_j (all ones when not normalizing),
contiguous, in the *statistics dtype*: float64 for float64 inputs, float32 otherwise. ``scale``
and ``bias`` are 0-d tensors of the statistics dtype on the inputs' device (never read on the
host, so no device sync).

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
``fused_losses.primitives`` from U and V; backends never see it, nor an empty q or k (N = 0 or
M = 0: sums over nothing, which the primitives answer themselves). Nothing of size N x M may be
kept beyond one bounded tile or chunk.

Optional features. A backend module lists the optional features it implements in its
``FEATURES`` (a frozenset of the names below); the registry never selects a backend for a call
that needs a feature it lacks, and the primitives pass a feature's keyword argument only when the
call uses it, so a backend without the feature never sees the keyword.

``LABEL_MASK``: ``lse_forward`` and ``lse_backward`` take ``label_mask``, a ``LabelMask`` with row
labels y (N,) and column labels z (M,) (contiguous, on the inputs' device, both int32 or both
int64) and ``exclude_same``. Entry (i, j) is then also masked (S_ij = -inf) where

    (y_i == z_j) == exclude_same

that is, exclude_same=True masks the pairs of equal labels (a row's negatives remain) and
exclude_same=False masks the pairs of different labels (a row's positives remain). It combines
with the diagonal mask by "or": an entry masked by either is masked. A kernel loads the labels of
its tile's rows and columns next to the diagonal test; everything else, the -inf of a fully
masked row or column and its zero gradient, is as above.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Protocol, Tuple

from torch import Tensor

LABEL_MASK = "label_mask"

# Every optional feature: what a user asks for to need it (named in errors).
OPTIONAL_FEATURES = {
    LABEL_MASK: "a label mask (row_labels / col_labels of similarity_lse)",
}


class LabelMask(NamedTuple):
    """The ``LABEL_MASK`` feature's argument: mask (i, j) where (row_labels[i] == col_labels[j])
    == exclude_same."""

    row_labels: Tensor
    col_labels: Tensor
    exclude_same: bool


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


class FeatureUnsupported(BackendUnavailable, NotImplementedError):
    """The requested backend runs here but does not implement an optional feature the call needs;
    the message names the option and the backends that implement it."""
