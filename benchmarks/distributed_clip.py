"""CLIP across ranks on the CPU (gloo): forward+backward time per rank and bytes communicated per
step, for one or more source trees of fused_losses (e.g. before and after a change).

    python3 -m benchmarks.distributed_clip [--sources LABEL=PATH ...] [--ranks 2] [--n-local 4096]
        [--d 256] [--dtype float32] [--repeats 5]

Each source is measured in its own spawn of ``--ranks`` gloo processes of one thread each, which
import fused_losses from PATH (default: ``after=`` this checkout). Every rank holds N_local pairs
and runs ``clip_loss(..., gather_distributed=True, backend="torch")`` with a logit scale that
requires grad; its forward+backward is timed after a barrier (median, 20 / 80 percentiles), next
to one N_local x D x N_global matmul timed on the same rank (the floor).

Bytes: one extra untimed step runs with the torch.distributed collectives wrapped; each call is
logged with the bytes this rank receives under bandwidth-optimal algorithms, computed from the
tensor sizes of the call: all_gather (W - 1) x its input; all_reduce 2 (W - 1) / W x its tensor
(ring); scatter, broadcast: the tensor, on the ranks that are not the source; all_to_all the
pieces from the other ranks; reduce_scatter (W - 1) x its output. (gloo's own algorithms may move
more; the model is what NCCL's bus bandwidth counts.) Records (JSON lines) are appended to
benchmarks/results/distributed_clip_<date>.jsonl.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from typing import Callable, Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LOGIT_SCALE = 100.0


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _received_bytes(op: str, args, kwargs, rank: int, world_size: int) -> int:
    """Bytes this rank receives in one call of the collective ``op`` (see the module docstring)."""
    def arg(index, name):
        return kwargs[name] if name in kwargs else args[index]

    if op == "all_gather":
        return (world_size - 1) * _nbytes(arg(1, "tensor"))
    if op == "all_reduce":
        return 2 * (world_size - 1) * _nbytes(arg(0, "tensor")) // world_size
    if op == "scatter":
        return 0 if arg(2, "src") == rank else _nbytes(arg(0, "tensor"))
    if op == "broadcast":
        return 0 if arg(1, "src") == rank else _nbytes(arg(0, "tensor"))
    if op == "all_to_all":
        return sum(_nbytes(t) for i, t in enumerate(arg(0, "output_tensor_list")) if i != rank)
    if op == "reduce_scatter":
        return (world_size - 1) * _nbytes(arg(0, "output"))
    raise ValueError(f"no byte model for collective {op!r}")


COLLECTIVES = ("all_gather", "all_reduce", "scatter", "broadcast", "all_to_all", "reduce_scatter")


@contextlib.contextmanager
def logged_collectives(log: List[dict]):
    """Within the block, append {"op", "bytes"} to ``log`` for every collective of
    torch.distributed that this process calls (``COLLECTIVES``; callers that look them up on the
    torch.distributed module, as torch.distributed.nn and fused_losses do)."""
    originals = {op: getattr(dist, op) for op in COLLECTIVES}

    def logged(op: str, collective: Callable):
        @functools.wraps(collective)
        def call(*args, **kwargs):
            group = kwargs.get("group")
            rank, size = dist.get_rank(group), dist.get_world_size(group)
            log.append({"op": op, "bytes": _received_bytes(op, args, kwargs, rank, size)})
            return collective(*args, **kwargs)
        return call

    for op, collective in originals.items():
        setattr(dist, op, logged(op, collective))
    try:
        yield log
    finally:
        for op, collective in originals.items():
            setattr(dist, op, collective)


def summarize(log: List[dict]) -> Dict[str, Dict[str, int]]:
    """{op: {"calls": how many, "bytes": received}} of a ``logged_collectives`` log."""
    summary: Dict[str, Dict[str, int]] = defaultdict(lambda: {"calls": 0, "bytes": 0})
    for call in log:
        summary[call["op"]]["calls"] += 1
        summary[call["op"]]["bytes"] += call["bytes"]
    return dict(summary)


def _timings(run: Callable[[], object], repeats: int) -> Dict[str, float]:
    """Median, 20 and 80 percentile milliseconds of ``run()``: one untimed call, then ``repeats``
    timed ones, all ranks released together by a barrier before each."""
    run()
    times = []
    for _ in range(repeats):
        dist.barrier()
        began = time.perf_counter()
        run()
        times.append((time.perf_counter() - began) * 1e3)
    quantiles = statistics.quantiles(times, n=5, method="inclusive") if repeats > 1 else times * 4
    return {"median_ms": statistics.median(times), "p20_ms": quantiles[0], "p80_ms": quantiles[3]}


def _worker(rank: int, world_size: int, port: int, source: str, args: dict, out_dir: str):
    """Run by every rank: time the step, log its collectives, write rank<r>.json to ``out_dir``."""
    torch.set_num_threads(1)
    sys.path.insert(0, source)
    import fused_losses  # from ``source``: this fresh process has not imported it before

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    try:
        n, d, dtype = args["n_local"], args["d"], DTYPES[args["dtype"]]
        gen = torch.Generator().manual_seed(1234 + rank)
        image = torch.randn(n, d, generator=gen).to(dtype).requires_grad_()
        text = torch.randn(n, d, generator=gen).to(dtype).requires_grad_()
        scale = torch.tensor(LOGIT_SCALE, requires_grad=True)

        def step():
            image.grad = text.grad = scale.grad = None
            loss = fused_losses.clip_loss(image, text, scale, gather_distributed=True,
                                          backend="torch")
            loss.backward()
            return loss

        log: List[dict] = []
        with logged_collectives(log):
            loss = step()
        record = _timings(step, args["repeats"])
        a, b = torch.randn(n, d).to(dtype), torch.randn(n * world_size, d).to(dtype)
        product = torch.empty(n, n * world_size, dtype=dtype)
        record["matmul_ms"] = _timings(lambda: torch.mm(a, b.T, out=product),
                                       args["repeats"])["median_ms"]
        record.update(rank=rank, loss=loss.item(), bytes_received=sum(c["bytes"] for c in log),
                      collectives=summarize(log), fused_losses_file=fused_losses.__file__)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as sink:
            json.dump(record, sink)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _commit(path: str):
    try:
        return subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def measure(label: str, source: str, args: dict) -> dict:
    """One record: ``args["ranks"]`` gloo processes running the fused_losses of ``source``."""
    from fused_losses.benchmarking import environment  # this checkout's, in this process only

    ranks = args["ranks"]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(ranks, _free_port(), source, args, out_dir), nprocs=ranks,
                 join=True)
        per_rank = []
        for rank in range(ranks):
            with open(os.path.join(out_dir, f"rank{rank}.json")) as saved:
                per_rank.append(json.load(saved))
    return {
        "benchmark": "distributed_clip", "label": label, "source": source,
        "source_commit": _commit(source), **args, "n_global": args["n_local"] * ranks,
        "threads_per_rank": 1, "backend": "torch", "logit_scale": LOGIT_SCALE,
        # A step ends when its slowest rank does.
        "median_ms": max(r["median_ms"] for r in per_rank),
        "matmul_ms": max(r["matmul_ms"] for r in per_rank),
        "bytes_received_per_rank": max(r["bytes_received"] for r in per_rank),
        "per_rank": per_rank, **environment(), "date": datetime.date.today().isoformat(),
    }


def one_device(args: dict, device: str) -> List[dict]:
    """The similarity work of one rank's step in either scheme, on one device without collectives
    (the per-rank figure where a single GPU is at hand): "two_pass" scores the rank's images
    against all texts and its texts against all images, row statistics each, as the loss did
    before issue 12; "one_pass" scores its images against all texts once with both statistics.
    Forward+backward of this checkout's ``similarity_lse`` (backend "auto"), inputs on ``device``;
    the O(N D) terms and the collectives are not in it."""
    from fused_losses import similarity_lse
    from fused_losses.benchmarking import environment, matmul_ms, time_ms

    n, d, dtype, dev = args["n_local"], args["d"], DTYPES[args["dtype"]], torch.device(device)
    m = n * args["ranks"]
    image, text = (torch.randn(n, d, device=dev).to(dtype).requires_grad_() for _ in range(2))
    all_images, all_texts = (torch.randn(m, d, device=dev).to(dtype).requires_grad_()
                             for _ in range(2))

    def one_pass():
        rows, cols = similarity_lse(image, all_texts, LOGIT_SCALE, rows=True, cols=True)
        return torch.autograd.grad(rows.sum() + cols.sum(), (image, all_texts))

    def two_pass():
        image_rows, _ = similarity_lse(image, all_texts, LOGIT_SCALE)
        text_rows, _ = similarity_lse(text, all_images, LOGIT_SCALE)
        return torch.autograd.grad(image_rows.sum() + text_rows.sum(),
                                   (image, all_texts, text, all_images))

    floor = matmul_ms(n, m, d, args["dtype"], device, repeats=args["repeats"])
    return [{"benchmark": "distributed_clip_one_device", "scheme": name, **args, "n_global": m,
             **time_ms(run, dev, repeats=args["repeats"]), "matmul_ms": floor, **environment(),
             "date": datetime.date.today().isoformat()}
            for name, run in (("two_pass", two_pass), ("one_pass", one_pass))]


def _source(text: str):
    label, sep, path = text.partition("=")
    if not (sep and label and path):
        raise argparse.ArgumentTypeError(f"expected LABEL=PATH, got {text!r}")
    if not (pathlib.Path(path) / "fused_losses" / "__init__.py").is_file():
        raise argparse.ArgumentTypeError(f"{path} holds no fused_losses package")
    return label, str(pathlib.Path(path).resolve())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", nargs="+", type=_source, default=[("after", str(ROOT))],
                        metavar="LABEL=PATH", help="source trees to measure, in this order")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--n-local", type=int, default=4096)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--one-device", metavar="DEVICE", default=None,
                        help="instead: one rank's similarity work of both schemes on DEVICE "
                             "(e.g. cuda), no processes spawned (see one_device)")
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help="JSON lines file "
                             "(default: benchmarks/results/distributed_clip_<date>.jsonl)")
    options = parser.parse_args()
    from fused_losses.benchmarking import write_records  # this checkout's, in this process only

    args = dict(ranks=options.ranks, n_local=options.n_local, d=options.d, dtype=options.dtype,
                repeats=options.repeats)
    torch.set_num_threads(1)  # the recorded device line states one thread, as each rank runs
    out = options.out or RESULTS / f"distributed_clip_{datetime.date.today().isoformat()}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    if options.one_device:
        records = one_device(args, options.one_device)
        write_records(records, str(out))
        for record in records:
            print(f"{record['scheme']:>8}: forward+backward {record['median_ms']:9.2f} ms "
                  f"({record['median_ms'] / record['matmul_ms']:.2f}x one {args['n_local']}x"
                  f"{args['d']}x{record['n_global']} matmul) on {record['device']}")
        print(f"two_pass / one_pass: {records[0]['median_ms'] / records[1]['median_ms']:.2f}x; "
              f"appended to {out}")
        return
    records = []
    for label, source in options.sources:
        record = measure(label, source, args)
        records.append(record)
        write_records([record], str(out))
        print(f"{label:>8}: forward+backward {record['median_ms']:9.1f} ms per rank "
              f"({record['median_ms'] / record['matmul_ms']:.2f}x one {args['n_local']}x{args['d']}x"
              f"{record['n_global']} matmul), {record['bytes_received_per_rank'] / 2**20:8.3f} MiB "
              f"received per rank, loss {record['per_rank'][0]['loss']:.6f}", flush=True)
    for other in records[1:]:
        base = records[0]
        print(f"{base['label']} / {other['label']}: "
              f"time {base['median_ms'] / other['median_ms']:.2f}x, "
              f"bytes {base['bytes_received_per_rank'] / other['bytes_received_per_rank']:.2f}x")
    print(f"appended to {out}")


if __name__ == "__main__":
    main()
