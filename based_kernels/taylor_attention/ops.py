"""The functional API of Taylor linear attention (backend dispatch), and the Triton path: launchers and the
torch.library custom ops with their autograd (used in eager mode and under torch.compile alike).

``taylor_attention_fwd`` / ``taylor_attention_bwd`` are registered as ``based_kernels::`` custom ops with fake
implementations, and autograd is attached with ``register_autograd``, so ``torch.compile`` traces them as
opaque nodes. Inputs may be strided views (only the last dim must be contiguous): the Megatron mixer passes
``[B, T, H, *]`` views of its ``[s, b, h]`` activations and no copy is made.

Chunk-parallel form (chunk.py): forward = state pass (per-chunk states, sequential over chunks, parallel over
feature blocks x value blocks x sequences x heads, and over runs of chunks at few sequences x heads: state_groups) +
output pass (parallel over chunks); backward = dd prep + the forward's per-chunk states (kept while ``KEEP_STATES``;
else a second state pass recomputes them) + reverse state-gradient pass + gradient pass (parallel over chunks).
The per-chunk states are kept in bf16 for bf16 inputs (the precision at which they enter the tensor-core
products anyway) and in fp32 otherwise; the normaliser states, the initial/final states and every
accumulation are fp32. fp32 inputs: the products follow ``torch.get_float32_matmul_precision()`` at call time
(``_common.dot_precision``: IEEE fp32 at "highest", torch's default, and at "high"; tf32 at "medium").
"""
from __future__ import annotations

from typing import Optional

import torch
import triton

from .. import _common
from .._common import (INTERPRET, Launcher, cdiv, check_backend, check_cu_seqlens, confine_flags, dot_precision,
                       lastdim_contiguous, launch_confined, next_pow2, resolve_backend, sm_count)
from .chunk import (taylor_chunk_grad_kernel, taylor_chunk_output_kernel, taylor_chunk_state_kernel,
                    taylor_chunk_state_part_kernel, taylor_prep_kernel)
from .recurrent import taylor_step_buffered_kernel, taylor_step_kernel
from .reference import (feature_dim, taylor_attention_chunked, taylor_attention_step,
                        taylor_attention_step_buffered)

__all__ = ["taylor_linear_attention", "taylor_linear_attention_step", "taylor_attention_triton",
           "taylor_attention_step_triton", "taylor_attention_fwd", "taylor_attention_bwd", "taylor_attention_step_op",
           "taylor_attention_step_buffered_op", "CONFIG", "MAX_F", "MAX_F_STEP", "STEP_BUFFER", "STEP_READ_COPY"]


# ------------------------------------------------------------------------------------------- the functional API
def _use_triton(backend, x, f, step=False):
    check_backend(backend)
    if backend is None and _common._BACKEND[0] is None:
        return x.is_cuda and f <= (MAX_F_STEP if step else MAX_F)  # larger f: the PyTorch path
    return resolve_backend(backend, x) == "triton"


def taylor_linear_attention(q, k, v, *, eps=1e-12, initial_state=None, output_final_state=False,
                            cu_seqlens=None, backend=None, output_normalizer=False):
    """Causal Taylor linear attention ``y_t = sum_{j<=t} K(q_t,k_j) v_j / (sum_{j<=t} K(q_t,k_j) + eps)``.

    Args:
        q, k: ``[B, T, H, f]``; v: ``[B, T, H, d_v]``. Any strides (the Triton path needs the last dim
            contiguous and copies otherwise). fp16/bf16/fp32; states and accumulation in fp32.
        eps: added to the denominator (which is >= (t+1)/2, so eps is inert).
        initial_state: ``(S [N, H, D, d_v], z [N, H, D])`` fp32, D = 1 + f + f(f+1)/2 (``feature_dim(f)``: the
            symmetric map's rows), N = B (or the number of documents with cu_seqlens); differentiable.
        output_final_state: also return the state after the last token (per document with cu_seqlens).
        cu_seqlens: ``[N + 1]`` int document offsets (FlashAttention convention, B = 1); state resets per doc.
        backend: None (Triton on CUDA, PyTorch on CPU), ``"triton"`` or ``"torch"``.
        output_normalizer: also return the denominator ``den [B, T, H]`` (fp32; fp64 for fp64 inputs on the
            PyTorch path), without eps, so ``y = num / (den + eps)``; differentiable (context parallelism uses it
            to merge the incoming state after a local, zero-state pass).
    Returns:
        ``(y [B, T, H, d_v] in v.dtype, (S, z) or None)``; with ``output_normalizer``
        ``(y, (S, z) or None, den)``.
    """
    if _use_triton(backend, q, q.shape[-1]):
        return taylor_attention_triton(q, k, v, eps=eps, initial_state=initial_state,
                                       output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                                       output_normalizer=output_normalizer)
    return taylor_attention_chunked(q, k, v, eps=eps, initial_state=initial_state,
                                    output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                                    output_normalizer=output_normalizer)


def taylor_linear_attention_step(q, k, v, state, *, eps=1e-12, backend=None, inplace=False, buffer=None):
    """One decode step (update before read). q, k ``[B, H, f]``, v ``[B, H, d_v]``, state ``(S, z)`` or None;
    returns ``(y [B, H, d_v], new_state)``. The input state is not modified unless ``inplace=True``, which
    updates ``(S, z)`` (contiguous fp32) in place and returns them (decode loops and CUDA graphs: fixed buffers,
    half the memory traffic).

    ``buffer=(kb [B, H, C, f], vb [B, H, C, d_v], n [B, H] int32)`` (contiguous; kb / vb in the dtype of k / v,
    ``n`` zeros after a prefill): keep up to C recent tokens unexpanded beside the state and fold them into it
    when the buffer is full (:func:`~based_kernels.taylor_attention.reference.taylor_attention_step_buffered`);
    the state is then read at every step but written once every C + 1 steps. Needs ``inplace=True``; updates
    ``(S, z)`` and the buffer in place. The full state is
    :func:`~based_kernels.taylor_attention.reference.taylor_state_with_buffer`. A fourth tensor ``sq [B, H,
    f(f+1)/2, d_v]`` (bf16 / fp16, contiguous; ``STEP_READ_COPY``) is a 16-bit copy of the state's quadratic rows
    that the steps between folds read instead of those rows of S, and each fold rewrites."""
    if inplace and state is None:
        raise ValueError("inplace=True needs a state to update; pass zeros for the first token")
    if buffer is not None:
        if not inplace:
            raise ValueError("buffer=(kb, vb, n) updates the state and the buffer in place: pass inplace=True")
        _check_buffer(q, v, buffer)
    if _use_triton(backend, q, q.shape[-1], step=True):
        return taylor_attention_step_triton(q, k, v, state, eps=eps, inplace=inplace, buffer=buffer)
    if buffer is not None:
        y, new, new_buffer = taylor_attention_step_buffered(q, k, v, state, buffer, eps=eps)
        for old, t in zip((*state, *buffer), (*new, *new_buffer)):
            old.copy_(t)
        return y, state
    y, new = taylor_attention_step(q, k, v, state, eps=eps)
    if inplace:
        state[0].copy_(new[0])
        state[1].copy_(new[1])
        return y, state
    return y, new


def _check_buffer(q, v, buffer):
    """The decode buffer's layout (the kernel indexes it as contiguous ``[B * H, C, *]``)."""
    if len(buffer) not in (3, 4):
        raise ValueError(f"buffer must be (kb, vb, n) or (kb, vb, n, sq); got {len(buffer)} tensors")
    kb, vb, n = buffer[:3]
    B, H, f = q.shape
    C = kb.shape[2] if kb.dim() == 4 else -1
    want = ((B, H, C, f), (B, H, C, v.shape[-1]), (B, H))
    if C < 1 or tuple(kb.shape) != want[0] or tuple(vb.shape) != want[1] or tuple(n.shape) != want[2]:
        raise ValueError(f"buffer must be (kb [B, H, C, f], vb [B, H, C, d_v], n [B, H]) = {want} for C >= 1; got "
                         f"{tuple(kb.shape)}, {tuple(vb.shape)}, {tuple(n.shape)}")
    if n.dtype != torch.int32 or not all(t.is_contiguous() for t in buffer):
        raise ValueError("buffer's n must be int32 and kb, vb, n (and sq) contiguous")
    if len(buffer) == 4:
        sq = buffer[3]
        want_sq = (B, H, f * (f + 1) // 2, v.shape[-1])
        if tuple(sq.shape) != want_sq or sq.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"buffer's sq (the state's quadratic rows) must be bf16 or fp16 of shape {want_sq}; got "
                             f"{sq.dtype} {tuple(sq.shape)}")


# ------------------------------------------------------------------------------------------------ the Triton path
# Triton's own launch path costs ~0.1 ms of Python per launch of these many-argument kernels (see _common.py)
_state_kernel = Launcher(taylor_chunk_state_kernel)
_output_kernel = Launcher(taylor_chunk_output_kernel)
_state_part_kernel = Launcher(taylor_chunk_state_part_kernel)
_grad_kernel = Launcher(taylor_chunk_grad_kernel)
_prep_kernel = Launcher(taylor_prep_kernel)
_step_kernel = Launcher(taylor_step_kernel)
_step_buffered_kernel = Launcher(taylor_step_buffered_kernel)

MAX_F = 32  # f = 64 passed in the CPU interpreter with the 273-row map; not verified on a GPU (see README)
MAX_F_STEP = 32  # the decode kernel keeps a whole [next_pow2(f(f+1)/2), BV] state block in registers
# The in-place decode step's tiles: (BV value columns per iteration, num_warps while the [BP, BV] state tile has
# <= 8192 elements (f <= 22 at BV 32), num_warps above). benchmarks/decode_kernels.py sets it to time alternatives.
STEP_INPLACE = (32, 4, 8)
# Tokens a decode cache keeps unexpanded before folding them into the Taylor state (the mixer's ``inference_cache``
# allocates that buffer; 0: none, every step reads and writes the state). A step reads the state and the buffer and
# writes the state once every STEP_BUFFER + 1 steps: at based-1.3b's shapes (16 heads, f 16, d_v 112, bf16 buffer)
# the buffer of 16 tokens is 4 KB against the 69 KB fp32 state per head, so a step moves ~0.56x the bytes of the
# unbuffered in-place step (which reads and writes the state). benchmarks/decode_kernels.py times both.
STEP_BUFFER = 16
# With a decode buffer, also keep a 16-bit copy of the state's quadratic rows (the L mixer allocates it for bf16 /
# fp16 activations; the chunked forward keeps those rows at that precision too): the steps between folds read it
# instead of those fp32 rows, ~0.63x the bytes of the buffered step at based-1.3b's shapes, for 44% more L cache.
# The fp32 state stays exact (each fold updates it). Off: on an H100 the step with it is slower, not faster
# (benchmarks/decode_kernels.py at based-1.3b's shapes: 74 us per call against 65 us without it, which runs at the
# copy bandwidth while the copy's step moves its fewer bytes at ~56% of it; based_kernels/taylor_attention/README.md).
STEP_READ_COPY = False
# The buffered step's tiles (BV value columns per iteration, num_warps): on an H100 at based-1.3b's shapes BV 32 at 4
# warps 64.8 us per call, BV 64 69.2, BV 128 68.0, BV 16 72.7, BV 128 at 8 warps 130 (benchmarks/decode_kernels.py).
STEP_BUFFERED = (32, 4)

# Tunables (benchmarks/taylor_attention.py --sweep times alternatives on a GPU; docs/benchmarks.md).
# H200 sweep at B8 T4096 H16 d_v 64, bf16, 153 feature rows: chunk 128 fwd+bwd 2.15 ms vs 3.42 at chunk 64; output
# pass BF 64 0.69 ms (forward) vs 0.86 at BF 128 (3 blocks of 64 pad 39 rows, 2 blocks of 128 pad 103); gradient
# pass 4 or 8 warps equal, BF 64 23% slower than 32. H100, the output pass's tiles in one process (B8 T4096, feature
# rows from the table): (64, 64) at 8 warps 0.483 ms, at 4 warps 0.518 (it spills 908 B per thread); forward 0.639
# against 0.678 ms. H100, the gradient pass (32, 64) at 8 warps against 4, fwd+bwd device ms in one process (feature
# rows from the table): 1.643 vs 1.729 at d_v 64, 3.107 vs 3.233 at d_v 128 (it spills 344 B per thread, not 1992).
# Chunk 64 with the one-kernel gradient pass at 8 warps crashes on an H100 (illegal memory access; README): below
# chunk 128 that pass runs at GRAD_WARPS_SMALL_CHUNK warps at most (grad_warps), the tiles verified there.
CHUNK = 128  # tokens per chunk (all passes share it: the states are per chunk)
CONFIG = {
    # name: (BF feature block, BV value block, num_warps, num_stages)
    "state": (64, 64, 4, 2),
    "output": (64, 64, 8, 2),
    "grad": (32, 64, 8, 1),
    # the output pass's state part as its own kernel (OUTPUT_SPLIT)
    "state_part": (32, 64, 4, 1),
}
GRAD_WARPS_SMALL_CHUNK = 4
# Operand precision (fp32 accumulation always): the intra-chunk A @ v of the forward runs on fp32 operands
# (tf32 for bf16/fp16 inputs; A = 1 + s + s^2/2 rounded to bf16 adds ~0.3e-3 relative error to the ~1.6e-3 of
# rounding y to bf16), the state products on the input dtype; HI_BWD runs the backward's intra-chunk products on
# fp32 operands too. fp32 inputs: _common.dot_precision.
HI_INTRA = True
HI_BWD = False
# The gradient pass as one kernel (dq, dk, dv together) or two (dq; dk and dv), which recompute the intra-chunk
# scores but keep fewer tiles live: sm_90 compile at chunk 128, BF 32, BV 64, 4 warps (benchmarks/aot_check.py):
# one kernel 255 registers and 2448 bytes spilled; the split ones, see aot_check. Timed by the sweep. H100, fwd+bwd
# in one process at B8 T4096: split at (32, 64, 4, 1) 1.556 ms against this default's 1.603 at d_v 64 (one value
# block), 3.197 against 3.151 at d_v 128 (two, each recomputing the scores in both kernels): off (README).
GRAD_SPLIT = False
# The forward's per-chunk states (S in the state dtype, z in fp32: n_chunks x H x D x (d_v + 1) numbers, e.g. 82 MB
# per call at B 8, T 4096, 16 heads, f 16, d_v 64 in bf16) are kept for the backward instead of recomputed by a
# second state pass: the same values (the same kernel and tiles), one pass less, that memory more per call until its
# backward. Off: the backward recomputes them (the memory of the chunk states is then the backward's only).
KEEP_STATES = True
# Query rows per output-pass program (chunk.taylor_chunk_output_kernel's BQ): each chunk's output in blocks of this
# many rows, one program each (k, v and the chunk's state read once per block, from L2), for [BQ, chunk] scores and
# [BQ, BF] features per program instead of [chunk, chunk] and [chunk, BF]: fewer registers and more programs per
# SM. None (or a value >= the chunk): one program per chunk. At most the chunk, a power of two >= 16.
OUTPUT_QUERY_ROWS: Optional[int] = None
# The output pass as two kernels: the state part phi(Q_c) (hc_c, zc_c) of every chunk into fp32 partial sums
# (chunk.taylor_chunk_state_part_kernel), then the intra-chunk part plus those sums, normalised: each kernel holds
# either the [chunk, chunk] score tiles or the feature tiles, for a round trip of the partial sums (fp32, d_v + 1
# numbers per token and head) through memory. H100, device ms per fwd+bwd at B8 T4096 d_v 64 (taylor_config_check.py
# --kernels, one process per configuration): one kernel 0.492; split 0.157 (state part at BF 32, 4 warps, 1 stage)
# + 0.201 (intra-chunk part at the output pass's tiles); the state part at 2 stages 0.231, at BF 64 0.282.
OUTPUT_SPLIT = True


def output_query_rows(BT: int) -> int:
    """The output pass's query rows per program (``OUTPUT_QUERY_ROWS``) in chunks of ``BT`` tokens; 0: the whole
    chunk."""
    rows = OUTPUT_QUERY_ROWS
    if rows is None or rows >= BT:
        return 0
    if rows < 16 or rows & (rows - 1):
        raise ValueError(f"ops.OUTPUT_QUERY_ROWS must be a power of two >= 16 (tl.dot's smallest tile) or None, "
                         f"got {rows}")
    return rows


def low_rows_tile(F: int) -> int:
    """The output pass's tile of the constant and linear feature rows (``BL``: f + 1 of them), at least 32: no
    [chunk, 16] x [16, 16] products (wgmma m64n16k16) at f <= 15. Suspected, and found not to be, the cause of the
    output pass's out-of-bounds read at f 8, d_v 32 (OUTPUT_NARROW_WARPS; README)."""
    return max(32, next_pow2(F + 1))


INTERPRET_TILES = (32, 32, 32)  # (chunk, BF, BV) under TRITON_INTERPRET: small tiles keep CPU tests fast
# IEEE fp32 products (fp32 inputs at torch's "highest" / "high" matmul precision) have no tensor-core path: each
# tl.dot becomes an unrolled loop of FMAs over its whole tile, so the bf16 tiles above (e.g. a 128 x 128 x 64
# product per program) make very large kernels, slow to compile. These smaller tiles (chunk, BF, BV, num_warps,
# num_stages) are used instead. The forward and the backward recompute their chunk states from q, k, v, so each
# may choose its own chunk.
IEEE_TILES = (64, 32, 32, 4, 1)


# The split gradient pass gives wrong dk / dv on an H100 at value blocks of 32 columns (d_v <= 32, or CONFIG["grad"]
# with BV 32; the interpreter and BV 64 are right: README): below this many columns the one-kernel pass runs instead.
GRAD_SPLIT_MIN_BV = 64


def grad_split(BV: int) -> bool:
    """Whether the gradient pass runs split (two kernels) at value blocks of ``BV`` columns: ``GRAD_SPLIT``, except
    below ``GRAD_SPLIT_MIN_BV`` columns on a GPU."""
    return GRAD_SPLIT and (BV >= GRAD_SPLIT_MIN_BV or INTERPRET)


def grad_warps(chunk: int, num_warps: int, split: Optional[bool] = None) -> int:
    """The warps the gradient pass runs at for ``CONFIG["grad"]``'s ``num_warps`` at ``chunk`` tokens per chunk: the
    one-kernel pass below chunk 128 at ``GRAD_WARPS_SMALL_CHUNK`` at most (the crash above), else as configured.
    ``split``: whether the pass runs split (``grad_split``; default ``GRAD_SPLIT``)."""
    split = GRAD_SPLIT if split is None else split
    return min(num_warps, GRAD_WARPS_SMALL_CHUNK) if chunk < 128 and not split else num_warps


# The output pass's warps at value blocks of 32 columns or fewer: at 8 warps, f 8, d_v 32 with HI_INTRA (the intra-chunk
# A @ v on tf32 operands) it read shared memory out of bounds on an H100 (compute-sanitizer; packed documents with the
# final state); at 4 warps, or HI_INTRA off, or 32-row feature blocks, memcheck is clean.
OUTPUT_NARROW_WARPS = 4


def _cfg(name: str, F: int, DV: int, prec: str = "tf32"):
    BF, BV, nw, ns = CONFIG[name]
    BT = CHUNK
    if INTERPRET:
        BT, BF, BV = INTERPRET_TILES
    elif prec == "ieee":
        BT, BF, BV, nw, ns = IEEE_TILES
    BK = max(16, triton.next_power_of_2(F))
    BV = min(BV, max(16, triton.next_power_of_2(DV)))
    if name == "grad":
        nw = grad_warps(BT, nw, grad_split(BV))
    elif name == "output" and BV <= 32:  # see OUTPUT_NARROW_WARPS
        nw = min(nw, OUTPUT_NARROW_WARPS)
    D = feature_dim(F)
    return BK, BT, BF, BV, triton.cdiv(D, BF), nw, ns


# The state passes' two-level walk (chunk.py, GROUPS): with fewer than STATE_GROUP_PROGRAMS_PER_SM programs per SM,
# each sequence's walk is cut into G runs: one kernel sums each run from zero, a second walks every run from the
# initial state plus the sums of the runs before it, so the chains are G times shorter for one more (shorter) walk.
# G is the largest that keeps at most that many programs per SM, runs of STATE_GROUP_MIN_CHUNKS chunks or more on
# average and at most MAX_STATE_GROUPS runs. 0: one walk at every shape. STATE_GROUPS (not None) forces G.
STATE_GROUP_PROGRAMS_PER_SM = 4
STATE_GROUP_MIN_CHUNKS = 8
MAX_STATE_GROUPS = 16
STATE_GROUPS: Optional[int] = None


def state_groups(programs: int, n_chunks: int, n_seqs: int, sms: int) -> int:
    """Runs per sequence of the state passes for ``programs`` one-walk programs over ``n_seqs`` sequences of
    ``n_chunks`` chunks in all, on ``sms`` SMs (the rule above)."""
    if STATE_GROUPS is not None:
        return max(1, STATE_GROUPS)
    if not STATE_GROUP_PROGRAMS_PER_SM or not programs:
        return 1
    by_sms = STATE_GROUP_PROGRAMS_PER_SM * sms // programs
    by_length = n_chunks // max(1, n_seqs * STATE_GROUP_MIN_CHUNKS)
    return max(1, min(by_sms, by_length, MAX_STATE_GROUPS))


_FEATURE_TABLES: dict = {}


def feature_table(F: int, device: torch.device) -> torch.Tensor:
    """The chunk kernels' feature rows (``chunk._feature_rows``): int32 ``[3, D]`` holding per row of the symmetric
    map (reference.symmetric_feature_map's order) its factor columns a, b (-1: the constant 1) and the fp32 bits of
    its coefficient c (1, f^(-1/4), f^(-1/2) / sqrt(2), f^(-1/2), rounded as the kernels' fp32 arithmetic rounds
    them). Built once per (f, device) at the first launch there, which (like Triton's compilation) has to run outside
    a CUDA graph capture."""
    key = (F, device)
    table = _FEATURE_TABLES.get(key)
    if table is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"taylor_linear_attention's first call with f = {F} on {device} is inside a CUDA "
                               f"graph capture: run it once outside the capture first (warm-up), as for any "
                               f"Triton kernel's first launch")
        i, j = torch.triu_indices(F, F, 1)
        cols = torch.arange(F)
        one = torch.full((1,), -1)
        a = torch.cat([one, cols, cols, i])
        b = torch.cat([one, torch.full((F,), -1), cols, j])
        s = torch.tensor(F ** -0.25, dtype=torch.float32)
        s2 = s * s
        f32 = dict(dtype=torch.float32)
        c = torch.cat([torch.ones(1, **f32), s.expand(F), (s2 * torch.tensor(0.7071067811865476, **f32)).expand(F),
                       s2.expand(len(i))])
        table = _FEATURE_TABLES[key] = torch.stack([a.int(), b.int(), c.view(torch.int32)]).to(device)
    return table


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def _chunks(B: int, T: int, cu_seqlens: Optional[torch.Tensor], BT: int):
    """(number of chunks, chunks per row NC, chunk_offsets, chunk_meta). Varlen: one host sync (checking
    cu_seqlens) for the table of (document, first token) per chunk; documents never share a chunk."""
    if cu_seqlens is None:
        NC = triton.cdiv(T, BT)
        return B * NC, NC, None, None
    cu = check_cu_seqlens(cu_seqlens, T, B)  # the kernels index q, k, v and the states with these offsets
    counts = [triton.cdiv(e - b, BT) for b, e in zip(cu[:-1], cu[1:])]
    offsets = [0]
    meta = []
    for n, (b, c) in enumerate(zip(cu[:-1], counts)):
        offsets.append(offsets[-1] + c)
        meta += [x for i in range(c) for x in (n, b + i * BT)]
    dev = cu_seqlens.device
    return (offsets[-1], 0, torch.tensor(offsets, dtype=torch.int32, device=dev),
            torch.tensor(meta or [0, 0], dtype=torch.int32, device=dev))


def _s3(t: torch.Tensor):
    return t.stride(0), t.stride(1), t.stride(2)


def _check_inputs(q, k, v, h0s, h0z, cu_seqlens):
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"expected q, k [B, T, H, f] and v [B, T, H, d_v]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    F = q.shape[-1]
    if F > MAX_F:
        raise ValueError(f"the Triton kernel supports f <= {MAX_F} (got f={F}: {feature_dim(F)} features per "
                         f"head); use backend='torch'")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one of fp16/bf16/fp32; got {q.dtype}, {k.dtype}, {v.dtype}")
    if cu_seqlens is not None and q.shape[0] != 1:
        raise ValueError(f"cu_seqlens needs batch size 1 (documents packed along T); got B={q.shape[0]}")
    if (h0s is None) != (h0z is None):
        raise ValueError("initial_state needs both S and z")


# ----------------------------------------------------------------------------------------------------------
# forward


def _state_pass(x, w, den, dd, h0s, h0z, cu_seqlens, n_chunks, NC, offsets, want_last, reverse, low=False,
                prec="tf32"):
    """Per-chunk states (forward: before each chunk; reverse: gradient after each chunk) and, if asked, the
    state after the walk (final state, or d initial state). ``low``: also an fp32 copy of rows 0..f."""
    B, T, H, F = x.shape
    DV = w.shape[-1]
    D = feature_dim(F)
    BK, BT, BF, BV, NF, nw, ns = _cfg("state", F, DV, prec)
    N = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else B
    hc = x.new_empty(n_chunks, H, D, DV, dtype=_state_dtype(x.dtype))
    zc = x.new_empty(n_chunks, H, D, dtype=torch.float32)
    hl = x.new_empty(n_chunks, H, F + 1, DV, dtype=torch.float32) if low else zc
    ht = x.new_empty(N, H, D, DV, dtype=torch.float32) if want_last else zc
    hz = x.new_empty(N, H, D, dtype=torch.float32) if want_last else zc
    use_h0 = h0s is not None
    NV = cdiv(DV, BV)
    G = state_groups(NF * NV * N * H, n_chunks, N, sm_count(x.device, 1))
    tot = x.new_empty(N * H * G, D, DV, dtype=torch.float32) if G > 1 else zc
    totz = x.new_empty(N * H * G, D, dtype=torch.float32) if G > 1 else zc
    grid = (NF * NV * N * H * G,)  # chunk.taylor_chunk_state_kernel unfolds it
    args = (x, w, den if den is not None else zc, dd if dd is not None else zc,
            h0s if use_h0 else zc, h0z if use_h0 else zc, hc, hl, zc, ht, hz, tot, totz,
            cu_seqlens if cu_seqlens is not None else zc, offsets if offsets is not None else zc,
            feature_table(F, x.device), *_s3(x), *_s3(w), T, H, NC, F ** -0.25)
    consts = dict(F=F, DV=DV, BK=BK, BT=BT, BF=BF, BV=BV, REVERSE=reverse, USE_H0=use_h0, STORE_HT=want_last,
                  IS_VARLEN=cu_seqlens is not None, STORE_LOW=low, PREC=prec, GROUPS=G, num_warps=nw,
                  num_stages=ns)
    if G > 1:  # the runs' sums first (tot, totz), then the walks from them
        _state_kernel(lambda meta: grid, args, **consts, TOTALS=True)
    _state_kernel(lambda meta: grid, args, **consts, TOTALS=False)
    return hc, hl, zc, ht, hz


def _fwd(q, k, v, h0s, h0z, cu_seqlens, eps, output_final_state, keep_states=False):
    B, T, H, F = q.shape
    DV = v.shape[-1]
    prec = dot_precision(q.dtype)
    BK, BT, BF, BV, NF, nw, ns = _cfg("output", F, DV, prec)
    n_chunks, NC, offsets, meta = _chunks(B, T, cu_seqlens, BT)
    hc, hl, zc, hts, htz = _state_pass(k, v, None, None, h0s, h0z, cu_seqlens, n_chunks, NC, offsets,
                                       output_final_state, reverse=False, low=True, prec=prec)
    o = v.new_empty(B, T, H, DV)
    den = q.new_empty(B, T, H, dtype=torch.float32)
    if n_chunks:
        BQ = output_query_rows(BT)
        grid = (cdiv(DV, BV) * n_chunks * (BT // BQ if BQ else 1), H)  # chunk._chunk_program unfolds the first axis
        cu, meta = (cu_seqlens if cu_seqlens is not None else den), (meta if meta is not None else den)
        low_prec = "ieee" if prec == "ieee" else "tf32x3"
        feat = feature_table(F, q.device)
        nump, denp = den, den
        if OUTPUT_SPLIT:
            nump = q.new_empty(n_chunks, H, BT, DV, dtype=torch.float32)
            denp = q.new_empty(n_chunks, H, BT, dtype=torch.float32)
            _, _, pBF, pBV, pNF, pnw, pns = _cfg("state_part", F, DV, prec)  # the same chunk as the output pass
            _state_part_kernel(lambda m: (cdiv(DV, pBV) * n_chunks, H), (
                q, hc, hl, zc, nump, denp, cu, meta, feat, *_s3(q), T, H, NC),
                F=F, DV=DV, BK=BK, BT=BT, BF=pBF, BV=pBV, NF=pNF, IS_VARLEN=cu_seqlens is not None,
                BL=low_rows_tile(F), PREC=prec, LOW_PREC=low_prec, num_warps=pnw, num_stages=pns)
        launch_confined(_output_kernel, lambda m: grid, (
            q, k, v, o, den, hc, hl, zc, cu, meta, *confine_flags(q, 1), feat, nump, denp,
            *_s3(q), *_s3(k), *_s3(v), *_s3(o), T, H, NC, F ** -0.25, eps),
            dict(F=F, DV=DV, BK=BK, BT=BT, BF=BF, BV=BV, NF=NF, IS_VARLEN=cu_seqlens is not None, HI_INTRA=HI_INTRA,
                 BL=low_rows_tile(F), PREC=prec, LOW_PREC=low_prec, BQ=BQ, PARTIAL=OUTPUT_SPLIT, num_warps=nw,
                 num_stages=ns))
    if not output_final_state:
        hts, htz = q.new_empty(0, dtype=torch.float32), q.new_empty(0, dtype=torch.float32)
    if not keep_states:
        hc, zc = hc.new_empty(0), zc.new_empty(0)
    return o, den, hts, htz, hc, zc


@torch.library.custom_op("based_kernels::taylor_attention_fwd", mutates_args=())
def taylor_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h0s: Optional[torch.Tensor],
                         h0z: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor], eps: float,
                         output_final_state: bool, keep_states: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                    torch.Tensor]:
    """Returns ``(o, den, final S, final z, chunk S, chunk z)``; the final state is empty unless asked for, the
    per-chunk states (the state before each chunk, for the backward) unless ``keep_states``."""
    return _fwd(q, k, v, h0s, h0z, cu_seqlens, eps, output_final_state, keep_states)


@taylor_attention_fwd.register_fake
def _(q, k, v, h0s, h0z, cu_seqlens, eps, output_final_state, keep_states=False):
    B, T, H, F = q.shape
    D, DV = feature_dim(F), v.shape[-1]
    f32 = dict(dtype=torch.float32)
    n_states = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else B
    if not keep_states:
        chunks = (q.new_empty(0, dtype=_state_dtype(q.dtype)), q.new_empty(0, **f32))
    else:
        # documents never share a chunk, so with cu_seqlens the count depends on the offsets' values
        BT = _cfg("output", F, DV, dot_precision(q.dtype))[1]
        n = (torch.library.get_ctx().new_dynamic_size() if cu_seqlens is not None else B * triton.cdiv(T, BT))
        chunks = (q.new_empty(n, H, D, DV, dtype=_state_dtype(q.dtype)), q.new_empty(n, H, D, **f32))
    return (v.new_empty(B, T, H, DV), q.new_empty(B, T, H, **f32),
            q.new_empty(n_states, H, D, DV, **f32) if output_final_state else q.new_empty(0, **f32),
            q.new_empty(n_states, H, D, **f32) if output_final_state else q.new_empty(0, **f32), *chunks)


# ----------------------------------------------------------------------------------------------------------
# backward


def _bwd(q, k, v, o, den, dy, dhts, dhtz, h0s, h0z, cu_seqlens, dden=None, hc=None, zc=None):
    B, T, H, F = q.shape
    DV = v.shape[-1]
    dy = lastdim_contiguous(dy)
    prec = dot_precision(q.dtype)
    BK, BT, BF, BV, NF, nw, ns = _cfg("grad", F, DV, prec)
    NV = triton.cdiv(DV, BV)
    n_chunks, NC, offsets, meta = _chunks(B, T, cu_seqlens, BT)

    dd = torch.empty_like(den)
    BTP = 64
    grid = (cdiv(T, BTP) * B * H,)
    _prep_kernel(lambda m: grid, (o, dy, den, dd, *_s3(o), *_s3(dy), T, H), DV=DV, BT=BTP, BDV=next_pow2(DV),
                 num_warps=4)
    if dden is not None:  # den is also an output (output_normalizer): its gradient joins the normaliser's
        dd += dden.to(torch.float32)

    if hc is None:  # not kept by the forward: recompute
        hc, _, zc, _, _ = _state_pass(k, v, None, None, h0s, h0z, cu_seqlens, n_chunks, NC, offsets, False, False,
                                      prec=prec)
    elif hc.shape[0] != n_chunks or zc.shape[0] != n_chunks:
        raise ValueError(f"the kept chunk states have {hc.shape[0]} chunks, the backward's chunking {n_chunks}: "
                         f"the forward and the backward must share CHUNK")
    dhc, _, dzc, dh0s, dh0z = _state_pass(q, dy, den, dd, dhts, dhtz, cu_seqlens, n_chunks, NC, offsets,
                                          h0s is not None, reverse=True, prec=prec)
    # one partial per value block for dq, dk (deterministic sum); written in place when there is one block
    dq = q.new_empty(NV, B, T, H, F, dtype=torch.float32 if NV > 1 else q.dtype)
    dk = k.new_empty(NV, B, T, H, F, dtype=torch.float32 if NV > 1 else k.dtype)
    dv = v.new_empty(B, T, H, DV)
    if n_chunks:
        grid = (NV * n_chunks, H)
        for part in (1, 2) if grad_split(BV) else (0,):
            _grad_kernel(lambda m: grid, (
                q, k, v, dy, den, dd, hc, zc, dhc, dzc, dq, dk, dv,
                cu_seqlens if cu_seqlens is not None else den, meta if meta is not None else den,
                feature_table(F, q.device), *_s3(q), *_s3(k), *_s3(v), *_s3(dy),
                dq.stride(0), dq.stride(1), dq.stride(2), dq.stride(3),
                *_s3(dv), T, H, NC, F ** -0.25),
                F=F, DV=DV, BK=BK, BT=BT, BF=BF, BV=BV, NF=NF, IS_VARLEN=cu_seqlens is not None, HI=HI_BWD,
                PREC=prec, PART=part, num_warps=nw, num_stages=ns)
    else:
        dq.zero_(), dk.zero_(), dv.zero_()
    dq = dq[0] if NV == 1 else dq.sum(0).to(q.dtype)
    dk = dk[0] if NV == 1 else dk.sum(0).to(k.dtype)
    if h0s is None:
        dh0s, dh0z = q.new_empty(0, dtype=torch.float32), q.new_empty(0, dtype=torch.float32)
    return dq, dk, dv, dh0s, dh0z


@torch.library.custom_op("based_kernels::taylor_attention_bwd", mutates_args=())
def taylor_attention_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, den: torch.Tensor,
                         dy: torch.Tensor, dhts: Optional[torch.Tensor], dhtz: Optional[torch.Tensor],
                         h0s: Optional[torch.Tensor], h0z: Optional[torch.Tensor],
                         cu_seqlens: Optional[torch.Tensor], dden: Optional[torch.Tensor] = None,
                         hc: Optional[torch.Tensor] = None, zc: Optional[torch.Tensor] = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(dq, dk, dv, d initial S, d initial z)``; the last two are empty without an initial state.
    ``dden``: gradient of the ``den`` output (fp32 ``[B, T, H]``) when it reached the loss, else None. ``hc``,
    ``zc``: the forward's per-chunk states (``keep_states``), else None (recomputed)."""
    return _bwd(q, k, v, o, den, dy, dhts, dhtz, h0s, h0z, cu_seqlens, dden, hc, zc)


@taylor_attention_bwd.register_fake
def _(q, k, v, o, den, dy, dhts, dhtz, h0s, h0z, cu_seqlens, dden=None, hc=None, zc=None):
    f32 = dict(dtype=torch.float32)
    grads = (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))
    if h0s is None:
        return (*grads, q.new_empty(0, **f32), q.new_empty(0, **f32))
    return (*grads, h0s.new_empty(h0s.shape), h0z.new_empty(h0z.shape))


def _setup_context(ctx, inputs, output):
    q, k, v, h0s, h0z, cu_seqlens, eps, output_final_state, keep_states = inputs
    o, den, _, _, hc, zc = output
    kept = (hc, zc) if keep_states else (None, None)
    ctx.save_for_backward(q, k, v, o, den, h0s, h0z, cu_seqlens, *kept)
    # outputs that did not reach the loss come to _backward as None, not as zeros the size of the chunk states
    ctx.set_materialize_grads(False)


def _backward(ctx, do, dden, dhts, dhtz, _dhc, _dzc):
    q, k, v, o, den, h0s, h0z, cu_seqlens, hc, zc = ctx.saved_tensors
    if dhts is not None and dhts.numel() == 0:
        dhts = None
    if dhtz is not None and dhtz.numel() == 0:
        dhtz = None
    if (dhts is None) != (dhtz is None):  # only one of S, z reached the loss
        ref = dhts if dhts is not None else dhtz
        n, H = ref.shape[:2]
        D = feature_dim(q.shape[-1])
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
    dq, dk, dv, dh0s, dh0z = taylor_attention_bwd(q, k, v, o, den, do, dhts, dhtz, h0s, h0z, cu_seqlens, dden,
                                                  hc, zc)
    if h0s is None:
        dh0s, dh0z = None, None
    return dq, dk, dv, dh0s, dh0z, None, None, None, None


taylor_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def taylor_attention_triton(q, k, v, *, eps=1e-12, initial_state=None, output_final_state=False,
                            cu_seqlens=None, output_normalizer=False):
    """Triton path of :func:`based_kernels.taylor_linear_attention` (same arguments and returns)."""
    h0s, h0z = (None, None) if initial_state is None else initial_state
    _check_inputs(q, k, v, h0s, h0z, cu_seqlens)
    q, k, v = (lastdim_contiguous(t) for t in (q, k, v))
    if h0s is not None:
        n = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else q.shape[0]
        F, DV = q.shape[-1], v.shape[-1]
        want = (n, q.shape[2], feature_dim(F), DV)
        if tuple(h0s.shape) != want or tuple(h0z.shape) != want[:3]:
            raise ValueError(f"initial_state must be (S {want}, z {want[:3]}); got S {tuple(h0s.shape)}, "
                             f"z {tuple(h0z.shape)}")
        h0s, h0z = h0s.float().contiguous(), h0z.float().contiguous()
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(q.device)  # int32 or int64: the op checks it (_chunks)
    keep = KEEP_STATES and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, h0s) if t is not None)
    o, den, hts, htz, _, _ = taylor_attention_fwd(q, k, v, h0s, h0z, cu_seqlens, float(eps),
                                                  bool(output_final_state), keep)
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
    D = feature_dim(F)
    BK = max(16, triton.next_power_of_2(F))
    BV = min(64, max(16, triton.next_power_of_2(DV)))
    y = v.new_empty(B, H, DV)
    s_out = q.new_empty(B, H, D, DV, dtype=torch.float32)
    z_out = q.new_empty(B, H, D, dtype=torch.float32)
    has = s is not None
    grid = (cdiv(DV, BV) * B * H,)
    _step_kernel(lambda m: grid, (
        q, k, v, y, s if has else s_out, z if has else z_out, s_out, z_out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        H, F ** -0.25, eps), F=F, DV=DV, BK=BK, BP=next_pow2(F * (F + 1) // 2), BV=BV, NVB=1, HAS_STATE=has,
        num_warps=8)  # sm_90 compile at f 16: 97 registers, no spills (4 warps: 255 and 44-48 spilled bytes)
    return y, s_out, z_out


@taylor_attention_step_op.register_fake
def _(q, k, v, s, z, eps):
    B, H, F = q.shape
    D = feature_dim(F)
    return (v.new_empty(B, H, v.shape[-1]), q.new_empty(B, H, D, v.shape[-1], dtype=torch.float32),
            q.new_empty(B, H, D, dtype=torch.float32))


@torch.library.custom_op("based_kernels::taylor_attention_step_", mutates_args=("s", "z"))
def taylor_attention_step_inplace_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: torch.Tensor,
                                     z: torch.Tensor, eps: float) -> torch.Tensor:
    """Decode step updating ``s`` and ``z`` in place; returns y. One program per (batch, head) walks all of its
    value blocks: it reads z and each state block before storing over them, and no other program touches them
    (no race, no second z buffer, no copy). Halves the HBM traffic of a decode step against copying a new S into
    a cache."""
    B, H, F = q.shape
    DV = v.shape[-1]
    BK = max(16, next_pow2(F))
    # 32 value columns per iteration: the [BP, BV] state tile and the features fit in registers (sm_90 compile at
    # f 16, d_v 112: 246 registers at 4 warps, 128 at 8, no spills; 64 columns at 4 warps spilled). 4 warps: on an
    # H100 at based-1.3b's decode shapes (batch 128, 16 heads, d_v 112) 115.8 us per call against 125.1 at 8 warps
    # (benchmarks/decode_kernels.py), both near the copy bandwidth; the two take the same registers per SM.
    BV, warps, warps_large = STEP_INPLACE
    BV = min(BV, max(16, next_pow2(DV)))
    BP = next_pow2(F * (F + 1) // 2)
    y = v.new_empty(B, H, DV)
    _step_kernel(lambda m: (B * H,), (
        q, k, v, y, s, z, s, z,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        H, F ** -0.25, eps), F=F, DV=DV, BK=BK, BP=BP, BV=BV, NVB=cdiv(DV, BV),
        HAS_STATE=True, num_warps=warps if BP * BV <= 8192 else warps_large)
    return y


@taylor_attention_step_inplace_op.register_fake
def _(q, k, v, s, z, eps):
    return v.new_empty(q.shape[0], q.shape[1], v.shape[-1])


def step_buffered_consts(F: int, DV: int, C: int) -> tuple[dict, int]:
    """The buffered step kernel's constexprs (all but HAS_COPY) and num_warps for head dim ``F``, ``DV`` value
    columns and a buffer of ``C`` tokens, at the tiles ``STEP_BUFFERED``: the launcher's, and benchmarks/aot_check.py
    compiles with them."""
    BV, warps = STEP_BUFFERED
    BV = min(BV, max(16, next_pow2(DV)))
    D = feature_dim(F)
    BA = next_pow2(D) // 2  # D = (F + 1)(F + 2) / 2 is never a power of two
    return dict(F=F, DV=DV, C=C, BK=max(16, next_pow2(F)), BA=BA, BB=next_pow2(D - BA), BC=max(16, next_pow2(C)),
                BV=BV, NVB=cdiv(DV, BV)), warps


@torch.library.custom_op("based_kernels::taylor_attention_step_buffered_",
                         mutates_args=("s", "z", "kb", "vb", "n", "sq"))
def taylor_attention_step_buffered_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: torch.Tensor,
                                      z: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor, n: torch.Tensor,
                                      sq: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """Decode step against the state and the buffer of recent tokens (recurrent.taylor_step_buffered_kernel), all
    updated in place; returns y. Tiles: ``STEP_BUFFERED``."""
    B, H, F = q.shape
    DV = v.shape[-1]
    consts, warps = step_buffered_consts(F, DV, kb.shape[2])
    y = v.new_empty(B, H, DV)
    _step_buffered_kernel(lambda m: (B * H,), (
        q, k, v, y, s, z, kb, vb, n, s if sq is None else sq,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        H, F ** -0.25, eps), **consts, HAS_COPY=sq is not None, num_warps=warps)
    return y


@taylor_attention_step_buffered_op.register_fake
def _(q, k, v, s, z, kb, vb, n, sq, eps):
    return v.new_empty(q.shape[0], q.shape[1], v.shape[-1])


def taylor_attention_step_triton(q, k, v, state, *, eps=1e-12, inplace=False, buffer=None):
    """Triton path of :func:`based_kernels.taylor_linear_attention_step`."""
    if q.shape[-1] > MAX_F_STEP:
        raise ValueError(f"the Triton decode kernel supports f <= {MAX_F_STEP} (got f={q.shape[-1]}); "
                         f"use backend='torch'")
    q, k, v = (lastdim_contiguous(t) for t in (q, k, v))
    if state is not None:  # the kernel reads the state with D-row strides: another layout would be read as garbage
        want = (q.shape[0], q.shape[1], feature_dim(q.shape[-1]), v.shape[-1])
        if tuple(state[0].shape) != want or tuple(state[1].shape) != want[:3]:
            raise ValueError(f"state must be (S {want}, z {want[:3]}) (D = 1 + f + f(f+1)/2, the symmetric map); "
                             f"got S {tuple(state[0].shape)}, z {tuple(state[1].shape)}")
    if inplace:
        S, z = state
        if S.dtype != torch.float32 or z.dtype != torch.float32 or not (S.is_contiguous() and z.is_contiguous()):
            raise ValueError("inplace=True needs the state (S, z) as contiguous fp32 tensors")
        if buffer is not None:
            kb, vb, n = buffer[:3]
            sq = buffer[3] if len(buffer) > 3 else None
            return taylor_attention_step_buffered_op(q, k, v, S, z, kb, vb, n, sq, float(eps)), (S, z)
        return taylor_attention_step_inplace_op(q, k, v, S, z, float(eps)), (S, z)
    s, z = (None, None) if state is None else (state[0].float().contiguous(), state[1].float().contiguous())
    y, s, z = taylor_attention_step_op(q, k, v, s, z, float(eps))
    return y, (s, z)

