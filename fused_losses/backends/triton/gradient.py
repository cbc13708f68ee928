"""Backward of both primitives: U = scale W v and V = scale W^T u for a given W.

W comes from primitive-specific @triton.jit functions (``WeightFunctions``) applied to recomputed
tiles of S. Two strategies (option ``gradient`` of ``make_kernels``):

- ``"chunked"`` (default, every D): a weights kernel writes bounded row chunks of scaled W, and
  the vendor GEMM takes both products (``chunked_gradient`` through the backend-agnostic
  ``fused_losses.backends.chunked_backward``): 1 GEMM-equivalent of recomputation + 2 at cuBLAS
  speed.
- ``"fused"``: W stays on chip, one kernel per direction (``fused_gradient``): S is recomputed
  once per direction. Kept to compare on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from torch import Tensor

from fused_losses.backends.triton import launch
from fused_losses.backends.triton.chunked_gradient import chunked_gradients
from fused_losses.backends.triton.fused_gradient import fused_gradients
from fused_losses.backends.triton.operands import Similarity, WeightTerms

GRADIENT_STRATEGIES = ("chunked", "fused")


@dataclass(frozen=True)
class GradientOptions:
    """How the backward runs: ``strategy`` (see the module docstring); ``deterministic=False``
    lets the fused strategy add partial sums with fp32 atomics."""

    strategy: str = "chunked"
    deterministic: bool = True


@dataclass(frozen=True)
class WeightFunctions:
    """A primitive's W, as @triton.jit functions on tiles with S in ``logit_unit`` units:
    ``row_constants(row_stat, row_grad, HAS_ROW_TERM, HAS_COL_TERM)`` -> per-program constants
    of a block of rows, and ``weights(s, row, col, HAS_ROW_TERM, HAS_COL_TERM)`` -> W tile, with
    row = (row_stat, row_grad) + those constants and col = (col_stat, col_grad, col_base,
    col_ref of the tile) (see ``WeightTerms.kernel_args``)."""

    row_constants: object
    weights: object
    logit_unit: float


def similarity_gradients(
    sim: Similarity, terms: WeightTerms, weights: WeightFunctions, options: GradientOptions,
    sum_weights: bool = False,
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """(U (N, D), V (M, D)) fp32 with U = scale W (c k), V = scale W^T (r q), and with
    ``sum_weights`` also sum_ij W_ij (0-d)."""
    key = ("gradient", options, weights.weights, sim.dim, sim.q.dtype, terms.row_grad is not None,
           terms.col_grad is not None) + launch.shape_class(sim.n, sim.m)
    if options.strategy == "chunked":
        default = launch.forward_config(sim.dim, sim.q.dtype, sim.device)
        return launch.run_tuned(key, default, lambda config: chunked_gradients(sim, terms, weights, sum_weights, config))
    default = launch.gradient_config(sim.dim, sim.q.dtype, sim.device)
    return launch.run_tuned(
        key, default, lambda config: fused_gradients(sim, terms, weights, options.deterministic, sum_weights, config))
