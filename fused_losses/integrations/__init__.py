"""Drop-in replacements for the contrastive losses of other libraries, computed by fused_losses.

Each class keeps its library's constructor and forward signature and gives the same numbers
(within floating-point tolerance), without the N x M logits:

    fused_losses.integrations.open_clip                 ClipLoss, SigLipLoss
    fused_losses.integrations.pytorch_metric_learning   NTXentLoss, SupConLoss, NPairsLoss
    fused_losses.integrations.lightly                   NTXentLoss
    fused_losses.integrations.sentence_transformers     MultipleNegativesRankingLoss,
        CachedMultipleNegativesRankingLoss, and the symmetric variants of both

The first three never import the library they imitate. The sentence-transformers classes
subclass the library's own (its trainer, configuration and model cards keep working), so that
module needs sentence-transformers installed.
"""
