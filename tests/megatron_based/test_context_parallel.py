"""Context parallelism (issue 6) on gloo, 2 and 4 processes: every mixer's CP path equals the single-rank op on the
full sequence (outputs and every gradient on every rank), causality across ranks (bitwise), halos of W < L, W = L,
W > L (multi-hop), local lengths that are not a multiple of the 64-token chunk, collective counts and bytes per layer
(independent of the sequence length), CP=1 == the non-CP path bitwise; and a small CLSA model with CP (and TP x CP
with sequence parallel) against the same model on one CP rank, with recompute on/off and Megatron DDP."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state

import based_kernels
from based_kernels.taylor_attention import feature_dim
from megatron_based.model import context_parallel as cp
from megatron_based.model.mixers.base_conv.context_parallel import base_conv_cp
from megatron_based.model.mixers.sliding_window.context_parallel import sliding_window_attention_cp
from megatron_based.model.mixers.softmax_attention.context_parallel import softmax_attention_cp
from megatron_based.model.mixers.taylor.context_parallel import taylor_attention_cp
from megatron_based.runtime.comm_stats import count_collectives

from ..distributed import run_distributed
from .helpers import full_grads, initialize_parallel, tiny_model

RTOL = 2e-5  # fp32: max |cp - ref| / max |ref|


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


class _Group:
    """Stands in for a process group in single-process checks."""

    def __init__(self, rank, size):
        self._rank, self._size = rank, size

    def rank(self):
        return self._rank

    def size(self):
        return self._size


def test_shard_batch_is_contiguous_with_global_positions():
    tokens = torch.arange(12).view(2, 6)
    batch = dict(tokens=tokens, labels=tokens + 100, loss_mask=torch.ones(2, 6), attention_mask=None)
    out = cp.shard_batch_for_cp(batch, _Group(1, 3))
    assert out["tokens"].tolist() == [[2, 3], [8, 9]] and out["labels"].tolist() == [[102, 103], [108, 109]]
    assert out["position_ids"].tolist() == [[2, 3], [2, 3]] and out["loss_mask"].shape == (2, 2)
    with pytest.raises(ValueError, match=r"sequence length 6, not divisible by context_parallel_size \(4\)"):
        cp.shard_batch_for_cp(batch, _Group(0, 4))
    with pytest.raises(ValueError, match="attention_mask is not supported"):
        cp.shard_batch_for_cp(dict(batch, attention_mask=torch.ones(2, 6)), _Group(0, 2))


def test_global_token_loss_and_packed_sequence_error():
    losses, mask = torch.tensor([[1.0, 2.0, 4.0]]), torch.tensor([[1.0, 0.0, 1.0]])
    loss, mean = cp.loss_over_global_tokens(losses, mask, _Group(0, 1))
    assert loss.item() == mean.item() == 2.5
    q = torch.zeros(1, 4, 1, 2)
    with pytest.raises(NotImplementedError, match="packed sequences .* 'L' layers"):
        taylor_attention_cp(q, q, q, eps=1e-12, cp_group=_Group(0, 2), cu_seqlens=torch.tensor([0, 4]))


# --------------------------------------------------------------------------------------------- mixer level
# Each case: (name, cp function, single-rank function, global inputs [(tensor, seq_dim or None)]).
def _cases(P: int):
    g = torch.Generator().manual_seed(7)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    cases = []
    for L in (16, 67):  # 67: not a multiple of the kernel chunk (64)
        T = P * L
        cases.append((f"L{L}", lambda q, k, v: taylor_attention_cp(q, k, v, eps=1e-12, cp_group=G),
                      lambda q, k, v: based_kernels.taylor_linear_attention(q, k, v, eps=1e-12)[0],
                      [(rnd(2, T, 2, 4) * 0.7, 1), (rnd(2, T, 2, 4) * 0.7, 1), (rnd(2, T, 2, 8), 1)]))
    for L, W in ((10, 3), (6, 6), (4, 9)):  # W < L, W = L, W > L (multi-hop)
        T = P * L
        cases.append((f"S{L}w{W}", lambda q, k, v, W=W: sliding_window_attention_cp(q, k, v, window=W, cp_group=G),
                      lambda q, k, v, W=W: based_kernels.sliding_window_attention(q, k, v, window=W),
                      [(rnd(2, T, 2, 8), 1), (rnd(2, T, 2, 8), 1), (rnd(2, T, 2, 8), 1)]))
    for L in (5, 1):  # L = 1 < k - 1: the halo spans two ranks
        T = P * L
        cases.append((f"C{L}", lambda u1, u2, w: base_conv_cp(u1, u2, w, cp_group=G),
                      lambda u1, u2, w: based_kernels.base_conv(u1, u2, w)[0],
                      [(rnd(2, T, 6), 1), (rnd(2, T, 6), 1), (rnd(6, 3) * 0.5, None)]))
    T = P * 7  # softmax, GQA (4 query heads, 2 K/V heads), layout [B, H, T, D]
    cases.append(("A7", lambda q, k, v: softmax_attention_cp(q, k, v, scale=None, cp_group=G),
                  lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                  [(rnd(2, 4, T, 8), 2), (rnd(2, 2, T, 8), 2), (rnd(2, 2, T, 8), 2)]))
    return cases


G = None  # the CP group of the running worker (set in _mixer_worker; the case lambdas read it)


def _shard(t, dim, r, P):
    return t if dim is None else t.narrow(dim, r * (t.shape[dim] // P), t.shape[dim] // P)


def _run_case(fn, inputs, dy, r, P, grad=True):
    xs = [_shard(t, d, r, P).clone().requires_grad_(grad) for t, d in inputs]
    with count_collectives() as fwd:
        y = fn(*xs)
    with count_collectives() as bwd:
        if grad:
            y.backward(torch.ones_like(y) if dy is None else dy)
    return y.detach(), [x.grad for x in xs], fwd.table(), bwd.table()


def _mixer_worker(rank, world):
    global G
    initialize_parallel(1, 1, world)
    G = parallel_state.get_context_parallel_group()
    r, P = G.rank(), G.size()
    out = {}
    for name, fn, ref_fn, inputs in _cases(P):
        ydim = inputs[0][1]
        # single rank on the full sequence
        full = [t.clone().requires_grad_() for t, _ in inputs]
        y_ref = ref_fn(*full)
        dy = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(3))
        y_ref.backward(dy)
        y, grads, fwd, bwd = _run_case(fn, inputs, _shard(dy, ydim, r, P), r, P)
        errs = {"y": rel_err(y, _shard(y_ref.detach(), ydim, r, P))}
        for i, ((t, d), gx, gref) in enumerate(zip(inputs, grads, full)):
            if d is None:  # a weight: every rank holds a partial gradient
                dist.all_reduce(gx, group=G)
            errs[f"d{i}"] = rel_err(gx, _shard(gref.grad, d, r, P))
        # causality: perturb global position t inside rank P // 2; every output before t stays bitwise equal
        L = y.shape[ydim]
        t_pert = (P // 2) * L + min(1, L - 1)
        bumped = [(x.clone().index_add_(d, torch.tensor([t_pert]), torch.ones_like(x.narrow(d, 0, 1))), d)
                  if d is not None else (x, d) for x, d in inputs]
        y2 = _run_case(fn, bumped, None, r, P, grad=False)[0]
        before = max(0, min(L, t_pert - r * L))
        causal = torch.equal(y.narrow(ydim, 0, before), y2.narrow(ydim, 0, before))
        changed = before < L and not torch.equal(y.narrow(ydim, before, L - before), y2.narrow(ydim, before, L - before))
        out[name] = dict(errs=errs, causal=causal, changed=changed, fwd=fwd, bwd=bwd, L=L)
    # collective sizes do not depend on the sequence length: rerun L and S (W < L) at twice the length
    doubled = {}
    for name, fn, ref_fn, inputs in _cases(P):
        if name in ("L16", "S10w3"):
            long = [(torch.cat([t, t], dim=d), d) for t, d in inputs]
            doubled[name] = _run_case(fn, long, None, r, P)[2:]
    # CP = 1 is the plain kernel path, bitwise
    solo = [dist.new_group([i]) for i in range(world)][rank]
    G = solo
    bitwise = {name: torch.equal(fn(*[t for t, _ in inputs]), ref_fn(*[t for t, _ in inputs]))
               for name, fn, ref_fn, inputs in _cases(1)}
    return out, doubled, bitwise


def _expected_bytes(name, r, P, L):
    """(forward table, backward table) this rank should record for one call of case ``name`` (fp32)."""
    if name.startswith("L"):
        state = 2 * 2 * feature_dim(4) * (8 + 1) * 4  # B * H * D * (d_v + 1) * 4
        return ({("L", "forward", "all_gather"): (1, state, (P - 1) * state)},
                {("L", "backward", "all_gather"): (1, state, (P - 1) * state)})
    if name.startswith("A"):
        piece = L * 2 * 2 * 16 * 4  # L * B * H_kv * (d_k + d_v) * 4
        return ({("A", "forward", "all_gather"): (1, piece, (P - 1) * piece)},
                {("A", "backward", "reduce_scatter"): (1, (P - 1) * piece, (P - 1) * piece)})
    if name.startswith("S"):
        W = int(name.split("w")[1])
        row = 2 * 2 * 16 * 4  # B * H * (d_k + d_v) * 4 per halo row
    else:
        W, row = 2, 2 * 6 * 4  # k - 1 rows of u1, B * C * 4
    hops = min(-(-W // L), P - 1)
    rows = [min(L, W - (h - 1) * L) for h in range(1, hops + 1)]
    sent = sum(m for h, m in enumerate(rows, 1) if r + h < P) * row
    received = sum(m for h, m in enumerate(rows, 1) if r - h >= 0) * row
    kind = name[0]
    return ({(kind, "forward", "p2p"): (1, sent, received)}, {(kind, "backward", "p2p"): (1, received, sent)})


@pytest.mark.parametrize("world", [2, 4])
def test_mixers_cp_equal_single_rank(world):
    results = run_distributed(_mixer_worker, world)
    for r, (out, doubled, bitwise) in enumerate(results):
        assert all(bitwise.values()), f"CP=1 differs from the non-CP path: {bitwise}"
        for name, res in out.items():
            bad = {k: e for k, e in res["errs"].items() if not e < RTOL}
            assert not bad, f"{name} rank {r}/{world}: relative errors {bad}"
            assert res["causal"], f"{name} rank {r}: outputs before the perturbed position changed"
            if r == world // 2:
                assert res["changed"], f"{name} rank {r}: the perturbation had no effect (probe is vacuous)"
            fwd, bwd = _expected_bytes(name, r, world, res["L"])
            assert (res["fwd"], res["bwd"]) == (fwd, bwd), f"{name} rank {r}: collectives {res['fwd']} {res['bwd']}"
        for name, (fwd, bwd) in doubled.items():
            assert (fwd, bwd) == (out[name]["fwd"], out[name]["bwd"]), f"{name}: collectives depend on the length"


# --------------------------------------------------------------------------------------------- model level
def _batch(S, seed=5):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 64, (2, S), generator=g)
    labels = torch.randint(0, 64, (2, S), generator=g)
    mask = (torch.rand(2, S, generator=g) > 0.2).float()
    return dict(tokens=tokens, labels=labels, loss_mask=mask)


def _step(model, batch, cp_group):
    """Forward + backward with the global-token loss: (per-token losses, reported mean, collectives forward,
    collectives during backward)."""
    b = cp.shard_batch_for_cp(batch, cp_group)
    with count_collectives() as fwd:
        losses = model(b["tokens"], b["position_ids"], None, labels=b["labels"])
        loss, mean = cp.loss_over_global_tokens(losses, b["loss_mask"], cp_group)
    with count_collectives() as bwd:
        loss.backward()
    return losses.detach(), mean, fwd.table(), bwd.table()


def _model_worker(rank, world, tp, S):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    P = world // tp
    sp = tp > 1
    batch = _batch(S)
    kw = dict(tensor_model_parallel_size=tp, sequence_parallel=sp)
    # the reference: the same model on one CP rank (the full sequence)
    initialize_parallel(tp, 1, 1)
    ref = tiny_model("CLSA", **kw)
    ref_losses, ref_mean, *_ = _step(ref, batch, parallel_state.get_context_parallel_group())
    ref_grads = full_grads(ref, parallel_state.get_tensor_model_parallel_group())

    initialize_parallel(tp, 1, P)
    group = parallel_state.get_context_parallel_group()
    r = group.rank()
    tp_group = parallel_state.get_tensor_model_parallel_group()
    res = {}
    for recompute in (False, True):
        extra = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1) if recompute else {}
        model = tiny_model("CLSA", context_parallel_size=P, **kw, **extra)
        losses, mean, fwd, bwd = _step(model, batch, group)
        grads = full_grads(model, tp_group)
        for g in grads.values():  # what DDP's average over dp x cp does (dp = 1 here)
            dist.all_reduce(g, group=group)
            g /= P
        res[recompute] = dict(losses=losses, mean=mean, grads=grads, fwd=fwd, bwd=bwd)
    L = S // P
    out = dict(L=L, r=r)
    out["loss_err"] = rel_err(res[False]["losses"], ref_losses[:, r * L:(r + 1) * L])
    out["mean_err"] = rel_err(res[False]["mean"], ref_mean)
    out["grad_errs"] = {n: rel_err(g, ref_grads[n]) for n, g in res[False]["grads"].items()}
    out["recompute_equal"] = all(torch.equal(res[True]["grads"][n], g) for n, g in res[False]["grads"].items())
    out["recompute_loss_equal"] = torch.equal(res[True]["losses"], res[False]["losses"])
    out["counts"] = {k: res[k]["fwd"] for k in res}, {k: res[k]["bwd"] for k in res}

    # causality at model level: change the input token at global position t (rank P // 2); earlier losses bitwise equal
    t = (P // 2) * L + 1
    bumped = dict(batch, tokens=batch["tokens"].clone())
    bumped["tokens"][:, t] = (bumped["tokens"][:, t] + 1) % 64
    with torch.no_grad():
        model = tiny_model("CLSA", context_parallel_size=P, **kw)
        a, b = (model(x["tokens"], x["position_ids"], None, labels=x["labels"])
                for x in (cp.shard_batch_for_cp(batch, group), cp.shard_batch_for_cp(bumped, group)))
    before = max(0, min(L, t - r * L))
    out["causal"] = torch.equal(a[:, :before], b[:, :before])

    # Megatron DDP averages the gradients over dp x cp: with the global-token loss it gives the reference gradients
    if tp == 1:
        model = tiny_model("CLSA", context_parallel_size=P, **kw)
        ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
        _step(ddp, batch, group)
        ddp.finish_grad_sync()
        out["ddp_errs"] = {n.removeprefix("module."): rel_err(p.main_grad, ref_grads[n.removeprefix("module.")])
                           for n, p in ddp.named_parameters()}
    return out


@pytest.mark.parametrize("world, tp, S", [(2, 1, 10), (4, 2, 16)], ids=["cp2-W>L", "tp2xcp2-sp"])
def test_model_cp_equals_single_rank(world, tp, S):
    for out in run_distributed(_model_worker, world, tp, S):
        r = out["r"]
        assert out["loss_err"] < RTOL and out["mean_err"] < RTOL, out
        bad = {n: e for n, e in out["grad_errs"].items() if not e < RTOL}
        assert not bad, f"rank {r}: parameter gradients differ from the single-rank run: {bad}"
        assert out["recompute_equal"] and out["recompute_loss_equal"], f"rank {r}: recompute changes the result"
        assert out["causal"], f"rank {r}: losses before the perturbed token changed"
        if "ddp_errs" in out:
            bad = {n: e for n, e in out["ddp_errs"].items() if not e < RTOL}
            assert not bad, f"rank {r}: DDP gradients differ from the single-rank run: {bad}"
        fwd, bwd = out["counts"]
        # one collective per layer and direction (layers 1C 2L 3S 4A); the loss adds one all-reduce forward
        ops = {"1C": "p2p", "2L": "all_gather", "3S": "p2p", "4A": "all_gather"}
        bops = {"1C": "p2p", "2L": "all_gather", "3S": "p2p", "4A": "reduce_scatter"}
        for recompute in (False, True):
            assert {(k[0], k[2]): v[0] for k, v in fwd[recompute].items()} == {
                **{(layer, op): 1 for layer, op in ops.items()}, ("loss", "all_reduce"): 1}, fwd[recompute]
        assert {(k[0], k[1], k[2]): v[0] for k, v in bwd[False].items()} == {
            (layer, "backward", op): 1 for layer, op in bops.items()}, bwd[False]
        # recompute re-runs the forward during backward: L, S and C reuse what they received; only the softmax
        # layer's K/V all-gather is issued again
        assert {(k[0], k[1], k[2]): v[0] for k, v in bwd[True].items()} == {
            **{(layer, "backward", op): 1 for layer, op in bops.items()}, ("4A", "forward", "all_gather"): 1}, bwd[True]
