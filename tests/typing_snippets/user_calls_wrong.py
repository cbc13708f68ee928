"""User calls with a wrong argument type: mypy must report each line marked ``# E: <code>``."""

import torch
from sentence_transformers import SentenceTransformer

import fused_losses as fl
from fused_losses.integrations.sentence_transformers import MultipleNegativesRankingLoss

img, txt, labels = torch.randn(8, 4), torch.randn(8, 4), torch.arange(8) % 3

fl.clip_loss(img, txt, "100")  # E: arg-type
fl.clip_loss(img.tolist(), txt, 100.0)  # E: arg-type
fl.clip_loss(img, txt, 100.0, normalise=False)  # E: call-arg
fl.info_nce(img, txt, targets=[0, 1, 2])  # E: arg-type
fl.nt_xent(img, txt, 0.5, reduction=None)  # E: arg-type
fl.supcon_loss(img, labels, temperature=None)  # E: arg-type
fl.similarity_lse(img, txt, scale="10")  # E: arg-type
fl.similarity_lse(img, txt, row_labels=[0, 1], col_labels=labels)  # E: arg-type
fl.ClipLoss(learn_logit_scale="yes")  # E: arg-type
fl.InfoNCELoss(temperature="0.07")  # E: arg-type
fl.reference.siglip_loss(img, txt, 10.0, logit_bias="-10")  # E: arg-type
name: str = fl.clip_loss(img, txt, 100.0)  # E: assignment
fl.cached_backward(fl.clip_loss, [torch.nn.Linear(4, 4)] * 2, [img, txt], chunk_size="2")  # E: arg-type
MultipleNegativesRankingLoss(SentenceTransformer(), scale="20")  # E: arg-type
