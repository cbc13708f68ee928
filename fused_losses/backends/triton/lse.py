"""Similarity log-sum-exp: forward kernel (row and column statistics in one pass over S) and the
softmax weights of the backward.

Tiles are handled in log2 units (S * log2(e)) so that every exponential is one exp2. Where both
directions are needed, one shift for the whole tile serves both when it provably loses nothing
(``SHARED_SHIFT_RANGE``), which halves the exponentials; otherwise each direction uses its own.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fused_losses.backends.triton import launch
from fused_losses.backends.triton.gradient import similarity_gradients, weight_scale
from fused_losses.backends.triton.operands import Similarity, WeightTerms
from fused_losses.backends.triton.tiles import row_block_setup, similarity_tile, split_block_range

LOG2E = tl.constexpr(math.log2(math.e))
LN2 = tl.constexpr(math.log(2.0))
# With a shift t within 64 (log2 units) of every line's maximum, each line's largest term
# 2^(max - t) >= 2^-64 is a normal fp32 number, and terms below 2^-126 are < 2^-62 of the sum.
SHARED_SHIFT_RANGE = tl.constexpr(64.0)


@triton.jit
def _rescale(sums, from_shift, to_shift):
    """Sums of 2^(x - from_shift) re-expressed relative to to_shift (0 stays 0, whatever the shifts)."""
    return tl.where(sums == 0.0, 0.0, sums * tl.exp2(from_shift - to_shift))


@triton.jit
def _finite_or_zero(x):
    return tl.where(x == float("-inf"), 0.0, x)


@triton.jit
def _shifted_sums(s, line_max, AXIS: tl.constexpr):
    """sum along AXIS of 2^(s - line_max); 0 for an all -inf line."""
    return tl.sum(tl.exp2(s - tl.expand_dims(_finite_or_zero(line_max), AXIS)), AXIS)


@triton.jit
def _row_and_col_sums(s, row_max, col_max):
    """(_shifted_sums along rows, along columns), one exp2 per element when a shared shift is safe."""
    tile_max = tl.max(row_max)
    lowest = tl.minimum(tl.min(tl.where(row_max == float("-inf"), tile_max, row_max)),
                        tl.min(tl.where(col_max == float("-inf"), tile_max, col_max)))
    if tile_max - lowest <= SHARED_SHIFT_RANGE:
        p = tl.exp2(s - tile_max)
        row_sums = _rescale(tl.sum(p, 1), tile_max, row_max)
        col_sums = _rescale(tl.sum(p, 0), tile_max, col_max)
    else:
        row_sums = _shifted_sums(s, row_max, 1)
        col_sums = _shifted_sums(s, col_max, 0)
    return row_sums, col_sums


@triton.jit
def _log_sum(line_max, sums):
    """Natural log-sum-exp from a log2 shift and the sum relative to it (-inf for an empty line)."""
    return (_finite_or_zero(line_max) + tl.log2(sums)) * LN2


@triton.jit
def lse_forward_kernel(
    q_ptr, k_ptr, inv_norm_q_ptr, inv_norm_k_ptr, scale_ptr, n_rows, n_cols, dim, diag_offset,
    stride_qn, stride_qd, stride_kn, stride_kd,
    row_partials_ptr, col_partials_ptr, first_row_block, blocks_per_split,
    WANT_ROWS: tl.constexpr, WANT_COLS: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Program (row block b of this launch, column split c):
    row_partials[c, rows of b] = log-sum-exp over the split's columns (WANT_ROWS);
    col_partials[b, columns of c] = log-sum-exp over the block's rows (WANT_COLS)."""
    local_block = tl.program_id(0)
    split = tl.program_id(1)
    rows, q_row_ptrs, row_in, row_factor = row_block_setup(
        q_ptr, inv_norm_q_ptr, scale_ptr, first_row_block + local_block, n_rows, stride_qn, LOG2E, BLOCK_M)
    run_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    run_sums = tl.zeros((BLOCK_M,), tl.float32)
    first, last = split_block_range(split, blocks_per_split, n_cols, BLOCK_N)
    for col_block in range(first, last):
        s, cols, col_in, _, _ = similarity_tile(
            rows, q_row_ptrs, row_in, row_factor, k_ptr, inv_norm_k_ptr, col_block,
            n_cols, dim, diag_offset, stride_qd, stride_kn, stride_kd,
            HAS_MASK, BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION)
        if WANT_ROWS and WANT_COLS:
            row_max = tl.max(s, 1)
            col_max = tl.max(s, 0)
            row_sums, col_sums = _row_and_col_sums(s, row_max, col_max)
        elif WANT_ROWS:
            row_max = tl.max(s, 1)
            row_sums = _shifted_sums(s, row_max, 1)
        else:
            col_max = tl.max(s, 0)
            col_sums = _shifted_sums(s, col_max, 0)
        if WANT_ROWS:
            new_max = tl.maximum(run_max, row_max)
            run_sums = _rescale(run_sums, run_max, new_max) + _rescale(row_sums, row_max, new_max)
            run_max = new_max
        if WANT_COLS:
            tl.store(col_partials_ptr + local_block * n_cols + cols, _log_sum(col_max, col_sums), mask=col_in)
    if WANT_ROWS:
        tl.store(row_partials_ptr + split * n_rows + rows, _log_sum(run_max, run_sums), mask=row_in)


@triton.jit
def softmax_weights(s, row_stat, row_grad, col_stat, col_grad,
                    HAS_ROW_TERM: tl.constexpr, HAS_COL_TERM: tl.constexpr):
    """W = row_grad_i 2^(s_ij - row_stat_i) + col_grad_j 2^(s_ij - col_stat_j) for a log2-unit
    tile and log2-unit log-sum-exps (+inf for a line without entries, which gets weight 0)."""
    if HAS_ROW_TERM and HAS_COL_TERM:
        # s_ij <= row_stat_i <= shift, so 2^(s - shift) cannot overflow; within the range every
        # entry that matters to either softmax stays a normal number.
        shift = tl.max(tl.where(row_stat == float("inf"), float("-inf"), row_stat))
        lowest = tl.minimum(tl.min(row_stat), tl.min(col_stat))
        if (shift > float("-inf")) & (shift - lowest <= SHARED_SHIFT_RANGE):
            row_coef = row_grad * tl.exp2(shift - row_stat)
            col_coef = col_grad * tl.exp2(shift - col_stat)
            w = tl.exp2(s - shift) * (row_coef[:, None] + col_coef[None, :])
        else:
            w = (row_grad[:, None] * tl.exp2(s - row_stat[:, None])
                 + col_grad[None, :] * tl.exp2(s - col_stat[None, :]))
    elif HAS_ROW_TERM:
        w = row_grad[:, None] * tl.exp2(s - row_stat[:, None])
    else:
        w = col_grad[None, :] * tl.exp2(s - col_stat[None, :])
    return w


def lse_forward(sim: Similarity, want_rows: bool, want_cols: bool) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """(lse_row (N,) or None, lse_col (M,) or None), fp32."""
    if not (want_rows or want_cols):
        return None, None
    key = ("lse_forward", sim.dim, sim.q.dtype, want_rows, want_cols) + launch.shape_class(sim.n, sim.m)
    default = launch.forward_config(sim.dim, sim.q.dtype, sim.device)
    return launch.run_tuned(key, default, lambda config: _lse_forward(sim, want_rows, want_cols, config))


def _lse_forward(sim: Similarity, want_rows: bool, want_cols: bool, config: launch.KernelConfig):
    num_row_blocks = launch.cdiv(sim.n, config.block_m)
    num_col_blocks = launch.cdiv(sim.m, config.block_n)
    launch_blocks = launch.row_blocks_per_launch(num_row_blocks, sim.m) if want_cols else num_row_blocks
    splits, blocks_per_split = launch.split_blocks(num_col_blocks, launch_blocks, sim.device, num_col_blocks)
    row_partials = sim.scratch(splits, sim.n) if want_rows else None
    col_partials = sim.scratch(launch_blocks, sim.m) if want_cols else None
    lse_col = None
    for first_block in range(0, num_row_blocks, launch_blocks):
        blocks = min(launch_blocks, num_row_blocks - first_block)
        lse_forward_kernel[(blocks, splits)](
            *sim.kernel_args(), row_partials, col_partials, first_block, blocks_per_split,
            WANT_ROWS=want_rows, WANT_COLS=want_cols, HAS_MASK=sim.diag_offset is not None,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=config.block_d,
            INPUT_PRECISION=sim.input_precision(), num_warps=config.num_warps, num_stages=config.num_stages,
        )
        if want_cols:
            launch_lse = torch.logsumexp(col_partials[:blocks], dim=0)
            lse_col = launch_lse if lse_col is None else torch.logaddexp(lse_col, launch_lse)
    lse_row = torch.logsumexp(row_partials, dim=0) if want_rows else None
    return lse_row, lse_col


def _log2_stat(lse: Tensor) -> Tensor:
    """A log-sum-exp in log2 units as softmax_weights reads it: +inf for an empty (-inf) line."""
    lse = lse.to(torch.float32)
    return torch.where(lse == float("-inf"), float("inf"), lse * LOG2E.value).contiguous()


def lse_backward(
    sim: Similarity, lse_row: Optional[Tensor], lse_col: Optional[Tensor],
    grad_row: Optional[Tensor], grad_col: Optional[Tensor], deterministic: bool,
) -> Tuple[Tensor, Tensor]:
    """(U (N, D), V (M, D)) fp32 for W = grad_row_i softmax_row + grad_col_j softmax_col."""
    for grad, lse, name in ((grad_row, lse_row, "lse_row"), (grad_col, lse_col, "lse_col")):
        if grad is not None and lse is None:
            raise ValueError(f"a gradient for {name} needs {name} from the forward")
    grads = [g for g in (grad_row, grad_col) if g is not None]
    if not grads:
        return sim.zero_gradients()
    w_scale = weight_scale(grads, sim.n, sim.m)
    terms = WeightTerms(
        row_stat=_log2_stat(lse_row) if grad_row is not None else None,
        row_grad=grad_row.to(torch.float32) * w_scale if grad_row is not None else None,
        col_stat=_log2_stat(lse_col) if grad_col is not None else None,
        col_grad=grad_col.to(torch.float32) * w_scale if grad_col is not None else None,
    )
    u, v, _ = similarity_gradients(sim, terms, softmax_weights, LOG2E.value, sim.scale / w_scale, deterministic)
    return u, v
