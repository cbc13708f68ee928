"""User code that must type-check against fused_losses (README's Usage calls); never run."""

from typing import Dict, List, Optional, Tuple

import torch
from sentence_transformers import SentenceTransformer
from torch import Tensor

import fused_losses as fl
from fused_losses.integrations.open_clip import ClipLoss as OpenClipLoss
from fused_losses.integrations.pytorch_metric_learning import SupConLoss as PmlSupConLoss
from fused_losses.integrations.sentence_transformers import CachedMultipleNegativesRankingLoss

img, txt, labels = torch.randn(8, 4), torch.randn(8, 4), torch.arange(8) % 3
temperature = torch.nn.Parameter(torch.tensor(0.07))

loss: Tensor = fl.clip_loss(img, txt, 100.0)
loss = fl.clip_loss(img, txt, temperature.exp(), normalize=False, reduction="none", backend="torch")
loss = fl.siglip_loss(img, txt, 10.0, -10.0, gather_distributed=False, process_group=None)
loss = fl.info_nce(img, txt, temperature, targets=torch.arange(8), label_smoothing=0.1)
loss = fl.nt_xent(img, txt, temperature=0.5)
loss = fl.supcon_loss(img, labels, 0.1)
loss = fl.npairs_loss(img, txt, normalize=False, l2_reg=2e-3)
loss = fl.cosine_embedding_loss(img, txt, torch.ones(8), margin=0.0)
loss = fl.reference.clip_loss(img.double(), txt.double(), 100.0)
lse: Tuple[Optional[Tensor], Optional[Tensor]] = fl.similarity_lse(img, txt, 10.0, cols=True)
lse = fl.similarity_lse(img, txt, 10.0, row_labels=labels, col_labels=labels, same_label="only")
softplus: Tensor = fl.similarity_softplus(img, txt, 10.0, -10.0)
loss = fl.cached_backward(fl.clip_loss, [torch.nn.Linear(4, 4)] * 2, [img, txt], chunk_size=2)

module_loss = fl.ClipLoss(learn_logit_scale=True)(img, txt)
module_loss = fl.SigLipLoss()(img, txt, 10.0, -10.0)
module_loss = fl.InfoNCELoss(temperature, label_smoothing=0.1)(img, txt)
module_loss = fl.SupConLoss(0.1).forward(img, labels)
module_loss = OpenClipLoss()(img, txt, torch.tensor(100.0))
module_loss = PmlSupConLoss(temperature=0.1)(img, labels)
st_loss = CachedMultipleNegativesRankingLoss(SentenceTransformer(), 30.0, mini_batch_size=16,
                                             directions=("query_to_doc", "doc_to_query"),
                                             backend="torch")

names: List[str] = fl.available_backends("cpu")
status: Dict[str, Optional[str]] = fl.backend_status(torch.device("cpu"))
version: str = fl.__version__
