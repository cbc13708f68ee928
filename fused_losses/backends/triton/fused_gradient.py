"""Backward with W kept on chip (option ``gradient="fused"``, kept to compare with the chunked
default on a GPU).

One kernel computes, for a block of rows, sum_j W_ij c_j k_j, recomputing S tile by tile and
turning it into W with the primitive's weights functions. V is the same kernel run on the
transposed problem, so each direction costs 2 GEMM-equivalents (recompute + product) when the
features fit one block of ``launch.FUSED_BLOCK_OUT``, 1 + (feature blocks) otherwise.

W is rounded to the input dtype for the product: the gradients are scaled first (``weight_scale``)
so that it stays a normal number. Determinism: a program owns its output rows; when the reduced
dimension is split over programs to fill the GPU, partial sums go to a (splits, rows, D) buffer
summed by torch in a fixed order (``deterministic=False`` adds them with fp32 atomics instead).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fused_losses.backends.triton import launch
from fused_losses.backends.triton.operands import Similarity, WeightTerms
from fused_losses.backends.triton.tiles import (
    column_terms, is_edge, load_block, row_block_setup, row_terms, similarity_tile, split_block_range,
)

# Scaling the gradients so that the largest |grad| maps to 2^k (k <= 12, about log2 sqrt(max(N, M)))
# keeps typical weights (grad / N or grad / M) normal fp16 numbers and the largest (<= 2 grads) far
# below fp16's overflow.
MAX_WEIGHT_EXPONENT = 12


def weight_scale(grads: List[Tensor], n: int, m: int) -> Tensor:
    """0-d fp32 factor for the gradients (see MAX_WEIGHT_EXPONENT); computed on the device."""
    largest = torch.stack([g.detach().abs().max().to(torch.float32) for g in grads]).max()
    exponent = min(MAX_WEIGHT_EXPONENT, max(n, m).bit_length() // 2)
    # The floor keeps the factor finite (<= 1 / tiny) when every gradient is 0 or nearly so: with
    # an inf factor, 0 * inf = NaN would reach W.
    floor = torch.finfo(torch.float32).tiny * 2.0**MAX_WEIGHT_EXPONENT
    return float(2**exponent) / largest.clamp_min(floor)


@triton.jit(do_not_specialize=["blocks_per_split"])
def fused_gradient_kernel(
    q_ptr, k_ptr, inv_norm_q_ptr, inv_norm_k_ptr, scale_ptr, n_rows, n_cols, dim, diag_offset,
    row_labels_ptr, col_labels_ptr, stride_qn, stride_qd, stride_kn, stride_kd,
    row_stat_ptr, row_grad_ptr, col_stat_ptr, col_grad_ptr, col_base_ptr, col_ref_ptr, out_scale_ptr,
    out_ptr, out_split_stride, weight_sums_ptr, blocks_per_split,
    row_constants_fn: tl.constexpr, weights_fn: tl.constexpr, LOGIT_UNIT: tl.constexpr,
    HAS_ROW_TERM: tl.constexpr, HAS_COL_TERM: tl.constexpr, ATOMIC_OUT: tl.constexpr, SUM_WEIGHTS: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_LABELS: tl.constexpr, EXCLUDE_SAME: tl.constexpr, EVEN_D: tl.constexpr,
    APPROX_MATH: tl.constexpr,
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
    row_start, rows, row_in, row_factor = row_block_setup(inv_norm_q_ptr, scale_ptr, row_block, n_rows, LOGIT_UNIT, BLOCK_M)
    row_edge = is_edge(row_block, n_rows, BLOCK_M)
    row = row_terms(row_stat_ptr, row_grad_ptr, rows, row_in, row_constants_fn, HAS_ROW_TERM, HAS_COL_TERM, BLOCK_M)
    features = feature_block * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    feature_in = features < dim
    acc = tl.zeros((BLOCK_M, BLOCK_OUT), tl.float32)
    weight_sums = tl.zeros((BLOCK_M,), tl.float32)
    first, last = split_block_range(split, blocks_per_split, n_cols, BLOCK_N)
    for col_block in range(first, last):
        s, cols, col_in, col_factor = similarity_tile(
            row_start, rows, row_in, row_factor, row_labels_ptr, q_ptr, k_ptr, inv_norm_k_ptr, col_labels_ptr, col_block,
            n_rows, n_cols, dim, diag_offset, stride_qn, stride_qd, stride_kn, stride_kd, row_edge,
            HAS_MASK, HAS_LABELS, EXCLUDE_SAME, EVEN_D, BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION)
        col = column_terms(col_stat_ptr, col_grad_ptr, col_base_ptr, col_ref_ptr, cols, col_in, col_block,
                           HAS_ROW_TERM, HAS_COL_TERM, BLOCK_N)
        w = weights_fn(s, row, col, HAS_ROW_TERM, HAS_COL_TERM)
        if SUM_WEIGHTS:
            weight_sums += tl.sum(w, 1)
        # c_j goes on the operand, not on W: v = c k is bounded by 1 in fp16, W * c_j is not.
        k_row_ptrs = k_ptr + cols.to(tl.int64) * stride_kn
        v = load_block(k_row_ptrs, col_in, features, feature_in, stride_kd, False) * col_factor[:, None]
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
    sim: Similarity, terms: WeightTerms, weights, deterministic: bool, sum_weights: bool,
    config: launch.KernelConfig,
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """(U, V, sum of W or None); see ``gradient.similarity_gradients``. ``weights``: the
    primitive's ``gradient.WeightFunctions``."""
    factor = weight_scale(terms.grads(), sim.n, sim.m)
    scaled = terms.scaled(factor)
    args = (weights, sim.scale / factor, deterministic, config)
    u, weight_sum = _row_gradients(sim, scaled, *args, sum_weights=sum_weights)
    v, _ = _row_gradients(sim.transposed(), scaled.transposed(), *args, sum_weights=False)
    return u, v, None if weight_sum is None else weight_sum / factor


def _row_gradients(sim: Similarity, terms: WeightTerms, weights, out_scale: Tensor, deterministic: bool,
                   config: launch.KernelConfig, sum_weights: bool):
    """(out_scale * W (c k) (N, D), sum of W or None) for the rows of ``sim``."""
    num_row_blocks = launch.cdiv(sim.n, config.block_m)
    num_feature_blocks = launch.cdiv(sim.dim, config.block_out)
    num_col_blocks = launch.cdiv(sim.m, config.block_n)
    max_splits = launch.max_gradient_splits(sim.n, sim.dim) if deterministic else num_col_blocks
    options = dict(row_constants_fn=weights.row_constants, weights_fn=weights.weights, LOGIT_UNIT=weights.logit_unit,
                   SUM_WEIGHTS=sum_weights, BLOCK_OUT=config.block_out, **terms.flags(), **sim.tile_options(config, tma=False))
    term_args = terms.kernel_args(config.block_n)
    stand_in = sim.scratch(1)
    # Occupancy of the non-atomic build (whether to add atomically follows from the splits).
    resident = launch.resident_programs(
        fused_gradient_kernel,
        (*sim.kernel_args(), *term_args, out_scale, stand_in, sim.n * sim.dim, stand_in if sum_weights else None, 1),
        dict(options, ATOMIC_OUT=False), sim.device)
    splits, blocks_per_split = launch.plan_splits(
        num_col_blocks, num_row_blocks * num_feature_blocks, resident, max_splits)
    atomic = splits > 1 and not deterministic
    if atomic:
        out = torch.zeros((sim.n, sim.dim), dtype=torch.float32, device=sim.device)
    else:
        out = sim.scratch(splits, sim.n, sim.dim)
    weight_sums = sim.scratch(splits, num_row_blocks) if sum_weights else None
    fused_gradient_kernel[(num_row_blocks, num_feature_blocks, splits)](
        *sim.kernel_args(), *term_args, out_scale, out, sim.n * sim.dim, weight_sums, blocks_per_split,
        ATOMIC_OUT=atomic, **options,
    )
    if not atomic:
        out = out[0] if splits == 1 else out.sum(dim=0)
    return out, weight_sums.sum() if sum_weights else None
