"""The triton backend's SimilarityKernels (contract: fused_losses.backends.base)."""

from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor

from fused_losses.backends.base import LabelMask
from fused_losses.backends.triton import interpreter_warnings_silenced
from fused_losses.backends.triton.gradient import GRADIENT_STRATEGIES, GradientOptions
from fused_losses.backends.triton.lse import lse_backward, lse_forward
from fused_losses.backends.triton.operands import Similarity, as_stat, device_guard
from fused_losses.backends.triton.softplus import softplus_backward, softplus_forward


class TritonKernels:
    """Fused triton kernels for fp16 / bf16 / fp32 inputs (fp32 statistics and accumulation);
    the log-sum-exp implements the optional ``label_mask`` (``base.LABEL_MASK``) in every kernel.

    ``gradient``: how the backward runs (``fused_losses.backends.triton.gradient``):
    ``"chunked"`` (default) writes bounded row chunks of W and takes both products with the
    vendor GEMM; ``"fused"`` keeps W on chip and recomputes S once per direction.
    ``deterministic=True`` (default): bitwise reproducible results; partial sums over splits are
    merged by torch in a fixed order. ``deterministic=False`` lets the fused backward's splits add
    into the output with fp32 atomics (run-to-run differences in the last bits); the chunked
    backward is deterministic either way.
    """

    name = "triton"

    def __init__(self, deterministic: bool = True, gradient: str = "chunked"):
        if gradient not in GRADIENT_STRATEGIES:
            raise ValueError(f"gradient must be one of {GRADIENT_STRATEGIES}, got {gradient!r}")
        self.deterministic = deterministic
        self.gradient = gradient
        self._gradient_options = GradientOptions(gradient, deterministic)

    def lse_forward(
        self, q: Tensor, k: Tensor, inv_norm_q: Tensor, inv_norm_k: Tensor, scale: Tensor,
        diag_offset: Optional[int], want_rows: bool, want_cols: bool, label_mask: Optional[LabelMask] = None,
    ) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        with device_guard(q.device), interpreter_warnings_silenced():
            sim = Similarity.checked(q, k, inv_norm_q, inv_norm_k, scale, diag_offset, label_mask)
            return lse_forward(sim, want_rows, want_cols)

    def lse_backward(
        self, q: Tensor, k: Tensor, inv_norm_q: Tensor, inv_norm_k: Tensor, scale: Tensor,
        diag_offset: Optional[int], lse_row: Optional[Tensor], lse_col: Optional[Tensor],
        grad_row: Optional[Tensor], grad_col: Optional[Tensor], label_mask: Optional[LabelMask] = None,
    ) -> Tuple[Tensor, Tensor]:
        with device_guard(q.device), interpreter_warnings_silenced():
            sim = Similarity.checked(q, k, inv_norm_q, inv_norm_k, scale, diag_offset, label_mask)
            return lse_backward(sim, lse_row, lse_col, grad_row, grad_col, self._gradient_options)

    def softplus_forward(
        self, q: Tensor, k: Tensor, inv_norm_q: Tensor, inv_norm_k: Tensor, scale: Tensor,
        bias: Tensor, diag_offset: Optional[int],
    ) -> Tensor:
        with device_guard(q.device), interpreter_warnings_silenced():
            sim = Similarity.checked(q, k, inv_norm_q, inv_norm_k, scale, diag_offset)
            return softplus_forward(sim, as_stat(bias))

    def softplus_backward(
        self, q: Tensor, k: Tensor, inv_norm_q: Tensor, inv_norm_k: Tensor, scale: Tensor,
        bias: Tensor, diag_offset: Optional[int], grad_row: Tensor,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        with device_guard(q.device), interpreter_warnings_silenced():
            sim = Similarity.checked(q, k, inv_norm_q, inv_norm_k, scale, diag_offset)
            return softplus_backward(sim, as_stat(bias), grad_row, self._gradient_options)
