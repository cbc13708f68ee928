"""The operands of one call, checked once, and their kernel arguments."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from fused_losses.backends.base import LabelMask
from fused_losses.backends.triton import SUPPORTED_DTYPES, launch

LABEL_DTYPES = (torch.int32, torch.int64)
# The kernels compute feature offsets (feature index x feature stride) in int32.
MAX_INT32 = 2**31 - 1


@dataclass(frozen=True)
class Similarity:
    """S = scale * (r q) (c k)^T with q (N, D), k (M, D) of one dtype, any strides; inv_norm_q
    (N,), inv_norm_k (M,) and scale (0-d) fp32; entries (i, i + diag_offset) masked, and with
    ``label_mask`` the entries (i, j) where (row_labels[i] == col_labels[j]) == exclude_same."""

    q: Tensor
    k: Tensor
    inv_norm_q: Tensor
    inv_norm_k: Tensor
    scale: Tensor
    diag_offset: Optional[int]
    label_mask: Optional[LabelMask] = None

    @classmethod
    def checked(cls, q, k, inv_norm_q, inv_norm_k, scale, diag_offset,
                label_mask: Optional[LabelMask] = None) -> "Similarity":
        """The operands of a kernel call, validated; statistics converted with ``as_stat``."""
        if q.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"the triton backend takes float16, bfloat16 or float32 inputs, got {q.dtype}; "
                "use backend='torch' for float64"
            )
        if k.dtype != q.dtype:
            raise TypeError(f"q and k must share one dtype, got {q.dtype} and {k.dtype}")
        if q.dim() != 2 or k.dim() != 2 or q.shape[1] != k.shape[1]:
            raise ValueError(f"expected q (N, D) and k (M, D), got {tuple(q.shape)} and {tuple(k.shape)}")
        if k.device != q.device:
            raise ValueError(f"q and k must be on one device, got {q.device} and {k.device}")
        if label_mask is not None:
            _check_label_mask(label_mask, q, k)
        return cls(_int32_feature_offsets(q), _int32_feature_offsets(k), as_stat(inv_norm_q),
                   as_stat(inv_norm_k), as_stat(scale), diag_offset, label_mask)

    @property
    def n(self) -> int:
        return self.q.shape[0]

    @property
    def m(self) -> int:
        return self.k.shape[0]

    @property
    def dim(self) -> int:
        return self.q.shape[1]

    @property
    def device(self) -> torch.device:
        return self.q.device

    def transposed(self) -> "Similarity":
        """The problem for S^T: k's rows become the rows; the mask moves to (j, j - offset), the
        column labels become the row labels."""
        offset = None if self.diag_offset is None else -self.diag_offset
        labels = self.label_mask
        if labels is not None:
            labels = LabelMask(labels.col_labels, labels.row_labels, labels.exclude_same)
        return Similarity(self.k, self.q, self.inv_norm_k, self.inv_norm_q, self.scale, offset, labels)

    def input_precision(self) -> str:
        return launch.fp32_input_precision() if self.q.dtype == torch.float32 else "ieee"

    def tile_options(self, config: launch.KernelConfig, tma: bool = True) -> dict:
        """Constexprs and launch options of the tile kernels for ``config``: masks (diagonal;
        labels, and whether they exclude the equal or the different ones), whether D splits into
        whole dot steps (no feature mask), approximate fast math (not in the interpreter), block
        sizes, dot precision, warps and stages; with ``tma``, whether ``kernel_args(config)``
        passes q and k as TMA descriptors (TMA)."""
        labels = self.label_mask
        options = dict(
            HAS_MASK=self.diag_offset is not None,
            HAS_LABELS=labels is not None, EXCLUDE_SAME=labels is not None and labels.exclude_same,
            EVEN_D=self.dim % config.block_d == 0,
            APPROX_MATH=launch.gpu_target(self.device) is not None,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=config.block_d,
            INPUT_PRECISION=self.input_precision(), num_warps=config.num_warps, num_stages=config.num_stages,
        )
        if tma:
            options["TMA"] = self.uses_descriptors()
        return options

    def uses_descriptors(self) -> bool:
        """Whether the tile kernels read q and k through TMA descriptors: both fit (see
        ``_descriptors_fit``) and the dots run on tensor cores (IEEE fp32 dots run on FMA units,
        whose operand layouts spill registers when fed from TMA)."""
        tensor_cores = self.q.dtype != torch.float32 or self.input_precision() != "ieee"
        return tensor_cores and _descriptors_fit(self.q) and _descriptors_fit(self.k)

    def kernel_args(self, config: Optional[launch.KernelConfig] = None) -> Tuple:
        """q, k, inv_norm_q, inv_norm_k, scale, N, M, D, mask offset, row and column labels (None
        without a label mask) and strides, in the order the kernels take them. With ``config``, q
        and k are TMA descriptors of (block_m, block_d) and (block_n, block_d) blocks where both
        fit (``tile_options(config)["TMA"]``)."""
        q, k = self.q, self.k
        if config is not None and self.uses_descriptors():
            from triton.tools.tensor_descriptor import TensorDescriptor

            q = TensorDescriptor.from_tensor(q, [config.block_m, config.block_d])
            k = TensorDescriptor.from_tensor(k, [config.block_n, config.block_d])
        labels = self.label_mask
        return (
            q, k, self.inv_norm_q, self.inv_norm_k, self.scale,
            self.n, self.m, self.dim, self.diag_offset or 0,
            None if labels is None else labels.row_labels, None if labels is None else labels.col_labels,
            self.q.stride(0), self.q.stride(1), self.k.stride(0), self.k.stride(1),
        )

    def scratch(self, *shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """Uninitialized buffer on the inputs' device (every buffer a kernel writes comes from here)."""
        return torch.empty(shape, dtype=dtype, device=self.device)

    def zero_gradients(self) -> Tuple[Tensor, Tensor]:
        """(U, V) when no gradient term is present: zeros (N, D) and (M, D), fp32."""
        return (torch.zeros((self.n, self.dim), dtype=torch.float32, device=self.device),
                torch.zeros((self.m, self.dim), dtype=torch.float32, device=self.device))


@dataclass(frozen=True)
class WeightTerms:
    """The backward's W_ij = row_grad_i f(S_ij, row_stat_i) + col_grad_j f(S_ij, col_stat_j); a
    term is absent when its tensors are None. fp32 contiguous vectors (N,) and (M,)."""

    row_stat: Optional[Tensor]
    row_grad: Optional[Tensor]
    col_stat: Optional[Tensor]
    col_grad: Optional[Tensor]

    def transposed(self) -> "WeightTerms":
        return WeightTerms(self.col_stat, self.col_grad, self.row_stat, self.row_grad)

    def scaled(self, factor: Tensor) -> "WeightTerms":
        """The terms of factor * W."""
        return replace(self, row_grad=None if self.row_grad is None else self.row_grad * factor,
                       col_grad=None if self.col_grad is None else self.col_grad * factor)

    def grads(self) -> List[Tensor]:
        return [g for g in (self.row_grad, self.col_grad) if g is not None]

    def kernel_args(self, block_n: int) -> Tuple:
        """row_stat, row_grad, col_stat, col_grad, col_base, col_ref as the kernels take them; the
        last two only with both terms (softmax weights in log2 units, +inf stats for empty lines):
        col_ref[t] = min of col_stat over column tile t of ``block_n`` columns and
        col_base_j = col_grad_j 2^(col_ref[tile of j] - col_stat_j), so that a tile's column
        coefficients col_grad_j 2^(shift - col_stat_j) cost one product, not an exponential."""
        base = ref = None
        if self.row_grad is not None and self.col_grad is not None:
            m = self.col_stat.shape[0]
            tiles = -(-m // block_n)
            padded = self.col_stat.new_full((tiles * block_n,), float("inf"))
            padded[:m] = self.col_stat
            ref = padded.view(tiles, block_n).amin(dim=1)
            exponent = ref.repeat_interleave(block_n)[:m] - self.col_stat
            base = torch.where(self.col_stat == float("inf"), 0.0, self.col_grad * torch.exp2(exponent))
        return self.row_stat, self.row_grad, self.col_stat, self.col_grad, base, ref

    def flags(self) -> dict:
        """HAS_ROW_TERM / HAS_COL_TERM constexprs."""
        return dict(HAS_ROW_TERM=self.row_grad is not None, HAS_COL_TERM=self.col_grad is not None)


def as_stat(t: Tensor) -> Tensor:
    """Statistics-dtype vector or scalar as the kernels read it: contiguous fp32 (O(N) copy at most)."""
    return t.to(torch.float32).contiguous()


def _check_label_mask(label_mask: LabelMask, q: Tensor, k: Tensor) -> None:
    """The kernels read labels as contiguous int32 / int64 vectors of N and M entries."""
    row_labels, col_labels, _ = label_mask
    if row_labels.dtype not in LABEL_DTYPES or col_labels.dtype != row_labels.dtype:
        raise TypeError(f"row and column labels must both be int32 or both int64, got {row_labels.dtype} "
                        f"and {col_labels.dtype}")
    for name, labels, x in (("row labels", row_labels, q), ("column labels", col_labels, k)):
        if labels.shape != x.shape[:1] or labels.device != x.device or not labels.is_contiguous():
            raise ValueError(f"{name} must be a contiguous vector of shape {tuple(x.shape[:1])} on {x.device}, "
                             f"got shape {tuple(labels.shape)} on {labels.device} (contiguous: "
                             f"{labels.is_contiguous()})")


def _descriptors_fit(x: Tensor) -> bool:
    """Whether ``x`` (rows, D) can be read through a TMA descriptor: unit feature stride, row
    stride and base address multiples of 16 bytes."""
    row_bytes = x.stride(0) * x.element_size()
    return x.stride(1) == 1 and row_bytes % 16 == 0 and x.data_ptr() % 16 == 0 and x.shape[0] > 0


def _int32_feature_offsets(x: Tensor) -> Tensor:
    """``x`` (rows, D), copied to row-major layout when its largest feature offset (D - 1) x
    stride(1) would overflow the kernels' int32 arithmetic (row offsets are int64 already)."""
    if (x.shape[1] - 1) * x.stride(1) > MAX_INT32:
        return x.contiguous()
    return x


def device_guard(device: torch.device):
    """Context in which triton launches on ``device``: triton uses the current CUDA device and its
    current stream, not the tensors' device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
