"""Type aliases of the public signatures."""

from typing import Union

from torch import Tensor
from torch.distributed import ProcessGroup  # a stub class where torch has no distributed support

# A temperature, logit scale or bias: a Python number or a 0-d tensor (which gets a gradient when
# it requires one).
Scalar = Union[float, Tensor]

__all__ = ["ProcessGroup", "Scalar"]
