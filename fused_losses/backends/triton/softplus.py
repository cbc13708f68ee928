"""Similarity softplus-sum (SigLIP): forward kernel and the sigmoid weights of the backward.

Tiles are handled in log2 units (S * log2(e), bias likewise): softplus(x) = ln 2 * log2(1 + 2^y)
with y = x log2(e), so every exponential and logarithm is one exp2 / log2.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fused_losses.backends.triton import launch
from fused_losses.backends.triton.gradient import GradientOptions, WeightFunctions, similarity_gradients
from fused_losses.backends.triton.operands import Similarity, WeightTerms
from fused_losses.backends.triton.tiles import (
    fast_log2, finished_tile, flattened_range, flattened_step, is_edge, row_block_setup,
)

LOG2E = tl.constexpr(math.log2(math.e))
LN2 = tl.constexpr(math.log(2.0))
# Below this z, log2(1 + z) comes from its series: the approximate log2 has an absolute error
# (~2^-22) that is large relative to log2(1 + z) ~ 1.44 z there; the series' truncation error
# (z^4 / 5 relative) is below 2^-26 for z < 2^-6.
SERIES_BELOW = tl.constexpr(2.0**-6)


@triton.jit
def _log2_one_plus_exp2(y, APPROX_MATH: tl.constexpr):
    """log2(1 + 2^y), accurate also where 2^-|y| is below the resolution of 1."""
    z = tl.exp2(-tl.abs(y))
    series = z * (1.0 - z * (0.5 - z * (1.0 / 3.0 - z * 0.25))) * LOG2E
    return tl.maximum(y, 0.0) + tl.where(z < SERIES_BELOW, series, fast_log2(1.0 + z, APPROX_MATH))


@triton.jit(do_not_specialize=["blocks_per_split"])
def softplus_forward_kernel(
    q_src, k_src, inv_norm_q_ptr, inv_norm_k_ptr, scale_ptr, n_rows, n_cols, dim, diag_offset,
    row_labels_ptr, col_labels_ptr, stride_qn, stride_qd, stride_kn, stride_kd,
    bias_ptr, row_partials_ptr, blocks_per_split,
    HAS_MASK: tl.constexpr, HAS_LABELS: tl.constexpr, EXCLUDE_SAME: tl.constexpr, TMA: tl.constexpr,
    EVEN_D: tl.constexpr, APPROX_MATH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Program (row block, column split c): row_partials[c, rows] = sum over the split's columns
    of softplus(S_ij + bias)."""
    row_block = tl.program_id(0)
    row_start, rows, row_in, row_factor = row_block_setup(inv_norm_q_ptr, scale_ptr, row_block, n_rows, LOG2E, BLOCK_M)
    row_edge = is_edge(row_block, n_rows, BLOCK_M)
    bias = tl.load(bias_ptr) * LOG2E
    sums = tl.zeros((BLOCK_M,), tl.float32)
    first, iterations, k_steps = flattened_range(tl.program_id(1), blocks_per_split, n_cols, dim, BLOCK_N, BLOCK_D)
    dots = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for iteration in range(0, iterations):
        dots, col_block, tile_done = flattened_step(
            iteration, first, k_steps, dots, q_src, k_src, row_start, n_rows, n_cols, dim, stride_qn, stride_qd,
            stride_kn, stride_kd, TMA, EVEN_D, BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION)
        if tile_done:
            s, cols, col_in, dots = finished_tile(
                dots, rows, row_in, row_factor, row_labels_ptr, row_edge, inv_norm_k_ptr, col_labels_ptr, col_block,
                n_cols, diag_offset, HAS_MASK, HAS_LABELS, EXCLUDE_SAME, BLOCK_N)
            sums += tl.sum(_log2_one_plus_exp2(s + bias, APPROX_MATH), 1)
    tl.store(row_partials_ptr + tl.program_id(1) * n_rows + rows, sums * LN2, mask=row_in)


@triton.jit
def sigmoid_row_constants(row_stat, row_grad, HAS_ROW_TERM: tl.constexpr, HAS_COL_TERM: tl.constexpr):
    """No per-program constants: (0, 0, row_grad) in the layout ``sigmoid_weights`` expects."""
    return 0.0, 0.0, row_grad


@triton.jit
def sigmoid_weights(s, row, col, HAS_ROW_TERM: tl.constexpr, HAS_COL_TERM: tl.constexpr):
    """W = row_grad_i sigmoid(S_ij + bias) for a log2-unit tile, with the log2-unit bias as the
    stat; the primitive has one term: the row term, or the column term of the transposed problem."""
    if HAS_ROW_TERM:
        row_stat, row_grad, _, _, _ = row
        return row_grad[:, None] * tl.fdiv(1.0, 1.0 + tl.exp2(-(s + row_stat[:, None])))
    col_stat, col_grad, _, _ = col
    return col_grad[None, :] * tl.fdiv(1.0, 1.0 + tl.exp2(-(s + col_stat[None, :])))


def softplus_forward(sim: Similarity, bias: Tensor) -> Tensor:
    """sp_row (N,) fp32."""
    key = ("softplus_forward", sim.dim, sim.q.dtype) + launch.shape_class(sim.n, sim.m)
    default = launch.forward_config(sim.dim, sim.q.dtype, sim.device)
    return launch.run_tuned(key, default, lambda config: softplus_forward_with(sim, bias, config))


def softplus_forward_with(sim: Similarity, bias: Tensor, config: launch.KernelConfig) -> Tensor:
    """``softplus_forward`` with the tile configuration ``config``."""
    num_row_blocks = launch.cdiv(sim.n, config.block_m)
    num_col_blocks = launch.cdiv(sim.m, config.block_n)
    options = sim.tile_options(config)
    resident = launch.resident_programs(
        softplus_forward_kernel, (*sim.kernel_args(config), bias, sim.scratch(1), 1), options, sim.device)
    splits, blocks_per_split = launch.plan_splits(num_col_blocks, num_row_blocks, resident, num_col_blocks)
    row_partials = sim.scratch(splits, sim.n)
    softplus_forward_kernel[(num_row_blocks, splits)](
        *sim.kernel_args(config), bias, row_partials, blocks_per_split, **options)
    return row_partials.sum(dim=0)


def softplus_backward(
    sim: Similarity, bias: Tensor, grad_row: Tensor, options: GradientOptions,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(U (N, D), V (M, D), grad_bias 0-d) fp32 for W = grad_row_i sigmoid(S_ij + bias)."""
    terms = WeightTerms(
        row_stat=(bias * LOG2E.value).expand(sim.n).contiguous(), row_grad=grad_row.to(torch.float32).contiguous(),
        col_stat=None, col_grad=None,
    )
    weights = WeightFunctions(sigmoid_row_constants, sigmoid_weights, LOG2E.value)
    return similarity_gradients(sim, terms, weights, options, sum_weights=True)
