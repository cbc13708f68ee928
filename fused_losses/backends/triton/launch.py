"""Launch planning for the triton kernels: tile configurations, occupancy, grid splits, scratch.

Grids are planned from the occupancy of the compiled kernel (its registers, shared memory and
warps against the SM's limits), not from an assumed number of programs per SM: a launch's
programs are split so that whole waves of resident programs cover the work (``plan_splits``).

Scratch memory is bounded by constants or by O(N + M), whatever N x M is:

- LSE forward with column statistics: a (row blocks per launch, M) fp32 buffer of per-row-block
  column log-sum-exps, at most ``WORKSPACE_BYTES``: rows are processed in as many launches as
  needed; launches are merged in order with ``torch.logaddexp``.
- forward row statistics: (column splits, N) fp32; splits <= ceil(programs / row blocks), so the
  buffer holds at most N + programs * block_m floats.
- fused gradients (option ``gradient="fused"``) split over the reduced dimension: (splits, N, D)
  fp32 partial sums, the number of splits capped so that the buffer stays within
  ``WORKSPACE_BYTES``.
- chunked gradients: the workspace of ``fused_losses.backends.chunked_backward``.

All partial results are merged by torch reductions in a fixed order, so results are bitwise
reproducible. The fixed configurations target H100 / H200 (sm_90);
``FUSED_LOSSES_TRITON_AUTOTUNE=1`` replaces them by the fastest of a few candidates, measured once
per shape class.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Tuple, TypeVar

import torch

WORKSPACE_BYTES = 32 * 2**20
# Largest (block_m, block_out) fp32 gradient accumulator of the fused backward (checked with
# ptxas for sm_90: no spills); a wider D is split over programs, each recomputing S.
FUSED_BLOCK_OUT = {torch.float16: 512, torch.bfloat16: 512, torch.float32: 256}
AUTOTUNE_ENV = "FUSED_LOSSES_TRITON_AUTOTUNE"
# The interpreter runs programs one at a time; a few per launch still exercise every split path.
INTERPRETER_PROGRAMS = 4
# A program's fixed cost (setup, pipeline fill, final stores) in tiles of its loop, for planning.
PROGRAM_OVERHEAD_TILES = 1.0
FLOAT32_BYTES = 4
T = TypeVar("T")


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and triton launch options. Similarity kernels: block_m rows x block_n columns
    of S, block_d of D per dot step, block_out output features per fused-gradient program."""

    block_m: int
    block_n: int
    block_d: int
    block_out: int
    num_warps: int
    num_stages: int


INTERPRETER_CONFIG = KernelConfig(16, 16, 16, 16, num_warps=1, num_stages=1)


@dataclass(frozen=True)
class SmLimits:
    """Per-SM resources that bound how many programs of a kernel are resident at once."""

    registers: int = 65536
    threads: int = 2048
    shared_bytes: int = 233472  # 228 KiB on sm_90
    ctas: int = 32
    reserved_shared_per_cta: int = 1024
    register_unit_per_warp: int = 256


SM90 = SmLimits()


@dataclass(frozen=True)
class GpuTarget:
    """The GPU a launch is planned for: SM count and per-SM limits."""

    sm_count: int
    limits: SmLimits


def gpu_target(device: torch.device) -> Optional[GpuTarget]:
    """The target of launches on ``device``; None for the interpreter (CPU tensors)."""
    if device.type != "cuda":
        return None
    return _cuda_target(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_target(index: int) -> GpuTarget:
    props = torch.cuda.get_device_properties(index)
    limits = SmLimits(
        registers=getattr(props, "regs_per_multiprocessor", SM90.registers),
        threads=getattr(props, "max_threads_per_multi_processor", SM90.threads),
        shared_bytes=getattr(props, "shared_memory_per_multiprocessor", SM90.shared_bytes),
    )
    return GpuTarget(props.multi_processor_count, limits)


def ctas_per_sm(registers: int, shared_bytes: int, num_warps: int, limits: SmLimits = SM90) -> int:
    """Programs of a kernel resident on one SM (CUDA occupancy rules: registers allocated per warp
    in units, shared memory per CTA plus a reserve, threads, CTA slots); 0 if one does not fit."""
    per_warp = -(-max(registers, 1) * 32 // limits.register_unit_per_warp) * limits.register_unit_per_warp
    by_registers = limits.registers // per_warp // num_warps
    by_shared = limits.shared_bytes // (shared_bytes + limits.reserved_shared_per_cta)
    by_threads = limits.threads // (32 * num_warps)
    return min(by_registers, by_shared, by_threads, limits.ctas)


def registers_of(compiled) -> int:
    """Registers per thread of a compiled kernel (loads it on the current device)."""
    compiled._init_handles()
    return compiled.n_regs


def resident_programs(kernel, args: Tuple, options: Dict, device: torch.device) -> int:
    """How many programs of ``kernel`` launched with ``args`` and ``options`` (constexprs and
    launch options, as in ``kernel[grid](*args, **options)``) run at once on ``device``. Compiles
    the kernel (triton caches it for the launch): arguments that planning changes must not be
    specialized on (``do_not_specialize``)."""
    target = gpu_target(device)
    if target is None:
        return INTERPRETER_PROGRAMS
    compiled = kernel.warmup(*args, grid=(1,), **options)
    per_sm = ctas_per_sm(registers_of(compiled), compiled.metadata.shared, compiled.metadata.num_warps,
                         target.limits)
    return max(1, per_sm) * target.sm_count


def _pow2_at_least(x: int, floor: int = 16) -> int:
    return max(floor, 1 << (x - 1).bit_length())


def _dot_step(dim: int, dtype: torch.dtype) -> int:
    """D per dot step: 128 bytes of a row per operand tile (all of D when it is that small)."""
    return min(_pow2_at_least(dim), 32 if dtype == torch.float32 else 64)


# Forward and weights kernels: (block_m, block_n, num_warps, num_stages) by name, for comparing on
# a GPU (benchmarks/kernels.py); FORWARD_TILES names the one used with tensor cores.
TILE_SHAPES = {
    "64x128": (64, 128, 4, 3),  # one warpgroup: two programs per SM overlap one's epilogue with the other's MMA
    "128x128": (128, 128, 8, 3),  # two warpgroups, one program per SM, half the operand traffic per flop
    "64x64-fma": (64, 64, 4, 2),  # fp32 with IEEE dots (no tensor cores): FMA tiles that do not spill
}
FORWARD_TILES = "64x128"


def forward_config(dim: int, dtype: torch.dtype, device: torch.device, tiles: Optional[str] = None) -> KernelConfig:
    """Forward and weights kernels: a GEMM with a fused epilogue over a flattened tile loop;
    ``tiles`` names a TILE_SHAPES entry (default: FORWARD_TILES, or FMA tiles for IEEE fp32)."""
    if gpu_target(device) is None:
        return INTERPRETER_CONFIG
    if tiles is None:
        fma = dtype == torch.float32 and fp32_input_precision() == "ieee"
        tiles = "64x64-fma" if fma else FORWARD_TILES
    block_m, block_n, num_warps, num_stages = TILE_SHAPES[tiles]
    return KernelConfig(block_m, block_n, _dot_step(dim, dtype), 0, num_warps=num_warps, num_stages=num_stages)


def gradient_config(dim: int, dtype: torch.dtype, device: torch.device) -> KernelConfig:
    """Fused gradient kernel: the (block_m, block_out) fp32 accumulator lives in registers; a D
    wider than block_out is split over programs, each recomputing S."""
    if gpu_target(device) is None:
        return INTERPRETER_CONFIG
    block_out = min(_pow2_at_least(dim), FUSED_BLOCK_OUT[dtype])
    if block_out <= 64:
        block_m, block_n = 128, 64
    else:  # narrower S tiles leave registers for the wide accumulator
        block_m, block_n = 64, 32 if block_out > 256 else 64
    return KernelConfig(block_m, block_n, _dot_step(dim, dtype), block_out, num_warps=8, num_stages=2)


def candidate_configs(default: KernelConfig) -> List[KernelConfig]:
    """Variations of ``default`` tried when autotuning."""
    variations = [
        default,
        replace(default, num_stages=default.num_stages + 1),
        replace(default, num_warps=4 if default.num_warps == 8 else 8),
        replace(default, block_n=default.block_n * 2),
        replace(default, block_m=max(64, default.block_m // 2)),
        replace(default, block_m=default.block_m * 2, num_warps=8),
        replace(default, block_d=max(16, default.block_d // 2), num_stages=default.num_stages + 1),
    ]
    if default.block_out:
        variations.append(replace(default, block_out=default.block_out * 2))
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


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=4096)
def plan_splits(num_blocks: int, other_programs: int, resident: int, max_splits: int) -> Tuple[int, int]:
    """Split ``num_blocks`` blocks (a program's loop) into contiguous ranges, one program per
    range and per each of ``other_programs``, so that ``resident`` programs at a time finish the
    launch soonest: waves x (blocks per program + PROGRAM_OVERHEAD_TILES); more splits only for a
    gain above 1% (each adds partial results to merge). Returns (splits, blocks per split); no
    split is empty."""
    best = None
    for wanted in range(1, max(1, min(num_blocks, max_splits)) + 1):
        per_split = cdiv(num_blocks, wanted)
        splits = cdiv(num_blocks, per_split)
        cost = cdiv(other_programs * splits, resident) * (per_split + PROGRAM_OVERHEAD_TILES)
        if best is None or cost < 0.99 * best[0]:
            best = (cost, splits, per_split)
    return best[1], best[2]


def row_blocks_per_launch(num_row_blocks: int, n_cols: int) -> int:
    """Row blocks per LSE forward launch so that its (blocks, n_cols) fp32 column partials fit
    in ``WORKSPACE_BYTES``."""
    return max(1, min(num_row_blocks, WORKSPACE_BYTES // (FLOAT32_BYTES * n_cols)))


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
