"""Measuring losses: time (median and 20 / 80 percentiles), peak extra memory, the time of one
N x D x M matmul in the same dtype taken in the same run (the floor the fused losses are held to),
sweeps over grids of such points, and the search for the largest batch that fits.

Used by ``python -m fused_losses`` and by ``benchmarks/``. A *provider* computes the losses: our
backends ("triton", "cuda", "torch") and "reference" (``fused_losses.reference``) are built in;
``register_provider`` adds others (``benchmarks/providers.py`` adds the peers).

GPU timing uses CUDA events with an L2 flush before each repeat; CPU timing is repeated wall
clock; the matmul writes into a preallocated output, so it is the bare compute floor. Peak memory
on the GPU is max_memory_allocated above what was allocated before the call; on the CPU it is the
peak resident set size above the resident size before the call, measured in a fresh child process
after one warm-up step (Linux: /proc/self/status, VmHWM reset through /proc/self/clear_refs).
Running out of memory is a result (``oom: true`` in the record), not an error.
"""

from __future__ import annotations

import functools
import importlib.metadata
import itertools
import json
import multiprocessing
import os
import statistics
import time
import traceback
from dataclasses import asdict, dataclass, replace
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

from fused_losses import backends, functional, reference

MODES = ("forward", "backward", "forward_backward")
LOSSES = ("clip", "siglip", "info_nce", "nt_xent", "supcon", "npairs")
# The losses scoring N queries against M keys; the others score N x N (their m is n).
KEYED_LOSSES = ("info_nce",)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}

# Every provider computes each loss with these arguments (named as in fused_losses.functional).
LOSS_PARAMETERS = {
    "clip": {"logit_scale": 100.0},
    "siglip": {"logit_scale": 10.0, "logit_bias": -10.0},
    "info_nce": {"temperature": 0.07},
    "nt_xent": {"temperature": 0.5},
    "supcon": {"temperature": 0.1},
    "npairs": {},
}
LOSS_FUNCTION_NAMES = {"clip": "clip_loss", "siglip": "siglip_loss", "info_nce": "info_nce",
                       "nt_xent": "nt_xent", "supcon": "supcon_loss", "npairs": "npairs_loss"}

MAX_REPEATS = 100
PARITY_ROWS = 128
# Largest relative error against the float64 reference that still counts as the same loss: in
# float32 allowing TF32 products, in 16-bit allowing logits rounded to 16 bits (open_clip does).
PARITY_TOLERANCE = {"float64": 1e-6, "float32": 1e-2, "float16": 1e-1, "bfloat16": 1e-1}


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


@dataclass(frozen=True)
class Provider:
    """A way to compute the benchmark losses.

    ``loss_function(case)`` returns f with f(*loss_inputs(case)) the loss ``case.loss`` under
    LOSS_PARAMETERS as a 0-d tensor; ``unavailable_reason(device, dtype=None)`` is None when the
    provider runs on ``device`` (with ``dtype`` inputs, when given), else why not and how to fix
    it. Both must be module-level functions or partials of them: the provider is pickled into the
    child process that measures CPU memory.
    ``semantics`` says how its loss differs from ``fused_losses.reference``; ``distribution`` is
    the installed package whose version the records carry.
    """

    name: str
    losses: Tuple[str, ...]
    loss_function: Callable[[Case], Callable[..., torch.Tensor]]
    unavailable_reason: Callable[..., Optional[str]]
    semantics: str = "same as fused_losses.reference"
    distribution: Optional[str] = None

    def version(self) -> Optional[str]:
        if self.distribution is None:
            return None
        try:
            return importlib.metadata.version(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            return None


def _fused_losses_loss(backend: Optional[str], case: Case) -> Callable[..., torch.Tensor]:
    """``case.loss`` from fused_losses.functional on ``backend``, or the reference when None."""
    module, options = (reference, {}) if backend is None else (functional, {"backend": backend})
    return functools.partial(getattr(module, LOSS_FUNCTION_NAMES[case.loss]),
                             **LOSS_PARAMETERS[case.loss], **options)


def runs_anywhere(device: torch.device, dtype: Optional[torch.dtype] = None) -> Optional[str]:
    return None


_PROVIDERS: Dict[str, Provider] = {}


def register_provider(provider: Provider) -> None:
    """Make ``provider`` known by its name (replacing one of the same name)."""
    _PROVIDERS[provider.name] = provider


def get_provider(name: str) -> Provider:
    if name not in _PROVIDERS:
        raise ValueError(f"unknown provider {name!r}; known: {', '.join(_PROVIDERS)} (the peers "
                         f"are registered by importing benchmarks.providers)")
    return _PROVIDERS[name]


for _backend in backends.BACKENDS:
    register_provider(Provider(_backend, LOSSES, functools.partial(_fused_losses_loss, _backend),
                               functools.partial(backends.unavailable_reason, _backend),
                               semantics=f"fused_losses, backend={_backend!r}"))
register_provider(Provider("reference", LOSSES, functools.partial(_fused_losses_loss, None),
                           runs_anywhere, semantics="fused_losses.reference (materialized logits)"))


def loss_inputs(case: Case) -> Tuple[torch.Tensor, ...]:
    """The inputs of ``case.loss``, the same for every provider (seeded), floating ones as leaves
    requiring grad: clip, siglip, nt_xent, npairs: two (n, d); info_nce: (n, d) queries and (m, d)
    keys; supcon: (n, d) features and (n,) labels in max(2, n // 4) classes."""
    dtype, device = DTYPES[case.dtype], torch.device(case.device)
    generator = torch.Generator(device=device).manual_seed(0)

    def embeddings(rows):
        return torch.randn(rows, case.d, generator=generator, device=device,
                           dtype=dtype).requires_grad_(True)

    if case.loss == "supcon":
        classes = max(2, case.n // 4)
        return embeddings(case.n), torch.randint(0, classes, (case.n,), generator=generator, device=device)
    return embeddings(case.n), embeddings(case.m if case.loss in KEYED_LOSSES else case.n)


def loss_and_inputs(case: Case) -> Tuple[Callable, Callable[[], Tuple[torch.Tensor, ...]]]:
    """(loss function, maker of fresh leaf inputs) for ``case``."""
    return get_provider(case.provider).loss_function(case), functools.partial(loss_inputs, case)


def make_step(case: Case, mode: str) -> Tuple[Optional[Callable[[], None]], Callable[[], object]]:
    """(prepare or None, run): ``run()`` does one ``mode`` step of ``case`` on inputs made once and
    returns the loss (forward) or the input gradients; ``prepare()``, called before each run and not
    timed, builds the graph a backward-only run uses."""
    loss_fn = get_provider(case.provider).loss_function(case)
    inputs = loss_inputs(case)
    differentiable = [t for t in inputs if t.requires_grad]
    if mode == "forward":
        def forward():
            with torch.no_grad():
                return loss_fn(*inputs)
        return None, forward
    if mode == "forward_backward":
        return None, lambda: torch.autograd.grad(loss_fn(*inputs), differentiable)
    if mode != "backward":
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    pending_losses = []
    return (lambda: pending_losses.append(loss_fn(*inputs)),
            lambda: torch.autograd.grad(pending_losses.pop(), differentiable))


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(run: Callable[[], object], device: torch.device, *, warmup: int = 1, repeats: int = 5,
            budget_ms: float = 0.0, prepare: Optional[Callable[[], None]] = None) -> Dict[str, float]:
    """Median and 20 / 80 percentile milliseconds of ``run()`` after ``warmup`` untimed calls, over
    ``repeats`` timed calls and more while their total is under ``budget_ms`` (at most
    MAX_REPEATS); "repeats" is how many were timed."""
    flush = torch.empty(64 * 2**20, dtype=torch.int8, device=device) if device.type == "cuda" else None
    for _ in range(warmup):
        if prepare:
            prepare()
        run()
    synchronize(device)
    times: List[float] = []
    while len(times) < repeats or (sum(times) < budget_ms and len(times) < MAX_REPEATS):
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
    return {"median_ms": statistics.median(times), "p20_ms": quantiles[0], "p80_ms": quantiles[3],
            "repeats": len(times)}


def matmul_ms(n: int, m: int, d: int, dtype: str, device: str, repeats: int = 5,
              budget_ms: float = 0.0, allocating: bool = False) -> float:
    """Median milliseconds of one (n, d) @ (d, m) matmul in ``dtype`` on ``device``: into a
    preallocated output (the compute floor), or, with ``allocating``, as a plain ``a @ b.T`` that
    allocates its output each call (on the CPU that adds the page faults of a fresh N x M buffer)."""
    dev = torch.device(device)
    a = torch.randn(n, d, device=dev).to(DTYPES[dtype])
    b = torch.randn(m, d, device=dev).to(DTYPES[dtype])
    if allocating:
        run = lambda: a @ b.T  # noqa: E731
    else:
        product = torch.empty(n, m, device=dev, dtype=DTYPES[dtype])
        run = lambda: torch.mm(a, b.T, out=product)  # noqa: E731
    return time_ms(run, dev, repeats=repeats, budget_ms=budget_ms)["median_ms"]


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is a failed allocation (CUDA caching allocator, cuBLAS or CPU)."""
    message = str(error).lower()
    return (isinstance(error, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in message
            or "not enough memory" in message or "cublas_status_alloc_failed" in message)


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


OUT_OF_MEMORY = "out of memory"


def _peaks(case: Case, modes: Sequence[str], measure, release=None) -> Dict[str, object]:
    """{mode: measure(prepare, run) for one ``mode`` step of ``case``, or OUT_OF_MEMORY};
    ``release()`` after each mode, whatever happened."""
    peaks = {}
    for mode in modes:
        try:
            prepare, run = make_step(case, mode)
            if prepare:
                prepare()
            peaks[mode] = measure(prepare, run)
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            peaks[mode] = OUT_OF_MEMORY
        finally:
            prepare = run = None
            if release:
                release()
    return peaks


def _cpu_peak(prepare, run) -> int:
    """Peak resident bytes of ``run()`` above the resident size before it."""
    run()  # warm-up: lazy initialisation of torch's CPU kernels is not the loss's memory
    if prepare:
        prepare()
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets the peak resident size (VmHWM) to the current one
    baseline = _proc_status_bytes("VmRSS")  # read after the reset: the peak cannot be below it
    run()
    return _proc_status_bytes("VmHWM") - baseline


def _cpu_peaks_child(provider: Provider, case: Case, modes: Sequence[str], connection) -> None:
    register_provider(provider)  # the child knows only the built-in providers
    try:
        connection.send(("ok", _peaks(case, modes, _cpu_peak)))
    except Exception:  # reported to the parent, which raises it there
        connection.send(("error", traceback.format_exc()))


def _gpu_peaks(case: Case, modes: Sequence[str]) -> Dict[str, object]:
    device = torch.device(case.device)

    def measure(prepare, run) -> int:
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        run()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - baseline

    return _peaks(case, modes, measure, release=torch.cuda.empty_cache)


def peak_memory_bytes(case: Case, modes: Sequence[str] = ("forward_backward",)) -> Dict[str, object]:
    """{mode: peak memory in bytes above what was allocated before one ``mode`` step of ``case``,
    or OUT_OF_MEMORY}. A backward step's baseline includes the graph its forward saved."""
    if torch.device(case.device).type == "cuda":
        return _gpu_peaks(case, modes)
    # A fixed mmap threshold makes glibc map every large block afresh and unmap it when freed,
    # so the resident size follows live tensors instead of malloc's cache.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    try:
        context = multiprocessing.get_context("spawn")
        receiver, sender = context.Pipe(duplex=False)
        child = context.Process(target=_cpu_peaks_child,
                                args=(get_provider(case.provider), case, tuple(modes), sender))
        child.start()
        sender.close()
        try:
            status, result = receiver.recv()
        except EOFError:  # the child died without a word: the kernel's out-of-memory killer
            status, result = "ok", {mode: OUT_OF_MEMORY for mode in modes}
        child.join()
    finally:
        del os.environ["MALLOC_MMAP_THRESHOLD_"]
    if status == "error":
        raise RuntimeError(f"measuring the memory of {case} failed in the child process:\n{result}")
    return result


def _no_result(case: Case, mode: str, **fields) -> dict:
    record = dict(asdict(case), mode=mode, oom=False, median_ms=None, p20_ms=None, p80_ms=None,
                  repeats=0, peak_mem_bytes=None)
    record.update(fields)
    return record


def measure(case: Case, modes: Sequence[str] = MODES, *, repeats: int = 5, budget_ms: float = 0.0,
            memory: bool = True) -> List[dict]:
    """One record per mode: the case's fields, mode, timing, peak memory (None without
    ``memory``); ``oom`` true (and no numbers) when the mode ran out of memory."""
    device = torch.device(case.device)
    records = {}
    for mode in modes:
        try:
            prepare, run = make_step(case, mode)
            timing = time_ms(run, device, repeats=repeats, budget_ms=budget_ms, prepare=prepare)
            records[mode] = dict(asdict(case), mode=mode, oom=False, **timing, peak_mem_bytes=None)
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            records[mode] = _no_result(case, mode, oom=True)
        finally:
            prepare = run = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    measured = [mode for mode in modes if not records[mode]["oom"]]
    if memory and measured:
        for mode, peak in peak_memory_bytes(case, measured).items():
            if peak == OUT_OF_MEMORY:
                records[mode] = _no_result(case, mode, oom=True)
            else:
                records[mode]["peak_mem_bytes"] = peak
    return [records[mode] for mode in modes]


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.detach().abs().max().clamp(min=1e-6)
    return float(((got.detach().double() - want.detach()).abs().max() / scale).nan_to_num(float("inf")))


def parity_error(case: Case) -> float:
    """Largest relative error of ``case``'s loss and input gradients against the float64
    reference on the same inputs (each tensor's error over its largest reference magnitude)."""
    return max(parity_errors(case))


def parity_errors(case: Case) -> Tuple[float, float]:
    """(relative error of the loss, largest relative error of the input gradients) of ``case``
    against the float64 reference on the same inputs."""
    loss_fn, make_inputs = loss_and_inputs(case)
    inputs = make_inputs()
    reference_fn = get_provider("reference").loss_function(case)
    reference_inputs = tuple(t.detach().double().requires_grad_(True) if t.is_floating_point() else t
                             for t in inputs)
    got, want = loss_fn(*inputs), reference_fn(*reference_inputs)
    got_grads = torch.autograd.grad(got, [t for t in inputs if t.requires_grad])
    want_grads = torch.autograd.grad(want, [t for t in reference_inputs if t.requires_grad])
    return _relative_error(got, want), max(_relative_error(g, w) for g, w in zip(got_grads, want_grads))


@dataclass(frozen=True)
class Sweep:
    """A grid of benchmark points: loss x dtype x d x n (m = keys or n) x provider, in that nesting.

    A provider's series (loss, dtype, d) stops at its first out-of-memory n, and, with
    ``slow_limit_s``, before an n whose forward+backward time, projected as proportional to n * m,
    exceeds it; the points it does not run are still recorded, with a ``note``. With
    ``check_parity``, each series first checks the provider against the float64 reference at
    n = m = PARITY_ROWS in the sweep's dtype (``parity_error`` in its records).
    """

    losses: Sequence[str]
    batch_sizes: Sequence[int]
    dims: Sequence[int]
    dtypes: Sequence[str]
    providers: Sequence[str]
    device: str
    modes: Sequence[str] = MODES
    keys: Optional[int] = None
    repeats: int = 5
    budget_ms: float = 0.0
    memory: bool = True
    check_parity: bool = False
    slow_limit_s: Optional[float] = None

    def __post_init__(self):
        ignoring = [loss for loss in self.losses if loss not in KEYED_LOSSES]
        if self.keys is not None and ignoring:
            raise ValueError(f"keys (M, the rows of the keys) is used by {', '.join(KEYED_LOSSES)} "
                             f"only, not by {', '.join(ignoring)}, which score N x N: leave it out "
                             f"or measure {', '.join(KEYED_LOSSES)} alone")

    def series(self) -> Iterator[Tuple[str, str, int]]:
        """(loss, dtype, d) of each series."""
        return itertools.product(self.losses, self.dtypes, self.dims)

    def size(self) -> int:
        """Number of (point, provider) steps."""
        return sum(len(providers_of(self.providers, loss)) for loss, _, _ in self.series()) * len(self.batch_sizes)


def providers_of(providers: Sequence[str], loss: str) -> List[str]:
    """Those of ``providers`` that compute ``loss``."""
    return [name for name in providers if loss in get_provider(name).losses]


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
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
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


def _describe(error: Exception) -> str:
    return f"{type(error).__name__}: {error}".strip()


def _too_slow(last: Tuple[int, float], size: int, limit_s: float) -> Optional[str]:
    """Why a provider is not run at n * m = ``size``: its forward+backward time, projected from
    ``last`` = (n * m, milliseconds) as proportional to n * m, exceeds ``limit_s``; else None."""
    last_size, milliseconds = last
    projected_s = milliseconds * size / last_size / 1e3
    if projected_s > limit_s:
        return f"not run: projected {projected_s:.1f} s per forward+backward (limit {limit_s:g} s)"
    return None


def run_sweep(sweep: Sweep, advance: Callable[[str], None] = lambda step: None,
              deadline: Optional[float] = None) -> Iterator[dict]:
    """The records of ``sweep`` (see ``measure``), each with ``matmul_ms`` (the same-run floor),
    the environment, ``provider_version``, ``parity_error`` (or None), ``note`` (why a point was
    not run) and ``error`` (a provider's failure other than out-of-memory, which also stops its
    series). ``advance(label)`` is called after each (point, provider) step; no step starts once
    ``time.monotonic()`` has passed ``deadline``."""
    env = environment()
    for loss, dtype, d in sweep.series():
        providers = providers_of(sweep.providers, loss)
        stopped: Dict[str, dict] = {}  # provider -> fields of the records of the points it skips
        parity: Dict[str, Optional[float]] = {}
        last_ms: Dict[str, Tuple[int, float]] = {}  # provider -> (n * m, forward+backward ms)
        for n in sweep.batch_sizes:
            m = sweep.keys or n
            for provider in providers:
                if provider not in stopped and sweep.slow_limit_s is not None and provider in last_ms:
                    note = _too_slow(last_ms[provider], n * m, sweep.slow_limit_s)
                    if note:
                        stopped[provider] = {"note": note}
            floor = None
            if any(provider not in stopped for provider in providers):
                try:
                    floor = matmul_ms(n, m, d, dtype, sweep.device, sweep.repeats, sweep.budget_ms)
                except Exception as error:
                    if not is_out_of_memory(error):
                        raise
            for provider in providers:
                if deadline is not None and time.monotonic() > deadline:
                    return
                case = Case(loss, provider, n, m, d, dtype, sweep.device)
                extra = {"matmul_ms": floor, **env, "provider_version": get_provider(provider).version(),
                         "parity_error": parity.get(provider), "note": None, "error": None}
                if provider in stopped:
                    records = [_no_result(case, mode, **{**extra, **stopped[provider]}) for mode in sweep.modes]
                else:
                    try:
                        if sweep.check_parity and provider not in parity:
                            parity[provider] = extra["parity_error"] = parity_error(
                                replace(case, n=PARITY_ROWS, m=PARITY_ROWS))
                        records = [dict(record, **extra) for record in measure(
                            case, sweep.modes, repeats=sweep.repeats, budget_ms=sweep.budget_ms,
                            memory=sweep.memory)]
                    except Exception as error:
                        records = [_no_result(case, mode, **{**extra, "error": _describe(error)})
                                   for mode in sweep.modes]
                        stopped[provider] = {"note": f"not run: failed at n={n}"}
                    if any(record["oom"] for record in records):
                        stopped[provider] = {"oom": True, "note": f"not run: out of memory at n={n}"}
                    timed = {r["mode"]: r["median_ms"] for r in records if r["median_ms"] is not None}
                    if timed:
                        last_ms[provider] = (n * m, timed.get("forward_backward", max(timed.values())))
                yield from records
                advance(f"{loss} {dtype} d={d} n={n} {provider}")


def completes(case: Case) -> bool:
    """Whether one forward+backward of ``case`` runs without running out of memory."""
    device = torch.device(case.device)
    try:
        _, run = make_step(case, "forward_backward")
        run()
        synchronize(device)
        return True
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        return False


def largest_batch(fits: Callable[[int], bool], start: int, cap: int,
                  granularity: int) -> Tuple[int, Optional[int]]:
    """(largest n found with ``fits(n)``, 0 if none; smallest n found to fail, None if ``cap``
    fits), for a monotone ``fits``: doubling from ``start`` (then ``cap``), then bisection between
    the largest fit and the first failure down to ``granularity``."""
    fit, fail, n = 0, None, start
    while fail is None and fit < cap:
        n = min(n, cap)
        if fits(n):
            fit, n = n, 2 * n
        else:
            fail = n
    while fail is not None and fail - fit > granularity:
        middle = fit + max(granularity, (fail - fit) // 2 // granularity * granularity)
        if fits(middle):
            fit = middle
        else:
            fail = middle
    return fit, fail


def max_batch(case: Case, *, start: int, cap: int, granularity: int) -> dict:
    """Record of the largest n = m (at most ``cap``) at which ``case``'s forward+backward completes:
    ``max_batch`` (0 if even the smallest tried failed), ``first_failing_n`` (None when the cap
    fits: ``capped``). ``case.n`` and ``case.m`` are ignored."""
    device = torch.device(case.device)

    def fits(n: int) -> bool:
        try:
            return completes(replace(case, n=n, m=n))
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()

    fit, fail = largest_batch(fits, start, cap, granularity)
    return _no_result(replace(case, n=fit, m=fit), "max_batch", max_batch=fit, first_failing_n=fail,
                      capped=fail is None, start=start, cap=cap, granularity=granularity,
                      **environment(), provider_version=get_provider(case.provider).version())


def run_max_batch(losses: Sequence[str], dtypes: Sequence[str], dims: Sequence[int],
                  providers: Sequence[str], device: str, *, start: int, cap: int, granularity: int,
                  advance: Callable[[str], None] = lambda step: None,
                  deadline: Optional[float] = None) -> Iterator[dict]:
    """A ``max_batch`` record for each loss x dtype x d and provider computing the loss; a provider
    that fails other than by running out of memory gets a record with ``error``. ``advance`` and
    ``deadline`` as in ``run_sweep``."""
    for loss, dtype, d in itertools.product(losses, dtypes, dims):
        for provider in providers_of(providers, loss):
            if deadline is not None and time.monotonic() > deadline:
                return
            case = Case(loss, provider, 0, 0, d, dtype, device)
            try:
                yield max_batch(case, start=start, cap=cap, granularity=granularity)
            except Exception as error:
                yield _no_result(case, "max_batch", **environment(), error=_describe(error))
            advance(f"{loss} {dtype} d={d} {provider}")


def write_records(records: Iterable[dict], path: str) -> List[dict]:
    """Append ``records`` to the JSON lines file ``path``, flushing each; return them."""
    written = []
    with open(path, "a") as sink:
        for record in records:
            sink.write(json.dumps(record) + "\n")
            sink.flush()
            written.append(record)
    return written


RECORD_KEY = ("device", "provider", "loss", "n", "m", "d", "dtype", "mode")


def read_records(paths: Iterable[str]) -> List[dict]:
    """The records of the JSON lines files ``paths``; of records with the same RECORD_KEY (a point
    measured again), the last one read."""
    latest: Dict[tuple, dict] = {}
    for path in paths:
        with open(path) as source:
            for number, line in enumerate(source, 1):
                if line.strip():
                    record = _parse_record(line, f"{path}:{number}")
                    key = tuple(record.get(field) for field in RECORD_KEY)
                    latest.pop(key, None)
                    latest[key] = record
    return list(latest.values())


def _parse_record(line: str, where: str) -> dict:
    """The record on ``line``; ValueError naming ``where`` if the line is not one."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where} is not a benchmark record (JSON lines): {error}") from None
    if not isinstance(record, dict) or not set(RECORD_KEY) <= record.keys():
        raise ValueError(f"{where} is not a benchmark record: a JSON object with the fields "
                         f"{', '.join(RECORD_KEY)} was expected")
    return record
