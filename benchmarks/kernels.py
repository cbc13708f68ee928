"""Each piece of a backend's CLIP forward+backward, timed against one torch.mm in the same dtype
taken in the same run: JSON lines and a short table. On a GPU (``bash benchmarks/gpu_session.sh
kernels``); on the CPU the same pieces run at tiny sizes in triton's interpreter, a dry run of this
script (tests/test_kernel_benchmark.py).

    python -m benchmarks.kernels                                    # GPU: N = M = 65536, D = 512 and 1024, bf16
    python -m benchmarks.kernels --sizes 32768x512 --backends triton cuda --out kernels.jsonl

Pieces are data: ``PIECES[backend]`` maps a piece name to (GEMM-equivalents, setup), where
``setup(problem)`` returns the call to time. Every backend gets the generic pieces (its kernels'
forward and backward, the whole loss); the triton entries add the forward per tile shape, the
weights kernel and the two products of the chunked backward, and the fused backward. A backend
adds its own pieces by extending its entry (``register_pieces``); one that cannot run here is
skipped with the reason. In each record, ``ratio`` is the piece's median time over the matmul's
and ``efficiency`` = GEMM-equivalents / ratio (1: the piece runs at matmul speed).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from fused_losses import backends
from fused_losses.benchmarking import DTYPES, Case, environment, make_step, time_ms

LOGIT_SCALE = 100.0


@dataclass
class Problem:
    """Backend-contract arguments of one CLIP forward+backward and what its backward needs."""

    q: torch.Tensor
    k: torch.Tensor
    inv_norm_q: torch.Tensor
    inv_norm_k: torch.Tensor
    scale: torch.Tensor
    grad_row: torch.Tensor
    grad_col: torch.Tensor
    dtype_name: str

    @property
    def device(self) -> torch.device:
        return self.q.device

    def inputs(self) -> Dict:
        return dict(q=self.q, k=self.k, inv_norm_q=self.inv_norm_q, inv_norm_k=self.inv_norm_k,
                    scale=self.scale, diag_offset=None)


def make_problem(n: int, m: int, d: int, dtype_name: str, device: torch.device, seed: int = 0) -> Problem:
    """CLIP-like inputs: k[i] correlated with q[i], so that rows have a clear positive."""
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(n, d, device=device, generator=gen)
    k = torch.randn(m, d, device=device, generator=gen)
    k[: min(n, m)] += 2.0 * q[: min(n, m)]
    q, k = q.to(DTYPES[dtype_name]), k.to(DTYPES[dtype_name])

    def inv_norms(x):
        return 1.0 / x.float().norm(dim=1).clamp_min(1e-12)

    return Problem(q, k, inv_norms(q), inv_norms(k), torch.tensor(LOGIT_SCALE, device=device),
                   torch.rand(n, device=device, generator=gen) / n, torch.rand(m, device=device, generator=gen) / m,
                   dtype_name)


Setup = Callable[[Problem, str], Callable[[], object]]


def _forward(problem: Problem, backend: str) -> Callable[[], object]:
    kernels = backends.get_kernels(backend, problem.device)
    return lambda: kernels.lse_forward(**problem.inputs(), want_rows=True, want_cols=True)


def _backward(problem: Problem, backend: str, **options) -> Callable[[], object]:
    kernels = backends.get_kernels(backend, problem.device, **options)
    lse_row, lse_col = kernels.lse_forward(**problem.inputs(), want_rows=True, want_cols=True)
    return lambda: kernels.lse_backward(**problem.inputs(), lse_row=lse_row, lse_col=lse_col,
                                        grad_row=problem.grad_row, grad_col=problem.grad_col)


def _forward_backward(problem: Problem, backend: str) -> Callable[[], object]:
    n, d = problem.q.shape
    case = Case("clip", backend, n, problem.k.shape[0], d, problem.dtype_name, str(problem.device))
    return make_step(case, "forward_backward")[1]


GENERIC_PIECES: Dict[str, Tuple[float, Setup]] = {
    "forward": (1, _forward),
    "backward": (3, _backward),
    "forward_backward": (4, _forward_backward),
}


def _triton_similarity(problem: Problem):
    from fused_losses.backends.triton.operands import Similarity

    return Similarity.checked(problem.q, problem.k, problem.inv_norm_q, problem.inv_norm_k, problem.scale, None)


def _triton_forward_with(tiles: str) -> Setup:
    def setup(problem: Problem, backend: str) -> Callable[[], object]:
        from fused_losses.backends.triton import launch, lse

        sim = _triton_similarity(problem)
        config = launch.forward_config(sim.dim, sim.q.dtype, sim.device, tiles)
        return lambda: lse.lse_forward_with(sim, True, True, config)
    return setup


class _Chunks:
    """The chunked backward's chunks for a problem, as its driver makes them (row scales,
    column scales, chunk rows, workspace), for timing its pieces one by one."""

    def __init__(self, problem: Problem, row_multiple: int):
        from fused_losses.backends import chunked_backward as driver

        self.driver, self.problem = driver, problem
        n, m = problem.q.shape[0], problem.k.shape[0]
        bound = driver.weight_bound(problem.grad_row, problem.grad_col)
        self.row_scale, self.col_scale, _ = driver.weight_scales(
            problem.q, problem.k, problem.inv_norm_q, problem.inv_norm_k, bound)
        self.rows = driver.chunk_rows(n, m, problem.q.element_size(), row_multiple)
        self.workspace = torch.randn((self.rows, driver.padded_columns(m)), device=problem.device).to(problem.q.dtype)
        self.path = driver.gemm_path(problem.device.type, problem.q.dtype)
        self.bounds = [(start, min(start + self.rows, n)) for start in range(0, n, self.rows)]

    def chunk(self, start: int, stop: int) -> torch.Tensor:
        return self.workspace[: stop - start, : self.problem.k.shape[0]]


def _triton_weights_with(tiles: str) -> Setup:
    def setup(problem: Problem, backend: str) -> Callable[[], object]:
        from fused_losses.backends.triton import chunked_gradient, launch, lse

        sim = _triton_similarity(problem)
        config = launch.forward_config(sim.dim, sim.q.dtype, sim.device, tiles)
        lse_row, lse_col = lse.lse_forward_with(sim, True, True, config)
        terms, weights = lse.softmax_terms(lse_row, lse_col, problem.grad_row, problem.grad_col)
        write = chunked_gradient.weights_writer(sim, terms, weights, False, config)
        chunks = _Chunks(problem, config.block_m)

        def run():
            for start, stop in chunks.bounds:
                write(chunks.chunk(start, stop), start, stop, chunks.row_scale[start:stop], chunks.col_scale)
        return run
    return setup


def _gemm(which: str) -> Setup:
    """One of the chunked backward's two products over all chunks: U = W~ K or V += W~^T Q."""
    def setup(problem: Problem, backend: str) -> Callable[[], object]:
        from fused_losses.backends.triton import launch

        chunks = _Chunks(problem, launch.forward_config(problem.q.shape[1], problem.q.dtype, problem.device).block_m)
        out = torch.empty((problem.q.shape[0] if which == "u" else problem.k.shape[0], problem.q.shape[1]),
                          dtype=torch.float32, device=problem.device)

        def run():
            for start, stop in chunks.bounds:
                if which == "u":
                    chunks.driver.fp32_product(chunks.chunk(start, stop), problem.k, out[start:stop], False, chunks.path)
                else:
                    chunks.driver.fp32_product(chunks.chunk(start, stop).T, problem.q[start:stop], out, start > 0,
                                               chunks.path)
        return run
    return setup


def _triton_pieces() -> Dict[str, Tuple[float, Setup]]:
    from fused_losses.backends.triton import launch

    tensor_core_tiles = [name for name in launch.TILE_SHAPES if not name.endswith("-fma")]
    pieces: Dict[str, Tuple[float, Setup]] = {}
    for tiles in tensor_core_tiles:
        pieces[f"forward[{tiles}]"] = (1, _triton_forward_with(tiles))
        pieces[f"weights[{tiles}]"] = (1, _triton_weights_with(tiles))
    pieces["gemm_u"] = (1, _gemm("u"))
    pieces["gemm_v"] = (1, _gemm("v"))
    pieces["fused_backward"] = (4, lambda problem, backend: _backward(problem, backend, gradient="fused"))
    return pieces


# Backend -> factory of its extra pieces (imported lazily: a backend's module may be missing).
PIECES: Dict[str, Callable[[], Dict[str, Tuple[float, Setup]]]] = {"triton": _triton_pieces}


def register_pieces(backend: str, factory: Callable[[], Dict[str, Tuple[float, Setup]]]) -> None:
    """Add ``backend``'s own pieces (name -> (GEMM-equivalents, setup)), e.g. its weights writer."""
    PIECES[backend] = factory


def pieces_of(backend: str) -> Dict[str, Tuple[float, Setup]]:
    return {**GENERIC_PIECES, **(PIECES[backend]() if backend in PIECES else {})}


def matmul_setup(problem: Problem) -> Callable[[], object]:
    """One N x D x M product in the inputs' dtype into a preallocated output (the floor)."""
    out = torch.empty((problem.q.shape[0], problem.k.shape[0]), dtype=problem.q.dtype, device=problem.device)
    return lambda: torch.mm(problem.q, problem.k.T, out=out)


def run(sizes: Sequence[Tuple[int, int]], dtype_name: str, backend_names: Sequence[str], device: torch.device,
        repeats: int, pieces: Optional[Sequence[str]] = None) -> Iterator[dict]:
    """Records of every (size, backend, piece) as each is measured, each with the matmul time of its size."""
    env = environment()
    for n, d in sizes:
        problem = make_problem(n, n, d, dtype_name, device)
        matmul = time_ms(matmul_setup(problem), device, repeats=repeats)["median_ms"]
        base = dict(n=n, m=n, d=d, dtype=dtype_name, matmul_ms=matmul, **env)
        yield dict(base, backend="torch", piece="matmul", gemm_equivalents=1, median_ms=matmul, ratio=1.0,
                   efficiency=1.0)
        for backend in backend_names:
            reason = backends.unavailable_reason(backend, device)
            if reason is not None:
                yield dict(base, backend=backend, piece=None, note=f"skipped: {reason}")
                continue
            for name, (gemms, setup) in pieces_of(backend).items():
                if pieces and name not in pieces:
                    continue
                try:
                    timing = time_ms(setup(problem, backend), device, repeats=repeats)
                except Exception as error:  # recorded; the other pieces still run
                    yield dict(base, backend=backend, piece=name, note=f"failed: {type(error).__name__}: {error}")
                    continue
                ratio = timing["median_ms"] / matmul
                yield dict(base, backend=backend, piece=name, gemm_equivalents=gemms, **timing, ratio=ratio,
                           efficiency=gemms / ratio)
            if device.type == "cuda":
                torch.cuda.empty_cache()


def table(records: Sequence[dict]) -> str:
    """Markdown: one row per timed piece."""
    lines = ["| backend | piece | N = M | D | ms | x matmul | GEMM-eq. | efficiency |", "|---|---|---|---|---|---|---|---|"]
    for r in records:
        if "note" in r:
            lines.append(f"| {r['backend']} | {r['piece'] or ''} {r['note'][:100]} | {r['n']} | {r['d']} | | | | |")
            continue
        lines.append(f"| {r['backend']} | {r['piece']} | {r['n']} | {r['d']} | {r['median_ms']:.3f} | "
                     f"{r['ratio']:.2f} | {r['gemm_equivalents']} | {r['efficiency']:.2f} |")
    return "\n".join(lines)


def _size(text: str) -> Tuple[int, int]:
    n, d = text.split("x")
    return int(n), int(d)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", type=_size, default=None,
                        help="NxD with N = M (default: 65536x512 65536x1024 on a GPU, 48x40 on the CPU)")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                        help="default: bfloat16 on a GPU, float16 on the CPU (the interpreter's bf16 dot is wrong)")
    parser.add_argument("--backends", nargs="+", default=["triton", "cuda"])
    parser.add_argument("--pieces", nargs="+", default=None, help="only these pieces (names as in the table)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per piece (default: 10 GPU, 1 CPU)")
    parser.add_argument("--out", default=None, help="append the records (JSON lines) to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    sizes = args.sizes or ([(65536, 512), (65536, 1024)] if gpu else [(48, 40)])
    dtype_name = args.dtype or ("bfloat16" if gpu else "float16")
    records: List[dict] = []
    for record in run(sizes, dtype_name, args.backends, device, args.repeats or (10 if gpu else 1), args.pieces):
        records.append(record)
        print(json.dumps(record), flush=True)
        if args.out:  # record by record: a run stopped at its time limit keeps what it measured
            with open(args.out, "a") as out:
                out.write(json.dumps(record) + "\n")
    print(table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
