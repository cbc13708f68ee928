"""Benchmarks from the command line: the quick CLIP comparison of the main job, and ``bench``."""

import json

from typing import List

import torch

from fused_losses.benchmarking import Case, environment, matmul_ms, measure
from fused_losses.cli.progress import ProgressBar


def _mib(nbytes) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**20:9.1f} MiB"


def quick_benchmark(backend: str, device: torch.device) -> str:
    """CLIP loss forward+backward: ``backend`` against the reference, with the matmul floor."""
    on_gpu = device.type == "cuda"
    n, d, dtype = (16384, 512, "bfloat16") if on_gpu else (4096, 512, "float32")
    providers = [backend, "reference"]
    results = {}
    with ProgressBar(len(providers) + 1, "benchmark ") as bar:
        matmul = matmul_ms(n, n, d, dtype, str(device))
        bar.advance("matmul")
        for provider in providers:
            (results[provider],) = measure(Case("clip", provider, n, n, d, dtype, str(device)),
                                           modes=("forward_backward",), repeats=3)
            bar.advance(provider)
    lines = [f"CLIP loss forward+backward, N = M = {n}, D = {d}, {dtype} on {device}; "
             f"one {n}x{d}x{n} matmul: {matmul:.1f} ms"]
    for provider, record in results.items():
        if record["oom"]:
            lines.append(f"  {provider:<9} out of memory")
            continue
        lines.append(f"  {provider:<9} {record['median_ms']:9.1f} ms  "
                     f"({record['median_ms'] / matmul:4.1f}x matmul)  peak extra {_mib(record['peak_mem_bytes'])}")
    fast, slow = results[backend], results["reference"]
    if not (fast["oom"] or slow["oom"]):
        lines.append(f"  speed-up over the reference: {slow['median_ms'] / fast['median_ms']:.1f}x; "
                     f"memory: {fast['peak_mem_bytes'] / max(slow['peak_mem_bytes'], 1):.1%} of the reference's")
    return "\n".join(lines)


def run_bench(losses: List[str], batch_sizes: List[int], dims: List[int], dtype: str,
              providers: List[str], modes: List[str], device: str, repeats: int, out: str,
              keys=None) -> int:
    """Measure every combination, append JSON lines to ``out``; return the number of records."""
    env = environment()
    points = [(loss, n, d) for loss in losses for n in batch_sizes for d in dims]
    written = 0
    with open(out, "a") as sink, ProgressBar(len(points) * len(providers), "bench") as bar:
        for loss, n, d in points:
            m = keys or n
            floor = matmul_ms(n, m, d, dtype, device)
            for provider in providers:
                for record in measure(Case(loss, provider, n, m, d, dtype, device), modes, repeats=repeats):
                    record.update(matmul_ms=floor, **env)
                    sink.write(json.dumps(record) + "\n")
                    written += 1
                bar.advance(f"{loss} n={n} d={d} {provider}")
    return written


def summarize(out: str) -> str:
    """A short table of the records in ``out`` (JSON lines)."""
    lines = [f"{'loss':<9} {'provider':<10} {'n':>6} {'d':>5} {'mode':<17} {'median ms':>10} {'x matmul':>8} {'peak MiB':>9}"]
    with open(out) as source:
        for line in source:
            r = json.loads(line)
            median = "OOM" if r["oom"] else f"{r['median_ms']:10.1f}"
            ratio = "" if r["oom"] else f"{r['median_ms'] / r['matmul_ms']:8.2f}"
            peak = "" if r.get("peak_mem_bytes") is None else f"{r['peak_mem_bytes'] / 2**20:9.1f}"
            lines.append(f"{r['loss']:<9} {r['provider']:<10} {r['n']:>6} {r['d']:>5} {r['mode']:<17} "
                         f"{median:>10} {ratio:>8} {peak:>9}")
    return "\n".join(lines)


