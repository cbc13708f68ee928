"""torch.compile of models that end in a fused loss (CPU, torch backend).

fullgraph=True proves there is no graph break: the primitives are torch.library custom ops with
fake implementations and a registered autograd formula. The compiled model must give the eager
loss and gradients. "aot_eager" traces forward and backward like inductor does, without code
generation; one model goes through inductor itself.
"""

import pytest
import torch
from torch import nn

import fused_losses as fl
from fused_losses import primitives
from fused_losses.integrations import lightly, open_clip


class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 6))

    def forward(self, x):
        return self.layers(x)


class TwoViewModel(nn.Module):
    """Encodes two views and scores them with ``loss`` (a pair loss module)."""

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.encoder, self.loss = _Encoder(), loss

    def forward(self, view1, view2):
        return self.loss(self.encoder(view1), self.encoder(view2))


class SupervisedModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = _Encoder()
        self.loss = fl.SupConLoss(nn.Parameter(torch.tensor(0.2)), backend="torch")

    def forward(self, x, labels):
        return self.loss(self.encoder(x), labels)


MODELS = {
    "clip": lambda: TwoViewModel(fl.ClipLoss(learn_logit_scale=True, backend="torch")),
    "siglip": lambda: TwoViewModel(fl.SigLipLoss(learn_logit_scale=True, backend="torch")),
    "nt_xent": lambda: TwoViewModel(fl.NTXentLoss(nn.Parameter(torch.tensor(0.5)), backend="torch")),
    "supcon": SupervisedModel,
}


def _inputs(name, batch):
    gen = torch.Generator().manual_seed(batch)
    if name == "supcon":
        return torch.randn(batch, 8, generator=gen), torch.randint(0, 3, (batch,), generator=gen)
    return torch.randn(batch, 8, generator=gen), torch.randn(batch, 8, generator=gen)


def _loss_and_grads(run, model, inputs):
    """The loss of run(*inputs) and the gradients it leaves in ``model``'s parameters."""
    model.zero_grad()
    loss = run(*inputs)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("name,compiler", [("clip", "inductor"), ("siglip", "aot_eager"),
                                           ("nt_xent", "aot_eager"), ("supcon", "aot_eager")])
def test_compiled_model_matches_eager(name, compiler):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MODELS[name]()
    compiled = torch.compile(model, fullgraph=True, backend=compiler, dynamic=True)
    for batch in (10, 7):  # a second batch size reuses the dynamic-shape graph
        inputs = _inputs(name, batch)
        got_loss, got_grads = _loss_and_grads(compiled, model, inputs)
        want_loss, want_grads = _loss_and_grads(model, model, inputs)
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
        for parameter, want in want_grads.items():
            torch.testing.assert_close(got_grads[parameter], want, rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"gradient of {parameter}: {m}")


def _signs(labels):
    return 1 - 2 * (labels % 2)


def _module_call(module, *arguments):
    """``module`` (built once, so its float options are attributes dynamo sees as inputs) as a
    function of (a, b, labels, scale), called with the ``arguments`` named among a, b, labels,
    signs (+1 / -1 from the labels) and scale."""
    def call(a, b, labels, scale):
        given = dict(a=a, b=b, labels=labels, signs=_signs(labels), scale=scale)
        return module(*[given[name] for name in arguments])
    return call


# Every loss, module and adapter that compiles to one graph, with Python-float options: defaults
# and constructor values become symbolic floats under dynamic=True, and so do floats passed per
# call (``scale``). The pytorch-metric-learning adapters count and pick pairs by label (control
# flow and shapes that depend on values, as in pytorch-metric-learning) and cannot be one graph.
FLOAT_OPTIONS = {
    "clip_loss": lambda a, b, y, s: fl.clip_loss(a, b, s, label_smoothing=0.1, backend="torch"),
    "siglip_loss": lambda a, b, y, s: fl.siglip_loss(a, b, s, -s / 2, backend="torch"),
    "info_nce": lambda a, b, y, s: fl.info_nce(a, b, 1 / s, targets=y, label_smoothing=0.2,
                                               backend="torch"),
    "nt_xent": lambda a, b, y, s: fl.nt_xent(a, b, backend="torch"),
    "supcon_loss": lambda a, b, y, s: fl.supcon_loss(a, y, backend="torch"),
    "npairs_loss": lambda a, b, y, s: fl.npairs_loss(a, b, temperature=1 / s, l2_reg=0.01,
                                                     backend="torch"),
    "cosine_embedding_loss": lambda a, b, y, s: fl.cosine_embedding_loss(a, b, _signs(y),
                                                                         margin=s / 100),
    "similarity_lse": lambda a, b, y, s: fl.similarity_lse(a, b, s, cols=True, backend="torch")[1].sum(),
    "similarity_softplus": lambda a, b, y, s: fl.similarity_softplus(a, b, s, 1.5, backend="torch").sum(),
    "ClipLoss": _module_call(fl.ClipLoss(label_smoothing=0.1, backend="torch"), "a", "b", "scale"),
    "SigLipLoss": _module_call(fl.SigLipLoss(learn_logit_scale=True, init_logit_bias=-3.0,
                                             backend="torch"), "a", "b"),
    "InfoNCELoss": _module_call(fl.InfoNCELoss(0.07, label_smoothing=0.1, backend="torch"),
                                "a", "b", "labels"),
    "NTXentLoss": _module_call(fl.NTXentLoss(backend="torch"), "a", "b"),
    "SupConLoss": _module_call(fl.SupConLoss(backend="torch"), "a", "labels"),
    "NPairsLoss": _module_call(fl.NPairsLoss(l2_reg=0.01, backend="torch"), "a", "b"),
    "CosineEmbeddingLoss": _module_call(fl.CosineEmbeddingLoss(0.2), "a", "b", "signs"),
    "open_clip.ClipLoss": _module_call(open_clip.ClipLoss(backend="torch"), "a", "b", "scale"),
    "open_clip.SigLipLoss": _module_call(open_clip.SigLipLoss(backend="torch"), "a", "b", "scale",
                                         "scale"),
    "lightly.NTXentLoss": _module_call(lightly.NTXentLoss(backend="torch"), "a", "b"),
}


@pytest.mark.parametrize("name", list(FLOAT_OPTIONS))
def test_float_options_compile_to_one_dynamic_graph(name, gen):
    """One graph (dynamo's trace, run as is: what AOT autograd makes of a graph is checked above)
    for several batch sizes and float values, equal to eager."""
    torch._dynamo.reset()
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    loss = FLOAT_OPTIONS[name]
    compiled = torch.compile(loss, fullgraph=True, dynamic=True, backend=counting_backend)
    for rows, scale in ((6, 10.0), (9, 12.5), (11, 7.0)):
        a = torch.randn(rows, 5, generator=gen, requires_grad=True)
        b = torch.randn(rows, 5, generator=gen)
        labels = torch.randint(0, 3, (rows,), generator=gen)
        got, want = compiled(a, b, labels, scale), loss(a, b, labels, scale)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.autograd.grad(got, a)[0], torch.autograd.grad(want, a)[0],
                                   rtol=1e-4, atol=1e-6)
    assert len(graphs) == 1


def test_custom_ops_pass_opcheck():
    """Schema, fake implementation and autograd registration of every primitive op."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(7, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    y, z = torch.tensor([0, 1, 0, 2, 1]), torch.tensor([1, 1, 0, 2, 0, 1, 2])
    calls = [
        (primitives._lse_op, (q, k, scale, True, 1e-12, None, None, None, True, True, True, "torch", None)),
        (primitives._lse_op, (q, q, scale, False, 1e-12, 0, None, None, True, True, False, "torch", 2)),
        (primitives._lse_op, (q, k, scale, True, 1e-12, 1, y, z, False, True, True, "torch", 3)),
        (primitives._softplus_op, (q, k, scale, bias, True, 1e-12, -1, "torch", None)),
    ]
    for op, args in calls:
        results = torch.library.opcheck(op, args)
        assert set(results.values()) == {"SUCCESS"}, results


def test_validation_errors_stay_eager_errors_under_compile():
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b: fl.clip_loss(a, b, 10.0, backend="torch"),
                             backend="aot_eager")
    with pytest.raises(ValueError, match="same number of rows"):
        compiled(torch.randn(4, 3), torch.randn(5, 3))
