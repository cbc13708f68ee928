"""Drop-in replacements for the contrastive losses of other libraries, computed by fused_losses.

Each class keeps its library's constructor and forward signature and gives the same numbers
(within floating-point tolerance), without the N x M logits:

    fused_losses.integrations.open_clip                 ClipLoss, SigLipLoss
    fused_losses.integrations.pytorch_metric_learning   NTXentLoss, SupConLoss, NPairsLoss
    fused_losses.integrations.lightly                   NTXentLoss

Importing them never imports the library they imitate.
"""
