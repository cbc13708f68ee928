"""The open_clip and lightly drop-ins of fused_losses.integrations against the real classes they
imitate, in one process (the distributed modes are in test_distributed.py; pytorch-metric-learning
in test_integrations_pml.py): value and the gradient of every floating input, in float64."""

import pytest
import torch

from fused_losses.integrations import _fallback
from fused_losses.integrations import lightly as fused_lightly
from fused_losses.integrations import open_clip as fused_open_clip
from fused_losses.integrations import FallbackWarning
from tests import peers

TOLERANCE = dict(rtol=1e-10, atol=1e-12)


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def assert_same_loss_and_grads(ours, theirs, inputs):
    """ours(*inputs) == theirs(*inputs), and so are the gradients of every floating input."""
    leaves = [[x.clone().requires_grad_(x.is_floating_point()) for x in inputs] for _ in range(2)]
    values = [fn(*xs) for fn, xs in zip((ours, theirs), leaves)]
    torch.testing.assert_close(values[0], values[1], **TOLERANCE)
    grads = [torch.autograd.grad(value, [x for x in xs if x.requires_grad], allow_unused=True,
                                 materialize_grads=True) for value, xs in zip(values, leaves)]
    for position, (our_grad, their_grad) in enumerate(zip(*grads)):
        torch.testing.assert_close(our_grad, their_grad, **TOLERANCE,
                                   msg=lambda m: f"gradient of floating input {position}: {m}")


# open_clip


@pytest.mark.parametrize("with_bias", [False, True])
def test_open_clip_clip_loss(gen, with_bias):
    theirs = peers.open_clip_loss("ClipLoss")()
    ours = fused_open_clip.ClipLoss()
    bias = [torch.tensor(-2.0, dtype=torch.float64)] if with_bias else []
    assert_same_loss_and_grads(ours, theirs, [_randn(gen, 9, 5), _randn(gen, 9, 5),
                                              torch.tensor(20.0, dtype=torch.float64), *bias])


def test_open_clip_siglip_loss(gen):
    assert_same_loss_and_grads(
        fused_open_clip.SigLipLoss(), peers.open_clip_loss("SigLipLoss")(),
        [_randn(gen, 9, 5), _randn(gen, 9, 5), torch.tensor(10.0, dtype=torch.float64),
         torch.tensor(-10.0, dtype=torch.float64)])


def test_open_clip_siglip_loss_without_bias(gen):
    ours, theirs = fused_open_clip.SigLipLoss(), peers.open_clip_loss("SigLipLoss")()
    assert_same_loss_and_grads(
        lambda image, text, scale: ours(image, text, scale, None),
        lambda image, text, scale: theirs(image, text, scale, None),
        [_randn(gen, 6, 5), _randn(gen, 6, 5), torch.tensor(10.0, dtype=torch.float64)])


def test_open_clip_output_dict(gen):
    image, text, scale = _randn(gen, 4, 3), _randn(gen, 4, 3), torch.tensor(5.0, dtype=torch.float64)
    for ours, theirs, extra in (
            (fused_open_clip.ClipLoss(), peers.open_clip_loss("ClipLoss")(), ()),
            (fused_open_clip.SigLipLoss(), peers.open_clip_loss("SigLipLoss")(),
             (torch.tensor(-1.0, dtype=torch.float64),))):
        got = ours(image, text, scale, *extra, output_dict=True)
        want = theirs(image, text, scale, *extra, output_dict=True)
        assert got.keys() == want.keys() == {"contrastive_loss"}
        torch.testing.assert_close(got["contrastive_loss"], want["contrastive_loss"], **TOLERANCE)


@pytest.mark.parametrize("options", [
    dict(local_loss=True, gather_with_grad=True, cache_labels=True, rank=0, world_size=1),
    dict(local_loss=False, gather_with_grad=False, cache_labels=False, use_horovod=True),
])
def test_open_clip_clip_loss_options_on_one_process(gen, options):
    """Every constructor argument; on one process none changes the loss (horovod included)."""
    assert_same_loss_and_grads(
        fused_open_clip.ClipLoss(**options), peers.open_clip_loss("ClipLoss")(**options),
        [_randn(gen, 7, 5), _randn(gen, 7, 5), torch.tensor(12.0, dtype=torch.float64)])


@pytest.mark.parametrize("dist_impl", [None, "bidir", "shift", "reduce", "gather"])
def test_open_clip_siglip_loss_options_on_one_process(gen, dist_impl):
    options = dict(cache_labels=True, rank=0, world_size=1, dist_impl=dist_impl)
    assert_same_loss_and_grads(
        fused_open_clip.SigLipLoss(**options), peers.open_clip_loss("SigLipLoss")(**options),
        [_randn(gen, 6, 4), _randn(gen, 6, 4), torch.tensor(8.0, dtype=torch.float64),
         torch.tensor(-4.0, dtype=torch.float64)])


def test_open_clip_horovod_over_ranks_is_computed_by_open_clip(monkeypatch):
    """Gathering through horovod is open_clip's: its ClipLoss runs (and, without horovod
    installed, stops at its own check), after a FallbackWarning."""
    monkeypatch.setattr(fused_open_clip, "original_class",
                        lambda module, name, option: peers.open_clip_loss(name))
    loss = fused_open_clip.ClipLoss(use_horovod=True, rank=1, world_size=2)
    features = torch.randn(4, 3)
    with pytest.warns(FallbackWarning, match="use_horovod=True with world_size > 1 is not fused"):
        with pytest.raises(AssertionError, match="Please install horovod"):
            loss(features, features, 10.0)


def test_original_class_that_cannot_be_imported_names_the_option():
    with pytest.raises(ImportError, match="use_horovod=True is computed by no_such_library.loss."
                       "ClipLoss, which failed to import"):
        _fallback.original_class("no_such_library.loss", "ClipLoss", "use_horovod=True")


def test_open_clip_unknown_dist_impl_raises():
    with pytest.raises(ValueError, match="dist_impl must be None or one of"):
        fused_open_clip.SigLipLoss(dist_impl="ring")


def test_open_clip_world_size_must_match_torch_distributed():
    features = torch.randn(4, 3)
    with pytest.raises(ValueError, match="rank=1 and world_size=2 must match .* not initialized"):
        fused_open_clip.ClipLoss(local_loss=True, gather_with_grad=True, rank=1, world_size=2)(
            features, features, 10.0)


# lightly


def test_lightly_nt_xent_loss(gen):
    theirs = peers.lightly_ntxent_loss()(temperature=0.3)
    assert_same_loss_and_grads(fused_lightly.NTXentLoss(temperature=0.3), theirs,
                               [_randn(gen, 8, 5), _randn(gen, 8, 5)])


@pytest.mark.parametrize("size", [0, (0, 16)])
def test_lightly_memory_bank_disabled(gen, size):
    assert not fused_lightly.NTXentLoss(memory_bank_size=size).memory_bank.enabled
    assert_same_loss_and_grads(fused_lightly.NTXentLoss(memory_bank_size=size),
                               peers.lightly_ntxent_loss()(memory_bank_size=size),
                               [_randn(gen, 5, 3), _randn(gen, 5, 3)])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lightly_memory_bank(gen, dtype):
    """Steps of 7 rows into a bank of 16 (it wraps, dropping the rows past its end), with and
    without an update: the same bank, losses and gradients as lightly's."""
    seed = int(torch.randint(0, 2**31, (), generator=gen))
    losses = []
    for make in (fused_lightly.NTXentLoss, peers.lightly_ntxent_loss()):
        torch.manual_seed(seed)  # both banks start from the same random rows
        losses.append(make(temperature=0.2, memory_bank_size=(16, 5)).to(dtype))
    ours, theirs = losses
    torch.testing.assert_close(ours.memory_bank.bank, theirs.memory_bank.bank, rtol=0, atol=0)
    tolerance = TOLERANCE if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    for step in range(5):
        views = [torch.randn(7, 5, generator=gen, dtype=dtype) for _ in range(2)]
        if step == 3:  # out0 without a gradient: the bank is not updated
            torch.testing.assert_close(ours(*views), theirs(*views), **tolerance)
            continue
        leaves = [[v.clone().requires_grad_(True) for v in views] for _ in range(2)]
        values = [loss(*xs) for loss, xs in zip((ours, theirs), leaves)]
        torch.testing.assert_close(values[0], values[1], **tolerance)
        for got, want in zip(*(torch.autograd.grad(v, xs) for v, xs in zip(values, leaves))):
            torch.testing.assert_close(got, want, **tolerance)
        torch.testing.assert_close(ours.memory_bank.bank, theirs.memory_bank.bank, **tolerance)
        assert int(ours.memory_bank.bank_ptr) == int(theirs.memory_bank.bank_ptr)


@pytest.mark.parametrize("options,match", [
    (dict(temperature=1e-9), r"Illegal temperature: abs\(1e-09\) < 1e-8"),
    (dict(memory_bank_size=4096), "does not specify the feature dimension"),
    (dict(memory_bank_size=(-1, 8)), "all entries must be non-negative"),
    (dict(memory_bank_size=(16, 8, 2)), r"expected a \(num_features, dim\) tuple"),
])
def test_lightly_constructor_checks(options, match):
    for make in (fused_lightly.NTXentLoss, peers.lightly_ntxent_loss()):
        with pytest.raises(ValueError, match=match):
            make(**options)


def test_lightly_gather_distributed_needs_torch_distributed(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_available", lambda: False)
    with pytest.raises(ValueError, match="gather_distributed is True but torch.distributed is not"):
        fused_lightly.NTXentLoss(gather_distributed=True)


def test_lightly_memory_bank_of_another_dim_raises():
    loss = fused_lightly.NTXentLoss(memory_bank_size=(8, 4))
    with pytest.raises(ValueError, match=r"memory_bank_size \(8, 4\) holds rows of dim 4, but out0 has dim 3"):
        loss(torch.randn(2, 3), torch.randn(2, 3))


def test_lightly_negative_temperature_is_computed_by_lightly(gen, monkeypatch):
    monkeypatch.setattr(fused_lightly, "original_class",
                        lambda module, name, option: peers.lightly_ntxent_loss())
    ours, theirs = fused_lightly.NTXentLoss(temperature=-0.5), peers.lightly_ntxent_loss()(temperature=-0.5)
    with pytest.warns(FallbackWarning, match=r"temperature=-0.5 \(negative\) is not fused"):
        assert_same_loss_and_grads(ours, theirs, [_randn(gen, 6, 4), _randn(gen, 6, 4)])


def test_lightly_memory_bank_enqueues_the_rows_of_every_rank(gen, monkeypatch):
    """With gather_distributed, the bank takes every rank's normalized out1 rows in rank order
    (here a stand-in gather: this rank's rows, then another rank's)."""
    other_rank = torch.nn.functional.normalize(torch.randn(3, 4, generator=gen), dim=1)
    monkeypatch.setattr(fused_lightly.distributed, "gather_rows", lambda x: fused_lightly.distributed.
                        GatheredRows(torch.cat([x, other_rank]), 0, [x.shape[0], 3]))
    loss = fused_lightly.NTXentLoss(memory_bank_size=(10, 4), gather_distributed=True)
    out0, out1 = torch.randn(3, 4, generator=gen, requires_grad=True), torch.randn(3, 4, generator=gen)
    loss(out0, out1)
    expected = torch.cat([torch.nn.functional.normalize(out1, dim=1), other_rank])
    torch.testing.assert_close(loss.memory_bank.bank[:6], expected)
    assert int(loss.memory_bank.bank_ptr) == 6
