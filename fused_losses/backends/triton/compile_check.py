"""Compile for an H100 / H200 (sm_90), without a GPU, exactly the kernels that loss calls launch,
and report per kernel: registers, shared memory, programs (CTAs) per SM, spills, the wgmma count
and the full waits inside loops, and SASS instruction counts. A development and CI check, never
imported by the backend:

    python -m fused_losses.backends.triton.compile_check                     # the default cases
    python -m fused_losses.backends.triton.compile_check clip:bf16:65536x65536x512 siglip:fp16:8192x8192x768

A case is LOSS:DTYPE:NxMxD with LOSS one of ``CALLS`` (the backend calls the loss makes, forward
and backward) and ``--gradient fused`` selects the fused backward. How: the backend runs on meta
tensors (no memory, no compute) with triton's driver replaced by an sm_90 target, so every launch
is compiled with the specialization triton derives from the real arguments (pointer and integer
alignment, constexprs) and recorded instead of run; launch planning sees 132 SMs and reads the
compiled kernels' registers with cuobjdump. Must run without TRITON_INTERPRET (the interpreter
replaces the kernels). Exit status 1 when a kernel spills registers.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

from fused_losses.backends.base import LabelMask
from fused_losses.backends.triton import launch
from fused_losses.backends.triton.kernels import TritonKernels

SM90 = GPUTarget("cuda", 90, 32)
H100_SMS = 132
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
DEFAULT_CASES = ["clip:bf16:65536x65536x512", "clip:bf16:65536x65536x1024", "siglip:bf16:65536x65536x512",
                 "infonce:fp16:16384x65536x768", "ntxent:fp32:8192x8192x256", "clip:bf16:8192x8192x64",
                 "pml_ntxent:bf16:65536x65536x512", "pml_ntxent:fp32:8192x8192x256"]


def _inputs(n: int, m: int, dim: int, dtype: torch.dtype) -> Dict:
    meta = functools.partial(torch.empty, device="meta")
    return dict(q=meta((n, dim), dtype=dtype), k=meta((m, dim), dtype=dtype), inv_norm_q=meta(n),
                inv_norm_k=meta(m), scale=meta(()))


def _clip(kernels: TritonKernels, n: int, m: int, x: Dict) -> None:
    lse_row, lse_col = kernels.lse_forward(**x, diag_offset=None, want_rows=True, want_cols=True)
    kernels.lse_backward(**x, diag_offset=None, lse_row=lse_row, lse_col=lse_col,
                         grad_row=torch.empty(n, device="meta"), grad_col=torch.empty(m, device="meta"))


def _one_way(diag_offset: Optional[int], exclude_same_label: Optional[bool] = None) -> Callable:
    """Row statistics and their backward; with ``exclude_same_label``, under a label mask of int64
    labels (the class ids of the pytorch-metric-learning drop-ins)."""
    def call(kernels: TritonKernels, n: int, m: int, x: Dict) -> None:
        labels = None
        if exclude_same_label is not None:
            labels = LabelMask(torch.empty(n, dtype=torch.int64, device="meta"),
                               torch.empty(m, dtype=torch.int64, device="meta"), exclude_same_label)
        lse_row, _ = kernels.lse_forward(**x, diag_offset=diag_offset, want_rows=True, want_cols=False,
                                         label_mask=labels)
        kernels.lse_backward(**x, diag_offset=diag_offset, lse_row=lse_row, lse_col=None,
                             grad_row=torch.empty(n, device="meta"), grad_col=None, label_mask=labels)
    return call


def _siglip(kernels: TritonKernels, n: int, m: int, x: Dict) -> None:
    bias = torch.empty((), device="meta")
    kernels.softplus_forward(**x, bias=bias, diag_offset=None)
    kernels.softplus_backward(**x, bias=bias, diag_offset=None, grad_row=torch.empty(n, device="meta"))


# The backend calls of each loss (fused_losses.functional; pml_ntxent: the NTXentLoss of
# fused_losses.integrations.pytorch_metric_learning, each row against its negatives), forward then
# backward.
CALLS = {"clip": _clip, "infonce": _one_way(None), "ntxent": _one_way(0), "supcon": _one_way(0), "siglip": _siglip,
         "pml_ntxent": _one_way(None, exclude_same_label=True)}


class _Sm90Driver:
    """Stands in for triton's CUDA driver: sm_90 target, device 0, stream 0; never loads code."""

    def get_current_target(self):
        return SM90

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


@dataclass
class Launch:
    kernel: str
    grid: tuple
    compiled: triton.compiler.CompiledKernel


@functools.lru_cache(maxsize=None)
def _cubin_usage(cubin: bytes) -> Dict[str, int]:
    """REG, STACK, SHARED, LOCAL... of a cubin, from cuobjdump -res-usage."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        listing = subprocess.run([os.path.join(TOOLS, "cuobjdump"), "-res-usage", file.name],
                                 capture_output=True, text=True, check=True).stdout
    usage_line = next(line for line in listing.splitlines() if "REG:" in line)
    return {key: int(value) for key, value in re.findall(r"(\w+):(\d+)", usage_line)}


@functools.lru_cache(maxsize=None)
def _sass_opcodes(cubin: bytes) -> collections.Counter:
    """Opcode counts of a cubin's SASS (predicates and modifiers stripped: HGMMA, MUFU, ...)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        sass = subprocess.run([os.path.join(TOOLS, "cuobjdump"), "-sass", file.name],
                              capture_output=True, text=True, check=True).stdout
    return collections.Counter(re.findall(r"^\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass, re.M))


def loop_waits(ttgir: str) -> Dict[str, int]:
    """From TTGIR: wgmma ops, and the full waits (warp_group_dot_wait pendings = 0, async_wait
    num = 0) inside scf.for loops: all of them, and those run on every iteration (not under an
    scf.if of the loop)."""
    stack: List[str] = []
    counts: collections.Counter[str] = collections.Counter()
    for raw in ttgir.splitlines():
        line = re.sub(r"\s*loc\(.*\)\s*$", "", raw).strip()
        if line.startswith("}"):
            stack.pop()
            if line.endswith("{"):  # } else {
                stack.append("if")
            continue
        in_loop = "for" in stack
        every_iteration = in_loop and stack[len(stack) - 1 - stack[::-1].index("for"):].count("if") == 0
        if "ttng.warp_group_dot " in line:
            counts["wgmma"] += 1
        full_wait = ("warp_group_dot_wait" in line and "pendings = 0" in line) or (
            "ttg.async_wait" in line and "num = 0 " in line)
        if full_wait and in_loop:
            counts["full_waits_in_loops"] += 1
            counts["full_waits_every_iteration"] += every_iteration
        if line.endswith("{"):
            stack.append("for" if re.search(r"\bscf\.(for|while)\b", line) else "if" if "scf.if" in line else "region")
    return counts


@contextlib.contextmanager
def sm90_launches() -> Iterator[List[Launch]]:
    """Within: triton launches compile for sm_90 and are recorded, not run; launch planning sees
    an H100 (132 SMs) and reads registers from the compiled cubins."""
    recorded: List[Launch] = []
    run = JITFunction.run

    def compile_and_record(self, *args, grid, warmup, **kwargs):
        compiled = run(self, *args, grid=grid, warmup=True, **kwargs)
        if not warmup:
            recorded.append(Launch(self.fn.__name__, tuple(grid), compiled))
        return compiled

    saved = (launch.gpu_target, launch.registers_of, driver._active)  # no GPU: no default driver to reset to
    driver.set_active(_Sm90Driver())
    JITFunction.run = compile_and_record
    launch.gpu_target = lambda device: launch.GpuTarget(H100_SMS, launch.SM90)
    launch.registers_of = lambda compiled: _cubin_usage(compiled.asm["cubin"])["REG"]
    try:
        yield recorded
    finally:
        JITFunction.run = run
        launch.gpu_target, launch.registers_of, driver._active = saved


def kernel_report(compiled) -> Dict[str, int]:
    """Resources and static instruction counts of one compiled kernel."""
    usage = _cubin_usage(compiled.asm["cubin"])
    opcodes = _sass_opcodes(compiled.asm["cubin"])
    waits = loop_waits(compiled.asm["ttgir"])
    return dict(
        registers=usage["REG"], spill_bytes=usage["STACK"] + usage["LOCAL"], shared=compiled.metadata.shared,
        warps=compiled.metadata.num_warps,
        ctas_per_sm=launch.ctas_per_sm(usage["REG"], compiled.metadata.shared, compiled.metadata.num_warps),
        wgmma=waits["wgmma"], full_waits_in_loops=waits["full_waits_in_loops"],
        full_waits_every_iteration=waits["full_waits_every_iteration"],
        sass=sum(opcodes.values()), hgmma=opcodes["HGMMA"], mufu=opcodes["MUFU"], bar=opcodes["BAR"],
    )


def check_case(case: str, gradient: str = "chunked") -> List[Dict]:
    """One report per distinct kernel the case launches (see the module docstring)."""
    loss, dtype_name, sizes = case.split(":")
    n, m, dim = (int(x) for x in sizes.split("x"))
    with sm90_launches() as launches:
        CALLS[loss](TritonKernels(gradient=gradient), n, m, _inputs(n, m, dim, DTYPES[dtype_name]))
    reports: Dict[str, Dict] = {}
    for item in launches:
        key = item.compiled.hash
        if key not in reports:
            reports[key] = dict(case=case, kernel=item.kernel, grid=item.grid, launches=0, **kernel_report(item.compiled))
        reports[key]["launches"] += 1
    return list(reports.values())


def _format(report: Dict) -> str:
    return (f"{report['case']} {report['kernel']} grid {report['grid']} x{report['launches']}: "
            f"registers {report['registers']}, spill {report['spill_bytes']} B, shared {report['shared']} B, "
            f"{report['warps']} warps, {report['ctas_per_sm']} CTA/SM, wgmma {report['wgmma']}, "
            f"full waits in loops {report['full_waits_in_loops']} (every iteration {report['full_waits_every_iteration']}), "
            f"SASS {report['sass']} (HGMMA {report['hgmma']}, MUFU {report['mufu']}, BAR {report['bar']})")


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", nargs="*", default=DEFAULT_CASES, help="LOSS:DTYPE:NxMxD")
    parser.add_argument("--gradient", choices=("chunked", "fused"), default="chunked")
    parser.add_argument("--tf32", action="store_true", help="fp32 inputs with TF32 dots (torch's fp32_precision)")
    args = parser.parse_args(argv)
    if args.tf32:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
    if os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on"):
        parser.error("unset TRITON_INTERPRET: the interpreter replaces the compiled kernels")
    spilled = False
    for case in args.cases:
        for report in check_case(case, args.gradient):
            spilled |= report["spill_bytes"] > 0
            print(_format(report), flush=True)
    return 1 if spilled else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
