"""The functional API of RMSNorm (checks, backend dispatch), and the Triton path: launchers, autograd Function
(eager) and ``torch.library`` custom ops (torch.compile).

Everything works on a 2-D view ``x [N, D]`` (rows = tokens, last dim contiguous, any row stride) and a weight
``w [D]``. The forward writes ``y [N, D]`` (contiguous, in the output dtype: x's unless ``out_dtype`` says
otherwise) and ``rstd [N]`` (fp32, kept for the backward together with x and w); the backward reads ``dy`` in y's
dtype and writes ``dx [N, D]`` (contiguous, x's dtype) and per-program fp32 partial weight gradients
``[programs, D]`` that one ``.sum(0)`` reduces (deterministic). x and y (dy) may differ in dtype (an fp32 residual
stream normed into bf16, ``fp32_residual_connection``): the kernels load each pointer in its own element type and
compute in fp32, and the row strides are in elements of each tensor (see ``kernels.py``).
"""
from __future__ import annotations

import torch

from .._common import Launcher, cdiv, next_pow2, resolve_backend, row_align, sm_count
from .kernels import MAX_D, ROW_QUANTUM, add_rms_fwd_kernel, rms_bwd_kernel, rms_fwd_kernel
from .reference import add_rms_norm_reference, rms_norm_reference

__all__ = ["rms_norm", "add_rms_norm", "RMSNormFunction", "rms_norm_fwd_op", "rms_norm_bwd_op", "fwd_triton",
           "bwd_triton", "add_fwd_triton"]


# ------------------------------------------------------------------------------------------- the functional API
_TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, backend=None,
             out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``y = x * rsqrt(mean(x^2, -1) + eps) * weight`` over the last dim, fp32 math, y in ``out_dtype``.

    x ``[..., D]`` (bf16 / fp16 / fp32 on the Triton path; any leading dims and row strides with a contiguous
    last dim, otherwise one copy); weight ``[D]`` in any float dtype, used as ``weight.to(x.dtype)`` like
    ``F.rms_norm(x, (D,), weight.to(x.dtype), eps)``; its gradient is the fp32 sum over rows, returned in
    weight's dtype. The Triton path takes D <= 16384 (``kernels.MAX_D``) and is deterministic.
    backend: None (Triton for CUDA tensors, PyTorch otherwise, or ``based_kernels.use_backend``), "triton",
    "torch" (``torch.nn.functional.rms_norm``).
    out_dtype: y's dtype (None: x's). E.g. an fp32 residual stream in, the bf16 compute dtype out: the statistics
    come from the fp32 values and y is rounded once (Triton: in the kernel's store, no extra pass); the backward
    takes dy in out_dtype and returns dx in x's dtype. On the Triton path out_dtype is one of bf16 / fp16 / fp32.
    """
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must be [..., D] with D >= 1; got {tuple(x.shape)}")
    D = x.shape[-1]
    if tuple(weight.shape) != (D,):
        raise ValueError(f"weight must be [D] = [{D}] (x's last dim); got {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"x ({x.device}) and weight ({weight.device}) are on different devices")
    if not (x.is_floating_point() and weight.is_floating_point()):
        raise TypeError(f"x and weight must be floating point; got {x.dtype}, {weight.dtype}")
    if out_dtype is not None and not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
        raise TypeError(f"out_dtype must be None or a floating-point torch.dtype; got {out_dtype!r}")
    if out_dtype == x.dtype:
        out_dtype = None
    if resolve_backend(backend, x) == "torch" or x.numel() == 0:
        return rms_norm_reference(x, weight, eps, out_dtype)
    if D > MAX_D:
        raise ValueError(f"the Triton RMSNorm keeps a row in registers: D = {D} > {MAX_D} (use backend='torch')")
    if x.dtype not in _TRITON_DTYPES:
        raise TypeError(f"the Triton RMSNorm takes {_TRITON_DTYPES} inputs; got {x.dtype} (use backend='torch')")
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if out_dtype not in _TRITON_DTYPES:
        raise TypeError(f"the Triton RMSNorm writes {_TRITON_DTYPES}; got out_dtype {out_dtype} (use backend='torch')")
    x2 = x.reshape(-1, D)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    w = weight if weight.stride(0) == 1 else weight.contiguous()
    if torch.compiler.is_compiling():
        y = rms_norm_fwd_op(x2, w, float(eps), out_dtype)[0]
    else:
        y = RMSNormFunction.apply(x2, w, float(eps), out_dtype)
    return y if x.dim() == 2 else y.view(x.shape)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5,
                 bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                 backend=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add before a pre-norm sublayer and that norm, in one pass (inference: no backward).

    Returns ``(y, h)``: ``h = residual + (x + bias)`` in the residual's dtype (x and bias cast to it first, as
    Megatron's bias-dropout-add does; ``reference.residual_add``) and ``y = rms_norm(h, weight, eps,
    out_dtype=out_dtype)``. x and residual ``[..., D]`` of the same shape (contiguous last dim, any row strides;
    otherwise one copy), bias ``[D]`` or None; h comes out contiguous. On the Triton path the add's results are
    bitwise those of ``residual_add``, and y equals ``rms_norm(h, ...)`` up to the order of the fp32 sum of
    squares (the two kernels are tuned separately). Inputs that require grad are refused: nothing records a
    backward. backend as for :func:`rms_norm`.
    """
    if tuple(x.shape) != tuple(residual.shape):
        raise ValueError(f"x {tuple(x.shape)} and residual {tuple(residual.shape)} must have the same shape")
    D = x.shape[-1] if x.dim() else 0
    if bias is not None and (tuple(bias.shape) != (D,) or bias.device != x.device):
        raise ValueError(f"bias must be [D] = [{D}] on {x.device}; got {tuple(bias.shape)} on {bias.device}")
    if residual.device != x.device:
        raise ValueError(f"x ({x.device}) and residual ({residual.device}) are on different devices")
    if tuple(weight.shape) != (D,) or weight.device != x.device:
        raise ValueError(f"weight must be [D] = [{D}] on {x.device}; got {tuple(weight.shape)} on {weight.device}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, residual, weight, bias)):
        raise RuntimeError("add_rms_norm has no backward: call it under torch.no_grad() / inference_mode(), or use "
                           "the add and rms_norm")
    if resolve_backend(backend, x) == "torch" or x.numel() == 0:
        if out_dtype == residual.dtype:
            out_dtype = None
        return add_rms_norm_reference(x, residual, weight, eps, bias, out_dtype)
    if D > MAX_D:
        raise ValueError(f"the Triton RMSNorm keeps a row in registers: D = {D} > {MAX_D} (use backend='torch')")
    out_dtype = residual.dtype if out_dtype is None else out_dtype
    for name, dt in (("x", x.dtype), ("residual", residual.dtype), ("out_dtype", out_dtype)) + (
            (("bias", bias.dtype),) if bias is not None else ()):
        if dt not in _TRITON_DTYPES:
            raise TypeError(f"the Triton add + RMSNorm takes {_TRITON_DTYPES}; got {name} {dt} (use backend='torch')")
    x2, r2 = (t.reshape(-1, D) for t in (x, residual))
    x2, r2 = (t if t.stride(1) == 1 else t.contiguous() for t in (x2, r2))
    y, h = add_fwd_triton(x2, r2, weight if weight.stride(0) == 1 else weight.contiguous(), eps, bias, out_dtype)
    return y.view(x.shape), h.view(x.shape)


# ------------------------------------------------------------------------------------------------ the Triton path
_fwd, _bwd, _add_fwd = Launcher(rms_fwd_kernel), Launcher(rms_bwd_kernel), Launcher(add_rms_fwd_kernel)
PROGRAMS_PER_SM = 4  # backward programs (each a contiguous range of rows); the interpreter's "device": 4 SMs


def fwd_triton(x: torch.Tensor, w: torch.Tensor, eps: float,
               out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, rstd)``: y in ``out_dtype`` (None: x's dtype; the kernel rounds its fp32 result once to y's type)."""
    N, D = x.shape
    y = torch.empty((N, D), dtype=x.dtype if out_dtype is None else out_dtype, device=x.device)
    rstd = torch.empty(N, dtype=torch.float32, device=x.device)
    a = row_align(x)
    _fwd(lambda meta: (cdiv(N, meta["BLOCK_M"]),), (x, w, y, rstd, x.stride(0) // a, N, eps),
         D=D, BLOCK_D=next_pow2(D), ALIGN=a)
    return y, rstd


def add_fwd_triton(x: torch.Tensor, r: torch.Tensor, w: torch.Tensor, eps: float, bias: torch.Tensor | None,
                   out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y [N, D] in out_dtype, h [N, D] in r's dtype)`` of :func:`add_rms_norm` on 2-D views."""
    N, D = x.shape
    h = torch.empty((N, D), dtype=r.dtype, device=x.device)
    y = torch.empty((N, D), dtype=out_dtype, device=x.device)
    a = row_align(*sorted((x, r), key=lambda t: t.element_size()))
    _add_fwd(lambda meta: (cdiv(N, meta["BLOCK_M"]),),
             (x, r, w if bias is None else bias, w, h, y, x.stride(0) // a, r.stride(0) // a, N, float(eps)),
             D=D, BLOCK_D=next_pow2(D), ALIGN=a, HAS_BIAS=bias is not None)
    return y, h


def bwd_triton(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, rstd: torch.Tensor):
    """``(dx, dw)``: dx in x's dtype, dw in w's dtype (the fp32 sum of the programs' partials). dy may be in
    another dtype than x (y's, when the forward had an ``out_dtype``): the kernel loads each in its own type."""
    N, D = x.shape
    if dy.stride(1) != 1:
        dy = dy.contiguous()
    # ~PROGRAMS_PER_SM programs per SM, each over a contiguous range of a multiple of ROW_QUANTUM rows
    rows_per = cdiv(cdiv(N, sm_count(x.device, 4) * PROGRAMS_PER_SM), ROW_QUANTUM) * ROW_QUANTUM
    progs = cdiv(N, rows_per)
    dx = torch.empty((N, D), dtype=x.dtype, device=x.device)
    dwp = torch.empty((progs, D), dtype=torch.float32, device=x.device)
    # ALIGN is in elements and divides both row strides (each in its own tensor's elements), so it is valid for
    # mixed dtypes; starting from the narrower dtype's 16 bytes keeps 16-byte loads on it (bf16 dy, fp32 x)
    a = row_align(*sorted((x, dy), key=lambda t: t.element_size()))
    _bwd(lambda meta: (progs,), (x, w, dy, rstd, dx, dwp, x.stride(0) // a, dy.stride(0) // a, N, rows_per),
         D=D, BLOCK_D=next_pow2(D), ALIGN=a)
    return dx, dwp.sum(0).to(w.dtype)


# -------------------------------------------------------------------------------------------------- eager autograd
class RMSNormFunction(torch.autograd.Function):
    """Eager path: ``apply(x [N, D], w [D], eps) -> y [N, D]``; saves x (the view itself), w and rstd."""

    @staticmethod
    def forward(ctx, x, w, eps, out_dtype=None):
        y, rstd = fwd_triton(x, w, eps, out_dtype)
        ctx.save_for_backward(x, w, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, rstd = ctx.saved_tensors
        dx, dw = bwd_triton(dy, x, w, rstd)
        return dx, dw, None, None


# ------------------------------------------------------------------------- torch.compile path: opaque custom ops
@torch.library.custom_op("based_kernels::rms_norm_fwd", mutates_args=())
def rms_norm_fwd_op(x: torch.Tensor, w: torch.Tensor, eps: float,
                    out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y [N, D] in out_dtype (None: x's), rstd [N] fp32)``."""
    return fwd_triton(x, w, eps, out_dtype)


@rms_norm_fwd_op.register_fake
def _(x, w, eps, out_dtype=None):
    return x.new_empty(x.shape, dtype=out_dtype or x.dtype), x.new_empty(x.shape[0], dtype=torch.float32)


@torch.library.custom_op("based_kernels::rms_norm_bwd", mutates_args=())
def rms_norm_bwd_op(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                    rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx [N, D] in x's dtype, dw [D] in w's dtype)``."""
    return bwd_triton(dy, x, w, rstd)


@rms_norm_bwd_op.register_fake
def _(dy, x, w, rstd):
    return x.new_empty(x.shape), w.new_empty(w.shape)


def _setup_context(ctx, inputs, output):
    x, w = inputs[:2]
    ctx.save_for_backward(x, w, output[1])


def _backward(ctx, dy, drstd):  # rstd is an internal output: its gradient is ignored
    x, w, rstd = ctx.saved_tensors
    dx, dw = rms_norm_bwd_op(dy, x, w, rstd)
    return dx, dw, None, None


torch.library.register_autograd("based_kernels::rms_norm_fwd", _backward, setup_context=_setup_context)
