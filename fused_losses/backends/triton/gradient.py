"""Backward of both primitives: U = scale W v and V = scale W^T u for a given W.

W comes from a primitive-specific @triton.jit ``weights_fn`` applied to recomputed tiles of S.
Two strategies, chosen by D (``launch.fuses_gradient``): W on chip (``fused_gradient``) or W
materialized in bounded row chunks (``chunked_gradient``).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from fused_losses.backends.triton import launch
from fused_losses.backends.triton.chunked_gradient import chunked_gradients
from fused_losses.backends.triton.fused_gradient import fused_gradients
from fused_losses.backends.triton.operands import Similarity, WeightTerms

# W is rounded to the input dtype for the tensor-core products. Scaling the gradients so that the
# largest |grad| maps to 2^k (k <= 12, about log2 sqrt(max(N, M))) keeps typical weights (grad / N
# or grad / M) normal fp16 numbers and the largest (<= 2 grads) far below fp16's overflow.
MAX_WEIGHT_EXPONENT = 12


def weight_scale(grads: List[Tensor], n: int, m: int) -> Tensor:
    """0-d fp32 factor for the gradients (see MAX_WEIGHT_EXPONENT); computed on the device."""
    largest = torch.stack([g.detach().abs().max().to(torch.float32) for g in grads]).max()
    exponent = min(MAX_WEIGHT_EXPONENT, max(n, m).bit_length() // 2)
    # The floor keeps the factor finite (<= 1 / tiny) when every gradient is 0 or nearly so: with
    # an inf factor, 0 * inf = NaN would reach W.
    floor = torch.finfo(torch.float32).tiny * 2.0**MAX_WEIGHT_EXPONENT
    return float(2**exponent) / largest.clamp_min(floor)


def similarity_gradients(
    sim: Similarity, terms: WeightTerms, weights_fn, logit_unit: float, out_scale: Tensor,
    deterministic: bool, sum_weights: bool = False,
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """(U (N, D), V (M, D)) fp32 with U = out_scale * W (c k), V = out_scale * W^T (r q), and with
    ``sum_weights`` also sum_ij W_ij (0-d). ``weights_fn`` is the tile function
    (s, row_stat, row_grad, col_stat, col_grad, HAS_ROW_TERM, HAS_COL_TERM) -> W, with S in
    ``logit_unit`` units."""
    key = ("gradient", weights_fn, sim.dim, sim.q.dtype, terms.row_grad is not None,
           terms.col_grad is not None, deterministic) + launch.shape_class(sim.n, sim.m)
    args = (sim, terms, weights_fn, logit_unit, out_scale)
    if launch.fuses_gradient(sim.dim, sim.q.dtype):
        default = launch.gradient_config(sim.dim, sim.q.dtype, sim.device)
        return launch.run_tuned(key, default, lambda config: fused_gradients(*args, deterministic, sum_weights, config))
    default = launch.matmul_config(sim.dim, sim.q.dtype, sim.device)
    return launch.run_tuned(key, default, lambda config: chunked_gradients(*args, sum_weights, config))
