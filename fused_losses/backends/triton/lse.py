"""Similarity log-sum-exp: forward kernel (row and column statistics in one pass over S) and the
softmax weights of the backward.

Tiles are handled in log2 units (S * log2(e)) so that every exponential is one exp2. Forward, both
directions: one exponential per entry, p = 2^(s - row max), gives the row sums, and weighted by
2^(row max - tile max) the column sums relative to the tile maximum, when that provably loses
nothing (``SHARED_SUM_FLOOR``); otherwise the columns take their own shifts. Backward, both terms:
one shift per block of rows serves both softmaxes within ``SHARED_SHIFT_RANGE``, with the
column coefficients from per-tile references computed once by torch (``WeightTerms.kernel_args``),
so the weights cost one exponential per entry and no reduction across the tile.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

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
# A shift within 64 (log2 units) of a line's maximum keeps the line's largest term 2^(max - shift)
# >= 2^-64 a normal fp32 number, and the terms that flush to zero (< 2^-126) < 2^-62 of the sum.
SHARED_SHIFT_RANGE = tl.constexpr(64.0)
# Column sums relative to the tile maximum: a sum >= BLOCK_M * 2^-64 puts the column's maximum
# within SHARED_SHIFT_RANGE of the shift.
SHARED_SUM_FLOOR = tl.constexpr(2.0**-64)


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
def _log_sum(line_max, sums, APPROX_MATH: tl.constexpr):
    """Natural log-sum-exp from a log2 shift and the sum relative to it (-inf for an empty line)."""
    return (_finite_or_zero(line_max) + fast_log2(sums, APPROX_MATH)) * LN2


@triton.jit
def _column_lse_from_row_exponentials(s, p, row_max, col_in, APPROX_MATH: tl.constexpr):
    """Column log-sum-exps of a log2-unit tile from p = 2^(s - row max): sum_i p_ij 2^(row_max_i -
    tile max) is the column sum relative to the tile maximum, no exponential per element. Where a
    column's maximum lies too far below the tile's for that (or a column is empty), every column
    takes its own shift instead."""
    tile_max = _finite_or_zero(tl.max(row_max))
    weight = tl.where(row_max == float("-inf"), 0.0, tl.exp2(row_max - tile_max))
    col_sums = tl.sum(p * weight[:, None], 0)
    if tl.min(tl.where(col_in, col_sums, float("inf"))) >= SHARED_SUM_FLOOR * s.shape[0]:
        col_lse = (tile_max + fast_log2(col_sums, APPROX_MATH)) * LN2
    else:
        col_max = tl.max(s, 0)
        col_lse = _log_sum(col_max, _shifted_sums(s, col_max, 0), APPROX_MATH)
    return col_lse


@triton.jit(do_not_specialize=["first_row_block", "blocks_per_split"])
def lse_forward_kernel(
    q_src, k_src, inv_norm_q_ptr, inv_norm_k_ptr, scale_ptr, n_rows, n_cols, dim, diag_offset,
    row_labels_ptr, col_labels_ptr, stride_qn, stride_qd, stride_kn, stride_kd,
    row_partials_ptr, col_partials_ptr, first_row_block, blocks_per_split,
    WANT_ROWS: tl.constexpr, WANT_COLS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LABELS: tl.constexpr,
    EXCLUDE_SAME: tl.constexpr, TMA: tl.constexpr, EVEN_D: tl.constexpr,
    APPROX_MATH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Program (row block b of this launch, column split c):
    row_partials[c, rows of b] = log-sum-exp over the split's columns (WANT_ROWS);
    col_partials[b, columns of c] = log-sum-exp over the block's rows (WANT_COLS)."""
    local_block = tl.program_id(0)
    row_block = first_row_block + local_block
    row_start, rows, row_in, row_factor = row_block_setup(inv_norm_q_ptr, scale_ptr, row_block, n_rows, LOG2E, BLOCK_M)
    row_edge = is_edge(row_block, n_rows, BLOCK_M)
    run_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    run_sums = tl.zeros((BLOCK_M,), tl.float32)
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
            if WANT_ROWS:
                row_max = tl.max(s, 1)
                p = tl.exp2(s - _finite_or_zero(row_max)[:, None])
                new_max = tl.maximum(run_max, row_max)
                run_sums = _rescale(run_sums, run_max, new_max) + _rescale(tl.sum(p, 1), row_max, new_max)
                run_max = new_max
                if WANT_COLS:
                    col_lse = _column_lse_from_row_exponentials(s, p, row_max, col_in, APPROX_MATH)
            else:
                col_max = tl.max(s, 0)
                col_lse = _log_sum(col_max, _shifted_sums(s, col_max, 0), APPROX_MATH)
            if WANT_COLS:
                tl.store(col_partials_ptr + local_block * n_cols + cols, col_lse, mask=col_in)
    if WANT_ROWS:
        tl.store(row_partials_ptr + tl.program_id(1) * n_rows + rows, _log_sum(run_max, run_sums, APPROX_MATH),
                 mask=row_in)


@triton.jit
def softmax_row_constants(row_stat, row_grad, HAS_ROW_TERM: tl.constexpr, HAS_COL_TERM: tl.constexpr):
    """Per-program constants of ``softmax_weights`` for a block of rows: (shift, lowest row stat,
    row coefficients row_grad_i 2^(shift - row_stat_i)), with the shift the largest finite row
    stat of the block (log2 units; +inf stats mark empty rows)."""
    if HAS_ROW_TERM and HAS_COL_TERM:
        shift = tl.max(tl.where(row_stat == float("inf"), float("-inf"), row_stat))
        return shift, tl.min(row_stat), row_grad * tl.exp2(shift - row_stat)
    return 0.0, 0.0, row_grad


@triton.jit
def softmax_weights(s, row, col, HAS_ROW_TERM: tl.constexpr, HAS_COL_TERM: tl.constexpr):
    """W = row_grad_i 2^(s_ij - row_stat_i) + col_grad_j 2^(s_ij - col_stat_j) for a log2-unit tile
    and log2-unit log-sum-exps (+inf for a line without entries, which gets weight 0).
    ``row`` = (row_stat, row_grad) + ``softmax_row_constants``; ``col`` = (col_stat, col_grad,
    col_base, col_ref of the tile) (see WeightTerms.kernel_args)."""
    row_stat, row_grad, shift, row_low, row_coef = row
    col_stat, col_grad, col_base, col_ref = col
    if HAS_ROW_TERM and HAS_COL_TERM:
        # One exponential per entry where one shift serves both softmaxes: s_ij <= row_stat_i <=
        # shift, so 2^(s - shift) cannot overflow, and within the range every entry that matters
        # to either softmax stays a normal number.
        if (shift > float("-inf")) & (shift - tl.minimum(row_low, col_ref) <= SHARED_SHIFT_RANGE):
            col_coef = col_base * tl.exp2(shift - col_ref)
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
    return launch.run_tuned(key, default, lambda config: lse_forward_with(sim, want_rows, want_cols, config))


def lse_forward_with(sim: Similarity, want_rows: bool, want_cols: bool, config: launch.KernelConfig):
    """``lse_forward`` with the tile configuration ``config``."""
    num_row_blocks = launch.cdiv(sim.n, config.block_m)
    num_col_blocks = launch.cdiv(sim.m, config.block_n)
    launch_blocks = launch.row_blocks_per_launch(num_row_blocks, sim.m) if want_cols else num_row_blocks
    options = dict(WANT_ROWS=want_rows, WANT_COLS=want_cols, **sim.tile_options(config))
    stand_in = sim.scratch(1)  # any fp32 buffer: the occupancy query does not depend on the grid
    resident = launch.resident_programs(
        lse_forward_kernel, (*sim.kernel_args(config), stand_in if want_rows else None, stand_in if want_cols else None, 0, 1),
        options, sim.device)
    splits, blocks_per_split = launch.plan_splits(num_col_blocks, launch_blocks, resident, num_col_blocks)
    row_partials = sim.scratch(splits, sim.n) if want_rows else None
    col_partials = sim.scratch(launch_blocks, sim.m) if want_cols else None
    lse_col = None
    for first_block in range(0, num_row_blocks, launch_blocks):
        blocks = min(launch_blocks, num_row_blocks - first_block)
        lse_forward_kernel[(blocks, splits)](
            *sim.kernel_args(config), row_partials, col_partials, first_block, blocks_per_split, **options)
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
    grad_row: Optional[Tensor], grad_col: Optional[Tensor], options: GradientOptions,
) -> Tuple[Tensor, Tensor]:
    """(U (N, D), V (M, D)) fp32 for W = grad_row_i softmax_row + grad_col_j softmax_col."""
    for grad, lse, name in ((grad_row, lse_row, "lse_row"), (grad_col, lse_col, "lse_col")):
        if grad is not None and lse is None:
            raise ValueError(f"a gradient for {name} needs {name} from the forward")
    if grad_row is None and grad_col is None:
        return sim.zero_gradients()
    terms, weights = softmax_terms(lse_row, lse_col, grad_row, grad_col)
    u, v, _ = similarity_gradients(sim, terms, weights, options)
    return u, v


def softmax_terms(lse_row: Optional[Tensor], lse_col: Optional[Tensor], grad_row: Optional[Tensor],
                  grad_col: Optional[Tensor]) -> Tuple[WeightTerms, WeightFunctions]:
    """The backward's softmax W as the gradient kernels take it: terms (log2-unit statistics, fp32
    gradients; a term without its gradient is absent) and weight functions."""
    terms = WeightTerms(
        row_stat=_log2_stat(lse_row) if grad_row is not None else None,
        row_grad=grad_row.to(torch.float32).contiguous() if grad_row is not None else None,
        col_stat=_log2_stat(lse_col) if grad_col is not None else None,
        col_grad=grad_col.to(torch.float32).contiguous() if grad_col is not None else None,
    )
    return terms, WeightFunctions(softmax_row_constants, softmax_weights, LOG2E.value)
