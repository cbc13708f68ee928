"""Command line: ``python -m fused_losses`` (environment, self-check, quick benchmark) and
``python -m fused_losses bench ...`` (measurements written as JSON lines)."""

import argparse
from typing import List, Optional

from fused_losses import __version__
from fused_losses.backends import BACKENDS, available_backends
from fused_losses.benchmarking import DTYPES, LOSSES, MODES
from fused_losses.cli.bench import quick_benchmark, run_bench, summarize
from fused_losses.cli.environment import default_device, describe_environment
from fused_losses.cli.selfcheck import run_selfcheck


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fused_losses", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fused_losses {__version__}")
    parser.add_argument("--no-bench", action="store_true", help="skip the quick benchmark")
    commands = parser.add_subparsers(dest="command")
    bench = commands.add_parser("bench", help="measure losses x batch sizes x dims x providers")
    bench.add_argument("--losses", nargs="+", default=["clip"], choices=LOSSES)
    bench.add_argument("--batch-sizes", nargs="+", type=int, default=[1024, 4096])
    bench.add_argument("--keys", type=int, default=None, help="M (rows of keys) if not N")
    bench.add_argument("--dims", nargs="+", type=int, default=[512])
    bench.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    bench.add_argument("--providers", nargs="+", default=None,
                       help=f"backends ({', '.join(BACKENDS)}) and/or 'reference'; default: all available and the reference")
    bench.add_argument("--modes", nargs="+", default=["forward_backward"], choices=MODES)
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    bench.add_argument("--repeats", type=int, default=5)
    bench.add_argument("--out", default="bench_results.jsonl", help="JSON lines file, appended to")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "bench":
        device = args.device or str(default_device())
        providers = args.providers or available_backends(device) + ["reference"]
        count = run_bench(args.losses, args.batch_sizes, args.dims, args.dtype, providers,
                          args.modes, device, args.repeats, args.out, keys=args.keys)
        print(summarize(args.out))
        print(f"{count} records appended to {args.out}")
        return 0
    device = default_device()
    print(describe_environment(), end="\n\n", flush=True)
    backends = available_backends(device)
    table, passed = run_selfcheck(backends, device)
    print(table, end="\n\n", flush=True)
    if not args.no_bench:
        print(quick_benchmark(backends[0], device), flush=True)
    print("\nself-check " + ("passed" if passed else "FAILED"))
    return 0 if passed else 1


__all__ = ["main"]
