"""Drop-in replacements for the contrastive losses of other libraries, computed by fused_losses.

Each class keeps its library's constructor and forward signature and gives the same numbers
(within floating-point tolerance), without the N x M logits:

    fused_losses.integrations.open_clip                 ClipLoss, SigLipLoss
    fused_losses.integrations.pytorch_metric_learning   NTXentLoss, SupConLoss, NPairsLoss
    fused_losses.integrations.lightly                   NTXentLoss
    fused_losses.integrations.sentence_transformers     MultipleNegativesRankingLoss,
        CachedMultipleNegativesRankingLoss, and the symmetric variants of both

What a drop-in cannot fuse, the original class computes, after a ``FallbackWarning`` (filter it
as ``fused_losses.integrations.FallbackWarning``) naming the option. The pytorch-metric-learning drop-ins
subclass its classes, so importing them imports pytorch_metric_learning; the open_clip and lightly
ones import their library only when an option needs the original.
The sentence-transformers classes subclass the library's own (its trainer, configuration and model
cards keep working), so that module needs sentence-transformers installed.
"""

from fused_losses.integrations._fallback import FallbackWarning

__all__ = ["FallbackWarning"]
