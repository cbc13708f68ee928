"""The cuda backend's kernels on a GPU against a dense float64 torch computation of the contract.

    PYTHONPATH=. python -m pytest -q tests/gpu/test_cuda_gpu.py
    compute-sanitizer --tool memcheck python -m pytest -q tests/gpu/test_cuda_gpu.py -k memcheck

The extension is built just in time on first use when it is not built already (about a minute).
The dense truth is computed from the same (already rounded) inputs, so the remaining error is the
kernels' own: fp32 accumulation everywhere, plus the rounding of the backward's weights to the
input dtype for 16-bit inputs (chunked_backward), and TF32 in everything for fp32_precision="tf32".
Inputs with a ``label_mask`` (the log-sum-exp's LABEL_MASK feature) check the log-sum-exp alone.
"""

import math

import pytest
import torch

from fused_losses.backends import chunked_backward
from fused_losses.backends import cuda as cuda_backend
from fused_losses.backends import select_backend
from fused_losses.backends.base import LABEL_MASK, LabelMask
from fused_losses.backends.cuda import kernels as cuda_kernels
from tests.gpu.kernel_inputs import make_inputs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32

# Maximum errors: lse in absolute terms; softplus sums, U, V and grad_bias relative to the largest
# magnitude of the truth. (forward lse, forward softplus, backward). Single-pass TF32 errs by
# ~1e-3 relative in S, so by ~scale * 1e-3 relative in exp(S): it is checked at scale 20.
TOLERANCES = {"tf32": (0.1, 0.05, 0.1), "split_tf32": (2e-3, 1e-4, 3e-3)}
# The backward's weights rounded to 16 bits (relative 2^-9 for bf16, 2^-12 for fp16).
BACKWARD_TOLERANCE = {BF16: 1e-2, FP16: 3e-3, FP32: 0.0}

# (dtype, N, M, D, diag_offset, workspace_limit_bytes or None for the default)
CASES = [
    (BF16, 8192, 8192, 512, 0, None),
    (FP16, 8192, 8192, 256, None, None),
    (FP32, 4096, 4096, 512, 0, None),
    (BF16, 4097, 3001, 1000, 3, 1 << 20),  # ragged tiles; several forward launches, 2 backward chunks
    (FP16, 300, 65536, 128, -5, None),  # few rows: columns split across CTAs
    (BF16, 65536, 512, 256, 0, None),  # few columns
    (FP32, 1000, 777, 65, 1, 1 << 20),  # odd D: no 16-byte loads
]


def case_id(case):
    dtype, n, m, d, offset, limit = case
    return f"{str(dtype)[6:]}-{n}x{m}x{d}-mask{offset}" + ("-small_workspace" if limit else "")


@pytest.fixture(scope="module")
def ready():
    reason = cuda_backend.unavailable_reason(torch.device("cuda"))
    assert reason is None, reason
    assert select_backend("cuda", torch.device("cuda"), {LABEL_MASK}) == "cuda"


def make_kernels(limit=None, precision="split_tf32"):
    options = {"fp32_precision": precision}
    if limit is not None:
        options["workspace_limit_bytes"] = limit
    return cuda_backend.make_kernels(**options)


def random_vector(size, seed):
    return torch.randn(size, device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed))


# -- dense float64 truth ---------------------------------------------------------------------


def dense_rows(args):
    """(u, v) in float64: the normalized rows."""
    u = args["q"].double() * args["inv_norm_q"].double()[:, None]
    v = args["k"].double() * args["inv_norm_k"].double()[:, None]
    return u, v


def dense_similarity(args):
    u, v = dense_rows(args)
    s = args["scale"].double() * (u @ v.T)
    offset = args["diag_offset"]
    if offset is not None:
        rows = torch.arange(s.shape[0], device=s.device)
        cols = rows + offset
        inside = (cols >= 0) & (cols < s.shape[1])
        s[rows[inside], cols[inside]] = -math.inf
    if args.get("label_mask") is not None:
        row_labels, col_labels, exclude_same = args["label_mask"]
        s.masked_fill_((row_labels[:, None] == col_labels[None, :]) == exclude_same, -math.inf)
    return s


def softmax_shares(s, lse, dim):
    """exp(s - lse) along dim, 0 where s is masked (including entirely masked rows / columns)."""
    shares = torch.exp(s - lse.unsqueeze(dim))
    return torch.where(s == -math.inf, torch.zeros_like(shares), shares)


def dense_products(args, w):
    u, v = dense_rows(args)
    scale = args["scale"].double()
    return scale * (w @ v), scale * (w.T @ u)


def assert_close(got, want, tolerance, relative, what):
    got = got.double()
    assert got.shape == want.shape, what
    assert torch.equal(torch.isneginf(got), torch.isneginf(want)), f"{what}: -inf pattern"
    finite = torch.isfinite(want)
    assert torch.isfinite(got[finite]).all(), f"{what}: non-finite values"
    if not finite.any():
        return
    error = (got[finite] - want[finite]).abs().max().item()
    bound = tolerance * (max(1.0, want[finite].abs().max().item()) if relative else 1.0)
    assert error <= bound, f"{what}: max error {error:.3g} > {bound:.3g}"


# -- accuracy ----------------------------------------------------------------------------------


def check_case(kernels, args, tolerances, bias=-10.0):
    """Every primitive (the log-sum-exp alone with a label mask) against the dense truth."""
    lse_tol, softplus_tol, backward_tol = tolerances
    backward_tol = max(backward_tol, BACKWARD_TOLERANCE[args["q"].dtype])
    s = dense_similarity(args)
    check_lse(kernels, args, s, lse_tol, backward_tol)
    if args.get("label_mask") is None:
        check_softplus(kernels, args, s, softplus_tol, backward_tol, bias)


def check_lse(kernels, args, s, lse_tol, backward_tol):
    lse_row, lse_col = torch.logsumexp(s, dim=1), torch.logsumexp(s, dim=0)
    n, m = s.shape

    got_row, got_col = kernels.lse_forward(**args, want_rows=True, want_cols=True)
    assert_close(got_row, lse_row, lse_tol, False, "lse_row")
    assert_close(got_col, lse_col, lse_tol, False, "lse_col")
    rows_only = kernels.lse_forward(**args, want_rows=True, want_cols=False)
    cols_only = kernels.lse_forward(**args, want_rows=False, want_cols=True)
    assert rows_only[1] is None and cols_only[0] is None
    assert torch.equal(rows_only[0], got_row)  # the column pass does not change the row pass
    assert_close(cols_only[1], lse_col, lse_tol, False, "lse_col alone")

    grad_row, grad_col = random_vector(n, 11), random_vector(m, 12)
    stats = dict(lse_row=lse_row.float(), lse_col=lse_col.float())
    shares_row = softmax_shares(s, lse_row, 1) * grad_row.double()[:, None]
    shares_col = softmax_shares(s, lse_col, 0) * grad_col.double()[None, :]
    for name, g_row, g_col, w in [("both", grad_row, grad_col, shares_row + shares_col),
                                  ("rows", grad_row, None, shares_row), ("cols", None, grad_col, shares_col)]:
        u, v = kernels.lse_backward(**args, **stats, grad_row=g_row, grad_col=g_col)
        want_u, want_v = dense_products(args, w)
        assert_close(u, want_u, backward_tol, True, f"lse U ({name})")
        assert_close(v, want_v, backward_tol, True, f"lse V ({name})")


def check_softplus(kernels, args, s, softplus_tol, backward_tol, bias):
    grad_row = random_vector(s.shape[0], 11)
    bias_t = torch.tensor(bias, device="cuda")
    logits = s + bias
    sp_row = kernels.softplus_forward(**args, bias=bias_t)
    assert_close(sp_row, torch.nn.functional.softplus(logits).sum(dim=1), softplus_tol, True, "softplus rows")
    w = torch.sigmoid(logits) * grad_row.double()[:, None]
    u, v, grad_bias = kernels.softplus_backward(**args, bias=bias_t, grad_row=grad_row)
    want_u, want_v = dense_products(args, w)
    assert_close(u, want_u, backward_tol, True, "softplus U")
    assert_close(v, want_v, backward_tol, True, "softplus V")
    assert grad_bias.shape == ()
    assert_close(grad_bias, w.sum(), 1e-4, True, "grad_bias")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_dense(ready, case):
    dtype, n, m, d, offset, limit = case
    args = make_inputs(dtype, n, m, d, offset)
    check_case(make_kernels(limit), args, TOLERANCES["split_tf32"])


def test_fp32_single_pass_tf32(ready):
    args = make_inputs(FP32, 2048, 3000, 512, 0, scale=20.0)
    check_case(make_kernels(precision="tf32"), args, TOLERANCES["tf32"])


@pytest.mark.parametrize("dtype", [BF16, FP16, FP32])
def test_strided_inputs(ready, dtype):
    """Rows with a stride of their own (no 16-byte loads) and a feature stride != 1 (copied)."""
    n, m, d = 333, 517, 200
    args = make_inputs(dtype, n, m, d, 2)
    q_padded = torch.zeros(n, d + 3, dtype=dtype, device="cuda")
    q_padded[:, 1:d + 1] = args["q"]
    k_transposed = args["k"].t().contiguous().t()
    strided = dict(args, q=q_padded[:, 1:d + 1], k=k_transposed)
    assert strided["q"].stride() == (d + 3, 1) and strided["k"].stride() == (1, m)
    check_case(make_kernels(), strided, TOLERANCES["split_tf32"])


def test_fully_masked_rows_and_columns(ready):
    """One column and the mask on its only entry of row 0: lse_row[0] = -inf, no NaN anywhere."""
    args = make_inputs(BF16, 4, 1, 16, 0)
    check_case(make_kernels(), args, TOLERANCES["split_tf32"])
    lse_row, _ = make_kernels().lse_forward(**args, want_rows=True, want_cols=False)
    assert lse_row[0].item() == -math.inf and torch.isfinite(lse_row[1:]).all()


def test_empty_and_zero_dim(ready):
    kernels = make_kernels()
    empty = make_inputs(FP16, 0, 5, 8, None)
    lse_row, lse_col = kernels.lse_forward(**empty, want_rows=True, want_cols=True)
    assert lse_row.shape == (0,) and torch.isneginf(lse_col).all()
    args = make_inputs(FP16, 70, 50, 0, 0)  # D = 0: S = 0 off the mask
    check_case(kernels, args, TOLERANCES["split_tf32"])


# -- the label mask -----------------------------------------------------------------------------


def with_labels(args, classes, exclude_same, label_dtype=torch.int64, seed=2):
    """``args`` with a label mask of random labels in [0, classes)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    labels = [torch.randint(0, classes, (x.shape[0],), device="cuda", generator=gen).to(label_dtype)
              for x in (args["q"], args["k"])]
    return dict(args, label_mask=LabelMask(*labels, exclude_same))


@pytest.mark.parametrize("exclude_same", [True, False], ids=["exclude-same", "only-same"])
@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[4], CASES[6]], ids=case_id)
def test_label_mask_matches_dense(ready, case, exclude_same):
    dtype, n, m, d, offset, limit = case
    args = with_labels(make_inputs(dtype, n, m, d, offset), 10, exclude_same)
    check_case(make_kernels(limit), args, TOLERANCES["split_tf32"])


@pytest.mark.parametrize("exclude_same", [True, False], ids=["exclude-same", "only-same"])
def test_label_mask_int32_and_single_pass_tf32(ready, exclude_same):
    args = with_labels(make_inputs(FP32, 1500, 2600, 256, None, scale=20.0), 7, exclude_same, torch.int32)
    check_case(make_kernels(precision="tf32"), args, TOLERANCES["tf32"])


@pytest.mark.parametrize("exclude_same", [True, False], ids=["exclude-same", "only-same"])
def test_lines_the_labels_mask_entirely(ready, exclude_same):
    """Rows and columns with no entry left are -inf and pass no gradient: "exclude" against column
    labels all 1 empties the rows of label 1; "only" empties the rows of label 0 (no column has it)
    and the columns whose label lies 2^32 above a row label (equal in the low 32 bits only)."""
    n, m = 333, 517
    gen = torch.Generator(device="cuda").manual_seed(4)
    row_labels = torch.randint(0, 3, (n,), device="cuda", generator=gen)
    if exclude_same:
        col_labels = torch.ones(m, dtype=torch.long, device="cuda")
    else:
        col_labels = torch.randint(1, 3, (m,), device="cuda", generator=gen)
        col_labels[::7] += 1 << 32
    args = dict(make_inputs(BF16, n, m, 72, 0), label_mask=LabelMask(row_labels, col_labels, exclude_same))
    check_case(make_kernels(), args, TOLERANCES["split_tf32"])
    lse_row, lse_col = make_kernels().lse_forward(**args, want_rows=True, want_cols=True)
    assert torch.equal(torch.isneginf(lse_row), row_labels == (1 if exclude_same else 0))
    assert torch.isneginf(lse_col).any() != exclude_same


@pytest.mark.parametrize("dtype", [BF16, FP16, FP32])
def test_weights_writer_matches_dense(ready, dtype):
    """The weights kernel alone, on a chunk that starts inside a row tile, into a padded buffer."""
    n, m, d, start, stop = 700, 517, 200, 131, 650
    args = make_inputs(dtype, n, m, d, 5)
    s = dense_similarity(args)
    lse_row, lse_col = torch.logsumexp(s, dim=1), torch.logsumexp(s, dim=0)
    grad_row, grad_col = random_vector(n, 21), random_vector(m, 22)
    row_scale, col_scale = random_vector(stop - start, 23).abs() + 1, random_vector(m, 24).abs() + 1
    buffer = torch.full((stop - start, m + 3), math.nan, dtype=dtype, device="cuda")
    write = make_kernels().lse_weights_writer(**args, lse_row=lse_row.float(), lse_col=lse_col.float(),
                                              grad_row=grad_row, grad_col=grad_col)
    write(buffer[:, :m], start, stop, row_scale, col_scale)
    w = (softmax_shares(s, lse_row, 1) * grad_row.double()[:, None] +
         softmax_shares(s, lse_col, 0) * grad_col.double()[None, :])[start:stop]
    want = row_scale.double()[:, None] * col_scale.double()[None, :] * w
    assert torch.isnan(buffer[:, m:]).all()  # the padding is not written
    # fp32 (split TF32): most likely the tensor cores' truncating accumulation, an error that grows
    # with D and reaches S by scale x that: 1.6e-4 relative at D = 200, scale 100 on an H200
    # (IEEE fp32 gives 2e-5). The losses' own fp32 tolerance is checked in test_losses_gpu.
    assert_close(buffer[:, :m], want, {BF16: 8e-3, FP16: 1e-3, FP32: 4e-4}[dtype], True, "weights")
    masked = torch.isneginf(s[start:stop])
    assert (buffer[:, :m][masked] == 0).all()


# -- determinism and output independence --------------------------------------------------------


def run_all(kernels, args):
    bias = torch.tensor(-10.0, device="cuda")
    lse_row, lse_col = kernels.lse_forward(**args, want_rows=True, want_cols=True)
    grad_row = random_vector(lse_row.shape[0], 3)
    grad_col = random_vector(lse_col.shape[0], 4)
    return [lse_row, lse_col,
            *kernels.lse_backward(**args, lse_row=lse_row, lse_col=lse_col, grad_row=grad_row, grad_col=grad_col),
            kernels.softplus_forward(**args, bias=bias),
            *kernels.softplus_backward(**args, bias=bias, grad_row=grad_row)]


@pytest.fixture
def small_chunks(monkeypatch):
    """Backward chunks of 256 rows (the driver's floor is 4096)."""
    monkeypatch.setattr(chunked_backward, "MIN_CHUNK_ROWS", 256)
    monkeypatch.setattr(chunked_backward, "WORKSPACE_BYTES", 1)


@pytest.mark.parametrize("dtype", [BF16, FP16, FP32])
def test_deterministic(ready, dtype, small_chunks):
    args = make_inputs(dtype, 3000, 5000, 384, 0)
    kernels = make_kernels(1 << 22)  # several backward chunks, several forward launches
    first, second = run_all(kernels, args), run_all(kernels, args)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_poisoned_outputs_and_workspace(ready, monkeypatch, small_chunks):
    """Results do not depend on what output and workspace buffers held before."""
    args = make_inputs(BF16, 1500, 2100, 96, -1)
    kernels = make_kernels(1 << 20)
    clean = run_all(kernels, args)

    def poisoned(shape, device, dtype=torch.float32):
        buffer = torch.empty(shape, dtype=dtype, device=device)
        return buffer.fill_(255) if dtype == torch.uint8 else buffer.fill_(math.nan)

    monkeypatch.setattr(cuda_kernels, "_empty", poisoned)
    for a, b in zip(clean, run_all(kernels, args)):
        assert torch.equal(a, b)


def test_side_stream(ready):
    args = make_inputs(FP16, 700, 900, 64, None)
    kernels = make_kernels()
    want = run_all(kernels, args)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = run_all(kernels, args)
    torch.cuda.current_stream().wait_stream(stream)
    for a, b in zip(want, got):
        assert torch.equal(a, b)


# -- small enough for compute-sanitizer ---------------------------------------------------------


@pytest.mark.parametrize("dtype", [BF16, FP16, FP32])
def test_memcheck_small(ready, dtype, small_chunks):
    """Every entry point on ragged sizes, in seconds even under compute-sanitizer (memcheck,
    racecheck, synccheck: benchmarks/gpu_session.sh checks)."""
    for offset, limit in [(None, None), (3, 1)]:
        args = make_inputs(dtype, 70, 45, 37, offset)
        check_case(make_kernels(limit), args, TOLERANCES["split_tf32"])
        check_case(make_kernels(limit), with_labels(args, 4, offset is None), TOLERANCES["split_tf32"])
    torch.cuda.synchronize()
