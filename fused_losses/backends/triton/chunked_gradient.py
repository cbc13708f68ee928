"""Backward with W written in bounded row chunks (option ``gradient="chunked"``, the default): the
triton weights writer of ``fused_losses.backends.chunked_backward``, which runs the two products
with the vendor GEMM.

The weights kernel recomputes S over the same flattened (column tile, D step) loop as the forward
(1 GEMM-equivalent) and writes (row_scale_i col_scale_j) W_ij in the input dtype; each program
walks a range of column tiles of one block of rows.
"""

from __future__ import annotations

from typing import Optional, Tuple

import triton
import triton.language as tl
from torch import Tensor

from fused_losses.backends import chunked_backward
from fused_losses.backends.triton import launch
from fused_losses.backends.triton.operands import Similarity, WeightTerms
from fused_losses.backends.triton.tiles import (
    column_terms, finished_tile, flattened_range, flattened_step, is_edge, row_block_setup, row_terms,
)


@triton.jit(do_not_specialize=["first_row_block", "blocks_per_split"])
def weights_kernel(
    q_src, k_src, inv_norm_q_ptr, inv_norm_k_ptr, scale_ptr, n_rows, n_cols, dim, diag_offset,
    row_labels_ptr, col_labels_ptr, stride_qn, stride_qd, stride_kn, stride_kd,
    row_stat_ptr, row_grad_ptr, col_stat_ptr, col_grad_ptr, col_base_ptr, col_ref_ptr,
    row_scale_ptr, col_scale_ptr, weights_ptr, weights_row_stride, weight_sums_ptr,
    first_row_block, blocks_per_split,
    row_constants_fn: tl.constexpr, weights_fn: tl.constexpr, LOGIT_UNIT: tl.constexpr,
    HAS_ROW_TERM: tl.constexpr, HAS_COL_TERM: tl.constexpr, SUM_WEIGHTS: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_LABELS: tl.constexpr, EXCLUDE_SAME: tl.constexpr, TMA: tl.constexpr,
    EVEN_D: tl.constexpr, APPROX_MATH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Program (row block b of the chunk, column split c): for the split's columns,
    weights[rows - chunk start, cols] = (row_scale_i col_scale_j) W_ij rounded to the weights'
    dtype (row_scale holds the chunk's rows); with SUM_WEIGHTS, weight_sums[b, c] = their fp32
    sum of W (unscaled)."""
    local_block = tl.program_id(0)
    row_block = first_row_block + local_block
    row_start, rows, row_in, row_factor = row_block_setup(inv_norm_q_ptr, scale_ptr, row_block, n_rows, LOGIT_UNIT, BLOCK_M)
    row_edge = is_edge(row_block, n_rows, BLOCK_M)
    row = row_terms(row_stat_ptr, row_grad_ptr, rows, row_in, row_constants_fn, HAS_ROW_TERM, HAS_COL_TERM, BLOCK_M)
    local_rows = local_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_scale = tl.load(row_scale_ptr + local_rows, mask=row_in, other=0.0)
    out_row_ptrs = weights_ptr + local_rows.to(tl.int64) * weights_row_stride
    weight_sums = tl.zeros((BLOCK_M,), tl.float32)
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
            col = column_terms(col_stat_ptr, col_grad_ptr, col_base_ptr, col_ref_ptr, cols, col_in, col_block,
                               HAS_ROW_TERM, HAS_COL_TERM, BLOCK_N)
            w = weights_fn(s, row, col, HAS_ROW_TERM, HAS_COL_TERM)
            if SUM_WEIGHTS:
                weight_sums += tl.sum(w, 1)
            col_scale = tl.load(col_scale_ptr + cols, mask=col_in, other=0.0)
            scaled = w * (row_scale[:, None] * col_scale[None, :])
            tl.store(out_row_ptrs[:, None] + cols[None, :], scaled.to(weights_ptr.dtype.element_ty),
                     mask=row_in[:, None] & col_in[None, :])
    if SUM_WEIGHTS:
        tl.store(weight_sums_ptr + local_block * tl.num_programs(1) + tl.program_id(1), tl.sum(weight_sums))


def chunked_gradients(
    sim: Similarity, terms: WeightTerms, weights, sum_weights: bool, config: launch.KernelConfig,
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """(U, V, sum of W or None); see ``gradient.similarity_gradients``. ``weights``: the
    primitive's ``gradient.WeightFunctions``; ``config``: the weights kernel's tiles."""
    return chunked_backward.chunked_backward(
        sim.q, sim.k, sim.inv_norm_q, sim.inv_norm_k, sim.scale, chunked_backward.weight_bound(*terms.grads()),
        weights_writer(sim, terms, weights, sum_weights, config), row_multiple=config.block_m, sum_weights=sum_weights)


def weights_writer(sim: Similarity, terms: WeightTerms, weights, sum_weights: bool,
                   config: launch.KernelConfig) -> chunked_backward.WeightsWriter:
    """The weights writer of ``chunked_backward`` for these terms: launches ``weights_kernel`` on
    one chunk of rows (chunk starts multiples of config.block_m)."""
    options = dict(row_constants_fn=weights.row_constants, weights_fn=weights.weights, LOGIT_UNIT=weights.logit_unit,
                   SUM_WEIGHTS=sum_weights, **terms.flags(), **sim.tile_options(config))
    term_args = terms.kernel_args(config.block_n)
    num_col_blocks = launch.cdiv(sim.m, config.block_n)
    resident: list[int] = []  # programs per launch, from the first chunk's kernel (every chunk compiles alike)

    def write_weights(out: Tensor, start: int, stop: int, row_scale: Tensor, col_scale: Tensor) -> Optional[Tensor]:
        num_row_blocks = launch.cdiv(stop - start, config.block_m)

        def args(weight_sums, blocks_per_split):
            return (*sim.kernel_args(config), *term_args, row_scale, col_scale, out, out.stride(0), weight_sums,
                    start // config.block_m, blocks_per_split)

        if not resident:
            stand_in = sim.scratch(1) if sum_weights else None
            resident.append(launch.resident_programs(weights_kernel, args(stand_in, 1), options, sim.device))
        splits, blocks_per_split = launch.plan_splits(num_col_blocks, num_row_blocks, resident[0], num_col_blocks)
        weight_sums = sim.scratch(num_row_blocks, splits) if sum_weights else None
        weights_kernel[(num_row_blocks, splits)](*args(weight_sums, blocks_per_split), **options)
        return weight_sums.sum() if sum_weights else None

    return write_weights
