"""Figures from benchmark records (JSON lines), written as PNGs.

    python -m benchmarks.plot benchmarks/results/gpu-*.jsonl [--mode forward_backward] [--out-dir benchmarks/results]

Per device, loss, dtype and D: time and peak extra memory against the batch size N = M, log
scales, one line per provider (ours solid, the others dashed; the band is the 20-80 percentile
range), an x at the top edge where a provider ran out of memory, and the same-run N x D x N
matmul as a dotted black line. Per device, loss and dtype with max-batch records: the largest
batch of each provider per D as bars ("≥" where the search stopped at its cap).
Needs matplotlib (pip install matplotlib).
"""

import argparse
import pathlib
import re
from typing import List, Optional

from benchmarks.providers import ALL_PROVIDERS
from benchmarks.records import first_oom_n, max_batch_results, ordered_providers, timing_series
from fused_losses.backends import BACKENDS
from fused_losses.benchmarking import MODES, read_records

RESULTS_DIR = pathlib.Path(__file__).parent / "results"


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot
    return pyplot


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40]


def _color(provider: str):
    """The same color for a provider in every figure."""
    palette = _pyplot().get_cmap("tab10").colors
    rank = ALL_PROVIDERS.index(provider) if provider in ALL_PROVIDERS else len(ALL_PROVIDERS)
    return palette[rank % len(palette)]


def plot_timings(records: List[dict], mode: str, out_dir: pathlib.Path) -> List[pathlib.Path]:
    """One figure (time, memory) per (device, loss, dtype, d) of ``mode`` records; their paths."""
    pyplot = _pyplot()
    plain_numbers = pyplot.FuncFormatter(lambda value, _: f"{value:g}")
    written = []
    for (device, loss, dtype, d), by_provider in timing_series(records, mode).items():
        figure, (time_axes, memory_axes) = pyplot.subplots(1, 2, figsize=(12, 4.5))
        floor = sorted({(r["n"], r["matmul_ms"]) for series in by_provider.values() for r in series
                        if r["matmul_ms"] is not None})
        if floor:
            time_axes.plot(*zip(*floor), ":", color="black", label="one N×D×N matmul")
        for provider in ordered_providers(by_provider):
            series = by_provider[provider]
            style = dict(color=_color(provider), linestyle="-" if provider in BACKENDS else "--",
                         marker="o", markersize=3, label=provider)
            timed = [r for r in series if r["median_ms"] is not None]
            if timed:
                sizes = [r["n"] for r in timed]
                time_axes.plot(sizes, [r["median_ms"] for r in timed], **style)
                time_axes.fill_between(sizes, [r["p20_ms"] for r in timed], [r["p80_ms"] for r in timed],
                                       color=_color(provider), alpha=0.2)
            measured = [r for r in series if r["peak_mem_bytes"] is not None]
            if measured:
                memory_axes.plot([r["n"] for r in measured], [r["peak_mem_bytes"] / 2**20 for r in measured], **style)
            oom_n = first_oom_n(series)
            if oom_n is not None:
                for axes in (time_axes, memory_axes):
                    axes.plot([oom_n], [0.97], "x", color=_color(provider), markersize=10, mew=2,
                              transform=axes.get_xaxis_transform(), clip_on=False)
        for axes, label in ((time_axes, "median time (ms)"), (memory_axes, "peak extra memory (MiB)")):
            axes.set_xscale("log", base=2)
            axes.set_yscale("log")
            axes.set_xlabel("batch size N = M (x: out of memory)")
            axes.set_ylabel(label)
            axes.grid(True, which="both", alpha=0.3)
            axes.yaxis.set_major_formatter(plain_numbers)
            axes.yaxis.set_minor_formatter(pyplot.NullFormatter())
        time_axes.legend(fontsize=8)
        figure.suptitle(f"{loss}, {dtype}, D = {d}, {mode.replace('_', '+')} on {device}")
        figure.tight_layout()
        path = out_dir / f"{loss}_{dtype}_d{d}_{mode}_{_slug(device)}.png"
        figure.savefig(path, dpi=120)
        pyplot.close(figure)
        written.append(path)
    return written


def plot_max_batches(records: List[dict], out_dir: pathlib.Path) -> List[pathlib.Path]:
    """One bar chart per (device, loss, dtype) of max-batch records; their paths."""
    pyplot = _pyplot()
    written = []
    for (device, loss, dtype), by_provider in max_batch_results(records).items():
        providers = ordered_providers(by_provider)
        dims = sorted({d for by_d in by_provider.values() for d in by_d})
        figure, axes = pyplot.subplots(figsize=(max(6, 1.2 * len(providers) * len(dims)), 4.5))
        width = 0.8 / len(providers)
        for index, provider in enumerate(providers):
            for position, d in enumerate(dims):
                record = by_provider[provider].get(d)
                if record is None or not record["max_batch"]:
                    continue
                x = position + (index - (len(providers) - 1) / 2) * width
                axes.bar(x, record["max_batch"], width, color=_color(provider),
                         label=provider if position == 0 else None)
                axes.annotate(("≥" if record["capped"] else "") + f"{record['max_batch']:,}", (x, record["max_batch"]),
                              ha="center", va="bottom", fontsize=7)
        axes.set_xticks(range(len(dims)), [f"D = {d}" for d in dims])
        axes.set_yscale("log", base=2)
        axes.set_ylim(top=axes.get_ylim()[1] * 4)  # room for the labels
        axes.set_ylabel("largest batch N = M")
        axes.legend(fontsize=8)
        axes.set_title(f"Largest {loss} forward+backward batch, {dtype}, on {device}")
        figure.tight_layout()
        path = out_dir / f"max_batch_{loss}_{dtype}_{_slug(device)}.png"
        figure.savefig(path, dpi=120)
        pyplot.close(figure)
        written.append(path)
    return written


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="JSON lines files (later files win on repeated points)")
    parser.add_argument("--mode", default="forward_backward", choices=MODES)
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    records = read_records(args.results)
    out_dir = pathlib.Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in plot_timings(records, args.mode, out_dir) + plot_max_batches(records, out_dir):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
