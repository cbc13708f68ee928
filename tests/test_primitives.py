"""The similarity primitives on the torch backend: values and gradients against dense float64."""

import pytest
import torch
from torch.autograd import forward_ad

import fused_losses as fl
from fused_losses import similarity_lse, similarity_softplus
from tests import dense

DTYPE_TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 1e-1}

# (N, M, D, diag_offset, chunk_size): N = 1, primes, N != M, D not a power of two, chunk 1 and > N.
SHAPES = [
    (1, 1, 3, None, None),
    (1, 7, 5, None, 1),
    (13, 13, 6, 0, 1),
    (11, 29, 37, None, 4),
    (17, 5, 3, -3, 100),
    (9, 23, 8, 4, 2),
    (31, 31, 19, 0, None),
]


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _inputs(n, m, d, dtype=torch.float64, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    q = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(m, d, generator=g, dtype=torch.float64).to(dtype)
    return q, k


@pytest.mark.parametrize("n,m,d,offset,chunk", SHAPES)
@pytest.mark.parametrize("normalize", [True, False])
def test_lse_matches_dense_float64(n, m, d, offset, chunk, normalize):
    q, k = (_leaf(t) for t in _inputs(n, m, d))
    scale = torch.tensor(2.7, dtype=torch.float64, requires_grad=True)
    lse_row, lse_col = similarity_lse(q, k, scale, rows=True, cols=True, normalize=normalize,
                                      diag_offset=offset, backend="torch", chunk_size=chunk)
    want_row, want_col = dense.lse(q, k, scale, normalize, offset)
    torch.testing.assert_close(lse_row, want_row, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse_col, want_col, rtol=1e-12, atol=1e-12)
    if torch.isinf(want_row).any() or torch.isinf(want_col).any():
        return
    grad_row, grad_col = torch.randn(n, dtype=torch.float64), torch.randn(m, dtype=torch.float64)
    got = torch.autograd.grad((lse_row * grad_row).sum() + (lse_col * grad_col).sum(), (q, k, scale))
    want_row, want_col = dense.lse(q, k, scale, normalize, offset)
    want = torch.autograd.grad((want_row * grad_row).sum() + (want_col * grad_col).sum(), (q, k, scale))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n,m,d,offset,chunk", SHAPES)
def test_softplus_matches_dense_float64(n, m, d, offset, chunk):
    q, k = (_leaf(t) for t in _inputs(n, m, d))
    scale = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-1.3, dtype=torch.float64, requires_grad=True)
    got = similarity_softplus(q, k, scale, bias, diag_offset=offset, backend="torch", chunk_size=chunk)
    want = dense.softplus_rows(q, k, scale, bias, True, offset)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    grad_row = torch.randn(n, dtype=torch.float64)
    got_grads = torch.autograd.grad((got * grad_row).sum(), (q, k, scale, bias))
    want_grads = torch.autograd.grad((want * grad_row).sum(), (q, k, scale, bias))
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rows,cols", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("offset", [None, 0, 2, -1])
@pytest.mark.parametrize("normalize", [True, False])
def test_lse_gradcheck(rows, cols, offset, normalize):
    q, k = (_leaf(t) for t in _inputs(6, 5, 4))
    scale = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)

    def f(q, k, scale):
        out = similarity_lse(q, k, scale, rows=rows, cols=cols, normalize=normalize,
                             diag_offset=offset, backend="torch", chunk_size=2)
        return tuple(t for t in out if t is not None)

    assert torch.autograd.gradcheck(f, (q, k, scale))


@pytest.mark.parametrize("offset", [None, 0, -2])
@pytest.mark.parametrize("normalize", [True, False])
def test_softplus_gradcheck(offset, normalize):
    q, k = (_leaf(t) for t in _inputs(5, 7, 3))
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-0.5, dtype=torch.float64, requires_grad=True)

    def f(q, k, scale, bias):
        return similarity_softplus(q, k, scale, bias, normalize=normalize, diag_offset=offset,
                                   backend="torch", chunk_size=3)

    assert torch.autograd.gradcheck(f, (q, k, scale, bias))


def test_shared_input_gets_both_gradients():
    """q and k the same tensor (NT-Xent, SupCon): autograd sums the two contributions."""
    z = _leaf(_inputs(9, 1, 4)[0])
    lse_row, _ = similarity_lse(z, z, 3.0, diag_offset=0, backend="torch", chunk_size=4)
    (got,) = torch.autograd.grad(lse_row.sum(), z)
    want_row, _ = dense.lse(z, z, 3.0, True, 0)
    (want,) = torch.autograd.grad(want_row.sum(), z)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype):
    q, k = _inputs(37, 53, 24, dtype)
    q, k = _leaf(q), _leaf(k)
    lse_row, lse_col = similarity_lse(q, k, 20.0, rows=True, cols=True, backend="torch", chunk_size=8)
    assert lse_row.dtype == torch.float32
    want_row, want_col = dense.lse(q, k, 20.0)
    tol = DTYPE_TOLERANCE[dtype]
    torch.testing.assert_close(lse_row.double(), want_row, rtol=tol, atol=tol)
    torch.testing.assert_close(lse_col.double(), want_col, rtol=tol, atol=tol)
    gq, gk = torch.autograd.grad(lse_row.sum() + lse_col.sum(), (q, k))
    assert gq.dtype == dtype and gk.dtype == dtype
    q64, k64 = _leaf(q.double()), _leaf(k.double())
    wr, wc = dense.lse(q64, k64, 20.0)
    wq, wk = torch.autograd.grad(wr.sum() + wc.sum(), (q64, k64))
    torch.testing.assert_close(gq.double(), wq, rtol=tol, atol=tol * wq.abs().max().item())
    torch.testing.assert_close(gk.double(), wk, rtol=tol, atol=tol * wk.abs().max().item())


def test_large_scale_zero_and_identical_vectors():
    """Scale 1000, a zero row and duplicated rows stay finite and exact."""
    q, k = _inputs(8, 8, 5)
    q[3] = 0
    k[5] = k[2]
    q[6] = k[2]
    q, k = _leaf(q), _leaf(k)
    lse_row, lse_col = similarity_lse(q, k, 1000.0, rows=True, cols=True, backend="torch", chunk_size=3)
    want_row, want_col = dense.lse(q, k, 1000.0)
    torch.testing.assert_close(lse_row, want_row, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(lse_col, want_col, rtol=1e-12, atol=1e-9)
    got = torch.autograd.grad(lse_row.sum() + lse_col.sum(), (q, k))
    want_row, want_col = dense.lse(q, k, 1000.0)
    want = torch.autograd.grad(want_row.sum() + want_col.sum(), (q, k))
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)


def test_fully_masked_row_is_minus_inf_with_zero_gradient():
    q, k = (_leaf(t) for t in _inputs(1, 1, 4))
    lse_row, lse_col = similarity_lse(q, k, 1.0, rows=True, cols=True, diag_offset=0, backend="torch")
    assert lse_row.item() == float("-inf") and lse_col.item() == float("-inf")
    gq, gk = torch.autograd.grad(lse_row.sum() * 0 + lse_col.clamp(min=0).sum(), (q, k), allow_unused=True)
    assert torch.equal(gq, torch.zeros_like(q)) and torch.equal(gk, torch.zeros_like(k))


def test_inputs_not_modified_and_strided_inputs_work():
    base_q, base_k = _inputs(20, 14, 9)
    q, k = base_q[::2], base_k.T.contiguous().T  # a row-strided view and a column-major matrix
    before = (q.clone(), k.clone())
    got = similarity_lse(q, k, 5.0, rows=True, cols=True, backend="torch", chunk_size=3)
    want = dense.lse(q, k, 5.0)
    assert torch.equal(q, before[0]) and torch.equal(k, before[1])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("always_recompute_columns", [False, True])
@pytest.mark.parametrize("never_share_exponentials", [False, True])
@pytest.mark.parametrize("scale", [3.0, 300.0])
def test_torch_backend_exact_fallbacks(monkeypatch, always_recompute_columns, never_share_exponentials, scale):
    """The one-exponential fast paths and their exact fallbacks agree with dense float64."""
    from fused_losses.backends import torch_tiled
    if always_recompute_columns:
        monkeypatch.setattr(torch_tiled, "_TRUSTED_SUM", float("inf"))
    if never_share_exponentials:
        monkeypatch.setattr(torch_tiled, "_SHARED_EXP_SPREAD", float("-inf"))
    q, k = (_leaf(t) for t in _inputs(23, 17, 6))
    got = similarity_lse(q, k, scale, rows=True, cols=True, diag_offset=1, backend="torch", chunk_size=5)
    want = dense.lse(q, k, scale, True, 1)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-10)
    weights = torch.randn(23, dtype=torch.float64), torch.randn(17, dtype=torch.float64)
    got_grads = torch.autograd.grad(sum((g * w).sum() for g, w in zip(got, weights)), (q, k))
    want_grads = torch.autograd.grad(sum((g * w).sum() for g, w in zip(want, weights)), (q, k))
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)


# What the primitives' autograd formula cannot give is refused, never computed wrong.
SECOND_ORDER_LOSSES = {
    "clip_normalize": (lambda a, b: fl.clip_loss(a, b, 10.0, backend="torch"), "similarity_lse"),
    "clip_raw": (lambda a, b: fl.clip_loss(a, b, 10.0, normalize=False, backend="torch"),
                 "similarity_lse"),
    "siglip": (lambda a, b: fl.siglip_loss(a, b, 10.0, -2.0, backend="torch"), "similarity_softplus"),
    "nt_xent": (lambda a, b: fl.nt_xent(a, b, backend="torch"), "similarity_lse"),
}


@pytest.mark.parametrize("name", list(SECOND_ORDER_LOSSES))
def test_double_backward_is_refused_and_first_order_is_kept(name):
    loss, primitive = SECOND_ORDER_LOSSES[name]
    a, b = (_leaf(t) for t in _inputs(6, 6, 5))
    want = torch.autograd.grad(loss(a, b), (a, b))
    got = torch.autograd.grad(loss(a, b), (a, b), create_graph=True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)
    with pytest.raises(RuntimeError, match=f"double backward through fused_losses.{primitive} is not supported"):
        (got[0].square().sum() + got[1].sum()).backward()  # a gradient penalty


@pytest.mark.parametrize("transform", ["grad", "vjp", "jacrev", "jacfwd", "jvp", "hessian"])
def test_differentiating_torch_func_transforms_are_refused(transform):
    a, b = _inputs(4, 4, 3)
    loss = lambda x: fl.clip_loss(x, b, 10.0, backend="torch")  # noqa: E731
    calls = {"grad": lambda: torch.func.grad(loss)(a), "vjp": lambda: torch.func.vjp(loss, a),
             "jacrev": lambda: torch.func.jacrev(loss)(a), "jacfwd": lambda: torch.func.jacfwd(loss)(a),
             "jvp": lambda: torch.func.jvp(loss, (a,), (b,)), "hessian": lambda: torch.func.hessian(loss)(a)}
    with pytest.raises(RuntimeError, match="torch.func transforms that differentiate .* not supported through "
                                           "fused_losses.similarity_lse"):
        calls[transform]()


def test_forward_mode_ad_is_refused():
    """It used to return the tangent of the positive terms only: a silently wrong derivative."""
    a, b = _inputs(4, 4, 3)
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(a, b)
        with pytest.raises(RuntimeError, match="forward-mode AD .* not supported through "
                                               "fused_losses.similarity_softplus"):
            fl.siglip_loss(dual, b, 10.0, 0.0, backend="torch")


def test_vmap_and_backward_through_it_match_a_loop():
    a = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 5, 4, dtype=torch.float64)
    mapped = torch.func.vmap(lambda x, y: fl.clip_loss(x, y, 10.0, backend="torch"))(a, b)
    looped = torch.stack([fl.reference.clip_loss(x, y, 10.0) for x, y in zip(a, b)])
    torch.testing.assert_close(mapped, looped, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(torch.autograd.grad(mapped.sum(), a)[0],
                               torch.autograd.grad(looped.sum(), a)[0], rtol=1e-10, atol=1e-12)
