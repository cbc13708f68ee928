"""One CPU measurement per fresh Python process.

A process's peak resident set size only grows, and the allocator keeps what it freed, so each
configuration runs in a child process of its own, started with a fixed glibc mmap threshold
(freed blocks leave the resident set, as in ``fused_losses.benchmarking``). The child measures
training steps after a warm-up: the first one's peak resident bytes above the resident size
before it, the process's peak resident size, and the steps' median time.

A benchmark module calls ``child_main(measure)`` when started with ``--child CONFIG_JSON``; the
parent calls ``measure_in_child(module, config)``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, Optional

import torch

from fused_losses.benchmarking import _proc_status_bytes

ROOT = pathlib.Path(__file__).resolve().parents[1]
MMAP_THRESHOLD = str(64 * 1024)


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def measure_step(step: Callable[[], object], repeats: int,
                 warmup: Optional[Callable[[], object]] = None) -> Dict[str, float]:
    """In the child, after ``warmup()`` (default: a step; a smaller one initializes the same
    kernels in less time): ``peak_extra_bytes`` of one ``step()`` above the resident size before
    it, ``peak_rss_bytes`` of the process, and the time of ``repeats`` steps, that one included
    (``median_ms``, ``p20_ms``, ``p80_ms``, ``repeats``)."""
    (warmup or step)()
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # the peak resident size (VmHWM) restarts from the current one
    baseline = _proc_status_bytes("VmRSS")
    times = []
    for index in range(repeats):
        began = time.perf_counter()
        step()
        times.append((time.perf_counter() - began) * 1e3)
        if index == 0:
            peak_extra = _proc_status_bytes("VmHWM") - baseline
    quantiles = statistics.quantiles(times, n=5, method="inclusive") if repeats > 1 else times * 4
    return dict(peak_extra_bytes=peak_extra, peak_rss_bytes=_proc_status_bytes("VmHWM"),
                median_ms=statistics.median(times), p20_ms=quantiles[0], p80_ms=quantiles[3],
                repeats=repeats)


def measure_in_child(module: str, config: dict) -> dict:
    """``module``'s measurement of ``config`` (a JSON-able dict) from a fresh process; a child
    killed by the kernel (out of memory) gives {"oom": True}."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD,
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    completed = subprocess.run([sys.executable, "-m", module, "--child", json.dumps(config)],
                               cwd=ROOT, env=env, capture_output=True, text=True)
    if completed.returncode == -9:
        return {"oom": True}
    if completed.returncode != 0:
        raise RuntimeError(f"measuring {config} in a child process failed:\n{completed.stderr}")
    return dict(json.loads(completed.stdout.strip().splitlines()[-1]), oom=False)


def child_main(argv, measure: Callable[[dict], dict]) -> bool:
    """If ``argv`` is ["--child", CONFIG_JSON]: print ``measure(config)`` as JSON and return True."""
    if len(argv) != 2 or argv[0] != "--child":
        return False
    torch.manual_seed(0)
    print(json.dumps(measure(json.loads(argv[1]))), flush=True)
    return True
