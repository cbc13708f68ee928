"""Measuring a loss: time (median and 20 / 80 percentiles), peak extra memory, and the time of one
N x D x M matmul in the same dtype taken in the same run (the floor the fused losses are held to).

Used by ``python -m fused_losses`` and by the scripts in ``benchmarks/``. A *provider* is
"reference" (``fused_losses.reference``) or the name of one of our backends.

GPU timing uses CUDA events with an L2 flush before each repeat; CPU timing is repeated wall
clock; the matmul writes into a preallocated output, so it is the bare compute floor. Peak memory
on the GPU is max_memory_allocated above what was allocated before the call; on the CPU it is the
peak resident set size above the resident size before the call, measured in a fresh child process
after one warm-up step (Linux: /proc/self/status, VmHWM reset through /proc/self/clear_refs).
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from fused_losses import functional, reference

MODES = ("forward", "backward", "forward_backward")
LOSSES = ("clip", "siglip", "info_nce", "nt_xent", "supcon", "npairs")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}


@dataclass(frozen=True)
class Case:
    """One benchmark point: ``provider`` computing ``loss`` on (n, d) x (m, d) inputs."""

    loss: str
    provider: str
    n: int
    m: int
    d: int
    dtype: str
    device: str


def loss_and_inputs(case: Case) -> Tuple[Callable, Callable[[], Tuple[torch.Tensor, ...]]]:
    """(loss function, maker of fresh leaf inputs) for ``case``."""
    module = reference if case.provider == "reference" else functional
    options = {} if case.provider == "reference" else {"backend": case.provider}
    dtype, device = DTYPES[case.dtype], torch.device(case.device)
    generator = torch.Generator(device=device).manual_seed(0)

    def embeddings(rows):
        return torch.randn(rows, case.d, generator=generator, device=device, dtype=dtype)

    def labels(rows, classes):
        return torch.randint(0, classes, (rows,), generator=generator, device=device)

    def pair():
        return embeddings(case.n), embeddings(case.n)

    calls = {
        "clip": (lambda a, b: module.clip_loss(a, b, 100.0, **options), pair),
        "siglip": (lambda a, b: module.siglip_loss(a, b, 10.0, -10.0, **options), pair),
        "info_nce": (lambda a, b: module.info_nce(a, b, 0.07, **options),
                     lambda: (embeddings(case.n), embeddings(case.m))),
        "nt_xent": (lambda a, b: module.nt_xent(a, b, 0.5, **options), pair),
        "supcon": (lambda a, y: module.supcon_loss(a, y, 0.1, **options),
                   lambda: (embeddings(case.n), labels(case.n, max(2, case.n // 4)))),
        "npairs": (lambda a, b: module.npairs_loss(a, b, **options), pair),
    }
    loss_fn, make_inputs = calls[case.loss]

    def leaf_inputs():
        return tuple(t.requires_grad_(True) if t.is_floating_point() else t for t in make_inputs())

    return loss_fn, leaf_inputs


def _step(case: Case, mode: str) -> Tuple[Optional[Callable[[], None]], Callable[[], None]]:
    """(prepare or None, run): ``run()`` does one ``mode`` step of ``case`` on inputs made once;
    ``prepare()``, called before each run and not timed, builds the graph a backward-only run uses.
    """
    loss_fn, make_inputs = loss_and_inputs(case)
    inputs = make_inputs()
    differentiable = [t for t in inputs if t.requires_grad]
    if mode == "forward":
        def forward():
            with torch.no_grad():
                loss_fn(*inputs)
        return None, forward
    if mode == "forward_backward":
        return None, lambda: torch.autograd.grad(loss_fn(*inputs), differentiable)
    pending_losses = []
    return (lambda: pending_losses.append(loss_fn(*inputs)),
            lambda: torch.autograd.grad(pending_losses.pop(), differentiable))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(run: Callable[[], None], device: torch.device, *, warmup: int = 1, repeats: int = 5,
            prepare: Optional[Callable[[], None]] = None) -> Dict[str, float]:
    """Median and 20 / 80 percentile milliseconds of ``run()`` over ``repeats`` timed calls."""
    flush = torch.empty(64 * 2**20, dtype=torch.int8, device=device) if device.type == "cuda" else None
    for _ in range(warmup):
        if prepare:
            prepare()
        run()
    times = []
    for _ in range(repeats):
        if prepare:
            prepare()
        if flush is not None:
            flush.zero_()
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            stop.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(stop))
        else:
            began = time.perf_counter()
            run()
            times.append((time.perf_counter() - began) * 1e3)
    times.sort()
    quantiles = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else times * 4
    return {"median_ms": statistics.median(times), "p20_ms": quantiles[0], "p80_ms": quantiles[3]}


def matmul_ms(n: int, m: int, d: int, dtype: str, device: str, repeats: int = 5) -> float:
    """Median milliseconds of one (n, d) @ (d, m) matmul in ``dtype`` on ``device``."""
    dev = torch.device(device)
    a = torch.randn(n, d, device=dev).to(DTYPES[dtype])
    b = torch.randn(m, d, device=dev).to(DTYPES[dtype])
    product = torch.empty(n, m, device=dev, dtype=DTYPES[dtype])
    return time_ms(lambda: torch.mm(a, b.T, out=product), dev, repeats=repeats)["median_ms"]


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _cpu_peak_child(case: Case, mode: str, queue) -> None:
    try:
        prepare, run = _step(case, mode)
        if prepare:
            prepare()
        run()  # warm-up: lazy initialisation of torch's CPU kernels is not the loss's memory
        if prepare:
            prepare()
        baseline = _proc_status_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets the peak resident size (VmHWM) to the current one
        run()
        queue.put(_proc_status_bytes("VmHWM") - baseline)
    except Exception as error:  # reported to the parent, which re-raises it there
        queue.put(error)


def peak_memory_bytes(case: Case, mode: str = "forward_backward") -> int:
    """Peak memory above what was allocated before one ``mode`` step of ``case``."""
    device = torch.device(case.device)
    if device.type == "cuda":
        prepare, run = _step(case, mode)
        if prepare:
            prepare()
        _synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        run()
        _synchronize(device)
        return torch.cuda.max_memory_allocated(device) - baseline
    # A fixed mmap threshold makes glibc map every large block afresh and unmap it when freed,
    # so the resident size follows live tensors instead of malloc's cache.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    try:
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        child = context.Process(target=_cpu_peak_child, args=(case, mode, queue))
        child.start()
        result = queue.get()
        child.join()
    finally:
        del os.environ["MALLOC_MMAP_THRESHOLD_"]
    if isinstance(result, Exception):
        raise result
    return result


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def measure(case: Case, modes=MODES, *, repeats: int = 5, memory: bool = True) -> List[dict]:
    """One record per mode: the case's fields, mode, timing, peak memory; ``oom`` when it ran out."""
    device = torch.device(case.device)
    records = []
    for mode in modes:
        record = dict(asdict(case), mode=mode, oom=False)
        try:
            prepare, run = _step(case, mode)
            record.update(time_ms(run, device, repeats=repeats, prepare=prepare))
            del prepare, run
            record["peak_mem_bytes"] = peak_memory_bytes(case, mode) if memory else None
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            record.update(oom=True, median_ms=None, p20_ms=None, p80_ms=None, peak_mem_bytes=None)
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        records.append(record)
    return records


def environment() -> Dict[str, str]:
    """Versions and device names for a results file."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    return {
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if cuda else _cpu_name(),
        "date": time.strftime("%Y-%m-%d"),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return f"CPU: {line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"CPU ({torch.get_num_threads()} threads)"
