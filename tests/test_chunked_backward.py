"""The backend-agnostic chunked backward driver (fused_losses/backends/chunked_backward.py) with a
dense float64 weights writer: U, V and the weight sum against the dense contract, chunking,
weight scaling (zero vectors, tiny and zero gradients, large norms in float16), determinism."""

import pytest
import torch

from fused_losses.backends import chunked_backward as driver

# Worst |error| relative to max |expected|: W~ is rounded once to the weight dtype.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def inverse_norms(x, eps=1e-12):
    return 1.0 / x.float().norm(dim=1).clamp_min(eps)


def dense_weights(q, k, r, c, scale, grad_row, grad_col, sigmoid_bias=None):
    """(W, u, v) in float64: softmax weights of both directions, or grad_row * sigmoid(S + bias)."""
    u, v = r.double()[:, None] * q.double(), c.double()[:, None] * k.double()
    s = scale.double() * (u @ v.T)
    if sigmoid_bias is not None:
        return grad_row.double()[:, None] * torch.sigmoid(s + sigmoid_bias), u, v
    w = grad_row.double()[:, None] * torch.softmax(s, dim=1)
    if grad_col is not None:
        w = w + grad_col.double()[None, :] * torch.softmax(s, dim=0)
    return w, u, v


class DenseWriter:
    """Weights writer of the contract from a dense W; records the chunks it was asked for."""

    def __init__(self, w, sums=False):
        self.w, self.sums, self.chunks = w, sums, []

    def __call__(self, out, row_start, row_stop, row_scale, col_scale):
        assert out.shape == (row_stop - row_start, self.w.shape[1]) and out.stride(1) == 1
        assert out.stride(0) % driver.COLUMN_ALIGN == 0
        self.chunks.append((row_start, row_stop))
        w = self.w[row_start:row_stop].float()
        out.copy_((row_scale[:, None] * col_scale[None, :]) * w)
        return w.sum() if self.sums else None


def make_problem(gen, n, m, d, dtype, norm=1.0, scale=10.0):
    q = (torch.randn(n, d, generator=gen) * norm).to(dtype)
    k = (torch.randn(m, d, generator=gen) * norm).to(dtype)
    return q, k, torch.tensor(scale)


def run(q, k, scale, grad_row, grad_col=None, r=None, c=None, sums=False, **options):
    """(U, V, weight sum) from the driver and (U, V, sum) of the dense contract, float64."""
    r = inverse_norms(q) if r is None else r
    c = inverse_norms(k) if c is None else c
    w, u, v = dense_weights(q, k, r, c, scale, grad_row, grad_col, sigmoid_bias=-1.0 if sums else None)
    writer = DenseWriter(w, sums)
    got = driver.chunked_backward(q, k, r, c, scale, driver.weight_bound(grad_row, grad_col), writer,
                                  sum_weights=sums, **options)
    want = (scale.double() * w @ v, scale.double() * w.T @ u, w.sum())
    return got, want, writer


def assert_close(got, want, tol):
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.isfinite(got).all()
    error = (got.double() - want).abs().max().item()
    assert error <= tol * max(want.abs().max().item(), 1e-30), error


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch):
    """U, V and the workspace start as NaN: an element the driver or the writer skips shows."""
    monkeypatch.setattr(driver, "uninitialized",
                        lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device))


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 16 rows of float32 weights (32 of 16-bit ones) for M <= 64 (the floor on chunk
    rows is for GPU sizes)."""
    monkeypatch.setattr(driver, "MIN_CHUNK_ROWS", 0)
    monkeypatch.setattr(driver, "WORKSPACE_BYTES", 16 * 64 * 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_dense_over_several_chunks(dtype, small_chunks, gen):
    n, m, d = 45, 37, 20
    q, k, scale = make_problem(gen, n, m, d, dtype)
    grad_row, grad_col = torch.randn(n, generator=gen), torch.randn(m, generator=gen)
    (u, v, total), want, writer = run(q, k, scale, grad_row, grad_col, row_multiple=8)
    rows = 16 * 4 // q.element_size()
    assert writer.chunks == [(start, min(start + rows, n)) for start in range(0, n, rows)]
    assert total is None
    assert_close(u, want[0], TOL[dtype])
    assert_close(v, want[1], TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_sum(dtype, small_chunks, gen):
    n, m, d = 33, 20, 12
    q, k, scale = make_problem(gen, n, m, d, dtype)
    grad_row = torch.randn(n, generator=gen)
    (u, v, total), want, _ = run(q, k, scale, grad_row, sums=True)
    assert_close(u, want[0], TOL[dtype])
    assert_close(v, want[1], TOL[dtype])
    assert total.shape == () and abs(total.item() - want[2].item()) <= 1e-5 * want[2].abs().item()


def test_writer_must_return_the_sum_when_asked(gen):
    q, k, scale = make_problem(gen, 4, 5, 3, torch.float32)
    grad_row = torch.randn(4, generator=gen)
    w, _, _ = dense_weights(q, k, inverse_norms(q), inverse_norms(k), scale, grad_row, None)
    with pytest.raises(ValueError, match="sum"):
        driver.chunked_backward(q, k, inverse_norms(q), inverse_norms(k), scale, driver.weight_bound(grad_row),
                                DenseWriter(w, sums=False), sum_weights=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_zero_vectors_in_16_bit(dtype, small_chunks, gen):
    # A zero vector's inverse norm is 1/eps = 1e12: folded into W~ as is, its row would overflow
    # float16 or push every other weight to zero.
    n, m, d = 40, 30, 16
    q, k, scale = make_problem(gen, n, m, d, dtype)
    q[3] = 0
    k[[0, 17]] = 0
    grad_row, grad_col = torch.randn(n, generator=gen), torch.randn(m, generator=gen)
    (u, v, _), want, _ = run(q, k, scale, grad_row, grad_col)
    assert_close(u, want[0], TOL[dtype])
    assert_close(v, want[1], TOL[dtype])
    assert u[3].abs().sum() > 0 and v[17].abs().sum() > 0  # a zero vector still gets a gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_dimensional_features(dtype, gen):
    """D = 0: S is 0 everywhere, U and V are empty (seen crashing on an H200: aminmax over D)."""
    n, m = 6, 4
    q, k, scale = make_problem(gen, n, m, 0, dtype)
    grad_row, grad_col = torch.randn(n, generator=gen), torch.randn(m, generator=gen)
    (u, v, _), _, writer = run(q, k, scale, grad_row, grad_col)
    assert u.shape == (n, 0) and v.shape == (m, 0) and u.dtype == v.dtype == torch.float32
    assert writer.chunks == [(0, n)]


@pytest.mark.parametrize("norm", [1e-3, 3e2])
def test_float16_weights_follow_the_inverse_norms(norm, gen):
    # W~ = factor r_i c_j W_ij: with norms far from 1, r_i c_j moves the weights by norm^-2.
    n, m, d = 24, 50, 16
    q, k, scale = make_problem(gen, n, m, d, torch.float16, norm=norm)
    grad_row, grad_col = torch.randn(n, generator=gen), torch.randn(m, generator=gen)
    (u, v, _), want, _ = run(q, k, scale, grad_row, grad_col)
    assert_close(u, want[0], TOL[torch.float16])
    assert_close(v, want[1], TOL[torch.float16])


def test_tiny_gradients_keep_float16_weights_normal(gen):
    n, m, d = 20, 40, 16
    q, k, scale = make_problem(gen, n, m, d, torch.float16)
    grad_row, grad_col = torch.randn(n, generator=gen) * 1e-9, torch.randn(m, generator=gen) * 1e-9
    (u, v, _), want, _ = run(q, k, scale, grad_row, grad_col)
    assert_close(u, want[0], TOL[torch.float16])
    assert_close(v, want[1], TOL[torch.float16])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_zero_gradients_give_exact_zeros(dtype, gen):
    q, k, scale = make_problem(gen, 10, 12, 8, dtype)
    q[1] = 0
    (u, v, total), _, _ = run(q, k, scale, torch.zeros(10), torch.zeros(12), sums=False)
    assert torch.equal(u, torch.zeros_like(u)) and torch.equal(v, torch.zeros_like(v))


def test_scales_are_finite_powers_of_two_and_bound_the_weights(gen):
    q, k, _ = make_problem(gen, 6, 7, 4, torch.float16)
    q[0] = 0
    r, c = inverse_norms(q), inverse_norms(k)
    for bound in (0.0, 1e-30, 1.0, 1e20):
        row_scale, col_scale, factor = driver.weight_scales(q, k, r, c, torch.tensor(bound))
        assert torch.isfinite(row_scale).all() and torch.isfinite(col_scale).all()
        assert torch.log2(factor) == torch.round(torch.log2(factor))
        assert torch.equal(col_scale, c)
        assert torch.equal(row_scale[1:], factor * r[1:]) and row_scale[0] == factor * r[1:].max()
        assert (row_scale.max() * col_scale.max() * bound).item() <= driver.WEIGHT_TARGET


def test_deterministic_bits(small_chunks, gen):
    q, k, scale = make_problem(gen, 37, 29, 24, torch.bfloat16)
    grad_row, grad_col = torch.randn(37, generator=gen), torch.randn(29, generator=gen)
    first, _, _ = run(q, k, scale, grad_row, grad_col, row_multiple=4)
    second, _, _ = run(q, k, scale, grad_row, grad_col, row_multiple=4)
    assert all(torch.equal(a, b) for a, b in zip(first[:2], second[:2]))


def test_non_contiguous_inputs(gen):
    q_base, scale = torch.randn(30, 42, generator=gen), torch.tensor(5.0)
    q, k = q_base[3:17, ::2], torch.randn(21, 40, generator=gen).T  # feature stride 2; transposed
    grad_row, grad_col = torch.randn(14, generator=gen), torch.randn(40, generator=gen)
    (u, v, _), want, _ = run(q, k, scale, grad_row, grad_col)
    assert_close(u, want[0], TOL[torch.float32])
    assert_close(v, want[1], TOL[torch.float32])


def test_chunk_rows_bound_the_traffic_of_v_and_the_workspace():
    # Floor: at least MIN_CHUNK_ROWS rows (V read and written once per chunk); budget beyond.
    assert driver.chunk_rows(10**6, 131072, 2, 128) == driver.MIN_CHUNK_ROWS
    rows = driver.chunk_rows(10**6, 1024, 2, 128)
    assert rows % 128 == 0 and rows * 1024 * 2 <= driver.WORKSPACE_BYTES and rows > driver.MIN_CHUNK_ROWS
    assert driver.chunk_rows(100, 1024, 2, 64) == 128  # no more than N needs, in whole row tiles


def test_gemm_path_on_cpu():
    assert driver.gemm_path("cpu", torch.float32) == "fp32"
    assert driver.gemm_path("cpu", torch.bfloat16) in ("addmm_out_dtype", "mm_out_dtype", "upcast")


def test_bad_dtypes_are_rejected(gen):
    q, k, scale = make_problem(gen, 3, 4, 2, torch.float64)
    with pytest.raises(TypeError, match="float16, bfloat16, float32"):
        driver.chunked_backward(q, k, inverse_norms(q), inverse_norms(k), scale, torch.tensor(1.0), None)
    with pytest.raises(ValueError, match="gradient"):
        driver.weight_bound(None)
