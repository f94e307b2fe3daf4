"""The functional API of the fused RoPE + q/k/v split (checks, backend dispatch), its launchers, autograd
Function (eager) and ``torch.library`` custom ops (torch.compile).

Everything works on the 4-D view ``qkv [s, b, ng, (G + 2) * D]`` (Megatron's grouped layout, last dim contiguous,
any other strides): q ``[s, b, ng * G, D]``, k, v ``[s, b, ng, D]`` come out contiguous; the backward reads dq, dk,
dv with any strides (last dim contiguous) and writes a contiguous dqkv of qkv's shape. Triton kernels on CUDA (or
under ``TRITON_INTERPRET=1``); ``reference.py``'s ``*_torch`` functions are the same math in PyTorch (the CPU path),
with the cos / sin tables both paths share.
"""
from __future__ import annotations

import torch

from .._common import Launcher, cdiv, next_pow2, resolve_backend
from .kernels import rope_bwd_kernel, rope_fwd_kernel
from .reference import bwd_torch, fwd_torch, inv_freq, rope_tables, rope_tables_at

_fwd, _bwd = Launcher(rope_fwd_kernel), Launcher(rope_bwd_kernel)

__all__ = ["rope_split_qkv", "rope_tables", "rope_tables_at", "RopeSplitQKVFunction", "rope_split_qkv_fwd_op",
           "rope_split_qkv_bwd_op"]


# ------------------------------------------------------------------------------------------- the functional API
_TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def rope_split_qkv(qkv: torch.Tensor, num_query_groups: int, head_dim: int, *, offset: int = 0,
                   positions: torch.Tensor | None = None, base: float = 10000.0,
                   backend=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split Megatron's packed ``linear_qkv`` output into q, k, v and apply RoPE to q and k.

    qkv ``[s, b, ng, (G + 2) * d_h]`` (or its flat ``[s, b, ng * (G + 2) * d_h]``) in Megatron's grouped layout:
    per query group g, its G query heads, then its key head, then its value head (MHA: G = 1, ``[q_h | k_h | v_h]``
    per head). Last dim contiguous (else one copy), other strides free. Token t (of every batch row) is at position
    ``offset + t`` (contiguous context-parallel shards: ``offset = cp_rank * s``), or, given ``positions``
    (an integer tensor ``[s, b]`` on qkv's device; prefill of packed prompts, decode steps), at
    ``positions[t, b]``: values are not checked (that would read them back to the host), negative ones rotate
    backwards.

    Returns q ``[s, b, ng * G, d_h]``, k ``[s, b, ng, d_h]``, v ``[s, b, ng, d_h]``, new contiguous tensors in
    qkv's dtype: q and k rotated with Megatron's non-interleaved (rotate-half) RoPE at angles
    ``pos * base^(-2i / d_h)`` (fp32 math from cos / sin exact to fp32, rounded once), v copied. The gradient of qkv
    is contiguous, in qkv's dtype. d_h must be even (any even size; not only powers of two).
    backend: None (Triton for CUDA tensors, PyTorch otherwise, or ``based_kernels.use_backend``), "triton",
    "torch".
    """
    if qkv.dim() not in (3, 4):
        raise ValueError(f"qkv must be [s, b, ng, (G + 2) * head_dim] or [s, b, ng * (G + 2) * head_dim]; got "
                         f"{tuple(qkv.shape)}")
    if not qkv.is_floating_point():
        raise TypeError(f"qkv must be floating point; got {qkv.dtype}")
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim ({head_dim}) must be even: rotate-half RoPE pairs dims i and i + head_dim / 2")
    if num_query_groups < 1 or (qkv.dim() == 4 and qkv.shape[2] != num_query_groups):
        raise ValueError(f"num_query_groups ({num_query_groups}) must be >= 1 and match qkv's dim 2 "
                         f"{tuple(qkv.shape)}")
    width = qkv.shape[-1] * (qkv.shape[2] if qkv.dim() == 4 else 1)  # ng * (G + 2) * head_dim
    G = width // (num_query_groups * head_dim) - 2
    if G < 1 or width != num_query_groups * (G + 2) * head_dim:
        raise ValueError(f"qkv's last dim(s) {tuple(qkv.shape[2:])} must hold num_query_groups ({num_query_groups}) "
                         f"x (G + 2) x head_dim ({head_dim}) with G >= 1 query heads per group")
    if not isinstance(offset, (int, torch.SymInt)) or offset < 0:
        raise ValueError(f"offset must be an int >= 0 (the position of token 0); got {offset!r}")
    if positions is not None:
        if offset:
            raise ValueError(f"give offset ({offset}) or positions, not both")
        if not isinstance(positions, torch.Tensor) or positions.is_floating_point() or positions.is_complex() or \
                positions.dtype == torch.bool:
            raise TypeError(f"positions must be an integer tensor [s, b]; got {_describe(positions)}")
        if tuple(positions.shape) != tuple(qkv.shape[:2]) or positions.device != qkv.device:
            raise ValueError(f"positions must be [s, b] = {tuple(qkv.shape[:2])} on {qkv.device}; got "
                             f"{tuple(positions.shape)} on {positions.device}")
        positions = positions.to(torch.int64).contiguous()  # no copy for the int64 [s, b] tensors callers pass
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    if qkv.dim() == 3:
        qkv = qkv.unflatten(-1, (num_query_groups, -1))
    use_triton = resolve_backend(backend, qkv) == "triton" and qkv.numel() > 0
    if use_triton and qkv.dtype not in _TRITON_DTYPES:
        raise TypeError(f"the Triton RoPE takes {_TRITON_DTYPES} qkv; got {qkv.dtype} (use backend='torch')")
    if use_triton and torch.compiler.is_compiling():
        return rope_split_qkv_fwd_op(qkv, G, head_dim, offset, float(base), positions)
    return RopeSplitQKVFunction.apply(qkv, G, head_dim, offset, float(base), use_triton, positions)


def _describe(x) -> str:
    return f"a {x.dtype} tensor" if isinstance(x, torch.Tensor) else type(x).__name__


# ------------------------------------------------------------------------------------- the two passes in Triton
def _grid(N, ng):
    return lambda meta: (cdiv(N, meta["BLOCK_N"]), ng)


def angles(s: int, D: int, offset: int, base: float, positions, device, use_triton: bool):
    """What the passes need for the angles: ``(cos, sin, None, None)`` tables (``[s, D/2]`` cached for positions
    ``offset + t``; ``[s, b, D/2]`` for explicit positions on the PyTorch path), or on the Triton path with
    explicit positions ``(None, None, positions, inv_freq)``: the kernels compute the same values themselves."""
    if positions is None:
        return (*rope_tables(s, offset, D, base, device), None, None)
    if use_triton:
        return None, None, positions, inv_freq(D, base, device)
    return (*rope_tables_at(positions, D, base), None, None)


def _pointers(cos, sin, pos, inv):
    """The kernels' (cos, sin, pos, inv) arguments and POSITIONS: pointers a pass does not read get a tensor it
    is given anyway."""
    if pos is None:
        return (cos, sin, cos, cos), False
    return (inv, inv, pos, inv), True


def fwd_triton(qkv, angles, G, D):
    s, b, ng, _ = qkv.shape
    q = qkv.new_empty(s, b, ng * G, D)
    k, v = qkv.new_empty(s, b, ng, D), qkv.new_empty(s, b, ng, D)
    st, sb, sg, _ = qkv.stride()
    ptrs, positions = _pointers(*angles)
    _fwd(_grid(s * b, ng), (qkv, *ptrs, q, k, v, st, sb, sg, s * b, b, ng),
         G=G, D=D, POSITIONS=positions, BLOCK_H=next_pow2(D // 2))
    return q, k, v


def bwd_triton(dq, dk, dv, angles, dtype):
    s, b, ng, D = dk.shape
    G = dq.shape[2] // ng
    dqkv = torch.empty(s, b, ng, (G + 2) * D, dtype=dtype, device=dq.device)
    dq, dk, dv = (t if t.stride(-1) == 1 else t.contiguous() for t in (dq, dk, dv))
    ptrs, positions = _pointers(*angles)
    _bwd(_grid(s * b, ng), (dq, dk, dv, *ptrs, dqkv, *dq.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
                            *dqkv.stride()[:3], s * b, b),
         G=G, D=D, POSITIONS=positions, BLOCK_H=next_pow2(D // 2))
    return dqkv


# -------------------------------------------------------------------------------------------------- eager autograd
class RopeSplitQKVFunction(torch.autograd.Function):
    """Eager path: ``apply(qkv, G, D, offset, base, use_triton, positions) -> (q, k, v)``, qkv the 4-D view. Saves
    only ``positions`` (when given): the backward needs the angles and qkv's dtype."""

    @staticmethod
    def forward(ctx, qkv, G, D, offset, base, use_triton, positions):
        ctx.angles = angles(qkv.shape[0], D, offset, base, positions, qkv.device, use_triton)
        ctx.dtype, ctx.use_triton = qkv.dtype, use_triton
        if positions is not None:
            ctx.save_for_backward(positions)  # version-checked: an in-place change before backward is an error
        return (fwd_triton if use_triton else fwd_torch)(qkv, ctx.angles, G, D)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        ctx.saved_tensors  # noqa: B018 (raises if positions changed in place since the forward)
        dqkv = (bwd_triton if ctx.use_triton else bwd_torch)(dq, dk, dv, ctx.angles, ctx.dtype)
        return dqkv, None, None, None, None, None, None


# ------------------------------------------------------------------------- torch.compile path: opaque custom ops
@torch.library.custom_op("based_kernels::rope_split_qkv_fwd", mutates_args=())
def rope_split_qkv_fwd_op(qkv: torch.Tensor, G: int, D: int, offset: int, base: float,
                          positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return fwd_triton(qkv, angles(qkv.shape[0], D, offset, base, positions, qkv.device, True), G, D)


@rope_split_qkv_fwd_op.register_fake
def _(qkv, G, D, offset, base, positions=None):
    s, b, ng, _ = qkv.shape
    return qkv.new_empty(s, b, ng * G, D), qkv.new_empty(s, b, ng, D), qkv.new_empty(s, b, ng, D)


@torch.library.custom_op("based_kernels::rope_split_qkv_bwd", mutates_args=())
def rope_split_qkv_bwd_op(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, offset: int, base: float,
                          dtype: torch.dtype, positions: torch.Tensor | None = None) -> torch.Tensor:
    D = dk.shape[-1]
    return bwd_triton(dq, dk, dv, angles(dk.shape[0], D, offset, base, positions, dk.device, True), dtype)


@rope_split_qkv_bwd_op.register_fake
def _(dq, dk, dv, offset, base, dtype, positions=None):
    s, b, ng, D = dk.shape
    return dk.new_empty(s, b, ng, (dq.shape[2] // ng + 2) * D, dtype=dtype)


def _setup_context(ctx, inputs, output):
    qkv, _, _, ctx.offset, ctx.base, positions = inputs
    ctx.dtype = qkv.dtype
    ctx.save_for_backward(positions)


def _backward(ctx, dq, dk, dv):
    (positions,) = ctx.saved_tensors
    return rope_split_qkv_bwd_op(dq, dk, dv, ctx.offset, ctx.base, ctx.dtype, positions), None, None, None, None, None


torch.library.register_autograd("based_kernels::rope_split_qkv_fwd", _backward, setup_context=_setup_context)
