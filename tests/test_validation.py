"""Bad input raises TypeError / ValueError before any compute, naming the argument."""

import math

import pytest
import torch

import fused_losses as fl
from fused_losses.backends import BackendUnavailable

A = torch.randn(6, 4)
B = torch.randn(6, 4)


@pytest.mark.parametrize("call,error,match", [
    # shapes
    (lambda: fl.clip_loss(torch.randn(6), B, 10.0), ValueError, "image_features must be 2-D"),
    (lambda: fl.clip_loss(A, torch.randn(6, 5), 10.0), ValueError, "same embedding dim"),
    (lambda: fl.clip_loss(A, torch.randn(5, 4), 10.0), ValueError, "same number of rows"),
    (lambda: fl.siglip_loss(A, torch.randn(5, 4), 10.0, 0.0), ValueError, "same number of rows"),
    (lambda: fl.nt_xent(A, torch.randn(7, 4)), ValueError, "z1 and z2"),
    (lambda: fl.npairs_loss(A, torch.randn(7, 4)), ValueError, "anchors and positives"),
    (lambda: fl.clip_loss(torch.randn(0, 4), torch.randn(0, 4), 10.0), ValueError, "at least one row"),
    (lambda: fl.supcon_loss(torch.randn(0, 4), torch.zeros(0, dtype=torch.long)), ValueError, "at least one row"),
    (lambda: fl.info_nce(A, torch.randn(3, 4)), ValueError, "keys must have at least as many rows"),
    # dtypes and devices
    (lambda: fl.clip_loss(A.long(), B.long(), 10.0), TypeError, "image_features must be float16"),
    (lambda: fl.clip_loss(A, B.double(), 10.0), TypeError, "same dtype"),
    (lambda: fl.clip_loss(A.tolist(), B, 10.0), TypeError, "image_features must be a torch.Tensor"),
    (lambda: fl.clip_loss(A, B.to("meta"), 10.0), ValueError, "same device"),
    # temperature / scale / bias
    (lambda: fl.clip_loss(A, B, 0.0), ValueError, "logit_scale must be finite and > 0, got 0.0"),
    (lambda: fl.clip_loss(A, B, -1.0), ValueError, "logit_scale must be finite and > 0"),
    (lambda: fl.clip_loss(A, B, math.inf), ValueError, "logit_scale must be finite and > 0"),
    (lambda: fl.clip_loss(A, B, torch.tensor(float("nan"))), ValueError, "logit_scale must be finite"),
    (lambda: fl.clip_loss(A, B, torch.tensor([1.0, 2.0])), ValueError, "logit_scale must be a float or a 0-d tensor"),
    (lambda: fl.clip_loss(A, B, "10"), TypeError, "logit_scale must be a float"),
    (lambda: fl.clip_loss(A, B, True), TypeError, "logit_scale must be a float"),
    (lambda: fl.clip_loss(A, B, torch.tensor(3)), TypeError, "logit_scale must be a floating-point tensor"),
    (lambda: fl.info_nce(A, B, 0.0), ValueError, "temperature must be finite and > 0"),
    (lambda: fl.nt_xent(A, B, temperature=-0.5), ValueError, "temperature must be finite and > 0"),
    (lambda: fl.supcon_loss(A, torch.arange(6), temperature=float("nan")), ValueError, "temperature"),
    (lambda: fl.siglip_loss(A, B, 10.0, float("inf")), ValueError, "logit_bias must be finite"),
    (lambda: fl.siglip_loss(A, B, 10.0, torch.tensor(float("nan"))), ValueError, "logit_bias must be finite"),
    (lambda: fl.siglip_loss(A, B, 10.0, None), TypeError, "logit_bias must be a float"),
    # label smoothing, targets, labels
    (lambda: fl.clip_loss(A, B, 10.0, label_smoothing=1.0), ValueError, r"label_smoothing must be in \[0, 1\)"),
    (lambda: fl.info_nce(A, B, label_smoothing=-0.1), ValueError, "label_smoothing"),
    (lambda: fl.info_nce(A, B, targets=torch.arange(6.0)), TypeError, "targets must be an integer tensor"),
    (lambda: fl.info_nce(A, B, targets=torch.arange(5)), ValueError, r"targets must have shape \(6,\)"),
    (lambda: fl.info_nce(A, B, targets=torch.tensor([0, 1, 2, 3, 4, 6])), ValueError, r"targets must lie in \[0, 6\)"),
    (lambda: fl.info_nce(A, B, targets=torch.tensor([0, 1, 2, 3, 4, -1])), ValueError, "got values in"),
    (lambda: fl.supcon_loss(A, torch.zeros(6)), TypeError, "labels must be an integer tensor"),
    (lambda: fl.supcon_loss(A, torch.zeros(6, dtype=torch.bool)), TypeError, "labels must be an integer"),
    (lambda: fl.supcon_loss(A, torch.zeros(5, dtype=torch.long)), ValueError, r"labels must have shape \(6,\)"),
    (lambda: fl.supcon_loss(A, [0] * 6), TypeError, "labels must be a torch.Tensor"),
    (lambda: fl.npairs_loss(A, B, l2_reg=-1.0), ValueError, "l2_reg must be a finite float >= 0"),
    # options
    (lambda: fl.clip_loss(A, B, 10.0, reduction="avg"), ValueError, "reduction must be one of"),
    (lambda: fl.clip_loss(A, B, 10.0, backend="jax"), ValueError, "backend must be one of"),
    (lambda: fl.clip_loss(A, B, 10.0, normalize=1), TypeError, "normalize must be a bool"),
    (lambda: fl.similarity_lse(A, B, rows=False, cols=False), ValueError, "rows=True or cols=True"),
    (lambda: fl.similarity_lse(A, B, diag_offset=1.5), TypeError, "diag_offset must be an int"),
    (lambda: fl.similarity_lse(A, B, eps=0.0), ValueError, "eps must be a finite float > 0"),
    (lambda: fl.similarity_lse(A, B, chunk_size=0), ValueError, "chunk_size must be a positive int"),
    (lambda: fl.similarity_softplus(A, B, 1.0, float("nan")), ValueError, "bias must be finite"),
    # cosine embedding loss
    (lambda: fl.cosine_embedding_loss(A, B, torch.ones(5)), ValueError, r"target must be a tensor of shape \(6,\)"),
    (lambda: fl.cosine_embedding_loss(A, B, torch.zeros(6)), ValueError, "target must hold only 1 or -1"),
    (lambda: fl.cosine_embedding_loss(A, B, torch.ones(6), margin=2.0), ValueError, r"margin must be a float in \[-1, 1\]"),
    # modules
    (lambda: fl.ClipLoss()(A, B), ValueError, "forward needs logit_scale"),
    (lambda: fl.SigLipLoss()(A, B, 10.0), ValueError, "forward needs logit_bias"),
    (lambda: fl.ClipLoss(learn_logit_scale=True, init_logit_scale=1000.0), ValueError, "init logit scale"),
    (lambda: fl.ClipLoss(reduction="avg"), ValueError, "reduction must be one of"),
    (lambda: fl.ClipLoss(label_smoothing=2.0), ValueError, "label_smoothing"),
    (lambda: fl.SigLipLoss(backend="jax"), ValueError, "backend must be one of"),
    (lambda: fl.InfoNCELoss(temperature=0.0), ValueError, "temperature must be finite and > 0"),
    (lambda: fl.NTXentLoss(temperature=-1.0), ValueError, "temperature must be finite and > 0"),
    (lambda: fl.SupConLoss(normalize="yes"), TypeError, "normalize must be a bool"),
    (lambda: fl.NPairsLoss(temperature=float("nan")), ValueError, "temperature"),
    (lambda: fl.CosineEmbeddingLoss(reduction="max"), ValueError, "reduction must be one of"),
])
def test_bad_input_raises_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_unavailable_backend_says_why():
    if "cuda" in fl.available_backends(torch.device("cpu")):
        pytest.skip("the cuda backend runs here")
    with pytest.raises(BackendUnavailable, match="backend='cuda' is not available on cpu: .+"):
        fl.clip_loss(A, B, 10.0, backend="cuda")


def test_triton_on_cpu_without_interpreter_says_why(monkeypatch):
    from fused_losses.backends import unavailable_reason
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = unavailable_reason("triton", torch.device("cpu"))
    assert reason is not None and "TRITON_INTERPRET" in reason


def test_inputs_are_never_modified():
    a, b = torch.randn(7, 5), torch.randn(7, 5)
    labels = torch.tensor([0, 1, 0, 1, 2, 2, 0])
    before = [t.clone() for t in (a, b, labels)]
    fl.clip_loss(a, b, 10.0, label_smoothing=0.1)
    fl.siglip_loss(a, b, 10.0, -1.0)
    fl.nt_xent(a, b)
    fl.supcon_loss(a, labels)
    fl.npairs_loss(a, b, l2_reg=0.1)
    fl.info_nce(a, b)
    for original, now in zip(before, (a, b, labels)):
        assert torch.equal(original, now)
