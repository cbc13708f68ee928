"""Gradient caching on the CPU: one training step of two MLP encoders and the fused CLIP loss,
plain backward against ``fused_losses.cached_backward``, peak resident memory and time.

    python -m benchmarks.cached_backward_benchmark                       # batch 32768, chunk 256
    python -m benchmarks.cached_backward_benchmark --batch 2048 --repeats 1   # quick check

The encoders' saved activations dominate the plain step's memory: per encoder about
batch x hidden x 4 bytes x 2 per hidden layer (the input of each Linear and of each GELU), about
2 GiB for both at the defaults. Each mode runs in a fresh process (benchmarks/fresh_process.py):
"plain" (encoders on the whole batch, loss, backward), "cached" (cached_backward with --chunk) and
"forward" (both encoders on the whole batch without a graph: the extra work cached_backward
does), each after a warm-up step on two chunks' rows. Prints the figures and appends the records to
benchmarks/results/cached_backward_<date>.jsonl.
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys

import torch
from torch import nn

import fused_losses as fl
from benchmarks.fresh_process import child_main, measure_in_child, measure_step, positive_int
from fused_losses.benchmarking import environment, write_records

RESULTS = pathlib.Path(__file__).parent / "results"
MODULE = "benchmarks.cached_backward_benchmark"
MODES = ("plain", "cached", "forward")


def encoder(config: dict) -> nn.Module:
    layers = [nn.Linear(config["dim_in"], config["hidden"]), nn.GELU()]
    for _ in range(config["layers"] - 1):
        layers += [nn.Linear(config["hidden"], config["hidden"]), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(config["hidden"], config["dim_out"]))


def measure(config: dict) -> dict:
    """The child: build two encoders and a batch, measure steps of ``config["mode"]`` (after a
    warm-up step on two chunks' rows)."""
    torch.set_num_threads(config["threads"])
    encoders = [encoder(config), encoder(config)]
    inputs = [torch.randn(config["batch"], config["dim_in"]) for _ in encoders]
    loss_fn = functools.partial(fl.clip_loss, logit_scale=20.0, backend="torch")

    def step(rows=None):
        batch = [x[:rows] for x in inputs]
        for module in encoders:
            module.zero_grad(set_to_none=True)
        if config["mode"] == "plain":
            loss_fn(*(e(x) for e, x in zip(encoders, batch))).backward()
        elif config["mode"] == "cached":
            fl.cached_backward(loss_fn, encoders, batch, chunk_size=config["chunk"])
        else:
            with torch.no_grad():
                for e, x in zip(encoders, batch):
                    e(x)

    return measure_step(step, config["repeats"], warmup=lambda: step(2 * config["chunk"]))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=positive_int, default=32768)
    parser.add_argument("--chunk", type=positive_int, default=256)
    parser.add_argument("--dim-in", type=positive_int, default=256)
    parser.add_argument("--hidden", type=positive_int, default=1024)
    parser.add_argument("--layers", type=positive_int, default=4, help="hidden layers per encoder")
    parser.add_argument("--dim-out", type=positive_int, default=128)
    parser.add_argument("--repeats", type=positive_int, default=3,
                        help="timed steps (>= 1); the first one's memory is measured")
    parser.add_argument("--threads", type=positive_int, default=torch.get_num_threads())
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help="JSON lines file (default benchmarks/results/cached_backward_<date>.jsonl)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    env = environment()
    base = dict(batch=args.batch, chunk=args.chunk, dim_in=args.dim_in, hidden=args.hidden,
                layers=args.layers, dim_out=args.dim_out, repeats=args.repeats,
                threads=args.threads)
    print(f"{env['device']}, torch {env['torch']}: two MLP encoders {args.dim_in} -> "
          f"{args.layers} x {args.hidden} (GELU) -> {args.dim_out}, batch {args.batch}, "
          f"fused CLIP loss (backend torch); cached chunk {args.chunk}", flush=True)
    records = {}
    for mode in MODES:
        result = measure_in_child(MODULE, dict(base, mode=mode))
        records[mode] = {**env, "benchmark": "cached_backward", "mode": mode, **base, **result}
        if result["oom"]:
            print(f"{mode:>8}: out of memory")
            continue
        print(f"{mode:>8}: median {result['median_ms'] / 1e3:7.2f} s (p20 "
              f"{result['p20_ms'] / 1e3:.2f}, p80 {result['p80_ms'] / 1e3:.2f}), peak extra "
              f"{result['peak_extra_bytes'] / 2**20:8.0f} MiB, process peak "
              f"{result['peak_rss_bytes'] / 2**20:8.0f} MiB", flush=True)
    plain, cached, forward = (records[mode] for mode in MODES)
    if not (plain["oom"] or cached["oom"] or forward["oom"]):
        extra_ms = cached["median_ms"] - plain["median_ms"]
        print(f"cached / plain: peak extra memory {cached['peak_extra_bytes'] / plain['peak_extra_bytes']:.1%}, "
              f"time {cached['median_ms'] / plain['median_ms']:.2f}x "
              f"(+{extra_ms / 1e3:.2f} s; one forward of both encoders takes "
              f"{forward['median_ms'] / 1e3:.2f} s)")
    out = args.out or RESULTS / f"cached_backward_{env['date']}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_records(records.values(), str(out))
    print(f"appended to {out}")
    return 0


if __name__ == "__main__":
    if not child_main(sys.argv[1:], measure):
        raise SystemExit(main())
