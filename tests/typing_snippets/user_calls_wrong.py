"""User calls with a wrong argument type: mypy must report each line marked ``# E: <code>``."""

import torch

import fused_losses as fl

img, txt, labels = torch.randn(8, 4), torch.randn(8, 4), torch.arange(8) % 3

fl.clip_loss(img, txt, "100")  # E: arg-type
fl.clip_loss(img.tolist(), txt, 100.0)  # E: arg-type
fl.clip_loss(img, txt, 100.0, normalise=False)  # E: call-arg
fl.info_nce(img, txt, targets=[0, 1, 2])  # E: arg-type
fl.nt_xent(img, txt, 0.5, reduction=None)  # E: arg-type
fl.supcon_loss(img, labels, temperature=None)  # E: arg-type
fl.similarity_lse(img, txt, scale="10")  # E: arg-type
fl.ClipLoss(learn_logit_scale="yes")  # E: arg-type
fl.InfoNCELoss(temperature="0.07")  # E: arg-type
fl.reference.siglip_loss(img, txt, 10.0, logit_bias="-10")  # E: arg-type
name: str = fl.clip_loss(img, txt, 100.0)  # E: assignment
