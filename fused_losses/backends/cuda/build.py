"""Build the CUDA extension ``fused_losses.backends.cuda._C`` from ``csrc/`` with nvcc and ninja.

Used by setup.py (which loads this file by path: it must not import torch or fused_losses), by the
just-in-time build on first use, and from the command line, which builds in place:

    python -m fused_losses.backends.cuda.build [--archs "80;90"] [--jobs N] [--output PATH]

Environment: ``FUSED_LOSSES_CUDA_ARCHS`` (default "80;90"; sm_80 is the minimum), ``MAX_JOBS``
(parallel compile jobs), ``CUDA_HOME`` / ``CUDA_PATH`` (where nvcc is). The extension needs no torch
headers: it links against the CUDA runtime (statically) and pybind11 (headers from the pybind11
package or, failing that, the copy bundled with torch).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import List, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[3]
CSRC = REPO_ROOT / "csrc"
SOURCES = ("forward.cu", "weights.cu", "binding.cpp")
DEFAULT_ARCHS = "80;90"
MIN_ARCH = 80  # bf16 and TF32 tensor-core MMA
# The in-place build: where an installed package or `python -m ...build` puts the extension.
IN_PLACE_OUTPUT = Path(__file__).resolve().parent / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
# Where the in-place build keeps its objects (compile_check reads them).
BUILD_DIR = REPO_ROOT / "build" / "fused_losses_cuda"
BUILD_COMMAND = "python -m fused_losses.backends.cuda.build  (from the repository root)"


class BuildError(RuntimeError):
    """The extension cannot be built here; the message says why."""


def source_files() -> List[Path]:
    """Every file the extension is built from (the host-only unit tests excluded)."""
    return sorted(p for p in CSRC.iterdir() if p.suffix in (".h", ".cuh", ".cu", ".cpp"))


def source_hash() -> str:
    """Digest of the extension's sources: a build with another digest is stale."""
    digest = hashlib.sha256()
    for path in source_files():
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def parse_archs(spec: Optional[str] = None) -> List[int]:
    """Compute capabilities as integers (80, 90, ...) from "80;90", "8.0,9.0", "sm_90" and the like;
    default: $FUSED_LOSSES_CUDA_ARCHS, else "80;90"."""
    if spec is None:
        spec = os.environ.get("FUSED_LOSSES_CUDA_ARCHS") or DEFAULT_ARCHS
    archs = set()
    for token in re.split(r"[;,\s]+", spec.strip()):
        if not token:
            continue
        match = re.fullmatch(r"(?:sm_|compute_)?(\d)\.?(\d)", token)
        if match is None:
            raise BuildError(f"cannot parse CUDA arch {token!r} in {spec!r} (expected e.g. '80;90')")
        arch = int(match.group(1) + match.group(2))
        if arch < MIN_ARCH:
            raise BuildError(f"CUDA arch {arch} is not supported: the kernels need sm_{MIN_ARCH} or newer")
        archs.add(arch)
    if not archs:
        raise BuildError(f"no CUDA arch in {spec!r}")
    return sorted(archs)


def gencode_flags(archs: Sequence[int]) -> List[str]:
    """Machine code for every arch, plus PTX of the newest for GPUs newer than all of them."""
    flags = []
    for arch in archs:
        code = f"[sm_{arch},compute_{arch}]" if arch == max(archs) else f"sm_{arch}"
        flags.append(f"-gencode=arch=compute_{arch},code={code}")
    return flags


def covers_capability(archs: Sequence[int], capability: Sequence[int]) -> bool:
    """Whether a build for ``archs`` runs on a GPU of compute capability (major, minor): machine code
    of the same major version and no newer minor, or the PTX of the newest arch, not newer."""
    device = capability[0] * 10 + capability[1]
    same_family = any(arch // 10 == capability[0] and arch <= device for arch in archs)
    return same_family or max(archs) <= device


def find_nvcc() -> Optional[str]:
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(variable)
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def find_ninja() -> Optional[str]:
    found = shutil.which("ninja")
    if found:
        return found
    try:  # the `ninja` package from PyPI, even when its script is not on PATH
        import ninja
    except ImportError:
        return None
    candidate = Path(ninja.BIN_DIR) / "ninja"
    return str(candidate) if candidate.is_file() else None


def pybind11_include() -> Optional[str]:
    try:
        import pybind11

        return pybind11.get_include()
    except ImportError:
        pass
    # torch ships pybind11's headers; only those are used from its include directory.
    spec = importlib.util.find_spec("torch")
    for location in (spec.submodule_search_locations or []) if spec else []:
        include = Path(location) / "include"
        if (include / "pybind11" / "pybind11.h").is_file():
            return str(include)
    return None


def missing_tools() -> List[str]:
    """What this machine lacks to build the extension (empty: it can build)."""
    missing = []
    if find_nvcc() is None:
        missing.append("nvcc (install the CUDA toolkit or set CUDA_HOME)")
    if find_ninja() is None:
        missing.append("ninja (pip install ninja)")
    if pybind11_include() is None:
        missing.append("pybind11 headers (pip install pybind11)")
    if not all((CSRC / name).is_file() for name in SOURCES):
        missing.append(f"the CUDA sources ({CSRC} is not a source checkout)")
    return missing


def default_jobs() -> int:
    jobs = os.environ.get("MAX_JOBS")
    return max(1, int(jobs)) if jobs else max(1, os.cpu_count() or 1)


def _ninja_path(path: Path) -> str:
    return str(path).replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


def _write_build_file(build_dir: Path, output: Path, archs: Sequence[int], nvcc: str) -> None:
    # What the binding reports about its build, as a header rather than -D flags (no quoting).
    build_info = (
        "// Generated by fused_losses/backends/cuda/build.py.\n"
        f'#define FUSED_LOSSES_SOURCE_HASH "{source_hash()}"\n'
        f'#define FUSED_LOSSES_CUDA_ARCHS "{";".join(str(a) for a in archs)}"\n'
    )
    build_info_path = build_dir / "build_info.h"
    if not build_info_path.is_file() or build_info_path.read_text() != build_info:
        build_info_path.write_text(build_info)
    includes = [str(CSRC), str(build_dir), pybind11_include(), sysconfig.get_paths()["include"]]
    host_flags = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden"]
    host_flags += [shlex.quote(f"-I{include}") for include in includes]
    cuda_flags = host_flags + ["-lineinfo"] + gencode_flags(archs)
    lines = [
        "ninja_required_version = 1.3",
        f"nvcc = {nvcc}",
        f"cuda_flags = {' '.join(cuda_flags)}",
        f"host_flags = {' '.join(host_flags)}",
        "rule cuda_compile",
        "  command = $nvcc $cuda_flags -MD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = nvcc $in",
        "rule host_compile",
        "  command = $nvcc $host_flags -MD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = nvcc (host) $in",
        "rule link",
        "  command = $nvcc -shared -cudart=static $in -o $out",
        "  description = link $out",
    ]
    objects = []
    for name in SOURCES:
        obj = build_dir / (name + ".o")
        rule = "host_compile" if name.endswith(".cpp") else "cuda_compile"
        lines.append(f"build {_ninja_path(obj)}: {rule} {_ninja_path(CSRC / name)}")
        objects.append(_ninja_path(obj))
    lines.append(f"build {_ninja_path(output)}: link {' '.join(objects)}")
    lines.append(f"default {_ninja_path(output)}")
    (build_dir / "build.ninja").write_text("\n".join(lines) + "\n")


def build(output: Path = IN_PLACE_OUTPUT, archs: Optional[Sequence[int]] = None, jobs: Optional[int] = None,
          build_dir: Optional[Path] = None, verbose: bool = True) -> Path:
    """Compile and link the extension to ``output``; raise BuildError with the compiler's output on
    failure. Rebuilds only what changed since the last build in the same ``build_dir``."""
    missing = missing_tools()
    if missing:
        raise BuildError("cannot build the CUDA extension: missing " + "; ".join(missing))
    archs = parse_archs() if archs is None else list(archs)
    output = Path(output).resolve()
    build_dir = Path(build_dir or BUILD_DIR).resolve()
    build_dir.mkdir(parents=True, exist_ok=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    _write_build_file(build_dir, output, archs, find_nvcc())
    command = [find_ninja(), "-C", str(build_dir), "-j", str(jobs or default_jobs())]
    result = subprocess.run(command, stdout=None if verbose else subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, check=False)
    if result.returncode != 0:
        log = "" if verbose else "\n" + result.stdout[-8000:]
        raise BuildError(f"building the CUDA extension failed (ninja exit status {result.returncode}){log}")
    return output


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", help=f"compute capabilities, e.g. '80;90' (default: $FUSED_LOSSES_CUDA_ARCHS "
                                        f"or {DEFAULT_ARCHS!r})")
    parser.add_argument("--jobs", type=int, help="parallel compile jobs (default: $MAX_JOBS or the CPU count)")
    parser.add_argument("--output", type=Path, default=IN_PLACE_OUTPUT, help="the extension file to write")
    args = parser.parse_args(argv)
    try:
        path = build(args.output, parse_archs(args.archs), args.jobs)
    except BuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"built {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
