"""The triton backend's kernels against a dense float64 computation of the contract
(fused_losses/backends/base.py). Runs in triton's interpreter when there is no GPU.

Every scratch buffer the backend allocates, and the chunked backward's U, V and weights workspace,
is filled with NaN first (``poisoned_buffers``), so an element a kernel fails to write shows up as
NaN in the results.
"""

import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from fused_losses.backends import chunked_backward  # noqa: E402
from fused_losses.backends.base import LabelMask  # noqa: E402
from fused_losses.backends import triton as triton_backend  # noqa: E402
from fused_losses.backends.triton import launch  # noqa: E402
from fused_losses.backends.triton.operands import Similarity  # noqa: E402

# The interpreter evaluates both sides of tl.where with numpy: masked lanes (-inf - -inf, 0 / 0)
# warn there; the tests check outputs for NaN themselves.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::DeprecationWarning")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Worst |error| allowed relative to max(1, max |expected|): the interpreter's fp32 dot is exact;
# fp16 products are exact in fp32, but the backward rounds W and v to fp16 for the dot.
VALUE_TOL = {torch.float32: 1e-5, torch.float16: 1e-5}
GRAD_TOL = {torch.float32: 1e-5, torch.float16: 4e-3}

# (N, M, D, diag_offset): N = 1, primes, N != M, D not a power of two and larger than one D block
# of the interpreter's configuration (16), masks with offsets 0, positive, negative.
SHAPES = [
    (1, 1, 3, None),
    (1, 7, 5, 0),
    (13, 29, 37, None),
    (29, 13, 16, 3),
    (17, 17, 20, 0),
    (16, 33, 33, -5),
]


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch):
    def nan_buffer(self, *shape, dtype=torch.float32):
        return torch.full(shape, float("nan"), dtype=dtype, device=self.device)

    monkeypatch.setattr(Similarity, "scratch", nan_buffer)
    monkeypatch.setattr(chunked_backward, "uninitialized",
                        lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device))


# Options of every ``kernels()`` of a test; the ``gradient_strategy`` fixture sets the backward's.
KERNEL_OPTIONS = {}


@pytest.fixture(params=["chunked", "fused"])
def gradient_strategy(request, monkeypatch):
    """Run the backward with W in row chunks and vendor GEMMs (default), or with W on chip."""
    monkeypatch.setitem(KERNEL_OPTIONS, "gradient", request.param)
    return request.param


@pytest.fixture
def many_splits(monkeypatch):
    """More programs than blocks: every launch splits the reduced dimension."""
    monkeypatch.setattr(launch, "INTERPRETER_PROGRAMS", 64)


@pytest.fixture
def small_weight_chunks(monkeypatch):
    """Chunks of one 16-row block of W whatever the sizes (the chunked backward's floor on chunk
    rows is for GPU sizes)."""
    monkeypatch.setattr(chunked_backward, "MIN_CHUNK_ROWS", 0)
    monkeypatch.setattr(chunked_backward, "WORKSPACE_BYTES", 1)


def kernels(**options):
    return triton_backend.make_kernels(**{**KERNEL_OPTIONS, **options})


def inv_norms(x, eps=1e-12):
    return 1.0 / x.float().norm(dim=1).clamp_min(eps)


def make_inputs(n, m, d, dtype, seed=0, scale=3.0, normalize=True):
    """Keyword arguments of the kernel methods: q, k, inverse norms, 0-d scale, diag_offset=None."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=gen).to(dtype).to(DEVICE)
    k = torch.randn(m, d, generator=gen).to(dtype).to(DEVICE)
    ones = lambda x: torch.ones(x.shape[0], device=DEVICE)  # noqa: E731
    return dict(
        q=q, k=k,
        inv_norm_q=inv_norms(q) if normalize else ones(q),
        inv_norm_k=inv_norms(k) if normalize else ones(k),
        scale=torch.tensor(scale, device=DEVICE), diag_offset=None,
    )


def dense_similarity(q, k, inv_norm_q, inv_norm_k, scale, diag_offset, label_mask=None):
    """(u, v, S) in float64 with S masked to -inf (diagonal, and the label mask if given)."""
    u = inv_norm_q.double()[:, None] * q.double()
    v = inv_norm_k.double()[:, None] * k.double()
    s = scale.double() * (u @ v.T)
    if diag_offset is not None:
        rows = torch.arange(s.shape[0], device=s.device)
        cols = rows + diag_offset
        inside = (cols >= 0) & (cols < s.shape[1])
        s[rows[inside], cols[inside]] = float("-inf")
    if label_mask is not None:
        row_labels, col_labels, exclude_same = label_mask
        s = s.masked_fill((row_labels[:, None] == col_labels[None, :]) == exclude_same, float("-inf"))
    return u, v, s


def softmax(s, lse, dim):
    """exp(S - lse) along ``dim``, 0 on an all-masked line (lse = -inf)."""
    lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    return torch.exp(s - lse.unsqueeze(dim))


def dense_lse(**inputs):
    _, _, s = dense_similarity(**inputs)
    return torch.logsumexp(s, dim=1), torch.logsumexp(s, dim=0)


def dense_lse_grads(grad_row, grad_col, **inputs):
    u, v, s = dense_similarity(**inputs)
    w = torch.zeros_like(s)
    if grad_row is not None:
        w += grad_row.double()[:, None] * softmax(s, torch.logsumexp(s, dim=1), 1)
    if grad_col is not None:
        w += grad_col.double()[None, :] * softmax(s, torch.logsumexp(s, dim=0), 0)
    scale = inputs["scale"].double()
    return scale * w @ v, scale * w.T @ u


def dense_softplus(bias, **inputs):
    _, _, s = dense_similarity(**inputs)
    return torch.nn.functional.softplus(s + bias.double()).sum(dim=1)


def dense_softplus_grads(bias, grad_row, **inputs):
    u, v, s = dense_similarity(**inputs)
    w = grad_row.double()[:, None] * torch.sigmoid(s + bias.double())
    scale = inputs["scale"].double()
    return scale * w @ v, scale * w.T @ u, w.sum()


def assert_matches(got, want, tol):
    """fp32, same shape, no NaN, -inf exactly where expected, error <= tol * max(1, max|want|)."""
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert not torch.isnan(got).any(), "NaN in the output (an element was not written?)"
    assert torch.equal(torch.isneginf(got).cpu(), torch.isneginf(want).cpu())
    finite = torch.isfinite(want)
    if finite.any():
        error = (got.double() - want)[finite].abs().max().item()
        assert error <= tol * max(1.0, want[finite].abs().max().item()), error


def random_grads(n, m, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen).to(DEVICE), torch.randn(m, generator=gen).to(DEVICE)


def check_lse_against_dense(inputs, grad_row, grad_col, value_tol, grad_tol):
    """lse_forward (both directions) and lse_backward against the dense float64 contract;
    returns (lse_row, lse_col, U, V)."""
    lse_row, lse_col = kernels().lse_forward(**inputs, want_rows=True, want_cols=True)
    want_row, want_col = dense_lse(**inputs)
    assert_matches(lse_row, want_row, value_tol)
    assert_matches(lse_col, want_col, value_tol)
    u, v = kernels().lse_backward(**inputs, lse_row=lse_row, lse_col=lse_col, grad_row=grad_row, grad_col=grad_col)
    want_u, want_v = dense_lse_grads(grad_row, grad_col, **inputs)
    assert_matches(u, want_u, grad_tol)
    assert_matches(v, want_v, grad_tol)
    return lse_row, lse_col, u, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,m,d,offset", SHAPES)
def test_lse_matches_dense(n, m, d, offset, dtype, gradient_strategy):
    inputs = make_inputs(n, m, d, dtype)
    inputs["diag_offset"] = offset
    grad_row, grad_col = random_grads(n, m)
    lse_row, lse_col, u, v = check_lse_against_dense(inputs, grad_row, grad_col, VALUE_TOL[dtype], GRAD_TOL[dtype])


@pytest.mark.parametrize("want_rows,want_cols", [(True, False), (False, True), (False, False)])
def test_lse_returns_only_the_directions_asked_for(want_rows, want_cols):
    inputs = make_inputs(13, 29, 37, torch.float32)
    lse_row, lse_col = kernels().lse_forward(**inputs, want_rows=want_rows, want_cols=want_cols)
    want_row, want_col = dense_lse(**inputs)
    assert (lse_row is None) == (not want_rows) and (lse_col is None) == (not want_cols)
    if want_rows:
        assert_matches(lse_row, want_row, VALUE_TOL[torch.float32])
    if want_cols:
        assert_matches(lse_col, want_col, VALUE_TOL[torch.float32])


@pytest.mark.parametrize("which", ["row", "col", "none"])
def test_lse_backward_with_one_or_no_gradient_term(which, gradient_strategy):
    inputs = make_inputs(17, 11, 20, torch.float32)
    inputs["diag_offset"] = 1
    lse_row, lse_col = kernels().lse_forward(**inputs, want_rows=which == "row", want_cols=which == "col")
    grad_row, grad_col = random_grads(17, 11)
    grad_row = grad_row if which == "row" else None
    grad_col = grad_col if which == "col" else None
    u, v = kernels().lse_backward(**inputs, lse_row=lse_row, lse_col=lse_col, grad_row=grad_row, grad_col=grad_col)
    want_u, want_v = dense_lse_grads(grad_row, grad_col, **inputs)
    assert_matches(u, want_u, GRAD_TOL[torch.float32])
    assert_matches(v, want_v, GRAD_TOL[torch.float32])
    if which == "none":
        assert not u.any() and not v.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,m,d,offset", SHAPES)
def test_softplus_matches_dense(n, m, d, offset, dtype, gradient_strategy):
    inputs = make_inputs(n, m, d, dtype, scale=5.0)
    inputs["diag_offset"] = offset
    bias = torch.tensor(-2.5, device=DEVICE)
    sp_row = kernels().softplus_forward(**inputs, bias=bias)
    assert_matches(sp_row, dense_softplus(bias, **inputs), VALUE_TOL[dtype])

    grad_row, _ = random_grads(n, m)
    u, v, grad_bias = kernels().softplus_backward(**inputs, bias=bias, grad_row=grad_row)
    want_u, want_v, want_bias = dense_softplus_grads(bias, grad_row, **inputs)
    assert_matches(u, want_u, GRAD_TOL[dtype])
    assert_matches(v, want_v, GRAD_TOL[dtype])
    assert grad_bias.shape == () and grad_bias.dtype == torch.float32
    assert_matches(grad_bias, want_bias, GRAD_TOL[dtype])


def test_softplus_keeps_terms_below_fp32_resolution_of_one():
    # softplus(S + bias) ~ e^-20 for every entry: log(1 + z) alone would round each to 0.
    inputs = make_inputs(5, 300, 8, torch.float32, scale=1.0)
    bias = torch.tensor(-20.0, device=DEVICE)
    sp_row = kernels().softplus_forward(**inputs, bias=bias)
    want = dense_softplus(bias, **inputs)
    torch.testing.assert_close(sp_row.double(), want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("n,m,offset", [(1, 1, 0), (1, 4, 0), (4, 1, -2), (3, 3, 0)])
def test_fully_masked_lines_give_minus_inf_and_zero_gradients(n, m, offset, gradient_strategy):
    inputs = make_inputs(n, m, 6, torch.float32)
    inputs["diag_offset"] = offset
    grad_row, grad_col = torch.ones(n, device=DEVICE), torch.ones(m, device=DEVICE)
    lse_row, lse_col, u, v = check_lse_against_dense(inputs, grad_row, grad_col, VALUE_TOL[torch.float32], GRAD_TOL[torch.float32])
    if n == m == 1:
        assert torch.isneginf(lse_row).all() and torch.isneginf(lse_col).all()
        assert not u.any() and not v.any()
        bias = torch.tensor(0.5, device=DEVICE)
        assert kernels().softplus_forward(**inputs, bias=bias).item() == 0.0
        u, v, grad_bias = kernels().softplus_backward(**inputs, bias=bias, grad_row=grad_row)
        assert not u.any() and not v.any() and grad_bias.item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("scale", [100.0, 1000.0])
def test_large_scale_with_normalized_inputs(scale, dtype, gradient_strategy):
    n, m, d = 19, 23, 24
    # exp(S) with |S| ~ scale inherits fp32's rounding of S, ~6e-8 * scale relative.
    value_tol, grad_tol = VALUE_TOL[dtype] + 1e-7 * scale, GRAD_TOL[dtype] + 1e-7 * scale
    inputs = make_inputs(n, m, d, dtype, scale=scale)
    inputs["k"][:n] = inputs["q"]  # a matching key per row: very peaked softmaxes
    inputs["inv_norm_k"] = inv_norms(inputs["k"])
    grad_row, grad_col = random_grads(n, m)
    lse_row, lse_col, u, v = check_lse_against_dense(inputs, grad_row, grad_col, value_tol, grad_tol)
    bias = torch.tensor(-scale / 2, device=DEVICE)
    assert_matches(kernels().softplus_forward(**inputs, bias=bias), dense_softplus(bias, **inputs), value_tol)


def test_small_gradients_survive_fp16_weights(gradient_strategy):
    # Weights ~ 1e-7 / M would underflow fp16 if W were rounded without rescaling.
    n, m, d = 20, 40, 16
    inputs = make_inputs(n, m, d, torch.float16)
    lse_row, lse_col = kernels().lse_forward(**inputs, want_rows=True, want_cols=True)
    grad_row, grad_col = (g * 1e-7 for g in random_grads(n, m))
    u, v = kernels().lse_backward(**inputs, lse_row=lse_row, lse_col=lse_col, grad_row=grad_row, grad_col=grad_col)
    want_u, want_v = dense_lse_grads(grad_row, grad_col, **inputs)
    for got, want in ((u, want_u), (v, want_v)):
        error = (got.double() - want).abs().max() / want.abs().max()
        assert error < GRAD_TOL[torch.float16], error


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_zero_vectors(dtype, gradient_strategy):
    inputs = make_inputs(9, 11, 12, dtype)
    inputs["q"][2] = 0
    inputs["k"][5] = 0
    inputs["inv_norm_q"] = inv_norms(inputs["q"])
    inputs["inv_norm_k"] = inv_norms(inputs["k"])
    grad_row, grad_col = random_grads(9, 11)
    lse_row, lse_col, u, v = check_lse_against_dense(inputs, grad_row, grad_col, VALUE_TOL[dtype], GRAD_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_non_contiguous_inputs(dtype, gradient_strategy):
    gen = torch.Generator().manual_seed(3)
    q_base = torch.randn(40, 2 * 21, generator=gen).to(dtype).to(DEVICE)
    k_base = torch.randn(21, 30, generator=gen).to(dtype).to(DEVICE)
    q = q_base[5:18, ::2]  # row slice with a feature stride of 2
    k = k_base.T  # transposed view: feature stride 30
    assert not q.is_contiguous() and not k.is_contiguous()
    inputs = dict(q=q, k=k, inv_norm_q=inv_norms(q), inv_norm_k=inv_norms(k),
                  scale=torch.tensor(4.0, device=DEVICE), diag_offset=2)
    grad_row, grad_col = random_grads(13, 30)
    lse_row, lse_col, u, v = check_lse_against_dense(inputs, grad_row, grad_col, VALUE_TOL[dtype], GRAD_TOL[dtype])
    bias = torch.tensor(-1.0, device=DEVICE)
    u, v, grad_bias = kernels().softplus_backward(**inputs, bias=bias, grad_row=grad_row)
    want_u, want_v, want_bias = dense_softplus_grads(bias, grad_row, **inputs)
    assert_matches(u, want_u, GRAD_TOL[dtype])
    assert_matches(v, want_v, GRAD_TOL[dtype])


@pytest.mark.parametrize("workspace", ["one row block per forward launch", "two fused gradient splits",
                                       "one row block per weight chunk"])
def test_splits_and_row_chunks_merge_correctly(many_splits, monkeypatch, workspace):
    n, m, d = 40, 29, 20
    if workspace == "one row block per forward launch":
        monkeypatch.setattr(launch, "WORKSPACE_BYTES", launch.FLOAT32_BYTES * m)
        assert launch.row_blocks_per_launch(launch.cdiv(n, 16), m) == 1
    elif workspace == "two fused gradient splits":
        monkeypatch.setitem(KERNEL_OPTIONS, "gradient", "fused")
        monkeypatch.setattr(launch, "WORKSPACE_BYTES", 2 * launch.FLOAT32_BYTES * n * d)
        assert launch.max_gradient_splits(n, d) == 2
    else:
        monkeypatch.setattr(chunked_backward, "MIN_CHUNK_ROWS", 0)
        monkeypatch.setattr(chunked_backward, "WORKSPACE_BYTES", 1)
        assert chunked_backward.chunk_rows(n, m, 4, 16) == 16
    inputs = make_inputs(n, m, d, torch.float32)
    inputs["diag_offset"] = -3
    grad_row, grad_col = random_grads(n, m)
    lse_row, lse_col, u, v = check_lse_against_dense(inputs, grad_row, grad_col, VALUE_TOL[torch.float32], GRAD_TOL[torch.float32])
    bias = torch.tensor(1.5, device=DEVICE)
    assert_matches(kernels().softplus_forward(**inputs, bias=bias), dense_softplus(bias, **inputs),
                   VALUE_TOL[torch.float32])
    u, v, grad_bias = kernels().softplus_backward(**inputs, bias=bias, grad_row=grad_row)
    want_u, want_v, want_bias = dense_softplus_grads(bias, grad_row, **inputs)
    assert_matches(u, want_u, GRAD_TOL[torch.float32])
    assert_matches(v, want_v, GRAD_TOL[torch.float32])
    assert_matches(grad_bias, want_bias, GRAD_TOL[torch.float32])


def run_everything(kern, inputs, grad_row, grad_col, bias):
    lse_row, lse_col = kern.lse_forward(**inputs, want_rows=True, want_cols=True)
    grads = kern.lse_backward(**inputs, lse_row=lse_row, lse_col=lse_col, grad_row=grad_row, grad_col=grad_col)
    sp_row = kern.softplus_forward(**inputs, bias=bias)
    sp_grads = kern.softplus_backward(**inputs, bias=bias, grad_row=grad_row)
    return (lse_row, lse_col, *grads, sp_row, *sp_grads)


def test_deterministic_bits_whatever_the_scratch_memory_holds(many_splits, monkeypatch, gradient_strategy):
    calls = iter(range(10**6))

    def garbage_buffer(self, *shape, dtype=torch.float32):
        gen = torch.Generator().manual_seed(next(calls))
        return (torch.randn(shape, generator=gen) * 1e3).to(dtype).to(self.device)

    monkeypatch.setattr(Similarity, "scratch", garbage_buffer)
    inputs = make_inputs(33, 18, 20, torch.float16)
    inputs["diag_offset"] = 0
    grad_row, grad_col = random_grads(33, 18)
    bias = torch.tensor(-1.0, device=DEVICE)
    first = run_everything(kernels(), inputs, grad_row, grad_col, bias)
    second = run_everything(kernels(), inputs, grad_row, grad_col, bias)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_atomic_mode_matches_dense(many_splits):
    inputs = make_inputs(21, 50, 18, torch.float32)
    grad_row, grad_col = random_grads(21, 50)
    bias = torch.tensor(-1.0, device=DEVICE)
    lse_row, lse_col, u, v, _, sp_u, sp_v, grad_bias = run_everything(
        kernels(deterministic=False), inputs, grad_row, grad_col, bias)
    want_u, want_v = dense_lse_grads(grad_row, grad_col, **inputs)
    assert_matches(u, want_u, GRAD_TOL[torch.float32])
    assert_matches(v, want_v, GRAD_TOL[torch.float32])
    want_u, want_v, want_bias = dense_softplus_grads(bias, grad_row, **inputs)
    assert_matches(sp_u, want_u, GRAD_TOL[torch.float32])
    assert_matches(sp_v, want_v, GRAD_TOL[torch.float32])
    assert_matches(grad_bias, want_bias, GRAD_TOL[torch.float32])


def test_unnormalized_inputs():
    inputs = make_inputs(12, 14, 10, torch.float32, scale=0.5, normalize=False)
    lse_row, lse_col = kernels().lse_forward(**inputs, want_rows=True, want_cols=True)
    want_row, want_col = dense_lse(**inputs)
    assert_matches(lse_row, want_row, VALUE_TOL[torch.float32])
    assert_matches(lse_col, want_col, VALUE_TOL[torch.float32])


def test_float64_is_rejected_with_a_pointer_to_the_torch_backend():
    inputs = make_inputs(3, 4, 5, torch.float64)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32.*torch"):
        kernels().lse_forward(**inputs, want_rows=True, want_cols=False)


def test_mixed_dtypes_are_rejected():
    inputs = make_inputs(3, 4, 5, torch.float32)
    inputs["k"] = inputs["k"].half()
    with pytest.raises(TypeError, match="one dtype"):
        kernels().softplus_forward(**inputs, bias=torch.tensor(0.0, device=DEVICE))


def test_make_kernels_options():
    assert kernels().name == "triton" and kernels().gradient == "chunked"
    assert kernels(deterministic=False).deterministic is False
    assert kernels(gradient="fused").gradient == "fused"
    with pytest.raises(ValueError, match="gradient must be one of"):
        kernels(gradient="dense")
    with pytest.raises(TypeError):
        kernels(block_size=64)


def test_unavailable_reason(monkeypatch):
    assert triton_backend.unavailable_reason(DEVICE) is None
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = triton_backend.unavailable_reason(torch.device("cpu"))
    assert reason is not None and "TRITON_INTERPRET=1" in reason
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    assert "pip install triton" in triton_backend.unavailable_reason(DEVICE)


def test_lopsided_shapes_are_split_to_fill_the_gpu():
    # N = 256 rows against M = 65536 at 2 programs per SM on 132 SMs: 4 row blocks of 64 must be
    # split over the columns into about a wave.
    resident = 2 * 132
    row_blocks, col_blocks = launch.cdiv(256, 64), launch.cdiv(65536, 128)
    splits, per_split = launch.plan_splits(col_blocks, row_blocks, resident, col_blocks)
    assert resident * 0.9 <= row_blocks * splits <= resident and splits * per_split >= col_blocks
    max_splits = launch.max_gradient_splits(256, 512)
    splits, _ = launch.plan_splits(launch.cdiv(65536, 32), 4, resident, max_splits)
    assert splits <= max_splits and splits * 256 * 512 * launch.FLOAT32_BYTES <= launch.WORKSPACE_BYTES


def test_splits_fill_whole_waves():
    # 128 row blocks on 264 resident programs: 2 splits of 256 tiles fill one wave (97%); 1 split
    # would leave half the GPU idle. 512 row blocks already make 1.94 waves: no split.
    assert launch.plan_splits(512, 128, 264, 512) == (2, 256)
    assert launch.plan_splits(512, 512, 264, 512) == (1, 512)
    assert launch.plan_splits(7, 1, 4, 1) == (1, 7)  # max_splits respected
    assert launch.plan_splits(3, 1, 64, 100) == (3, 1)  # no empty split


def test_occupancy_follows_the_compiled_kernel():
    # sm_90: 65536 registers, 228 KiB shared memory, 2048 threads per SM.
    assert launch.ctas_per_sm(254, 100 * 1024, 8) == 1
    assert launch.ctas_per_sm(207, 75 * 1024, 4) == 2
    assert launch.ctas_per_sm(128, 40 * 1024, 4) == 4
    assert launch.ctas_per_sm(96, 120 * 1024, 4) == 1  # shared memory bound
    assert launch.ctas_per_sm(255, 300 * 1024, 8) == 0  # does not fit


def test_column_workspace_is_bounded():
    n = m = 65536
    blocks = launch.row_blocks_per_launch(launch.cdiv(n, 128), m)
    assert blocks * m * launch.FLOAT32_BYTES <= launch.WORKSPACE_BYTES and blocks >= 1


def test_fp32_input_precision_follows_torch():
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        assert launch.fp32_input_precision() == "tf32"
        matmul.fp32_precision = "ieee"
        assert launch.fp32_input_precision() == "ieee"
    finally:
        matmul.fp32_precision = before


def test_zero_gradients_give_zero_results_not_nan(gradient_strategy):
    # max(N, M) >= 64: the weight scale 2^k / max|grad| overflowed fp32 for all-zero grads (0 * inf).
    n, m, d = 64, 70, 16
    inputs = make_inputs(n, m, d, torch.float16)
    from fused_losses.backends.triton.fused_gradient import weight_scale
    assert torch.isfinite(weight_scale([torch.zeros(n)], n, m))
    lse_row, lse_col = kernels().lse_forward(**inputs, want_rows=True, want_cols=True)
    u, v = kernels().lse_backward(**inputs, lse_row=lse_row, lse_col=lse_col,
                                  grad_row=torch.zeros(n, device=DEVICE), grad_col=torch.zeros(m, device=DEVICE))
    assert torch.equal(u, torch.zeros_like(u)) and torch.equal(v, torch.zeros_like(v))
    bias = torch.tensor(-1.0, device=DEVICE)
    u, v, grad_bias = kernels().softplus_backward(**inputs, bias=bias, grad_row=torch.zeros(n, device=DEVICE))
    assert torch.equal(u, torch.zeros_like(u)) and torch.equal(v, torch.zeros_like(v)) and grad_bias.item() == 0


def test_feature_offsets_that_overflow_int32_are_made_row_major():
    # The kernels compute feature index x stride(1) in int32: a feature-major (N, D) view with
    # (D - 1) x N >= 2^31 is copied to row-major. Meta tensors: no memory.
    from fused_losses.backends.triton.operands import _int32_feature_offsets
    n, d = 2**20, 4096
    feature_major = torch.empty_strided((n, d), (1, n), device="meta")
    assert _int32_feature_offsets(feature_major).stride() == (d, 1)
    small = torch.empty_strided((2**16, d), (1, 2**16), device="meta")
    assert _int32_feature_offsets(small) is small


def test_tma_descriptors_only_where_they_fit():
    # TMA reads rows at 16-byte aligned strides with a unit feature stride; IEEE fp32 dots (FMA
    # units) keep pointer loads. Both paths run in the other tests (D = 16 and 20 in fp32, fp16).
    def uses(q, k):
        ones = torch.ones(max(q.shape[0], k.shape[0]))
        return Similarity.checked(q, k, ones[: q.shape[0]], ones[: k.shape[0]], torch.tensor(1.0), None).uses_descriptors()

    half = torch.zeros(8, 16, dtype=torch.float16)
    assert uses(half, half)
    assert not uses(torch.zeros(8, 20, dtype=torch.float16), torch.zeros(8, 20, dtype=torch.float16))  # 40 B rows
    assert not uses(half, torch.zeros(16, 8, dtype=torch.float16).T)  # feature stride 8
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "ieee"
        assert not uses(half.float(), half.float())
        matmul.fp32_precision = "tf32"
        assert uses(half.float(), half.float())
    finally:
        matmul.fp32_precision = before


def test_launches_are_guarded_to_the_inputs_device():
    # triton launches on the current CUDA device and stream, not on the tensors' device.
    from fused_losses.backends.triton.operands import device_guard
    guard = device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    with device_guard(torch.device("cpu")):
        pass


@pytest.mark.slow
def test_kernels_compile_for_h100_without_register_spills():
    # The interpreter accepts code the GPU compiler rejects; compile_check compiles for sm_90 (no
    # GPU needed) exactly what the losses launch, and fails on spills. About 30 s of CPU.
    ptxas = os.path.join(os.path.dirname(pytest.importorskip("triton").__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("triton's bundled ptxas is not available")
    from fused_losses.backends.triton.compile_check import DEFAULT_CASES
    assert any(case.startswith("pml_ntxent:") for case in DEFAULT_CASES)  # a label-masked call
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    module = [sys.executable, "-m", "fused_losses.backends.triton.compile_check"]
    # (options, cases, kernels reported): forward + weights kernel per case; the fused backward
    # adds its kernel to the forward, one per direction where the two directions differ (one-way).
    for extra, cases, kernels_reported in (
            ([], [], 2 * len(DEFAULT_CASES)), (["--tf32"], ["siglip:fp32:8192x8192x1000"], 2),
            (["--gradient", "fused"], ["clip:bf16:65536x65536x512", "pml_ntxent:bf16:65536x65536x512"], 2 + 3)):
        run = subprocess.run(module + extra + cases, capture_output=True, text=True, env=env, timeout=900)
        assert run.returncode == 0, run.stdout + run.stderr
        reports = run.stdout.splitlines()
        assert len(reports) == kernels_reported, run.stdout
        assert all(" spill 0 B," in line and " 0 CTA/SM" not in line for line in reports), run.stdout
        # The tensor-core tile loops keep their MMAs asynchronous: no full wait on every iteration
        # (the fused backward's nested loops drain once per tile by design).
        tile_loops = [line for line in reports if " wgmma 0," not in line and "fused_gradient" not in line]
        assert tile_loops and all("(every iteration 0)" in line for line in tile_loops), run.stdout


# Label mask (feature LABEL_MASK of fused_losses/backends/base.py): the inputs carry ``label_mask``,
# which the kernels and dense_similarity both take.


def with_labels(inputs, exclude_same, classes, label_dtype=torch.int64, seed=5):
    """``inputs`` with a label mask of random labels in [0, classes)."""
    gen = torch.Generator().manual_seed(seed)
    row_labels, col_labels = (torch.randint(0, classes, (len(x),), generator=gen).to(label_dtype).to(DEVICE)
                              for x in (inputs["q"], inputs["k"]))
    return dict(inputs, label_mask=LabelMask(row_labels, col_labels, exclude_same))


# (N, M, D, diag_offset, input dtype, label dtype): shapes of SHAPES, each dtype and label dtype twice.
LABEL_CASES = [
    (1, 7, 5, 0, torch.float32, torch.int32),
    (13, 29, 37, None, torch.float16, torch.int64),
    (29, 13, 16, 3, torch.float16, torch.int32),
    (17, 17, 20, 0, torch.float32, torch.int64),
]


@pytest.mark.parametrize("exclude_same", [True, False])
@pytest.mark.parametrize("n,m,d,offset,dtype,label_dtype", LABEL_CASES)
def test_lse_with_labels_matches_dense(n, m, d, offset, dtype, label_dtype, exclude_same, gradient_strategy):
    # 7 classes: with 16-row tiles, some columns lose every entry of a tile but not of the matrix.
    inputs = with_labels(make_inputs(n, m, d, dtype), exclude_same, 7, label_dtype)
    inputs["diag_offset"] = offset
    grad_row, grad_col = random_grads(n, m)
    check_lse_against_dense(inputs, grad_row, grad_col, VALUE_TOL[dtype], GRAD_TOL[dtype])


@pytest.fixture
def sm90_tiles(monkeypatch):
    """The tiles of the sm_90 configurations in the interpreter: 64 x 128 forward and weights
    tiles, 64 x 64 fused-gradient tiles with 64 output features per program."""
    monkeypatch.setattr(launch, "forward_config", lambda dim, dtype, device, tiles=None: launch.KernelConfig(
        64, 128, 32, 0, num_warps=4, num_stages=3))
    monkeypatch.setattr(launch, "gradient_config", lambda dim, dtype, device: launch.KernelConfig(
        64, 64, 32, 64, num_warps=8, num_stages=2))


@pytest.mark.parametrize("exclude_same,classes", [(True, 3), (False, 31)])
@pytest.mark.parametrize("n,m,d,offset,dtype", [(131, 197, 40, 1, torch.float16), (71, 67, 96, None, torch.float32)])
def test_labels_on_sm90_tiles(sm90_tiles, n, m, d, offset, dtype, exclude_same, classes, gradient_strategy):
    # Sizes past one and two tiles in each direction; with 31 classes and "only", about one
    # column in eight of a full 64-row tile keeps no entry, and most columns of the 3- and 7-row
    # edge tiles.
    inputs = with_labels(make_inputs(n, m, d, dtype), exclude_same, classes)
    inputs["diag_offset"] = offset
    grad_row, grad_col = random_grads(n, m)
    check_lse_against_dense(inputs, grad_row, grad_col, VALUE_TOL[dtype], GRAD_TOL[dtype])


@pytest.mark.parametrize("exclude_same", [True, False])
def test_lines_the_labels_mask_entirely(exclude_same, gradient_strategy):
    # Row labels 0..2. "only" against column labels 1..3: rows of label 0 and columns of label 3
    # keep nothing. "exclude" against column labels all 1: rows of label 1 keep nothing.
    n, m = 23, 19
    gen = torch.Generator().manual_seed(7)
    row_labels = torch.randint(0, 3, (n,), generator=gen)
    row_labels[:2] = torch.tensor([0, 1])
    if exclude_same:
        col_labels = torch.ones(m, dtype=torch.long)
    else:
        col_labels = torch.randint(1, 4, (m,), generator=gen)
        col_labels[0] = 3
    inputs = make_inputs(n, m, 12, torch.float32)
    inputs["diag_offset"] = 2
    inputs["label_mask"] = LabelMask(row_labels.to(DEVICE), col_labels.to(DEVICE), exclude_same)
    grad_row, grad_col = random_grads(n, m)
    lse_row, lse_col, u, v = check_lse_against_dense(
        inputs, grad_row, grad_col, VALUE_TOL[torch.float32], GRAD_TOL[torch.float32])
    empty_rows = (row_labels == 1) if exclude_same else (row_labels == 0)
    empty_cols = torch.zeros(m, dtype=torch.bool) if exclude_same else (col_labels == 3)
    assert empty_rows.any() and torch.equal(torch.isneginf(lse_row).cpu(), empty_rows)
    assert torch.equal(torch.isneginf(lse_col).cpu(), empty_cols)
    assert not u[empty_rows.to(DEVICE)].any() and not v[empty_cols.to(DEVICE)].any()


def test_labels_across_splits_and_row_chunks(many_splits, small_weight_chunks, gradient_strategy):
    inputs = with_labels(make_inputs(40, 29, 20, torch.float32), exclude_same=True, classes=5)
    inputs["diag_offset"] = -3
    grad_row, grad_col = random_grads(40, 29)
    check_lse_against_dense(inputs, grad_row, grad_col, VALUE_TOL[torch.float32], GRAD_TOL[torch.float32])


def test_labels_give_the_same_bits_twice(many_splits, gradient_strategy):
    inputs = with_labels(make_inputs(21, 18, 20, torch.float16), exclude_same=False, classes=4)
    inputs["diag_offset"] = 0
    grad_row, grad_col = random_grads(21, 18)

    def run():
        lse_row, lse_col = kernels().lse_forward(**inputs, want_rows=True, want_cols=True)
        return (lse_row, lse_col, *kernels().lse_backward(**inputs, lse_row=lse_row, lse_col=lse_col,
                                                          grad_row=grad_row, grad_col=grad_col))

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("labels,error,match", [
    ((torch.zeros(5, dtype=torch.int32), torch.zeros(4, dtype=torch.int64)), TypeError, "must both be int32 or both int64"),
    ((torch.zeros(5), torch.zeros(4)), TypeError, "must both be int32 or both int64"),
    ((torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.long)), ValueError,
     r"column labels must be a contiguous vector of shape \(4,\)"),
    ((torch.zeros(10, dtype=torch.long)[::2], torch.zeros(4, dtype=torch.long)), ValueError,
     "row labels must be a contiguous vector"),
])
def test_bad_label_masks_are_rejected(labels, error, match):
    inputs = make_inputs(5, 4, 3, torch.float32)
    with pytest.raises(error, match=match):
        kernels().lse_forward(**inputs, want_rows=True, want_cols=False,
                              label_mask=LabelMask(*(x.to(DEVICE) for x in labels), True))


@pytest.mark.parametrize("label_dtype", [torch.int32, torch.uint8])
def test_similarity_lse_with_labels_through_autograd(label_dtype):
    # The primitive: labels of any integer dtype (int32 stays int32, others become int64),
    # gradients of q, k and scale.
    from fused_losses import similarity_lse
    from tests import dense
    gen = torch.Generator().manual_seed(11)
    q, k = torch.randn(19, 12, generator=gen), torch.randn(23, 12, generator=gen)
    y, z = torch.randint(0, 6, (19,), generator=gen), torch.randint(0, 6, (23,), generator=gen)
    leaves = [x.to(DEVICE).requires_grad_(True) for x in (q, k, torch.tensor(4.0))]
    got = similarity_lse(*leaves, cols=True, diag_offset=-1, row_labels=y.to(label_dtype).to(DEVICE),
                         col_labels=z.to(label_dtype).to(DEVICE), backend="triton")
    want_leaves = [x.detach().double().cpu().requires_grad_(True) for x in leaves]
    want = dense.lse(*want_leaves, diag_offset=-1, labels=(y, z, True))
    weights = [torch.randn(len(w), generator=gen, dtype=torch.float64) for w in want]
    got_grads = torch.autograd.grad(sum((g * w.to(g)).sum() for g, w in zip(got, weights)), leaves)
    want_grads = torch.autograd.grad(sum((g * w).sum() for g, w in zip(want, weights)), want_leaves)
    for g, w in zip((*got, *got_grads), (*want, *want_grads)):
        torch.testing.assert_close(g.double().cpu(), w, rtol=1e-5, atol=1e-5)
