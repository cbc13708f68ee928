"""sentence-transformers' MultipleNegativesRankingLoss family (6.2), scored by fused_losses.

    from fused_losses.integrations.sentence_transformers import MultipleNegativesRankingLoss
    # was: from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

MultipleNegativesRankingLoss, CachedMultipleNegativesRankingLoss and the (deprecated) symmetric
variants subclass sentence-transformers' own classes and take their arguments, plus ``backend``
("auto" | "triton" | "cuda" | "torch"). Only the scoring is replaced: the logits are never formed
(theirs builds N x N (1 + negatives) per direction; their cached variant in blocks of
``mini_batch_size`` rows). Embedding, configuration (``get_config_dict``), model cards, citations
and ``SentenceTransformerTrainer`` are theirs. The cached variants embed through
``fused_losses.gradient_cache`` (mini-batches as sentence-transformers slices them, random states
replayed, DDP synced once) and compute the loss in one call over the whole batch.

Every option gives their numbers: ``scale``; ``similarity_fct`` cos_sim (normalize=True) or
dot_score (normalize=False); ``gather_across_devices``; any number of hard-negative columns;
the four ``directions``, doc_to_doc's same-query mask included (the mask is the diagonal of each
column block of documents); both ``partition_mode``s; ``hardness_mode`` / ``hardness_strength``
(a penalized logit is (scale + strength) * sim in value with the gradient of scale * sim). With
any other ``similarity_fct`` the loss warns once and runs their implementation.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, Dict, Iterable, List, Literal, Optional, Sequence, Tuple, Union

import torch
import tqdm
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.losses.gradcache import _create_minibatch, _minibatch_ranges
from sentence_transformers.sentence_transformer import losses as st_losses
from sentence_transformers.util import cos_sim, dot_score
from torch import Tensor

from fused_losses import _validation as check
from fused_losses import distributed, functional
from fused_losses.gradient_cache import ChunkedEmbeddings, Progress, Tower
from fused_losses.primitives import as_scalar_tensor, lse_statistics, statistics_dtype

# similarity_fct -> the primitives' normalize flag
_NORMALIZE = ((cos_sim, True), (dot_score, False))

# The option types of sentence-transformers' constructors.
_Similarity = Callable[[Tensor, Tensor], Tensor]
_Direction = Literal["query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"]
_PartitionMode = Literal["joint", "per_direction"]
_HardnessMode = Literal["in_batch_negatives", "hard_negatives", "all_negatives"]


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=4)


def fused_normalize(loss: Union[st_losses.MultipleNegativesRankingLoss,
                                 st_losses.CachedMultipleNegativesRankingLoss]) -> Optional[bool]:
    """The normalize flag for ``loss.similarity_fct``; None (after a warning, once per class and
    similarity) when the fused scoring cannot compute it and their implementation must."""
    normalize = next((flag for fct, flag in _NORMALIZE if loss.similarity_fct is fct), None)
    if normalize is None:
        _warn_once(f"{type(loss).__name__}: similarity_fct={loss.similarity_fct!r} is neither "
                   f"sentence_transformers.util.cos_sim nor dot_score, which are the only "
                   f"similarities fused_losses computes; using sentence-transformers' own scoring "
                   f"(it materializes the logits)")
    return normalize


class _ScaledGradient(torch.autograd.Function):
    """Identity forward; the gradient times ``factor`` backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Tensor, None]:
        return grad * ctx.factor, None


def _row_lse(q: Tensor, k: Tensor, scale: Tensor, normalize: bool, backend: str,
             diag_offset: Optional[int] = None) -> Tensor:
    return lse_statistics(q, k, scale, rows=True, cols=False, normalize=normalize,
                          diag_offset=diag_offset, backend=backend)[0]


def _query_to_doc_pieces(queries: Tensor, u: Tensor, docs: Sequence[Tensor],
                         all_docs: Sequence[distributed.GatheredRows], positive: Tensor,
                         scale: Tensor, *, penalty: float, hardness_mode: Optional[str],
                         normalize: bool, backend: str) -> List[Tensor]:
    """Row log-sum-exp pieces (n,) of the query_to_doc logits, hardness penalty included.

    Without a penalty: one pass over all documents. With one, each column block c of documents
    splits into its off-diagonal entries (one masked pass; penalized in "in_batch_negatives" and
    "all_negatives" mode) and its diagonal, the query's own document (a row dot; penalized for
    hard negatives, c > 0, in "hard_negatives" and "all_negatives" mode; never the positive).
    A penalized pass runs at scale + penalty with its input gradients scaled by
    scale / (scale + penalty): the value of the penalized logits with the gradient of scale * sim.
    """
    if not penalty:
        keys = torch.cat([gathered.rows for gathered in all_docs])
        return [_row_lse(queries, keys, scale, normalize, backend)]
    offset = all_docs[0].offset
    raised = scale + penalty
    ratio = float(scale / raised)
    off_diagonal_penalized = hardness_mode in ("in_batch_negatives", "all_negatives")
    pieces = []
    for column, (local, gathered) in enumerate(zip(docs, all_docs)):
        if off_diagonal_penalized:
            pieces.append(_row_lse(_ScaledGradient.apply(queries, ratio),
                                   _ScaledGradient.apply(gathered.rows, ratio), raised, normalize,
                                   backend, diag_offset=offset))
        else:
            pieces.append(_row_lse(queries, gathered.rows, scale, normalize, backend,
                                   diag_offset=offset))
        if column == 0:
            pieces.append(positive)
            continue
        similarity = (u * functional._embed(local, normalize)).sum(dim=1)
        own = scale * similarity
        if hardness_mode in ("hard_negatives", "all_negatives"):
            own = own + penalty * similarity.detach()
        pieces.append(own)
    return pieces


def ranking_loss(queries: Tensor, docs: Sequence[Tensor], *, scale: float, normalize: bool,
                 directions: Sequence[str], partition_mode: str, hardness_mode: Optional[str],
                 hardness_strength: float, gather_across_devices: bool, backend: str) -> Tensor:
    """sentence-transformers' MultipleNegativesRankingLoss on embeddings, without the logits.

    queries: (n, D) anchors; docs: their positives (n, D), then any number of hard-negative
    columns (n, D) each. Returns this rank's mean loss (the mean over the global batch, scaled as
    in ``fused_losses.distributed``, when gathering over ranks holding different batch sizes).
    """
    penalty = float(hardness_strength) if hardness_mode is not None else 0.0
    if (set(directions) == {"query_to_doc", "doc_to_query"} and partition_mode == "per_direction"
            and len(docs) == 1 and not penalty):
        # Symmetric InfoNCE is CLIP's loss: the one-pass (distributed) CLIP path applies.
        return functional.clip_loss(queries, docs[0], scale, normalize=normalize, backend=backend,
                                    gather_distributed=gather_across_devices)
    scale_tensor = as_scalar_tensor(scale, statistics_dtype(queries.dtype), queries.device)
    lse = functools.partial(_row_lse, scale=scale_tensor, normalize=normalize, backend=backend)
    all_docs = [distributed.gather_rows(d, gather_across_devices) for d in docs]
    offset, counts = all_docs[0].offset, all_docs[0].row_counts
    u = functional._embed(queries, normalize)
    positive = scale_tensor * (u * functional._embed(docs[0], normalize)).sum(dim=1)
    pieces = {"query_to_doc": _query_to_doc_pieces(
        queries, u, docs, all_docs, positive, scale_tensor, penalty=penalty,
        hardness_mode=hardness_mode, normalize=normalize, backend=backend)}
    if {"query_to_query", "doc_to_query"} & set(directions):
        all_queries = distributed.gather_rows(queries, gather_across_devices, counts=counts).rows
        if "query_to_query" in directions:
            pieces["query_to_query"] = [lse(queries, all_queries, diag_offset=offset)]
        if "doc_to_query" in directions:
            pieces["doc_to_query"] = [lse(docs[0], all_queries)]
    if "doc_to_doc" in directions:
        # The documents of the same query are the diagonal of each column block.
        pieces["doc_to_doc"] = [lse(docs[0], gathered.rows, diag_offset=offset)
                                for gathered in all_docs]
    if partition_mode == "joint":
        log_z = torch.stack([p for direction in pieces.values() for p in direction]).logsumexp(0)
    else:
        log_z = torch.stack([torch.stack(direction).logsumexp(0)
                             for direction in pieces.values()]).mean(0)
    return functional._reduce(log_z - positive, "mean", len(counts), sum(counts))


class _FusedScoring(st_losses.MultipleNegativesRankingLoss):
    """MultipleNegativesRankingLoss.compute_loss_from_embeddings by ``ranking_loss``."""

    def __init__(self, *args: Any, backend: str = "auto", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        check.check_backend(backend)
        self.backend = backend

    def compute_loss_from_embeddings(self, embeddings: List[Tensor], labels: Tensor) -> Tensor:
        normalize = fused_normalize(self)
        if normalize is None:
            return super().compute_loss_from_embeddings(embeddings, labels)
        return self._fused_loss(embeddings, normalize)

    def _fused_loss(self, embeddings: Sequence[Tensor], normalize: bool) -> Tensor:
        """``ranking_loss`` of the columns (anchors, positives, hard negatives...)."""
        if len(embeddings) < 2:
            raise ValueError(f"Expected at least 2 embeddings, got {len(embeddings)}")
        if len({e.shape[0] for e in embeddings}) > 1:
            raise ValueError(f"every input column must hold one row per anchor (the anchor, its "
                             f"positive, its hard negatives), got columns of "
                             f"{[e.shape[0] for e in embeddings]} rows")
        return ranking_loss(
            embeddings[0], embeddings[1:], scale=self.scale, normalize=normalize,
            directions=self.directions, partition_mode=self.partition_mode,
            hardness_mode=self.hardness_mode, hardness_strength=self.hardness_strength,
            gather_across_devices=self.gather_across_devices, backend=self.backend)


class MultipleNegativesRankingLoss(_FusedScoring, st_losses.MultipleNegativesRankingLoss):
    """sentence-transformers' MultipleNegativesRankingLoss, fused: same arguments plus
    ``backend``, same loss and gradients, no N x N (1 + negatives) logits."""

    def __init__(self, model: SentenceTransformer, scale: float = 20.0,
                 similarity_fct: _Similarity = cos_sim, gather_across_devices: bool = False,
                 directions: Tuple[_Direction, ...] = ("query_to_doc",),
                 partition_mode: _PartitionMode = "joint",
                 hardness_mode: Optional[_HardnessMode] = None, hardness_strength: float = 0.0, *,
                 backend: str = "auto") -> None:
        super().__init__(model, scale, similarity_fct, gather_across_devices, directions,
                         partition_mode, hardness_mode, hardness_strength, backend=backend)


def _sentence_embedding(model: SentenceTransformer, features: Dict[str, Any]) -> Tensor:
    return model(features)["sentence_embedding"]


def _replay(cache: ChunkedEmbeddings, gradients: List[List[Optional[Tensor]]], progress: Progress,
            grad_output: Tensor) -> None:
    cache.replay(gradients, grad_scale=grad_output, progress=progress)


class _FusedGradientCache(st_losses.CachedMultipleNegativesRankingLoss):
    """CachedMultipleNegativesRankingLoss with fused_losses.gradient_cache's embedding passes and
    one fused loss over the whole batch; the wrapped ``loss`` is the fused
    MultipleNegativesRankingLoss."""

    # Theirs is a tuple of exactly 7 names to mypy; ours has an 8th.
    _delegated_to_wrapped_loss = (  # type: ignore[assignment]
        *st_losses.CachedMultipleNegativesRankingLoss._delegated_to_wrapped_loss, "backend")
    loss: MultipleNegativesRankingLoss

    def __init__(self, model: SentenceTransformer, *args: Any, backend: str = "auto",
                 **kwargs: Any) -> None:
        super().__init__(model, *args, **kwargs)
        # Their constructor validated the options on their wrapped loss; the same, fused:
        options = st_losses.CachedMultipleNegativesRankingLoss._delegated_to_wrapped_loss
        self.loss = MultipleNegativesRankingLoss(
            model, backend=backend, **{name: getattr(self.loss, name) for name in options})

    @property
    def backend(self) -> str:
        return self.loss.backend

    def _progress(self, items: Iterable, description: str) -> Iterable:
        return tqdm.tqdm(items, desc=description, disable=not self.show_progress_bar)

    def calculate_loss(self, reps: List[List[Tensor]], labels: Optional[Tensor] = None, *,
                       with_backward: bool = False) -> Tensor:
        """The loss over the whole batch of mini-batch embeddings ``reps`` (reps[column][chunk]),
        back-propagated to them when ``with_backward`` (and then returned detached)."""
        normalize = fused_normalize(self)
        if normalize is None:
            return super().calculate_loss(reps, labels, with_backward=with_backward)
        loss = self.loss._fused_loss([torch.cat(chunks) for chunks in reps], normalize)
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss

    def forward_cached(self, sentence_features: Iterable[Dict[str, Tensor]],
                       labels: Optional[Tensor] = None) -> Tensor:
        """Embed every mini-batch without a graph, compute the loss and its gradients with
        respect to the embeddings, and return the loss, whose backward re-embeds each mini-batch
        (same random state) and back-propagates its gradients times the upstream gradient."""
        towers = [
            Tower(encode=functools.partial(_sentence_embedding, self.model),
                  chunk=functools.partial(_create_minibatch, features),
                  ranges=_minibatch_ranges(features, self.mini_batch_size,
                                           self.mini_batch_num_tokens),
                  module=self.model, name=f"the model on input column {index}")
            for index, features in enumerate(sentence_features)]
        grad_enabled = torch.is_grad_enabled()
        cache = ChunkedEmbeddings.embed(towers, save_random_state=grad_enabled,
                                        progress=self._progress)
        if not grad_enabled:
            return self.calculate_loss(cache.embeddings, labels)
        loss = self.calculate_loss(cache.embeddings, labels, with_backward=True)
        loss = loss.detach().requires_grad_()
        loss.register_hook(functools.partial(_replay, cache, cache.gradients(), self._progress))
        return loss


class CachedMultipleNegativesRankingLoss(_FusedGradientCache,
                                         st_losses.CachedMultipleNegativesRankingLoss):
    """sentence-transformers' CachedMultipleNegativesRankingLoss, fused: same arguments plus
    ``backend``, same loss and gradients; one loss call over the whole batch."""

    def __init__(self, model: SentenceTransformer, scale: float = 20.0,
                 similarity_fct: _Similarity = cos_sim, mini_batch_size: int = 32,
                 mini_batch_num_tokens: Optional[int] = None, gather_across_devices: bool = False,
                 directions: Tuple[_Direction, ...] = ("query_to_doc",),
                 partition_mode: _PartitionMode = "joint", show_progress_bar: bool = False,
                 hardness_mode: Optional[_HardnessMode] = None, hardness_strength: float = 0.0, *,
                 backend: str = "auto") -> None:
        super().__init__(model, scale, similarity_fct, mini_batch_size, mini_batch_num_tokens,
                         gather_across_devices, directions, partition_mode, show_progress_bar,
                         hardness_mode, hardness_strength, backend=backend)


def _warn_deprecated(their_class: type) -> None:
    """Their deprecation warning, at the line instantiating our subclass of ``their_class``."""
    # typing_extensions.deprecated sets __deprecated__, which typeshed's type does not declare.
    message = their_class.__deprecated__  # type: ignore[attr-defined]
    warnings.warn(message, DeprecationWarning, stacklevel=3)


with warnings.catch_warnings():
    # Subclassing sentence-transformers' deprecated classes warns; instantiating ours warns below.
    warnings.simplefilter("ignore", DeprecationWarning)

    class MultipleNegativesSymmetricRankingLoss(
            _FusedScoring, st_losses.MultipleNegativesSymmetricRankingLoss):
        """sentence-transformers' MultipleNegativesSymmetricRankingLoss (deprecated there), fused."""

        def __init__(self, model: SentenceTransformer, scale: float = 20.0,
                     similarity_fct: _Similarity = cos_sim, gather_across_devices: bool = False, *,
                     backend: str = "auto") -> None:
            _warn_deprecated(st_losses.MultipleNegativesSymmetricRankingLoss)
            super().__init__(model, scale, similarity_fct, gather_across_devices, backend=backend)

    class CachedMultipleNegativesSymmetricRankingLoss(
            _FusedGradientCache, st_losses.CachedMultipleNegativesSymmetricRankingLoss):
        """sentence-transformers' CachedMultipleNegativesSymmetricRankingLoss (deprecated there),
        fused."""

        def __init__(self, model: SentenceTransformer, scale: float = 20.0,
                     similarity_fct: _Similarity = cos_sim, mini_batch_size: int = 32,
                     mini_batch_num_tokens: Optional[int] = None,
                     gather_across_devices: bool = False, show_progress_bar: bool = False, *,
                     backend: str = "auto") -> None:
            _warn_deprecated(st_losses.CachedMultipleNegativesSymmetricRankingLoss)
            super().__init__(model, scale, similarity_fct, mini_batch_size, mini_batch_num_tokens,
                             gather_across_devices, show_progress_bar, backend=backend)
