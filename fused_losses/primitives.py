"""The two similarity primitives, differentiable, over any backend (their math and the backend
contract: ``fused_losses.backends.base``).

    similarity_lse(q, k, scale)            -> (lse_row (N,) or None, lse_col (M,) or None)
    similarity_softplus(q, k, scale, bias) -> sp_row (N,)

with S_ij = scale * (u_i . v_j), u_i = q_i / max(|q_i|, eps) and v_j likewise when normalizing.
Entries can be masked by a diagonal (S[i, i + diag_offset]) and, for the log-sum-exp, by labels:
with row labels y and column labels z, the entries of equal labels (``same_label="exclude"``) or of
different labels (``same_label="only"``).
Outputs are in the statistics dtype: float64 for float64 inputs, float32 otherwise.

A backend (``fused_losses.backends``) supplies the forward statistics and the gradients U = dL/du,
V = dL/dv. What follows from them is the same for every backend and is done here, in O((N + M) D):
the chain rule through the normalization and the gradient of the scale,

    dq_i = r_i (U_i - u_i (u_i . U_i))   (|q_i| > eps; else r_i U_i)
    d scale = (1 / scale) sum_i u_i . U_i

Forward and backward kernels are torch.library custom ops (``torch.ops.fused_losses.*``) with
fake implementations and a registered autograd formula, so ``torch.compile(fullgraph=True)``
captures a model ending in any loss of the package without a graph break.

Differentiation is first order, reverse mode: ``.backward()``, ``torch.autograd.grad``, under
torch.compile and torch.func.vmap too. The backward kernels have no derivative of their own, so
what would need one raises a RuntimeError instead of silently dropping their part: a second
backward through a gradient taken with ``create_graph=True`` (double backward: gradient
penalties, Hessian-vector products, MAML), forward-mode AD (``torch.autograd.forward_ad``) and
the torch.func transforms grad, vjp, jacrev, jacfwd, jvp and hessian. ``fused_losses.reference``
computes the same losses with plain autograd, for those.
"""

# No "from __future__ import annotations": torch.library.custom_op reads the annotations as
# types, and older torch releases cannot resolve them from strings.
import math
from typing import Any, Literal, Optional, Tuple, overload

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor

from fused_losses import _validation as check
from fused_losses._typing import Scalar
from fused_losses.backends import SimilarityKernels, get_kernels
from fused_losses.backends.base import LABEL_MASK, LabelMask

DEFAULT_EPS = 1e-12
SAME_LABEL_MODES = ("exclude", "only")


def statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the statistics, gradients and positive terms for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_scalar_tensor(value: Scalar, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A float or a (differentiable) 1-element tensor as a 0-d tensor of ``dtype`` on ``device``."""
    if isinstance(value, Tensor):
        return value.reshape(()).to(dtype=dtype, device=device)
    # Not torch.tensor(value): under torch.compile(dynamic=True) a float is symbolic, and
    # torch.tensor would specialize the graph to its value (a recompile for every new value).
    return torch.ones((), dtype=dtype, device=device) * value


def _norms(x: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.linalg.vector_norm(x, dim=1, dtype=dtype)


def _inverse_norms(x: Tensor, normalize: bool, eps: float, dtype: torch.dtype) -> Tensor:
    if not normalize:
        return torch.ones(x.shape[0], dtype=dtype, device=x.device)
    return _norms(x, dtype).clamp_min_(eps).reciprocal_()


def _input_grad(x: Tensor, inv_norm: Tensor, grad_u: Tensor, normalize: bool,
                eps: float) -> Tuple[Tensor, Tensor]:
    """(dL/dx in x's dtype, sum_i u_i . U_i) from U = dL/du, where u = inv_norm * x.

    ``grad_u`` (a backend's fresh output) is updated in place: one (rows, D) temporary in all.
    """
    u = x.to(grad_u.dtype) * inv_norm[:, None]
    radial = torch.linalg.vecdot(u, grad_u)
    if normalize:
        unclamped = _norms(x, grad_u.dtype) > eps
        grad_u.sub_(u.mul_(torch.where(unclamped, radial, torch.zeros_like(radial))[:, None]))
        grad_u.mul_(inv_norm[:, None])
    return grad_u.to(x.dtype), radial.sum()


def _grad_scale(scale: Tensor, radial_sum: Tensor) -> Tensor:
    return radial_sum / scale


def _stats_or_empty(stats: Optional[Tensor], like: Tensor) -> Tensor:
    """A custom op returns tensors only: an unrequested direction comes back as an empty tensor."""
    if stats is not None:
        return stats
    return like.new_empty(0, dtype=statistics_dtype(like.dtype))


def _both_inverse_norms(q: Tensor, k: Tensor, normalize: bool, eps: float) -> Tuple[Tensor, Tensor]:
    dtype = statistics_dtype(q.dtype)
    return _inverse_norms(q, normalize, eps, dtype), _inverse_norms(k, normalize, eps, dtype)


def _label_mask_call(row_labels: Optional[Tensor], col_labels: Optional[Tensor],
                     exclude_same_label: bool) -> Tuple[frozenset, dict]:
    """(optional features, backend keyword arguments) of a call with this label mask: none without
    one, so backends that do not implement the feature (backends.base) never see its keyword."""
    if row_labels is None or col_labels is None:
        return frozenset(), {}
    return frozenset({LABEL_MASK}), {"label_mask": LabelMask(row_labels, col_labels, exclude_same_label)}


def _has_empty_side(q: Tensor, k: Tensor) -> bool:
    """No pair to score (a rank holding no rows of a distributed batch): every sum of the
    primitives is over nothing, so no backend is called."""
    return q.shape[0] == 0 or k.shape[0] == 0


def _empty_sum_gradients(q: Tensor, k: Tensor) -> Tuple[Tensor, Tensor]:
    """U (N, D) and V (M, D) of a product with no entries: zeros in the statistics dtype."""
    dtype = statistics_dtype(q.dtype)
    return q.new_zeros(q.shape, dtype=dtype), k.new_zeros(k.shape, dtype=dtype)


def _first_order_only(primitive: str, grads: tuple) -> tuple:
    """The backward's ``grads``, computed without recording; when autograd records the backward
    (create_graph=True), behind a node that raises if differentiated again: the backward kernels
    have no derivative, and leaving the gradients unrecorded would silently drop their part of a
    second derivative."""
    if not torch.is_grad_enabled():
        return grads
    present = [grad for grad in grads if grad is not None]
    error = torch._C._functions.DelayedError(
        f"double backward through fused_losses.{primitive} is not supported: its backward kernels "
        f"are not differentiable (a gradient taken with create_graph=True, then differentiated "
        f"again). Use fused_losses.reference for higher-order gradients.", len(present))
    outputs = error(*[grad.detach().requires_grad_() for grad in present])
    recorded = iter((outputs,) if isinstance(outputs, Tensor) else outputs)
    return tuple(None if grad is None else next(recorded) for grad in grads)


# The primitives are torch.library custom ops, so torch.compile treats them as single opaque
# nodes (shapes from the fake implementations) and traces the O((N + M) D) chain rule of their
# backward. The backend is named by a string and resolved inside the op, where the kernels run.
# A custom op saves only its inputs and outputs for backward, so the inverse norms are computed
# again there (O((N + M) D), like the chain rule).


@torch.library.custom_op("fused_losses::similarity_lse", mutates_args=())
def _lse_op(q: Tensor, k: Tensor, scale: Tensor, normalize: bool, eps: float,
            diag_offset: Optional[int], row_labels: Optional[Tensor], col_labels: Optional[Tensor],
            exclude_same_label: bool, rows: bool, cols: bool, backend: str,
            chunk_size: Optional[int]) -> Tuple[Tensor, Tensor]:
    """(lse_row (N,), lse_col (M,)); a direction not asked for is an empty tensor."""
    if _has_empty_side(q, k):  # log of an empty sum
        dtype = statistics_dtype(q.dtype)
        return (q.new_full((q.shape[0] if rows else 0,), -math.inf, dtype=dtype),
                q.new_full((k.shape[0] if cols else 0,), -math.inf, dtype=dtype))
    inv_norm_q, inv_norm_k = _both_inverse_norms(q, k, normalize, eps)
    features, label_options = _label_mask_call(row_labels, col_labels, exclude_same_label)
    lse_row, lse_col = _kernels(backend, q, chunk_size, features).lse_forward(
        q, k, inv_norm_q, inv_norm_k, scale, diag_offset, rows, cols, **label_options)
    return _stats_or_empty(lse_row, q), _stats_or_empty(lse_col, q)


@_lse_op.register_fake
def _(q: Tensor, k: Tensor, scale: Tensor, normalize: bool, eps: float, diag_offset: Optional[int],
      row_labels: Optional[Tensor], col_labels: Optional[Tensor], exclude_same_label: bool,
      rows: bool, cols: bool, backend: str, chunk_size: Optional[int]) -> Tuple[Tensor, Tensor]:
    dtype = statistics_dtype(q.dtype)
    return (q.new_empty(q.shape[0] if rows else 0, dtype=dtype),
            q.new_empty(k.shape[0] if cols else 0, dtype=dtype))


@torch.library.custom_op("fused_losses::similarity_lse_backward", mutates_args=())
def _lse_backward_op(q: Tensor, k: Tensor, inv_norm_q: Tensor, inv_norm_k: Tensor, scale: Tensor,
                     diag_offset: Optional[int], row_labels: Optional[Tensor],
                     col_labels: Optional[Tensor], exclude_same_label: bool,
                     lse_row: Optional[Tensor], lse_col: Optional[Tensor],
                     grad_row: Optional[Tensor], grad_col: Optional[Tensor], backend: str,
                     chunk_size: Optional[int]) -> Tuple[Tensor, Tensor]:
    """(U = dL/du (N, D), V = dL/dv (M, D)) of the backend contract."""
    if _has_empty_side(q, k):
        return _empty_sum_gradients(q, k)
    features, label_options = _label_mask_call(row_labels, col_labels, exclude_same_label)
    return _kernels(backend, q, chunk_size, features).lse_backward(
        q, k, inv_norm_q, inv_norm_k, scale, diag_offset, lse_row, lse_col, grad_row, grad_col,
        **label_options)


@_lse_backward_op.register_fake
def _(q: Tensor, k: Tensor, inv_norm_q: Tensor, inv_norm_k: Tensor, scale: Tensor,
      diag_offset: Optional[int], row_labels: Optional[Tensor], col_labels: Optional[Tensor],
      exclude_same_label: bool, lse_row: Optional[Tensor], lse_col: Optional[Tensor],
      grad_row: Optional[Tensor], grad_col: Optional[Tensor], backend: str,
      chunk_size: Optional[int]) -> Tuple[Tensor, Tensor]:
    dtype = inv_norm_q.dtype
    return q.new_empty(q.shape, dtype=dtype), k.new_empty(k.shape, dtype=dtype)


def _lse_setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Tuple[Tensor, Tensor]) -> None:
    (q, k, scale, normalize, eps, diag_offset, row_labels, col_labels, exclude_same_label, rows,
     cols, backend, chunk_size) = inputs
    ctx.save_for_backward(q, k, scale, row_labels, col_labels, *output)
    ctx.options = (normalize, eps, diag_offset, exclude_same_label, rows, cols, backend, chunk_size)


def _lse_backward(ctx: Any, grad_row: Tensor, grad_col: Tensor) -> Tuple[Optional[Tensor], ...]:
    q, k, scale, row_labels, col_labels, lse_row, lse_col = ctx.saved_tensors
    normalize, eps, diag_offset, exclude_same_label, rows, cols, backend, chunk_size = ctx.options
    with torch.no_grad():
        inv_norm_q, inv_norm_k = _both_inverse_norms(q, k, normalize, eps)
        dtype = inv_norm_q.dtype
        grad_u, grad_v = _lse_backward_op(
            q, k, inv_norm_q, inv_norm_k, scale, diag_offset, row_labels, col_labels,
            exclude_same_label, lse_row if rows else None, lse_col if cols else None,
            grad_row.to(dtype).contiguous() if rows else None,
            grad_col.to(dtype).contiguous() if cols else None, backend, chunk_size)
        grad_q, radial_sum = _input_grad(q, inv_norm_q, grad_u, normalize, eps)
        grad_k, _ = _input_grad(k, inv_norm_k, grad_v, normalize, eps)
        grads = (grad_q, grad_k, _grad_scale(scale, radial_sum))
    return _first_order_only("similarity_lse", grads) + (None,) * 10


_lse_op.register_autograd(_lse_backward, setup_context=_lse_setup_context)


@torch.library.custom_op("fused_losses::similarity_softplus", mutates_args=())
def _softplus_op(q: Tensor, k: Tensor, scale: Tensor, bias: Tensor, normalize: bool, eps: float,
                 diag_offset: Optional[int], backend: str, chunk_size: Optional[int]) -> Tensor:
    """sp_row (N,)."""
    if _has_empty_side(q, k):
        return q.new_zeros(q.shape[0], dtype=statistics_dtype(q.dtype))
    inv_norm_q, inv_norm_k = _both_inverse_norms(q, k, normalize, eps)
    return _kernels(backend, q, chunk_size).softplus_forward(
        q, k, inv_norm_q, inv_norm_k, scale, bias, diag_offset)


@_softplus_op.register_fake
def _(q: Tensor, k: Tensor, scale: Tensor, bias: Tensor, normalize: bool, eps: float,
      diag_offset: Optional[int], backend: str, chunk_size: Optional[int]) -> Tensor:
    return q.new_empty(q.shape[0], dtype=statistics_dtype(q.dtype))


@torch.library.custom_op("fused_losses::similarity_softplus_backward", mutates_args=())
def _softplus_backward_op(q: Tensor, k: Tensor, inv_norm_q: Tensor, inv_norm_k: Tensor,
                          scale: Tensor, bias: Tensor, diag_offset: Optional[int],
                          grad_row: Tensor, backend: str,
                          chunk_size: Optional[int]) -> Tuple[Tensor, Tensor, Tensor]:
    """(U (N, D), V (M, D), grad_bias 0-d) of the backend contract."""
    if _has_empty_side(q, k):
        return _empty_sum_gradients(q, k) + (bias.new_zeros(()),)
    return _kernels(backend, q, chunk_size).softplus_backward(
        q, k, inv_norm_q, inv_norm_k, scale, bias, diag_offset, grad_row)


@_softplus_backward_op.register_fake
def _(q: Tensor, k: Tensor, inv_norm_q: Tensor, inv_norm_k: Tensor, scale: Tensor, bias: Tensor,
      diag_offset: Optional[int], grad_row: Tensor, backend: str,
      chunk_size: Optional[int]) -> Tuple[Tensor, Tensor, Tensor]:
    dtype = inv_norm_q.dtype
    return (q.new_empty(q.shape, dtype=dtype), k.new_empty(k.shape, dtype=dtype),
            bias.new_empty(()))


def _softplus_setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Tensor) -> None:
    q, k, scale, bias, normalize, eps, diag_offset, backend, chunk_size = inputs
    ctx.save_for_backward(q, k, scale, bias)
    ctx.options = (normalize, eps, diag_offset, backend, chunk_size)


def _softplus_backward(ctx: Any, grad_row: Tensor) -> Tuple[Optional[Tensor], ...]:
    q, k, scale, bias = ctx.saved_tensors
    normalize, eps, diag_offset, backend, chunk_size = ctx.options
    with torch.no_grad():
        inv_norm_q, inv_norm_k = _both_inverse_norms(q, k, normalize, eps)
        grad_u, grad_v, grad_bias = _softplus_backward_op(
            q, k, inv_norm_q, inv_norm_k, scale, bias, diag_offset,
            grad_row.to(inv_norm_q.dtype).contiguous(), backend, chunk_size)
        grad_q, radial_sum = _input_grad(q, inv_norm_q, grad_u, normalize, eps)
        grad_k, _ = _input_grad(k, inv_norm_k, grad_v, normalize, eps)
        grads = (grad_q, grad_k, _grad_scale(scale, radial_sum), grad_bias)
    return _first_order_only("similarity_softplus", grads) + (None,) * 5


_softplus_op.register_autograd(_softplus_backward, setup_context=_softplus_setup_context)


def _check_common(q: Tensor, k: Tensor, normalize: bool, eps: float, diag_offset: Optional[int], backend: str,
                  chunk_size: Optional[int]) -> None:
    check.check_compatible("q", q, "k", k, same_rows=False)
    check.check_flag("normalize", normalize)
    check.check_eps(eps, statistics_dtype(q.dtype))
    check.check_diag_offset(diag_offset)
    check.check_backend(backend)
    if chunk_size is not None:
        check.check_positive_int("chunk_size", chunk_size)
    if chunk_size is not None and backend not in ("torch", "auto"):
        raise ValueError(f"chunk_size applies to backend='torch' only, got backend={backend!r}")


def _kernels(backend: str, q: Tensor, chunk_size: Optional[int],
             features: frozenset = frozenset()) -> SimilarityKernels:
    """The kernels of ``backend`` ("auto" or a name) for inputs like ``q`` and a call needing the
    optional ``features``; chunk_size selects the torch backend."""
    if chunk_size is None:
        return get_kernels(backend, q.device, features, q.dtype)
    return get_kernels("torch", q.device, features, q.dtype, chunk_size=chunk_size)


def _check_labels(q: Tensor, k: Tensor, row_labels: Optional[Tensor], col_labels: Optional[Tensor],
                  same_label: str) -> None:
    if (row_labels is None) != (col_labels is None):
        given, missing = ("row_labels", "col_labels") if col_labels is None else ("col_labels", "row_labels")
        raise ValueError(f"{given} needs {missing} too: the label mask compares the two, got "
                         f"{missing}=None")
    if row_labels is not None:
        check.class_indices("row_labels", row_labels, q.shape[0], q.device)
        check.class_indices("col_labels", col_labels, k.shape[0], k.device)
    if same_label not in SAME_LABEL_MODES:
        raise ValueError(f"same_label must be one of {SAME_LABEL_MODES}, got {same_label!r}")


def _check_differentiation(primitive: str, *inputs: Tensor) -> None:
    """Refuse the kinds of differentiation the primitives' autograd formula cannot give (see the
    module docstring) before they would give a wrong derivative or an obscure error."""
    if torch.compiler.is_compiling():
        return
    if torch._C._are_functorch_transforms_active():
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

        transforms = {interpreter.key().name for interpreter in retrieve_all_functorch_interpreters()}
        if transforms & {"Grad", "Jvp"}:
            raise RuntimeError(
                f"torch.func transforms that differentiate (grad, vjp, jacrev, jacfwd, jvp, "
                f"hessian) are not supported through fused_losses.{primitive}: differentiate with "
                f"loss.backward() or torch.autograd.grad (torch.func.vmap works), or use "
                f"fused_losses.reference")
    if any(forward_ad.unpack_dual(x).tangent is not None for x in inputs):
        raise RuntimeError(
            f"forward-mode AD (torch.autograd.forward_ad dual tensors) is not supported through "
            f"fused_losses.{primitive}: differentiate with loss.backward() or torch.autograd.grad, "
            f"or use fused_losses.reference")


def similarity_lse(
    q: Tensor, k: Tensor, scale: Scalar = 1.0, *, rows: bool = True, cols: bool = False,
    normalize: bool = True, eps: float = DEFAULT_EPS, diag_offset: Optional[int] = None,
    row_labels: Optional[Tensor] = None, col_labels: Optional[Tensor] = None,
    same_label: str = "exclude", backend: str = "auto", chunk_size: Optional[int] = None,
) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Row and/or column log-sum-exp of S = scale * normalize(q) @ normalize(k).T without forming S.

    q: (N, D), k: (M, D), same float dtype and device. scale: float or 0-d tensor > 0 (gets a
    gradient if it requires one). diag_offset: mask S[i, i + diag_offset] (None: no mask).
    row_labels (N,), col_labels (M,): integer labels y, z (both or neither) that mask S[i, j] where
    y_i == z_j (same_label="exclude": a row keeps its negatives) or where y_i != z_j
    (same_label="only": a row keeps its positives); combined with the diagonal mask, an entry
    masked by either is masked. A row or column with every entry masked gets -inf (and passes no
    gradient). The label mask needs a backend that implements it (``backend="auto"`` picks one).
    chunk_size: rows of S per chunk for backend "torch". Returns (lse_row (N,) if rows else None,
    lse_col (M,) if cols else None) in the statistics dtype.
    """
    _check_common(q, k, normalize, eps, diag_offset, backend, chunk_size)
    dtype = statistics_dtype(q.dtype)
    check.check_positive_scalar("scale", scale, q.device, dtype)
    check.check_flag("rows", rows)
    check.check_flag("cols", cols)
    if not (rows or cols):
        raise ValueError("similarity_lse needs rows=True or cols=True (got both False)")
    _check_labels(q, k, row_labels, col_labels, same_label)
    scale = as_scalar_tensor(scale, dtype, q.device)
    return lse_statistics(q, k, scale, rows=rows, cols=cols, normalize=normalize, eps=eps,
                          diag_offset=diag_offset, row_labels=row_labels, col_labels=col_labels,
                          same_label=same_label, backend=backend, chunk_size=chunk_size)


def similarity_softplus(
    q: Tensor, k: Tensor, scale: Scalar = 1.0, bias: Scalar = 0.0, *, normalize: bool = True,
    eps: float = DEFAULT_EPS, diag_offset: Optional[int] = None, backend: str = "auto",
    chunk_size: Optional[int] = None,
) -> Tensor:
    """Row sums sp_row_i = sum_j softplus(S_ij + bias), S as in ``similarity_lse``.

    bias: float or finite 0-d tensor (gets a gradient if it requires one). Returns (N,) in the
    statistics dtype.
    """
    _check_common(q, k, normalize, eps, diag_offset, backend, chunk_size)
    dtype = statistics_dtype(q.dtype)
    check.check_positive_scalar("scale", scale, q.device, dtype)
    check.check_finite_scalar("bias", bias, q.device, dtype)
    scale = as_scalar_tensor(scale, dtype, q.device)
    bias = as_scalar_tensor(bias, dtype, q.device)
    return softplus_statistics(q, k, scale, bias, normalize=normalize, eps=eps,
                               diag_offset=diag_offset, backend=backend, chunk_size=chunk_size)


def _contract_labels(row_labels: Tensor, col_labels: Tensor) -> Tuple[Tensor, Tensor]:
    """The labels as the backend contract takes them: contiguous, both int32 or both int64 (every
    integer dtype converts to int64 exactly, or bijectively for uint64, so equality is kept)."""
    dtype = torch.int32 if row_labels.dtype == col_labels.dtype == torch.int32 else torch.int64
    return row_labels.to(dtype).contiguous(), col_labels.to(dtype).contiguous()


# The statistics not asked for (rows / cols False) are None.
@overload
def lse_statistics(
    q: Tensor, k: Tensor, scale: Tensor, *, rows: Literal[True], cols: Literal[False],
    normalize: bool, diag_offset: Optional[int] = ..., row_labels: Optional[Tensor] = ...,
    col_labels: Optional[Tensor] = ..., same_label: str = ..., eps: float = ...,
    backend: str = ..., chunk_size: Optional[int] = ...,
) -> Tuple[Tensor, None]: ...


@overload
def lse_statistics(
    q: Tensor, k: Tensor, scale: Tensor, *, rows: Literal[True], cols: Literal[True],
    normalize: bool, diag_offset: Optional[int] = ..., row_labels: Optional[Tensor] = ...,
    col_labels: Optional[Tensor] = ..., same_label: str = ..., eps: float = ...,
    backend: str = ..., chunk_size: Optional[int] = ...,
) -> Tuple[Tensor, Tensor]: ...


@overload
def lse_statistics(
    q: Tensor, k: Tensor, scale: Tensor, *, rows: bool, cols: bool, normalize: bool,
    diag_offset: Optional[int] = ..., row_labels: Optional[Tensor] = ...,
    col_labels: Optional[Tensor] = ..., same_label: str = ..., eps: float = ...,
    backend: str = ..., chunk_size: Optional[int] = ...,
) -> Tuple[Optional[Tensor], Optional[Tensor]]: ...


def lse_statistics(
    q: Tensor, k: Tensor, scale: Tensor, *, rows: bool, cols: bool, normalize: bool,
    diag_offset: Optional[int] = None, row_labels: Optional[Tensor] = None,
    col_labels: Optional[Tensor] = None, same_label: str = "exclude", eps: float = DEFAULT_EPS,
    backend: str = "auto", chunk_size: Optional[int] = None,
) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """``similarity_lse`` on arguments already checked, with ``scale`` a 0-d statistics tensor."""
    _check_differentiation("similarity_lse", q, k, scale)
    if row_labels is not None and col_labels is not None:
        row_labels, col_labels = _contract_labels(row_labels, col_labels)
    lse_row, lse_col = _lse_op(q, k, scale, normalize, float(eps), diag_offset, row_labels,
                               col_labels, same_label == "exclude", rows, cols, backend, chunk_size)
    return (lse_row if rows else None), (lse_col if cols else None)


def softplus_statistics(q: Tensor, k: Tensor, scale: Tensor, bias: Tensor, *, normalize: bool,
                        diag_offset: Optional[int] = None, eps: float = DEFAULT_EPS, backend: str = "auto",
                        chunk_size: Optional[int] = None) -> Tensor:
    """``similarity_softplus`` on checked arguments; ``scale``, ``bias``: 0-d statistics tensors."""
    _check_differentiation("similarity_softplus", q, k, scale, bias)
    return _softplus_op(q, k, scale, bias, normalize, float(eps), diag_offset, backend, chunk_size)
