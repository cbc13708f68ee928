"""What ptxas made of the CUDA kernels for one GPU architecture, read without a GPU from the
objects of the in-place build (``build/fused_losses_cuda/*.o``, compiled with the extension's own
flags, so what is reported is what runs). A development check, never imported by the backend:

    python -m fused_losses.backends.cuda.compile_check [--arch 90]

builds what is stale (``fused_losses.backends.cuda.build``), then prints per kernel: registers,
shared memory (static + the pipeline's dynamic), CTAs per SM from registers / shared memory /
threads, spills (the cubin's stack and local memory, and STL / LDL in the SASS) and, for the tile
kernels, the instructions one warp executes per pipeline stage: HMMA, LDSM, LDGSTS and the total.
A stage is the shortest path of basic blocks through the innermost HMMA loop, from its head to its
back edge, that does no epilogue work (MUFU, SHFL, STS, LDG / STG: the per-tile epilogue, the
staging of vectors and the unaligned-rows copy) and issues the stage's cp.async (LDGSTS). Exit
status 1 when a kernel spills.
"""

from __future__ import annotations

import argparse
import heapq
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from fused_losses.backends.cuda import build

KERNEL_SOURCES = ("forward.cu", "weights.cu")
# Per SM: registers, shared memory (bytes), warps, CTAs; shared memory per CTA at most (bytes).
ARCH_LIMITS = {80: (65536, 167936, 64, 32, 166912), 86: (65536, 102400, 48, 16, 101376),
               89: (65536, 102400, 48, 24, 101376), 90: (65536, 233472, 64, 32, 232448)}
EPILOGUE_OPCODES = ("MUFU", "SHFL", "STS", "LDG", "STG")
_CONFIG_LABELS = (("MmaConfigI13__nv_bfloat16Lb0E", "bf16"), ("MmaConfigI6__halfLb0E", "fp16"),
                  ("MmaConfigIfLb1E", "fp32 split-tf32"), ("MmaConfigIfLb0E", "fp32 tf32"))


class CheckError(RuntimeError):
    """The check cannot run here; the message says why."""


def find_cuobjdump() -> Optional[str]:
    """cuobjdump of the CUDA toolkit (CUDA_HOME, PATH, /usr/local/cuda*), else the one triton ships."""
    candidates = [Path(os.environ[v]) / "bin" / "cuobjdump" for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    on_path = shutil.which("cuobjdump")
    candidates += [Path(on_path)] if on_path else []
    candidates += sorted(Path("/usr/local").glob("cuda*/bin/cuobjdump"))
    try:
        import triton

        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    except ImportError:
        pass
    return next((str(path) for path in candidates if path.is_file()), None)


@dataclass
class StageCounts:
    """Instructions of one pipeline stage (see the module docstring)."""

    total: int
    hmma: int
    ldsm: int
    ldgsts: int


@dataclass
class KernelReport:
    name: str  # mangled
    label: str
    registers: int
    shared_bytes: int  # static, with the CTA's reserved system memory
    stack_bytes: int
    local_bytes: int
    spill_instructions: int  # STL / LDL in the SASS
    stage: Optional[StageCounts]

    @property
    def spills(self) -> bool:
        return self.stack_bytes > 0 or self.local_bytes > 0 or self.spill_instructions > 0


def kernel_label(mangled: str) -> str:
    """A short name: kernel, input type / precision, reduction or weights, and its options (the
    forward's column statistics, the label mask)."""
    kernel = re.search(r"\d([a-z_]+_kernel)", mangled)
    parts = [kernel.group(1) if kernel else mangled[:40]]
    parts += [label for key, label in _CONFIG_LABELS if key in mangled]
    parts += re.findall(r"(LseRows|SoftplusRows|SoftmaxWeights|SigmoidWeights)", mangled)
    if "LseRowsELb1E" in mangled:
        parts.append("+columns")
    if re.search(r"(LseRowsELb[01]E|SoftmaxWeightsE)Lb1E", mangled):
        parts.append("+labels")
    return " ".join(parts)


def _run(tool: str, *args: str) -> str:
    result = subprocess.run([tool, *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise CheckError(f"{Path(tool).name} {' '.join(args)} failed: {result.stderr.strip()[:500]}")
    return result.stdout


def resource_usage(listing: str) -> Dict[str, Dict[str, int]]:
    """{mangled name: {"REG": .., "STACK": .., "SHARED": .., "LOCAL": ..}} from cuobjdump -res-usage."""
    usage = {}
    for name, fields in re.findall(r"Function (\S+):\s*\n\s*(REG:.*)", listing):
        usage[name] = {key: int(value) for key, value in re.findall(r"(\w+):(\d+)", fields)}
    return usage


def sass_functions(listing: str) -> Dict[str, List[Tuple[int, str]]]:
    """{mangled name: [(address, instruction text without the trailing ';')]} from cuobjdump -sass."""
    functions = {}
    for chunk in re.split(r"\n\s*Function : ", listing)[1:]:
        name, _, body = chunk.partition("\n")
        functions[name.strip()] = [(int(address, 16), text.strip())
                                   for address, text in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", body)]
    return functions


def _opcode(text: str) -> str:
    words = text.split()
    word = words[1] if words and words[0].startswith("@") and len(words) > 1 else (words[0] if words else "")
    return word.split(".")[0]


def _executes(text: str) -> bool:
    """False for instructions under the never-true predicate (placeholders the compiler leaves)."""
    return not text.startswith("@!PT ")


def _branch_target(text: str) -> Optional[int]:
    match = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", text)
    return int(match.group(1), 16) if match else None


def _basic_blocks(instructions: List[Tuple[int, str]]) -> List[List[Tuple[int, str]]]:
    """Split before every branch target and after every branch or exit."""
    targets = {target for _, text in instructions if (target := _branch_target(text)) is not None}
    blocks: List[List[Tuple[int, str]]] = []
    block: List[Tuple[int, str]] = []
    for address, text in instructions:
        if address in targets and block:
            blocks.append(block)
            block = []
        block.append((address, text))
        if _opcode(text) in ("BRA", "EXIT", "RET"):
            blocks.append(block)
            block = []
    if block:
        blocks.append(block)
    return blocks


def stage_counts(instructions: List[Tuple[int, str]]) -> Optional[StageCounts]:
    """Counts of one stage (see the module docstring); None without an HMMA loop."""
    loops = [(target, address) for address, text in instructions
             if (target := _branch_target(text)) is not None and target <= address]
    with_mma = [(head, end) for head, end in loops
                if any(head <= a <= end and _opcode(t) == "HMMA" for a, t in instructions)]
    if not with_mma:
        return None
    head, end = min(with_mma, key=lambda loop: loop[1] - loop[0])
    blocks = [b for b in _basic_blocks(instructions) if head <= b[0][0] <= end]
    index = {block[0][0]: i for i, block in enumerate(blocks)}
    work = [[t for _, t in block if _executes(t)] for block in blocks]
    allowed = [not any(_opcode(t) in EPILOGUE_OPCODES for t in texts) for texts in work]
    loads = [any(_opcode(t) == "LDGSTS" for t in texts) for texts in work]
    need_load = any(a and l for a, l in zip(allowed, loads))

    def successors(i: int) -> List[int]:
        last = blocks[i][-1][1]
        following = [i + 1] if i + 1 < len(blocks) and not (_opcode(last) in ("BRA", "EXIT") and
                                                             not last.startswith("@")) else []
        target = _branch_target(last)
        return following + ([index[target]] if target in index and target != head else [])

    # Dijkstra over (block, loaded yet) from the head to the back edge (the block ending at `end`).
    start = index[head]
    queue = [(len(work[start]), start, loads[start], [start])]
    settled = set()
    while queue:
        cost, i, loaded, path = heapq.heappop(queue)
        if (i, loaded) in settled:
            continue
        settled.add((i, loaded))
        if blocks[i][-1][0] == end and (loaded or not need_load):
            stage = [t for j in path for t in work[j]]
            count = lambda opcode: sum(1 for t in stage if _opcode(t) == opcode)  # noqa: E731
            return StageCounts(total=len(stage), hmma=count("HMMA"), ldsm=count("LDSM"), ldgsts=count("LDGSTS"))
        for j in successors(i):
            if allowed[j]:
                heapq.heappush(queue, (cost + len(work[j]), j, loaded or loads[j], path + [j]))
    return None


def ctas_per_sm(arch: int, registers: int, threads: int, shared_bytes: int) -> int:
    """Resident CTAs per SM: registers (8 per thread a step, per warp, per quarter SM), shared
    memory (shared_bytes with the reserved part), warps and the CTA limit."""
    regs_per_sm, shared_per_sm, warps_per_sm, ctas_limit, shared_per_cta = ARCH_LIMITS[arch]
    warps = -(-threads // 32)
    per_warp = -(-max(registers, 1) // 8) * 8 * 32
    warps_by_registers = (regs_per_sm // 4 // per_warp) * 4
    if shared_bytes > shared_per_cta + 1024:
        return 0
    by_shared = shared_per_sm // shared_bytes if shared_bytes else ctas_limit
    return min(warps_by_registers // warps, by_shared, warps_per_sm // warps, ctas_limit)


def kernel_reports(objects: Sequence[Path], arch: int, cuobjdump: str) -> List[KernelReport]:
    """Every kernel of the objects' sm_<arch> code."""
    reports = []
    for obj in objects:
        usage = resource_usage(_run(cuobjdump, "-arch", f"sm_{arch}", "-res-usage", str(obj)))
        code = sass_functions(_run(cuobjdump, "-arch", f"sm_{arch}", "-sass", str(obj)))
        if not usage:
            raise CheckError(f"{obj} has no sm_{arch} code: build with FUSED_LOSSES_CUDA_ARCHS including {arch}")
        for name, fields in usage.items():
            instructions = code.get(name, [])
            reports.append(KernelReport(
                name=name, label=kernel_label(name), registers=fields["REG"], shared_bytes=fields["SHARED"],
                stack_bytes=fields["STACK"], local_bytes=fields["LOCAL"],
                spill_instructions=sum(1 for _, t in instructions if _opcode(t) in ("STL", "LDL")),
                stage=stage_counts(instructions)))
    return reports


def format_report(report: KernelReport, arch: int, threads: int, dynamic_shared_bytes: int) -> str:
    """One line; the tile kernels (those with a stage loop) with their CTAs per SM and stage counts."""
    line = (f"{report.label}: {report.registers} registers, spills "
            f"{'YES' if report.spills else 'none'} (stack {report.stack_bytes} B, local {report.local_bytes} B, "
            f"{report.spill_instructions} STL/LDL)")
    if report.stage is None:
        return line
    shared = report.shared_bytes + dynamic_shared_bytes
    stage = report.stage
    return (f"{line}, shared {shared} B ({report.shared_bytes} static), "
            f"{ctas_per_sm(arch, report.registers, threads, shared)} CTAs/SM; per stage: {stage.hmma} HMMA, "
            f"{stage.ldsm} LDSM, {stage.ldgsts} LDGSTS of {stage.total} instructions")


def build_objects() -> List[Path]:
    return [build.BUILD_DIR / f"{name}.o" for name in KERNEL_SOURCES]


def stale_objects_reason() -> Optional[str]:
    """None when the in-place build's objects exist and come from the current sources, else why not."""
    info = build.BUILD_DIR / "build_info.h"
    if not info.is_file() or not all(obj.is_file() for obj in build_objects()):
        return f"no in-place build in {build.BUILD_DIR} ({build.BUILD_COMMAND})"
    if f'"{build.source_hash()}"' not in info.read_text():
        return f"the objects in {build.BUILD_DIR} come from other sources: rebuild ({build.BUILD_COMMAND})"
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(ARCH_LIMITS))
    args = parser.parse_args(argv)
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        print("error: no cuobjdump (CUDA toolkit or triton)", file=sys.stderr)
        return 2
    try:
        build.build(archs=sorted(set(build.parse_archs()) | {args.arch}), verbose=False)
        from fused_losses.backends.cuda import _extension

        tile = _extension._import_file(build.IN_PLACE_OUTPUT).tile
        reports = kernel_reports(build_objects(), args.arch, cuobjdump)
    except (build.BuildError, CheckError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for report in reports:
        print(f"sm_{args.arch} {format_report(report, args.arch, tile['threads'], tile['dynamic_shared_bytes'])}")
    return 1 if any(report.spills for report in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
