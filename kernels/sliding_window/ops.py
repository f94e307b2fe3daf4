"""Launchers, ``torch.library`` custom ops and autograd for the Triton sliding-window attention.

The ops take ``[B, T, H, D]`` tensors with any strides whose last dim is contiguous (Megatron's ``[s, b, h, d]``
seen as ``[b, s, h, d]`` goes in without a copy) and write outputs in the same token-major or batch-major order
as q, so the caller's transpose back is free.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._common import Launcher, cdiv, next_pow2
from .backward import swa_bwd_dkdv_kernel, swa_bwd_dq_kernel
from .forward import swa_fwd_kernel

_fwd = Launcher(swa_fwd_kernel)
_bwd_dq = Launcher(swa_bwd_dq_kernel)
_bwd_dkdv = Launcher(swa_bwd_dkdv_kernel)

__all__ = ["swa_triton"]


def _lastdim_contiguous(t):
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _empty_like_layout(ref, shape, dtype=None):
    """An empty ``[B, T, ...]`` tensor laid out token-major (``[T, B, ...]`` in memory) when ``ref`` is."""
    dtype = ref.dtype if dtype is None else dtype
    if ref.dim() >= 2 and ref.shape[0] > 1 and ref.stride(0) < ref.stride(1):
        return torch.empty((shape[1], shape[0], *shape[2:]), dtype=dtype, device=ref.device).transpose(0, 1)
    return torch.empty(shape, dtype=dtype, device=ref.device)


def _doc_ids(cu_seqlens, T, device):
    """Per-token document index ``[T]`` int32 from ``cu_seqlens``, on the device and without a host sync."""
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    pos = torch.arange(T, device=device, dtype=torch.int64)
    return (torch.searchsorted(cu[1:], pos, right=True)).to(torch.int32)


def _strides3(t):
    return t.stride()[:3] if t is not None else (0, 0, 0)  # one stride() call: each costs ~1-2 us of host time


def _meta(q, k, kp):
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    P = 0 if kp is None else kp.shape[1]
    block_d = max(16, next_pow2(D))
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    return B, T, H, Hkv, D, P, block_d, prec


def swa_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kp: Optional[torch.Tensor],
            vp: Optional[torch.Tensor], doc: Optional[torch.Tensor], window: int,
            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    B, T, H, Hkv, D, P, block_d, prec = _meta(q, k, kp)
    o = _empty_like_layout(q, q.shape)
    lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    kp_, vp_ = (q, q) if kp is None else (kp, vp)
    _fwd(
        lambda meta: (cdiv(T, meta["BM"]), B * H),
        (q, k, v, kp_, vp_, o, lse, doc if doc is not None else lse,
         *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(kp), *_strides3(vp), *_strides3(o),
         T, P, H, scale),
        D=D, W=window, G=H // Hkv, BLOCK_D=block_d, HAS_PREFIX=kp is not None, IS_VARLEN=doc is not None,
        DOT_PREC=prec,
    )
    return o, lse


swa_fwd_op = torch.library.custom_op("based_kernels::swa_fwd", swa_fwd, mutates_args=())


@swa_fwd_op.register_fake
def _(q, k, v, kp, vp, doc, window, scale):
    B, T, H, _ = q.shape
    return _empty_like_layout(q, q.shape), q.new_empty(B, H, T, dtype=torch.float32)


def swa_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kp: Optional[torch.Tensor],
            vp: Optional[torch.Tensor], doc: Optional[torch.Tensor], o: torch.Tensor, lse: torch.Tensor,
            window: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                torch.Tensor]:
    B, T, H, Hkv, D, P, block_d, prec = _meta(q, k, kp)
    do = _lastdim_contiguous(do)
    dq = _empty_like_layout(q, q.shape)
    dk = _empty_like_layout(k, k.shape)
    dv = _empty_like_layout(v, v.shape)
    if kp is None:
        dkp, dvp = q.new_empty(0), q.new_empty(0)
        kp_, vp_ = q, q
    else:
        dkp, dvp = _empty_like_layout(kp, kp.shape), _empty_like_layout(vp, vp.shape)
        kp_, vp_ = kp, vp
    delta = torch.empty_like(lse)
    doc_ = doc if doc is not None else lse
    s_in = (*_strides3(q), *_strides3(k), *_strides3(v), *_strides3(kp), *_strides3(vp))  # both kernels
    flags = dict(BLOCK_D=block_d, HAS_PREFIX=kp is not None, IS_VARLEN=doc is not None, DOT_PREC=prec)
    _bwd_dq(
        lambda meta: (cdiv(T, meta["BM"]), B * H),
        (q, k, v, kp_, vp_, o, do, lse, delta, dq, doc_,
         *s_in, *_strides3(o), *_strides3(do), *_strides3(dq), T, P, H, scale),
        D=D, W=window, G=H // Hkv, **flags,
    )
    dkp_, dvp_ = (dkp, dvp) if kp is not None else (dk, dv)
    _bwd_dkdv(
        lambda meta: (cdiv(T + P, meta["BN"]), B * Hkv),
        (q, k, v, kp_, vp_, do, lse, delta, dk, dv, dkp_, dvp_, doc_,
         *s_in, *_strides3(do), *_strides3(dk), *_strides3(dv), *_strides3(dkp if kp is not None else None),
         *_strides3(dvp if kp is not None else None), T, P, H, scale),
        D=D, W=window, G=H // Hkv, **flags,
    )
    return dq, dk, dv, dkp, dvp


swa_bwd_op = torch.library.custom_op("based_kernels::swa_bwd", swa_bwd, mutates_args=())


@swa_bwd_op.register_fake
def _(do, q, k, v, kp, vp, doc, o, lse, window, scale):
    dkp = q.new_empty(0) if kp is None else _empty_like_layout(kp, kp.shape)
    dvp = q.new_empty(0) if vp is None else _empty_like_layout(vp, vp.shape)
    return (_empty_like_layout(q, q.shape), _empty_like_layout(k, k.shape), _empty_like_layout(v, v.shape),
            dkp, dvp)


def _setup_context(ctx, inputs, output):
    q, k, v, kp, vp, doc, window, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, kp, vp, doc, o, lse)
    ctx.window, ctx.scale = window, scale
    ctx.mark_non_differentiable(lse)


def _grads(ctx, do, bwd):
    q, k, v, kp, vp, doc, o, lse = ctx.saved_tensors
    dq, dk, dv, dkp, dvp = bwd(do, q, k, v, kp, vp, doc, o, lse, ctx.window, ctx.scale)
    if kp is None:
        dkp = dvp = None
    return dq, dk, dv, dkp, dvp, None, None, None


# torch.compile path: opaque custom ops (the backward is traced as a call of based_kernels::swa_bwd)
torch.library.register_autograd("based_kernels::swa_fwd", lambda ctx, do, dlse: _grads(ctx, do, swa_bwd_op),
                                setup_context=_setup_context)


class SlidingWindowAttentionFunction(torch.autograd.Function):
    """Eager path: the same kernels without the custom-op dispatch (~0.1 ms of host time per call saved)."""

    @staticmethod
    def forward(ctx, q, k, v, kp, vp, doc, window, scale):
        o, lse = swa_fwd(q, k, v, kp, vp, doc, window, scale)
        _setup_context(ctx, (q, k, v, kp, vp, doc, window, scale), (o, lse))
        ctx.set_materialize_grads(False)  # no zero-filled gradient for the unused lse output
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        return _grads(ctx, do, swa_bwd)


def swa_triton(q, k, v, *, window, scale, kv_prefix=None, cu_seqlens=None):
    """Validate, normalize strides and call the custom op. Returns o ``[B, T, H, D]``."""
    q, k, v = (_lastdim_contiguous(t) for t in (q, k, v))
    kp = vp = None
    if kv_prefix is not None:
        kp, vp = (_lastdim_contiguous(t) for t in kv_prefix)
    doc = None
    if cu_seqlens is not None:
        doc = _doc_ids(cu_seqlens, q.shape[1], q.device)
    args = (q, k, v, kp, vp, doc, int(window), float(scale))
    o, _ = swa_fwd_op(*args) if torch.compiler.is_compiling() else SlidingWindowAttentionFunction.apply(*args)
    return o
