"""Benchmarks from the command line: the quick CLIP comparison of the main job, and ``bench``."""

from typing import List

import torch

from fused_losses.benchmarking import Sweep, read_records, run_sweep, write_records
from fused_losses.cli.progress import ProgressBar


def _mib(nbytes) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**20:9.1f} MiB"


def quick_benchmark(backend: str, device: torch.device) -> str:
    """CLIP loss forward+backward: ``backend`` against the reference, with the matmul floor."""
    on_gpu = device.type == "cuda"
    n, d, dtype = (16384, 512, "bfloat16") if on_gpu else (4096, 512, "float32")
    sweep = Sweep(("clip",), (n,), (d,), (dtype,), (backend, "reference"), str(device),
                  modes=("forward_backward",), repeats=3)
    with ProgressBar(sweep.size(), "benchmark ") as bar:
        results = {record["provider"]: record for record in run_sweep(sweep, bar.advance)}
    matmul = results[backend]["matmul_ms"]
    lines = [f"CLIP loss forward+backward, N = M = {n}, D = {d}, {dtype} on {device}; "
             f"one {n}x{d}x{n} matmul: {matmul:.1f} ms"]
    for provider, record in results.items():
        if record["median_ms"] is None:
            lines.append(f"  {provider:<9} {_outcome(record)}")
            continue
        lines.append(f"  {provider:<9} {record['median_ms']:9.1f} ms  "
                     f"({record['median_ms'] / matmul:4.1f}x matmul)  peak extra {_mib(record['peak_mem_bytes'])}")
    fast, slow = results[backend], results["reference"]
    if fast["median_ms"] is not None and slow["median_ms"] is not None:
        lines.append(f"  speed-up over the reference: {slow['median_ms'] / fast['median_ms']:.1f}x; "
                     f"memory: {fast['peak_mem_bytes'] / max(slow['peak_mem_bytes'], 1):.1%} of the reference's")
    return "\n".join(lines)


def _outcome(record: dict) -> str:
    """Why a record has no time: out of memory, an error, or a note."""
    if record["oom"]:
        return "out of memory"
    return record.get("error") or record.get("note") or "not measured"


def run_bench(losses: List[str], batch_sizes: List[int], dims: List[int], dtype: str,
              providers: List[str], modes: List[str], device: str, repeats: int, out: str,
              keys=None) -> int:
    """Measure every combination, append JSON lines to ``out``; return the number of records."""
    sweep = Sweep(losses, batch_sizes, dims, (dtype,), providers, device, modes=modes, keys=keys,
                  repeats=repeats)
    with ProgressBar(sweep.size(), "bench") as bar:
        return write_records(run_sweep(sweep, bar.advance), out)


def summarize(out: str) -> str:
    """A short table of the records in ``out`` (JSON lines)."""
    lines = [f"{'loss':<9} {'provider':<10} {'n':>6} {'d':>5} {'mode':<17} {'median ms':>10} {'x matmul':>8} {'peak MiB':>9}"]
    for r in read_records([out]):
        if r["median_ms"] is None:
            median, ratio = _outcome(r)[:40], ""
        else:
            median = f"{r['median_ms']:10.1f}"
            ratio = "" if r["matmul_ms"] is None else f"{r['median_ms'] / r['matmul_ms']:8.2f}"
        peak = "" if r.get("peak_mem_bytes") is None else f"{r['peak_mem_bytes'] / 2**20:9.1f}"
        lines.append(f"{r['loss']:<9} {r['provider']:<10} {r['n']:>6} {r['d']:>5} {r['mode']:<17} "
                     f"{median:>10} {ratio:>8} {peak:>9}")
    return "\n".join(lines)
