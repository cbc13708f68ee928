"""The pytorch-metric-learning drop-ins against pytorch-metric-learning itself: every option of
NTXentLoss, SupConLoss and NPairsLoss, the value and the gradient of every floating input, float64
and float32; that the fused path is taken where promised (no FallbackWarning, the distance never
forms its N x M matrix) and the original where not (a FallbackWarning naming the option, the
original's exact numbers); and inside pytorch-metric-learning's CrossBatchMemory and
SelfSupervisedLoss."""

import copy
import warnings

import pytest
import torch

from tests import peers

pml_losses = peers.pml_module("losses")
pml_distances = peers.pml_module("distances")
pml_reducers = peers.pml_module("reducers")
pml_regularizers = peers.pml_module("regularizers")
pml_miners = peers.pml_module("miners")

from fused_losses.integrations import pytorch_metric_learning as fused_pml  # noqa: E402 (needs PML)
from fused_losses.integrations import FallbackWarning  # noqa: E402

LOSSES = ["NTXentLoss", "SupConLoss", "NPairsLoss"]
PAIR_LOSSES = ["NTXentLoss", "SupConLoss"]
TOLERANCE = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-6)}

FUSED_DISTANCES = {
    "default": lambda: None,
    "cosine": lambda: pml_distances.CosineSimilarity(),
    "dot": lambda: pml_distances.DotProductSimilarity(),
    "dot-unnormalized": lambda: pml_distances.DotProductSimilarity(normalize_embeddings=False),
    "squared-l2": lambda: pml_distances.LpDistance(power=2),
    "squared-l2-unnormalized": lambda: pml_distances.LpDistance(power=2, normalize_embeddings=False),
}
OTHER_DISTANCES = {
    "l2": (lambda: pml_distances.LpDistance(), "distance=LpDistance"),
    "cosine-squared": (lambda: pml_distances.CosineSimilarity(power=2), "power=2"),
    "cosine-l1": (lambda: pml_distances.CosineSimilarity(p=1), "p=1"),
    "snr": (lambda: pml_distances.SNRDistance(), "distance=SNRDistance"),
}


def _pair(name, **options):
    """(ours, theirs): the drop-in and pytorch-metric-learning's class with the same options."""
    theirs = getattr(pml_losses, name)(**copy.deepcopy(options))
    return getattr(fused_pml, name)(**options), theirs


def _options(name, distance=None, **options):
    if distance is not None:
        options["distance"] = distance
    if name != "NPairsLoss":
        unnormalized = distance is not None and not distance.normalize_embeddings
        options.setdefault("temperature", 4.0 if unnormalized else 0.2)
    return options


def _labels(gen, n, classes=4):
    labels = torch.randint(0, classes, (n,), generator=gen)
    labels[0] = classes + 7  # a label without a positive
    return labels


def _fused_only(loss):
    """Make ``loss`` (or the loss a wrapper holds) fail if it forms its distance matrix."""
    def no_matrix(*_):
        raise AssertionError("the fused path formed the N x M distance matrix")
    getattr(loss, "loss", loss).distance.compute_mat = no_matrix
    return loss


def _call(loss, inputs, **keywords):
    """loss(*inputs, **keywords) and the gradients of its floating inputs."""
    leaves = [x.clone().requires_grad_(True) if x.is_floating_point() else x for x in inputs]
    value = loss(*leaves, **keywords)
    floating = [x for x in leaves if x.requires_grad]
    return value, torch.autograd.grad(value, floating, allow_unused=True, materialize_grads=True)


def assert_same(ours, theirs, inputs, dtype=torch.float64, fused=True, **keywords):
    """Same value and gradients; with ``fused``, without a fallback and without the N x M matrix."""
    if fused:
        _fused_only(ours)
    with warnings.catch_warnings():
        if fused:
            warnings.simplefilter("error", FallbackWarning)
        got = _call(ours, inputs, **keywords)
    want = _call(theirs, inputs, **keywords)
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(got[0], want[0], **tolerance)
    for got_grad, want_grad in zip(got[1], want[1]):
        assert torch.isfinite(got_grad).all()
        torch.testing.assert_close(got_grad, want_grad, **tolerance)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("distance", list(FUSED_DISTANCES))
@pytest.mark.parametrize("name", LOSSES)
def test_fused_distances(gen, name, distance, dtype):
    ours, theirs = _pair(name, **_options(name, FUSED_DISTANCES[distance]()))
    x = torch.randn(19, 6, generator=gen, dtype=dtype)
    assert_same(ours, theirs, [x, _labels(gen, 19)], dtype)


@pytest.mark.parametrize("distance", list(OTHER_DISTANCES))
@pytest.mark.parametrize("name", LOSSES)
def test_other_distances_fall_back_with_a_warning_naming_the_distance(gen, name, distance):
    make, option = OTHER_DISTANCES[distance]
    ours, theirs = _pair(name, **_options(name, make()))
    inputs = [torch.randn(11, 5, generator=gen, dtype=torch.float64), _labels(gen, 11, 3)]
    with pytest.warns(FallbackWarning, match=option):
        assert_same(ours, theirs, inputs, fused=False)


@pytest.mark.parametrize("reducer", [
    "MeanReducer", "AvgNonZeroReducer", "SumReducer", "PerAnchorReducer", "ClassWeightedReducer",
    "ThresholdReducer"])
@pytest.mark.parametrize("name", LOSSES)
def test_reducers_and_embedding_regularizer(gen, name, reducer, dtype=torch.float32):
    """Every reducer gets the per-pair / per-anchor losses pytorch-metric-learning computes."""
    arguments = {"ClassWeightedReducer": dict(weights=torch.rand(20, generator=gen, dtype=dtype)),
                 "ThresholdReducer": dict(low=0.5)}.get(reducer, {})
    options = _options(name, reducer=getattr(pml_reducers, reducer)(**arguments),
                       embedding_regularizer=pml_regularizers.LpRegularizer(),
                       embedding_reg_weight=0.3)
    ours, theirs = _pair(name, **options)
    # One label alone: in float32 its zero SupCon loss must keep a zero (not NaN) gradient.
    assert_same(ours, theirs, [torch.randn(17, 6, generator=gen, dtype=dtype), _labels(gen, 17)], dtype)


@pytest.mark.parametrize("name", LOSSES)
def test_do_nothing_reducer_gets_the_same_losses_and_indices(gen, name):
    ours, theirs = _pair(name, reducer=pml_reducers.DoNothingReducer())
    x, labels = torch.randn(12, 4, generator=gen, dtype=torch.float64), _labels(gen, 12, 3)
    got, want = _fused_only(ours)(x, labels)["loss"], theirs(x, labels)["loss"]
    assert got["reduction_type"] == want["reduction_type"]
    for got_index, want_index in zip(got["indices"], want["indices"]):
        assert torch.equal(got_index, want_index)
    torch.testing.assert_close(got["losses"], want["losses"], **TOLERANCE[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_reference_embeddings(gen, name, dtype):
    ours, theirs = _pair(name)
    inputs = [torch.randn(9, 5, generator=gen, dtype=dtype), _labels(gen, 9, 3),
              torch.randn(14, 5, generator=gen, dtype=dtype), _labels(gen, 14, 3)]
    assert_same(ours, theirs, inputs[:2], dtype, ref_emb=inputs[2], ref_labels=inputs[3])


@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_reference_embeddings_with_the_labels_object_itself(gen, name):
    """ref_labels given as the labels tensor itself: pytorch-metric-learning then drops the pairs
    (i, i) though the reference rows are other embeddings."""
    ours, theirs = _pair(name)
    x, labels = torch.randn(9, 5, generator=gen, dtype=torch.float64), _labels(gen, 9, 3)
    reference = torch.randn(9, 5, generator=gen, dtype=torch.float64)
    values = [loss(x, labels, ref_emb=reference, ref_labels=labels) for loss in (_fused_only(ours), theirs)]
    torch.testing.assert_close(values[0], values[1], **TOLERANCE[torch.float64])


def test_npairs_rejects_reference_embeddings_like_pytorch_metric_learning():
    x, labels = torch.randn(4, 3), torch.tensor([0, 0, 1, 1])
    for loss in _pair("NPairsLoss"):
        with pytest.raises(ValueError, match="ref_emb is not supported for this loss function"):
            loss(x, labels, ref_emb=x.clone(), ref_labels=labels.clone())


@pytest.mark.parametrize("labels", [
    [0, 0, 1, 1, 2, 2],          # two views per sample
    [3, 3, 3, 3, 3],             # no negative: zero loss
    [0, 1, 2, 3],                # no positive: zero loss
    [0, 0, 1],                   # one positive pair each way, two negatives each way
    [5, 5, 5, 2, 2, 9, 5, 2],    # several positives per anchor
])
@pytest.mark.parametrize("name", LOSSES)
def test_label_structures(gen, name, labels):
    ours, theirs = _pair(name)
    labels = torch.tensor(labels)
    assert_same(ours, theirs, [torch.randn(len(labels), 4, generator=gen, dtype=torch.float64), labels])


@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_one_positive_and_one_negative_pair_is_zero_like_pytorch_metric_learning(gen, name):
    """Rows [0, 0] against references [0, 1] without self pairs: one pair of each kind."""
    ours, theirs = _pair(name)
    inputs = [torch.randn(1, 4, generator=gen, dtype=torch.float64), torch.tensor([0]),
              torch.randn(2, 4, generator=gen, dtype=torch.float64), torch.tensor([0, 1])]
    assert_same(ours, theirs, inputs[:2], ref_emb=inputs[2], ref_labels=inputs[3])
    assert ours(*inputs[:2], ref_emb=inputs[2], ref_labels=inputs[3]) == 0


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.int16])
@pytest.mark.parametrize("name", LOSSES)
def test_any_integer_label_dtype_is_fused(gen, name, dtype):
    ours, theirs = _pair(name)
    assert_same(ours, theirs, [torch.randn(10, 4, generator=gen, dtype=torch.float64),
                               _labels(gen, 10, 3).to(dtype)])


@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_learnable_temperature_gets_its_gradient(gen, name):
    temperature = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    x, labels = torch.randn(10, 4, generator=gen, dtype=torch.float64), _labels(gen, 10, 3)
    grads = []
    for loss in (getattr(fused_pml, name)(temperature=temperature),
                 getattr(pml_losses, name)(temperature=temperature)):
        grads.append(torch.autograd.grad(loss(x, labels), temperature)[0])
    torch.testing.assert_close(grads[0], grads[1], **TOLERANCE[torch.float64])


@pytest.mark.parametrize("temperature", [0.0, -0.5])
@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_non_positive_temperature_falls_back(gen, name, temperature):
    ours, theirs = _pair(name, temperature=temperature)
    x, labels = torch.randn(8, 4, generator=gen, dtype=torch.float64), _labels(gen, 8, 3)
    with pytest.warns(FallbackWarning, match=f"temperature={temperature}"):
        got = ours(x, labels)
    torch.testing.assert_close(got, theirs(x, labels), equal_nan=True)


@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_mined_pairs_fall_back_and_warn_once(gen, name):
    ours, theirs = _pair(name)
    miner = pml_miners.MultiSimilarityMiner(epsilon=0.5)
    x, labels = torch.randn(16, 5, generator=gen, dtype=torch.float64), _labels(gen, 16, 3)
    indices = miner(x, labels)
    with pytest.warns(FallbackWarning, match="indices_tuple whose negative pairs are not all") as record:
        assert_same(ours, theirs, [x, labels], fused=False, indices_tuple=indices)
        assert_same(ours, theirs, [x, labels], fused=False, indices_tuple=indices)
    assert len([w for w in record if issubclass(w.category, FallbackWarning)]) == 1


@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_all_pairs_given_as_indices_tuple_are_fused(gen, name):
    """An indices_tuple holding every negative pair (any positives) is what CrossBatchMemory
    passes: fused. Here: all pairs, less some positive pairs."""
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu
    ours, theirs = _pair(name)
    x, labels = torch.randn(12, 5, generator=gen, dtype=torch.float64), _labels(gen, 12, 3)
    a1, p, a2, n = lmu.get_all_pairs_indices(labels)
    assert_same(ours, theirs, [x, labels], indices_tuple=(a1[::2], p[::2], a2, n))


def test_npairs_with_mined_pairs_is_fused(gen):
    ours, theirs = _pair("NPairsLoss")
    x, labels = torch.randn(16, 5, generator=gen, dtype=torch.float64), _labels(gen, 16, 3)
    indices = pml_miners.MultiSimilarityMiner(epsilon=0.5)(x, labels)
    assert_same(ours, theirs, [x, labels], indices_tuple=indices)


@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_labels_that_cannot_be_fused_fall_back(gen, name):
    ours, theirs = _pair(name)
    x = torch.randn(8, 4, generator=gen, dtype=torch.float64)
    labels = _labels(gen, 8, 3)
    with pytest.warns(FallbackWarning, match="labels of dtype torch.float32"):
        assert_same(ours, theirs, [x, labels.float()], fused=False)
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu
    with pytest.warns(FallbackWarning, match="labels=None"):
        assert_same(ours, theirs, [x], fused=False, indices_tuple=lmu.get_all_pairs_indices(labels))


@pytest.mark.parametrize("name", LOSSES)
def test_distance_statistics_are_recorded(gen, name):
    ours, theirs = _pair(name, distance=pml_distances.CosineSimilarity(collect_stats=True))
    x, labels = torch.randn(10, 4, generator=gen, dtype=torch.float64), _labels(gen, 10, 3)
    ours(x, labels), theirs(x, labels)
    for stat in ("initial_avg_query_norm", "initial_avg_ref_norm", "final_avg_query_norm"):
        assert getattr(ours.distance, stat) == pytest.approx(getattr(theirs.distance, stat), rel=1e-12)


def test_drop_ins_are_pytorch_metric_learning_losses_and_check_backend():
    for name in LOSSES:
        assert isinstance(getattr(fused_pml, name)(), getattr(pml_losses, name))
    with pytest.raises(ValueError, match="backend must be one of"):
        fused_pml.SupConLoss(backend="gpu")


# Inside pytorch-metric-learning's wrappers


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_cross_batch_memory(gen, name, dtype):
    """Several steps, the memory filling and wrapping around: fused at every step."""
    ours = pml_losses.CrossBatchMemory(getattr(fused_pml, name)(), 5, memory_size=23)
    theirs = pml_losses.CrossBatchMemory(getattr(pml_losses, name)(), 5, memory_size=23)
    for step in range(5):
        inputs = [torch.randn(7, 5, generator=gen, dtype=dtype), _labels(gen, 7, 3)]
        enqueue = {"enqueue_mask": torch.arange(7) % 2 == 0} if step == 3 else {}
        assert_same(ours, theirs, inputs, dtype, **enqueue)


@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_cross_batch_memory_with_a_miner_falls_back(gen, name):
    miner = pml_miners.MultiSimilarityMiner(epsilon=0.5)
    ours = pml_losses.CrossBatchMemory(getattr(fused_pml, name)(), 5, memory_size=20, miner=miner)
    theirs = pml_losses.CrossBatchMemory(getattr(pml_losses, name)(), 5, memory_size=20, miner=miner)
    with pytest.warns(FallbackWarning, match="indices_tuple"):
        for _ in range(3):
            inputs = [torch.randn(8, 5, generator=gen, dtype=torch.float64), _labels(gen, 8, 3)]
            assert_same(ours, theirs, inputs, fused=False)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_self_supervised_loss(gen, name, symmetric):
    ours = pml_losses.SelfSupervisedLoss(getattr(fused_pml, name)(), symmetric=symmetric)
    theirs = pml_losses.SelfSupervisedLoss(getattr(pml_losses, name)(), symmetric=symmetric)
    views = [torch.randn(9, 6, generator=gen, dtype=torch.float64) for _ in range(2)]
    assert_same(ours, theirs, views)


# Through the triton backend (its interpreter without a GPU)


@pytest.mark.parametrize("name,call", [("NTXentLoss", "ref_emb"), ("SupConLoss", "indices_tuple")])
def test_label_masked_scoring_on_the_triton_backend(gen, name, call):
    """NTXentLoss (positive pairs against their anchor's negatives) and SupConLoss with given
    positive pairs score rows with the label-masked log-sum-exp: the triton kernels in float32."""
    pytest.importorskip("triton")
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu
    ours, theirs = getattr(fused_pml, name)(backend="triton"), getattr(pml_losses, name)()
    x, labels = torch.randn(37, 12, generator=gen), _labels(gen, 37, 5)
    if call == "ref_emb":
        reference = dict(ref_emb=torch.randn(23, 12, generator=gen), ref_labels=_labels(gen, 23, 5))
        assert_same(ours, theirs, [x, labels], torch.float32, **reference)
    else:
        a1, p, a2, n = lmu.get_all_pairs_indices(labels)
        assert_same(ours, theirs, [x, labels], torch.float32, indices_tuple=(a1[::2], p[::2], a2, n))
