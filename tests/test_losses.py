"""Every loss on every CPU-runnable backend against ``fused_losses.reference``: values and the
gradients of every differentiable input (embeddings, temperature / scale, bias)."""

from dataclasses import dataclass
from typing import Callable, Dict

import pytest
import torch
from pytorch_metric_learning.reducers import DoNothingReducer

import fused_losses as fl
from fused_losses import functional, reference
from fused_losses.integrations import pytorch_metric_learning as pml

REDUCTIONS = ("mean", "sum", "none")
# Relative tolerance of each input dtype against the float64 reference of the same values.
DTYPE_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def _generator():
    return torch.Generator().manual_seed(torch.seed() % 2**31)


@dataclass
class LossCase:
    """How to build inputs for a loss and call it from either module."""

    name: str
    make_inputs: Callable[[int, int, int, torch.Generator], Dict[str, torch.Tensor]]
    call: Callable  # (module, inputs, **options) -> loss
    option_grid: tuple = ({},)


def _embeddings(rows, d, g):
    """Rows of norm ~3: with normalize=False the logits stay in a trained model's range. Raw randn
    rows (norm sqrt(D)) saturate the softmax at D = 64 and up: the loss is then flat, its gradient
    ~1e-30, and any finite precision returns the rounding of two cancelling terms instead (seen on
    every backend, CPU and H200: SupCon's temperature gradient at N = 3 in ~10% of draws)."""
    return torch.randn(rows, d, generator=g, dtype=torch.float64) * (3.0 / max(d, 1) ** 0.5)


def _scalar(value):
    return torch.tensor(value, dtype=torch.float64)


def _supcon_labels(n, g):
    """Classes of about 3 (at least 2 classes when n >= 2, so every anchor has negatives: a batch
    of one class has loss 0 identically, which only tests fp32 cancellation), offset and spread."""
    classes = max(2, (n + 2) // 3)
    return (torch.randperm(n, generator=g) % classes) * 7 - 5


LOSS_CASES = [
    LossCase("clip",
             lambda n, m, d, g: dict(a=_embeddings(n, d, g), b=_embeddings(n, d, g), scale=_scalar(14.0)),
             lambda lib, x, **o: lib.clip_loss(x["a"], x["b"], x["scale"], **o),
             ({}, {"normalize": False}, {"label_smoothing": 0.1})),
    LossCase("info_nce",
             lambda n, m, d, g: dict(a=_embeddings(n, d, g), b=_embeddings(m, d, g), t=_scalar(0.07),
                                     targets=torch.randint(0, m, (n,), generator=g)),
             lambda lib, x, **o: lib.info_nce(x["a"], x["b"], x["t"], targets=x["targets"], **o),
             ({}, {"normalize": False}, {"label_smoothing": 0.2})),
    LossCase("info_nce_default_targets",
             lambda n, m, d, g: dict(a=_embeddings(n, d, g), b=_embeddings(max(n, m), d, g), t=_scalar(0.1)),
             lambda lib, x, **o: lib.info_nce(x["a"], x["b"], x["t"], **o)),
    LossCase("nt_xent",
             lambda n, m, d, g: dict(a=_embeddings(n, d, g), b=_embeddings(n, d, g), t=_scalar(0.5)),
             lambda lib, x, **o: lib.nt_xent(x["a"], x["b"], x["t"], **o),
             ({}, {"normalize": False})),
    LossCase("supcon",
             lambda n, m, d, g: dict(a=_embeddings(n, d, g), t=_scalar(0.1),
                                     labels=_supcon_labels(n, g)),
             lambda lib, x, **o: lib.supcon_loss(x["a"], x["labels"], x["t"], **o),
             ({}, {"normalize": False})),
    LossCase("npairs",
             lambda n, m, d, g: dict(a=_embeddings(n, d, g), b=_embeddings(n, d, g), t=_scalar(1.0)),
             lambda lib, x, **o: lib.npairs_loss(x["a"], x["b"], temperature=x["t"], **o),
             ({}, {"normalize": False, "l2_reg": 0.01})),
    LossCase("siglip",
             lambda n, m, d, g: dict(a=_embeddings(n, d, g), b=_embeddings(n, d, g), scale=_scalar(10.0),
                                     bias=_scalar(-5.0)),
             lambda lib, x, **o: lib.siglip_loss(x["a"], x["b"], x["scale"], x["bias"], **o),
             ({}, {"normalize": False})),
]
CASES_BY_NAME = {case.name: case for case in LOSS_CASES}

# N = 1, primes, N != M, D not a power of two.
SHAPES = [(1, 1, 4), (2, 3, 5), (13, 29, 37), (31, 31, 16), (24, 7, 3)]


def _backends():
    """The torch backend always; triton when it can run here (the interpreter on CPU)."""
    return [name for name in ("torch", "triton") if name in fl.available_backends(torch.device("cpu"))]


def compare_with_reference(case: LossCase, backend: str, n: int, m: int, d: int, dtype: torch.dtype,
                           reduction: str, options: dict, device: str = "cpu") -> None:
    """Loss and the gradient of every float input on ``backend`` against the float64 reference."""
    inputs = case.make_inputs(n, m, d, _generator())
    ours = {k: (v.to(dtype) if v.is_floating_point() and v.dim() == 2 else v).to(device).requires_grad_(v.is_floating_point())
            for k, v in inputs.items()}
    # The reference sees exactly the values we see, in float64.
    theirs = {k: v.detach().double().requires_grad_(True) if v.is_floating_point() else v
              for k, v in ours.items()}
    got = case.call(functional, ours, reduction=reduction, backend=backend, **options)
    want = case.call(reference, theirs, reduction=reduction, **options)
    tol = DTYPE_TOLERANCE[dtype]
    assert got.shape == want.shape
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * max(1.0, want.abs().max().item()))
    weights = torch.randn(want.shape, generator=_generator(), dtype=torch.float64).to(device)
    leaves = [k for k, v in ours.items() if v.requires_grad]
    got_grads = torch.autograd.grad((got.double() * weights).sum(), [ours[k] for k in leaves])
    want_grads = torch.autograd.grad((want * weights).sum(), [theirs[k] for k in leaves])
    for name, g, w in zip(leaves, got_grads, want_grads):
        assert g.dtype == ours[name].dtype, name
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g.double(), w, rtol=tol, atol=tol * (1 + w.abs().max().item()),
                                   msg=lambda m: f"gradient of {name}: {m}")


@pytest.mark.parametrize("case", LOSS_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("n,m,d", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_float64_matches_reference(case, n, m, d, reduction):
    for options in case.option_grid:
        compare_with_reference(case, "torch", n, m, d, torch.float64, reduction, options)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("case", LOSS_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_low_precision_matches_reference(backend, case, dtype):
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("bf16 tl.dot is wrong in the Triton interpreter; covered by tests/gpu")
    for options in case.option_grid:
        compare_with_reference(case, backend, 19, 23, 40, dtype, "mean", options)


@pytest.mark.parametrize("backend", [b for b in _backends() if b != "torch"])
@pytest.mark.parametrize("case", LOSS_CASES, ids=lambda c: c.name)
def test_other_backend_matches_reference_float32(backend, case):
    for n, m, d in SHAPES[1:4]:
        compare_with_reference(case, backend, n, m, d, torch.float32, "none", case.option_grid[-1])


def test_clip_large_scale_and_degenerate_vectors():
    """Scale 1000, zero vectors and identical vectors: finite and equal to the reference."""
    g = _generator()
    a, b = _embeddings(9, 6, g), _embeddings(9, 6, g)
    a[2] = 0
    b[4] = b[1]
    a[5] = a[6]
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-4)):
        ours = [t.to(dtype).requires_grad_(True) for t in (a, b)]
        theirs = [t.detach().double().requires_grad_(True) for t in ours]
        got = fl.clip_loss(*ours, 1000.0, backend="torch")
        want = reference.clip_loss(*theirs, 1000.0)
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
        for gg, ww in zip(torch.autograd.grad(got, ours), torch.autograd.grad(want, theirs)):
            assert torch.isfinite(gg).all()
            torch.testing.assert_close(gg.double(), ww, rtol=tol, atol=tol * max(1, ww.abs().max().item()))


def test_supcon_without_any_positive_is_zero_and_differentiable():
    features = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    labels = torch.arange(5)
    loss = fl.supcon_loss(features, labels)
    assert loss.item() == 0.0
    (grad,) = torch.autograd.grad(loss, features)
    assert torch.equal(grad, torch.zeros_like(features))
    assert fl.supcon_loss(features, labels, reduction="none").tolist() == [0.0] * 5


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(7, 5), (5,)])
def test_cosine_embedding_loss_matches_torch(reduction, shape):
    x1 = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([1, -1, -1, 1, 1, -1, 1][: shape[0]]) if len(shape) == 2 else torch.tensor(-1)
    for margin in (0.0, 0.3, -0.2):
        got = fl.cosine_embedding_loss(x1, x2, target, margin, reduction)
        want = torch.nn.functional.cosine_embedding_loss(x1, x2, target, margin=margin, reduction=reduction)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        for g, w in zip(torch.autograd.grad(got.sum(), (x1, x2)), torch.autograd.grad(want.sum(), (x1, x2))):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    module = fl.CosineEmbeddingLoss(margin=0.1, reduction=reduction)
    torch.testing.assert_close(module(x1, x2, target),
                               torch.nn.CosineEmbeddingLoss(margin=0.1, reduction=reduction)(x1, x2, target))


def test_npairs_l2_penalty_is_on_raw_embeddings():
    g = _generator()
    a, b = _embeddings(6, 4, g), _embeddings(6, 4, g)
    plain = fl.npairs_loss(a, b, normalize=False)
    penalized = fl.npairs_loss(a, b, normalize=False, l2_reg=0.5)
    expected = 0.5 * (a.square().sum(1) + b.square().sum(1)).mean()
    torch.testing.assert_close(penalized - plain, expected)


def test_auto_backend_on_cpu_is_torch():
    g = _generator()
    a, b = _embeddings(5, 3, g), _embeddings(5, 3, g)
    torch.testing.assert_close(fl.clip_loss(a, b, 3.0), fl.clip_loss(a, b, 3.0, backend="torch"), rtol=0, atol=0)


class TestModules:
    def test_every_module_matches_its_function(self):
        g = _generator()
        a, b = _embeddings(8, 5, g), _embeddings(8, 5, g)
        labels = torch.tensor([0, 1, 0, 1, 2, 2, 3, 0])
        pairs = [
            (fl.ClipLoss()(a, b, 20.0), fl.clip_loss(a, b, 20.0)),
            (fl.SigLipLoss()(a, b, 10.0, -3.0), fl.siglip_loss(a, b, 10.0, -3.0)),
            (fl.InfoNCELoss(0.2, label_smoothing=0.1)(a, b), fl.info_nce(a, b, 0.2, label_smoothing=0.1)),
            (fl.NTXentLoss(0.3, reduction="sum")(a, b), fl.nt_xent(a, b, 0.3, reduction="sum")),
            (fl.SupConLoss(0.2)(a, labels), fl.supcon_loss(a, labels, 0.2)),
            (fl.NPairsLoss(l2_reg=0.1)(a, b), fl.npairs_loss(a, b, l2_reg=0.1)),
        ]
        for got, want in pairs:
            torch.testing.assert_close(got, want, rtol=0, atol=0)

    def test_clip_learnable_scale_starts_like_clip_and_is_capped(self):
        loss = fl.ClipLoss(learn_logit_scale=True)
        assert torch.isclose(loss.learnable_logit_scale(), torch.tensor(1 / 0.07))
        g = _generator()
        a, b = _embeddings(6, 4, g).float(), _embeddings(6, 4, g).float()
        value = loss(a, b)
        torch.testing.assert_close(value, fl.clip_loss(a, b, 1 / 0.07), rtol=1e-5, atol=1e-6)
        value.backward()
        assert loss.learnable_logit_scale.log_scale.grad is not None
        with torch.no_grad():
            loss.learnable_logit_scale.log_scale.fill_(10.0)
        assert loss.learnable_logit_scale().item() == pytest.approx(100.0)
        with pytest.raises(ValueError, match="learns its own"):
            loss(a, b, torch.tensor(3.0))

    def test_siglip_learnable_scale_and_bias(self):
        loss = fl.SigLipLoss(learn_logit_scale=True)
        assert loss.learnable_logit_scale().item() == pytest.approx(10.0)
        assert loss.logit_bias.item() == -10.0
        g = _generator()
        a, b = _embeddings(6, 4, g).float(), _embeddings(6, 4, g).float()
        loss(a, b).backward()
        assert loss.logit_bias.grad is not None and loss.learnable_logit_scale.log_scale.grad is not None
        torch.testing.assert_close(loss(a, b), fl.siglip_loss(a, b, 10.0, -10.0), rtol=1e-5, atol=1e-5)

    def test_learnable_temperature_gets_the_reference_gradient(self):
        temperature = torch.nn.Parameter(torch.tensor(0.1, dtype=torch.float64))
        g = _generator()
        a, b = _embeddings(7, 3, g), _embeddings(7, 3, g)
        (got,) = torch.autograd.grad(fl.InfoNCELoss(temperature)(a, b), temperature)
        (want,) = torch.autograd.grad(reference.info_nce(a, b, temperature), temperature)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("case", LOSS_CASES, ids=lambda c: c.name)
def test_zero_upstream_gradient_gives_zero_gradients(backend, case):
    """(0 * loss).backward(): every gradient exactly 0, never NaN (no 0 * inf in a rescaling)."""
    inputs = {k: (v.float() if v.dim() == 2 else v).requires_grad_(v.is_floating_point())
              for k, v in case.make_inputs(67, 71, 24, _generator()).items()}
    loss = case.call(functional, inputs, backend=backend, **case.option_grid[0])
    leaves = [v for v in inputs.values() if v.requires_grad]
    for grad in torch.autograd.grad(0 * loss, leaves):
        assert torch.equal(grad, torch.zeros_like(grad))


INTEGER_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16,
                  torch.uint32, torch.uint64]


@pytest.mark.parametrize("dtype", INTEGER_DTYPES, ids=str)
def test_integer_targets_and_labels_of_any_dtype_are_class_indices(dtype):
    """As in F.cross_entropy: uint8 targets once indexed as a boolean mask (a wrong loss, silently)
    and int8 ones crashed inside."""
    g = _generator()
    q, k = _embeddings(6, 5, g), _embeddings(9, 5, g)
    targets = torch.tensor([8, 0, 3, 3, 7, 1])
    labels = torch.tensor([2, 0, 2, 1, 0, 1])
    views = torch.tensor([1, 0, 2, 2, 0, 1])  # every label twice
    pairs = [
        (fl.info_nce(q, k, 0.1, targets=targets.to(dtype)), reference.info_nce(q, k, 0.1, targets=targets)),
        (fl.InfoNCELoss(0.2)(q, k, targets.to(dtype)), reference.info_nce(q, k, 0.2, targets=targets)),
        (fl.supcon_loss(q, labels.to(dtype)), reference.supcon_loss(q, labels)),
        (fl.SupConLoss(0.3)(q, labels.to(dtype)), reference.supcon_loss(q, labels, 0.3)),
    ]
    for adapter, these in ((pml.NTXentLoss(0.3), views), (pml.SupConLoss(), labels), (pml.NPairsLoss(), labels)):
        pairs.append((adapter(q, these.to(dtype)), adapter(q, these)))
    for got, want in pairs:
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_losses_never_go_below_zero():
    """Identical pairs at scale 100 in float32: the log-sum-exp and the positive logit round
    differently (the losses went down to -5e-5). Every loss here is >= 0 exactly; the gradients
    stay those of the float64 reference. (The correction is in the loss terms, the same for every
    backend.)"""
    backend = "torch"
    g = _generator()
    x = torch.randn(16, 64, generator=g)
    near = x + 1e-4 * torch.randn(16, 64, generator=g)
    classes = torch.arange(32) % 16
    losses = {  # (lib, a) -> per-item losses
        "clip": lambda lib, a: lib.clip_loss(a, x.to(a.dtype), 100.0, reduction="none", **lib.options),
        "info_nce": lambda lib, a: lib.info_nce(a, x.to(a.dtype), 0.01, reduction="none", **lib.options),
        "nt_xent": lambda lib, a: lib.nt_xent(a, x.to(a.dtype), 0.01, reduction="none", **lib.options),
        "supcon": lambda lib, a: lib.supcon_loss(torch.cat([a, x.to(a.dtype)]), classes, 0.01,
                                                 reduction="none", **lib.options),
        "npairs": lambda lib, a: lib.npairs_loss(a, x.to(a.dtype), temperature=0.01, reduction="none",
                                                 **lib.options),
        "siglip": lambda lib, a: lib.siglip_loss(a, x.to(a.dtype), 100.0, -50.0, reduction="none",
                                                 **lib.options),
        "cosine_embedding": lambda lib, a: lib.cosine_embedding_loss(a, near.to(a.dtype), torch.ones(16),
                                                                     reduction="none"),
    }
    ours, theirs = _Library(functional, backend=backend), _Library(reference)
    for name, loss in losses.items():
        a, a64 = x.clone().requires_grad_(True), x.double().requires_grad_(True)
        value = loss(ours, a)
        assert value.min() >= 0, name
        (got,) = torch.autograd.grad(value.sum(), a)
        (want,) = torch.autograd.grad(loss(theirs, a64).sum(), a64)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * (1 + want.abs().max().item()),
                                   msg=lambda m: f"gradient of {name}: {m}")
    per_anchor = pml.SupConLoss(0.01, reducer=DoNothingReducer())(torch.cat([x, x]), classes)
    assert per_anchor["loss"]["losses"].min() >= 0, "pytorch-metric-learning SupConLoss"


class _Library:
    """A module of losses (``functional`` or ``reference``) and the options its losses take."""

    def __init__(self, module, **options):
        self.module, self.options = module, options

    def __getattr__(self, name):
        return getattr(self.module, name)


def test_nonnegative_sets_rounding_below_zero_to_zero_and_keeps_the_gradient():
    loss = torch.tensor([-3e-5, 0.0, 2.0, float("nan"), float("inf")], requires_grad=True)
    value = functional.nonnegative(loss)
    assert value[0].item() == 0.0 and value[1:3].tolist() == [0.0, 2.0]
    assert value[3].isnan() and value[4].isinf()
    (grad,) = torch.autograd.grad((value * torch.arange(1.0, 6.0)).sum(), loss)
    assert grad.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
