"""Where one loss step's time goes: torch.profiler over a few steps of one provider, the GPU
kernels and the host-side operators by total time, and the step's wall time against the sum of its
kernels (a large gap: launch overhead, host work or synchronizations between kernels).

    python -m benchmarks.profile_step --loss clip --n 16384 --d 512 --provider triton
    python -m benchmarks.profile_step --n 48 --d 40 --provider torch --device cpu    # a dry run
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

import torch
from torch.profiler import ProfilerActivity, profile

from fused_losses.benchmarking import DTYPES, LOSSES, MODES, Case, make_step, synchronize
from fused_losses.cli import positive_int

def profile_step(case: Case, mode: str, steps: int, rows: int) -> str:
    """Tables of the kernels (GPU) and operators (host) over ``steps`` steps after one warm-up."""
    device = torch.device(case.device)
    prepare, run = make_step(case, mode)
    for _ in range(2):  # compilation, autotuning, allocator warm-up
        if prepare:
            prepare()
        run()
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    wall_ms = 0.0
    with profile(activities=activities) as prof:
        for _ in range(steps):
            if prepare:
                prepare()
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            wall_ms += (time.perf_counter() - start) * 1e3
    events = prof.key_averages()
    lines = [f"{case.loss} {case.provider} N={case.n} M={case.m} D={case.d} {case.dtype} {mode}: "
             f"wall {wall_ms / steps:.3f} ms per step (host clock, synchronized)"]
    if device.type == "cuda":
        kernel_ms = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") / 1e3 / steps
        lines.append(f"sum of GPU kernels {kernel_ms:.3f} ms per step; gap {wall_ms / steps - kernel_ms:.3f} ms")
        lines.append(events.table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=60))
    lines.append(events.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60))
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loss", choices=LOSSES, default="clip")
    parser.add_argument("--provider", default="triton")
    parser.add_argument("--n", type=positive_int, default=16384, help="N = M")
    parser.add_argument("--d", type=positive_int, default=512)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--mode", choices=MODES, default="forward_backward")
    parser.add_argument("--steps", type=positive_int, default=5)
    parser.add_argument("--rows", type=positive_int, default=15, help="rows of each table")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    case = Case(args.loss, args.provider, args.n, args.n, args.d, args.dtype, args.device)
    print(profile_step(case, args.mode, args.steps, args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
