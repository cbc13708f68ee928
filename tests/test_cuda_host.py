"""The cuda backend without a GPU: the host/device shared code compiled and run on the CPU, the
build script, the compiled extension's CPU-side behaviour, and the backend's Python checks.

With FUSED_LOSSES_BUILD_CUDA=1 (CI, after `python -m fused_losses.backends.cuda.build`) the
extension must be built and fresh; otherwise the tests that need it skip.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import fused_losses
import fused_losses.backends as backends
from fused_losses.backends.base import LABEL_MASK, BackendUnavailable, LabelMask
from fused_losses.backends.cuda import (MIN_SHARED_MEMORY_PER_BLOCK, _extension, build, compile_check, make_kernels,
                                        unavailable_reason)
from fused_losses.backends.cuda import kernels as cuda_kernels

HOST_TEST = build.CSRC / "host_tests" / "similarity_math_test.cpp"
REQUIRE_EXTENSION = os.environ.get("FUSED_LOSSES_BUILD_CUDA") == "1"


def _compile_and_run(compiler_command, binary: Path) -> None:
    compiled = subprocess.run(compiler_command, capture_output=True, text=True)
    assert compiled.returncode == 0, f"compile error:\n{compiled.stdout}{compiled.stderr}"
    ran = subprocess.run([str(binary)], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert " 0 failures" in ran.stdout, ran.stdout


def test_shared_math_with_host_compiler(tmp_path):
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    binary = tmp_path / "similarity_math_test"
    _compile_and_run([compiler, "-std=c++17", "-O1", "-Wall", "-Wextra", f"-I{build.CSRC}", str(HOST_TEST),
                      "-o", str(binary)], binary)


def test_shared_math_as_cuda_host_code(tmp_path):
    """The same checks with the header seen as CUDA (__host__ __device__ functions) by nvcc."""
    nvcc = build.find_nvcc()
    if nvcc is None:
        pytest.skip("no nvcc")
    binary = tmp_path / "similarity_math_test_nvcc"
    _compile_and_run([nvcc, "-std=c++17", "-x", "cu", "-arch=sm_80", f"-I{build.CSRC}", str(HOST_TEST),
                      "-o", str(binary)], binary)


# Kernel launches `name<template args><<<grid, block, smem, stream>>>(` as emulation calls.
KERNEL_LAUNCH = re.compile(r"(\w+(?:<[^;{}]*?>)?)\s*<<<(.*?)>>>\s*\(", re.S)
EMULATION = build.CSRC / "host_tests" / "emulation"


def _host_compiler_with_cxx20(tmp_path):
    """g++ / c++ if it has what the emulation needs (C++20, _Float16, x86-64 for the fibers), else None."""
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        return None
    probe = tmp_path / "probe.cpp"
    probe.write_text("#if !defined(__x86_64__)\n#error fibers\n#endif\n"
                     "#include <span>\nint main() { _Float16 h = 1; return int(h) - 1; }\n")
    result = subprocess.run([compiler, "-std=c++20", str(probe), "-o", str(tmp_path / "probe")], capture_output=True)
    return compiler if result.returncode == 0 else None


def test_kernels_on_cpu_emulation(tmp_path):
    """forward.cu and weights.cu themselves, compiled for the CPU emulation of CUDA in
    csrc/host_tests/emulation (fibers per thread, the PTX primitives with per-lane semantics) and
    run through the public entry points against a direct double computation, with the weights'
    S checked bit for bit against the forward's (csrc/host_tests/kernels_emulated_test.cpp)."""
    compiler = _host_compiler_with_cxx20(tmp_path)
    if compiler is None:
        pytest.skip("no host compiler with C++20 and _Float16")
    sources = [build.CSRC / "host_tests" / "kernels_emulated_test.cpp", EMULATION / "cuda_emulation.cpp"]
    for name in ("forward.cu", "weights.cu"):
        text, launches = KERNEL_LAUNCH.subn(
            lambda m: f"::emulation::Launcher({m.group(2)}).run({m.group(1)}, ", (build.CSRC / name).read_text())
        assert launches >= 2, f"no kernel launches found in {name}"
        sources.append(tmp_path / f"{name}.cpp")
        sources[-1].write_text(f'#line 1 "{build.CSRC / name}"\n' + text)
    flags = ["-std=c++20", "-O1", "-Wno-unknown-pragmas", "-DFUSED_LOSSES_HOST_EMULATION", f"-I{EMULATION}",
             f"-I{build.CSRC}"]
    objects = [tmp_path / f"{source.name}.o" for source in sources]
    compiles = [subprocess.Popen([compiler, *flags, "-c", str(source), "-o", str(obj)], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True) for source, obj in zip(sources, objects)]
    for compiled in compiles:
        output = compiled.communicate()[0]
        assert compiled.returncode == 0, f"compile error:\n{output}"
    binary = tmp_path / "kernels_emulated_test"
    _compile_and_run([compiler, *map(str, objects), "-o", str(binary)], binary)


# -- build script ------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, archs", [("80;90", [80, 90]), ("9.0, 8.0", [80, 90]), ("sm_86", [86]),
                                         ("90 90", [90]), ("compute_80;", [80])])
def test_parse_archs(spec, archs):
    assert build.parse_archs(spec) == archs


@pytest.mark.parametrize("spec", ["75", "80;70", "hopper", ";"])
def test_parse_archs_rejects(spec):
    with pytest.raises(build.BuildError):
        build.parse_archs(spec)


def test_archs_from_environment(monkeypatch):
    monkeypatch.delenv("FUSED_LOSSES_CUDA_ARCHS", raising=False)
    assert build.parse_archs() == [80, 90]
    monkeypatch.setenv("FUSED_LOSSES_CUDA_ARCHS", "90")
    assert build.parse_archs() == [90]


def test_gencode_flags_embed_ptx_of_newest_arch():
    assert build.gencode_flags([80, 90]) == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=[sm_90,compute_90]",
    ]


@pytest.mark.parametrize("archs, capability, covered", [
    ([80, 90], (8, 0), True), ([80, 90], (8, 6), True), ([80, 90], (9, 0), True), ([80, 90], (10, 0), True),
    ([90], (8, 0), False), ([86], (8, 0), False), ([80], (9, 0), True),
])
def test_covers_capability(archs, capability, covered):
    assert build.covers_capability(archs, capability) == covered


def test_jobs_from_environment(monkeypatch):
    monkeypatch.setenv("MAX_JOBS", "3")
    assert build.default_jobs() == 3
    monkeypatch.delenv("MAX_JOBS")
    assert build.default_jobs() >= 1


def test_missing_tools_names_nvcc(monkeypatch):
    monkeypatch.setattr(build, "find_nvcc", lambda: None)
    assert any("nvcc" in tool for tool in build.missing_tools())


def test_setup_py_runs_without_the_extension():
    setup_py = build.REPO_ROOT / "setup.py"
    result = subprocess.run([sys.executable, str(setup_py), "--version"], cwd=build.REPO_ROOT, capture_output=True,
                            text=True, env={**os.environ, "FUSED_LOSSES_BUILD_CUDA": "0"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(fused_losses.__version__)  # the version pyproject.toml reads


# -- the compiled extension, on the CPU --------------------------------------------------------


@pytest.fixture(scope="module")
def ext():
    if not build.IN_PLACE_OUTPUT.is_file():
        if REQUIRE_EXTENSION:
            pytest.fail(f"FUSED_LOSSES_BUILD_CUDA=1 but {build.IN_PLACE_OUTPUT} is not built")
        pytest.skip("the CUDA extension is not built")
    module = _extension._import_file(build.IN_PLACE_OUTPUT)
    if module.source_hash != build.source_hash():
        stale = f"{build.IN_PLACE_OUTPUT} is stale: rebuild it with {build.BUILD_COMMAND}"
        pytest.fail(stale) if REQUIRE_EXTENSION else pytest.skip(stale)
    return module


def _problem(ext, n=1000, m=70000, d=64, **overrides):
    fields = dict(dtype=ext.DType.bfloat16, q=0, q_row_stride=d, k=0, k_row_stride=d, n=n, m=m, d=d, inv_norm_q=0,
                  inv_norm_k=0, scale=0, has_mask=True, diag_offset=0)
    fields.update(overrides)
    return ext.SimilarityProblem(**fields)


def _launch(ext, limit=256 << 20):
    return ext.Launch(device=0, stream=0, num_sms=132, fp32_single_pass_tf32=False, workspace_limit=limit)


def test_extension_reports_its_build(ext):
    assert build.parse_archs(ext.cuda_archs)


def test_workspace_sizes_are_bounded(ext):
    n, m, d = 65536, 65536, 512
    problem, launch = _problem(ext, n, m, d), _launch(ext, 256 << 20)
    forward = ext.lse_forward_workspace_bytes(problem, True, True, launch)
    splits = 132 * ext.tile["max_ctas_per_sm"]
    assert forward <= (256 << 20) + splits * n * 8 + 2 * m * 8 + 4096  # partials under the cap, O(N + M) rest
    assert ext.lse_forward_workspace_bytes(problem, True, False, launch) < forward
    # the sigmoid weights keep one float per CTA of the chunk
    sums = ext.softplus_weights_workspace_bytes(problem=problem, row_start=0, row_stop=4096, launch=launch)
    assert 0 < sums <= 4 * 32 * 512 + 256


def test_extension_reports_its_tile(ext):
    tile = ext.tile
    assert (tile["rows"], tile["cols"], tile["threads"], tile["stages"]) == (128, 128, 256, 3)
    assert tile["dynamic_shared_bytes"] == tile["stages"] * 256 * tile["stage_row_bytes"] + 128
    assert tile["max_row_stride_bytes"] == 1 << 25


def test_problem_rejects_empty_sizes(ext):
    with pytest.raises(ValueError, match="n > 0"):
        _problem(ext, n=0)


@pytest.mark.parametrize("stride", [63, (1 << 24) + 1])
def test_problem_rejects_row_strides(ext, stride):
    with pytest.raises(ValueError, match="row strides"):
        _problem(ext, d=64, k_row_stride=stride)


@pytest.mark.parametrize("rows, stride, match", [((0, 1001), 70000, "row_stop"), ((5, 5), 70000, "row_start"),
                                                 ((0, 10), 69999, "out_row_stride")])
def test_weights_chunk_is_checked(ext, rows, stride, match):
    problem, launch = _problem(ext), _launch(ext)
    with pytest.raises(ValueError, match=match):
        ext.lse_weights(problem=problem, lse_row=256, lse_col=0, grad_row=256, grad_col=0, row_start=rows[0],
                        row_stop=rows[1], out=512, out_row_stride=stride, row_scale=256, col_scale=256, launch=launch)


def test_launch_without_gpu_raises_cleanly(ext):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    problem, launch = _problem(ext), _launch(ext)
    needed = ext.lse_forward_workspace_bytes(problem, True, False, launch)
    with pytest.raises(RuntimeError, match="fused_losses cuda backend: cudaGetDevice"):
        ext.lse_forward(problem=problem, lse_row=256, lse_col=0, workspace=512, workspace_bytes=needed,
                        launch=launch)


def test_launch_checks_workspace_size(ext):
    problem, launch = _problem(ext), _launch(ext)
    with pytest.raises(ValueError, match="workspace"):
        ext.softplus_forward(problem=problem, bias=256, sp_row=256, workspace=512, workspace_bytes=16, launch=launch)


def test_problem_needs_both_label_vectors(ext):
    with pytest.raises(ValueError, match=r"a label mask needs row_labels and col_labels \(got col_labels only\)"):
        _problem(ext, col_labels=256)


def test_softplus_refuses_a_label_mask(ext):
    """The label mask is the log-sum-exp's: the softplus entry points refuse it before any launch."""
    problem, launch = _problem(ext, row_labels=256, col_labels=512, exclude_same_label=True), _launch(ext)
    with pytest.raises(ValueError, match="softplus_forward: the label mask applies to the log-sum-exp only"):
        ext.softplus_forward(problem=problem, bias=256, sp_row=256, workspace=512, workspace_bytes=1 << 30,
                             launch=launch)
    with pytest.raises(ValueError, match="softplus_weights: the label mask applies to the log-sum-exp only"):
        ext.softplus_weights(problem=problem, bias=256, grad_row=256, row_start=0, row_stop=10, out=512,
                             out_row_stride=70000, row_scale=256, col_scale=256, weight_sum=256, workspace=512,
                             workspace_bytes=1 << 30, launch=launch)


def test_compile_check_sm90(ext):
    """What ptxas made of every kernel for sm_90, read from the build's objects (about 3 s): no
    spills, the tile kernels at their designed occupancy and stage shape (4 steps of 32 bytes of
    depth per stage: 24 ldmatrix.x4 and 64 MMAs per warp, three times the MMAs for split TF32)."""
    cuobjdump = compile_check.find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton)")
    if 90 not in build.parse_archs(ext.cuda_archs):
        pytest.skip(f"the extension is built for sm {ext.cuda_archs}, without sm_90")
    stale = compile_check.stale_objects_reason()
    if stale:
        pytest.fail(stale) if REQUIRE_EXTENSION else pytest.skip(stale)
    reports = compile_check.kernel_reports(compile_check.build_objects(), 90, cuobjdump)
    tile = ext.tile
    for report in reports:
        print(compile_check.format_report(report, 90, tile["threads"], tile["dynamic_shared_bytes"]))
    assert not [r.label for r in reports if r.spills]
    tile_kernels = [r for r in reports if r.stage is not None]
    # forward: 4 configs x (lse, lse + columns, both with and without labels; softplus); weights: 4 x
    # (softmax with and without labels, sigmoid)
    assert len(tile_kernels) == 32
    assert sum("+labels" in r.label for r in tile_kernels) == 12
    for report in tile_kernels:
        shared = report.shared_bytes + tile["dynamic_shared_bytes"]
        assert shared <= MIN_SHARED_MEMORY_PER_BLOCK, report.label  # what unavailable_reason asks of a GPU
        ctas = compile_check.ctas_per_sm(90, report.registers, tile["threads"], shared)
        assert ctas >= 1 if "fp32" in report.label else ctas == 2, report.label
        split = "split-tf32" in report.label
        assert (report.stage.hmma, report.stage.ldsm) == (192 if split else 64, 24), report.label


# -- the backend's Python side -----------------------------------------------------------------


def test_unavailable_off_cuda():
    assert "CUDA tensors only" in unavailable_reason(torch.device("cpu"))
    assert backends.unavailable_reason("cuda", torch.device("cpu")) is not None


def test_unavailable_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    reason = unavailable_reason(torch.device("cuda"))
    assert "CUDA" in reason
    with pytest.raises(BackendUnavailable):
        backends.select_backend("cuda", torch.device("cuda"))


def test_unavailable_with_too_little_shared_memory(monkeypatch):
    """sm_86 / sm_89 GPUs run the sm_80 code but have 99 KiB of shared memory a block."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    properties = SimpleNamespace(shared_memory_per_block_optin=99 * 1024)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: properties)
    assert "99 KiB" in unavailable_reason(torch.device("cuda"))
    properties.shared_memory_per_block_optin = 227 * 1024
    assert "shared memory" not in (unavailable_reason(torch.device("cuda")) or "")


def test_label_mask_selects_the_cuda_backend(monkeypatch):
    """The backend declares the label mask: asked for by name, and by auto once triton lacks it."""
    monkeypatch.setattr(backends, "unavailable_reason", lambda name, device=None, dtype=None: None)
    monkeypatch.setattr(backends._module("triton"), "FEATURES", frozenset())
    assert backends.select_backend("cuda", torch.device("cuda"), {LABEL_MASK}) == "cuda"
    assert backends.select_backend("auto", torch.device("cuda"), {LABEL_MASK}) == "cuda"


def test_make_kernels_options():
    kernels = make_kernels()
    assert kernels.name == "cuda"
    assert make_kernels(fp32_precision="tf32", workspace_limit_bytes=1 << 20).fp32_precision == "tf32"
    with pytest.raises(TypeError):
        make_kernels(chunk_size=3)
    with pytest.raises(ValueError):
        make_kernels(fp32_precision="fp64")


def _args(dtype, device="cpu"):
    q, k = torch.randn(5, 8, dtype=dtype, device=device), torch.randn(6, 8, dtype=dtype, device=device)
    norms = torch.ones(5, device=device), torch.ones(6, device=device)
    return (q, k, *norms, torch.tensor(10.0, device=device))


def test_float64_points_to_torch_backend():
    with pytest.raises(TypeError, match="backend='torch'"):
        make_kernels().lse_forward(*_args(torch.float64), None, True, True)


def test_cpu_tensors_rejected():
    with pytest.raises(ValueError, match="CUDA device"):
        make_kernels().softplus_forward(*_args(torch.float32), torch.tensor(-10.0), None)


@pytest.mark.parametrize("labels, error, match", [
    ((torch.zeros(5), torch.zeros(4, dtype=torch.long)), TypeError,
     r"label_mask.row_labels must be an int32 or int64 tensor, got a torch.float32 tensor"),
    ((torch.zeros(5, dtype=torch.long), [0, 1, 2, 3]), TypeError, "label_mask.col_labels .* got list"),
    ((torch.zeros(5, dtype=torch.long), torch.zeros(3, dtype=torch.long)), ValueError,
     r"label_mask.col_labels must have shape \(4,\) on cpu, got shape \(3,\)"),
    ((torch.zeros(5, 1, dtype=torch.int32), torch.zeros(4, dtype=torch.int32)), ValueError,
     r"label_mask.row_labels must have shape \(5,\)"),
])
def test_bad_label_masks_are_rejected(labels, error, match):
    with pytest.raises(error, match=match):
        cuda_kernels._kernel_labels(LabelMask(*labels, True), 5, 4, torch.device("cpu"))


def test_labels_reach_the_kernels_as_contiguous_int64():
    row_labels = torch.tensor([3, -1, 2**31 - 1], dtype=torch.int32)
    col_labels = torch.arange(8, dtype=torch.int64)[::2]
    rows, cols = cuda_kernels._kernel_labels(LabelMask(row_labels, col_labels, False), 3, 4, torch.device("cpu"))
    assert rows.dtype == cols.dtype == torch.int64 and rows.is_contiguous() and cols.is_contiguous()
    assert rows.tolist() == [3, -1, 2**31 - 1] and cols.tolist() == [0, 2, 4, 6]


@pytest.fixture
def isolated_extension_state(monkeypatch, tmp_path):
    """_extension with no loaded module, no in-place build and an empty just-in-time cache."""
    monkeypatch.setattr(_extension, "_loaded", None)
    monkeypatch.setattr(_extension, "_build_failure", None)
    monkeypatch.setattr(build, "IN_PLACE_OUTPUT", tmp_path / "missing" / "_C.so")
    monkeypatch.setenv("FUSED_LOSSES_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FUSED_LOSSES_CUDA_JIT", raising=False)
    return tmp_path


def test_not_built_reason_gives_build_command(isolated_extension_state, monkeypatch):
    monkeypatch.setenv("FUSED_LOSSES_CUDA_JIT", "0")
    assert build.BUILD_COMMAND in _extension.unavailable_reason((9, 0))
    with pytest.raises(BackendUnavailable, match="not built"):
        _extension.load((9, 0))


def test_just_in_time_build_possible(isolated_extension_state, monkeypatch):
    monkeypatch.setattr(build, "missing_tools", lambda: [])
    assert _extension.unavailable_reason((9, 0)) is None
    monkeypatch.setattr(build, "missing_tools", lambda: ["nvcc (install the CUDA toolkit or set CUDA_HOME)"])
    assert "nvcc" in _extension.unavailable_reason((9, 0))


def test_just_in_time_build_is_cached(isolated_extension_state, monkeypatch, ext):
    """The just-in-time path with the compiler replaced by a copy of the in-place build."""
    source = Path(ext.__file__)
    builds = []

    def fake_build(output, archs, build_dir=None, verbose=True):
        builds.append(archs)
        shutil.copy(source, output)
        return output

    monkeypatch.setattr(build, "build", fake_build)
    monkeypatch.setattr(build, "missing_tools", lambda: [])
    module = _extension.load((9, 0))
    assert module.source_hash == build.source_hash() and builds == [[90]]
    assert _extension.jit_output([90]).is_file()
    monkeypatch.setattr(_extension, "_loaded", None)
    assert _extension.load((9, 0)) is not None and builds == [[90]]  # cached: not built again


def test_failed_just_in_time_build_is_reported(isolated_extension_state, monkeypatch):
    def failing_build(output, archs, build_dir=None, verbose=True):
        raise build.BuildError("forward.cu(1): error: expected a ';'")

    monkeypatch.setattr(build, "build", failing_build)
    monkeypatch.setattr(build, "missing_tools", lambda: [])
    with pytest.raises(BackendUnavailable, match="expected a ';'"):
        _extension.load((9, 0))
    assert "expected a ';'" in _extension.unavailable_reason((9, 0))  # and not retried


def test_stale_in_place_build_is_not_used(isolated_extension_state, monkeypatch, ext):
    monkeypatch.setattr(build, "IN_PLACE_OUTPUT", Path(ext.__file__))
    monkeypatch.setattr(build, "source_hash", lambda: "0123456789abcdef")
    monkeypatch.setenv("FUSED_LOSSES_CUDA_JIT", "0")
    assert "older sources" in _extension.unavailable_reason((9, 0))
