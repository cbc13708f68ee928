"""Command line: ``python -m fused_losses`` (environment, self-check, quick benchmark) and
``python -m fused_losses bench ...`` (measurements written as JSON lines).

Arguments are checked before anything runs; a wrong one ends in argparse's usage message and
exit status 2, with one line saying what is wrong (no traceback).
"""

import argparse
from typing import List, Optional, Tuple

import torch

from fused_losses import __version__
from fused_losses.backends import BACKENDS, available_backends
from fused_losses.benchmarking import DTYPES, LOSSES, MODES, Sweep, get_provider, read_records
from fused_losses.cli.bench import quick_benchmark, run_bench, summarize
from fused_losses.cli.environment import default_device, describe_environment
from fused_losses.cli.selfcheck import run_selfcheck


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _parsers() -> Tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """(the command's parser, its ``bench`` subcommand's)."""
    parser = argparse.ArgumentParser(prog="python -m fused_losses", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fused_losses {__version__}")
    parser.add_argument("--no-bench", action="store_true", help="skip the quick benchmark")
    commands = parser.add_subparsers(dest="command")
    bench = commands.add_parser("bench", help="measure losses x batch sizes x dims x providers")
    bench.add_argument("--losses", nargs="+", default=["clip"], choices=LOSSES)
    bench.add_argument("--batch-sizes", nargs="+", type=positive_int, default=[1024, 4096])
    bench.add_argument("--keys", type=positive_int, default=None,
                       help="M (rows of keys) if not N; info_nce only")
    bench.add_argument("--dims", nargs="+", type=positive_int, default=[512])
    bench.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    bench.add_argument("--providers", nargs="+", default=None,
                       help=f"backends ({', '.join(BACKENDS)}) and/or 'reference'; default: all available and the reference")
    bench.add_argument("--modes", nargs="+", default=["forward_backward"], choices=MODES)
    bench.add_argument("--device", default=None, help="cpu or cuda[:index] (default: cuda if present)")
    bench.add_argument("--repeats", type=positive_int, default=5)
    bench.add_argument("--out", default="bench_results.jsonl", help="JSON lines file, appended to")
    return parser, bench


def _device(text: Optional[str]) -> torch.device:
    """The --device to run on; ValueError saying why it cannot be used."""
    if text is None:
        return default_device()
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"--device must be cpu or cuda[:index], got {text!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda[:index], got {text!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {text}: CUDA is not available to torch here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {text}: there are {torch.cuda.device_count()} CUDA devices")
    return device


def _check_providers(names: List[str], device: torch.device, dtype: str) -> None:
    for name in names:
        try:
            provider = get_provider(name)
        except ValueError as error:
            raise ValueError(f"--providers: {error}") from None
        reason = provider.unavailable_reason(device, DTYPES[dtype])
        if reason is not None:
            raise ValueError(f"--providers {name} cannot run on {device} with {dtype}: {reason}")


def _check_out(path: str) -> None:
    """--out must hold benchmark records (or nothing) and be writable."""
    try:
        read_records([path])
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"--out {path} cannot be appended to: {error}") from None
    try:
        open(path, "a").close()
    except OSError as error:
        raise ValueError(f"--out {path} cannot be written: {error.strerror}") from None


def _bench_sweep(args: argparse.Namespace) -> Sweep:
    """The measurements ``args`` ask for; ValueError saying which argument is wrong."""
    device = _device(args.device)
    providers = args.providers or available_backends(device, DTYPES[args.dtype]) + ["reference"]
    _check_providers(providers, device, args.dtype)
    try:
        sweep = Sweep(args.losses, args.batch_sizes, args.dims, (args.dtype,), providers,
                      str(device), modes=args.modes, keys=args.keys, repeats=args.repeats)
    except ValueError as error:
        raise ValueError(f"--keys: {error}") from None
    _check_out(args.out)
    return sweep


def main(argv: Optional[List[str]] = None) -> int:
    parser, bench_parser = _parsers()
    args = parser.parse_args(argv)
    if args.command == "bench":
        try:
            sweep = _bench_sweep(args)
        except ValueError as error:
            bench_parser.error(str(error))
        records = run_bench(sweep, args.out)
        print(summarize(records))
        print(f"{len(records)} records appended to {args.out}")
        return 0
    device = default_device()
    print(describe_environment(), end="\n\n", flush=True)
    backends = available_backends(device)
    table, passed = run_selfcheck(backends, device)
    print(table, end="\n\n", flush=True)
    if not args.no_bench:
        print(quick_benchmark(device), flush=True)
    print("\nself-check " + ("passed" if passed else "FAILED"))
    return 0 if passed else 1


__all__ = ["main", "positive_int"]
