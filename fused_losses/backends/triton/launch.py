"""Launch planning for the triton kernels: block configurations, grid splits, scratch buffers.

Scratch memory is bounded by constants or by O(N + M), whatever N x M is:

- LSE forward with column statistics: a (row blocks per launch, M) fp32 buffer of per-row-block
  column log-sum-exps, at most ``WORKSPACE_BYTES``: rows are processed in as many launches as
  needed; launches are merged in order with ``torch.logaddexp``.
- forward row statistics: (column splits, N) fp32; splits <= ceil(programs / row blocks), so the
  buffer holds at most N + programs * block_m floats.
- fused gradients split over the reduced dimension: (splits, N, D) fp32 partial sums, the number
  of splits capped so that the buffer stays within ``WORKSPACE_BYTES``.
- gradients through materialized weights (large D): one (chunk rows, M) block of W in the input
  dtype, at most ``WEIGHTS_WORKSPACE_BYTES`` (at least one block of rows).

All partial results are merged by torch reductions in a fixed order, so results are bitwise
reproducible. The fixed configurations target H100; ``FUSED_LOSSES_TRITON_AUTOTUNE=1`` replaces
them by the fastest of a few candidates, measured once per shape class.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Tuple, TypeVar

import torch

WORKSPACE_BYTES = 32 * 2**20
WEIGHTS_WORKSPACE_BYTES = 256 * 2**20
# Rows of the materialized W start at multiples of this many elements (aligned, vectorized loads).
WEIGHTS_ROW_ALIGN = 64
# Largest D whose (block_m, D) gradient accumulator fits in registers (checked with ptxas for
# sm_90: no spills); larger D materializes W in row chunks and runs two plain GEMMs on it.
FUSED_GRADIENT_MAX_DIM = {torch.float16: 512, torch.bfloat16: 512, torch.float32: 256}
AUTOTUNE_ENV = "FUSED_LOSSES_TRITON_AUTOTUNE"
# Programs to aim for per SM: two resident waves hide the tail of the last one.
PROGRAMS_PER_SM = 2
# The interpreter runs programs one at a time; a few per launch still exercise every split path.
INTERPRETER_PROGRAMS = 4
FLOAT32_BYTES = 4
T = TypeVar("T")


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and triton launch options. Similarity kernels: block_m rows x block_n columns
    of S, block_d of D per dot step, block_out output features per gradient program. Matmul
    kernel: block_m output rows, block_n of the reduced dimension per step, block_out features."""

    block_m: int
    block_n: int
    block_d: int
    block_out: int
    num_warps: int
    num_stages: int


INTERPRETER_CONFIG = KernelConfig(16, 16, 16, 16, num_warps=1, num_stages=1)


def _pow2_at_least(x: int, floor: int = 16) -> int:
    return max(floor, 1 << (x - 1).bit_length())


def _dot_step(dim: int, dtype: torch.dtype) -> int:
    """D per dot step: 128 bytes of a row per operand tile."""
    return min(_pow2_at_least(dim), 32 if dtype == torch.float32 else 64)


def forward_config(dim: int, dtype: torch.dtype, device: torch.device) -> KernelConfig:
    """Forward and weights kernels: a GEMM with a fused epilogue, 128 x 128 tiles of S."""
    if device.type != "cuda":
        return INTERPRETER_CONFIG
    return KernelConfig(128, 128, _dot_step(dim, dtype), 0, num_warps=8, num_stages=3)


def fuses_gradient(dim: int, dtype: torch.dtype) -> bool:
    """Whether the backward keeps W on chip (else it materializes W in bounded row chunks)."""
    return dim <= FUSED_GRADIENT_MAX_DIM[dtype]


def gradient_config(dim: int, dtype: torch.dtype, device: torch.device) -> KernelConfig:
    """Fused gradient kernel: the (block_m, block_out) fp32 accumulator lives in registers; a D
    wider than block_out is split over programs, each recomputing S."""
    if device.type != "cuda":
        return INTERPRETER_CONFIG
    block_out = min(_pow2_at_least(dim), FUSED_GRADIENT_MAX_DIM[dtype])
    if block_out <= 64:
        block_m, block_n = 128, 64
    else:  # narrower S tiles leave registers for the wide accumulator
        block_m, block_n = 64, 32 if block_out > 256 else 64
    return KernelConfig(block_m, block_n, _dot_step(dim, dtype), block_out, num_warps=8, num_stages=2)


def matmul_config(dim: int, dtype: torch.dtype, device: torch.device) -> KernelConfig:
    """Matmul kernel on materialized weights: 128 x 128 output tiles (128 x 256 spills registers
    in the accumulating epilogue), 128 bytes of the reduced dimension per step."""
    if device.type != "cuda":
        return INTERPRETER_CONFIG
    if dtype == torch.float32:
        return KernelConfig(128, 32, 0, 128, num_warps=8, num_stages=3)
    return KernelConfig(128, 64, 0, 128, num_warps=8, num_stages=4)


def candidate_configs(default: KernelConfig) -> List[KernelConfig]:
    """Variations of ``default`` tried when autotuning."""
    variations = [
        default,
        replace(default, num_stages=default.num_stages + 1),
        replace(default, num_warps=4 if default.num_warps == 8 else 8),
        replace(default, block_n=default.block_n * 2),
        replace(default, block_out=default.block_out * 2),
        replace(default, block_m=max(64, default.block_m // 2)),
        replace(default, block_d=max(16, default.block_d // 2), num_stages=default.num_stages + 1),
    ]
    return list(dict.fromkeys(variations))


_TUNED: Dict[Tuple, KernelConfig] = {}


def run_tuned(key: Tuple, default: KernelConfig, run: Callable[[KernelConfig], T]) -> T:
    """``run(config)`` with ``default``, or with FUSED_LOSSES_TRITON_AUTOTUNE=1 (on CUDA) with the
    candidate for which ``run`` is fastest, measured once per ``key`` and kept for the process."""
    if os.environ.get(AUTOTUNE_ENV) != "1" or default == INTERPRETER_CONFIG:  # never tune the interpreter
        return run(default)
    if key not in _TUNED:
        from triton.runtime.errors import OutOfResources
        from triton.testing import do_bench

        timings = {}
        for config in candidate_configs(default):
            try:
                timings[config] = do_bench(lambda: run(config))
            except OutOfResources:  # the tiles do not fit in shared memory
                continue
        _TUNED[key] = min(timings, key=timings.get)
    return run(_TUNED[key])


def shape_class(n: int, m: int) -> Tuple[int, int]:
    """Autotuning key for the sizes: log2 buckets, so nearby shapes share one measurement."""
    return (n.bit_length(), m.bit_length())


@functools.lru_cache(maxsize=None)
def _cuda_programs(device_index: int) -> int:
    return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device_index).multi_processor_count


def parallel_programs(device: torch.device) -> int:
    """How many programs a launch should have to fill the device."""
    if device.type != "cuda":
        return INTERPRETER_PROGRAMS
    return _cuda_programs(device.index if device.index is not None else torch.cuda.current_device())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def split_blocks(num_blocks: int, other_programs: int, device: torch.device, max_splits: int) -> Tuple[int, int]:
    """Split ``num_blocks`` blocks into contiguous ranges so that ``other_programs`` x splits
    programs fill the device. Returns (splits, blocks per split); no split is empty."""
    wanted = max(1, min(num_blocks, max_splits, cdiv(parallel_programs(device), other_programs)))
    per_split = cdiv(num_blocks, wanted)
    return cdiv(num_blocks, per_split), per_split


def row_blocks_per_launch(num_row_blocks: int, n_cols: int) -> int:
    """Row blocks per LSE forward launch so that its (blocks, n_cols) fp32 column partials fit
    in ``WORKSPACE_BYTES``."""
    return max(1, min(num_row_blocks, WORKSPACE_BYTES // (FLOAT32_BYTES * n_cols)))


def weight_chunk_rows(n_rows: int, padded_cols: int, element_bytes: int, block_m: int) -> int:
    """Rows of W per chunk: a multiple of block_m within ``WEIGHTS_WORKSPACE_BYTES`` (at least one
    block), no more than the rows there are."""
    fit = WEIGHTS_WORKSPACE_BYTES // (element_bytes * padded_cols) // block_m * block_m
    return max(block_m, min(fit, cdiv(n_rows, block_m) * block_m))


def max_gradient_splits(n_rows: int, dim: int) -> int:
    """Most splits whose (splits, n_rows, dim) fp32 partial sums fit in ``WORKSPACE_BYTES``."""
    return max(1, WORKSPACE_BYTES // (FLOAT32_BYTES * n_rows * dim))


def fp32_input_precision() -> str:
    """tl.dot input precision for fp32 inputs, following torch's matmul setting for CUDA."""
    matmul = torch.backends.cuda.matmul
    setting = getattr(matmul, "fp32_precision", "none")
    if setting in ("tf32", "ieee"):
        return setting
    return "tf32" if matmul.allow_tf32 else "ieee"
