"""The triton kernels at real sizes on a GPU (needs CUDA; about 2-4 minutes on an H100).

Ground truth is a chunked float64 computation on the same GPU. The kernels must be at most 2x
as far from it as torch's own computation in the input dtype (normalized copies, matmuls in that
dtype, statistics in fp32), plus a small absolute slack.
"""

import pytest
import torch

from fused_losses.backends import triton as triton_backend
from fused_losses.backends.base import LabelMask
from tests.gpu.kernel_inputs import make_inputs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CHUNK_ROWS = 4096
SLACK = 1e-5  # relative to max(1, max |truth|)
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32

# (dtype, N, M, D, diag_offset): D in {64, 256, 512, 768, 1024, 1000}, N = M up to 65536.
CASES = [
    (BF16, 65536, 65536, 512, 0),
    (BF16, 16384, 16384, 64, 0),
    (BF16, 16384, 16384, 256, None),
    (BF16, 16384, 16384, 768, 0),
    (BF16, 8192, 8192, 1024, 0),
    (BF16, 8192, 8192, 1000, 3),
    (FP16, 32768, 32768, 256, 0),
    (FP16, 8192, 8192, 1000, None),
    (FP32, 8192, 8192, 512, 0),
    (FP32, 4096, 4096, 1000, -7),
    (BF16, 256, 65536, 512, 0),  # lopsided: must still be split over the GPU
]


def case_id(case):
    dtype, n, m, d, offset = case
    return f"{str(dtype)[6:]}-{n}x{m}x{d}-mask{offset}"


def grads_for(n, m, seed=1):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.rand(n, device="cuda", generator=gen) / n, torch.rand(m, device="cuda", generator=gen) / m)


class ChunkedTorch:
    """The contract computed by torch in chunks of rows: matmuls in ``compute`` (float64 for the
    truth, the input dtype for torch's own computation), statistics in ``stat``."""

    def __init__(self, compute, stat, q, k, inv_norm_q, inv_norm_k, scale, diag_offset, label_mask=None):
        self.compute, self.stat = compute, stat
        self.u = (q.to(stat) * inv_norm_q.to(stat)[:, None]).to(compute)
        self.v = (k.to(stat) * inv_norm_k.to(stat)[:, None]).to(compute)
        self.scale = scale.to(stat)
        self.offset = diag_offset
        self.label_mask = label_mask

    def chunks(self):
        for start in range(0, self.u.shape[0], CHUNK_ROWS):
            yield start, min(start + CHUNK_ROWS, self.u.shape[0])

    def similarity(self, start, stop):
        s = (self.u[start:stop] @ self.v.T).to(self.stat) * self.scale
        if self.offset is not None:
            rows = torch.arange(start, stop, device="cuda")
            cols = rows + self.offset
            inside = (cols >= 0) & (cols < s.shape[1])
            s[rows[inside] - start, cols[inside]] = float("-inf")
        if self.label_mask is not None:
            row_labels, col_labels, exclude_same = self.label_mask
            same = row_labels[start:stop, None] == col_labels[None, :]
            s = s.masked_fill(same == exclude_same, float("-inf"))
        return s

    def lse(self):
        rows, cols = [], None
        for start, stop in self.chunks():
            s = self.similarity(start, stop)
            rows.append(torch.logsumexp(s, dim=1))
            chunk_cols = torch.logsumexp(s, dim=0)
            cols = chunk_cols if cols is None else torch.logaddexp(cols, chunk_cols)
        return torch.cat(rows), cols

    def lse_grads(self, lse_row, lse_col, grad_row, grad_col):
        grad_u = torch.empty(self.u.shape, dtype=self.stat, device="cuda")
        grad_v = torch.zeros(self.v.shape, dtype=self.stat, device="cuda")
        for start, stop in self.chunks():
            s = self.similarity(start, stop)
            w = (grad_row.to(self.stat)[start:stop, None] * torch.exp(s - lse_row[start:stop, None])
                 + grad_col.to(self.stat)[None, :] * torch.exp(s - lse_col[None, :])).to(self.compute)
            grad_u[start:stop] = (w @ self.v).to(self.stat) * self.scale
            grad_v += (w.T @ self.u[start:stop]).to(self.stat) * self.scale
        return grad_u, grad_v

    def softplus(self, bias):
        return torch.cat([torch.nn.functional.softplus(self.similarity(a, b) + bias.to(self.stat)).sum(dim=1)
                          for a, b in self.chunks()])


def error(got, truth):
    finite = torch.isfinite(truth)
    assert torch.equal(finite, torch.isfinite(got))
    return (got.double() - truth.double())[finite].abs().max().item()


def assert_as_accurate_as_torch(name, got, torch_own, truth):
    """|got - truth| <= 2 |torch_own - truth| + SLACK * max(1, max|truth|) (max norms)."""
    assert got.dtype == torch.float32 and not torch.isnan(got).any(), name
    slack = SLACK * max(1.0, truth[torch.isfinite(truth)].abs().max().item())
    ours, theirs = error(got, truth), error(torch_own, truth)
    assert ours <= 2 * theirs + slack, f"{name}: error {ours:.3e}, torch's own {theirs:.3e}"


def check_lse(case, kernels, label_mask=None):
    """The kernels' statistics and gradients against the truth; ``label_mask``: None or
    (classes, exclude_same), random labels."""
    dtype, n, m, d, offset = case
    inputs = make_inputs(*case)
    if label_mask is not None:
        classes, exclude_same = label_mask
        gen = torch.Generator(device="cuda").manual_seed(2)
        labels = [torch.randint(0, classes, (size,), device="cuda", generator=gen) for size in (n, m)]
        inputs["label_mask"] = LabelMask(*labels, exclude_same)
    truth = ChunkedTorch(torch.float64, torch.float64, **inputs)
    torch_own = ChunkedTorch(dtype, torch.float32, **inputs)

    lse_row, lse_col = kernels.lse_forward(**inputs, want_rows=True, want_cols=True)
    true_row, true_col = truth.lse()
    own_row, own_col = torch_own.lse()
    assert_as_accurate_as_torch("lse_row", lse_row, own_row, true_row)
    assert_as_accurate_as_torch("lse_col", lse_col, own_col, true_col)

    grad_row, grad_col = grads_for(n, m)
    u, v = kernels.lse_backward(**inputs, lse_row=lse_row, lse_col=lse_col, grad_row=grad_row, grad_col=grad_col)
    true_u, true_v = truth.lse_grads(true_row, true_col, grad_row, grad_col)
    own_u, own_v = torch_own.lse_grads(own_row, own_col, grad_row, grad_col)
    assert_as_accurate_as_torch("U", u, own_u, true_u)
    assert_as_accurate_as_torch("V", v, own_v, true_v)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_lse_at_real_sizes(case):
    check_lse(case, triton_backend.make_kernels())


@pytest.mark.parametrize("case", [CASES[0], CASES[5], CASES[8]], ids=case_id)
def test_fused_backward_option(case):
    check_lse(case, triton_backend.make_kernels(gradient="fused"))


@pytest.mark.parametrize("gradient", ["chunked", "fused"])
@pytest.mark.parametrize("label_mask", [(10, True), (10, False)], ids=["exclude-same", "only-same"])
@pytest.mark.parametrize("case", [CASES[2], CASES[7], CASES[8]], ids=case_id)
def test_label_mask(case, label_mask, gradient):
    check_lse(case, triton_backend.make_kernels(gradient=gradient), label_mask)


@pytest.mark.parametrize("tiles", ["64x128", "128x128"])
def test_tile_shapes(tiles, monkeypatch):
    from fused_losses.backends.triton import launch
    monkeypatch.setattr(launch, "FORWARD_TILES", tiles)
    check_lse(CASES[4], triton_backend.make_kernels())


@pytest.mark.parametrize("case", [CASES[2], CASES[7], CASES[8], CASES[-1]], ids=case_id)
def test_softplus_at_real_sizes(case):
    inputs = make_inputs(*case)
    inputs["scale"] = torch.tensor(10.0, device="cuda")
    bias = torch.tensor(-10.0, device="cuda")
    sp_row = triton_backend.make_kernels().softplus_forward(**inputs, bias=bias)
    truth = ChunkedTorch(torch.float64, torch.float64, **inputs).softplus(bias)
    torch_own = ChunkedTorch(case[0], torch.float32, **inputs).softplus(bias)
    assert_as_accurate_as_torch("sp_row", sp_row, torch_own, truth)


def run_all(kernels, inputs, grad_row, grad_col):
    lse_row, lse_col = kernels.lse_forward(**inputs, want_rows=True, want_cols=True)
    u, v = kernels.lse_backward(**inputs, lse_row=lse_row, lse_col=lse_col, grad_row=grad_row, grad_col=grad_col)
    bias = torch.tensor(-10.0, device="cuda")
    sp_row = kernels.softplus_forward(**inputs, bias=bias)
    sp_u, sp_v, grad_bias = kernels.softplus_backward(**inputs, bias=bias, grad_row=grad_row)
    return lse_row, lse_col, u, v, sp_row, sp_u, sp_v, grad_bias


DETERMINISM_CASES = [(BF16, 256, 65536, 512, 0), (BF16, 16384, 16384, 768, 0), (FP32, 4096, 8192, 256, None)]


@pytest.mark.parametrize("case", DETERMINISM_CASES, ids=case_id)
def test_identical_bits_across_runs(case):
    inputs = make_inputs(*case)
    grad_row, grad_col = grads_for(case[1], case[2])
    kernels = triton_backend.make_kernels()
    first = run_all(kernels, inputs, grad_row, grad_col)
    torch.empty(2**28, device="cuda").normal_()  # leave different garbage in freed memory
    second = run_all(kernels, inputs, grad_row, grad_col)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_atomic_mode_is_close_to_deterministic_mode():
    inputs = make_inputs(BF16, 256, 65536, 512, 0)
    grad_row, grad_col = grads_for(256, 65536)
    exact = run_all(triton_backend.make_kernels(), inputs, grad_row, grad_col)
    atomic = run_all(triton_backend.make_kernels(deterministic=False), inputs, grad_row, grad_col)
    for a, b in zip(exact, atomic):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * a.abs().max().item())


def test_fp32_follows_tf32_setting():
    inputs = make_inputs(FP32, 2048, 2048, 512, None)
    truth_row, _ = ChunkedTorch(torch.float64, torch.float64, **inputs).lse()
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "ieee"
        ieee_row, _ = triton_backend.make_kernels().lse_forward(**inputs, want_rows=True, want_cols=False)
        matmul.fp32_precision = "tf32"
        tf32_row, _ = triton_backend.make_kernels().lse_forward(**inputs, want_rows=True, want_cols=False)
    finally:
        matmul.fp32_precision = before
    # fp32 rounding of lse ~ 90 alone is ~1e-5 absolute (H200: 1.1e-4 after 2048 columns); TF32 ~ 1e-3 relative.
    largest = truth_row.abs().max().item()
    assert error(ieee_row, truth_row) < 1e-5 * largest
    assert error(tf32_row, truth_row) > error(ieee_row, truth_row)
