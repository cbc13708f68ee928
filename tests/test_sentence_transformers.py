"""fused_losses.integrations.sentence_transformers against the real sentence-transformers 6.2:
loss and every parameter gradient of a tiny float64 model (built here, nothing downloaded) for
each option, N = 1 and odd N, dropout for the cached variants, gather_across_devices on 2 gloo
ranks; configuration, fallback, and the example trained with SentenceTransformerTrainer."""

import copy
import importlib.util
import inspect
import re
import warnings

import pytest
import torch

st_losses = pytest.importorskip(
    "sentence_transformers.sentence_transformer.losses",
    reason="sentence-transformers is not installed (pip install 'sentence-transformers>=6.2,<7')")
from sentence_transformers import SentenceTransformer  # noqa: E402
from sentence_transformers.util import cos_sim, dot_score, euclidean_sim  # noqa: E402

from examples import train_sentence_transformers as example  # noqa: E402
from fused_losses.integrations import sentence_transformers as fused_st  # noqa: E402
from tests.ranks import run_on_ranks  # noqa: E402

TOLERANCE = dict(rtol=1e-10, atol=1e-12)
ALL_DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
SYMMETRIC = ("query_to_doc", "doc_to_query")


def tiny_model(dropout=0.0, seed=0):
    """The example's encoder (hashed-word embeddings, mean pool, MLP) in float64."""
    torch.manual_seed(seed)
    encoder = example.HashedWordEncoder(vocab_size=50, width=6, hidden=7, dim=5,
                                               dropout=dropout)
    return SentenceTransformer(modules=[encoder], device="cpu").double()


def columns(gen, n, count, vocab=50, length=6):
    """``count`` input columns of n rows: token ids with padding (1 to ``length`` words)."""
    features = []
    for _ in range(count):
        lengths = torch.randint(1, length + 1, (n,), generator=gen)
        mask = (torch.arange(length)[None] < lengths[:, None]).long()
        ids = torch.randint(1, vocab, (n, length), generator=gen) * mask
        features.append({"input_ids": ids, "attention_mask": mask})
    return features


def loss_and_grads(loss, features, seed=0):
    """loss(features) (each call on fresh dicts: modules write into them), then backward."""
    loss.model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    value = loss([dict(f) for f in features], None)
    value.backward()
    return value.detach(), {name: p.grad for name, p in loss.model.named_parameters()}


def assert_same(ours, theirs, features, seed=0):
    our_value, our_grads = loss_and_grads(ours, features, seed)
    their_value, their_grads = loss_and_grads(theirs, features, seed)
    torch.testing.assert_close(our_value, their_value, **TOLERANCE)
    assert our_grads.keys() == their_grads.keys()
    for name, grad in their_grads.items():
        torch.testing.assert_close(our_grads[name], grad, **TOLERANCE, msg=lambda m: f"{name}: {m}")


OPTIONS = {
    "default": {},
    "dot_score": dict(scale=1.5, similarity_fct=dot_score),
    "symmetric_per_direction": dict(directions=SYMMETRIC, partition_mode="per_direction"),
    "symmetric_joint": dict(directions=SYMMETRIC, scale=7.0),
    "query_to_query": dict(directions=("query_to_doc", "query_to_query")),
    "doc_to_doc_dot": dict(directions=("query_to_doc", "doc_to_doc"), similarity_fct=dot_score,
                           scale=0.7),
    "all_directions": dict(directions=ALL_DIRECTIONS),
    "in_batch_negatives": dict(hardness_mode="in_batch_negatives", hardness_strength=9.0),
    "hard_negatives": dict(hardness_mode="hard_negatives", hardness_strength=5.0),
    "all_negatives_all_directions": dict(directions=ALL_DIRECTIONS, hardness_mode="all_negatives",
                                         hardness_strength=3.0),
    "all_negatives_symmetric_per_direction": dict(
        directions=SYMMETRIC, partition_mode="per_direction", hardness_mode="all_negatives",
        hardness_strength=2.0, similarity_fct=dot_score, scale=0.5),
    "hardness_strength_zero": dict(hardness_mode="hard_negatives", hardness_strength=0.0),
}


@pytest.mark.parametrize("n", [1, 7])
@pytest.mark.parametrize("negatives", [0, 2])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_multiple_negatives_ranking_loss(gen, option, negatives, n):
    model = tiny_model()
    assert_same(fused_st.MultipleNegativesRankingLoss(model, **OPTIONS[option]),
                st_losses.MultipleNegativesRankingLoss(model, **OPTIONS[option]),
                columns(gen, n, 2 + negatives))


CACHED_OPTIONS = ["default", "symmetric_per_direction", "all_directions", "doc_to_doc_dot",
                  "all_negatives_all_directions", "in_batch_negatives"]


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("n", [1, 7])
@pytest.mark.parametrize("option", CACHED_OPTIONS)
def test_cached_multiple_negatives_ranking_loss(gen, option, n, dropout):
    """Mini-batches of 3 (7 = 3 + 3 + 1); with dropout both replay the same masks."""
    model = tiny_model(dropout)
    assert_same(fused_st.CachedMultipleNegativesRankingLoss(model, mini_batch_size=3,
                                                            **OPTIONS[option]),
                st_losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=3,
                                                             **OPTIONS[option]),
                columns(gen, n, 3), seed=int(torch.randint(0, 2**31, (), generator=gen)))


def test_cached_packs_mini_batches_by_tokens_like_theirs(gen):
    model = tiny_model(0.2)
    options = dict(mini_batch_size=100, mini_batch_num_tokens=9, show_progress_bar=True)
    assert_same(fused_st.CachedMultipleNegativesRankingLoss(model, **options),
                st_losses.CachedMultipleNegativesRankingLoss(model, **options), columns(gen, 11, 2))


def test_cached_equals_uncached_and_evaluates_without_gradients(gen):
    model, features = tiny_model(), columns(gen, 9, 3)
    options = OPTIONS["all_negatives_all_directions"]
    assert_same(fused_st.CachedMultipleNegativesRankingLoss(model, mini_batch_size=4, **options),
                fused_st.MultipleNegativesRankingLoss(model, **options), features)
    with torch.no_grad():
        torch.testing.assert_close(
            fused_st.CachedMultipleNegativesRankingLoss(model, mini_batch_size=4)(features, None),
            st_losses.MultipleNegativesRankingLoss(model)(features, None), **TOLERANCE)


def test_cached_scales_the_replay_by_the_upstream_gradient(gen):
    """The trainer's loss scaling and gradient accumulation reach every mini-batch."""
    model, features = tiny_model(), columns(gen, 5, 2)
    for loss in (fused_st.CachedMultipleNegativesRankingLoss(model, mini_batch_size=2),
                 st_losses.MultipleNegativesRankingLoss(model)):
        model.zero_grad(set_to_none=True)
        (loss([dict(f) for f in features], None) * 0.25).backward()
        if isinstance(loss, fused_st.CachedMultipleNegativesRankingLoss):
            ours = [p.grad.clone() for p in model.parameters()]
    for got, want in zip(ours, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, want, **TOLERANCE)


def test_cached_replays_with_the_forwards_autocast_settings(gen):
    """The trainer runs the forward under autocast and the backward (the replay) outside it: the
    replay must run as if the backward were inside the autocast region too."""
    model, features = tiny_model(), columns(gen, 6, 2)
    model.float()
    loss = fused_st.CachedMultipleNegativesRankingLoss(model, mini_batch_size=2)
    grads = []
    for backward_inside in (True, False):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = loss([dict(f) for f in features], None)
            if backward_inside:
                value.backward()
        if not backward_inside:
            value.backward()
        grads.append([p.grad for p in model.parameters()])
    for inside, outside in zip(*grads):
        assert torch.equal(inside, outside)


@pytest.mark.parametrize("name,extra", [("MultipleNegativesRankingLoss", {}),
                                        ("CachedMultipleNegativesRankingLoss",
                                         dict(mini_batch_size=3))])
def test_inside_their_matryoshka_loss(gen, name, extra):
    """MatryoshkaLoss wraps a cached loss by decorating its calculate_loss."""
    model = tiny_model(0.2)
    assert_same(st_losses.MatryoshkaLoss(model, getattr(fused_st, name)(model, **extra), [5, 3]),
                st_losses.MatryoshkaLoss(model, getattr(st_losses, name)(model, **extra), [5, 3]),
                columns(gen, 7, 3), seed=4)


@pytest.mark.parametrize("ours,theirs,extra", [
    (fused_st.MultipleNegativesSymmetricRankingLoss, st_losses.MultipleNegativesSymmetricRankingLoss,
     {}),
    (fused_st.CachedMultipleNegativesSymmetricRankingLoss,
     st_losses.CachedMultipleNegativesSymmetricRankingLoss, dict(mini_batch_size=2)),
])
def test_symmetric_variants_warn_like_theirs_and_match(gen, ours, theirs, extra):
    model = tiny_model()
    with pytest.warns(DeprecationWarning, match="is deprecated"):
        our_loss = ours(model, scale=12.0, **extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        their_loss = theirs(model, scale=12.0, **extra)
    assert isinstance(our_loss, theirs)
    assert our_loss.get_config_dict() == their_loss.get_config_dict()
    assert_same(our_loss, their_loss, columns(gen, 5, 2))


@pytest.mark.parametrize("name", ["MultipleNegativesRankingLoss",
                                  "CachedMultipleNegativesRankingLoss",
                                  "MultipleNegativesSymmetricRankingLoss",
                                  "CachedMultipleNegativesSymmetricRankingLoss"])
def test_constructor_takes_their_parameters_then_backend(name):
    """Our typed constructors repeat theirs (names, order, defaults), plus keyword-only backend."""
    def parameters(cls):
        return [(p.name, p.kind, p.default)
                for p in inspect.signature(cls.__init__).parameters.values()]

    backend = ("backend", inspect.Parameter.KEYWORD_ONLY, "auto")
    assert parameters(getattr(fused_st, name)) == parameters(getattr(st_losses, name)) + [backend]


@pytest.mark.parametrize("name", ["MultipleNegativesRankingLoss",
                                  "CachedMultipleNegativesRankingLoss"])
def test_subclasses_theirs_with_their_configuration(name):
    model = tiny_model()
    options = dict(scale=11.0, similarity_fct=dot_score, directions=ALL_DIRECTIONS,
                   hardness_mode="in_batch_negatives", hardness_strength=4.0)
    ours = getattr(fused_st, name)(model, backend="torch", **options)
    theirs = getattr(st_losses, name)(model, **options)
    assert isinstance(ours, getattr(st_losses, name))
    assert ours.get_config_dict() == theirs.get_config_dict()
    assert ours.citation == theirs.citation and ours.temperature == theirs.temperature
    assert ours.backend == "torch"
    ours.scale = 3.0  # assignments reach the wrapped loss, as in theirs
    assert ours.get_config_dict()["scale"] == 3.0


def test_columns_of_different_sizes_raise(gen):
    model = tiny_model()
    features = columns(gen, 4, 1) + columns(gen, 3, 1)
    for loss in (fused_st.MultipleNegativesRankingLoss(model),
                 fused_st.CachedMultipleNegativesRankingLoss(model, mini_batch_size=2)):
        with pytest.raises(ValueError, match=r"one row per anchor .* got columns of \[4, 3\] rows"):
            loss(features, None)


def test_bad_backend_raises():
    with pytest.raises(ValueError, match="backend must be one of"):
        fused_st.CachedMultipleNegativesRankingLoss(tiny_model(), backend="tpu")


@pytest.mark.parametrize("name", ["MultipleNegativesRankingLoss",
                                  "CachedMultipleNegativesRankingLoss"])
def test_other_similarity_falls_back_to_theirs_with_one_warning(gen, name):
    model, features = tiny_model(), columns(gen, 4, 2)
    fused_st._warn_once.cache_clear()  # once per process: forget earlier tests' warnings
    ours = getattr(fused_st, name)(model, similarity_fct=euclidean_sim)
    with pytest.warns(UserWarning, match="using sentence-transformers' own scoring"):
        assert_same(ours, getattr(st_losses, name)(model, similarity_fct=euclidean_sim), features)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss_and_grads(ours, features)


# gather_across_devices on 2 gloo ranks (theirs needs even batches)

GATHER_OPTIONS = ["default", "symmetric_per_direction", "all_directions",
                  "all_negatives_all_directions"]


def _gather_runs(rank):
    """{(option, cached): [(loss, gradients) of ours, of theirs]} on this rank."""
    gen = torch.Generator().manual_seed(rank)
    results = {}
    for option in GATHER_OPTIONS:
        for cached in (False, True):
            name = "CachedMultipleNegativesRankingLoss" if cached else "MultipleNegativesRankingLoss"
            extra = dict(mini_batch_size=2) if cached else {}
            model, features = tiny_model(0.3 if cached else 0.0), columns(gen, 3, 3)
            results[option, cached] = [
                loss_and_grads(getattr(module, name)(model, gather_across_devices=True, **extra,
                                                     **OPTIONS[option]), features, seed=rank)
                for module in (fused_st, st_losses)]
    return results


def test_gather_across_devices_matches_theirs_on_every_rank(tmp_path):
    for rank, saved in enumerate(run_on_ranks(_gather_runs, 2, tmp_path)):
        for (option, cached), ((ours, our_grads), (theirs, their_grads)) in saved.items():
            where = f"rank {rank}, {option}, cached={cached}"
            torch.testing.assert_close(ours, theirs, **TOLERANCE, msg=lambda m: f"{where}: {m}")
            for name, grad in their_grads.items():
                torch.testing.assert_close(our_grads[name], grad, **TOLERANCE,
                                           msg=lambda m: f"{where}, {name}: {m}")


# The example, in reduced form


def test_example_trains_both_losses_to_the_same_curve(tmp_path, capsys):
    pytest.importorskip("datasets", reason="the example's trainer needs datasets")
    pytest.importorskip("accelerate", reason="the example's trainer needs accelerate")
    plot = tmp_path / "curves.png"
    exit_code = example.main(["--steps", "3", "--batch-size", "32", "--mini-batch-size",
                                     "8", "--concepts", "128", "--test-concepts", "64",
                                     "--plot", str(plot)])
    out = capsys.readouterr().out
    assert exit_code == 0
    gap = re.search(r"largest \|fused - theirs\| training loss over 3 steps: (\S+)", out)
    assert gap and float(gap.group(1)) < 1e-4, out
    assert "fused: final training loss" in out and "theirs: final training loss" in out
    if importlib.util.find_spec("matplotlib") is not None:
        assert plot.read_bytes().startswith(b"\x89PNG")
