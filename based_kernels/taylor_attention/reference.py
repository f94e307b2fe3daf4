"""Plain-PyTorch Taylor linear attention: the oracles every kernel is tested against.

Layout follows flash-linear-attention: q, k ``[B, T, H, f]``, v ``[B, T, H, d_v]``. The recurrent state lives
in the feature space of the symmetric Taylor map ``phi`` (:func:`symmetric_feature_map`, 153 features for
f = 16, the Triton kernels' layout; see ``README.md``):

    state = (S, z),  S = sum_j phi(k_j) v_j^T  ``[B, H, D, d_v]`` fp32,  z = sum_j phi(k_j)  ``[B, H, D]`` fp32

``z`` is the column that a ones column appended to ``v`` would produce: it carries the normalizer.
Computation happens in float64 when the inputs are float64 (the oracle) and in float32 otherwise; outputs
come back in ``v.dtype``; states are always float32 or float64, never half precision (they grow with T).
"""
from __future__ import annotations

import math

import torch

from .._common import split_varlen

__all__ = [
    "feature_dim",
    "feature_map",
    "symmetric_feature_map",
    "taylor_attention_quadratic",
    "taylor_attention_chunked",
    "taylor_attention_step",
    "taylor_attention_step_buffered",
    "taylor_state_with_buffer",
]


def feature_dim(f: int) -> int:
    """Rows of the Taylor state for head dim ``f``: the symmetric map's 1 + f + f(f+1)/2 (153 for f = 16; the
    full outer product's 1 + f + f^2 = 273 has the same kernel, every off-diagonal product twice)."""
    return 1 + f + f * (f + 1) // 2


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def feature_map(u: torch.Tensor) -> torch.Tensor:
    """``phi(u) = [1, u / f^(1/4), vec(u u^T) / (sqrt(2) sqrt(f))]`` over the last dim ``f``.

    Gives ``phi(q) . phi(k) = 1 + s + s^2 / 2`` with ``s = q . k / sqrt(f)``. Output ``[..., 1 + f + f^2]``.
    """
    f = u.shape[-1]
    ones = torch.ones_like(u[..., :1])
    quad = (u.unsqueeze(-1) * u.unsqueeze(-2)).flatten(-2)
    return torch.cat([ones, u / f**0.25, quad / (math.sqrt(2.0) * math.sqrt(f))], dim=-1)


def symmetric_feature_map(u: torch.Tensor) -> torch.Tensor:
    """The 1 + f + f(f+1)/2 feature map (153 for f = 16) with the same kernel as :func:`feature_map`."""
    f = u.shape[-1]
    i, j = torch.triu_indices(f, f, offset=1, device=u.device)
    ones = torch.ones_like(u[..., :1])
    diag = u * u / (math.sqrt(2.0) * math.sqrt(f))
    off = u[..., i] * u[..., j] / math.sqrt(f)
    return torch.cat([ones, u / f**0.25, diag, off], dim=-1)


def _taylor_kernel(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``1 + s + s^2/2`` for every (query, key) pair: q ``[..., T, f]``, k ``[..., S, f]`` -> ``[..., T, S]``."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return 1.0 + s + 0.5 * s * s


def _check(q, k, v, initial_state):
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"expected q, k [B, T, H, f] and v [B, T, H, d_v] with equal B, T, H; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if initial_state is not None:
        B, _, H, f = q.shape
        S, z = initial_state
        want = (B, H, feature_dim(f), v.shape[-1])
        if tuple(S.shape) != want or tuple(z.shape) != want[:3]:
            raise ValueError(
                f"initial_state must be (S {want}, z {want[:3]}); got S {tuple(S.shape)}, z {tuple(z.shape)}"
            )


def taylor_attention_quadratic(q, k, v, *, eps=1e-12, initial_state=None, output_final_state=False,
                               cu_seqlens=None):
    """O(T^2) causal Taylor linear attention, diagonal included; the fp64-capable oracle.

    ``y_t = (sum_{j<=t} K(q_t, k_j) v_j + phi(q_t) S0) / (sum_{j<=t} K(q_t, k_j) + phi(q_t) z0 + eps)``.
    Returns ``(y [B, T, H, d_v], final_state or None)``.
    """
    if cu_seqlens is not None:
        fn = lambda *t, **kw: taylor_attention_quadratic(*t, eps=eps, **kw)  # noqa: E731
        return split_varlen(fn, cu_seqlens, (q, k, v), initial_state, output_final_state)
    _check(q, k, v, initial_state)
    dt = _compute_dtype(q)
    qh, kh, vh = (t.to(dt).transpose(1, 2) for t in (q, k, v))  # [B, H, T, .]
    T = q.shape[1]
    a = _taylor_kernel(qh, kh)
    a = a * torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    num = a @ vh
    den = a.sum(-1)
    if initial_state is not None:
        S0, z0 = (s.to(dt) for s in initial_state)
        pq = symmetric_feature_map(qh)
        num = num + pq @ S0
        den = den + (pq @ z0.unsqueeze(-1)).squeeze(-1)
    y = (num / (den + eps).unsqueeze(-1)).transpose(1, 2).to(v.dtype)
    final = None
    if output_final_state:
        pk = symmetric_feature_map(kh)
        S = pk.transpose(-1, -2) @ vh
        z = pk.sum(-2)
        if initial_state is not None:
            S, z = S + S0, z + z0
        final = (S, z)
    return y, final


def taylor_attention_chunked(q, k, v, *, eps=1e-12, chunk_size=64, initial_state=None,
                             output_final_state=False, cu_seqlens=None, output_normalizer=False):
    """O(T) chunked Taylor linear attention (fp32 states): the CPU training path.

    Intra-chunk terms use the masked ``1 + s + s^2/2`` kernel; inter-chunk terms read the exclusive prefix sum
    of per-chunk states ``phi(K_c)^T [V_c | 1]``. Any T (the last chunk is masked, not assumed full).
    Returns ``(y [B, T, H, d_v], final_state or None)``; with ``output_normalizer`` also the denominator
    ``den [B, T, H]`` (without eps; fp32, fp64 for fp64 inputs; differentiable): ``(y, final_state or None, den)``.
    """
    if output_normalizer:
        dv = v.shape[-1]
        if cu_seqlens is not None:
            def fn(q_, k_, v_, *, initial_state, output_final_state):
                y, fin, den = _chunked(q_, k_, v_, eps, chunk_size, initial_state, output_final_state, True, True)
                return torch.cat([y, den.unsqueeze(-1)], dim=-1), fin
            out, final = split_varlen(fn, cu_seqlens, (q, k, v), initial_state, output_final_state)
            return out[..., :dv].to(v.dtype), final, out[..., dv]
        return _chunked(q, k, v, eps, chunk_size, initial_state, output_final_state, True, False)
    if cu_seqlens is not None:
        fn = lambda *t, **kw: taylor_attention_chunked(*t, eps=eps, chunk_size=chunk_size, **kw)  # noqa: E731
        return split_varlen(fn, cu_seqlens, (q, k, v), initial_state, output_final_state)
    return _chunked(q, k, v, eps, chunk_size, initial_state, output_final_state, False, False)


def _chunked(q, k, v, eps, chunk_size, initial_state, output_final_state, output_normalizer, raw):
    """Body of :func:`taylor_attention_chunked` for one batch; ``raw`` keeps y in the compute dtype."""
    _check(q, k, v, initial_state)
    B, T, H, f = q.shape
    dv = v.shape[-1]
    dt = _compute_dtype(q)
    C = chunk_size
    n = max(1, -(-T // C))
    pad = n * C - T

    def chunks(t):  # [B, T, H, x] -> [B, H, n, C, x]
        t = t.to(dt).transpose(1, 2)
        if pad:
            t = torch.nn.functional.pad(t, (0, 0, 0, pad))
        return t.reshape(B, H, n, C, t.shape[-1])

    valid = torch.arange(n * C, device=q.device).reshape(n, C, 1) < T  # padded keys contribute nothing
    qc, kc = chunks(q), chunks(k)
    ve = torch.cat([chunks(v), valid.to(dt).expand(B, H, n, C, 1)], dim=-1)  # [V | 1]; padded rows zero
    ve = ve * valid
    a = _taylor_kernel(qc, kc) * torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    out = a @ ve  # intra-chunk [num | den]
    pk = symmetric_feature_map(kc)
    states = pk.transpose(-1, -2) @ ve  # [B, H, n, D, dv + 1]
    prefix = states.cumsum(2) - states  # exclusive: states of earlier chunks
    if initial_state is not None:
        S0, z0 = initial_state
        prefix = prefix + torch.cat([S0.to(dt), z0.to(dt).unsqueeze(-1)], dim=-1).unsqueeze(2)
    out = out + symmetric_feature_map(qc) @ prefix
    y = out[..., :dv] / (out[..., dv:] + eps)
    y = y.reshape(B, H, n * C, dv)[:, :, :T].transpose(1, 2)
    if not raw:
        y = y.to(v.dtype)
    final = None
    if output_final_state:
        total = prefix[:, :, -1] + states[:, :, -1]
        final = (total[..., :dv], total[..., dv])
    if output_normalizer:
        den = out[..., dv].reshape(B, H, n * C)[:, :, :T].transpose(1, 2)  # [B, T, H], without eps
        return y, final, den
    return y, final


def taylor_attention_step(q, k, v, state, *, eps=1e-12):
    """One decode step, state update before read: q, k ``[B, H, f]``, v ``[B, H, d_v]``.

    ``S += phi(k) v^T; z += phi(k); y = phi(q) S / (phi(q) . z + eps)``. ``state`` may be None (empty).
    Returns ``(y [B, H, d_v] in v.dtype, new_state)``; the input state is not modified.
    """
    B, H, f = q.shape
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    if state is None:
        D = feature_dim(f)
        state = (q.new_zeros(B, H, D, v.shape[-1], dtype=dt), q.new_zeros(B, H, D, dtype=dt))
    S, z = state
    pk, pq = symmetric_feature_map(k.to(S.dtype)), symmetric_feature_map(q.to(S.dtype))
    S = S + pk.unsqueeze(-1) * v.to(S.dtype).unsqueeze(-2)
    z = z + pk
    num = (pq.unsqueeze(-2) @ S).squeeze(-2)
    den = (pq * z).sum(-1, keepdim=True)
    return (num / (den + eps)).to(v.dtype), (S, z)


def taylor_attention_step_buffered(q, k, v, state, buffer, *, eps=1e-12):
    """One decode step against a state plus a buffer of recent tokens not yet folded into it.

    ``buffer = (kb [B, H, C, f], vb [B, H, C, d_v], n [B, H] int)``: rows ``j < n`` of ``kb`` / ``vb`` are the keys
    and values of tokens that belong to the state but are kept unexpanded, so the state in full is ``S + sum_{j<n}
    phi(kb_j) vb_j^T`` (:func:`taylor_state_with_buffer`; z likewise). The step computes ``y`` over that full
    state and this token, ``y = (phi(q) S + sum_{j<n} K(q, kb_j) vb_j + K(q, k) v) / (phi(q) z + sum_{j<n} K(q,
    kb_j) + K(q, k) + eps)``; then, if the buffer is full (``n == C``), folds the buffered tokens and this one
    into ``(S, z)`` and empties it (``n = 0``), else stores ``(k, v)`` in row ``n`` (``n + 1``). A decode step
    thus reads the state at every token and writes it once every C + 1 tokens (``ops.STEP_BUFFER``).

    ``buffer`` may carry a fourth tensor ``sq [B, H, f(f+1)/2, d_v]`` (16-bit; ``ops.STEP_READ_COPY``): the
    state's quadratic rows as of the last fold, which a step that does not fold reads in their place (half the
    bytes; the precision at which the chunked forward keeps those rows) and the fold rewrites from the new S.
    Returns ``(y [B, H, d_v] in v.dtype, (S, z), (kb, vb, n[, sq]))``, new tensors (the inputs are not
    modified)."""
    f = q.shape[-1]
    S, z = state
    kb, vb, n = buffer[:3]
    sq = buffer[3] if len(buffer) > 3 else None
    C = kb.shape[2]
    fold = n >= C  # [B, H]
    dt = S.dtype
    rows = torch.arange(C, device=q.device) < n.unsqueeze(-1)  # [B, H, C]: the buffered tokens
    qd, kd, vd = q.to(dt), k.to(dt), v.to(dt)
    kbd, vbd = kb.to(dt), vb.to(dt)
    w = _taylor_kernel(qd.unsqueeze(-2), kbd).squeeze(-2) * rows  # [B, H, C]
    w_cur = _taylor_kernel(qd.unsqueeze(-2), kd.unsqueeze(-2))[..., 0, 0]  # [B, H]
    pq = symmetric_feature_map(qd)
    S_read = S
    if sq is not None:  # between folds the quadratic rows come from the copy
        low = 1 + f
        S_read = torch.where(fold[..., None, None], S, torch.cat([S[..., :low, :], sq.to(dt)], dim=-2))
    num = (pq.unsqueeze(-2) @ S_read).squeeze(-2) + (w.unsqueeze(-2) @ vbd).squeeze(-2) + w_cur.unsqueeze(-1) * vd
    den = (pq * z).sum(-1) + w.sum(-1) + w_cur
    y = (num / (den + eps).unsqueeze(-1)).to(v.dtype)
    S_all, z_all = taylor_state_with_buffer(state, buffer)  # the buffered tokens folded in, then this one
    pk_cur = symmetric_feature_map(kd)
    S_fold = S_all + pk_cur.unsqueeze(-1) * vd.unsqueeze(-2)
    z_fold = z_all + pk_cur
    S_new = torch.where(fold[..., None, None], S_fold, S)
    z_new = torch.where(fold[..., None], z_fold, z)
    slot = (torch.arange(C, device=q.device) == n.unsqueeze(-1)) & ~fold.unsqueeze(-1)  # [B, H, C]
    kb_new = torch.where(slot.unsqueeze(-1), k.to(kb.dtype).unsqueeze(-2), kb)
    vb_new = torch.where(slot.unsqueeze(-1), v.to(vb.dtype).unsqueeze(-2), vb)
    n_new = torch.where(fold, torch.zeros_like(n), n + 1)
    if sq is None:
        return y, (S_new, z_new), (kb_new, vb_new, n_new)
    sq_new = torch.where(fold[..., None, None], S_new[..., 1 + f:, :].to(sq.dtype), sq)
    return y, (S_new, z_new), (kb_new, vb_new, n_new, sq_new)


def taylor_state_with_buffer(state, buffer):
    """The full state ``(S + sum_{j<n} phi(kb_j) vb_j^T, z + sum_{j<n} phi(kb_j))`` of a state and a decode buffer
    (:func:`taylor_attention_step_buffered`), in the state's dtype: what the unbuffered step would hold."""
    S, z = state
    kb, vb, n = buffer[:3]
    rows = torch.arange(kb.shape[2], device=S.device) < n.unsqueeze(-1)
    pk = symmetric_feature_map(kb.to(S.dtype)) * rows.unsqueeze(-1)
    return S + pk.transpose(-1, -2) @ vb.to(S.dtype), z + pk.sum(-2)
