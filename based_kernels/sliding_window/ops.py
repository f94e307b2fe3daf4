"""The functional API of sliding-window attention (backend dispatch), and the Triton path: launchers,
``torch.library`` custom ops (torch.compile) and autograd Functions (eager).

The ops take ``[B, T, H, D]`` tensors with any strides whose last dim is contiguous (Megatron's ``[s, b, h, d]``
seen as ``[b, s, h, d]`` goes in without a copy) and write outputs in the same token-major or batch-major order
as q, so the caller's transpose back is free.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch

from .._common import (Launcher, cdiv, confine_flags, doc_ids, dot_precision, empty_like_layout,
                       lastdim_contiguous, launch_confined, next_pow2, resolve_backend, sm_count, token_major)
from .backward import swa_bwd_dkdv_kernel, swa_bwd_dq_kernel
from .backward_fused import DELTA_BM, swa_bwd_delta_kernel, swa_bwd_fused_kernel
from .forward import swa_fwd_kernel
from .recurrent import swa_step_kernel
from .reference import sliding_window_attention_reference, sliding_window_step_reference

_fwd = Launcher(swa_fwd_kernel)
_bwd_dq = Launcher(swa_bwd_dq_kernel)
_bwd_dkdv = Launcher(swa_bwd_dkdv_kernel)
_step = Launcher(swa_step_kernel)
_bwd_delta = Launcher(swa_bwd_delta_kernel)
_bwd_fused = Launcher(swa_bwd_fused_kernel)

# The backward's kernels: "split" (backward.py: a dQ kernel and a dK / dV kernel, 12 tensors moved) or "fused"
# (backward_fused.py: delta, then dQ, dK and dV in one pass, 9 tensors). Read at import; tests and benchmarks may
# reassign it. STRIP: the fused kernel's key blocks per program, in tokens (a multiple of its block sizes); None:
# 1024, halved down to 256 while that gives fewer than STRIP_PROGRAMS_PER_SM programs per SM (the gradients do not
# depend on it: backward_fused.py).
BWD = os.environ.get("BASED_SWA_BWD", "split")
if BWD not in ("split", "fused"):
    raise ValueError(f"BASED_SWA_BWD must be 'split' or 'fused'; got {BWD!r}")
STRIP = None
STRIP_PROGRAMS_PER_SM = 3

__all__ = ["sliding_window_attention", "sliding_window_step", "swa_triton", "swa_step_triton", "BWD", "STRIP"]


# ------------------------------------------------------------------------------------------- the functional API
def sliding_window_attention(q, k, v, *, window, scale=None, cu_seqlens=None, kv_prefix=None, backend=None):
    """Causal left-window softmax attention: query t attends keys ``t - window ... t`` (window + 1 keys).

    Args:
        q: ``[B, T, H, D]``; k, v: ``[B, T, H_kv, D]`` with H a multiple of H_kv (GQA). Any strides with a
            contiguous last dim (e.g. Megatron's ``[s, b, h, d]`` transposed to ``[b, s, h, d]``).
        window: left window W >= 0.
        scale: softmax scale, default ``D ** -0.5``.
        cu_seqlens: ``[N + 1]`` document offsets for packed documents (B = 1); no attention across them.
        kv_prefix: ``(k_prefix, v_prefix)`` ``[B, P, H_kv, D]`` rows at positions -P ... -1 (the context-parallel
            halo); gradients flow back to them.
        backend: None (Triton for CUDA tensors, PyTorch otherwise), "triton" (also runs on CPU tensors under
            ``TRITON_INTERPRET=1``) or "torch" (the dense reference).
    Returns:
        o ``[B, T, H, D]`` in q's dtype (token-major in memory when q is).
    """
    if resolve_backend(backend, q) == "torch":
        return sliding_window_attention_reference(q, k, v, window=window, scale=scale, cu_seqlens=cu_seqlens,
                                                  kv_prefix=kv_prefix)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return swa_triton(q, k, v, window, scale, kv_prefix, cu_seqlens)


def sliding_window_step(q, k, v, k_cache, v_cache, positions, *, window, scale=None, backend=None):
    """One decode token per sequence over a ring buffer of the last ``window + 1`` K/V rows (position p in slot
    ``p % (window + 1)``): writes k, v into the ring at ``positions`` and attends q over positions
    ``max(0, p - window) .. p``. One Triton kernel (``recurrent.py``); no host sync (CUDA-graph capturable).

    Args:
        q, k, v: ``[B, H, D]`` (the new token's post-RoPE q, k and v), any batch/head strides with a contiguous
            last dim. No GQA: k and v have q's H heads (the S mixer has none).
        k_cache, v_cache: ``[B, window + 1, H, D]`` in k's / v's dtype, last dim contiguous; updated in place.
        positions: ``[B]`` integer tensor on the device, each sequence's position p >= 0 (ragged across the batch).
        window: left window W >= 0.
        scale: softmax scale, default ``1 / sqrt(D)`` (``F.scaled_dot_product_attention``'s, which the step ran).
        backend: None (Triton for CUDA tensors, PyTorch otherwise), "triton" (also on CPU under
            ``TRITON_INTERPRET=1``) or "torch" (``sliding_window_step_reference``: index_put and a masked SDPA).
    Returns:
        o ``[B, H, D]`` in q's dtype (contiguous on the Triton path), fp32 accumulation.
    """
    validate_step(q, k, v, k_cache, v_cache, positions, window)
    if resolve_backend(backend, q) == "torch":
        return sliding_window_step_reference(q, k, v, k_cache, v_cache, positions, window=window, scale=scale)
    if q.shape[-1] > 256:
        raise ValueError(f"head dim {q.shape[-1]} > 256 is not supported by the Triton kernel; use backend='torch'")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return swa_step_triton(q, k, v, k_cache, v_cache, positions, window, scale)


def validate_step(q, k, v, k_cache, v_cache, positions, window):
    """The decode step's checks (shapes, dtypes, layouts; no host sync: the positions' values are not read)."""
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    if q.dim() != 3 or k.shape != q.shape or v.shape != q.shape:
        if q.dim() == 3 and k.dim() == 3 and k.shape[0] == q.shape[0] and k.shape[2] == q.shape[2] and \
                k.shape[1] != q.shape[1]:
            raise ValueError(f"the decode step has no GQA: k, v need q's {q.shape[1]} heads (the S mixer has as "
                             f"many key/value heads as query heads); got {k.shape[1]}")
        raise ValueError(f"expected q, k, v [B, H, D] of one shape; got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    B, H, D = q.shape
    want = (B, window + 1, H, D)
    if tuple(k_cache.shape) != want or tuple(v_cache.shape) != want:
        raise ValueError(f"k_cache, v_cache must be [B, window + 1, H, D] = {want}; got {tuple(k_cache.shape)}, "
                         f"{tuple(v_cache.shape)}")
    if k_cache.dtype != k.dtype or v_cache.dtype != v.dtype:
        raise ValueError(f"the caches must have k's and v's dtypes; got k {k.dtype} -> k_cache {k_cache.dtype}, "
                         f"v {v.dtype} -> v_cache {v_cache.dtype}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError(f"the caches need a contiguous last dim; got strides {k_cache.stride()}, {v_cache.stride()}")
    if positions.shape != (B,) or positions.dtype.is_floating_point or positions.dtype.is_complex or \
            positions.dtype == torch.bool:
        raise ValueError(f"positions must be an integer tensor [B] = [{B}]; got {positions.dtype} "
                         f"{tuple(positions.shape)}")
    if positions.device != q.device:
        raise ValueError(f"positions must be on q's device ({q.device}); got {positions.device}")


# ------------------------------------------------------------------------------------------------ the Triton path
def _strides3(t):
    return t.stride()[:3] if t is not None else (0, 0, 0)  # one stride() call: each costs ~1-2 us of host time


def _meta(q, k, kp):
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    P = 0 if kp is None else kp.shape[1]
    block_d = max(16, next_pow2(D))
    prec = dot_precision(q.dtype)
    return B, T, H, Hkv, D, P, block_d, prec


def swa_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kp: Optional[torch.Tensor],
            vp: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor], window: int,
            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _swa_fwd(q, k, v, kp, vp, cu_seqlens, window, scale, *confine_flags(q, 1))


def _swa_fwd(q, k, v, kp, vp, cu_seqlens, window, scale, bad):
    """swa_fwd with its confinement flag given (``bad``: zeroed, from ``confine_flags``)."""
    B, T, H, Hkv, D, P, block_d, prec = _meta(q, k, kp)
    doc = doc_ids(cu_seqlens, T, q.device)
    o = empty_like_layout(q, q.shape)
    lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    kp_, vp_ = (q, q) if kp is None else (kp, vp)
    launch_confined(
        _fwd, lambda meta: (cdiv(T, meta["BM"]) * B * H,),
        (q, k, v, kp_, vp_, o, lse, doc if doc is not None else lse, bad,
         *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(kp), *_strides3(vp), *_strides3(o),
         T, P, H, scale),
        dict(D=D, W=window, G=H // Hkv, BLOCK_D=block_d, HAS_PREFIX=kp is not None, IS_VARLEN=doc is not None,
             DOT_PREC=prec),
    )
    return o, lse


swa_fwd_op = torch.library.custom_op("based_kernels::swa_fwd", swa_fwd, mutates_args=())


@swa_fwd_op.register_fake
def _(q, k, v, kp, vp, cu_seqlens, window, scale):
    B, T, H, _ = q.shape
    return empty_like_layout(q, q.shape), q.new_empty(B, H, T, dtype=torch.float32)


def swa_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kp: Optional[torch.Tensor],
            vp: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor], o: torch.Tensor, lse: torch.Tensor,
            window: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                torch.Tensor]:
    return _swa_bwd(do, q, k, v, kp, vp, cu_seqlens, o, lse, window, scale, *confine_flags(q, 2))


def _swa_bwd(do, q, k, v, kp, vp, cu_seqlens, o, lse, window, scale, bad_dq, bad_dkdv):
    """swa_bwd with the two kernels' confinement flags given (zeroed, from ``confine_flags``)."""
    B, T, H, Hkv, D, P, block_d, prec = _meta(q, k, kp)
    doc = doc_ids(cu_seqlens, T, q.device)
    do = lastdim_contiguous(do)
    dq = empty_like_layout(q, q.shape)
    dk = empty_like_layout(k, k.shape)
    dv = empty_like_layout(v, v.shape)
    if kp is None:
        dkp, dvp = q.new_empty(0), q.new_empty(0)
        kp_, vp_ = q, q
    else:
        dkp, dvp = empty_like_layout(kp, kp.shape), empty_like_layout(vp, vp.shape)
        kp_, vp_ = kp, vp
    delta = torch.empty_like(lse)
    doc_ = doc if doc is not None else lse
    s_in = (*_strides3(q), *_strides3(k), *_strides3(v), *_strides3(kp), *_strides3(vp))  # both kernels
    consts = dict(D=D, W=window, G=H // Hkv, BLOCK_D=block_d, HAS_PREFIX=kp is not None, IS_VARLEN=doc is not None,
                  DOT_PREC=prec)
    dkp_, dvp_ = (dkp, dvp) if kp is not None else (dk, dv)
    if BWD == "fused":
        s_dkdv = (*_strides3(dk), *_strides3(dv), *_strides3(dkp if kp is not None else None),
                  *_strides3(dvp if kp is not None else None))
        _FusedLaunch(T, P, H, B, Hkv, consts, q.device)(
            q, k, v, kp_, vp_, o, do, lse, delta, dq, dk, dv, dkp_, dvp_, doc_, bad_dq,
            (*s_in, *_strides3(do), *_strides3(dq), *s_dkdv, T, P, H, scale), _strides3(o), _strides3(do), consts)
        return dq, dk, dv, dkp, dvp
    launch_confined(
        _bwd_dq, lambda meta: (cdiv(T, meta["BM"]) * B * H,),
        (q, k, v, kp_, vp_, o, do, lse, delta, dq, doc_, bad_dq,
         *s_in, *_strides3(o), *_strides3(do), *_strides3(dq), T, P, H, scale),
        consts,
    )
    launch_confined(
        _bwd_dkdv, lambda meta: (cdiv(T + P, meta["BN"]) * B * Hkv,),
        (q, k, v, kp_, vp_, do, lse, delta, dk, dv, dkp_, dvp_, doc_, bad_dkdv,
         *s_in, *_strides3(do), *_strides3(dk), *_strides3(dv), *_strides3(dkp if kp is not None else None),
         *_strides3(dvp if kp is not None else None), T, P, H, scale),
        consts,
    )
    return dq, dk, dv, dkp, dvp


def _scratch(n: int, device) -> torch.Tensor:
    """The fused backward's fp32 dQ slots (uninitialized: the kernel writes a slot before it reads it; tests fill
    it with NaN to check that)."""
    return torch.empty(n, dtype=torch.float32, device=device)


class _FusedLaunch:
    """What the fused backward's launches derive from a call's sizes (``BWD = "fused"``): the strip length, the
    scratch size and the grids; computed per call on the general path, once per plan on the plain one."""

    def __init__(self, T, P, H, B, Hkv, consts, device):
        strip = self.setting = STRIP
        if strip is None:
            strip, want = 1024, STRIP_PROGRAMS_PER_SM * sm_count(device, 1)
            while strip > 256 and cdiv(T + P, strip) * B * Hkv < want:
                strip //= 2
        self.s_acc = (consts["W"] + 3 * 64) * consts["G"] * consts["BLOCK_D"]  # >= (R + 2) * BB * G * BLOCK_D
        self.n_acc = (cdiv(T + P + 128, strip) + 1) * B * Hkv * self.s_acc  # slots at every BB <= 64
        self.strip = strip
        self.grid = lambda meta: (cdiv(cdiv(T, meta["BB"]) + cdiv(P, meta["BB"]), strip // meta["BB"]) * B * Hkv,)
        self.grid_delta = lambda meta: (cdiv(T, DELTA_BM) * B * H,)
        self.delta_consts = dict(D=consts["D"], BLOCK_D=consts["BLOCK_D"], BM=DELTA_BM)

    def __call__(self, q, k, v, kp, vp, o, do, lse, delta, dq, dk, dv, dkp, dvp, doc, bad, scalars, s_o, s_do,
                 consts):
        """Delta, then dQ, dK, dV in one kernel, plain and confining. ``scalars``: the strides of q, k, v, kp, vp,
        do, dq, dk, dv, dkp, dvp (3 each), then T, P, H, scale."""
        T, H = scalars[-4], scalars[-2]
        _bwd_delta(self.grid_delta, (o, do, delta, *s_o, *s_do, T, H), **self.delta_consts)
        acc = _scratch(self.n_acc, q.device)
        launch_confined(_bwd_fused, self.grid, (q, k, v, kp, vp, do, lse, delta, dq, dk, dv, dkp, dvp, doc, acc, bad,
                                                *scalars, self.strip, self.s_acc), consts)


swa_bwd_op = torch.library.custom_op("based_kernels::swa_bwd", swa_bwd, mutates_args=())


@swa_bwd_op.register_fake
def _(do, q, k, v, kp, vp, cu_seqlens, o, lse, window, scale):
    dkp = q.new_empty(0) if kp is None else empty_like_layout(kp, kp.shape)
    dvp = q.new_empty(0) if vp is None else empty_like_layout(vp, vp.shape)
    return (empty_like_layout(q, q.shape), empty_like_layout(k, k.shape), empty_like_layout(v, v.shape),
            dkp, dvp)


def _setup_context(ctx, inputs, output):
    q, k, v, kp, vp, cu_seqlens, window, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, kp, vp, cu_seqlens, o, lse)
    ctx.window, ctx.scale = window, scale
    ctx.mark_non_differentiable(lse)


def _grads(ctx, do, bwd, *flags):
    q, k, v, kp, vp, cu_seqlens, o, lse = ctx.saved_tensors
    dq, dk, dv, dkp, dvp = bwd(do, q, k, v, kp, vp, cu_seqlens, o, lse, ctx.window, ctx.scale, *flags)
    if kp is None:
        dkp = dvp = None
    return dq, dk, dv, dkp, dvp, None, None, None


# torch.compile path: opaque custom ops (the backward is traced as a call of based_kernels::swa_bwd)
torch.library.register_autograd("based_kernels::swa_fwd", lambda ctx, do, dlse: _grads(ctx, do, swa_bwd_op),
                                setup_context=_setup_context)


class SlidingWindowAttentionFunction(torch.autograd.Function):
    """Eager path, any inputs: the same kernels without the custom-op dispatch (~0.1 ms of host time per call
    saved). Returns o only; lse is saved for the backward, not an output (no extra autograd output to track)."""

    @staticmethod
    def forward(ctx, q, k, v, kp, vp, cu_seqlens, window, scale):
        bad, *ctx.bad = confine_flags(q, 3)  # the forward's and the backward's flags: one zeroed allocation
        o, lse = _swa_fwd(q, k, v, kp, vp, cu_seqlens, window, scale, bad)
        ctx.save_for_backward(q, k, v, kp, vp, cu_seqlens, o, lse)
        ctx.window, ctx.scale = window, scale
        return o

    @staticmethod
    def backward(ctx, do):
        return _grads(ctx, do, _swa_bwd, *ctx.bad)


class _Plan:
    """What the eager launches of one plain call signature (no prefix, no documents; q, k, v shapes, strides and
    dtype, window, scale) derive from it, computed once: output layouts, grids, constexprs and the scalar
    arguments (strides, T, P, H, scale) of the three kernels. Built only after the signature passed
    validation, so a cached plan also means "validated"."""

    def __init__(self, q, k, v, window, scale):
        B, T, H, Hkv, D, P, block_d, prec = _meta(q, k, None)
        meta = lambda t: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")  # noqa: E731
        self.layouts = []  # (shape to allocate, transpose(0, 1) after) of o / dq, dk, dv: _empty_like_layout's
        strides = []
        for t in (q, k, v):
            tm = token_major(t)
            self.layouts.append(((t.shape[1], t.shape[0], *t.shape[2:]) if tm else tuple(t.shape), tm))
            strides.append(empty_like_layout(meta(t), t.shape).stride()[:3])
        self.lse_shape = (B, H, T)
        self.B, self.Hkv = B, Hkv
        self.consts = dict(D=D, W=window, G=H // Hkv, BLOCK_D=block_d, HAS_PREFIX=False, IS_VARLEN=False,
                           DOT_PREC=prec)
        s_o, s_dk, s_dv = strides
        self.s_in = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], 0, 0, 0, 0, 0, 0)
        self.tail = (T, P, H, scale)
        self.fwd_scalars = (*self.s_in, *s_o, *self.tail)
        self.s_o, self.s_dkdv = s_o, (*s_dk, *s_dv, 0, 0, 0, 0, 0, 0)
        self.grid_q = lambda m: (cdiv(T, m["BM"]) * B * H,)
        self.grid_kv = lambda m: (cdiv(T + P, m["BN"]) * B * Hkv,)
        self.bwd = {}  # do.stride() -> scalar arguments of the two backward kernels
        self.fused = None  # the fused backward's _FusedLaunch, made at its first call
        self.fused_scalars = {}  # do.stride() -> its scalar arguments

    def alloc(self, ref, i):
        shape, tm = self.layouts[i]
        out = ref.new_empty(shape)
        return out.transpose(0, 1) if tm else out

    def bwd_scalars(self, do):
        sd = do.stride()
        hit = self.bwd.get(sd)
        if hit is None:
            s_do = sd[:3]
            hit = self.bwd[sd] = ((*self.s_in, *self.s_o, *s_do, *self.s_o, *self.tail),
                                  (*self.s_in, *s_do, *self.s_dkdv, *self.tail))
        return hit


class _PlainFunction(torch.autograd.Function):
    """Eager path of plain calls (no prefix, no documents) with a cached ``_Plan``: q, k, v are the only tensor
    inputs, o the only output, no per-call shape logic."""

    @staticmethod
    def forward(ctx, q, k, v, plan):
        o = plan.alloc(q, 0)
        lse = q.new_empty(plan.lse_shape, dtype=torch.float32)
        bad, *ctx.bad = confine_flags(q, 3)  # the forward's and the backward's flags: one zeroed allocation
        launch_confined(_fwd, plan.grid_q, (q, k, v, q, q, o, lse, lse, bad, *plan.fwd_scalars), plan.consts)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.plan = plan
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        plan = ctx.plan
        if do.stride(-1) != 1:
            do = do.contiguous()
        s_dq, s_dkdv = plan.bwd_scalars(do)
        dq, dk, dv = plan.alloc(q, 0), plan.alloc(k, 1), plan.alloc(v, 2)
        delta = torch.empty_like(lse)
        bad_dq, bad_dkdv = ctx.bad
        if BWD == "fused":
            if plan.fused is None or plan.fused.setting != STRIP:
                T, P, H, _ = plan.tail
                plan.fused = _FusedLaunch(T, P, H, plan.B, plan.Hkv, plan.consts, q.device)
            sd = do.stride()
            scalars = plan.fused_scalars.get(sd)
            if scalars is None:
                scalars = plan.fused_scalars[sd] = (*plan.s_in, *sd[:3], *plan.s_o, *plan.s_dkdv, *plan.tail)
            plan.fused(q, k, v, q, q, o, do, lse, delta, dq, dk, dv, dk, dv, lse, bad_dq, scalars, plan.s_o, sd[:3],
                       plan.consts)
            return dq, dk, dv, None
        launch_confined(_bwd_dq, plan.grid_q, (q, k, v, q, q, o, do, lse, delta, dq, lse, bad_dq, *s_dq),
                        plan.consts)
        launch_confined(_bwd_dkdv, plan.grid_kv,
                        (q, k, v, q, q, do, lse, delta, dk, dv, dk, dv, lse, bad_dkdv, *s_dkdv), plan.consts)
        return dq, dk, dv, None


_PLANS = {}  # plain call signature -> _Plan, or None (validated, but a last dim is strided: the general path)


def validate(q, k, v, window, cu_seqlens, kv_prefix):
    """The Triton path's shape checks (no host sync); the ops check the values of cu_seqlens (``_doc_ids``)."""
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"expected q [B, T, H, D] and k, v [B, T, H_kv, D]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})")
    if q.shape[3] > 256:
        raise ValueError(f"head dim {q.shape[3]} > 256 is not supported by the Triton kernel; use backend='torch'")
    if cu_seqlens is not None:
        if kv_prefix is not None:
            raise ValueError("kv_prefix and cu_seqlens cannot be combined")
        if q.shape[0] != 1:
            raise ValueError(f"cu_seqlens needs batch size 1 (documents packed along T); got B={q.shape[0]}")
    if kv_prefix is not None:
        kp, vp = kv_prefix
        if kp.shape != vp.shape or kp.shape[0] != k.shape[0] or kp.shape[2:] != k.shape[2:]:
            raise ValueError(f"kv_prefix must be two [B, P, H_kv, D] tensors matching k {tuple(k.shape)}; got "
                             f"{tuple(kp.shape)}, {tuple(vp.shape)}")


def swa_triton(q, k, v, window, scale, kv_prefix=None, cu_seqlens=None):
    """Validate, normalize strides and launch (eager: an autograd Function; under torch.compile: the custom op).
    Returns o ``[B, T, H, D]``."""
    if kv_prefix is None and cu_seqlens is None and not torch.compiler.is_compiling():
        key = (q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), q.dtype, window, scale,
               dot_precision(q.dtype))  # the plan's constexprs hold the precision of fp32 products
        plan = _PLANS.get(key, False)
        if plan is False:  # a new signature: validate it (bad input raises and is never cached)
            validate(q, k, v, window, None, None)
            if len(_PLANS) >= 1024:
                _PLANS.clear()
            last_dim_contiguous = q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
            plan = _PLANS[key] = _Plan(q, k, v, int(window), float(scale)) if last_dim_contiguous else None
        if plan is not None:
            return _PlainFunction.apply(q, k, v, plan)
    else:
        validate(q, k, v, window, cu_seqlens, kv_prefix)
    q, k, v = (lastdim_contiguous(t) for t in (q, k, v))
    kp = vp = None
    if kv_prefix is not None:
        kp, vp = (lastdim_contiguous(t) for t in kv_prefix)
    args = (q, k, v, kp, vp, cu_seqlens, int(window), float(scale))
    if torch.compiler.is_compiling():
        return swa_fwd_op(*args)[0]
    return SlidingWindowAttentionFunction.apply(*args)


# ------------------------------------------------------------------------------------------------ decode step
# The decode step's launch: (BR ring slots per block, num_warps, V_EARLY: a block's V rows loaded with its K rows;
# recurrent.py). benchmarks/decode_kernels.py sets it to time alternatives. On an H100 at based-1.3b's decode shapes
# (batch 128, 16 heads, D 112, window 128), us per call: BR 8 at 1 warp 49 (the copy's bandwidth); BR 16 at 1 / 2 /
# 4 warps 69 / 72 / 110 (V late at 2 warps: 62); BR 32 at 1 / 2 warps 61 / 62 (docs/benchmarks.md).
STEP = (8, 1, True)


def swa_step_triton(q, k, v, k_cache, v_cache, positions, window, scale):
    """Launch ``swa_step_kernel`` (validated by the caller): one program per (head, sequence). Returns o
    ``[B, H, D]``. Plain launches (no autograd: decode only)."""
    B, H, D = q.shape
    q, k, v = (lastdim_contiguous(t) for t in (q, k, v))
    o = torch.empty(B, H, D, dtype=q.dtype, device=q.device)
    _step(
        lambda meta: (H * B,),
        (q, k, v, k_cache, v_cache, positions, o,
         *q.stride()[:2], *k.stride()[:2], *v.stride()[:2], *k_cache.stride()[:3], *v_cache.stride()[:3],
         *o.stride()[:2], float(scale), H),
        D=D, RING=window + 1, BLOCK_D=max(16, next_pow2(D)), BR=STEP[0], V_EARLY=STEP[2], num_warps=STEP[1],
    )
    return o
