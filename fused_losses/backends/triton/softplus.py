"""Similarity softplus-sum (SigLIP): forward kernel and the sigmoid weights of the backward."""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fused_losses.backends.triton import launch
from fused_losses.backends.triton.gradient import similarity_gradients, weight_scale
from fused_losses.backends.triton.operands import Similarity, WeightTerms
from fused_losses.backends.triton.tiles import row_block_setup, similarity_tile, split_block_range


@triton.jit
def _softplus(x):
    """log(1 + e^x), accurate also where e^x is below the resolution of 1 (log1p via
    log(1 + z) * z / ((1 + z) - 1), which cancels the rounding of 1 + z)."""
    z = tl.exp(-tl.abs(x))
    one_plus_z = 1.0 + z
    log1p_z = tl.where(one_plus_z == 1.0, z, tl.log(one_plus_z) * (z / (one_plus_z - 1.0)))
    return tl.maximum(x, 0.0) + log1p_z


@triton.jit
def softplus_forward_kernel(
    q_ptr, k_ptr, inv_norm_q_ptr, inv_norm_k_ptr, scale_ptr, n_rows, n_cols, dim, diag_offset,
    stride_qn, stride_qd, stride_kn, stride_kd,
    bias_ptr, row_partials_ptr, blocks_per_split,
    HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Program (row block, column split c): row_partials[c, rows] = sum over the split's columns
    of softplus(S_ij + bias)."""
    split = tl.program_id(1)
    rows, q_row_ptrs, row_in, row_factor = row_block_setup(
        q_ptr, inv_norm_q_ptr, scale_ptr, tl.program_id(0), n_rows, stride_qn, 1.0, BLOCK_M)
    bias = tl.load(bias_ptr)
    sums = tl.zeros((BLOCK_M,), tl.float32)
    first, last = split_block_range(split, blocks_per_split, n_cols, BLOCK_N)
    for col_block in range(first, last):
        s, _, _, _, _ = similarity_tile(
            rows, q_row_ptrs, row_in, row_factor, k_ptr, inv_norm_k_ptr, col_block,
            n_cols, dim, diag_offset, stride_qd, stride_kn, stride_kd,
            HAS_MASK, BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION)
        sums += tl.sum(_softplus(s + bias), 1)
    tl.store(row_partials_ptr + split * n_rows + rows, sums, mask=row_in)


@triton.jit
def sigmoid_weights(s, row_stat, row_grad, col_stat, col_grad,
                    HAS_ROW_TERM: tl.constexpr, HAS_COL_TERM: tl.constexpr):
    """W = row_grad_i sigmoid(s_ij + row_stat_i) + col_grad_j sigmoid(s_ij + col_stat_j), with
    the bias as the stat (one term is present: the row term for U, the column term for V)."""
    w = tl.zeros_like(s)
    if HAS_ROW_TERM:
        w += row_grad[:, None] * tl.sigmoid(s + row_stat[:, None])
    if HAS_COL_TERM:
        w += col_grad[None, :] * tl.sigmoid(s + col_stat[None, :])
    return w


def softplus_forward(sim: Similarity, bias: Tensor) -> Tensor:
    """sp_row (N,) fp32."""
    key = ("softplus_forward", sim.dim, sim.q.dtype) + launch.shape_class(sim.n, sim.m)
    default = launch.forward_config(sim.dim, sim.q.dtype, sim.device)
    return launch.run_tuned(key, default, lambda config: _softplus_forward(sim, bias, config))


def _softplus_forward(sim: Similarity, bias: Tensor, config: launch.KernelConfig) -> Tensor:
    num_row_blocks = launch.cdiv(sim.n, config.block_m)
    num_col_blocks = launch.cdiv(sim.m, config.block_n)
    splits, blocks_per_split = launch.split_blocks(num_col_blocks, num_row_blocks, sim.device, num_col_blocks)
    row_partials = sim.scratch(splits, sim.n)
    softplus_forward_kernel[(num_row_blocks, splits)](
        *sim.kernel_args(), bias, row_partials, blocks_per_split,
        HAS_MASK=sim.diag_offset is not None,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=config.block_d,
        INPUT_PRECISION=sim.input_precision(), num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return row_partials.sum(dim=0)


def softplus_backward(
    sim: Similarity, bias: Tensor, grad_row: Tensor, deterministic: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(U (N, D), V (M, D), grad_bias 0-d) fp32 for W = grad_row_i sigmoid(S_ij + bias)."""
    w_scale = weight_scale([grad_row], sim.n, sim.m)
    terms = WeightTerms(
        row_stat=bias.expand(sim.n).contiguous(), row_grad=grad_row.to(torch.float32) * w_scale,
        col_stat=None, col_grad=None,
    )
    u, v, weight_sum = similarity_gradients(
        sim, terms, sigmoid_weights, 1.0, sim.scale / w_scale, deterministic, sum_weights=True)
    return u, v, weight_sum / w_scale
