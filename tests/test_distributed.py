"""Losses with gather_distributed=True on 2 and 3 CPU processes (gloo, uneven batches, one rank
with no rows).

One spawn per world size W runs every case on every rank and saves what each rank saw; the tests
compare it here with one process computing the loss on the global batch (the ranks' batches
concatenated in rank order), under DDP's semantics (fused_losses.distributed):

    mean over ranks of the per-rank losses                 == the global loss
    rank r's embedding gradients / W (DDP's average)       == the global gradients of its rows
    mean over ranks of a shared scalar's gradient          == its global gradient
    DDP-averaged parameter gradients of a real DDP model   == the global ones

and, with even batches, with open_clip's ClipLoss / SigLipLoss and lightly's NTXentLoss running
distributed on the same ranks (through fused_losses.integrations and the functional losses).
A global batch with no rows at all raises the same error on every rank.
"""

import contextlib
import functools
import os
import socket
from dataclasses import dataclass, field
from typing import Callable, Dict, List
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fused_losses as fl
from benchmarks import distributed_clip
from fused_losses.backends.torch_tiled import TorchTiledKernels
from fused_losses.integrations import lightly as fused_lightly
from fused_losses.integrations import open_clip as fused_open_clip
from tests import peers

UNEVEN_ROWS = {2: [3, 5], 3: [4, 0, 1]}  # an empty rank: its loss is 0, it joins every collective
EVEN_ROWS = 4
DIM = 6
TOLERANCE = dict(rtol=1e-10, atol=1e-12)


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _scalar(value):
    return torch.tensor(value, dtype=torch.float64)


def _offsets(counts):
    return [sum(counts[:r]) for r in range(len(counts))]


@dataclass
class Case:
    """A loss called as loss(options, **inputs): on each rank with options
    dict(gather_distributed=True, ...), or once on the global batch with options {}.

    rows: global tensors dealt out to the ranks by row, per-rank counts in ``counts[name]``.
    scalars: 0-d tensors every rank shares (gradients checked as a shared parameter).
    global_extra: keyword arguments only the single-process call takes.
    tolerance: of the comparison with the single-process loss (float64 inputs: TOLERANCE); atol
        is relative to the largest entry of the expected value (when above 1).
    """

    loss: Callable
    rows: Dict[str, torch.Tensor]
    counts: Dict[str, List[int]]
    scalars: Dict[str, torch.Tensor] = field(default_factory=dict)
    global_extra: Dict[str, object] = field(default_factory=dict)
    reduction: str = "mean"
    tolerance: Dict[str, float] = field(default_factory=lambda: TOLERANCE)

    def rank_inputs(self, rank):
        return {name: torch.split(x, self.counts[name])[rank] for name, x in self.rows.items()}

    def global_inputs(self, ranks):
        """The global batch of the ranks in ``ranks``."""
        return {name: torch.cat([torch.split(x, self.counts[name])[r] for r in ranks])
                for name, x in self.rows.items()}


def _weighted_symmetric_lse(options, q, k, row_weights, col_weights, scale):
    """A loss of both outputs of distributed.symmetric_lse, on every rank W times its share of
    the global one (as the losses scale theirs)."""
    stats = fl.distributed.symmetric_lse(q, k, scale, normalize=True, **options)
    return stats.keys.world_size * (
        (row_weights * stats.lse_row).sum() + (col_weights * stats.lse_col).sum())


def _global_cases(world_size) -> Dict[str, Case]:
    gen = torch.Generator().manual_seed(1000 + world_size)
    rows = UNEVEN_ROWS[world_size]
    n = sum(rows)
    key_rows = [r + 2 for r in rows]  # InfoNCE: two extra negatives per rank
    targets = torch.cat([torch.arange(r) + offset for r, offset in zip(rows, _offsets(key_rows))])
    labels = torch.randint(0, 3, (n,), generator=gen)
    labels[1] = 7  # an anchor without a positive
    pair_rows = dict(image=rows, text=rows)
    pairs = lambda: dict(image=_randn(gen, n, DIM), text=_randn(gen, n, DIM))  # noqa: E731
    return {
        "clip": Case(lambda o, image, text, scale: fl.clip_loss(image, text, scale, **o),
                     pairs(), pair_rows, dict(scale=_scalar(14.0))),
        "clip_sum_smoothing": Case(
            lambda o, image, text, scale: fl.clip_loss(image, text, scale, label_smoothing=0.1,
                                                       reduction="sum", **o),
            pairs(), pair_rows, dict(scale=_scalar(8.0)), reduction="sum"),
        "clip_none": Case(
            lambda o, image, text, scale: fl.clip_loss(image, text, scale, reduction="none", **o),
            pairs(), pair_rows, dict(scale=_scalar(14.0)), reduction="none"),
        "clip_none_smoothing": Case(
            lambda o, image, text, scale: fl.clip_loss(image, text, scale, label_smoothing=0.2,
                                                       reduction="none", **o),
            pairs(), pair_rows, dict(scale=_scalar(14.0)), reduction="none"),
        "clip_float32_smoothing": Case(
            lambda o, image, text, scale: fl.clip_loss(image.float(), text.float(), scale.float(),
                                                       label_smoothing=0.1, **o),
            pairs(), pair_rows, dict(scale=_scalar(30.0)), tolerance=dict(rtol=1e-5, atol=1e-6)),
        "clip_bfloat16_torch_backend": Case(
            lambda o, image, text, scale: fl.clip_loss(
                image.bfloat16(), text.bfloat16(), scale.float(), label_smoothing=0.1,
                backend="torch", **o),
            # The ranks' parts of a text's gradient add up in bf16 (all_gather's backward): one
            # more rounding than in one process, up to an ulp of the largest part.
            pairs(), pair_rows, dict(scale=_scalar(30.0)), tolerance=dict(rtol=2e-2, atol=8e-3)),
        "symmetric_lse": Case(
            _weighted_symmetric_lse,
            dict(q=_randn(gen, n, DIM), k=_randn(gen, sum(key_rows), DIM),
                 row_weights=_randn(gen, n), col_weights=_randn(gen, sum(key_rows))),
            dict(q=rows, k=key_rows, row_weights=rows, col_weights=key_rows),
            dict(scale=_scalar(9.0))),
        "siglip": Case(
            lambda o, image, text, scale, bias: fl.siglip_loss(image, text, scale, bias, **o),
            pairs(), pair_rows, dict(scale=_scalar(10.0), bias=_scalar(-5.0))),
        "nt_xent_module": Case(
            lambda o, image, text, temperature: fl.NTXentLoss(temperature, **o)(image, text),
            pairs(), pair_rows, dict(temperature=_scalar(0.5))),
        "supcon": Case(
            lambda o, features, labels, temperature: fl.supcon_loss(features, labels, temperature, **o),
            dict(features=_randn(gen, n, DIM), labels=labels), dict(features=rows, labels=rows),
            dict(temperature=_scalar(0.1))),
        "supcon_none": Case(
            lambda o, features, labels, temperature: fl.supcon_loss(
                features, labels, temperature, reduction="none", **o),
            dict(features=_randn(gen, n, DIM), labels=labels), dict(features=rows, labels=rows),
            dict(temperature=_scalar(0.1)), reduction="none"),
        "info_nce_module_extra_negatives": Case(
            lambda o, query, keys, temperature, targets=None: fl.InfoNCELoss(
                temperature, label_smoothing=0.1, **o)(query, keys, targets),
            dict(query=_randn(gen, n, DIM), keys=_randn(gen, sum(key_rows), DIM)),
            dict(query=rows, keys=key_rows), dict(temperature=_scalar(0.07)),
            global_extra=dict(targets=targets)),
        "npairs_module": Case(
            lambda o, image, text: fl.NPairsLoss(l2_reg=0.01, **o)(image, text), pairs(), pair_rows),
    }


SUBGROUP_RANKS = [0, 1]
SUBGROUP_CASE = "supcon"


def _leaves(inputs):
    return {name: x.clone().requires_grad_(x.is_floating_point()) for name, x in inputs.items()}


def _loss_and_grads(loss_fn, inputs, reduction, **extra):
    """The loss and the gradient of every float input (none for reduction="none")."""
    value = loss_fn(**inputs, **extra)
    if reduction == "none":
        return value.detach(), {}
    differentiable = {name: x for name, x in inputs.items() if x.requires_grad}
    grads = torch.autograd.grad(value, list(differentiable.values()), allow_unused=True,
                                materialize_grads=True)
    return value.detach(), dict(zip(differentiable, grads))


# Peers in distributed mode, with even batches (they need them).


def _peer_inputs(rank, world_size):
    gen = torch.Generator().manual_seed(2000 + world_size)
    n = EVEN_ROWS * world_size
    image, text = _randn(gen, n, DIM), _randn(gen, n, DIM)
    local = slice(rank * EVEN_ROWS, (rank + 1) * EVEN_ROWS)
    return dict(image=image[local], text=text[local], scale=_scalar(12.0), bias=_scalar(-4.0))


CLIP_MODES = {f"open_clip_clip_local{local:d}_grad{with_grad:d}":
              dict(local_loss=local, gather_with_grad=with_grad)
              for local in (True, False) for with_grad in (True, False)}
SIGLIP_IMPLS = {f"open_clip_siglip_{impl}": impl for impl in ("bidir", "gather")}
PEER_CASES = [*CLIP_MODES, "open_clip_clip_functional", *SIGLIP_IMPLS, "lightly_nt_xent"]


def _called_with(loss, *names):
    """loss as a function of the peer inputs, taking the ones named, in that order."""
    return lambda **inputs: loss(*(inputs[name] for name in names))


def _peer_cases(rank, world_size):
    """({name: (ours, theirs)}, {peer: why skipped}); ours and theirs are losses of the same
    (image, text, scale, bias)."""
    world = dict(rank=rank, world_size=world_size)
    cases, skipped = {}, {}
    try:
        their_clip, their_siglip = peers.open_clip_loss("ClipLoss"), peers.open_clip_loss("SigLipLoss")
    except pytest.skip.Exception as skip:
        skipped["open_clip"] = str(skip)
    else:
        clip_inputs, siglip_inputs = ("image", "text", "scale"), ("image", "text", "scale", "bias")
        for name, mode in CLIP_MODES.items():
            cases[name] = (_called_with(fused_open_clip.ClipLoss(**mode, **world), *clip_inputs),
                           _called_with(their_clip(**mode, **world), *clip_inputs))
        fused_local_loss = functools.partial(fl.clip_loss, normalize=False, gather_distributed=True)
        cases["open_clip_clip_functional"] = (_called_with(fused_local_loss, *clip_inputs),
                                              cases["open_clip_clip_local1_grad1"][1])
        for name, impl in SIGLIP_IMPLS.items():
            cases[name] = (
                _called_with(fused_open_clip.SigLipLoss(**world, dist_impl=impl), *siglip_inputs),
                _called_with(their_siglip(**world, dist_impl=impl), *siglip_inputs))
    try:
        their_nt_xent = peers.lightly_ntxent_loss()
    except pytest.skip.Exception as skip:
        skipped["lightly"] = str(skip)
    else:
        cases["lightly_nt_xent"] = (
            _called_with(fused_lightly.NTXentLoss(0.3, gather_distributed=True), "image", "text"),
            _called_with(their_nt_xent(0.3, gather_distributed=True), "image", "text"))
    return cases, skipped


# DDP end to end: two linear encoders and a loss that owns its learnable scale (and bias).


class _TwoTower(nn.Module):
    def __init__(self, loss: nn.Module):
        super().__init__()
        self.image_encoder = nn.Linear(DIM, 5).double()
        self.text_encoder = nn.Linear(DIM, 5).double()
        self.loss = loss.double()

    def forward(self, images, texts):
        return self.loss(self.image_encoder(images), self.text_encoder(texts))


DDP_MODELS = {
    "clip": lambda g: fl.ClipLoss(learn_logit_scale=True, gather_distributed=g),
    "clip_smoothing": lambda g: fl.ClipLoss(learn_logit_scale=True, label_smoothing=0.1,
                                            gather_distributed=g),
    "siglip": lambda g: fl.SigLipLoss(learn_logit_scale=True, gather_distributed=g),
}


def _ddp_inputs(world_size):
    gen = torch.Generator().manual_seed(3000 + world_size)
    n = sum(UNEVEN_ROWS[world_size])
    return _randn(gen, n, DIM), _randn(gen, n, DIM)


def _ddp_grads(name, world_size, rank=None):
    """Parameter gradients: of the DDP model on rank ``rank``, or of one process (rank None)."""
    torch.manual_seed(0)
    model = _TwoTower(DDP_MODELS[name](rank is not None))
    images, texts = _ddp_inputs(world_size)
    if rank is None:
        model(images, texts).backward()
    else:
        images = torch.split(images, UNEVEN_ROWS[world_size])[rank]
        texts = torch.split(texts, UNEVEN_ROWS[world_size])[rank]
        ddp_model = nn.parallel.DistributedDataParallel(model)  # alive until its hooks have run
        ddp_model(images, texts).backward()
    return {name: p.grad for name, p in model.named_parameters()}


def _rank_loss_and_grads(case, rank, options):
    """What rank ``rank`` computes for ``case`` with the gathering ``options``."""
    return _loss_and_grads(lambda **x: case.loss(options, **x),
                           _leaves({**case.rank_inputs(rank), **case.scalars}), case.reduction)


def _clip_communication(rank, world_size):
    """What rank ``rank`` runs for one fused CLIP forward+backward: the collectives it calls
    ({op: {"calls", "bytes"}}) and the (rows, columns) of each similarity pass, forward and
    backward."""
    passes = {}
    log = []
    with contextlib.ExitStack() as stack:
        for direction in ("lse_forward", "lse_backward"):
            passes[direction] = stack.enter_context(mock.patch.object(
                TorchTiledKernels, direction, autospec=True,
                side_effect=getattr(TorchTiledKernels, direction)))
        stack.enter_context(distributed_clip.logged_collectives(log))
        _rank_loss_and_grads(_global_cases(world_size)["clip"], rank,
                             dict(gather_distributed=True, backend="torch"))
    shapes = {direction: [(call.args[1].shape[0], call.args[2].shape[0])
                          for call in spy.call_args_list]
              for direction, spy in passes.items()}
    return distributed_clip.summarize(log), shapes


def _worker(rank, world_size, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    try:
        results = {"global": {}, "peers": {}, "ddp": {}}
        cases = _global_cases(world_size)
        for name, case in cases.items():
            results["global"][name] = _rank_loss_and_grads(case, rank, dict(gather_distributed=True))
        results["communication"] = _clip_communication(rank, world_size)
        subgroup = dist.new_group(SUBGROUP_RANKS)  # every rank must take part in creating it
        if rank in SUBGROUP_RANKS:
            results["subgroup"] = _rank_loss_and_grads(
                cases[SUBGROUP_CASE], rank, dict(gather_distributed=True, process_group=subgroup))
        peer_cases, results["skipped"] = _peer_cases(rank, world_size)
        for name, (ours, theirs) in peer_cases.items():
            results["peers"][name] = tuple(
                _loss_and_grads(loss, _leaves(_peer_inputs(rank, world_size)), "mean")
                for loss in (ours, theirs))
        for name in DDP_MODELS:
            results["ddp"][name] = _ddp_grads(name, world_size, rank)
        results["empty_global_batch"] = _empty_global_batch_error()
        results["open_clip_local_loss_uneven"] = _open_clip_local_loss_error(rank, world_size)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _empty_global_batch_error() -> str:
    """The error of a loss whose every rank holds 0 rows."""
    nothing = torch.zeros(0, DIM, dtype=torch.float64)
    try:
        fl.nt_xent(nothing, nothing, gather_distributed=True)
    except ValueError as error:
        return str(error)
    return "no error"


def _open_clip_local_loss_error(rank, world_size) -> str:
    """The error of open_clip's local loss without gathered gradients on the uneven batches."""
    rows = UNEVEN_ROWS[world_size]
    image = torch.split(_randn(torch.Generator().manual_seed(7), sum(rows), DIM), rows)[rank]
    loss = fused_open_clip.ClipLoss(local_loss=True, gather_with_grad=False, rank=rank,
                                    world_size=world_size)
    try:
        loss(image, image.flip(0), _scalar(10.0))
    except ValueError as error:
        return str(error)
    return "no error"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"{w}ranks")
def ranks(request, tmp_path_factory):
    """(world size, what every rank saved), from one spawn of ``world_size`` gloo processes."""
    world_size = request.param
    out_dir = tmp_path_factory.mktemp(f"world{world_size}")
    mp.spawn(_worker, args=(world_size, _free_port(), str(out_dir)), nprocs=world_size, join=True)
    return world_size, [torch.load(out_dir / f"rank{r}.pt") for r in range(world_size)]


def _assert_ddp_average_is_global(case, per_rank, ranks):
    """per_rank: (loss, gradients) of each rank in ``ranks`` against one process on their batch."""
    want_loss, want_grads = _loss_and_grads(lambda **x: case.loss({}, **x),
                                            _leaves({**case.global_inputs(ranks), **case.scalars}),
                                            case.reduction, **case.global_extra)
    losses = [loss for loss, _ in per_rank]
    if case.reduction == "none":
        torch.testing.assert_close(torch.cat(losses), want_loss, **case.tolerance)
        return
    torch.testing.assert_close(torch.stack(losses).mean(), want_loss, **case.tolerance)
    for leaf, want in want_grads.items():
        grads = [rank_grads[leaf] for _, rank_grads in per_rank]
        got = torch.stack(grads).mean(0) if leaf in case.scalars else torch.cat(grads) / len(ranks)
        torch.testing.assert_close(got, want, rtol=case.tolerance["rtol"],
                                   atol=case.tolerance["atol"] * max(1.0, want.abs().max().item()),
                                   msg=lambda m: f"gradient of {leaf}: {m}")


@pytest.mark.parametrize("name", list(_global_cases(2)))
def test_ddp_average_equals_single_process_on_global_batch(ranks, name):
    world_size, saved = ranks
    per_rank = [rank_saved["global"][name] for rank_saved in saved]
    _assert_ddp_average_is_global(_global_cases(world_size)[name], per_rank, range(world_size))


def test_process_group_gathers_over_its_ranks_only(ranks):
    world_size, saved = ranks
    _assert_ddp_average_is_global(_global_cases(world_size)[SUBGROUP_CASE],
                                  [saved[rank]["subgroup"] for rank in SUBGROUP_RANKS], SUBGROUP_RANKS)


def test_an_empty_global_batch_is_the_same_error_on_every_rank(ranks):
    world_size, saved = ranks
    errors = {rank_saved["empty_global_batch"] for rank_saved in saved}
    assert errors == {f"the global batch is empty: every one of the {world_size} ranks passed 0 rows "
                      f"(shape (0, {DIM}) here); a rank may hold no rows, but not all of them"}


def test_open_clip_local_loss_without_gathered_gradients_needs_rows_on_every_rank(ranks):
    world_size, saved = ranks
    errors = {rank_saved["open_clip_local_loss_uneven"] for rank_saved in saved}
    if 0 not in UNEVEN_ROWS[world_size]:
        assert errors == {"no error"}
    else:
        assert errors == {f"local_loss=True with gather_with_grad=False averages each rank's own "
                          f"rows, so every rank needs one; got row counts {UNEVEN_ROWS[world_size]}"}


def test_one_process_refuses_an_empty_batch():
    nothing = torch.zeros(0, DIM)
    with pytest.raises(ValueError, match="z1 must have at least one row"):
        fl.nt_xent(nothing, nothing, gather_distributed=True)


@pytest.mark.parametrize("name", list(DDP_MODELS))
def test_ddp_model_parameter_gradients_equal_single_process(ranks, name):
    world_size, saved = ranks
    want = _ddp_grads(name, world_size)
    for rank, rank_saved in enumerate(saved):
        got = rank_saved["ddp"][name]
        for parameter, grad in want.items():
            torch.testing.assert_close(got[parameter], grad, **TOLERANCE,
                                       msg=lambda m: f"rank {rank}, {parameter}: {m}")


PEER_SHARED = ("scale", "bias")  # one parameter on every rank: DDP sees the mean of its gradients


@pytest.mark.parametrize("name", PEER_CASES)
def test_matches_peer_in_distributed_mode(ranks, name):
    """Every rank's loss and feature gradients; the shared scalars' gradients summed over the
    ranks (fused CLIP splits them between the ranks differently from open_clip)."""
    world_size, saved = ranks
    group = name.split("_")[0]
    if group in saved[0]["skipped"]:
        pytest.skip(saved[0]["skipped"][group])
    results = [rank_saved["peers"][name] for rank_saved in saved]
    for rank, ((ours, our_grads), (theirs, their_grads)) in enumerate(results):
        torch.testing.assert_close(ours, theirs, **TOLERANCE, msg=lambda m: f"rank {rank} loss: {m}")
        for leaf, their_grad in their_grads.items():
            if leaf not in PEER_SHARED:
                torch.testing.assert_close(our_grads[leaf], their_grad, **TOLERANCE,
                                           msg=lambda m: f"rank {rank}, gradient of {leaf}: {m}")
    for leaf in PEER_SHARED:
        ours = sum(our_grads[leaf] for (_, our_grads), _ in results)
        theirs = sum(their_grads[leaf] for _, (_, their_grads) in results)
        torch.testing.assert_close(ours, theirs, **TOLERANCE,
                                   msg=lambda m: f"gradient of {leaf} summed over the ranks: {m}")


def test_clip_scores_once_and_gathers_only_the_texts(ranks):
    """Per rank and step: one similarity pass of its images against all texts, forward and
    backward; received: the texts (the padded largest batch of every other rank) and, backward,
    the gradients of its own, the row counts, and three all-reduces of N statistics (ring)."""
    world_size, saved = ranks
    counts = UNEVEN_ROWS[world_size]
    texts = (world_size - 1) * max(counts) * DIM * 8  # float64
    row_counts = (world_size - 1) * 8
    statistics = 3 * (2 * (world_size - 1) * sum(counts) * 8 // world_size)
    for rank, rank_saved in enumerate(saved):
        collectives, passes = rank_saved["communication"]
        scored = [(counts[rank], sum(counts))] if counts[rank] else []  # no rows: no kernel
        assert passes == {direction: scored for direction in ("lse_forward", "lse_backward")}, f"rank {rank}"
        assert collectives["all_reduce"] == {"calls": 3, "bytes": statistics}, f"rank {rank}"
        assert sum(op["bytes"] for op in collectives.values()) == (
            2 * texts + row_counts + statistics), f"rank {rank}: {collectives}"


# One process


def test_benchmark_one_device_mode_times_both_schemes():
    args = dict(ranks=3, n_local=5, d=4, dtype="float32", repeats=2)
    records = distributed_clip.one_device(args, "cpu")
    assert [r["scheme"] for r in records] == ["two_pass", "one_pass"]
    for record in records:
        assert record["n_global"] == 15 and record["median_ms"] > 0 and record["matmul_ms"] > 0


def _pair(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return _randn(gen, 5, DIM), _randn(gen, 5, DIM)


def test_gathering_without_an_initialized_group_is_the_single_process_loss():
    image, text = _pair()
    assert torch.equal(fl.clip_loss(image, text, 10.0, gather_distributed=True),
                       fl.clip_loss(image, text, 10.0))
    assert torch.equal(fl.nt_xent(image, text, gather_distributed=True), fl.nt_xent(image, text))


@pytest.fixture
def world_of_one():
    """The default process group of this process alone (gloo)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def test_world_of_one_is_the_single_process_loss(world_of_one):
    image, text = _pair()
    got = fl.siglip_loss(image, text, 10.0, -2.0, gather_distributed=True, process_group=world_of_one)
    assert torch.equal(got, fl.siglip_loss(image, text, 10.0, -2.0))


def test_process_group_without_gathering_raises(world_of_one):
    image, text = _pair()
    with pytest.raises(ValueError, match="process_group was given but gather_distributed=False"):
        fl.clip_loss(image, text, 10.0, process_group=world_of_one)


@pytest.mark.parametrize("call,error,match", [
    (lambda a, b: fl.clip_loss(a, b, 10.0, gather_distributed=1), TypeError,
     "gather_distributed must be a bool, got int 1"),
    (lambda a, b: fl.nt_xent(a, b, gather_distributed=True, process_group="world"), TypeError,
     "process_group must be None .* got str"),
    (lambda a, b: fl.SupConLoss(gather_distributed="yes")(a, torch.zeros(5, dtype=torch.long)),
     TypeError, "gather_distributed must be a bool"),
])
def test_bad_distributed_options_raise(call, error, match):
    with pytest.raises(error, match=match):
        call(*_pair())
