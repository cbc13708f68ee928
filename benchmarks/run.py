"""The benchmark runner: loss x batch size (N = M) x D x dtype x provider, each point's forward,
backward and forward+backward (median and 20 / 80 percentile time, peak extra memory in a separate
run) with the time of one N x D x N matmul taken in the same run; or, with --max-batch, the largest
N whose forward+backward each provider completes.

    python -m benchmarks.run --preset cpu-smoke
    python -m benchmarks.run --preset gpu-bf16-clip --out-dir "$OUT"     # one part of the publication sweep
    python -m benchmarks.run --losses clip --batch-sizes 4096 16384 --dims 512 --dtypes bfloat16
    python -m benchmarks.run --max-batch --losses clip --dims 512 768 --dtypes bfloat16

A preset sets the defaults of the options; options given on the command line override them. Each
run appends its records (JSON lines, see benchmarks/README.md) to a new file
OUT_DIR/<preset or "sweep">_<date>_<time>.jsonl and prints their table. Providers that cannot run
here are skipped with a note. Exit status 3: the time limit stopped the run before its end.
"""

import argparse
import pathlib
import time
from typing import List, Optional

import torch

from benchmarks.providers import ALL_PROVIDERS, available_providers
from benchmarks.readme_table import markdown
from fused_losses.benchmarking import (
    DTYPES, LOSSES, MODES, PARITY_TOLERANCE, Sweep, get_provider, providers_of, run_max_batch, run_sweep,
    write_records,
)
from fused_losses.cli import positive_int
from fused_losses.cli.progress import ProgressBar

RESULTS_DIR = pathlib.Path(__file__).parent / "results"

PUBLICATION_DIMS = (256, 512, 768, 1024)
# The GPU parts: each should take 2 to 5 minutes on an H100 and stops starting new points after
# time_limit_s, under the 10 minutes a call may take. The N grids stop where a provider runs out
# of memory or its projected forward+backward exceeds slow_limit_s; the max-batch parts find
# each provider's largest N exactly.
_GPU_TIMING = dict(device="cuda", dims=PUBLICATION_DIMS, providers=ALL_PROVIDERS, modes=MODES,
                   repeats=3, budget_ms=200.0, slow_limit_s=1.0, time_limit_s=510.0)
_GPU_MAX_BATCH = dict(device="cuda", max_batch=True, dtypes=("bfloat16",), dims=(512, 768),
                      providers=ALL_PROVIDERS, start=4096, cap=2**19, granularity=1024,
                      time_limit_s=510.0)
_BF16_SIZES = tuple(4096 * 2**k for k in range(6))  # 4096 ... 131072
_FP32_SIZES = tuple(4096 * 2**k for k in range(5))  # 4096 ... 65536
PRESETS = {
    "cpu-smoke": dict(device="cpu", losses=("clip", "siglip", "nt_xent", "supcon"), dtypes=("float32",),
                      dims=(64,), batch_sizes=(64, 256), providers=ALL_PROVIDERS, repeats=5, budget_ms=50.0),
    "gpu-bf16-clip": dict(_GPU_TIMING, losses=("clip",), dtypes=("bfloat16",), batch_sizes=_BF16_SIZES),
    "gpu-bf16-siglip": dict(_GPU_TIMING, losses=("siglip",), dtypes=("bfloat16",), batch_sizes=_BF16_SIZES),
    "gpu-fp32-clip": dict(_GPU_TIMING, losses=("clip",), dtypes=("float32",), batch_sizes=_FP32_SIZES),
    "gpu-fp32-siglip": dict(_GPU_TIMING, losses=("siglip",), dtypes=("float32",), batch_sizes=_FP32_SIZES),
    "gpu-max-batch-clip": dict(_GPU_MAX_BATCH, losses=("clip",)),
    "gpu-max-batch-siglip": dict(_GPU_MAX_BATCH, losses=("siglip",)),
    # Not part of the publication figures: pytorch-metric-learning's losses against ours.
    "gpu-bf16-ntxent-supcon": dict(_GPU_TIMING, losses=("nt_xent", "supcon"), dtypes=("bfloat16",),
                                   dims=(512,), batch_sizes=_BF16_SIZES),
}
PRESET_GROUPS = {"gpu-publication": ["gpu-bf16-clip", "gpu-bf16-siglip", "gpu-fp32-clip", "gpu-fp32-siglip",
                                     "gpu-max-batch-clip", "gpu-max-batch-siglip"]}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS) + list(PRESET_GROUPS),
                        help="named defaults; a group runs its presets one after another")
    parser.add_argument("--losses", nargs="+", choices=LOSSES, default=["clip"])
    parser.add_argument("--batch-sizes", nargs="+", type=positive_int, default=[1024, 4096], help="N = M")
    parser.add_argument("--dims", nargs="+", type=positive_int, default=[512], help="D")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["float32"])
    parser.add_argument("--providers", nargs="+", choices=ALL_PROVIDERS, default=ALL_PROVIDERS)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=MODES)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed calls per measurement, at least")
    parser.add_argument("--budget-ms", type=float, default=0.0,
                        help="more timed calls while their total is under this (at most 100)")
    parser.add_argument("--slow-limit-s", type=float, default=None,
                        help="skip a provider's larger N once its projected forward+backward exceeds this")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip peak memory")
    parser.add_argument("--no-parity", dest="check_parity", action="store_false",
                        help="skip the check of each provider against the float64 reference")
    parser.add_argument("--time-limit-s", type=float, default=None,
                        help="start no new point after this many seconds")
    parser.add_argument("--max-batch", action="store_true",
                        help="search each provider's largest N instead of timing a grid")
    parser.add_argument("--start", type=positive_int, default=4096, help="max batch: first N tried")
    parser.add_argument("--cap", type=positive_int, default=2**19, help="max batch: largest N tried")
    parser.add_argument("--granularity", type=positive_int, default=1024, help="max batch: precision of the bisection")
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    return parser


def _warnings(records: List[dict]) -> List[str]:
    """Provider failures, and providers whose loss differs from the reference's beyond tolerance."""
    lines = []
    for r in records:
        where = f"{r['provider']} {r['loss']} {r['dtype']} d={r['d']}"
        if r.get("error"):
            lines.append(f"error: {where} n={r['n']}: {r['error']}")
        parity = r.get("parity_error")
        if parity is not None and parity > PARITY_TOLERANCE[r["dtype"]]:
            lines.append(f"warning: {where} differs from the float64 reference by {parity:.2g} "
                         f"(relative; tolerance {PARITY_TOLERANCE[r['dtype']]:g})")
    return list(dict.fromkeys(lines))  # once each, in order


def _records(args: argparse.Namespace, providers: List[str], deadline: Optional[float]):
    """(number of steps, records(advance)) of the configuration ``args``."""
    if args.max_batch:
        total = sum(len(providers_of(providers, loss)) for loss in args.losses) * len(args.dtypes) * len(args.dims)
        return total, lambda advance: run_max_batch(
            args.losses, args.dtypes, args.dims, providers, args.device, start=args.start, cap=args.cap,
            granularity=args.granularity, advance=advance, deadline=deadline)
    sweep = Sweep(args.losses, args.batch_sizes, args.dims, args.dtypes, providers, args.device,
                  modes=args.modes, repeats=args.repeats, budget_ms=args.budget_ms, memory=args.memory,
                  check_parity=args.check_parity, slow_limit_s=args.slow_limit_s)
    return sweep.size(), lambda advance: run_sweep(sweep, advance, deadline)


def run_one(args: argparse.Namespace, name: str) -> bool:
    """Run one configuration into a new results file, print its tables; False if the time limit
    cut it short."""
    providers, notes = available_providers(args.providers, args.device)
    notes += [f"skipping {provider}: it computes none of {', '.join(args.losses)}"
              for provider in providers if not any(providers_of([provider], loss) for loss in args.losses)]
    for note in notes:
        print(note, flush=True)
    for provider in providers:
        print(f"provider {provider}: {get_provider(provider).semantics}", flush=True)
    out_dir = pathlib.Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{name}_{time.strftime('%Y%m%d_%H%M%S')}.jsonl"
    deadline = None if args.time_limit_s is None else time.monotonic() + args.time_limit_s
    total, records = _records(args, providers, deadline)
    with ProgressBar(total, name) as bar:
        written = write_records(records(bar.advance), str(out))
    print(markdown(written), flush=True)
    for line in _warnings(written):
        print(line, flush=True)
    complete = bar.done == total
    print(f"{len(written)} records written to {out}" + ("" if complete else
          f"; time limit reached after {bar.done} of {total} steps"), flush=True)
    return complete


def main(argv: Optional[List[str]] = None) -> int:
    preset = _parser().parse_args(argv).preset
    complete = True
    for name in PRESET_GROUPS.get(preset, [preset]):
        parser = _parser()
        parser.set_defaults(**PRESETS.get(name, {}))
        complete &= run_one(parser.parse_args(argv), name or "sweep")
    return 0 if complete else 3


if __name__ == "__main__":
    raise SystemExit(main())
