"""Backward with W kept on chip (D up to ``launch.FUSED_GRADIENT_MAX_DIM``).

One kernel computes, for a block of rows, sum_j W_ij c_j k_j, recomputing S tile by tile and
turning it into W with a primitive-specific ``weights_fn``. V is the same kernel run on the
transposed problem, so each direction costs 2 GEMM-equivalents (recompute + product) when the
features fit one block, 1 + (feature blocks) otherwise.

Determinism: a program owns its output rows; when the reduced dimension is split over programs
to fill the GPU, partial sums go to a (splits, rows, D) buffer summed by torch in a fixed order
(``deterministic=False`` adds them with fp32 atomics instead).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fused_losses.backends.triton import launch
from fused_losses.backends.triton.operands import Similarity, WeightTerms
from fused_losses.backends.triton.tiles import (
    load_block, load_gradient_term, row_block_setup, similarity_tile, split_block_range,
)


@triton.jit
def fused_gradient_kernel(
    q_ptr, k_ptr, inv_norm_q_ptr, inv_norm_k_ptr, scale_ptr, n_rows, n_cols, dim, diag_offset,
    stride_qn, stride_qd, stride_kn, stride_kd,
    row_stat_ptr, row_grad_ptr, col_stat_ptr, col_grad_ptr, out_scale_ptr,
    out_ptr, out_split_stride, weight_sums_ptr, blocks_per_split,
    weights_fn: tl.constexpr, LOGIT_UNIT: tl.constexpr,
    HAS_ROW_TERM: tl.constexpr, HAS_COL_TERM: tl.constexpr, HAS_MASK: tl.constexpr,
    ATOMIC_OUT: tl.constexpr, SUM_WEIGHTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_OUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Program (row block, block of output features, column split c):
    out[c, rows, features] = out_scale * sum over the split's columns j of W_ij c_j k_j[features]
    (added atomically to out[rows, features] with ATOMIC_OUT). With SUM_WEIGHTS, the programs of
    feature block 0 store their sum of W in weight_sums[c, row block]."""
    row_block = tl.program_id(0)
    feature_block = tl.program_id(1)
    split = tl.program_id(2)
    dtype = q_ptr.dtype.element_ty
    rows, q_row_ptrs, row_in, row_factor = row_block_setup(
        q_ptr, inv_norm_q_ptr, scale_ptr, row_block, n_rows, stride_qn, LOGIT_UNIT, BLOCK_M)
    row_stat, row_grad = load_gradient_term(row_stat_ptr, row_grad_ptr, rows, row_in, HAS_ROW_TERM, BLOCK_M)
    features = feature_block * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    feature_in = features < dim
    acc = tl.zeros((BLOCK_M, BLOCK_OUT), tl.float32)
    weight_sums = tl.zeros((BLOCK_M,), tl.float32)
    first, last = split_block_range(split, blocks_per_split, n_cols, BLOCK_N)
    for col_block in range(first, last):
        s, cols, col_in, k_row_ptrs, col_factor = similarity_tile(
            rows, q_row_ptrs, row_in, row_factor, k_ptr, inv_norm_k_ptr, col_block,
            n_cols, dim, diag_offset, stride_qd, stride_kn, stride_kd,
            HAS_MASK, BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION)
        col_stat, col_grad = load_gradient_term(col_stat_ptr, col_grad_ptr, cols, col_in, HAS_COL_TERM, BLOCK_N)
        w = weights_fn(s, row_stat, row_grad, col_stat, col_grad, HAS_ROW_TERM, HAS_COL_TERM)
        if SUM_WEIGHTS:
            weight_sums += tl.sum(w, 1)
        # c_j goes on the operand, not on W: v = c k is bounded by 1 in fp16, W * c_j is not.
        v = load_block(k_row_ptrs, col_in, features, feature_in, stride_kd) * col_factor[:, None]
        acc = tl.dot(w.to(dtype), v.to(dtype), acc, input_precision=INPUT_PRECISION)
    acc = acc * tl.load(out_scale_ptr)
    offsets = rows.to(tl.int64)[:, None] * dim + features[None, :]
    out_mask = row_in[:, None] & feature_in[None, :]
    if ATOMIC_OUT:
        tl.atomic_add(out_ptr + offsets, acc, mask=out_mask)
    else:
        tl.store(out_ptr + split * out_split_stride + offsets, acc, mask=out_mask)
    if SUM_WEIGHTS:
        if feature_block == 0:
            tl.store(weight_sums_ptr + split * tl.num_programs(0) + row_block, tl.sum(weight_sums))


def fused_gradients(
    sim: Similarity, terms: WeightTerms, weights_fn, logit_unit: float, out_scale: Tensor,
    deterministic: bool, sum_weights: bool, config: launch.KernelConfig,
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """(U, V, sum of W or None); see ``gradient.similarity_gradients``."""
    args = (weights_fn, logit_unit, out_scale, deterministic, config)
    u, weight_sum = _row_gradients(sim, terms, *args, sum_weights=sum_weights)
    v, _ = _row_gradients(sim.transposed(), terms.transposed(), *args, sum_weights=False)
    return u, v, weight_sum


def _row_gradients(sim: Similarity, terms: WeightTerms, weights_fn, logit_unit: float, out_scale: Tensor,
                   deterministic: bool, config: launch.KernelConfig, sum_weights: bool):
    """(out_scale * W (c k) (N, D), sum of W or None) for the rows of ``sim``."""
    num_row_blocks = launch.cdiv(sim.n, config.block_m)
    num_feature_blocks = launch.cdiv(sim.dim, config.block_out)
    num_col_blocks = launch.cdiv(sim.m, config.block_n)
    max_splits = launch.max_gradient_splits(sim.n, sim.dim) if deterministic else num_col_blocks
    splits, blocks_per_split = launch.split_blocks(
        num_col_blocks, num_row_blocks * num_feature_blocks, sim.device, max_splits)
    atomic = splits > 1 and not deterministic
    if atomic:
        out = torch.zeros((sim.n, sim.dim), dtype=torch.float32, device=sim.device)
    else:
        out = sim.scratch(splits, sim.n, sim.dim)
    weight_sums = sim.scratch(splits, num_row_blocks) if sum_weights else None
    fused_gradient_kernel[(num_row_blocks, num_feature_blocks, splits)](
        *sim.kernel_args(), *terms.kernel_args(), out_scale,
        out, sim.n * sim.dim, weight_sums, blocks_per_split,
        weights_fn=weights_fn, LOGIT_UNIT=logit_unit, **terms.flags(),
        HAS_MASK=sim.diag_offset is not None, ATOMIC_OUT=atomic, SUM_WEIGHTS=sum_weights,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=config.block_d, BLOCK_OUT=config.block_out,
        INPUT_PRECISION=sim.input_precision(), num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if not atomic:
        out = out[0] if splits == 1 else out.sum(dim=0)
    return out, weight_sums.sum() if sum_weights else None
