"""fused_losses: large-batch contrastive losses without the N x M logits matrix.

    import fused_losses as fl
    loss = fl.clip_loss(image_features, text_features, logit_scale)

Losses (functions and nn.Modules), the two similarity primitives they are built on, the textbook
``fl.reference`` versions used as ground truth, the backend registry, and ``fl.cached_backward``
(gradient caching: encoder activations held for one chunk of the batch at a time).
"""

from fused_losses import reference
from fused_losses.backends import BackendUnavailable, available_backends, backend_status
from fused_losses.functional import (
    clip_loss, cosine_embedding_loss, info_nce, npairs_loss, nt_xent, siglip_loss, supcon_loss,
)
from fused_losses.gradient_cache import cached_backward
from fused_losses.modules import (
    ClipLoss, CosineEmbeddingLoss, InfoNCELoss, NPairsLoss, NTXentLoss, SigLipLoss, SupConLoss,
)
from fused_losses.primitives import similarity_lse, similarity_softplus

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable", "ClipLoss", "CosineEmbeddingLoss", "InfoNCELoss", "NPairsLoss",
    "NTXentLoss", "SigLipLoss", "SupConLoss", "available_backends", "backend_status",
    "cached_backward", "clip_loss", "cosine_embedding_loss", "info_nce", "npairs_loss", "nt_xent",
    "reference", "siglip_loss", "similarity_lse", "similarity_softplus", "supcon_loss",
]
