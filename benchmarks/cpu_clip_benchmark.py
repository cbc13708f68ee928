"""CPU figures of the foundation issue: CLIP loss forward+backward, backend torch vs the reference.

    python benchmarks/cpu_clip_benchmark.py [--n 16384] [--d 512] [--repeats 3]

Prints time as a multiple of one N x D x N matmul taken in the same run, both into a
preallocated output (``matmul_ms``, the compute floor) and as a plain ``a @ b.T`` that allocates
its N x N output (``matmul_allocating_ms``), peak extra memory, and the ratios to the reference;
appends the records (JSON lines) to benchmarks/results/cpu_clip_<date>.jsonl.
"""

import argparse
import pathlib

from fused_losses.benchmarking import Sweep, matmul_ms, run_sweep, write_records

RESULTS = pathlib.Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--providers", nargs="+", default=["torch", "reference"])
    args = parser.parse_args()
    sweep = Sweep(("clip",), (args.n,), (args.d,), ("float32",), args.providers, "cpu",
                  modes=("forward_backward",), repeats=args.repeats)
    records = {}
    for record in run_sweep(sweep):
        floor = record["matmul_ms"]
        if not records:
            plain = matmul_ms(args.n, args.n, args.d, "float32", "cpu", allocating=True)
            print(f"{record['device']}, torch {record['torch']}: one {args.n}x{args.d}x{args.n} fp32 matmul "
                  f"{floor:.0f} ms into a preallocated output, {plain:.0f} ms as a @ b.T", flush=True)
        record["matmul_allocating_ms"] = plain
        records[record["provider"]] = record
        if record["median_ms"] is None:
            print(f"{record['provider']:<9} {record['error'] or 'out of memory'}", flush=True)
            continue
        print(f"{record['provider']:<9} forward+backward median {record['median_ms']:8.0f} ms "
              f"(p20 {record['p20_ms']:.0f}, p80 {record['p80_ms']:.0f}) = "
              f"{record['median_ms'] / floor:.2f}x the preallocated matmul, "
              f"{record['median_ms'] / plain:.2f}x a @ b.T; peak extra "
              f"{record['peak_mem_bytes'] / 2**20:.0f} MiB", flush=True)
    fast, slow = records.get("torch"), records.get("reference")
    if fast and slow and fast["median_ms"] and slow["median_ms"]:
        print(f"torch backend: {slow['median_ms'] / fast['median_ms']:.2f}x faster than the reference, "
              f"peak extra memory {fast['peak_mem_bytes'] / slow['peak_mem_bytes']:.1%} of the reference's")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"cpu_clip_{next(iter(records.values()))['date']}.jsonl"
    write_records(records.values(), str(out))
    print(f"appended to {out}")


if __name__ == "__main__":
    main()
