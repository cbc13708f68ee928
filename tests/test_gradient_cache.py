"""fused_losses.cached_backward against the plain backward it replaces: every .grad in float64,
with dropout, shared encoders, container inputs, a learned logit scale, accumulated gradients,
autocast, and DistributedDataParallel encoders on 2 gloo ranks; and its errors."""

import copy
import functools

import pytest
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch import nn

import fused_losses as fl
from tests.ranks import run_on_ranks

DIM_IN, DIM = 5, 4
TOLERANCE = dict(rtol=1e-10, atol=1e-12)


class Encoder(nn.Module):
    """A two-layer MLP (float64) with optional dropout between the layers."""

    def __init__(self, dropout=0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(DIM_IN, 7), nn.Tanh(), nn.Dropout(dropout),
                                 nn.Linear(7, DIM)).double()

    def forward(self, x):
        return self.net(x)


class DictEncoder(Encoder):
    """Takes {"x": (n, DIM_IN), "weight": (n,), "shift": float, "offset": 0-d tensor}."""

    def forward(self, batch):
        return self.net(batch["x"]) * batch["weight"][:, None] + batch["shift"] + batch["offset"]


class SequenceEncoder(Encoder):
    """Takes (x, "tag", [y]) with x, y (n, DIM_IN)."""

    def forward(self, batch):
        x, tag, (y,) = batch
        assert tag == "tag"
        return self.net(x + 2 * y)


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _grads(*modules):
    return {f"{index}.{name}": p.grad.clone() for index, module in enumerate(modules)
            for name, p in module.named_parameters()}


def _preset_grads(gen, *modules):
    """Give every parameter an existing gradient, as after an earlier accumulation step."""
    for module in modules:
        for p in module.parameters():
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


def _assert_same(got, want, **tolerance):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], **(tolerance or TOLERANCE),
                                   msg=lambda m: f"{name}: {m}")


def _twins(*modules):
    """The modules, and an independent copy of them (same weights) for the plain backward."""
    return modules, copy.deepcopy(modules)


class ClipWithLearnedScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(2.0, dtype=torch.float64))

    def forward(self, images, texts):
        return fl.clip_loss(images, texts, self.log_scale.exp())


@pytest.mark.parametrize("chunk_size", [1, 4, 13, 20])
def test_two_towers_with_learned_scale_and_existing_grads(gen, chunk_size):
    ours, theirs = _twins(Encoder(), Encoder(), ClipWithLearnedScale())
    images, texts = _randn(gen, 13, DIM_IN), _randn(gen, 13, DIM_IN)
    _preset_grads(gen, *ours)
    for ours_module, their_module in zip(ours, theirs):
        for p, q in zip(ours_module.parameters(), their_module.parameters()):
            q.grad = p.grad.clone()
    image_encoder, text_encoder, loss = theirs
    want = loss(image_encoder(images), text_encoder(texts))
    want.backward()
    image_encoder, text_encoder, loss = ours
    got = fl.cached_backward(loss, [image_encoder, text_encoder], [images, texts],
                             chunk_size=chunk_size)
    assert not got.requires_grad
    torch.testing.assert_close(got, want.detach(), **TOLERANCE)
    _assert_same(_grads(*ours), _grads(*theirs))


def test_dropout_masks_and_random_state_match_a_plain_chunked_forward(gen):
    """SimCLR: one dropout encoder embeds both views. The plain forward runs the same chunks in
    the same order, so it draws the same masks; the generator ends in the same state."""
    ours, theirs = _twins(Encoder(dropout=0.4))
    views = [_randn(gen, 11, DIM_IN), _randn(gen, 11, DIM_IN)]
    seed = int(torch.randint(0, 2**31, (), generator=gen))
    loss_fn = functools.partial(fl.nt_xent, temperature=0.3)

    torch.manual_seed(seed)
    (encoder,) = theirs
    want = loss_fn(*(torch.cat([encoder(chunk) for chunk in view.split(3)]) for view in views))
    want.backward()
    state_after_plain = torch.get_rng_state()

    torch.manual_seed(seed)
    (encoder,) = ours
    got = fl.cached_backward(loss_fn, [encoder, encoder], views, chunk_size=3)
    torch.testing.assert_close(got, want.detach(), **TOLERANCE)
    _assert_same(_grads(*ours), _grads(*theirs))
    assert torch.equal(torch.get_rng_state(), state_after_plain)


def test_cuda_generator_states_are_saved_and_replayed(gen, monkeypatch):
    """Without a GPU: a stand-in CUDA generator (a counter the encoder draws from) shows that each
    chunk is replayed from the CUDA state it first started from, and that the outer state is
    where the first pass left it."""
    generator = {"state": 0}
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_rng_state",
                        lambda device="cuda": torch.tensor([generator["state"]]))
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda state, device="cuda": generator.update(state=int(state[0])))
    draws = []
    weight = torch.ones((), dtype=torch.float64, requires_grad=True)

    def encoder(x):
        draws.append(generator["state"])
        generator["state"] += 1
        return x * weight

    fl.cached_backward(lambda a: a.sum(), [encoder], [_randn(gen, 5, 3)], chunk_size=2)
    assert draws == [0, 1, 2, 0, 1, 2]
    assert generator["state"] == 3


def test_dict_and_sequence_inputs_with_non_tensor_entries(gen):
    ours, theirs = _twins(DictEncoder(), SequenceEncoder())
    n = 9
    batch = {"x": _randn(gen, n, DIM_IN), "weight": _randn(gen, n), "shift": 0.5,
             "offset": torch.tensor(-1.5, dtype=torch.float64)}
    sequence = (_randn(gen, n, DIM_IN), "tag", [_randn(gen, n, DIM_IN)])
    loss_fn = functools.partial(fl.info_nce, temperature=0.2)
    loss_fn(theirs[0](batch), theirs[1](sequence)).backward()
    fl.cached_backward(loss_fn, list(ours), [batch, sequence], chunk_size=2)
    _assert_same(_grads(*ours), _grads(*theirs))


def test_autocast_runs_both_passes_with_the_callers_settings(gen):
    ours, theirs = _twins(Encoder(), Encoder())
    for module in (*ours, *theirs):
        module.float()
    images, texts = _randn(gen, 10, DIM_IN).float(), _randn(gen, 10, DIM_IN).float()
    loss_fn = functools.partial(fl.clip_loss, logit_scale=10.0)
    # Without the cast-weight cache, each chunk's bf16 weight gradient reaches the float32 .grad
    # on its own in both (with it, the plain backward would sum them in bf16 first).
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        image_encoder, text_encoder = theirs
        want = loss_fn(torch.cat([image_encoder(c) for c in images.split(4)]),
                       torch.cat([text_encoder(c) for c in texts.split(4)]))
        want.backward()
        got = fl.cached_backward(loss_fn, list(ours), [images, texts], chunk_size=4)
    torch.testing.assert_close(got, want.detach())
    _assert_same(_grads(*ours), _grads(*theirs), rtol=1e-6, atol=1e-6)


def test_an_embedding_the_loss_ignores_gets_no_gradient(gen):
    used, ignored = Encoder(), Encoder()
    fl.cached_backward(lambda a, b: a.square().sum(), [used, ignored],
                       [_randn(gen, 4, DIM_IN), _randn(gen, 4, DIM_IN)], chunk_size=3)
    assert all(p.grad is not None for p in used.parameters())
    assert all(p.grad is None for p in ignored.parameters())


def _clip(a, b):
    return fl.clip_loss(a, b, 10.0)


@pytest.mark.parametrize("call,error,match", [
    (lambda e, x: fl.cached_backward(_clip, [e, e], [x, x], chunk_size=0), ValueError,
     "chunk_size must be >= 1, got 0"),
    (lambda e, x: fl.cached_backward(_clip, [e, e], [x, x], chunk_size=2.0), TypeError,
     "chunk_size must be an int >= 1, got float"),
    (lambda e, x: fl.cached_backward(_clip, [e, e], [x, x], chunk_size=True), TypeError,
     "chunk_size must be an int >= 1, got bool"),
    (lambda e, x: fl.cached_backward(_clip, [e, e], [x, x[:5]], chunk_size=2), ValueError,
     "must hold the same number of rows"),
    (lambda e, x: fl.cached_backward(_clip, [e], [x, x], chunk_size=2), ValueError,
     "got 1 encoders and 2 inputs"),
    (lambda e, x: fl.cached_backward(_clip, e, [x], chunk_size=2), TypeError,
     "encoders must be a list or tuple"),
    (lambda e, x: fl.cached_backward(_clip, [e, "e"], [x, x], chunk_size=2), TypeError,
     r"encoders\[1\] must be callable"),
    (lambda e, x: fl.cached_backward(_clip, [e, lambda c: {"emb": e(c)}], [x, x], chunk_size=2),
     TypeError, r"encoders\[1\] must return a tensor of embeddings, got dict"),
    (lambda e, x: fl.cached_backward(_clip, [e, lambda c: e(c)[:1]], [x, x], chunk_size=2),
     ValueError, r"encoders\[1\] must return one embedding per input row"),
    (lambda e, x: fl.cached_backward(_clip, [e, e], [x, {"a": x, "b": x[:3]}], chunk_size=2),
     ValueError, r"inputs\[1\] must have the same size along dim 0.*\['a'\]: 8, .*\['b'\]: 3"),
    (lambda e, x: fl.cached_backward(_clip, [e, e], [x, {"a": "text"}], chunk_size=2),
     ValueError, r"inputs\[1\] must be a tensor or a dict / list / tuple holding tensors"),
    (lambda e, x: fl.cached_backward(lambda a, b: a - b, [e, e], [x, x], chunk_size=2),
     ValueError, r"loss_fn must return a scalar tensor \(one element\), got a tensor of shape "
     r"\(8, 4\)"),
    (lambda e, x: fl.cached_backward(lambda a, b: 1.0, [e, e], [x, x], chunk_size=2),
     ValueError, "loss_fn must return a scalar tensor .* got float"),
])
def test_bad_arguments_raise_before_touching_gradients(gen, call, error, match):
    encoder, x = Encoder(), _randn(gen, 8, DIM_IN)
    with pytest.raises(error, match=match):
        call(encoder, x)
    assert all(p.grad is None for p in encoder.parameters())


def test_needs_grad_mode(gen):
    encoder, x = Encoder(), _randn(gen, 4, DIM_IN)
    with torch.no_grad(), pytest.raises(RuntimeError, match="needs gradients enabled"):
        fl.cached_backward(_clip, [encoder, encoder], [x, x], chunk_size=2)


# DistributedDataParallel on 2 gloo ranks, uneven batches: the cached backward of a DDP encoder
# used for both towers, and of a second one, gives every rank the parameter gradients of the
# plain DDP backward, with as many gradient all-reduces (one sync per call, not per chunk).

RANK_ROWS = [5, 8]


def _counting_hook(counter, bucket):
    """DDP's default all-reduce (average), counting its calls in the hook state ``counter``."""
    counter.append(1)
    return default_hooks.allreduce_hook(None, bucket)


def _ddp_run(rank, cached):
    torch.manual_seed(0)
    shared, other = Encoder(dropout=0.2), Encoder()
    loss = ClipWithLearnedScale()  # not DDP-wrapped: its gradient stays this rank's own
    all_reduces = []
    ddps = [nn.parallel.DistributedDataParallel(m) for m in (shared, other)]
    for ddp in ddps:
        ddp.register_comm_hook(all_reduces, _counting_hook)
    gen = torch.Generator().manual_seed(10 + rank)
    inputs = [_randn(gen, RANK_ROWS[rank], DIM_IN) for _ in range(3)]

    def loss_fn(a, b, c):
        return (loss(a, b) + fl.clip_loss(b, c, 5.0, gather_distributed=True)
                + fl.clip_loss(a, c, 5.0, gather_distributed=True))

    torch.manual_seed(100 + rank)
    encoders = [ddps[0], ddps[0], ddps[1]]
    if cached:
        value = fl.cached_backward(loss_fn, encoders, inputs, chunk_size=3)
    else:
        value = loss_fn(*(torch.cat([e(c) for c in x.split(3)]) for e, x in zip(encoders, inputs)))
        value.backward()
    return value.detach(), _grads(shared, other, loss), len(all_reduces)


def _ddp_runs(rank):
    return {cached: _ddp_run(rank, cached) for cached in (False, True)}


def test_ddp_encoders_sync_once_and_match_plain_ddp_backward(tmp_path):
    for saved in run_on_ranks(_ddp_runs, 2, tmp_path):
        (plain_loss, plain_grads, plain_syncs), (loss, grads, syncs) = saved[False], saved[True]
        torch.testing.assert_close(loss, plain_loss, **TOLERANCE)
        _assert_same(grads, plain_grads)
        assert syncs == plain_syncs == 2  # one bucket per DDP encoder
