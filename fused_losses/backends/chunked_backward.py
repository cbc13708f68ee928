"""Backward of the similarity primitives through W written in bounded row chunks, with the vendor
GEMM for both products. Backend-agnostic (pure torch): a backend supplies only a *weights writer*
that turns a block of rows of recomputed S into weights; this module does the rest.

Notation as in ``fused_losses.backends.base``: q (N, D), k (M, D) of one dtype among float16,
bfloat16, float32 (any strides), inverse norms r (N,), c (M,) and the 0-d ``scale`` s, fp32; W the
backward's weights (N, M), with |W_ij| <= ``bound`` (``weight_bound`` of the primitive's upstream
gradients: the softmax and sigmoid factors of W lie in [0, 1]).

Contract of the writer, ``write_weights(out, row_start, row_stop, row_scale, col_scale)``:

- ``out`` is a (row_stop - row_start, M) view of the workspace in the *weight dtype* (the inputs'
  dtype: 16-bit inputs give 16-bit weights, float32 inputs float32 weights), row stride padded to
  a multiple of ``COLUMN_ALIGN`` elements, unit column stride. ``row_start`` is a multiple of the
  ``row_multiple`` the backend passed (its row tile), ``row_stop`` too except for the last chunk.
- The writer fills out[i - row_start, j] = (row_scale[i - row_start] * col_scale[j]) * W_ij, the
  product and W in fp32, rounded once to the weight dtype; masked entries are 0. ``row_scale``
  ((rows,) fp32, contiguous) and ``col_scale`` ((M,) fp32, contiguous) come from the driver:
  row_scale = factor * rho, col_scale = gamma, where rho = r and gamma = c except on all-zero rows
  of q (columns of k), which get the largest inverse norm of the nonzero ones (a zero vector's
  inverse norm is 1/eps: it would push every other weight of a 16-bit chunk to zero, while its
  own entries multiply zeros in the products, so any finite value is exact). ``factor`` is a
  power of two chosen so that |row_scale_i col_scale_j W_ij| <= ``WEIGHT_TARGET`` (2^15: no float16
  overflow) with the largest weights near that bound, far above 16-bit subnormals.
- It returns the chunk's fp32 sum of the *unscaled* W (0-d tensor) when the driver was called with
  ``sum_weights=True`` (SigLIP's bias gradient), else None.

The driver then computes, chunk after chunk in a fixed order (deterministic):

    U[rows] = (s / row_scale) * (W~ @ K)        V += W~^T @ Q[rows],  V *= s / (factor * gamma)

which is U_i = s sum_j W_ij c_j k_j and V_j = s sum_i W_ij r_i q_i of the contract, in fp32. The
products run in torch (cuBLAS on CUDA) with fp32 accumulation and fp32 output for 16-bit inputs;
V accumulates into its fp32 buffer inside the GEMM (``addmm``, beta = 1) where torch supports an
fp32 addend with 16-bit factors, else through one fp32 product per chunk added to V
(``gemm_path`` says which; CPU tensors upcast to fp32: slow, meant for tests).

Workspace: one (chunk rows, M padded) buffer of the weight dtype, chunk rows =
max(``MIN_CHUNK_ROWS``, ``WORKSPACE_BYTES`` / (M padded x element size)), rounded down to the
writer's row multiple, no more than N needs: max(256 MiB, 8 KiB x M) for 16-bit inputs. The floor
on the chunk rows bounds V's fp32 traffic: each chunk reads and writes V (8 M D bytes) against
2 x rows x M x D flops of its product, <= 1 byte per 1024 flops whatever M is (at a fixed budget
in bytes the chunks would shrink as 1/M and that traffic grow as M^2). Beyond the workspace: U, V
(fp32, (N + M) D), the (N,) and (M,) scale vectors, and a row-major copy of q or k where neither
of its strides is 1 (GEMM operands).

Precision: W~ is rounded once to the weight dtype (bf16: 2^-9 relative per weight); products
accumulate in fp32. Entries below 2^-29 of the largest bound (float16) become subnormal: with
float16 inputs whose nonzero norms span many orders of magnitude, the rows of the largest norms
lose precision first.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

WORKSPACE_BYTES = 256 * 2**20
MIN_CHUNK_ROWS = 4096
# Rows of the weights buffer start at multiples of this many elements (128 B for 16-bit weights).
COLUMN_ALIGN = 64
WEIGHT_TARGET = 2.0**15
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Largest exponent of row_scale_i * col_scale_j: finite in fp32 with room to multiply W.
_MAX_SCALE_EXPONENT = 120
_MIN_FACTOR_EXPONENT = -126

WeightsWriter = Callable[[Tensor, int, int, Tensor, Tensor], Optional[Tensor]]


def weight_bound(*grads: Optional[Tensor]) -> Tensor:
    """0-d fp32 bound on |W_ij| for W = sum over terms of grad * (a factor in [0, 1]): the sum of
    max |grad| over the given gradients (None ones skipped). Computed on the device, no sync."""
    present = [g.detach().abs().max().to(torch.float32) for g in grads if g is not None and g.numel()]
    if not present:
        raise ValueError("weight_bound needs at least one non-empty gradient")
    return torch.stack(present).sum()


def _gemm_operand(x: Tensor) -> Tensor:
    """``x`` if a GEMM can read it in place (one unit stride), else a row-major copy."""
    return x if x.stride(1) == 1 or x.stride(0) == 1 else x.contiguous()


def _nonzero_rows(x: Tensor) -> Tensor:
    if x.shape[1] == 0:  # aminmax refuses an empty reduction
        return torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    low, high = torch.aminmax(x, dim=1)
    return (low != 0) | (high != 0)


def _clamped_inverse_norms(x: Tensor, inv_norm: Tensor) -> Tuple[Tensor, Tensor]:
    """(inv_norm with the all-zero rows of x (N >= 1) set to the largest inverse norm of the
    others, 1 when every row is zero; that largest value, 0-d), fp32."""
    nonzero = _nonzero_rows(x)
    inv_norm = inv_norm.to(torch.float32)
    largest = torch.where(nonzero, inv_norm, 0.0).amax()
    largest = torch.where(largest > 0, largest, 1.0)
    return torch.where(nonzero, inv_norm, largest), largest


def weight_scales(q: Tensor, k: Tensor, inv_norm_q: Tensor, inv_norm_k: Tensor,
                  bound: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(row_scale (N,), col_scale (M,), factor 0-d), fp32, as the writer's contract describes."""
    rho, rho_max = _clamped_inverse_norms(q, inv_norm_q)
    gamma, gamma_max = _clamped_inverse_norms(k, inv_norm_k)
    log2_rho, log2_scales = torch.log2(rho_max), torch.log2(rho_max) + torch.log2(gamma_max)
    # A zero bound (all gradients 0) gives +inf here, clamped below: W is 0 and any factor works.
    exponent = torch.floor(math.log2(WEIGHT_TARGET) - torch.log2(bound.to(torch.float32)) - log2_scales)
    # row_scale and row_scale * col_scale stay below 2^_MAX_SCALE_EXPONENT.
    largest = _MAX_SCALE_EXPONENT - torch.ceil(torch.maximum(log2_rho, log2_scales))
    factor = torch.exp2(torch.minimum(exponent, largest).clamp_min(_MIN_FACTOR_EXPONENT))
    return factor * rho, gamma, factor


def chunk_rows(n: int, m: int, element_size: int, row_multiple: int) -> int:
    """Rows per chunk of W (see the module docstring): a multiple of ``row_multiple``."""
    padded = padded_columns(m)
    rows = max(MIN_CHUNK_ROWS, WORKSPACE_BYTES // (padded * element_size))
    rows = max(row_multiple, rows // row_multiple * row_multiple)
    return min(rows, -(-n // row_multiple) * row_multiple)


def padded_columns(m: int) -> int:
    """Row stride (elements) of the weights workspace for M columns."""
    return max(COLUMN_ALIGN, -(-m // COLUMN_ALIGN) * COLUMN_ALIGN)


@functools.lru_cache(maxsize=None)
def gemm_path(device_type: str, dtype: torch.dtype) -> str:
    """How fp32 products of ``dtype`` factors run on ``device_type``: "fp32" (fp32 factors),
    "addmm_out_dtype" (16-bit factors, fp32 output, V accumulated inside the GEMM),
    "mm_out_dtype" (fp32 output; V += a separate product) or "upcast" (factors copied to fp32)."""
    if dtype == torch.float32:
        return "fp32"
    a = torch.ones((2, 2), dtype=dtype, device=device_type)
    acc = torch.zeros((2, 2), dtype=torch.float32, device=device_type)
    for path, product in (
        ("addmm_out_dtype", lambda: torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)),
        ("mm_out_dtype", lambda: torch.mm(a, a, out_dtype=torch.float32)),
    ):
        try:  # an operator without a kernel for this device raises NotImplementedError
            if product().dtype == torch.float32:
                return path
        except (NotImplementedError, RuntimeError, TypeError):
            continue
    return "upcast"


def fp32_product(a: Tensor, b: Tensor, out: Tensor, accumulate: bool, path: str) -> None:
    """out (+)= a @ b, fp32 accumulation, into the fp32 ``out`` in place."""
    if path == "upcast":
        a, b = a.float(), b.float()
    if path in ("fp32", "upcast"):
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
    elif accumulate and path == "addmm_out_dtype":
        torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
    elif accumulate:
        out.add_(torch.mm(a, b, out_dtype=torch.float32))
    else:
        torch.mm(a, b, out_dtype=torch.float32, out=out)


def uninitialized(shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every buffer the driver fills (U, V, the weights workspace); tests poison it with NaN."""
    return torch.empty(shape, dtype=dtype, device=device)


def chunked_backward(
    q: Tensor, k: Tensor, inv_norm_q: Tensor, inv_norm_k: Tensor, scale: Tensor, bound: Tensor,
    write_weights: WeightsWriter, *, row_multiple: int = 1, sum_weights: bool = False,
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """(U (N, D), V (M, D), sum_ij W_ij 0-d or None), fp32, from ``write_weights`` (see the module
    docstring). ``bound`` >= max |W_ij| (0-d, e.g. ``weight_bound(grad_row, grad_col)``);
    ``row_multiple``: chunk boundaries fall on multiples of it (the writer's row tile)."""
    if q.dtype not in WEIGHT_DTYPES or k.dtype != q.dtype:
        raise TypeError(f"chunked_backward takes q and k of one dtype among float16, bfloat16, float32; "
                        f"got {q.dtype} and {k.dtype}")
    n, m, dim = q.shape[0], k.shape[0], q.shape[1]
    if n == 0 or m == 0:
        zeros = functools.partial(torch.zeros, dtype=torch.float32, device=q.device)
        return zeros((n, dim)), zeros((m, dim)), zeros(()) if sum_weights else None
    u = uninitialized((n, dim), torch.float32, q.device)
    v = uninitialized((m, dim), torch.float32, q.device)
    row_scale, col_scale, factor = weight_scales(q, k, inv_norm_q, inv_norm_k, bound)
    q, k = _gemm_operand(q), _gemm_operand(k)
    path = gemm_path(q.device.type, q.dtype)
    rows = chunk_rows(n, m, q.element_size(), row_multiple)
    workspace = uninitialized((rows, padded_columns(m)), q.dtype, q.device)
    chunk_sums = []
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        chunk = workspace[: stop - start, :m]
        chunk_sum = write_weights(chunk, start, stop, row_scale[start:stop], col_scale)
        if sum_weights:
            if chunk_sum is None:
                raise ValueError("write_weights must return the chunk's sum of W when sum_weights=True")
            chunk_sums.append(chunk_sum.reshape(()).to(torch.float32))
        fp32_product(chunk, k, u[start:stop], False, path)
        fp32_product(chunk.T, q[start:stop], v, start > 0, path)
    u.mul_((scale.to(torch.float32) / row_scale)[:, None])
    v.mul_((scale.to(torch.float32) / (factor * col_scale))[:, None])
    return u, v, torch.stack(chunk_sums).sum() if sum_weights else None
