"""The label mask of the log-sum-exp primitive (backends/base.py, LABEL_MASK): values and
gradients against dense float64 on the torch backend, masked rows and columns, label dtypes, and
the backend selection for calls that need it. The triton backend's label mask is tested in
tests/test_triton_backend.py, the cuda backend's in tests/test_cuda_host.py (its kernels on the
CPU emulation) and tests/gpu/test_cuda_gpu.py."""

import pytest
import torch

from fused_losses import similarity_lse
from fused_losses import backends
from fused_losses.backends import FeatureUnsupported
from fused_losses.backends.base import LABEL_MASK
from tests import dense
from tests.test_primitives import SHAPES

MODES = {"exclude": True, "only": False}  # same_label -> exclude_same of the contract


def _leaf(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_(True)


def _labels(gen, n, classes):
    return torch.randint(0, classes, (n,), generator=gen)


def _check_against_dense(q, k, scale, y, z, same_label, offset, chunk, normalize=True, gen=None):
    """Forward and the gradients of q, k, scale (random upstream gradients, also on -inf rows and
    columns, which must pass nothing) against dense float64."""
    got = similarity_lse(q, k, scale, rows=True, cols=True, normalize=normalize, diag_offset=offset,
                         row_labels=y, col_labels=z, same_label=same_label, backend="torch",
                         chunk_size=chunk)
    want = dense.lse(q, k, scale, normalize, offset, labels=(y, z, MODES[same_label]))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    weights = [torch.randn(len(w), generator=gen, dtype=torch.float64) for w in want]
    inputs = [x for x in (q, k, scale) if isinstance(x, torch.Tensor) and x.requires_grad]
    got_grads = torch.autograd.grad(sum((g * w).sum() for g, w in zip(got, weights)), inputs)
    want_grads = torch.autograd.grad(sum((g * w).sum() for g, w in zip(want, weights)), inputs)
    for g, w in zip(got_grads, want_grads):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    return got


@pytest.mark.parametrize("n,m,d,offset,chunk", SHAPES)
@pytest.mark.parametrize("same_label", ["exclude", "only"])
def test_label_mask_matches_dense_float64(gen, n, m, d, offset, chunk, same_label):
    q, k = _leaf(gen, n, d), _leaf(gen, m, d)
    scale = torch.tensor(3.1, dtype=torch.float64, requires_grad=True)
    _check_against_dense(q, k, scale, _labels(gen, n, 3), _labels(gen, m, 3), same_label, offset,
                         chunk, gen=gen)


@pytest.mark.parametrize("same_label", ["exclude", "only"])
def test_label_mask_without_normalization(gen, same_label):
    q, k = _leaf(gen, 10, 7), _leaf(gen, 14, 7)
    _check_against_dense(q, k, 0.6, _labels(gen, 10, 4), _labels(gen, 14, 4), same_label, -2, 3,
                         normalize=False, gen=gen)


@pytest.mark.parametrize("same_label", ["exclude", "only"])
def test_fully_masked_rows_and_columns_are_minus_inf_and_pass_no_gradient(gen, same_label):
    # Row labels 0..2 and column labels 1..3: with "only", row label 0 has no column and column
    # label 3 no row; with "exclude", a row of label 1 sees column labels 2 and 3 only, and rows 0..5
    # all-label-1 against columns all-label-1 are fully masked.
    y = torch.tensor([0, 1, 2, 0, 1, 1, 2])
    z = torch.tensor([1, 3, 2, 1, 3]) if same_label == "only" else torch.tensor([1, 1, 1, 1, 1])
    q, k = _leaf(gen, 7, 4), _leaf(gen, 5, 4)
    lse_row, lse_col = _check_against_dense(q, k, 2.0, y, z, same_label, None, 2, gen=gen)
    masked_rows = (y == 0) if same_label == "only" else (y == 1)
    assert torch.equal(torch.isneginf(lse_row), masked_rows)
    assert torch.isneginf(lse_col).any() == (same_label == "only")


@pytest.mark.parametrize("same_label", ["exclude", "only"])
def test_label_mask_and_diagonal_mask_together(gen, same_label):
    """Distinct labels: "only" keeps nothing but the diagonal, which the diagonal mask removes."""
    labels = torch.arange(6)
    q = _leaf(gen, 6, 3)
    lse_row, lse_col = _check_against_dense(q, q, 1.5, labels, labels, same_label, 0, 4, gen=gen)
    assert torch.isneginf(lse_row).all() == (same_label == "only")


@pytest.mark.parametrize("same_label", ["exclude", "only"])
@pytest.mark.parametrize("offset", [None, 1])
def test_label_mask_gradcheck(gen, same_label, offset):
    # Labels alternate so that every row and column keeps entries in both modes.
    y, z = torch.tensor([0, 1, 0, 1, 0, 1]), torch.tensor([1, 0, 1, 0, 0])
    q, k = _leaf(gen, 6, 4), _leaf(gen, 5, 4)
    scale = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)

    def f(q, k, scale):
        return similarity_lse(q, k, scale, rows=True, cols=True, diag_offset=offset, row_labels=y,
                              col_labels=z, same_label=same_label, backend="torch", chunk_size=4)

    assert torch.autograd.gradcheck(f, (q, k, scale))


@pytest.mark.parametrize("always_recompute_columns", [False, True])
@pytest.mark.parametrize("never_share_exponentials", [False, True])
@pytest.mark.parametrize("same_label", ["exclude", "only"])
@pytest.mark.parametrize("scale", [3.0, 300.0])
def test_label_mask_on_the_exact_fallbacks(monkeypatch, gen, always_recompute_columns,
                                           never_share_exponentials, same_label, scale):
    """The torch backend's one-exponential fast paths and their exact fallbacks, labels masked."""
    from fused_losses.backends import torch_tiled
    if always_recompute_columns:
        monkeypatch.setattr(torch_tiled, "_TRUSTED_SUM", float("inf"))
    if never_share_exponentials:
        monkeypatch.setattr(torch_tiled, "_SHARED_EXP_SPREAD", float("-inf"))
    q, k = _leaf(gen, 23, 6), _leaf(gen, 17, 6)
    _check_against_dense(q, k, scale, _labels(gen, 23, 4), _labels(gen, 17, 5), same_label, 1, 5,
                         gen=gen)


@pytest.mark.parametrize("dtypes", [(torch.int32, torch.int32), (torch.int64, torch.int32),
                                    (torch.uint8, torch.int16)])
def test_any_integer_label_dtype(gen, dtypes):
    q, k = torch.randn(9, 4, generator=gen), torch.randn(8, 4, generator=gen)
    y, z = _labels(gen, 9, 3), _labels(gen, 8, 3)
    want = similarity_lse(q, k, 5.0, cols=True, row_labels=y, col_labels=z, backend="torch")
    got = similarity_lse(q, k, 5.0, cols=True, row_labels=y.to(dtypes[0]),
                         col_labels=z.to(dtypes[1]), backend="torch")
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_low_precision_inputs_with_labels(gen):
    q, k = torch.randn(21, 12, generator=gen), torch.randn(19, 12, generator=gen)
    y, z = _labels(gen, 21, 3), _labels(gen, 19, 3)
    got = similarity_lse(q.half(), k.half(), 10.0, cols=True, row_labels=y, col_labels=z,
                         backend="torch", chunk_size=4)
    want = dense.lse(q.half(), k.half(), 10.0, labels=(y, z, True))
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), w, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(row_labels=torch.zeros(5, dtype=torch.long)), ValueError, "row_labels needs col_labels"),
    (dict(col_labels=torch.zeros(4, dtype=torch.long)), ValueError, "col_labels needs row_labels"),
    (dict(row_labels=torch.zeros(5), col_labels=torch.zeros(4)), TypeError,
     "row_labels must be an integer tensor"),
    (dict(row_labels=torch.zeros(5, dtype=torch.long), col_labels=torch.zeros(5, dtype=torch.long)),
     ValueError, r"col_labels must have shape \(4,\)"),
    (dict(row_labels=torch.zeros(5, dtype=torch.long), col_labels=torch.zeros(4, dtype=torch.long),
          same_label="keep"), ValueError, "same_label must be one of"),
])
def test_bad_labels_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        similarity_lse(torch.randn(5, 3), torch.randn(4, 3), **kwargs)


# Backend selection


def test_backend_without_the_label_mask_raises_naming_the_option(monkeypatch):
    monkeypatch.setattr(backends, "unavailable_reason", lambda name, device=None, dtype=None: None)
    monkeypatch.setattr(backends._module("cuda"), "FEATURES", frozenset())
    with pytest.raises(FeatureUnsupported, match=r"backend='cuda' does not implement a label "
                       r"mask \(row_labels / col_labels of similarity_lse\); backends that do: triton, torch"):
        backends.select_backend("cuda", torch.device("cuda"), {LABEL_MASK})
    assert backends.select_backend("cuda", torch.device("cuda")) == "cuda"


def test_feature_unsupported_is_a_backend_unavailable_and_not_implemented_error():
    assert issubclass(FeatureUnsupported, backends.BackendUnavailable)
    assert issubclass(FeatureUnsupported, NotImplementedError)


def test_auto_skips_backends_without_a_needed_feature(monkeypatch):
    """auto takes the first backend in its order that runs here and implements the features."""
    monkeypatch.setattr(backends, "unavailable_reason", lambda name, device=None, dtype=None: None)
    cuda = torch.device("cuda")
    assert backends.select_backend("auto", cuda, {LABEL_MASK}) == "triton"
    monkeypatch.setattr(backends._module("triton"), "FEATURES", frozenset())
    monkeypatch.setattr(backends._module("cuda"), "FEATURES", frozenset())
    assert backends.select_backend("auto", cuda) == "triton"
    assert backends.select_backend("auto", cuda, {LABEL_MASK}) == "torch"
    monkeypatch.setattr(backends._module("cuda"), "FEATURES", frozenset({LABEL_MASK}))
    assert backends.select_backend("auto", cuda, {LABEL_MASK}) == "cuda"


def test_auto_without_any_backend_for_the_features(monkeypatch):
    monkeypatch.setattr(backends._module("torch"), "FEATURES", frozenset())
    with pytest.raises(backends.BackendUnavailable, match="no backend can run on device cpu with a "
                       "label mask"):
        backends.select_backend("auto", torch.device("cpu"), {LABEL_MASK})


def test_label_mask_on_a_backend_without_it_raises_from_the_primitive(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setattr(backends._module("triton"), "FEATURES", frozenset())
    q, labels = torch.randn(4, 3), torch.arange(4)
    with pytest.raises(FeatureUnsupported, match="backend='triton' does not implement a label mask"):
        similarity_lse(q, q, row_labels=labels, col_labels=labels, backend="triton")


@pytest.mark.parametrize("same_label", ["exclude", "only"])
def test_float32_columns_far_below_the_chunk_maximum(gen, same_label):
    """At scale 300 a column's entries can lie e^-87 and more below its chunk's largest entry:
    its float32 sum underflows and is recomputed exactly, unless the labels mask it entirely."""
    q, k = torch.randn(40, 5, generator=gen), torch.randn(30, 5, generator=gen)
    y, z = _labels(gen, 40, 6), _labels(gen, 30, 6)
    got = similarity_lse(q, k, 300.0, cols=True, row_labels=y, col_labels=z, same_label=same_label,
                         backend="torch", chunk_size=7)
    want = dense.lse(q, k, 300.0, labels=(y, z, MODES[same_label]))
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-4)
