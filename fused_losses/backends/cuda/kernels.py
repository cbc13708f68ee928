"""SimilarityKernels on the compiled CUDA kernels: validation, output allocation, launch.

Two fused kernels run here: the forward statistics (``lse_forward`` / ``softplus_forward``) and the
backward's weights writer; the backward itself is ``fused_losses.backends.chunked_backward`` (the
vendor GEMM for both products) fed chunk by chunk by that writer.

Inputs may have any row stride up to ``tile["max_row_stride_bytes"]`` of the extension; a tensor
whose inner (feature) stride is not 1, or whose rows lie further apart, is copied to a contiguous
one first. Outputs and workspaces come from torch's caching allocator on the current stream. The
forward keeps partial row (and column) statistics, at most about ``workspace_limit_bytes``; the
backward's workspace is the driver's (one chunk of weights, see chunked_backward).

The log-sum-exp takes the ``LABEL_MASK`` feature (``label_mask=base.LabelMask(...)``): the labels
go to the kernels as int64 (int32 labels are widened, so one label type is compiled), compared per
tile next to the diagonal mask.

Timing the pieces (what a benchmark calls, inputs as for the primitives):

    kernels = CudaKernels()
    kernels.lse_forward(q, k, r, c, scale, None, True, True)            # forward statistics kernel
    write = kernels.lse_weights_writer(q, k, r, c, scale, None, lse_row, lse_col, g_row, g_col)
    write(out, 0, rows, row_scale, col_scale)                           # weights kernel, one chunk

with ``out`` a (rows, M) view of a buffer in the input dtype (unit column stride) and
``row_scale`` (rows,), ``col_scale`` (M,) fp32 (e.g. from ``chunked_backward.weight_scales``);
both take ``label_mask=`` too.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
from torch import Tensor

from fused_losses.backends import chunked_backward
from fused_losses.backends.base import LabelMask
from fused_losses.backends.cuda import SUPPORTED_DTYPES, _extension

_DTYPES = {dtype: str(dtype).removeprefix("torch.") for dtype in SUPPORTED_DTYPES}
_FP32_PRECISIONS = ("split_tf32", "tf32")


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _empty(shape, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    """Every output and workspace buffer comes from here (tests poison them through it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _address(tensor: Optional[Tensor]) -> int:
    return 0 if tensor is None else tensor.data_ptr()


class CudaKernels:
    """The two similarity primitives on the CUDA extension.

    fp32_precision: how fp32 inputs are multiplied on the tensor cores: "split_tf32" (default; each
    operand split into two TF32 parts, three products, close to fp32 accuracy) or "tf32" (one
    product, about 1e-3 relative error, up to 3x faster). fp16 / bf16 inputs use their own MMA.
    workspace_limit_bytes: soft cap on the forward's workspace (see the module docstring).
    """

    name = "cuda"

    def __init__(self, fp32_precision: str = "split_tf32", workspace_limit_bytes: int = 256 << 20):
        if fp32_precision not in _FP32_PRECISIONS:
            raise ValueError(f"fp32_precision must be one of {_FP32_PRECISIONS}, got {fp32_precision!r}")
        if workspace_limit_bytes <= 0:
            raise ValueError(f"workspace_limit_bytes must be positive, got {workspace_limit_bytes}")
        self.fp32_precision = fp32_precision
        self.workspace_limit_bytes = int(workspace_limit_bytes)

    # -- the primitives (see fused_losses.backends.base) ----------------------------------------

    def lse_forward(self, q, k, inv_norm_q, inv_norm_k, scale, diag_offset, want_rows, want_cols,
                    label_mask: Optional[LabelMask] = None):
        call = _Call(self, q, k, inv_norm_q, inv_norm_k, scale, diag_offset, label_mask)
        if not (want_rows or want_cols):
            return None, None
        lse_row = _empty(q.shape[0], q.device) if want_rows else None
        lse_col = _empty(k.shape[0], q.device) if want_cols else None
        if call.empty:  # a sum over no entries
            return tuple(None if x is None else x.fill_(float("-inf")) for x in (lse_row, lse_col))
        bytes_needed = call.ext.lse_forward_workspace_bytes(call.problem, want_rows, want_cols, call.launch)
        call.run(call.ext.lse_forward, bytes_needed, lse_row=_address(lse_row), lse_col=_address(lse_col))
        return lse_row, lse_col

    def lse_backward(self, q, k, inv_norm_q, inv_norm_k, scale, diag_offset, lse_row, lse_col, grad_row, grad_col,
                     label_mask: Optional[LabelMask] = None):
        call = _Call(self, q, k, inv_norm_q, inv_norm_k, scale, diag_offset, label_mask)
        if call.empty or (grad_row is None and grad_col is None):
            return _empty(q.shape, q.device).zero_(), _empty(k.shape, q.device).zero_()
        write = _lse_writer(call, lse_row, lse_col, grad_row, grad_col)
        u, v, _ = chunked_backward.chunked_backward(call.q, call.k, call.inv_norm_q, call.inv_norm_k, call.scale,
                                                    chunked_backward.weight_bound(grad_row, grad_col), write,
                                                    row_multiple=call.ext.tile["rows"])
        return u, v

    def lse_weights_writer(self, q, k, inv_norm_q, inv_norm_k, scale, diag_offset, lse_row, lse_col, grad_row,
                           grad_col, label_mask: Optional[LabelMask] = None) -> chunked_backward.WeightsWriter:
        """The weights writer of lse_backward (chunked_backward's contract) for N, M > 0: writes
        W_ij = grad_row_i exp(S_ij - lse_row_i) + grad_col_j exp(S_ij - lse_col_j), scaled (0 where
        masked)."""
        return _lse_writer(_Call(self, q, k, inv_norm_q, inv_norm_k, scale, diag_offset, label_mask), lse_row,
                           lse_col, grad_row, grad_col)

    def softplus_forward(self, q, k, inv_norm_q, inv_norm_k, scale, bias, diag_offset):
        call = _Call(self, q, k, inv_norm_q, inv_norm_k, scale, diag_offset)
        sp_row = _empty(q.shape[0], q.device)
        if call.empty:
            return sp_row.zero_()
        bias = _stat_scalar(bias, q.device)
        bytes_needed = call.ext.softplus_forward_workspace_bytes(call.problem, call.launch)
        call.run(call.ext.softplus_forward, bytes_needed, bias=bias.data_ptr(), sp_row=sp_row.data_ptr())
        return sp_row

    def softplus_backward(self, q, k, inv_norm_q, inv_norm_k, scale, bias, diag_offset, grad_row):
        call = _Call(self, q, k, inv_norm_q, inv_norm_k, scale, diag_offset)
        if call.empty:
            return (_empty(q.shape, q.device).zero_(), _empty(k.shape, q.device).zero_(),
                    _empty((), q.device).zero_())
        return chunked_backward.chunked_backward(call.q, call.k, call.inv_norm_q, call.inv_norm_k, call.scale,
                                                 chunked_backward.weight_bound(grad_row),
                                                 _softplus_writer(call, bias, grad_row),
                                                 row_multiple=call.ext.tile["rows"], sum_weights=True)

    def softplus_weights_writer(self, q, k, inv_norm_q, inv_norm_k, scale, bias, diag_offset,
                                grad_row) -> chunked_backward.WeightsWriter:
        """The weights writer of softplus_backward (chunked_backward's contract) for N, M > 0: writes
        W_ij = grad_row_i sigmoid(S_ij + bias), scaled, and returns the chunk's sum of W (0-d)."""
        return _softplus_writer(_Call(self, q, k, inv_norm_q, inv_norm_k, scale, diag_offset), bias, grad_row)


def _lse_writer(call: "_Call", lse_row, lse_col, grad_row, grad_col) -> chunked_backward.WeightsWriter:
    if grad_row is None and grad_col is None:
        raise ValueError("lse weights: neither grad_row nor grad_col is given")
    if (grad_row is not None and lse_row is None) or (grad_col is not None and lse_col is None):
        raise ValueError("lse weights: a gradient is given for a direction without its lse")
    lse_row, lse_col, grad_row, grad_col = (_stat_vector(x, call.device)
                                            for x in (lse_row, lse_col, grad_row, grad_col))

    def write(out: Tensor, row_start: int, row_stop: int, row_scale: Tensor, col_scale: Tensor) -> None:
        call.ext.lse_weights(problem=call.problem, lse_row=_address(lse_row), lse_col=_address(lse_col),
                             grad_row=_address(grad_row), grad_col=_address(grad_col),
                             **_chunk_args(call, out, row_start, row_stop, row_scale, col_scale), launch=call.launch)

    return write


def _softplus_writer(call: "_Call", bias, grad_row) -> chunked_backward.WeightsWriter:
    bias = _stat_scalar(bias, call.device)
    grad_row = _stat_vector(grad_row, call.device)

    def write(out: Tensor, row_start: int, row_stop: int, row_scale: Tensor, col_scale: Tensor) -> Tensor:
        weight_sum = _empty((), call.device)
        bytes_needed = call.ext.softplus_weights_workspace_bytes(problem=call.problem, row_start=row_start,
                                                                 row_stop=row_stop, launch=call.launch)
        workspace = _empty(max(bytes_needed, 1), call.device, torch.uint8)
        call.ext.softplus_weights(problem=call.problem, bias=bias.data_ptr(), grad_row=grad_row.data_ptr(),
                                  **_chunk_args(call, out, row_start, row_stop, row_scale, col_scale),
                                  weight_sum=weight_sum.data_ptr(), workspace=workspace.data_ptr(),
                                  workspace_bytes=workspace.numel(), launch=call.launch)
        return weight_sum

    return write


def _chunk_args(call, out: Tensor, row_start: int, row_stop: int, row_scale: Tensor, col_scale: Tensor) -> dict:
    """The weights kernels' chunk arguments, checked against the writer's contract."""
    rows, m = row_stop - row_start, call.k.shape[0]
    if out.dtype != call.q.dtype or out.shape != (rows, m) or out.stride(1) != 1 or out.device != call.device:
        raise ValueError(f"weights: out must be a ({rows}, {m}) {call.q.dtype} tensor on {call.device} with unit "
                         f"column stride, got {tuple(out.shape)} {out.dtype} strides {out.stride()} on {out.device}")
    for name, x, size in (("row_scale", row_scale, rows), ("col_scale", col_scale, m)):
        if x.dtype != torch.float32 or x.shape != (size,) or not x.is_contiguous() or x.device != call.device:
            raise ValueError(f"weights: {name} must be a contiguous ({size},) float32 tensor on {call.device}, "
                             f"got {tuple(x.shape)} {x.dtype} on {x.device}")
    return dict(row_start=row_start, row_stop=row_stop, out=out.data_ptr(), out_row_stride=out.stride(0),
                row_scale=row_scale.data_ptr(), col_scale=col_scale.data_ptr())


def _check_operands(q: Tensor, k: Tensor) -> None:
    if q.dtype == torch.float64 or k.dtype == torch.float64:
        raise TypeError("the cuda backend does not support float64 inputs; use backend='torch' for float64")
    if q.dtype not in _DTYPES or k.dtype != q.dtype:
        raise TypeError(f"the cuda backend needs q and k of one dtype among float16, bfloat16, float32 "
                        f"(got {q.dtype} and {k.dtype})")
    if q.dim() != 2 or k.dim() != 2 or q.shape[1] != k.shape[1]:
        raise ValueError(f"q and k must be (N, D) and (M, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.device.type != "cuda" or k.device != q.device:
        raise ValueError(f"the cuda backend needs q and k on one CUDA device (got {q.device} and {k.device})")


def _row_stride(x: Tensor) -> int:
    """The row stride the kernels read x (N, D) with (a single row's is irrelevant: D)."""
    return x.stride(0) if x.shape[0] > 1 else x.shape[1]


def _kernel_operand(x: Tensor, max_row_stride_bytes: int) -> Tensor:
    """x itself when the kernels can read it in place (unit feature stride, rows apart by at least
    D and at most max_row_stride_bytes), else a contiguous copy."""
    inner_ok = x.shape[1] <= 1 or x.stride(1) == 1
    stride = _row_stride(x)
    return x if inner_ok and x.shape[1] <= stride <= max_row_stride_bytes // x.element_size() else x.contiguous()


def _stat_vector(x: Optional[Tensor], device: torch.device) -> Optional[Tensor]:
    return None if x is None else x.to(device=device, dtype=torch.float32).contiguous()


def _kernel_labels(label_mask: LabelMask, n: int, m: int, device: torch.device) -> Tuple[Tensor, Tensor]:
    """The label mask's (row_labels (n,), col_labels (m,)) as the kernels read them: contiguous
    int64 on ``device`` (int32 labels widened: the kernels compile one label type)."""
    labels = []
    for name, x, size in (("row_labels", label_mask.row_labels, n), ("col_labels", label_mask.col_labels, m)):
        if not isinstance(x, Tensor) or x.dtype not in (torch.int32, torch.int64):
            kind = f"a {x.dtype} tensor" if isinstance(x, Tensor) else type(x).__name__
            raise TypeError(f"label_mask.{name} must be an int32 or int64 tensor, got {kind}")
        if x.shape != (size,) or x.device != device:
            raise ValueError(f"label_mask.{name} must have shape ({size},) on {device}, got shape "
                             f"{tuple(x.shape)} on {x.device}")
        labels.append(x.to(torch.int64).contiguous())
    return labels[0], labels[1]


def _stat_scalar(x: Tensor, device: torch.device) -> Tensor:
    x = torch.as_tensor(x, device=device)
    if x.numel() != 1:
        raise ValueError(f"scale and bias must be 0-d tensors, got shape {tuple(x.shape)}")
    return x.to(dtype=torch.float32).reshape(())


class _Call:
    """One primitive call: validated operands, the extension's problem and launch descriptions,
    and the tensors they point into (kept alive for the launch)."""

    def __init__(self, kernels: CudaKernels, q, k, inv_norm_q, inv_norm_k, scale, diag_offset,
                 label_mask: Optional[LabelMask] = None):
        _check_operands(q, k)
        self.device = q.device
        (n, d), m = q.shape, k.shape[0]
        self.labels = None if label_mask is None else _kernel_labels(label_mask, n, m, self.device)
        self.empty = n == 0 or m == 0
        if self.empty:
            return
        self.ext = _extension.load(torch.cuda.get_device_capability(self.device))
        limit = self.ext.tile["max_row_stride_bytes"]
        self.q, self.k = _kernel_operand(q, limit), _kernel_operand(k, limit)
        self.inv_norm_q = _stat_vector(inv_norm_q, self.device)
        self.inv_norm_k = _stat_vector(inv_norm_k, self.device)
        self.scale = _stat_scalar(scale, self.device)
        if self.inv_norm_q.shape != (n,) or self.inv_norm_k.shape != (m,):
            raise ValueError("inv_norm_q and inv_norm_k must have shapes (N,) and (M,)")
        labels = {} if self.labels is None else dict(
            row_labels=self.labels[0].data_ptr(), col_labels=self.labels[1].data_ptr(),
            exclude_same_label=bool(label_mask.exclude_same))
        self.problem = self.ext.SimilarityProblem(
            dtype=getattr(self.ext.DType, _DTYPES[q.dtype]),
            q=self.q.data_ptr(), q_row_stride=_row_stride(self.q),
            k=self.k.data_ptr(), k_row_stride=_row_stride(self.k),
            n=n, m=m, d=d, inv_norm_q=self.inv_norm_q.data_ptr(), inv_norm_k=self.inv_norm_k.data_ptr(),
            scale=self.scale.data_ptr(), has_mask=diag_offset is not None, diag_offset=int(diag_offset or 0),
            **labels,
        )
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self.launch = self.ext.Launch(
            device=index, stream=torch.cuda.current_stream(self.device).cuda_stream, num_sms=_num_sms(index),
            fp32_single_pass_tf32=kernels.fp32_precision == "tf32", workspace_limit=kernels.workspace_limit_bytes,
        )

    def run(self, entry_point, workspace_bytes: int, **outputs) -> None:
        workspace = _empty(max(workspace_bytes, 1), self.device, torch.uint8)
        entry_point(problem=self.problem, workspace=workspace.data_ptr(), workspace_bytes=workspace.numel(),
                    launch=self.launch, **outputs)


__all__ = ["CudaKernels"]
