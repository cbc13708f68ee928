"""fused_losses.reference against independent implementations: torch.nn, pytorch-metric-learning,
open_clip and lightly.

Everything runs in float64 and compares the forward value and the gradient of every floating input,
0-d temperature / scale / bias tensors included, at tight tolerances. Each test case draws its
inputs from a fresh random seed, which pytest shows (captured stdout) when the case fails.
"""

import pytest
import torch
import torch.nn.functional as F

from fused_losses import reference
from tests import peers

SIZES = [(2, 3), (7, 16), (33, 65)]  # (N, D)
REDUCTIONS = ["mean", "sum", "none"]
TOLERANCE = dict(rtol=1e-10, atol=1e-12)


def embeddings(gen, n, d):
    """(n, d) random rows of norm about 2 (not 1, so that normalization shows in the gradients)."""
    return 2 * torch.randn(n, d, generator=gen, dtype=torch.float64) / d ** 0.5


def scalar(value):
    return torch.tensor(value, dtype=torch.float64)


def unit_if(normalize, x):
    """What the peers that take features as given (open_clip, torch) must be fed for ``normalize``."""
    return F.normalize(x, dim=-1) if normalize else x


def pml_reducer(reduction):
    """The pytorch-metric-learning reducer for ``reduction``; None keeps the loss's default (mean)."""
    reducers = peers.pml_module("reducers")
    return {"mean": None, "sum": reducers.SumReducer(), "none": reducers.DoNothingReducer()}[reduction]


def pml_distance(normalize):
    """pytorch-metric-learning's dot-product similarity, with or without its own normalization."""
    return peers.pml_module("distances").DotProductSimilarity(normalize_embeddings=normalize)


def pml_output(output):
    """A pytorch-metric-learning loss output as a tensor: a reduced loss stays as it is; the
    DoNothingReducer's dict becomes the per-item losses sorted by their (first) index."""
    if torch.is_tensor(output):
        return output
    losses, indices = output["loss"]["losses"], output["loss"]["indices"]
    first_indices = indices[0] if isinstance(indices, tuple) else indices
    return losses[first_indices.argsort()]


def fresh_leaves(inputs):
    """Detached copies of ``inputs``; the floating ones require grad."""
    return [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]


def input_grads(value, leaves, upstream):
    """Gradient of (value * upstream).sum() w.r.t. each leaf that requires grad (zeros if unused)."""
    differentiable = [x for x in leaves if x.requires_grad]
    return torch.autograd.grad(value, differentiable, upstream, materialize_grads=True)


def assert_parity(ours, peer, inputs, gen, tolerance=TOLERANCE):
    """ours(*inputs) and peer(*inputs) agree in value and in the gradient w.r.t. each floating input.

    Non-scalar outputs are contracted with one random upstream gradient in [-1, 1]. An input that a
    loss leaves out of its graph (e.g. a peer's loss that is identically zero) has zero gradient.
    """
    ours_leaves, peer_leaves = fresh_leaves(inputs), fresh_leaves(inputs)
    ours_value, peer_value = ours(*ours_leaves), peer(*peer_leaves)
    torch.testing.assert_close(ours_value, peer_value, **tolerance)

    # Bounded: pytorch-metric-learning's SupConLoss divides anchors without positives by the
    # smallest normal float, and an upstream gradient above 4 there overflows to nan.
    upstream = 2 * torch.rand(ours_value.shape, generator=gen, dtype=torch.float64) - 1
    ours_grads = input_grads(ours_value, ours_leaves, upstream)
    peer_grads = input_grads(peer_value, peer_leaves, upstream)
    for position, (ours_grad, peer_grad) in enumerate(zip(ours_grads, peer_grads)):
        torch.testing.assert_close(ours_grad, peer_grad, **tolerance,
                                   msg=lambda detail: f"gradient of floating input {position}: {detail}")


# CLIP


@pytest.mark.parametrize("n, d", SIZES)
@pytest.mark.parametrize("normalize", [True, False])
def test_clip_loss_matches_open_clip(n, d, normalize, gen):
    ClipLoss = peers.open_clip_loss("ClipLoss")
    assert_parity(
        lambda image, text, scale: reference.clip_loss(image, text, scale, normalize=normalize),
        lambda image, text, scale: ClipLoss()(unit_if(normalize, image), unit_if(normalize, text), scale),
        [embeddings(gen, n, d), embeddings(gen, n, d), scalar(1 / 0.07)], gen)


def test_clip_loss_with_zero_features_matches_open_clip(gen):
    """Zero rows: normalization divides by max(|x|, 1e-12), so their gradients are scaled by 1e12."""
    ClipLoss = peers.open_clip_loss("ClipLoss")
    image, text = embeddings(gen, 5, 8), embeddings(gen, 5, 8)
    image[1] = text[3] = 0
    assert_parity(
        reference.clip_loss,
        lambda image, text, scale: ClipLoss()(unit_if(True, image), unit_if(True, text), scale),
        [image, text, scalar(1 / 0.07)], gen)


@pytest.mark.parametrize("n, d", SIZES)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_clip_loss_matches_torch_cross_entropy(n, d, label_smoothing, reduction, gen):
    def torch_clip_loss(image, text, scale):
        logits = scale * unit_if(True, image) @ unit_if(True, text).T
        cross_entropy = torch.nn.CrossEntropyLoss(label_smoothing=label_smoothing, reduction=reduction)
        targets = torch.arange(n)
        return (cross_entropy(logits, targets) + cross_entropy(logits.T, targets)) / 2

    assert_parity(
        lambda image, text, scale: reference.clip_loss(
            image, text, scale, label_smoothing=label_smoothing, reduction=reduction),
        torch_clip_loss,
        [embeddings(gen, n, d), embeddings(gen, n, d), scalar(1 / 0.07)], gen)


# InfoNCE


@pytest.mark.parametrize("n, d", SIZES)
@pytest.mark.parametrize("extra_negatives", [0, 5])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("explicit_targets", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_info_nce_matches_torch_cross_entropy(n, d, extra_negatives, label_smoothing, reduction,
                                              explicit_targets, normalize, gen):
    m = n + extra_negatives
    targets = torch.randperm(m, generator=gen)[:n] if explicit_targets else torch.arange(n)

    def torch_info_nce(query, keys, temperature):
        logits = unit_if(normalize, query) @ unit_if(normalize, keys).T / temperature
        return F.cross_entropy(logits, targets, label_smoothing=label_smoothing, reduction=reduction)

    assert_parity(
        lambda query, keys, temperature: reference.info_nce(
            query, keys, temperature, targets=targets if explicit_targets else None,
            label_smoothing=label_smoothing, normalize=normalize, reduction=reduction),
        torch_info_nce,
        [embeddings(gen, n, d), embeddings(gen, m, d), scalar(0.07)], gen)


# NT-Xent


@pytest.mark.parametrize("n, d", SIZES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("normalize", [True, False])
def test_nt_xent_matches_pytorch_metric_learning(n, d, reduction, normalize, gen):
    NTXentLoss = peers.pml_loss("NTXentLoss")
    pair_labels = torch.arange(n).repeat(2)

    def pml_nt_xent(z1, z2, temperature):
        loss = NTXentLoss(temperature=temperature, distance=pml_distance(normalize),
                          reducer=pml_reducer(reduction))
        return pml_output(loss(torch.cat([z1, z2]), pair_labels))

    assert_parity(
        lambda z1, z2, temperature: reference.nt_xent(
            z1, z2, temperature, normalize=normalize, reduction=reduction),
        pml_nt_xent,
        [embeddings(gen, n, d), embeddings(gen, n, d), scalar(0.5)], gen)


@pytest.mark.parametrize("n, d", SIZES)
def test_nt_xent_matches_lightly(n, d, gen):
    NTXentLoss = peers.lightly_ntxent_loss()
    assert_parity(
        reference.nt_xent,
        lambda z1, z2, temperature: NTXentLoss(temperature=temperature)(z1, z2),
        [embeddings(gen, n, d), embeddings(gen, n, d), scalar(0.3)], gen)


# SupCon


@pytest.mark.parametrize("n, d", [(3, 3), (7, 16), (33, 65)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("normalize", [True, False])
def test_supcon_loss_matches_pytorch_metric_learning(n, d, reduction, normalize, gen):
    SupConLoss = peers.pml_loss("SupConLoss")
    labels = torch.randint(0, max(2, n // 3), (n,), generator=gen)
    # Anchor 0 gets a class of its own, so it has no positive; this also guarantees a negative pair,
    # without which pytorch-metric-learning returns 0 instead of the loss. Anchors 1 and 2 are
    # positives of each other, so the loss is not empty (that case has its own test).
    labels[0], labels[2] = n, labels[1]

    def pml_supcon(features, temperature):
        loss = SupConLoss(temperature=temperature, distance=pml_distance(normalize),
                          reducer=pml_reducer(reduction))
        return pml_output(loss(features, labels))

    assert_parity(
        lambda features, temperature: reference.supcon_loss(
            features, labels, temperature, normalize=normalize, reduction=reduction),
        pml_supcon,
        # Logits of at most a few tens: with gaps beyond ~37 a loss rounds to exactly 0 and then
        # drops out of the peer's mean (AvgNonZeroReducer), not out of the reference's.
        [embeddings(gen, n, d), scalar(0.1 if normalize else 1.0)], gen)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_supcon_loss_without_any_positive_is_zero_like_pytorch_metric_learning(reduction, gen):
    SupConLoss = peers.pml_loss("SupConLoss")
    labels = torch.arange(6)

    def pml_supcon(features, temperature):
        return SupConLoss(temperature=temperature, reducer=pml_reducer(reduction))(features, labels)

    assert_parity(
        lambda features, temperature: reference.supcon_loss(
            features, labels, temperature, reduction=reduction),
        pml_supcon,
        [embeddings(gen, 6, 4), scalar(0.1)], gen)


# N-pairs


@pytest.mark.parametrize("n, d", SIZES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("normalize", [True, False])
def test_npairs_loss_matches_pytorch_metric_learning(n, d, reduction, normalize, gen):
    NPairsLoss = peers.pml_loss("NPairsLoss")
    pair_labels = torch.arange(n).repeat(2)

    def pml_npairs(anchors, positives):
        loss = NPairsLoss(distance=pml_distance(normalize), reducer=pml_reducer(reduction))
        return pml_output(loss(torch.cat([anchors, positives]), pair_labels))

    assert_parity(
        lambda anchors, positives: reference.npairs_loss(
            anchors, positives, normalize=normalize, reduction=reduction),
        pml_npairs,
        [embeddings(gen, n, d), embeddings(gen, n, d)], gen)


@pytest.mark.parametrize("n, d", SIZES)
def test_npairs_loss_sohn_form_matches_pytorch_metric_learning(n, d, gen):
    """normalize=False, a temperature and an L2 penalty, against NPairsLoss with an LpRegularizer.

    The peer has no temperature: the anchors are divided by it instead. Its regularizer averages
    |e|^2 over all 2N embeddings, so Sohn's per-anchor weight l2_reg is 2 * l2_reg there.
    """
    NPairsLoss = peers.pml_loss("NPairsLoss")
    LpRegularizer = peers.pml_module("regularizers").LpRegularizer
    pair_labels = torch.arange(n).repeat(2)
    l2_reg = 0.02

    def pml_npairs(anchors, positives, temperature):
        loss = NPairsLoss(distance=pml_distance(False))
        regularizer = LpRegularizer(p=2, power=2)
        return (loss(torch.cat([anchors / temperature, positives]), pair_labels)
                + 2 * l2_reg * regularizer(torch.cat([anchors, positives])))

    assert_parity(
        lambda anchors, positives, temperature: reference.npairs_loss(
            anchors, positives, temperature=temperature, normalize=False, l2_reg=l2_reg),
        pml_npairs,
        [embeddings(gen, n, d), embeddings(gen, n, d), scalar(0.5)], gen)


# SigLIP


@pytest.mark.parametrize("n, d", SIZES)
@pytest.mark.parametrize("normalize", [True, False])
def test_siglip_loss_matches_open_clip(n, d, normalize, gen):
    SigLipLoss = peers.open_clip_loss("SigLipLoss")
    assert_parity(
        lambda image, text, scale, bias: reference.siglip_loss(image, text, scale, bias, normalize=normalize),
        lambda image, text, scale, bias: SigLipLoss()(
            unit_if(normalize, image), unit_if(normalize, text), scale, bias),
        [embeddings(gen, n, d), embeddings(gen, n, d), scalar(10.0), scalar(-10.0)], gen)


@pytest.mark.parametrize("n, d", SIZES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_siglip_loss_matches_torch_binary_cross_entropy(n, d, reduction, gen):
    def torch_siglip_loss(image, text, scale, bias):
        logits = scale * unit_if(True, image) @ unit_if(True, text).T + bias
        per_pair = F.binary_cross_entropy_with_logits(
            logits, torch.eye(n, dtype=logits.dtype), reduction="none")
        return {"none": per_pair.sum(dim=1), "sum": per_pair.sum(), "mean": per_pair.sum() / n}[reduction]

    assert_parity(
        lambda image, text, scale, bias: reference.siglip_loss(image, text, scale, bias, reduction=reduction),
        torch_siglip_loss,
        [embeddings(gen, n, d), embeddings(gen, n, d), scalar(10.0), scalar(-10.0)], gen)


# Cosine embedding


@pytest.mark.parametrize("n, d", SIZES)
@pytest.mark.parametrize("margin", [0.0, 0.25, -0.3])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cosine_embedding_loss_matches_torch(n, d, margin, reduction, gen):
    target = torch.randint(0, 2, (n,), generator=gen) * 2 - 1
    assert_parity(
        lambda x1, x2: reference.cosine_embedding_loss(x1, x2, target, margin=margin, reduction=reduction),
        lambda x1, x2: F.cosine_embedding_loss(x1, x2, target, margin=margin, reduction=reduction),
        [embeddings(gen, n, d), embeddings(gen, n, d)], gen)


def test_cosine_embedding_loss_of_zero_vectors_matches_torch(gen):
    """Zero rows, where only the 1e-12 guard of the norms keeps cos finite (gradients ~1e6).

    torch's guard is the float32 constant 1e-12 (9.99999996e-13), the reference's the float64
    1e-12: the gradients through a zero row differ by ~2e-9 relative, hence the looser rtol.
    """
    x1, x2 = embeddings(gen, 4, 5), embeddings(gen, 4, 5)
    x1[0] = x2[1] = 0
    target = torch.tensor([-1, -1, 1, -1])
    assert_parity(
        lambda x1, x2: reference.cosine_embedding_loss(x1, x2, target, margin=-0.3),
        lambda x1, x2: F.cosine_embedding_loss(x1, x2, target, margin=-0.3),
        [x1, x2], gen, tolerance=dict(rtol=1e-8, atol=1e-12))
