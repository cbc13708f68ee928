"""lightly's NTXentLoss (lightly.loss.NTXentLoss, lightly 1.x), fused.

    from fused_losses.integrations.lightly import NTXentLoss

``NTXentLoss(temperature, gather_distributed)`` and ``forward(out0, out1)`` as in lightly, with the
same values (``functional.nt_xent``); with gather_distributed, ranks may hold different batch
sizes. The memory bank (MoCo-style negatives, ``memory_bank_size > 0``) is not supported.
"""

from __future__ import annotations

from typing import Tuple, Union

from torch import Tensor, nn

from fused_losses import functional


class NTXentLoss(nn.Module):
    """lightly.loss.NTXentLoss without a memory bank: SimCLR's NT-Xent over out0 and out1 (N, D)."""

    def __init__(self, temperature: float = 0.5, memory_bank_size: Union[int, Tuple[int, ...]] = 0,
                 gather_distributed: bool = False, *, backend: str = "auto"):
        super().__init__()
        bank_rows = memory_bank_size if isinstance(memory_bank_size, int) else memory_bank_size[0]
        if bank_rows != 0:
            raise ValueError(f"memory_bank_size must be 0 (no memory bank), got "
                             f"{memory_bank_size!r}; use lightly's NTXentLoss for MoCo-style "
                             f"memory-bank negatives")
        self.temperature, self.memory_bank_size = temperature, memory_bank_size
        self.gather_distributed, self.backend = gather_distributed, backend

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        return functional.nt_xent(out0, out1, self.temperature, backend=self.backend,
                                  gather_distributed=self.gather_distributed)
