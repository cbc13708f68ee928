"""Backward with W materialized in bounded row chunks (D above ``launch.FUSED_GRADIENT_MAX_DIM``).

A (D)-wide fp32 accumulator per block of rows does not fit on chip for large D, and splitting D
would recompute S once per split. Instead, per chunk of rows: one kernel recomputes S and writes W
in the input dtype (1 GEMM-equivalent), then two plain matmul launches take U = W (c k) and
V += W^T (r q) from it (1 each): 3 for the backward, plus writing W once and reading it twice.
The chunk buffer is at most ``launch.WEIGHTS_WORKSPACE_BYTES``; chunks run in order and V is
accumulated in place, so results are deterministic.
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
def weights_kernel(
    q_ptr, k_ptr, inv_norm_q_ptr, inv_norm_k_ptr, scale_ptr, n_rows, n_cols, dim, diag_offset,
    stride_qn, stride_qd, stride_kn, stride_kd,
    row_stat_ptr, row_grad_ptr, col_stat_ptr, col_grad_ptr,
    first_row_block, weights_ptr, weights_row_stride, weight_sums_ptr,
    weights_fn: tl.constexpr, LOGIT_UNIT: tl.constexpr,
    HAS_ROW_TERM: tl.constexpr, HAS_COL_TERM: tl.constexpr, HAS_MASK: tl.constexpr, SUM_WEIGHTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Program (row block b of the chunk, column block j): weights[rows - chunk start, cols] = W
    tile in the input dtype; with SUM_WEIGHTS, its fp32 sum goes to weight_sums[b, j]."""
    local_block = tl.program_id(0)
    col_block = tl.program_id(1)
    rows, q_row_ptrs, row_in, row_factor = row_block_setup(
        q_ptr, inv_norm_q_ptr, scale_ptr, first_row_block + local_block, n_rows, stride_qn, LOGIT_UNIT, BLOCK_M)
    row_stat, row_grad = load_gradient_term(row_stat_ptr, row_grad_ptr, rows, row_in, HAS_ROW_TERM, BLOCK_M)
    s, cols, col_in, _, _ = similarity_tile(
        rows, q_row_ptrs, row_in, row_factor, k_ptr, inv_norm_k_ptr, col_block,
        n_cols, dim, diag_offset, stride_qd, stride_kn, stride_kd,
        HAS_MASK, BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION)
    col_stat, col_grad = load_gradient_term(col_stat_ptr, col_grad_ptr, cols, col_in, HAS_COL_TERM, BLOCK_N)
    w = weights_fn(s, row_stat, row_grad, col_stat, col_grad, HAS_ROW_TERM, HAS_COL_TERM)
    local_rows = (local_block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    tl.store(weights_ptr + local_rows[:, None] * weights_row_stride + cols[None, :],
             w.to(q_ptr.dtype.element_ty), mask=row_in[:, None] & col_in[None, :])
    if SUM_WEIGHTS:
        tl.store(weight_sums_ptr + local_block * tl.num_programs(1) + col_block, tl.sum(w))


@triton.jit
def scaled_matmul_kernel(
    a_ptr, b_ptr, b_factor_ptr, out_scale_ptr, out_ptr, n_out_rows, n_reduce, dim,
    stride_ap, stride_ar, stride_br, stride_bd, out_split_stride, blocks_per_split,
    ACCUMULATE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_OUT: tl.constexpr,
    GROUP: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Program (output tile, split c of the reduced dimension):
    out[c, p, e] = out_scale * sum over the split's r of a[p, r] * (b_factor[r] * b[r, e])
    (+ out[c, p, e] with ACCUMULATE); a (P, R) and b (R, D) strided in the input dtype, out
    (splits, P, D) fp32 contiguous. Output tiles run in groups of GROUP row tiles that share
    the same columns of b in L2."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_p_blocks = tl.cdiv(n_out_rows, BLOCK_P)
    num_feature_blocks = tl.cdiv(dim, BLOCK_OUT)
    group_first = pid // (GROUP * num_feature_blocks) * GROUP
    group_size = tl.minimum(num_p_blocks - group_first, GROUP)
    p_block = group_first + (pid % (GROUP * num_feature_blocks)) % group_size
    feature_block = (pid % (GROUP * num_feature_blocks)) // group_size

    dtype = a_ptr.dtype.element_ty
    out_rows = p_block * BLOCK_P + tl.arange(0, BLOCK_P)
    out_row_in = out_rows < n_out_rows
    a_row_ptrs = a_ptr + out_rows.to(tl.int64) * stride_ap
    features = feature_block * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    feature_in = features < dim
    acc = tl.zeros((BLOCK_P, BLOCK_OUT), tl.float32)
    first, last = split_block_range(split, blocks_per_split, n_reduce, BLOCK_R)
    for r_block in range(first, last):
        reduced = r_block * BLOCK_R + tl.arange(0, BLOCK_R)
        reduced_in = reduced < n_reduce
        a = load_block(a_row_ptrs, out_row_in, reduced, reduced_in, stride_ar)
        b = load_block(b_ptr + reduced.to(tl.int64) * stride_br, reduced_in, features, feature_in, stride_bd)
        b = b * tl.load(b_factor_ptr + reduced, mask=reduced_in, other=0.0)[:, None]
        acc = tl.dot(a, b.to(dtype), acc, input_precision=INPUT_PRECISION)
    acc = acc * tl.load(out_scale_ptr)
    out_ptrs = out_ptr + split * out_split_stride + out_rows.to(tl.int64)[:, None] * dim + features[None, :]
    out_mask = out_row_in[:, None] & feature_in[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=out_mask, other=0.0)
    tl.store(out_ptrs, acc, mask=out_mask)


# Row tiles per L2 group of the matmul (as in triton's matmul tutorial).
MATMUL_GROUP = 8


def _scaled_matmul(sim: Similarity, a: Tensor, b: Tensor, b_factor: Tensor, out_scale: Tensor, out: Tensor,
                   accumulate: bool, config: launch.KernelConfig) -> None:
    """out (+)= out_scale * a @ (b_factor[:, None] * b), in place; out contiguous fp32. A short
    output (lopsided shapes) splits the reduced dimension into partial sums summed by torch."""
    n_out_rows, n_reduce = a.shape
    dim = b.shape[1]
    tiles = launch.cdiv(n_out_rows, config.block_m) * launch.cdiv(dim, config.block_out)
    num_reduce_blocks = launch.cdiv(n_reduce, config.block_n)
    splits, blocks_per_split = launch.split_blocks(
        num_reduce_blocks, tiles, sim.device, launch.max_gradient_splits(n_out_rows, dim))
    target = out if splits == 1 else sim.scratch(splits, n_out_rows, dim)
    scaled_matmul_kernel[(tiles, splits)](
        a, b, b_factor, out_scale, target, n_out_rows, n_reduce, dim,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), n_out_rows * dim, blocks_per_split,
        ACCUMULATE=accumulate and splits == 1, BLOCK_P=config.block_m, BLOCK_R=config.block_n,
        BLOCK_OUT=config.block_out, GROUP=MATMUL_GROUP, INPUT_PRECISION=sim.input_precision(),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if splits > 1:
        if accumulate:
            out.add_(target.sum(dim=0))
        else:
            torch.sum(target, dim=0, out=out)


def chunked_gradients(
    sim: Similarity, terms: WeightTerms, weights_fn, logit_unit: float, out_scale: Tensor,
    sum_weights: bool, config: launch.KernelConfig,
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """(U, V, sum of W or None); see ``gradient.similarity_gradients``. ``config`` is the matmul
    configuration; W tiles use the forward's."""
    tile = launch.forward_config(sim.dim, sim.q.dtype, sim.device)
    padded_cols = launch.cdiv(sim.m, launch.WEIGHTS_ROW_ALIGN) * launch.WEIGHTS_ROW_ALIGN
    chunk_rows = launch.weight_chunk_rows(sim.n, padded_cols, sim.q.element_size(), tile.block_m)
    weights = sim.scratch(chunk_rows, padded_cols, dtype=sim.q.dtype)
    num_col_blocks = launch.cdiv(sim.m, tile.block_n)
    u = sim.scratch(sim.n, sim.dim)
    v = sim.scratch(sim.m, sim.dim)
    chunk_sums = []
    for start in range(0, sim.n, chunk_rows):
        stop = min(start + chunk_rows, sim.n)
        num_row_blocks = launch.cdiv(stop - start, tile.block_m)
        weight_sums = sim.scratch(num_row_blocks, num_col_blocks) if sum_weights else None
        weights_kernel[(num_row_blocks, num_col_blocks)](
            *sim.kernel_args(), *terms.kernel_args(),
            start // tile.block_m, weights, padded_cols, weight_sums,
            weights_fn=weights_fn, LOGIT_UNIT=logit_unit, **terms.flags(),
            HAS_MASK=sim.diag_offset is not None, SUM_WEIGHTS=sum_weights,
            BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_D=tile.block_d, INPUT_PRECISION=sim.input_precision(),
            num_warps=tile.num_warps, num_stages=tile.num_stages,
        )
        chunk = weights[: stop - start, : sim.m]
        _scaled_matmul(sim, chunk, sim.k, sim.inv_norm_k, out_scale, u[start:stop], False, config)
        _scaled_matmul(sim, chunk.T, sim.q[start:stop], sim.inv_norm_q[start:stop], out_scale, v, start > 0, config)
        if sum_weights:
            chunk_sums.append(weight_sums.sum())
    return u, v, torch.stack(chunk_sums).sum() if sum_weights else None
