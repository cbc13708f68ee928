"""Compile every kernel for an H100 (sm_90) without a GPU and report shared memory, registers and
spills of the fixed configurations. A development check, never imported by the backend:

    python -m fused_losses.backends.triton.compile_check bf16:512 fp32:1000 ...

Must run without TRITON_INTERPRET (the interpreter replaces the kernels). Exit status 1 when a
kernel spills registers.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from typing import Any, Dict, Iterator, List, Tuple

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fused_losses.backends.triton import chunked_gradient, fused_gradient, launch, lse, softplus

H100 = GPUTarget("cuda", 90, 32)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
INPUT_POINTERS = ("q_ptr", "k_ptr", "a_ptr", "b_ptr")
# Integer arguments that are multiples of 16 at real sizes (triton specializes on it).
ALIGNED_INTS = ("stride_qn", "stride_kn", "dim", "n_rows", "n_cols", "out_split_stride",
                "weights_row_stride", "n_out_rows", "n_reduce", "stride_ap", "stride_br")


def compile_kernel(kernel, dtype_name: str, constexprs: Dict, unit_strides: Tuple[str, ...],
                   config: launch.KernelConfig):
    """The kernel compiled for sm_90 as launched on contiguous, 16-aligned inputs."""
    constexprs = dict(constexprs, **dict.fromkeys(unit_strides, 1))
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = f"*{dtype_name}" if name in INPUT_POINTERS else "*fp32"
        else:
            signature[name] = "i32"
    aligned = [i for i, name in enumerate(kernel.arg_names)
               if signature[name].startswith("*") or (name in ALIGNED_INTS and name not in constexprs)]
    source = ASTSource(
        fn=kernel, signature=signature,
        constexprs={(kernel.arg_names.index(name),): value for name, value in constexprs.items()},
        attrs={(i,): [["tt.divisibility", 16]] for i in aligned},
    )
    return triton.compile(source, target=H100, options=dict(num_warps=config.num_warps, num_stages=config.num_stages))


def kernels_for(dtype_name: str, dim: int) -> Iterator[Tuple[str, Any]]:
    """(name, compiled kernel) for every kernel a call with inputs of this dtype and D launches."""
    dtype, cuda = DTYPES[dtype_name], torch.device("cuda")
    precision = "tf32" if dtype == torch.float32 else "ieee"
    tile = launch.forward_config(dim, dtype, cuda)
    tiles = dict(HAS_MASK=True, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_D=tile.block_d,
                 INPUT_PRECISION=precision)
    unit = ("stride_qd", "stride_kd")
    yield "lse_forward", compile_kernel(
        lse.lse_forward_kernel, dtype_name, dict(tiles, WANT_ROWS=True, WANT_COLS=True), unit, tile)
    yield "softplus_forward", compile_kernel(softplus.softplus_forward_kernel, dtype_name, tiles, unit, tile)
    terms = [("softmax", dict(weights_fn=lse.softmax_weights, LOGIT_UNIT=lse.LOG2E.value, HAS_ROW_TERM=True,
                              HAS_COL_TERM=True, SUM_WEIGHTS=False, weight_sums_ptr=None)),
             ("sigmoid", dict(weights_fn=softplus.sigmoid_weights, LOGIT_UNIT=1.0, HAS_ROW_TERM=True,
                              HAS_COL_TERM=False, SUM_WEIGHTS=True, col_stat_ptr=None, col_grad_ptr=None))]
    if launch.fuses_gradient(dim, dtype):
        config = launch.gradient_config(dim, dtype, cuda)
        blocks = dict(HAS_MASK=True, ATOMIC_OUT=False, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                      BLOCK_D=config.block_d, BLOCK_OUT=config.block_out, INPUT_PRECISION=precision)
        for name, weights in terms:
            yield f"fused_gradient[{name}]", compile_kernel(
                fused_gradient.fused_gradient_kernel, dtype_name, dict(blocks, **weights), unit, config)
        return
    for name, weights in terms:
        yield f"weights[{name}]", compile_kernel(
            chunked_gradient.weights_kernel, dtype_name, dict(tiles, **weights), unit, tile)
    config = launch.matmul_config(dim, dtype, cuda)
    blocks = dict(BLOCK_P=config.block_m, BLOCK_R=config.block_n, BLOCK_OUT=config.block_out,
                  GROUP=chunked_gradient.MATMUL_GROUP, INPUT_PRECISION=precision)
    yield "matmul[U]", compile_kernel(chunked_gradient.scaled_matmul_kernel, dtype_name, dict(blocks, ACCUMULATE=False),
                                      ("stride_ar", "stride_bd"), config)
    yield "matmul[V]", compile_kernel(chunked_gradient.scaled_matmul_kernel, dtype_name, dict(blocks, ACCUMULATE=True),
                                      ("stride_ap", "stride_bd"), config)


def resource_usage(compiled) -> Dict[str, int]:
    """REG, STACK, SHARED, LOCAL... of a compiled kernel, read from its cubin with cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        listing = subprocess.run([tool, "-res-usage", cubin.name], capture_output=True, text=True, check=True).stdout
    usage_line = next(line for line in listing.splitlines() if "REG:" in line)
    return {key: int(value) for key, value in re.findall(r"(\w+):(\d+)", usage_line)}


def main(cases: List[str]) -> int:
    spilled = False
    for case in cases:
        dtype_name, dim = case.split(":")
        for name, compiled in kernels_for(dtype_name, int(dim)):
            usage = resource_usage(compiled)
            spilled |= usage["STACK"] > 0 or usage["LOCAL"] > 0
            print(f"{case} {name}: registers {usage['REG']}, spill stack {usage['STACK']} B, "
                  f"shared memory {compiled.metadata.shared} B", flush=True)
    return 1 if spilled else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
