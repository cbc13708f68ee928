"""The chunked backward driver with the vendor GEMM on a GPU (needs CUDA; seconds)."""

import pytest
import torch

from fused_losses.backends import chunked_backward as driver
from tests.test_chunked_backward import TOL, assert_close, run

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_products_run_in_fp32_without_upcasting(dtype):
    assert driver.gemm_path("cuda", dtype) in ("addmm_out_dtype", "mm_out_dtype")


@pytest.mark.parametrize("dtype,path", [
    (torch.bfloat16, "addmm_out_dtype"), (torch.bfloat16, "mm_out_dtype"), (torch.float16, "addmm_out_dtype"),
    (torch.float16, "mm_out_dtype"), (torch.float32, "fp32"),
])
def test_matches_dense_over_several_chunks(dtype, path, monkeypatch):
    if path == "addmm_out_dtype" and driver.gemm_path("cuda", dtype) != path:
        pytest.skip("this torch has no fp32-accumulating addmm for 16-bit factors")
    monkeypatch.setattr(driver, "gemm_path", lambda device_type, dtype: path)
    monkeypatch.setattr(driver, "MIN_CHUNK_ROWS", 0)
    monkeypatch.setattr(driver, "WORKSPACE_BYTES", 1000 * 3008 * 2)
    gen = torch.Generator(device="cuda").manual_seed(0)
    n, m, d = 2500, 3000, 256
    q = torch.randn(n, d, device="cuda", generator=gen).to(dtype)
    k = torch.randn(m, d, device="cuda", generator=gen).to(dtype)
    q[7] = 0
    grad_row = torch.rand(n, device="cuda", generator=gen) / n
    grad_col = torch.rand(m, device="cuda", generator=gen) / m
    (u, v, _), want, writer = run(q, k, torch.tensor(30.0, device="cuda"), grad_row, grad_col, row_multiple=128)
    assert len(writer.chunks) >= 3
    assert_close(u, want[0], TOL[dtype])
    assert_close(v, want[1], TOL[dtype])
