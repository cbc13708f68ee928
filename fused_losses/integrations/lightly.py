"""lightly's NTXentLoss (lightly.loss.NTXentLoss, lightly 1.6), fused.

    from fused_losses.integrations.lightly import NTXentLoss

``NTXentLoss(temperature=0.5, memory_bank_size=0, gather_distributed=False)`` and
``forward(out0, out1)`` as in lightly, with its constructor checks and the same values:

- without a memory bank, SimCLR's NT-Xent over the 2N views (``functional.nt_xent``); with
  gather_distributed, against the views of every rank (ranks may hold different batch sizes);
- with ``memory_bank_size=(num_features, dim)``, MoCo's: each out0 row against its out1 partner and
  the bank's entries as extra negatives (the bank as it was before this call), then, if out0
  requires grad, the normalized out1 rows are enqueued (gathered from every rank first with
  gather_distributed), exactly like lightly's MemoryBankModule (``MemoryBank`` here: importing
  lightly's needs torchvision).

A negative temperature (which lightly accepts) is computed by lightly's own class, after a
``FallbackWarning``. Importing this module does not import lightly.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fused_losses import _validation as check
from fused_losses import distributed, functional
from fused_losses.integrations._fallback import original_class, warn_fallback
from fused_losses.primitives import lse_statistics


class MemoryBank(nn.Module):
    """lightly.models.modules.memory_bank.MemoryBankModule (lightly 1.6): a FIFO queue of
    ``size = (num_features, dim)`` rows (``size=0``: disabled), initialized with random unit rows.

    ``forward(output, labels=None, update=False)`` returns ``(output, bank)`` with a detached copy
    of the bank as it was before the call ((dim, num_features) if ``feature_dim_first``, else
    (num_features, dim); None when disabled), and enqueues ``output`` if ``update``.
    """

    bank: Tensor
    bank_ptr: Tensor

    def __init__(self, size: Union[int, Sequence[int]], gather_distributed: bool = False,
                 feature_dim_first: bool = True):
        super().__init__()
        size_tuple = (size,) if isinstance(size, int) else tuple(size)
        if any(x < 0 for x in size_tuple):
            raise ValueError(f"Illegal memory bank size {size}, all entries must be non-negative.")
        if isinstance(size, int) and size > 0:
            raise ValueError(
                f"Memory bank size 'size={size}' does not specify the feature dimension. Set it "
                f"with 'size=({size}, dim)', or pass 'size=0' to disable the memory bank.")
        if size_tuple != (0,) and len(size_tuple) != 2:
            raise ValueError(f"Illegal memory bank size {size}, expected a (num_features, dim) "
                             f"tuple, or 'size=0' to disable the memory bank.")
        self.size = size_tuple
        self.gather_distributed = gather_distributed
        self.feature_dim_first = feature_dim_first
        self.register_buffer("bank", torch.empty(size=size_tuple, dtype=torch.float), persistent=False)
        self.register_buffer("bank_ptr", torch.empty(1, dtype=torch.long), persistent=False)
        if len(size_tuple) > 1:
            self._init_memory_bank(size_tuple)

    @property
    def enabled(self) -> bool:
        return self.size[0] != 0

    def forward(self, output: Tensor, labels: Optional[Tensor] = None,
                update: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        if not self.enabled:
            return output, None
        bank = self.bank.clone().detach()
        if self.feature_dim_first:
            bank = bank.transpose(0, -1)
        if update:
            self._dequeue_and_enqueue(output)
        return output, bank

    @torch.no_grad()
    def _init_memory_bank(self, size: Tuple[int, ...]) -> None:
        # Same random draws as lightly's, so a seeded run starts from the same bank.
        self.bank = F.normalize(torch.randn(size).type_as(self.bank), dim=-1)
        self.bank_ptr = torch.zeros(1).type_as(self.bank_ptr)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, batch: Tensor) -> None:
        if self.gather_distributed:
            batch = distributed.gather_rows(batch.detach()).rows
        batch_size, ptr = batch.shape[0], int(self.bank_ptr)
        if ptr + batch_size >= self.size[0]:
            self.bank[ptr:] = batch[: self.size[0] - ptr].detach()
            self.bank_ptr.zero_()
        else:
            self.bank[ptr: ptr + batch_size] = batch.detach()
            self.bank_ptr[0] = ptr + batch_size


class NTXentLoss(nn.Module):
    """lightly.loss.NTXentLoss, fused (see the module docstring); ``backend`` chooses the kernels."""

    def __init__(self, temperature: float = 0.5, memory_bank_size: Union[int, Sequence[int]] = 0,
                 gather_distributed: bool = False, *, backend: str = "auto"):
        super().__init__()
        check.check_real("temperature", temperature, "a finite float", lambda v: -math.inf < v < math.inf)
        check.check_flag("gather_distributed", gather_distributed)
        check.check_backend(backend)
        self.memory_bank = MemoryBank(size=memory_bank_size, gather_distributed=gather_distributed)
        self.temperature = temperature
        self.gather_distributed = gather_distributed
        self.eps = 1e-8
        self.backend = backend
        if abs(self.temperature) < self.eps:
            raise ValueError(f"Illegal temperature: abs({self.temperature}) < 1e-8")
        if gather_distributed and not torch.distributed.is_available():
            raise ValueError(
                "gather_distributed is True but torch.distributed is not available. Please set "
                "gather_distributed=False or install a torch version with distributed support.")
        self._original = None
        if self.temperature < 0:
            option = f"temperature={temperature!r} (negative)"
            original = original_class("lightly.loss", "NTXentLoss", option)
            self._original = original(temperature, memory_bank_size, gather_distributed)
            self._original_option = option

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        if self._original is not None:
            warn_fallback(self, self._original_option, "lightly.loss.NTXentLoss")
            return self._original(out0, out1)
        if not self.memory_bank.enabled:
            return functional.nt_xent(out0, out1, self.temperature, backend=self.backend,
                                      gather_distributed=self.gather_distributed)
        out0, out1 = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
        _, bank = self.memory_bank(out1, update=out0.requires_grad)
        negatives = (bank.T if self.memory_bank.feature_dim_first else bank).to(out0)
        if negatives.shape[1] != out0.shape[1]:
            raise ValueError(f"memory_bank_size {self.memory_bank.size} holds rows of dim "
                             f"{negatives.shape[1]}, but out0 has dim {out0.shape[1]}")
        scale = functional.inverse_temperature("temperature", self.temperature, out0)
        lse_bank, _ = lse_statistics(out0, negatives, scale, rows=True, cols=False, normalize=False,
                                     backend=self.backend)
        positive = scale * torch.linalg.vecdot(out0.to(scale.dtype), out1.to(scale.dtype))
        # Cross-entropy of [positive, bank logits] with target 0, averaged over the rows.
        return (torch.logaddexp(lse_bank, positive) - positive).mean()
