"""Gradient caching (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup"): the backward pass of a contrastive loss over any encoders with the encoders'
activation memory bounded by one chunk of the batch.

    loss = fused_losses.cached_backward(loss_fn, [image_encoder, text_encoder], [images, texts],
                                        chunk_size=256)

does to every ``.grad`` what ``loss_fn(image_encoder(images), text_encoder(texts)).backward()``
does, in three steps (DESIGN.md section 7):

1. embed every chunk without a graph, saving the random-number state before each chunk;
2. one loss forward + backward on the detached embeddings: dL/d(embedding), and the gradients of
   the loss's own parameters;
3. embed each chunk again with a graph, under its saved random state, and back-propagate its
   slice of dL/d(embedding).

Only step 2 sees the whole batch, and with a fused loss it needs O(batch x dim) memory. Cost:
one extra forward of the encoders.

The steps are also available separately (``Tower``, ``ChunkedEmbeddings``) for callers that run
step 3 later, e.g. from a hook on the loss tensor during the trainer's ``loss.backward()``
(``fused_losses.integrations.sentence_transformers``).
"""

from __future__ import annotations

import contextlib
import functools
import numbers
from dataclasses import dataclass
from typing import (Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Set,
                    Tuple)

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

Progress = Callable[[Iterable, str], Iterable]


def _no_progress(items: Iterable, description: str) -> Iterable:
    return items


def _tensors(x: Any) -> Iterator[Tuple[str, Tensor]]:
    """(path, tensor) of every tensor in ``x``, a tensor or nested dict / list / tuple."""
    if isinstance(x, Tensor):
        yield "", x
    elif isinstance(x, dict):
        for key, value in x.items():
            yield from ((f"[{key!r}]{path}", t) for path, t in _tensors(value))
    elif isinstance(x, (list, tuple)):
        for index, value in enumerate(x):
            yield from ((f"[{index}]{path}", t) for path, t in _tensors(value))


def batch_size(x: Any, name: str) -> int:
    """Rows of ``x``: the common dim 0 of its tensors with at least one dimension (0-d tensors and
    non-tensor entries are not batched)."""
    sizes = {path: t.shape[0] for path, t in _tensors(x) if t.dim() > 0}
    if not sizes:
        raise ValueError(f"{name} must be a tensor or a dict / list / tuple holding tensors split "
                         f"along dim 0, got {type(x).__name__} without any batched tensor")
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{name}{path}: {size}" for path, size in sizes.items())
        raise ValueError(f"the tensors of {name} must have the same size along dim 0 (the batch), "
                         f"got {listed}")
    rows = next(iter(sizes.values()))
    if rows == 0:
        raise ValueError(f"{name} has an empty batch (0 rows)")
    return rows


def rows(x: Any, begin: int, end: int) -> Any:
    """Rows [begin, end) of ``x``: batched tensors sliced along dim 0, containers rebuilt (fresh
    on every call), 0-d tensors and other entries unchanged."""
    if isinstance(x, Tensor):
        return x[begin:end] if x.dim() > 0 else x
    if isinstance(x, dict):
        return type(x)((key, rows(value, begin, end)) for key, value in x.items())
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # a namedtuple
        return type(x)(*(rows(value, begin, end) for value in x))
    if isinstance(x, (list, tuple)):
        return type(x)(rows(value, begin, end) for value in x)
    return x


def chunk_ranges(total: int, chunk_size: int) -> List[Tuple[int, int]]:
    return [(begin, min(begin + chunk_size, total)) for begin in range(0, total, chunk_size)]


def ddp_module(encoder: Any) -> Optional[DistributedDataParallel]:
    """``encoder`` as a DistributedDataParallel (looking through torch.compile), else None."""
    encoder = getattr(encoder, "_orig_mod", encoder)
    return encoder if isinstance(encoder, DistributedDataParallel) else None


@dataclass
class Tower:
    """One encoder applied to one batched input, chunk by chunk.

    encode: chunk input -> embeddings, a floating tensor with the chunk's rows along dim 0.
    chunk: (begin, end) -> the input rows [begin, end), built afresh on each call (modules may
        write into the dict they get).
    ranges: the chunks' (begin, end), in order.
    module: the module behind ``encode``, for DistributedDataParallel's gradient sync and the
        CUDA devices whose random state to save (None: no DDP; the devices of the inputs and the
        current device only).
    name: how error messages call it, e.g. "encoders[1]".
    """

    encode: Callable[[Any], Tensor]
    chunk: Callable[[int, int], Any]
    ranges: List[Tuple[int, int]]
    module: Optional[nn.Module]
    name: str


def _module_cuda_devices(module: Optional[nn.Module]) -> Set[int]:
    """CUDA devices of the module's parameters and buffers, and the current device; empty while
    CUDA is not initialized (nothing is on a CUDA device then: CUDA is never initialized here)."""
    if not torch.cuda.is_initialized():
        return set()
    devices = {torch.cuda.current_device()}
    if module is not None:
        devices.update(t.get_device() for t in (*module.parameters(), *module.buffers()) if t.is_cuda)
    return devices


def _cuda_devices(chunk: Any, module_devices: Set[int]) -> List[int]:
    """CUDA devices whose generators the chunk's forward may draw from: those of its tensors and
    ``module_devices``."""
    return sorted(module_devices.union(t.get_device() for _, t in _tensors(chunk) if t.is_cuda))


class RandomState:
    """The CPU generator's state and those of some CUDA devices, saved now, replayed later."""

    def __init__(self, cuda_devices: List[int]):
        self.cpu = torch.get_rng_state()
        self.cuda_devices = cuda_devices
        self.cuda = [torch.cuda.get_rng_state(device) for device in cuda_devices]

    @contextlib.contextmanager
    def replayed(self) -> Iterator[None]:
        """Draw from the saved states inside; the generators are as before it afterwards."""
        with torch.random.fork_rng(devices=self.cuda_devices, device_type="cuda"):
            torch.set_rng_state(self.cpu)
            for device, state in zip(self.cuda_devices, self.cuda):
                torch.cuda.set_rng_state(state, device)
            yield


AUTOCAST_DEVICE_TYPES = ("cpu", "cuda")


@dataclass(frozen=True)
class AutocastState:
    """torch.autocast's settings per device type, saved at step 1 and restored for step 3 (which
    may run from a backward hook, outside the caller's autocast region)."""

    settings: Tuple[Tuple[str, bool, torch.dtype], ...]
    cache_enabled: bool

    @classmethod
    def current(cls) -> "AutocastState":
        return cls(tuple((device_type, torch.is_autocast_enabled(device_type),
                          torch.get_autocast_dtype(device_type))
                         for device_type in AUTOCAST_DEVICE_TYPES),
                   torch.is_autocast_cache_enabled())

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for device_type, enabled, dtype in self.settings:
                stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled,
                                                   cache_enabled=self.cache_enabled))
            yield


def _check_embeddings(out: Any, tower: Tower, begin: int, end: int) -> Tensor:
    if not isinstance(out, Tensor):
        raise TypeError(f"{tower.name} must return a tensor of embeddings, got "
                        f"{type(out).__name__} for rows [{begin}, {end})")
    if not out.is_floating_point():
        raise TypeError(f"{tower.name} must return floating-point embeddings, got {out.dtype}")
    if out.dim() == 0 or out.shape[0] != end - begin:
        raise ValueError(f"{tower.name} must return one embedding per input row along dim 0: got "
                         f"shape {tuple(out.shape)} for the {end - begin} rows [{begin}, {end})")
    return out


class ChunkedEmbeddings:
    """Steps 1 and 3 of gradient caching over several towers.

    ``embed`` runs step 1; ``embeddings[t][c]`` is then chunk c of tower t, a detached leaf that
    requires grad (the loss of step 2 is computed on them, e.g. on ``torch.cat(embeddings[t])``).
    After the loss's backward, ``gradients()`` collects their gradients and ``replay`` runs step 3.
    """

    def __init__(self, towers: Sequence[Tower], embeddings: List[List[Tensor]],
                 random_states: List[List[Optional[RandomState]]], autocast: AutocastState):
        self.towers = list(towers)
        self.embeddings = embeddings
        self.random_states = random_states
        self.autocast = autocast

    @classmethod
    def embed(cls, towers: Sequence[Tower], *, save_random_state: bool = True,
              progress: Progress = _no_progress) -> "ChunkedEmbeddings":
        """Step 1: every chunk of every tower, in order, without a graph; the random state before
        each chunk is saved when ``save_random_state`` (needed by ``replay``)."""
        embeddings, random_states = [], []
        for tower in towers:
            tower_embeddings, tower_states = [], []
            module_devices = _module_cuda_devices(tower.module)
            for begin, end in progress(tower.ranges, "Embed mini-batches"):
                chunk = tower.chunk(begin, end)
                tower_states.append(RandomState(_cuda_devices(chunk, module_devices))
                                    if save_random_state else None)
                with torch.no_grad():
                    out = _check_embeddings(tower.encode(chunk), tower, begin, end)
                tower_embeddings.append(out.detach().requires_grad_())
            embeddings.append(tower_embeddings)
            random_states.append(tower_states)
        return cls(towers, embeddings, random_states, AutocastState.current())

    def gradients(self) -> List[List[Optional[Tensor]]]:
        """The gradients the loss's backward left on the chunk embeddings (None: not used)."""
        return [[chunk.grad for chunk in tower] for tower in self.embeddings]

    def _syncing_chunks(self, gradients: List[List[Optional[Tensor]]]) -> Dict[int, Tuple[int, int]]:
        """{id of a DDP module: (tower, chunk) of its last chunk to replay}: the only chunk whose
        backward all-reduces that module's gradients."""
        last = {}
        for t, (tower, tower_gradients) in enumerate(zip(self.towers, gradients)):
            ddp = ddp_module(tower.module)
            for c, gradient in enumerate(tower_gradients):
                if ddp is not None and gradient is not None:
                    last[id(ddp)] = (t, c)
        return last

    def replay(self, gradients: List[List[Optional[Tensor]]], grad_scale: Optional[Tensor] = None,
               progress: Progress = _no_progress) -> None:
        """Step 3: each chunk embedded again with a graph, under its saved random state and the
        autocast settings of step 1, and back-propagated with its gradient (times ``grad_scale``,
        the upstream gradient when replaying from a hook). Chunks without a gradient are skipped.
        A DistributedDataParallel module syncs its gradients once, on its last chunk."""
        syncing = self._syncing_chunks(gradients)
        with torch.enable_grad():
            for t, tower in enumerate(self.towers):
                ddp = ddp_module(tower.module)
                chunks = zip(tower.ranges, gradients[t], self.random_states[t], self.embeddings[t])
                for c, ((begin, end), gradient, random_state, cached) in enumerate(
                        progress(list(chunks), "Embed mini-batches")):
                    if gradient is None:
                        continue
                    if random_state is None:
                        raise RuntimeError("replay needs the random states: embed with "
                                           "save_random_state=True")
                    with (ddp.no_sync() if ddp is not None and syncing[id(ddp)] != (t, c)
                          else contextlib.nullcontext()):
                        with self.autocast.restored(), random_state.replayed():
                            out = _check_embeddings(tower.encode(tower.chunk(begin, end)), tower,
                                                    begin, end)
                        if out.shape != cached.shape:
                            raise RuntimeError(f"{tower.name} returned shape {tuple(out.shape)} "
                                               f"for rows [{begin}, {end}) when embedding them "
                                               f"again, {tuple(cached.shape)} the first time")
                        if out.requires_grad:
                            torch.autograd.backward(
                                out, gradient if grad_scale is None else gradient * grad_scale)


def _check_chunk_size(chunk_size: Any) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
        raise TypeError(f"chunk_size must be an int >= 1, got {type(chunk_size).__name__} "
                        f"{chunk_size!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _towers(encoders: Sequence[Callable], inputs: Sequence[Any], chunk_size: int) -> List[Tower]:
    for name, value in (("encoders", encoders), ("inputs", inputs)):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{name} must be a list or tuple (one entry per embedded input), got "
                            f"{type(value).__name__}")
    if len(encoders) != len(inputs) or not encoders:
        raise ValueError(f"encoders and inputs must be non-empty and of the same length (one "
                         f"encoder per input), got {len(encoders)} encoders and {len(inputs)} "
                         f"inputs")
    towers = []
    for index, (encoder, x) in enumerate(zip(encoders, inputs)):
        if not callable(encoder):
            raise TypeError(f"encoders[{index}] must be callable, got {type(encoder).__name__}")
        total = batch_size(x, f"inputs[{index}]")
        towers.append(Tower(encode=encoder, chunk=functools.partial(rows, x),
                            ranges=chunk_ranges(total, int(chunk_size)),
                            module=encoder if isinstance(encoder, nn.Module) else None,
                            name=f"encoders[{index}]"))
    return towers


def _check_loss(loss: Any) -> Tensor:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        described = (f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, Tensor)
                     else type(loss).__name__)
        raise ValueError(f"loss_fn must return a scalar tensor (one element), got {described}")
    if not loss.requires_grad:
        raise ValueError("loss_fn returned a tensor that does not require grad: it depends on "
                         "no embedding and no parameter that requires grad")
    return loss


def cached_backward(loss_fn: Callable[..., Tensor], encoders: Sequence[Callable],
                    inputs: Sequence[Any], *, chunk_size: int) -> Tensor:
    """``loss_fn(*(e(x) for e, x in zip(encoders, inputs))).backward()``, with the encoders'
    activations held for ``chunk_size`` rows at a time. Returns the loss value, detached.

    encoders: one callable per input, returning embeddings with the input's rows along dim 0; the
        same module may appear several times (e.g. two views through one tower). Pass a
        DistributedDataParallel module itself (not a function calling it): its gradients are then
        all-reduced once per call, in the backward of its last chunk (``no_sync()`` for the others).
    inputs: one per encoder, each a tensor or a dict / list / tuple (nested) of tensors split along
        dim 0; entries that are not tensors, and 0-d tensors, are passed to every chunk unchanged.
    loss_fn: called once, on the whole batch of embeddings (detached, requiring grad); returns a
        one-element tensor. It may use parameters of its own (a learned logit scale gets its
        gradient) and ``gather_distributed=True``.

    Effect on ``.grad``: exactly that of the plain backward above, added to existing gradients
    like ``backward()``, provided the encoders treat rows independently (BatchNorm in training
    mode normalizes each chunk by its own statistics, and its running statistics are updated by
    both embedding passes). Under ``torch.autocast`` both passes run with the caller's settings.

    Random numbers: each chunk is embedded twice, without and then with a graph; the second pass
    replays the CPU and CUDA generator states the first started from, so dropout draws the same
    masks, and the masks are those of a plain forward over the same chunks in the same order
    (encoder by encoder, chunk by chunk). The replay draws inside ``torch.random.fork_rng``: after
    the call the generators are where that plain chunked forward, ``loss_fn`` and ``backward()``
    would have left them (the replay advances nothing).

    Raises TypeError / ValueError for a chunk_size that is not an int >= 1, inputs whose tensors
    disagree on the batch size, an encoder returning a non-tensor or not one embedding per row,
    and a loss that is not a one-element tensor requiring grad; inputs of different batch sizes
    where ``loss_fn`` needs equal ones fail in ``loss_fn`` (e.g. the losses' "must hold the same
    number of rows"), before any gradient is touched.
    """
    _check_chunk_size(chunk_size)
    if not torch.is_grad_enabled():
        raise RuntimeError("cached_backward needs gradients enabled (it was called under "
                           "torch.no_grad() or with grad mode off)")
    cache = ChunkedEmbeddings.embed(_towers(encoders, inputs, chunk_size))
    loss = _check_loss(loss_fn(*(torch.cat(chunks) for chunks in cache.embeddings)))
    loss.backward()
    cache.replay(cache.gradients())
    return loss.detach()
