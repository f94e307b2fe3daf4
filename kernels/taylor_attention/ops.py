"""Launchers, torch.library custom ops and autograd for the Triton Taylor linear attention kernels.

``taylor_attention_fwd`` / ``taylor_attention_bwd`` are registered as ``based_kernels::`` custom ops with fake
implementations, and autograd is attached with ``register_autograd``, so ``torch.compile`` traces through them
as opaque nodes. Inputs may be strided views (only the last dim must be contiguous): the Megatron mixer passes
``[B, T, H, *]`` views of its ``[s, b, h]`` activations and no copy is made.

Work split: programs are (value block, work item, head). A work item is a whole sequence, or, when
``B * H * n_value_blocks`` programs would leave the GPU's multiprocessors idle (long T, small B), a segment of
a sequence; segments start from states computed by a state pass (``taylor_state_kernel``) and an exclusive
prefix sum over segments (a few MB, in PyTorch). With ``cu_seqlens`` every document is one work item.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton

from .backward import taylor_bwd_dkv_kernel, taylor_bwd_dq_kernel, taylor_bwd_prep_kernel
from .forward import taylor_fwd_kernel, taylor_state_kernel
from .recurrent import taylor_step_kernel

MAX_F = 32  # the quadratic state [f^2, BV] of one program must fit on chip
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
if INTERPRET:
    # Triton 3.6's interpreter holds scalars as 1-element arrays and converts them with int(array), which
    # numpy >= 2.5 refuses: loops with run-time bounds (range(bos, eos, BT)) then fail on CPU. Convert via item().
    import triton.runtime.interpreter as _interp

    if not getattr(_interp, "_based_index_patch", False):
        _orig_patch_lang_tensor = _interp._patch_lang_tensor

        def _patch_lang_tensor(tensor, scope):
            _orig_patch_lang_tensor(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

        _interp._patch_lang_tensor = _patch_lang_tensor
        _interp._based_index_patch = True

# Tunables: the fastest of benchmarks/taylor_attention.py --sweep on an H100 (2026-11-23; docs/benchmarks.md).
CONFIG = {
    # name: (BT chunk, BV value block, num_warps, num_stages)
    "fwd": (16, 64, 8, 1),
    "state": (16, 64, 8, 1),
    "dq": (16, 32, 4, 1),
    "dkv": (16, 32, 4, 1),
}
# Operand precision of the big products (fp32 accumulation always). Forward: the intra-chunk A @ v runs on
# fp32 operands (tf32): A = 1 + s + s^2/2 in bf16 alone adds ~0.3e-3 relative error on top of the ~1.6e-3
# that rounding y to bf16 already costs (emulated on CPU, T = 4096); the inter-chunk read and the state update
# use the input dtype (full-rate tensor cores, ~0.2e-3 more). HI_BWD: every backward product on fp32 operands.
HI_INTRA = True
HI_READ = False
HI_BWD = False
# Segment split: aim for this many programs per multiprocessor; None = no split unless forced.
PROGRAMS_PER_SM = 4
FORCE_NUM_SEGMENTS: Optional[int] = None  # tests use this to exercise the split on CPU


def _cfg(name: str, F: int, DV: int):
    BT, BV, nw, ns = CONFIG[name]
    if INTERPRET:  # fewer, larger chunks keep CPU test time down; chunk crossing is still exercised
        BT, BV = 32, 32
    BK = max(16, triton.next_power_of_2(F))
    if BK > 16:  # f = 32: 1024 quadratic features; keep the [BT, BK^2] feature tile and [BK^2, BV] state small
        BT, BV = 16, 16
    BV = min(BV, max(16, triton.next_power_of_2(DV)))
    return BK, BT, BV, nw, ns


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _segments(B: int, T: int, H: int, NV: int, BT: int, device: torch.device):
    """Number of segments per sequence and their length (a multiple of the chunk)."""
    if FORCE_NUM_SEGMENTS is not None:
        ns = FORCE_NUM_SEGMENTS
    else:
        want = PROGRAMS_PER_SM * _num_sms(device)
        have = B * H * NV
        ns = 1 if have >= want else -(-want // have)
    n_chunks = max(1, triton.cdiv(T, BT))
    ns = max(1, min(ns, n_chunks))
    L = triton.cdiv(n_chunks, ns) * BT
    return triton.cdiv(max(T, 1), L), L


def _plan(q: torch.Tensor, v: torch.Tensor, cu_seqlens: Optional[torch.Tensor]):
    B, T, H, F = q.shape
    DV = v.shape[-1]
    BK, BT, BV, _, _ = _cfg("fwd", F, DV)
    NV = triton.cdiv(DV, BV)
    if cu_seqlens is not None:
        return B, T, H, F, DV, 1, T, cu_seqlens.shape[0] - 1
    NS, L = _segments(B, T, H, NV, BT, q.device)
    return B, T, H, F, DV, NS, L, B * NS


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _s3(t: torch.Tensor):
    return t.stride(0), t.stride(1), t.stride(2)


def _check_inputs(q, k, v, h0s, h0z, cu_seqlens):
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"expected q, k [B, T, H, f] and v [B, T, H, d_v]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    F = q.shape[-1]
    if F > MAX_F:
        raise ValueError(f"the Triton kernel supports f <= {MAX_F} (got f={F}: its {F * F}-row quadratic state "
                         f"does not fit on chip); use backend='torch'")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one of fp16/bf16/fp32; got {q.dtype}, {k.dtype}, {v.dtype}")
    if cu_seqlens is not None and q.shape[0] != 1:
        raise ValueError(f"cu_seqlens needs batch size 1 (documents packed along T); got B={q.shape[0]}")
    if (h0s is None) != (h0z is None):
        raise ValueError("initial_state needs both S and z")


# ----------------------------------------------------------------------------------------------------------
# forward


def _state_pass(x, w, wden, col, B, T, H, F, DV, NS, L):
    """Per-segment ``sum phi(x') [w (/ den) | col or 1]^T`` -> (S [B, NS, H, D, DV], z [B, NS, H, D]) fp32."""
    BK, BT, BV, nw, ns = _cfg("state", F, DV)
    D = 1 + F + F * F
    hs = x.new_empty(B, NS, H, D, DV, dtype=torch.float32)
    hz = x.new_empty(B, NS, H, D, dtype=torch.float32)
    grid = (triton.cdiv(DV, BV), B * NS, H)
    taylor_state_kernel[grid](
        x, w, wden if wden is not None else hz, col if col is not None else hz, hs, hz,
        *_s3(x), *_s3(w), T, H, NS, L, F ** -0.25,
        F=F, DV=DV, BK=BK, BT=BT, BV=BV, W_DEN=wden is not None, HAS_COL=col is not None,
        num_warps=nw, num_stages=ns)
    return hs, hz


def _fwd(q, k, v, h0s, h0z, cu_seqlens, eps, output_final_state):
    B, T, H, F, DV, NS, L, N = _plan(q, v, cu_seqlens)
    D = 1 + F + F * F
    BK, BT, BV, nw, ns = _cfg("fwd", F, DV)
    o = v.new_empty(B, T, H, DV)
    den = q.new_empty(B, T, H, dtype=torch.float32)
    empty = lambda: q.new_empty(0, dtype=torch.float32)  # noqa: E731  (custom-op outputs must not alias)
    n_states = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else B
    hts = q.new_empty(n_states, H, D, DV, dtype=torch.float32) if output_final_state else empty()
    htz = q.new_empty(n_states, H, D, dtype=torch.float32) if output_final_state else empty()
    hseg_s, hseg_z = empty(), empty()
    use_h0, store_ht = h0s is not None, output_final_state
    if NS > 1:
        # segment starts = initial state + exclusive prefix sum of the segments' own states
        seg_s, seg_z = _state_pass(k, v, None, None, B, T, H, F, DV, NS, L)
        hseg_s, hseg_z = seg_s.cumsum(1) - seg_s, seg_z.cumsum(1) - seg_z
        if h0s is not None:
            hseg_s += h0s.unsqueeze(1)
            hseg_z += h0z.unsqueeze(1)
        if output_final_state:
            hts.copy_(hseg_s[:, -1] + seg_s[:, -1])
            htz.copy_(hseg_z[:, -1] + seg_z[:, -1])
        h0s, h0z, use_h0, store_ht = hseg_s, hseg_z, True, False
    grid = (triton.cdiv(DV, BV), N, H)
    taylor_fwd_kernel[grid](
        q, k, v, o, den,
        h0s if use_h0 else den, h0z if use_h0 else den, hts, htz,
        cu_seqlens if cu_seqlens is not None else den,
        *_s3(q), *_s3(k), *_s3(v), *_s3(o), T, H, NS, L, F ** -0.25, eps,
        F=F, DV=DV, BK=BK, BT=BT, BV=BV, USE_H0=use_h0, STORE_HT=store_ht, IS_VARLEN=cu_seqlens is not None,
        HI_INTRA=HI_INTRA, HI_READ=HI_READ, num_warps=nw, num_stages=ns)
    return o, den, hts, htz, hseg_s, hseg_z


@torch.library.custom_op("based_kernels::taylor_attention_fwd", mutates_args=())
def taylor_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h0s: Optional[torch.Tensor],
                         h0z: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor], eps: float,
                         output_final_state: bool
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                    torch.Tensor]:
    """Returns ``(o, den, final S, final z, segment-start S, segment-start z)``; absent ones are empty."""
    return _fwd(q, k, v, h0s, h0z, cu_seqlens, eps, output_final_state)


@taylor_attention_fwd.register_fake
def _(q, k, v, h0s, h0z, cu_seqlens, eps, output_final_state):
    B, T, H, F, DV, NS, L, N = _plan(q, v, cu_seqlens)
    D = 1 + F + F * F
    f32 = dict(dtype=torch.float32)
    n_states = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else B
    return (v.new_empty(B, T, H, DV), q.new_empty(B, T, H, **f32),
            q.new_empty(n_states, H, D, DV, **f32) if output_final_state else q.new_empty(0, **f32),
            q.new_empty(n_states, H, D, **f32) if output_final_state else q.new_empty(0, **f32),
            q.new_empty(B, NS, H, D, DV, **f32) if NS > 1 else q.new_empty(0, **f32),
            q.new_empty(B, NS, H, D, **f32) if NS > 1 else q.new_empty(0, **f32))


# ----------------------------------------------------------------------------------------------------------
# backward


def _bwd(q, k, v, o, den, dy, dhts, dhtz, h0s, h0z, cu_seqlens, hseg_s, hseg_z, dden=None):
    B, T, H, F, DV, NS, L, N = _plan(q, v, cu_seqlens)
    varlen = cu_seqlens is not None
    cu = cu_seqlens if varlen else den
    dy = _last_dim_contiguous(dy)
    BK, BT, BV, nw, ns = _cfg("dq", F, DV)
    NV = triton.cdiv(DV, BV)
    scale = F ** -0.25
    empty = q.new_empty(0, dtype=torch.float32)
    had_h0 = h0s is not None

    dd = torch.empty_like(den)
    BTP = 64
    taylor_bwd_prep_kernel[(triton.cdiv(T, BTP), B * H)](
        o, dy, den, dd, *_s3(o), *_s3(dy), T, H, DV=DV, BT=BTP, BDV=triton.next_power_of_2(DV), num_warps=4)
    if dden is not None:  # den is also an output (output_normalizer): its gradient joins the normaliser's
        dd += dden.to(torch.float32)

    dq = q.new_empty(NV, B, T, H, F, dtype=torch.float32)
    if NS > 1:
        h0s, h0z = hseg_s, hseg_z
    use_h0 = h0s is not None
    taylor_bwd_dq_kernel[(NV, N, H)](
        q, k, v, dy, den, dd, h0s if use_h0 else empty, h0z if use_h0 else empty, dq, cu,
        *_s3(q), *_s3(k), *_s3(v), *_s3(dy), dq.stride(0), dq.stride(1), dq.stride(2), dq.stride(3),
        T, H, NS, L, scale,
        F=F, DV=DV, BK=BK, BT=BT, BV=BV, USE_H0=use_h0, IS_VARLEN=varlen, HI=HI_BWD, num_warps=nw, num_stages=ns)

    BK, BT, BV, nw, ns = _cfg("dkv", F, DV)
    NV = triton.cdiv(DV, BV)
    dk = q.new_empty(NV, B, T, H, F, dtype=torch.float32)
    dv = v.new_empty(B, T, H, DV)
    n_states = cu_seqlens.shape[0] - 1 if varlen else B
    D = 1 + F + F * F
    dh0s, dh0z = empty, empty
    has_dht = dhts is not None
    if NS > 1:
        # gradient of each segment's end state = d final state + the later segments' query contributions
        seg_s, seg_z = _state_pass(q, dy, den, dd, B, T, H, F, DV, NS, L)
        dend_s = seg_s.flip(1).cumsum(1).flip(1) - seg_s
        dend_z = seg_z.flip(1).cumsum(1).flip(1) - seg_z
        if has_dht:
            dend_s += dhts.unsqueeze(1)
            dend_z += dhtz.unsqueeze(1)
        dht_s, dht_z, use_dht, store_dh0 = dend_s, dend_z, True, False
    else:
        dht_s, dht_z, use_dht, store_dh0 = dhts, dhtz, has_dht, had_h0
        if store_dh0:
            dh0s = q.new_empty(n_states, H, D, DV, dtype=torch.float32)
            dh0z = q.new_empty(n_states, H, D, dtype=torch.float32)
    taylor_bwd_dkv_kernel[(NV, N, H)](
        q, k, v, dy, den, dd, dht_s if use_dht else empty, dht_z if use_dht else empty, dh0s, dh0z, dk, dv, cu,
        *_s3(q), *_s3(k), *_s3(v), *_s3(dy), dk.stride(0), dk.stride(1), dk.stride(2), dk.stride(3), *_s3(dv),
        T, H, NS, L, scale,
        F=F, DV=DV, BK=BK, BT=BT, BV=BV, USE_DHT=use_dht, STORE_DH0=store_dh0, IS_VARLEN=varlen, HI=HI_BWD,
        num_warps=nw, num_stages=ns)
    if NS > 1 and had_h0:
        dh0s = dend_s[:, 0] + seg_s[:, 0]
        dh0z = dend_z[:, 0] + seg_z[:, 0]
    return dq.sum(0).to(q.dtype), dk.sum(0).to(k.dtype), dv, dh0s, dh0z


@torch.library.custom_op("based_kernels::taylor_attention_bwd", mutates_args=())
def taylor_attention_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, den: torch.Tensor,
                         dy: torch.Tensor, dhts: Optional[torch.Tensor], dhtz: Optional[torch.Tensor],
                         h0s: Optional[torch.Tensor], h0z: Optional[torch.Tensor],
                         cu_seqlens: Optional[torch.Tensor], hseg_s: torch.Tensor, hseg_z: torch.Tensor,
                         dden: Optional[torch.Tensor] = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(dq, dk, dv, d initial S, d initial z)``; the last two are empty without an initial state.
    ``dden``: gradient of the ``den`` output (fp32 ``[B, T, H]``) when it reached the loss, else None."""
    dq, dk, dv, dh0s, dh0z = _bwd(q, k, v, o, den, dy, dhts, dhtz, h0s, h0z, cu_seqlens, hseg_s, hseg_z, dden)
    if h0s is None:
        dh0s, dh0z = q.new_empty(0, dtype=torch.float32), q.new_empty(0, dtype=torch.float32)
    return dq, dk, dv, dh0s, dh0z


@taylor_attention_bwd.register_fake
def _(q, k, v, o, den, dy, dhts, dhtz, h0s, h0z, cu_seqlens, hseg_s, hseg_z, dden=None):
    f32 = dict(dtype=torch.float32)
    grads = (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))
    if h0s is None:
        return (*grads, q.new_empty(0, **f32), q.new_empty(0, **f32))
    return (*grads, h0s.new_empty(h0s.shape), h0z.new_empty(h0z.shape))


def _setup_context(ctx, inputs, output):
    q, k, v, h0s, h0z, cu_seqlens, eps, output_final_state = inputs
    o, den, _, _, hseg_s, hseg_z = output
    ctx.save_for_backward(q, k, v, o, den, h0s, h0z, cu_seqlens, hseg_s, hseg_z)


def _backward(ctx, do, dden, dhts, dhtz, dhseg_s, dhseg_z):
    q, k, v, o, den, h0s, h0z, cu_seqlens, hseg_s, hseg_z = ctx.saved_tensors
    if dhts is not None and dhts.numel() == 0:
        dhts = None
    if dhtz is not None and dhtz.numel() == 0:
        dhtz = None
    if (dhts is None) != (dhtz is None):  # only one of S, z reached the loss
        ref = dhts if dhts is not None else dhtz
        n, H = ref.shape[:2]
        D = 1 + q.shape[-1] + q.shape[-1] ** 2
        dhts = dhts if dhts is not None else q.new_zeros(n, H, D, v.shape[-1], dtype=torch.float32)
        dhtz = dhtz if dhtz is not None else q.new_zeros(n, H, D, dtype=torch.float32)
    if dhts is not None:
        dhts, dhtz = dhts.contiguous(), dhtz.contiguous()
    if dden is not None and dden.numel() == 0:
        dden = None
    if dden is not None:
        dden = dden.contiguous()
    if do is None:  # only den reached the loss
        do = torch.zeros_like(o)
    dq, dk, dv, dh0s, dh0z = taylor_attention_bwd(q, k, v, o, den, do, dhts, dhtz, h0s, h0z, cu_seqlens,
                                                  hseg_s, hseg_z, dden)
    if h0s is None:
        dh0s, dh0z = None, None
    return dq, dk, dv, dh0s, dh0z, None, None, None


taylor_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def taylor_attention_triton(q, k, v, *, eps=1e-12, initial_state=None, output_final_state=False,
                            cu_seqlens=None, output_normalizer=False):
    """Triton path of :func:`based_kernels.taylor_linear_attention` (same arguments and returns)."""
    h0s, h0z = (None, None) if initial_state is None else initial_state
    _check_inputs(q, k, v, h0s, h0z, cu_seqlens)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    if h0s is not None:
        n = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else q.shape[0]
        F, DV = q.shape[-1], v.shape[-1]
        want = (n, q.shape[2], 1 + F + F * F, DV)
        if tuple(h0s.shape) != want or tuple(h0z.shape) != want[:3]:
            raise ValueError(f"initial_state must be (S {want}, z {want[:3]}); got S {tuple(h0s.shape)}, "
                             f"z {tuple(h0z.shape)}")
        h0s, h0z = h0s.float().contiguous(), h0z.float().contiguous()
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(torch.int32)
    o, den, hts, htz, _, _ = taylor_attention_fwd(q, k, v, h0s, h0z, cu_seqlens, float(eps),
                                                  bool(output_final_state))
    if output_normalizer:
        return o, ((hts, htz) if output_final_state else None), den
    return o, ((hts, htz) if output_final_state else None)


# ----------------------------------------------------------------------------------------------------------
# decode


@torch.library.custom_op("based_kernels::taylor_attention_step", mutates_args=())
def taylor_attention_step_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: Optional[torch.Tensor],
                             z: Optional[torch.Tensor], eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, H, F = q.shape
    DV = v.shape[-1]
    D = 1 + F + F * F
    BK = max(16, triton.next_power_of_2(F))
    BV = min(64, max(16, triton.next_power_of_2(DV)))
    y = v.new_empty(B, H, DV)
    s_out = q.new_empty(B, H, D, DV, dtype=torch.float32)
    z_out = q.new_empty(B, H, D, dtype=torch.float32)
    has = s is not None
    taylor_step_kernel[(triton.cdiv(DV, BV), B * H)](
        q, k, v, y, s if has else s_out, z if has else z_out, s_out, z_out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        H, F ** -0.25, eps, F=F, DV=DV, BK=BK, BV=BV, HAS_STATE=has, num_warps=4)
    return y, s_out, z_out


@taylor_attention_step_op.register_fake
def _(q, k, v, s, z, eps):
    B, H, F = q.shape
    D = 1 + F + F * F
    return (v.new_empty(B, H, v.shape[-1]), q.new_empty(B, H, D, v.shape[-1], dtype=torch.float32),
            q.new_empty(B, H, D, dtype=torch.float32))


def taylor_attention_step_triton(q, k, v, state, *, eps=1e-12):
    """Triton path of :func:`based_kernels.taylor_linear_attention_step`."""
    if q.shape[-1] > MAX_F:
        raise ValueError(f"the Triton kernel supports f <= {MAX_F} (got f={q.shape[-1]}); use backend='torch'")
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    s, z = (None, None) if state is None else (state[0].float().contiguous(), state[1].float().contiguous())
    y, s, z = taylor_attention_step_op(q, k, v, s, z, float(eps))
    return y, (s, z)


__all__ = ["taylor_attention_triton", "taylor_attention_step_triton", "taylor_attention_fwd",
           "taylor_attention_bwd", "taylor_attention_step_op", "CONFIG", "MAX_F"]
