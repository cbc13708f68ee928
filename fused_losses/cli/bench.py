"""Benchmarks from the command line: the quick CLIP comparison of the main job, and ``bench``."""

import math
from typing import List, Optional

import torch

from fused_losses.backends import select_backend
from fused_losses.benchmarking import DTYPES, Sweep, run_sweep, write_records
from fused_losses.cli.progress import ProgressBar


def _mib(nbytes) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**20:9.1f} MiB"


def quick_sweep(device: torch.device) -> Sweep:
    """CLIP loss forward+backward at a size that shows the difference, on the backend
    ``backend="auto"`` picks (never triton's CPU interpreter), against the reference."""
    # CPU: large enough for the N x N logits to dominate the reference, small enough to finish
    # in about half a minute on 2 cores.
    n, d, dtype = (16384, 512, "bfloat16") if device.type == "cuda" else (8192, 512, "float32")
    backend = select_backend("auto", device, dtype=DTYPES[dtype])
    return Sweep(("clip",), (n,), (d,), (dtype,), (backend, "reference"), str(device),
                 modes=("forward_backward",), repeats=2)


def quick_benchmark(device: torch.device) -> str:
    """``quick_sweep`` measured: time, with the matmul floor, the memory ratio and the largest
    batch the free memory would allow each (an estimate)."""
    sweep = quick_sweep(device)
    (n,), (d,), (dtype,), (backend, _) = sweep.batch_sizes, sweep.dims, sweep.dtypes, sweep.providers
    with ProgressBar(sweep.size(), "benchmark ") as bar:
        results = {record["provider"]: record for record in run_sweep(sweep, bar.advance)}
    matmul = results[backend]["matmul_ms"]
    free = free_memory_bytes(device)
    lines = [f"CLIP loss forward+backward, N = M = {n}, D = {d}, {dtype} on {device}; "
             f"one {n}x{d}x{n} matmul: {matmul:.1f} ms"]
    for provider, record in results.items():
        if record["median_ms"] is None:
            lines.append(f"  {provider:<9} {_outcome(record)}")
            continue
        estimate = largest_batch_estimate(record["peak_mem_bytes"], n, free,
                                          quadratic=provider == "reference")
        lines.append(f"  {provider:<9} {record['median_ms']:9.1f} ms  "
                     f"({record['median_ms'] / matmul:4.1f}x matmul)  peak extra {_mib(record['peak_mem_bytes'])}"
                     + ("" if estimate is None else f"  largest batch ~{estimate:>11,}"))
    fast, slow = results[backend], results["reference"]
    if fast["median_ms"] is not None and slow["median_ms"] is not None:
        share = fast["peak_mem_bytes"] / max(slow["peak_mem_bytes"], 1)
        lines.append(f"  speed-up over the reference: {slow['median_ms'] / fast['median_ms']:.1f}x; "
                     f"memory: {share:.1%} of the reference's ({1 / max(share, 1e-9):.1f}x less)")
    if free is not None:
        lines.append(f"  largest batch: estimated for the {free / 2**30:.1f} GiB free now from the peak memory at "
                     f"N = {n}, scaled\n  as N^2 for the reference (N x N logits) and as N for {backend} "
                     f"(an underestimate: part is a fixed workspace)")
    return "\n".join(lines)


def free_memory_bytes(device: torch.device) -> Optional[int]:
    """Memory free for new allocations on ``device`` now (CPU: MemAvailable, Linux only)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def largest_batch_estimate(peak_bytes: Optional[int], n: int, free_bytes: Optional[int],
                           quadratic: bool) -> Optional[int]:
    """The batch whose loss would need ``free_bytes``, from ``peak_bytes`` measured at batch ``n``:
    memory proportional to N^2 (``quadratic``: N x N logits) or to N. None when unknown."""
    if peak_bytes is None or peak_bytes <= 0 or free_bytes is None:
        return None
    ratio = free_bytes / peak_bytes
    return int(n * (math.sqrt(ratio) if quadratic else ratio))


def _outcome(record: dict) -> str:
    """Why a record has no time: out of memory, an error, or a note."""
    if record["oom"]:
        return "out of memory"
    return record.get("error") or record.get("note") or "not measured"


def run_bench(sweep: Sweep, out: str) -> List[dict]:
    """Measure ``sweep``, appending each record to the JSON lines file ``out``; return them."""
    with ProgressBar(sweep.size(), "bench") as bar:
        return write_records(run_sweep(sweep, bar.advance), out)


def summarize(records: List[dict]) -> str:
    """A short table of ``records``."""
    lines = [f"{'loss':<9} {'provider':<10} {'n':>6} {'d':>5} {'mode':<17} {'median ms':>10} {'x matmul':>8} {'peak MiB':>9}"]
    for r in records:
        if r["median_ms"] is None:
            median, ratio = _outcome(r)[:40], ""
        else:
            median = f"{r['median_ms']:10.1f}"
            ratio = "" if r["matmul_ms"] is None else f"{r['median_ms'] / r['matmul_ms']:8.2f}"
        peak = "" if r.get("peak_mem_bytes") is None else f"{r['peak_mem_bytes'] / 2**20:9.1f}"
        lines.append(f"{r['loss']:<9} {r['provider']:<10} {r['n']:>6} {r['d']:>5} {r['mode']:<17} "
                     f"{median:>10} {ratio:>8} {peak:>9}")
    return "\n".join(lines)
