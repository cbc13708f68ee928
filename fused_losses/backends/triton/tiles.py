"""Device helpers shared by the LSE and softplus kernels: operand blocks and similarity tiles.

A program owns a block of rows of S (queries) and walks over blocks of its columns (keys).
Everything outside the N x M matrix reads as zero operands and as -inf similarities, so it drops
out of every sum.
"""

import triton
import triton.language as tl


@triton.jit
def load_block(row_ptrs, row_in, features, feature_in, stride_feature):
    """(len(row_ptrs), len(features)) block of an operand from per-row base pointers; zeros outside."""
    return tl.load(
        row_ptrs[:, None] + features[None, :] * stride_feature,
        mask=row_in[:, None] & feature_in[None, :], other=0.0,
    )


@triton.jit
def row_block_setup(q_ptr, inv_norm_q_ptr, scale_ptr, row_block, n_rows, stride_qn, LOGIT_UNIT: tl.constexpr,
                    BLOCK_M: tl.constexpr):
    """(rows, per-row base pointers into q, rows in bounds, row factors scale * r_i * LOGIT_UNIT)
    of one block of rows; LOGIT_UNIT = log2(e) gives S in log2 units."""
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < n_rows
    row_factor = tl.load(inv_norm_q_ptr + rows, mask=row_in, other=0.0) * tl.load(scale_ptr) * LOGIT_UNIT
    return rows, q_ptr + rows.to(tl.int64) * stride_qn, row_in, row_factor


@triton.jit
def similarity_tile(
    rows, q_row_ptrs, row_in, row_factor, k_ptr, inv_norm_k_ptr, col_block,
    n_cols, dim, diag_offset, stride_qd, stride_kn, stride_kd,
    HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """S tile (BLOCK_M, BLOCK_N) fp32 of column block ``col_block``:
    row_factor_i * c_j * (q_i . k_j), the dot accumulated over D in BLOCK_D steps, -inf outside the
    matrix and at (i, i + diag_offset). Returns (s, cols, cols in bounds, per-column base pointers
    into k, c_j)."""
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_in = cols < n_cols
    k_row_ptrs = k_ptr + cols.to(tl.int64) * stride_kn
    col_factor = tl.load(inv_norm_k_ptr + cols, mask=col_in, other=0.0)
    dots = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for d_start in range(0, dim, BLOCK_D):
        features = d_start + tl.arange(0, BLOCK_D)
        feature_in = features < dim
        q = load_block(q_row_ptrs, row_in, features, feature_in, stride_qd)
        k = load_block(k_row_ptrs, col_in, features, feature_in, stride_kd)
        dots = tl.dot(q, tl.trans(k), dots, input_precision=INPUT_PRECISION)
    keep = row_in[:, None] & col_in[None, :]
    if HAS_MASK:
        keep = keep & (cols[None, :] != rows[:, None] + diag_offset)
    s = tl.where(keep, dots * row_factor[:, None] * col_factor[None, :], float("-inf"))
    return s, cols, col_in, k_row_ptrs, col_factor


@triton.jit
def split_block_range(split, blocks_per_split, length, BLOCK: tl.constexpr):
    """[first, last) blocks of a reduced dimension of ``length`` handled by one split of it."""
    first = split * blocks_per_split
    return first, tl.minimum(first + blocks_per_split, tl.cdiv(length, BLOCK))


@triton.jit
def load_gradient_term(stat_ptr, grad_ptr, index, index_in, PRESENT: tl.constexpr, BLOCK: tl.constexpr):
    """(stat, grad) vectors of one term of W at ``index``; zeros when absent or out of bounds."""
    if PRESENT:
        stat = tl.load(stat_ptr + index, mask=index_in, other=0.0)
        grad = tl.load(grad_ptr + index, mask=index_in, other=0.0)
    else:
        stat = tl.zeros((BLOCK,), tl.float32)
        grad = tl.zeros((BLOCK,), tl.float32)
    return stat, grad
