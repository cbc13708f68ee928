"""Device helpers shared by the kernels: operand blocks, the flattened tile loop and S tiles.

A program owns a block of rows of S (queries) and walks over a range of column tiles (keys). The
forward and weights kernels run one flattened loop over (column tile, D step) pairs
(``flattened_range``, ``flattened_step``; the tile's epilogue under ``if tile_done`` after
``finished_tile``), so the loads of the next tile are in flight while the epilogue of the current
one runs. Operands come through TMA descriptors or pointer loads (``dot_step``). Everything
outside the N x M matrix reads as zero operands and as -inf similarities, so it drops out of
every sum; so do the masked entries (``logits``: the diagonal and, with HAS_LABELS, the label
mask, one predicate per tile from the tile's row and column labels, loaded with the tile).
"""

import triton
import triton.language as tl


@triton.jit
def load_block(row_ptrs, row_in, features, feature_in, stride_feature, EVEN_D: tl.constexpr):
    """(len(row_ptrs), len(features)) block of an operand from per-row base pointers; zeros
    outside. EVEN_D: every feature is in range (no feature mask)."""
    ptrs = row_ptrs[:, None] + features[None, :] * stride_feature
    if EVEN_D:
        return tl.load(ptrs, mask=row_in[:, None], other=0.0)
    return tl.load(ptrs, mask=row_in[:, None] & feature_in[None, :], other=0.0)


@triton.jit
def row_block_setup(inv_norm_q_ptr, scale_ptr, row_block, n_rows, LOGIT_UNIT: tl.constexpr, BLOCK_M: tl.constexpr):
    """(first row, rows, rows in bounds, row factors scale * r_i * LOGIT_UNIT) of one block of
    rows; LOGIT_UNIT = log2(e) gives S in log2 units."""
    row_start = row_block * BLOCK_M
    rows = row_start + tl.arange(0, BLOCK_M)
    row_in = rows < n_rows
    row_factor = tl.load(inv_norm_q_ptr + rows, mask=row_in, other=0.0) * tl.load(scale_ptr) * LOGIT_UNIT
    return row_start, rows, row_in, row_factor


@triton.jit
def load_labels(labels_ptr, index, index_in, HAS_LABELS: tl.constexpr):
    """The labels at ``index`` (0 outside), or 0 without a label mask (never read then)."""
    if HAS_LABELS:
        labels = tl.load(labels_ptr + index, mask=index_in, other=0)
    else:
        labels = 0
    return labels


@triton.jit
def tile_step(iteration, first, k_steps):
    """(column tile, D step, whether it is the tile's last D step) of one iteration of the
    flattened loop over (column tile, D step) pairs starting at column tile ``first``."""
    tile = iteration // k_steps
    step = iteration - tile * k_steps
    return first + tile, step, step == k_steps - 1


@triton.jit
def dot_step(acc, q_src, k_src, row_start, col_start, n_rows, n_cols, step, dim, stride_qn, stride_qd,
             stride_kn, stride_kd, TMA: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc + q[rows, features] @ k[cols, features]^T for the features of D step ``step``, rows and
    columns from row_start / col_start. With TMA, q_src and k_src are tensor descriptors of
    (BLOCK_M, BLOCK_D) and (BLOCK_N, BLOCK_D) blocks (zeros outside, no masks); else pointers."""
    if TMA:
        q = q_src.load([row_start, step * BLOCK_D])
        k = k_src.load([col_start, step * BLOCK_D])
    else:
        rows = row_start + tl.arange(0, BLOCK_M)
        cols = col_start + tl.arange(0, BLOCK_N)
        features = step * BLOCK_D + tl.arange(0, BLOCK_D)
        feature_in = features < dim
        q = load_block(q_src + rows.to(tl.int64) * stride_qn, rows < n_rows, features, feature_in, stride_qd, EVEN_D)
        k = load_block(k_src + cols.to(tl.int64) * stride_kn, cols < n_cols, features, feature_in, stride_kd, EVEN_D)
    return tl.dot(q, tl.trans(k), acc, input_precision=INPUT_PRECISION)


@triton.jit
def is_edge(block, length, BLOCK: tl.constexpr):
    """Whether block ``block`` of a dimension of ``length`` reaches past its end."""
    return (block + 1) * BLOCK > length


@triton.jit
def logits(dots, rows, row_in, row_factor, row_labels, cols, col_in, col_factor, col_labels, diag_offset, edge,
           HAS_MASK: tl.constexpr, HAS_LABELS: tl.constexpr, EXCLUDE_SAME: tl.constexpr):
    """S tile row_factor_i * c_j * dots_ij, -inf outside the matrix, at (i, i + diag_offset) with
    HAS_MASK, and with HAS_LABELS where (row_labels_i == col_labels_j) == EXCLUDE_SAME. The -inf
    select runs only where needed: ``edge`` tiles (reaching past N or M), or a mask."""
    s = dots * row_factor[:, None] * col_factor[None, :]
    if HAS_MASK or HAS_LABELS or edge:
        keep = row_in[:, None] & col_in[None, :]
        if HAS_MASK:
            keep = keep & (cols[None, :] != rows[:, None] + diag_offset)
        if HAS_LABELS:
            if EXCLUDE_SAME:
                keep = keep & (row_labels[:, None] != col_labels[None, :])
            else:
                keep = keep & (row_labels[:, None] == col_labels[None, :])
        s = tl.where(keep, s, float("-inf"))
    return s


@triton.jit
def flattened_range(split, blocks_per_split, n_cols, dim, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """(first column tile, iterations, D steps per tile) of the flattened loop over the (column
    tile, D step) pairs of one split of the columns."""
    first, last = split_block_range(split, blocks_per_split, n_cols, BLOCK_N)
    k_steps = tl.cdiv(dim, BLOCK_D)
    return first, (last - first) * k_steps, k_steps


@triton.jit
def flattened_step(iteration, first, k_steps, dots, q_src, k_src, row_start, n_rows, n_cols, dim,
                   stride_qn, stride_qd, stride_kn, stride_kd, TMA: tl.constexpr, EVEN_D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """One iteration of the flattened loop: (dots after its D step, column tile, whether the
    tile's dots are complete)."""
    col_block, step, tile_done = tile_step(iteration, first, k_steps)
    dots = dot_step(dots, q_src, k_src, row_start, col_block * BLOCK_N, n_rows, n_cols, step, dim, stride_qn,
                    stride_qd, stride_kn, stride_kd, TMA, EVEN_D, BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION)
    return dots, col_block, tile_done


@triton.jit
def finished_tile(dots, rows, row_in, row_factor, row_labels_ptr, row_edge, inv_norm_k_ptr, col_labels_ptr, col_block,
                  n_cols, diag_offset, HAS_MASK: tl.constexpr, HAS_LABELS: tl.constexpr,
                  EXCLUDE_SAME: tl.constexpr, BLOCK_N: tl.constexpr):
    """(S tile of a column tile's complete dots, its columns, columns in bounds, zeroed dots for
    the next tile)."""
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_in = cols < n_cols
    col_factor = tl.load(inv_norm_k_ptr + cols, mask=col_in, other=0.0)
    row_labels = load_labels(row_labels_ptr, rows, row_in, HAS_LABELS)
    col_labels = load_labels(col_labels_ptr, cols, col_in, HAS_LABELS)
    s = logits(dots, rows, row_in, row_factor, row_labels, cols, col_in, col_factor, col_labels, diag_offset,
               row_edge | is_edge(col_block, n_cols, BLOCK_N), HAS_MASK, HAS_LABELS, EXCLUDE_SAME)
    return s, cols, col_in, tl.zeros_like(dots)


@triton.jit
def similarity_tile(
    row_start, rows, row_in, row_factor, row_labels_ptr, q_ptr, k_ptr, inv_norm_k_ptr, col_labels_ptr, col_block,
    n_rows, n_cols, dim, diag_offset, stride_qn, stride_qd, stride_kn, stride_kd, row_edge,
    HAS_MASK: tl.constexpr, HAS_LABELS: tl.constexpr, EXCLUDE_SAME: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """S tile (BLOCK_M, BLOCK_N) fp32 of column block ``col_block`` with its own D loop over
    pointer loads (the fused backward's nested loop). Returns (s, cols, cols in bounds, c_j)."""
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_in = cols < n_cols
    col_factor = tl.load(inv_norm_k_ptr + cols, mask=col_in, other=0.0)
    dots = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for step in range(0, tl.cdiv(dim, BLOCK_D)):
        dots = dot_step(dots, q_ptr, k_ptr, row_start, col_block * BLOCK_N, n_rows, n_cols, step, dim, stride_qn,
                        stride_qd, stride_kn, stride_kd, False, EVEN_D, BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION)
    edge = row_edge | is_edge(col_block, n_cols, BLOCK_N)
    row_labels = load_labels(row_labels_ptr, rows, row_in, HAS_LABELS)
    col_labels = load_labels(col_labels_ptr, cols, col_in, HAS_LABELS)
    s = logits(dots, rows, row_in, row_factor, row_labels, cols, col_in, col_factor, col_labels, diag_offset, edge,
               HAS_MASK, HAS_LABELS, EXCLUDE_SAME)
    return s, cols, col_in, col_factor


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


@triton.jit
def column_terms(col_stat_ptr, col_grad_ptr, col_base_ptr, col_ref_ptr, cols, col_in, col_block,
                 HAS_ROW_TERM: tl.constexpr, HAS_COL_TERM: tl.constexpr, BLOCK_N: tl.constexpr):
    """(col_stat, col_grad, col_base, col_ref) of one column tile, as the weights functions take
    them (zeros where absent; col_base and col_ref only with both terms)."""
    col_stat, col_grad = load_gradient_term(col_stat_ptr, col_grad_ptr, cols, col_in, HAS_COL_TERM, BLOCK_N)
    if HAS_ROW_TERM and HAS_COL_TERM:
        col_base = tl.load(col_base_ptr + cols, mask=col_in, other=0.0)
        col_ref = tl.load(col_ref_ptr + col_block)
    else:
        col_base = col_grad
        col_ref = 0.0
    return col_stat, col_grad, col_base, col_ref


@triton.jit
def row_terms(row_stat_ptr, row_grad_ptr, rows, row_in, row_constants_fn: tl.constexpr,
              HAS_ROW_TERM: tl.constexpr, HAS_COL_TERM: tl.constexpr, BLOCK_M: tl.constexpr):
    """(row_stat, row_grad) of a block of rows and the weights' per-program constants."""
    row_stat, row_grad = load_gradient_term(row_stat_ptr, row_grad_ptr, rows, row_in, HAS_ROW_TERM, BLOCK_M)
    first, second, third = row_constants_fn(row_stat, row_grad, HAS_ROW_TERM, HAS_COL_TERM)
    return row_stat, row_grad, first, second, third


@triton.jit
def fast_log2(x, APPROX: tl.constexpr):
    """log2(x), fp32: one MUFU.LG2 (lg2.approx, ~2^-22 relative) with APPROX (CUDA), else the
    precise tl.log2 (the interpreter runs no PTX)."""
    if APPROX:
        return tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    return tl.log2(x)
