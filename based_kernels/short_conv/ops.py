"""The functional API of the short convolution / BaseConv core (backend dispatch), and the Triton path: launchers,
``torch.library`` custom ops (torch.compile) and autograd Functions (eager).

Inputs are ``[B, T, C]`` with any batch/time strides and a contiguous channel dim, so BaseConv's ``u1, u2``
(column slices of Megatron's ``[s, b, 4d]`` in-projection, seen as ``[b, s, c]``) go in without copies; outputs
are laid out token-major when the input is.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .._common import Launcher, cdiv, doc_ids, empty_like_layout, lastdim_contiguous, resolve_backend
from .backward import CHUNK, conv_bwd_init_kernel, conv_bwd_kernel, conv_bwd_stream_kernel
from .forward import conv_fwd_kernel
from .recurrent import conv_step_kernel
from .reference import (base_conv_packed_reference, base_conv_packed_step_reference, base_conv_reference,
                        base_conv_step_reference, short_conv_reference)
from .reference import short_conv_step as short_conv_step_reference

_fwd, _bwd_init, _step = (Launcher(k) for k in (conv_fwd_kernel, conv_bwd_init_kernel, conv_step_kernel))
_BWD = {"tile": Launcher(conv_bwd_kernel), "stream": Launcher(conv_bwd_stream_kernel)}

# Backward kernel variant: "tile" (each [BT, BC] tile recomputes dc at the K shifted row sets) or "stream" (one
# program walks CHUNK rows with the window in registers). Read at import; tests and benchmarks may reassign it.
# Default "stream": 0.249 ms vs 0.71 ms for "tile" at B8 T4096 C2048 bf16 on an H100 (session-3 call 4); both pass
# the GPU tests (tests/kernels/test_short_conv.py).
BWD_VARIANT = os.environ.get("BASED_CONV_BWD", "stream")
if BWD_VARIANT not in _BWD:
    raise ValueError(f"BASED_CONV_BWD must be one of {sorted(_BWD)}; got {BWD_VARIANT!r}")

__all__ = ["short_conv", "short_conv_step", "base_conv", "base_conv_step", "base_conv_packed", "base_conv_packed_step",
           "conv_triton", "conv_packed_triton", "conv_step_triton", "final_state", "BWD_VARIANT"]


# ------------------------------------------------------------------------------------------- the functional API
def _use_triton(backend, x):
    return resolve_backend(backend, x) == "triton"


def _check(x, g, weight, initial_state, cu_seqlens):
    if x.dim() != 3:
        raise ValueError(f"expected x [B, T, C]; got {tuple(x.shape)}")
    B, T, C = x.shape
    if g is not None and g.shape != x.shape:
        raise ValueError(f"the gate u2 {tuple(g.shape)} must match u1 {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[0] != C or not 2 <= weight.shape[1] <= 4:
        raise ValueError(f"weight must be [C={C}, k] with 2 <= k <= 4 for the Triton kernel; got "
                         f"{tuple(weight.shape)} (use backend='torch' for other k)")
    N = B
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"cu_seqlens needs batch size 1 (documents packed along T); got B={B}")
        N = cu_seqlens.numel() - 1
    if initial_state is not None and tuple(initial_state.shape) != (N, weight.shape[1] - 1, C):
        raise ValueError(f"initial_state must be [N, k-1, C] = {(N, weight.shape[1] - 1, C)} (N = batch or "
                         f"documents); got {tuple(initial_state.shape)}")


def _conv(x, g, weight, initial_state, output_final_state, cu_seqlens):
    _check(x, g, weight, initial_state, cu_seqlens)
    y = conv_triton(x, g, weight, initial_state, cu_seqlens)
    fin = final_state(x, initial_state, weight.shape[1], cu_seqlens) if output_final_state else None
    return y, fin


def short_conv(x, weight, *, initial_state=None, output_final_state=False, cu_seqlens=None, backend=None):
    """Causal depthwise conv ``y_t = sum_i weight[:, i] x_{t-(k-1)+i}``; x ``[B, T, C]``, weight ``[C, k]``.

    initial_state ``[N, k-1, C]`` holds the inputs before each sequence (N = B, or documents with cu_seqlens).
    backend: None (Triton for CUDA tensors, PyTorch otherwise), "triton" or "torch".
    Returns ``(y [B, T, C], final_state [N, k-1, C] or None)``.
    """
    if not _use_triton(backend, x):
        return short_conv_reference(x, weight, initial_state=initial_state, output_final_state=output_final_state,
                                    cu_seqlens=cu_seqlens)
    return _conv(x, None, weight, initial_state, output_final_state, cu_seqlens)


def base_conv(u1, u2, weight, *, initial_state=None, output_final_state=False, cu_seqlens=None, backend=None):
    """BaseConv core ``SiLU(short_conv(u1)) * u2`` fused in one pass; u1, u2 ``[B, T, C]``, weight ``[C, k]``.

    Any batch/time strides with a contiguous channel dim. Gradients flow to u1, u2, weight (deterministic)
    and initial_state. Returns ``(y [B, T, C], final_state [N, k-1, C] or None)``.
    """
    if not _use_triton(backend, u1):
        return base_conv_reference(u1, u2, weight, initial_state=initial_state,
                                   output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    return _conv(u1, u2, weight, initial_state, output_final_state, cu_seqlens)


def _check_packed(u, weight, bias):
    if u.dim() not in (2, 3) or u.shape[-1] % 2:
        raise ValueError(f"expected packed u [B, T, 2C] (or [B, 2C] for a step) = [u1 | u2]; got {tuple(u.shape)}")
    if bias is not None and tuple(bias.shape) != (u.shape[-1],):
        raise ValueError(f"bias must be [2C] = [{u.shape[-1]}] (the in-projection bias [b1 | b2]); got "
                         f"{tuple(bias.shape)}")
    if weight.dim() != 2 or weight.shape[0] != u.shape[-1] // 2:
        raise ValueError(f"weight must be [C={u.shape[-1] // 2}, k]; got {tuple(weight.shape)}")


def base_conv_packed(u, weight, bias=None, *, initial_state=None, output_final_state=False, cu_seqlens=None,
                     backend=None):
    """BaseConv core on the packed in-projection output: ``u1, u2 = (u + bias).chunk(2, -1)``,
    ``y = SiLU(short_conv(u1)) * u2``, in one kernel.

    u ``[B, T, 2C]`` with any batch/time strides and a contiguous last dim (Megatron's ``[s, b, 2C]`` seen as
    ``[b, s, 2C]``); bias ``[2C]`` or None (added inside the kernel; the state holds ``u1 + b1``). The backward
    writes one ``du`` laid out like u, and ``dbias`` (deterministic). Returns ``(y [B, T, C], final_state)``.
    """
    _check_packed(u, weight, bias)
    if not _use_triton(backend, u):
        return base_conv_packed_reference(u, weight, bias, initial_state=initial_state,
                                          output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    C = u.shape[-1] // 2
    _check(u[..., :C], None, weight, initial_state, cu_seqlens)
    y = conv_packed_triton(u, weight, bias, initial_state, cu_seqlens)
    fin = None
    if output_final_state:
        fin = final_state(u[..., :C], initial_state, weight.shape[1], cu_seqlens,
                          None if bias is None else bias[:C])
    return y, fin


def _check_inplace(x, weight, state):
    """``inplace=True``: the new state goes over ``state``, which must be a ``[B, k-1, C]`` tensor with a contiguous
    last dim, of the dtype the step computes the state in (``promote_types(state.dtype, x.dtype)``), and whose rows
    do not overlap (ValueError otherwise; both backends check, so a caller runs one path on either)."""
    if state is None:
        raise ValueError("inplace=True needs a state to update; pass zeros for the first token")
    want = (x.shape[0], weight.shape[1] - 1, x.shape[-1])
    if tuple(state.shape) != want:
        raise ValueError(f"inplace=True needs state [B, k-1, C] = {want}; got {tuple(state.shape)}")
    promoted = torch.promote_types(state.dtype, x.dtype)
    if state.dtype != promoted:
        raise ValueError(f"inplace=True needs the state in the dtype the step computes it in ({promoted}: the "
                         f"promotion of the state's {state.dtype} and the input's {x.dtype}); got {state.dtype}")
    if state.stride(-1) != 1 or not _no_overlap(state):
        raise ValueError(f"inplace=True needs a state with a contiguous last dim whose rows do not overlap; got "
                         f"strides {state.stride()} for shape {tuple(state.shape)}")


def _no_overlap(t):
    """Whether no two elements of t share memory (sufficient test: each dim's stride covers the dims inside it)."""
    span = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1):
        if stride < span:
            return False
        span = stride * size
    return True


def _inplace_reference(y, new_state, state, inplace):
    if not inplace:
        return y, new_state
    state.copy_(new_state)
    return y, state


def base_conv_packed_step(u, weight, state, bias=None, *, backend=None, inplace=False):
    """One packed decode step: u ``[B, 2C]``, bias ``[2C]`` or None, state ``[B, k-1, C]`` (None = zeros).
    Returns ``(y [B, C], new_state)``. The state is left as it was, unless ``inplace=True``: then the new state is
    written over ``state`` (which must be given, last-dim contiguous, of the promoted dtype of state and u) and
    returned (a decode loop's cache updated with no copy kernel)."""
    _check_packed(u, weight, bias)
    C = u.shape[-1] // 2
    if inplace:
        _check_inplace(u[:, :C], weight, state)
    if not _use_triton(backend, u):
        return _inplace_reference(*base_conv_packed_step_reference(u, weight, state, bias), state, inplace)
    return conv_step_triton(u[:, :C], u[:, C:], weight, state, bias, inplace=inplace)


def short_conv_step(x, weight, state, *, backend=None, inplace=False):
    """One decode step: x ``[B, C]``, state ``[B, k-1, C]`` (None = zeros). Returns ``(y [B, C], new_state)``;
    ``inplace=True`` writes the new state over ``state`` (see :func:`base_conv_packed_step`)."""
    if inplace:
        _check_inplace(x, weight, state)
    if not _use_triton(backend, x):
        return _inplace_reference(*short_conv_step_reference(x, weight, state), state, inplace)
    return conv_step_triton(x, None, weight, state, inplace=inplace)


def base_conv_step(u1, u2, weight, state, *, backend=None, inplace=False):
    """One BaseConv decode step ``SiLU(conv_step(u1)) * u2``; returns ``(y [B, C], new_state [B, k-1, C])``;
    ``inplace=True`` writes the new state over ``state`` (see :func:`base_conv_packed_step`)."""
    if inplace:
        _check_inplace(u1, weight, state)
    if not _use_triton(backend, u1):
        return _inplace_reference(*base_conv_step_reference(u1, u2, weight, state), state, inplace)
    return conv_step_triton(u1, u2, weight, state, inplace=inplace)


# ------------------------------------------------------------------------------------------------ the Triton path


def _s2(t):
    return t.stride()[:2] if t is not None else (0, 0)


def _varlen(cu, T, device):
    """Per-token document ids and int32 offsets (cu is checked: the kernels index x and the state with it)."""
    if cu is None:
        return None, None
    return doc_ids(cu, T, device), cu.to(device=device, dtype=torch.int32)


def _launch_fwd(x, g, w, bias, init, cu, y):
    B, T, C = x.shape
    doc, cu32 = _varlen(cu, T, x.device)
    _fwd(
        lambda meta: (cdiv(C, meta["BC"]) * cdiv(T, meta["BT"]) * B,),
        (x, x if g is None else g, w, x if bias is None else bias, x if init is None else init, y,
         doc if cu is not None else x, cu32 if cu is not None else x,
         *_s2(x), *_s2(g), *_s2(y), *_s2(init), *w.stride(), T, C),
        K=w.shape[1], GATE=g is not None, HAS_INIT=init is not None, HAS_BIAS=bias is not None,
        IS_VARLEN=cu is not None,
    )
    return y


def _launch_bwd(dy, x, g, w, bias, init, cu, dx, dg):
    """Fills dx (and dg); returns (dw, dbias or empty, dinit or empty). dw and dbias: per-program fp32 partials
    summed in a fixed order (deterministic, no atomics)."""
    B, T, C = x.shape
    K = w.shape[1]
    dy = lastdim_contiguous(dy)
    NT = cdiv(T, CHUNK)
    dwp = torch.empty(B * NT, 4, C, dtype=torch.float32, device=x.device)
    dbp = torch.empty(B * NT, 2, C, dtype=torch.float32, device=x.device) if bias is not None else dwp
    doc, cu32 = _varlen(cu, T, x.device)
    g_ = x if g is None else g
    bias_ = x if bias is None else bias
    init_ = x if init is None else init
    flags = dict(K=K, GATE=g is not None, HAS_BIAS=bias is not None, IS_VARLEN=cu is not None)
    _BWD[BWD_VARIANT](
        lambda meta: (cdiv(C, meta["BC"]) * NT * B,),
        (x, g_, w, bias_, init_, dy, dx, dg if g is not None else dx, dwp, dbp, doc if cu is not None else x,
         cu32 if cu is not None else x,
         *_s2(x), *_s2(g), *_s2(dy), *_s2(dx), *_s2(dg if g is not None else None), *_s2(init), *w.stride(),
         T, C, NT),
        HAS_INIT=init is not None, CHUNK=CHUNK, **flags,
    )
    dw = dwp[:, :K].sum(0).t().to(w.dtype)
    dbias = dbp.sum(0).flatten().to(bias.dtype) if bias is not None else x.new_empty(0)
    if init is None:
        dinit = x.new_empty(0)
    else:
        dinit = torch.empty(init.shape, dtype=init.dtype, device=x.device)
        N = init.shape[0]
        BC = 32 if cdiv(C, 128) * N < 64 else 128
        _bwd_init(
            lambda meta: (cdiv(C, BC) * N,),
            (x, g_, w, bias_, init_, dy, dinit, cu32 if cu is not None else x,
             *_s2(x), *_s2(g), *_s2(dy), *_s2(init), *w.stride(), T, C),
            BC=BC, **flags,
        )
    return dw, dbias, dinit


# ------------------------------------------------------------------ u1, u2 as two tensors (short_conv, base_conv)
def conv_fwd(x: torch.Tensor, g: Optional[torch.Tensor], w: torch.Tensor, init: Optional[torch.Tensor],
             cu: Optional[torch.Tensor]) -> torch.Tensor:
    return _launch_fwd(x, g, w, None, init, cu, empty_like_layout(x, x.shape))


conv_fwd_op = torch.library.custom_op("based_kernels::short_conv_fwd", conv_fwd, mutates_args=())


@conv_fwd_op.register_fake
def _(x, g, w, init, cu):
    return empty_like_layout(x, x.shape)


def conv_bwd(dy: torch.Tensor, x: torch.Tensor, g: Optional[torch.Tensor], w: torch.Tensor,
             init: Optional[torch.Tensor], cu: Optional[torch.Tensor]
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dx = empty_like_layout(x, x.shape)
    dg = empty_like_layout(g, g.shape) if g is not None else x.new_empty(0)
    dw, _, dinit = _launch_bwd(dy, x, g, w, None, init, cu, dx, dg if g is not None else None)
    return dx, dg, dw, dinit


conv_bwd_op = torch.library.custom_op("based_kernels::short_conv_bwd", conv_bwd, mutates_args=())


@conv_bwd_op.register_fake
def _(dy, x, g, w, init, cu):
    dg = empty_like_layout(g, g.shape) if g is not None else x.new_empty(0)
    dinit = torch.empty_like(init) if init is not None else x.new_empty(0)
    return empty_like_layout(x, x.shape), dg, torch.empty_like(w), dinit


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _grads(ctx, dy, bwd):
    x, g, w, init, cu = ctx.saved_tensors
    dx, dg, dw, dinit = bwd(dy, x, g, w, init, cu)
    return dx, (dg if g is not None else None), dw, (dinit if init is not None else None), None


# torch.compile path: opaque custom ops
torch.library.register_autograd("based_kernels::short_conv_fwd", lambda ctx, dy: _grads(ctx, dy, conv_bwd_op),
                                setup_context=_setup_context)


class ShortConvFunction(torch.autograd.Function):
    """Eager path: the same kernels without the custom-op dispatch (~0.1 ms of host time per call saved)."""

    @staticmethod
    def forward(ctx, x, g, w, init, cu):
        y = conv_fwd(x, g, w, init, cu)
        _setup_context(ctx, (x, g, w, init, cu), y)
        return y

    @staticmethod
    def backward(ctx, dy):
        return _grads(ctx, dy, conv_bwd)


# ------------------------------------------------- packed u = [u1 | u2] with the in-projection bias (the mixer's)
def _halves(u):
    C = u.shape[-1] // 2
    return u[..., :C], u[..., C:]


def packed_fwd(u: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], init: Optional[torch.Tensor],
               cu: Optional[torch.Tensor]) -> torch.Tensor:
    x, g = _halves(u)
    return _launch_fwd(x, g, w, bias, init, cu, empty_like_layout(u, x.shape))


packed_fwd_op = torch.library.custom_op("based_kernels::base_conv_packed_fwd", packed_fwd, mutates_args=())


@packed_fwd_op.register_fake
def _(u, w, bias, init, cu):
    B, T, C2 = u.shape
    return empty_like_layout(u, (B, T, C2 // 2))


def packed_bwd(dy: torch.Tensor, u: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor],
               init: Optional[torch.Tensor], cu: Optional[torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One gradient tensor ``du`` laid out like ``u`` (no cat of du1, du2), plus dw, dbias, dinit."""
    du = empty_like_layout(u, u.shape)
    x, g = _halves(u)
    dx, dg = _halves(du)
    dw, dbias, dinit = _launch_bwd(dy, x, g, w, bias, init, cu, dx, dg)
    return du, dw, dbias, dinit


packed_bwd_op = torch.library.custom_op("based_kernels::base_conv_packed_bwd", packed_bwd, mutates_args=())


@packed_bwd_op.register_fake
def _(dy, u, w, bias, init, cu):
    dbias = torch.empty_like(bias) if bias is not None else u.new_empty(0)
    dinit = torch.empty_like(init) if init is not None else u.new_empty(0)
    return empty_like_layout(u, u.shape), torch.empty_like(w), dbias, dinit


def _packed_grads(ctx, dy, bwd):
    u, w, bias, init, cu = ctx.saved_tensors
    du, dw, dbias, dinit = bwd(dy, u, w, bias, init, cu)
    return du, dw, (dbias if bias is not None else None), (dinit if init is not None else None), None


torch.library.register_autograd("based_kernels::base_conv_packed_fwd",
                                lambda ctx, dy: _packed_grads(ctx, dy, packed_bwd_op), setup_context=_setup_context)


class PackedConvFunction(torch.autograd.Function):
    """Eager path of the packed op."""

    @staticmethod
    def forward(ctx, u, w, bias, init, cu):
        y = packed_fwd(u, w, bias, init, cu)
        _setup_context(ctx, (u, w, bias, init, cu), y)
        return y

    @staticmethod
    def backward(ctx, dy):
        return _packed_grads(ctx, dy, packed_bwd)


def final_state(x, initial_state, K, cu_seqlens=None, bias=None):
    """The last K - 1 conv inputs ``x (+ bias)`` of each sequence (initial-state rows where it is shorter),
    differentiable. Plain gathers: a few small ops on ``[N, K-1, C]``, no host sync.
    """
    B, T, C = x.shape
    if cu_seqlens is None:
        pad = initial_state if initial_state is not None else x.new_zeros(B, K - 1, C)
        tail = x[:, max(T - (K - 1), 0):]
        tail = tail if bias is None else tail + bias
        return torch.cat([pad.to(x.dtype), tail.to(x.dtype)], dim=1)[:, -(K - 1):]
    cu = cu_seqlens.to(device=x.device, dtype=torch.int64)
    N = cu.numel() - 1
    idx = cu[1:, None] - (K - 1) + torch.arange(K - 1, device=x.device)  # [N, K-1] absolute rows
    rel = idx - cu[:-1, None]
    from_x = x[0][idx.clamp(min=0)]  # [N, K-1, C]
    if bias is not None:
        from_x = (from_x + bias).to(x.dtype)
    if initial_state is None:
        from_init = torch.zeros_like(from_x)
    else:
        from_init = initial_state.to(x.dtype).gather(
            1, (K - 1 + rel).clamp(0, K - 2)[..., None].expand(N, K - 1, C))
    return torch.where((rel >= 0)[..., None], from_x, from_init)


def conv_triton(x, g, weight, initial_state, cu_seqlens):
    x = lastdim_contiguous(x)
    g = lastdim_contiguous(g)
    init = None if initial_state is None else initial_state.contiguous()
    args = (x, g, weight, init, cu_seqlens)
    return conv_fwd_op(*args) if torch.compiler.is_compiling() else ShortConvFunction.apply(*args)


def conv_packed_triton(u, weight, bias, initial_state, cu_seqlens):
    u = lastdim_contiguous(u)
    bias = None if bias is None else bias.contiguous()
    init = None if initial_state is None else initial_state.contiguous()
    args = (u, weight, bias, init, cu_seqlens)
    return packed_fwd_op(*args) if torch.compiler.is_compiling() else PackedConvFunction.apply(*args)


def conv_step_triton(x, g, weight, state, bias=None, *, inplace=False):
    """Launch the decode step kernel. ``inplace``: the new state goes over ``state`` (checked by the caller:
    given, ``[B, k-1, C]``, last-dim contiguous, of the promoted dtype) and ``state`` is returned; the kernel
    loads each state row before it stores over it (``recurrent.py``)."""
    B, C = x.shape
    K = weight.shape[1]
    x = lastdim_contiguous(x)
    g = lastdim_contiguous(g)
    y = torch.empty(B, C, dtype=x.dtype, device=x.device)
    if inplace:
        new_state = state
    else:
        state = None if state is None else lastdim_contiguous(state)
        st_dtype = x.dtype if state is None else torch.promote_types(state.dtype, x.dtype)
        new_state = torch.empty(B, K - 1, C, dtype=st_dtype, device=x.device)
    BC = 256  # >= 32 * num_warps: no channel replicated across threads (the in-place order argument needs it)
    _step(
        lambda meta: (cdiv(C, BC) * B,),
        (x, x if g is None else g, weight, x if bias is None else bias, x if state is None else state, y, new_state,
         x.stride(0), 0 if g is None else g.stride(0), y.stride(0), *((0, 0) if state is None else _s2(state)),
         *_s2(new_state), *weight.stride(), C),
        K=K, GATE=g is not None, HAS_STATE=state is not None, HAS_BIAS=bias is not None, INPLACE=inplace, BC=BC,
        num_warps=4,
    )
    return y, new_state
