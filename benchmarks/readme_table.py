"""The README's performance tables, in markdown, from benchmark records (JSON lines).

    python -m benchmarks.readme_table benchmarks/results/gpu-*.jsonl [--dims 512] [--out table.md]

For each device, loss, dtype and D: one row per N with the same-run matmul time and, per
provider, its time (as a multiple of that matmul) and peak extra memory; then the speed-up of
``--ours`` (default: the first of our backends in the records, the one backend="auto" picks) over
every other provider. Then the largest batch of each provider (records of ``--max-batch`` runs).
"""

import argparse
import sys
from typing import Iterable, List, Optional

from benchmarks.records import (
    first_oom_n, format_bytes, max_batch_results, ordered_providers, timing_series,
)
from fused_losses.backends import BACKENDS
from fused_losses.benchmarking import MODES, read_records


def _milliseconds(value: float) -> str:
    return f"{value:,.0f} ms" if value >= 100 else f"{value:.3g} ms"


def _times(ratio: float) -> str:
    return f"{ratio:,.0f}×" if ratio >= 10 else f"{ratio:.2g}×"


def _cell(record: Optional[dict]) -> str:
    """A provider's result at one N: time (x matmul), memory; or why there is none."""
    if record is None:
        return ""
    if record["oom"]:
        return "OOM"
    if record.get("error"):
        return "error"
    if record["median_ms"] is None:
        return "—"
    text = _milliseconds(record["median_ms"])
    if record["matmul_ms"]:
        text += f" ({_times(record['median_ms'] / record['matmul_ms'])})"
    if record["peak_mem_bytes"] is not None:
        text += f", {format_bytes(record['peak_mem_bytes'])}"
    return text


def _speed_up(ours: Optional[dict], peer: Optional[dict]) -> str:
    if ours is None or peer is None or ours["median_ms"] is None:
        return ""
    if peer["oom"]:
        return "peer OOM"
    return "" if peer["median_ms"] is None else _times(peer["median_ms"] / ours["median_ms"])


def _row(cells: Iterable[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _header(columns: List[str]) -> List[str]:
    return [_row(columns), _row(["---"] * len(columns))]


def _versions(record: dict) -> str:
    names = (("torch", "torch"), ("triton", "triton"), ("cuda", "CUDA"))
    return ", ".join([f"{label} {record[field]}" for field, label in names if record.get(field)] + [record["date"]])


def timing_tables(records: List[dict], mode: str, ours: Optional[str] = None) -> List[str]:
    """Markdown lines: per (device, loss, dtype, d), the time / memory table and the speed-ups."""
    lines = []
    for (device, loss, dtype, d), by_provider in timing_series(records, mode).items():
        providers = ordered_providers(by_provider)
        mine = ours or next((name for name in BACKENDS if name in by_provider), None)
        at = {provider: {r["n"]: r for r in series} for provider, series in by_provider.items()}
        sizes = sorted({n for series in at.values() for n in series})
        lines += [f"**{loss}, {dtype}, D = {d}, {mode.replace('_', '+')}** on {device} "
                  f"({_versions(next(iter(by_provider.values()))[0])}): median time (× one N×D×N "
                  f"matmul in {dtype}), peak extra memory", ""]
        lines += _header(["N", "matmul"] + providers)
        for n in sizes:
            floor = next((at[p][n]["matmul_ms"] for p in providers if n in at[p] and at[p][n]["matmul_ms"]), None)
            lines.append(_row([f"{n:,}", "" if floor is None else _milliseconds(floor)]
                              + [_cell(at[p].get(n)) for p in providers]))
        peers = [p for p in providers if p != mine]
        if mine is not None and peers:
            lines += ["", f"speed-up of {mine} over", ""] + _header(["N"] + peers)
            lines += [_row([f"{n:,}"] + [_speed_up(at[mine].get(n), at[p].get(n)) for p in peers])
                      for n in sizes]
        out_of_memory = [f"{p} at N = {first_oom_n(by_provider[p]):,}" for p in providers
                         if first_oom_n(by_provider[p]) is not None]
        if out_of_memory:
            lines += ["", "Out of memory: " + ", ".join(out_of_memory) + "."]
        lines.append("")
    return lines


def _max_batch_cell(record: Optional[dict]) -> str:
    if record is None:
        return ""
    if record.get("error"):
        return "error"
    if record["capped"]:
        return f"≥ {record['max_batch']:,} (cap)"
    return f"{record['max_batch']:,}"


def max_batch_tables(records: List[dict]) -> List[str]:
    """Markdown lines: per (device, loss, dtype), the largest batch of each provider per D."""
    lines = []
    for (device, loss, dtype), by_provider in max_batch_results(records).items():
        dims = sorted({d for by_d in by_provider.values() for d in by_d})
        lines += [f"**Largest batch N = M whose {loss} forward+backward fits**, {dtype}, on {device}", ""]
        lines += _header(["provider"] + [f"D = {d}" for d in dims])
        lines += [_row([provider] + [_max_batch_cell(by_provider[provider].get(d)) for d in dims])
                  for provider in ordered_providers(by_provider)]
        lines.append("")
    return lines


def markdown(records: List[dict], *, mode: str = "forward_backward", dims: Optional[List[int]] = None,
             ours: Optional[str] = None) -> str:
    """All tables of ``records`` (those with D in ``dims`` when given)."""
    if dims:
        records = [r for r in records if r["d"] in dims]
    return "\n".join(timing_tables(records, mode, ours) + max_batch_tables(records))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.readme_table",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="JSON lines files (later files win on repeated points)")
    parser.add_argument("--mode", default="forward_backward", choices=MODES)
    parser.add_argument("--dims", nargs="+", type=int, default=None, help="only these D")
    parser.add_argument("--ours", default=None, help="provider the speed-ups are of")
    parser.add_argument("--out", default=None, help="markdown file (default: stdout)")
    args = parser.parse_args(argv)
    text = markdown(read_records(args.results), mode=args.mode, dims=args.dims, ours=args.ours)
    if args.out:
        with open(args.out, "w") as sink:
            sink.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
