"""CPU micro-benchmarks of the torch backend (pytest-benchmark), small enough for CI:

    python -m pytest benchmarks/test_cpu_micro.py --benchmark-enable --benchmark-max-time=0.2   # timings
    python -m pytest benchmarks/test_cpu_micro.py      # each step once, as a smoke test (pytest.ini)

Each loss's forward, backward and forward+backward at N = M = 256, D = 64 in float32, next to the
N x D x N matmul they are held to.
"""

import pytest
import torch

from fused_losses.benchmarking import LOSSES, MODES, Case, make_step

N, D = 256, 64


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("loss", LOSSES)
def test_torch_backend(benchmark, loss, mode):
    benchmark.group = f"{loss}, N = M = {N}, D = {D}"
    prepare, run = make_step(Case(loss, "torch", N, N, D, "float32", "cpu"), mode)
    if prepare is None:
        result = benchmark(run)
    else:  # each timed backward needs a fresh graph from an untimed forward
        result = benchmark.pedantic(run, setup=prepare, rounds=20, warmup_rounds=1)
    for tensor in result if isinstance(result, tuple) else (result,):
        assert torch.isfinite(tensor).all()


def test_matmul_floor(benchmark):
    benchmark.group = "matmul"
    a, b = torch.randn(N, D), torch.randn(N, D)
    product = torch.empty(N, N)
    benchmark(torch.mm, a, b.T, out=product)
