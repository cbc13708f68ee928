"""The drop-in adapters of fused_losses.integrations against the real classes they imitate, in one
process (the distributed modes are in test_distributed.py): value and the gradient of every
floating input, in float64."""

import pytest
import torch

from fused_losses.integrations import lightly as fused_lightly
from fused_losses.integrations import open_clip as fused_open_clip
from fused_losses.integrations import pytorch_metric_learning as fused_pml
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


@pytest.mark.parametrize("make,match", [
    (lambda: fused_open_clip.ClipLoss(use_horovod=True), "use_horovod=True is not supported"),
    (lambda: fused_open_clip.SigLipLoss(dist_impl="ring"), "dist_impl must be None or one of"),
])
def test_open_clip_unsupported_options_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_open_clip_world_size_must_match_torch_distributed():
    features = torch.randn(4, 3)
    with pytest.raises(ValueError, match="rank=1 and world_size=2 must match .* not initialized"):
        fused_open_clip.ClipLoss(local_loss=True, gather_with_grad=True, rank=1, world_size=2)(
            features, features, 10.0)


# pytorch-metric-learning


def _shuffled_pair_labels(gen, pairs):
    """Every label exactly twice, in random order."""
    return torch.arange(pairs).repeat(2)[torch.randperm(2 * pairs, generator=gen)] * 3 + 1


def test_pml_nt_xent_loss(gen):
    labels = _shuffled_pair_labels(gen, 6)
    theirs = peers.pml_loss("NTXentLoss")(temperature=0.2)
    assert_same_loss_and_grads(lambda x: fused_pml.NTXentLoss(temperature=0.2)(x, labels),
                               lambda x: theirs(x, labels), [_randn(gen, 12, 5)])


def test_pml_nt_xent_loss_default_temperature(gen):
    labels = _shuffled_pair_labels(gen, 4)
    theirs = peers.pml_loss("NTXentLoss")()
    assert_same_loss_and_grads(lambda x: fused_pml.NTXentLoss()(x, labels), lambda x: theirs(x, labels),
                               [_randn(gen, 8, 5)])


@pytest.mark.parametrize("labels", [[0, 0, 1, 1, 1, 2], [0, 1, 2, 3], [0, 0, 1, 2]])
def test_pml_nt_xent_loss_needs_each_label_twice(labels):
    with pytest.raises(ValueError, match="every label exactly twice"):
        fused_pml.NTXentLoss()(torch.randn(len(labels), 3), torch.tensor(labels))


@pytest.mark.parametrize("n", [7, 20])
def test_pml_supcon_loss(gen, n):
    labels = torch.randint(0, 3, (n,), generator=gen)
    labels[0] = 99  # an anchor without a positive
    theirs = peers.pml_loss("SupConLoss")(temperature=0.15)
    assert_same_loss_and_grads(lambda x: fused_pml.SupConLoss(temperature=0.15)(x, labels),
                               lambda x: theirs(x, labels), [_randn(gen, n, 4)])


@pytest.mark.parametrize("labels", [[5, 5, 5, 5], [0, 1, 2]], ids=["one label", "no positive"])
def test_pml_supcon_loss_without_negatives_or_positives_is_zero(gen, labels):
    labels = torch.tensor(labels)
    theirs = peers.pml_loss("SupConLoss")()
    assert_same_loss_and_grads(lambda x: fused_pml.SupConLoss()(x, labels), lambda x: theirs(x, labels),
                               [_randn(gen, len(labels), 4)])


@pytest.mark.parametrize("labels", [
    [3, 1, 3, 1, 0, 0],            # pairs
    [2, 0, 2, 1, 0, 2, 5, 0, 1],   # labels three times and once: first two occurrences pair up
    [0, 1, 2, 3],                  # no pair: zero, like pytorch-metric-learning
])
def test_pml_npairs_loss(gen, labels):
    labels = torch.tensor(labels)
    theirs = peers.pml_loss("NPairsLoss")()
    assert_same_loss_and_grads(lambda x: fused_pml.NPairsLoss()(x, labels), lambda x: theirs(x, labels),
                               [_randn(gen, len(labels), 4)])


@pytest.mark.parametrize("argument", ["indices_tuple", "ref_emb", "ref_labels"])
def test_pml_miners_and_reference_embeddings_raise(argument):
    x, labels = torch.randn(4, 3), torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match=f"{argument} is not supported"):
        fused_pml.SupConLoss()(x, labels, **{argument: (labels,)})


def test_pml_labels_are_checked():
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        fused_pml.NPairsLoss()(torch.randn(4, 3), torch.tensor([0, 0, 1]))


# lightly


def test_lightly_nt_xent_loss(gen):
    theirs = peers.lightly_ntxent_loss()(temperature=0.3)
    assert_same_loss_and_grads(fused_lightly.NTXentLoss(temperature=0.3), theirs,
                               [_randn(gen, 8, 5), _randn(gen, 8, 5)])


@pytest.mark.parametrize("size", [0, (0, 16)])
def test_lightly_memory_bank_disabled_is_accepted(size):
    assert fused_lightly.NTXentLoss(memory_bank_size=size).memory_bank_size == size


@pytest.mark.parametrize("size", [4096, (4096, 128)])
def test_lightly_memory_bank_raises(size):
    with pytest.raises(ValueError, match="memory_bank_size must be 0"):
        fused_lightly.NTXentLoss(memory_bank_size=size)
