"""Generation: prefill + decode equals the full forward (TP 1 and 2), constant cache size, sampling, stop tokens,
graph-replayed decode (CUDA graph on GPU, a recorded-op replay on CPU), the KV-length-bucketed static decode of
softmax ("A") layers, the bf16 decode accuracy guard."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tests.distributed import run_distributed
from tests.megatron_based.helpers import bf16_model_and_fp64_reference, in_process_group

VOCAB = 100


def _model(tp: int, pattern: str, *, hidden: int, heads: int, feature_dim: int, window: int, seed: int = 0,
           fused: bool | None = None, mlp: bool = True):
    """``fused=False``: without Megatron's torch.compile'd fusions (GPU default), whose generated kernels the
    recorded replay cannot see (it records ATen ops)."""
    from megatron_based.model.config import BasedConfig
    from megatron_based.model import build_model

    torch.manual_seed(seed)  # same seed on every rank: Megatron's CPU init slices one master weight
    config = BasedConfig(layer_pattern=pattern, hidden_size=hidden, num_attention_heads=heads,
                         feature_dim=feature_dim, swa_window=window, tensor_model_parallel_size=tp,
                         use_cpu_initialization=True,
                         **({} if fused is None else dict(bias_activation_fusion=fused, bias_dropout_fusion=fused)))
    return build_model(config, vocab_size=VOCAB, max_sequence_length=512, mlp=mlp).eval()


def _full_logits(model, tokens):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    b, T = tokens.shape
    with torch.no_grad():
        logits = model(tokens, torch.arange(T).expand(b, T), attention_mask=None)
    return gather_from_tensor_model_parallel_region(logits)[..., :VOCAB].float()


def _teacher_forced_error(gen, tokens, prompt_lengths, full, **prefill_kw):
    """Prefill each row's first P tokens, decode the rest with the true tokens; max |logit - full forward|."""
    prompts = [tokens[i, :P] for i, P in enumerate(prompt_lengths)] if not prefill_kw else prefill_kw.pop("prompts")
    logits = gen.prefill(prompts, **prefill_kw)
    err = max((logits[i] - full[i, P - 1]).abs().max().item() for i, P in enumerate(prompt_lengths))
    T = tokens.shape[1]
    for t in range(T - min(prompt_lengths) - 1):
        feed = torch.stack([tokens[i, min(P + t, T - 1)] for i, P in enumerate(prompt_lengths)])
        logits = gen.step(feed)
        for i, P in enumerate(prompt_lengths):
            if P + t + 1 < T:
                err = max(err, (logits[i] - full[i, P + t]).abs().max().item())
    return err


CASES = {
    # 3 layers (C, L, S). Prompt lengths cross the conv length 3 and the window: with window 6 decoding runs far
    # past the ring of 7 rows; with the released window 128 the prompts end around 129.
    "CLS-w6": (dict(pattern="CLS", hidden=64, heads=4, feature_dim=4, window=6), 16, [2, 3, 4, 6, 7, 8]),
    "CLS-w128": (dict(pattern="CLS", hidden=64, heads=4, feature_dim=4, window=128), 134, [2, 128, 129, 130]),
    # Hybrids with softmax attention ("A", KV cache): ragged prompts (masked) and equal ones (unmasked SDPA).
    "CLSA": (dict(pattern="CLSA", hidden=64, heads=4, feature_dim=4, window=6), 16, [2, 7, 9]),
    "LA-equal": (dict(pattern="LA", hidden=64, heads=4, feature_dim=4, window=6), 12, [5, 5]),
    # Layers without an MLP (MQAR's models: build_model(mlp=False))
    "CLSA-no-MLP": (dict(pattern="CLSA", hidden=64, heads=4, feature_dim=4, window=6, mlp=False), 16, [2, 7, 9]),
    # configs/tiny.yaml's model (CLSC, d 128, 4 heads, f 8, window 32).
    "tiny": (dict(pattern="CLSC", hidden=128, heads=4, feature_dim=8, window=32), 37, [2, 4, 33, 34]),
}


def _prefill_decode_worker(rank, world):
    from megatron_based.inference.generation import Generator
    from megatron_based.runtime.parallel import initialize_parallel

    initialize_parallel(world)
    errors = {}
    for case, (kw, T, Ps) in CASES.items():
        model = _model(world, **kw)
        torch.manual_seed(1)
        tokens = torch.randint(0, VOCAB, (len(Ps), T))
        full = _full_logits(model, tokens)
        gen = Generator(model, vocab_size=VOCAB, max_length=2 * T)
        if case == "CLS-w128":  # prefill boundaries only: decode the 129-prompt rows a few steps
            tokens, Ps, full = tokens[1:], Ps[1:], full[1:]
        errors[case] = (_teacher_forced_error(gen, tokens, Ps, full), full.abs().max().item())
        if case == "tiny":  # the same prompts as a left-padded [b, s] tensor with lengths
            s = max(Ps)
            padded = torch.full((len(Ps), s), VOCAB - 1)
            for i, P in enumerate(Ps):
                padded[i, s - P:] = tokens[i, :P]
            err = _teacher_forced_error(gen, tokens, Ps, full, prompts=padded, lengths=Ps, padding_side="left")
            errors["tiny left-padded"] = (err, full.abs().max().item())
    return errors


@pytest.mark.parametrize("world", [1, 2])
def test_prefill_then_decode_equals_full_forward(world):
    for errors in run_distributed(_prefill_decode_worker, world):
        assert set(errors) == {*CASES, "tiny left-padded"}
        for name, (err, scale) in errors.items():
            assert scale > 0.1, name
            assert err < 2e-5 * max(1.0, scale), (name, err)


def _cache_worker(rank, world):
    from based_kernels.taylor_attention.ops import STEP_BUFFER
    from megatron_based.inference.generation import Generator
    from megatron_based.runtime.parallel import initialize_parallel

    initialize_parallel(world)
    hidden, heads, f, window, k = 64, 4, 4, 16, 3
    model = _model(world, "CLSC", hidden=hidden, heads=heads, feature_dim=f, window=window)
    gen = Generator(model, vocab_size=VOCAB)
    results = []
    for prompt_len in (5, 60):
        gen.prefill(torch.randint(0, VOCAB, (3, prompt_len)), lengths=[prompt_len] * 3)
        before = [(name, tuple(t.shape), t.data_ptr()) for c in gen.caches for name, t in c.items()]
        bytes_before = gen.cache_bytes()
        for _ in range(20):
            gen.step(torch.randint(0, VOCAB, (3,)))
        after = [(name, tuple(t.shape), t.data_ptr()) for c in gen.caches for name, t in c.items()]
        results.append((before == after, bytes_before, gen.cache_bytes()))
    h, dh = heads // world, hidden // heads
    D = 1 + f + f * (f + 1) // 2  # the symmetric Taylor map
    per_seq = (h * D * (dh + 1) * 4  # L: S and z, fp32
               + h * (STEP_BUFFER * (f + dh) * 4 + 4)  # L: the decode buffer (fp32 model) and its int32 count
               + 2 * (window + 1) * h * dh * 4  # S: K and V ring of window + 1 rows
               + 2 * (k - 1) * (2 * hidden // world) * 4)  # two C layers: last k - 1 inputs u1
    return results, 3 * per_seq


@pytest.mark.parametrize("world", [1, 2])
def test_cache_size_is_constant_in_generated_length(world):
    for results, expected in run_distributed(_cache_worker, world):
        for same_buffers, before, after in results:
            assert same_buffers
            assert before == after == expected


def _generate_worker(rank, world):
    from megatron_based.inference.generation import Generator
    from megatron_based.runtime.parallel import initialize_parallel

    initialize_parallel(world)
    model = _model(world, "CLS", hidden=32, heads=2, feature_dim=4, window=4)
    gen = Generator(model, vocab_size=VOCAB)
    torch.manual_seed(3)
    prompts = [torch.randint(0, VOCAB, (n,)).tolist() for n in (3, 7)]
    streamed = []
    greedy = gen.generate(prompts, 12, on_token=lambda step, toks, done: streamed.append(list(toks)))
    # Greedy decoding must equal re-running the full forward on the growing sequence.
    reference = []
    for p in prompts:
        seq = list(p)
        for _ in range(12):
            seq.append(int(_full_logits(model, torch.tensor([seq]))[0, -1].argmax()))
        reference.append(seq[len(p):])
    stop = greedy[0][4]
    stopped = gen.generate(prompts, 12, stop_tokens=[stop])
    sampled = [gen.generate(prompts, 6, temperature=1.0, top_k=5, seed=s) for s in (7, 7, 8)]
    return greedy, reference, streamed, stop, stopped, sampled


@pytest.mark.parametrize("world", [1, 2])
def test_generate_greedy_stop_tokens_streaming(world):
    results = run_distributed(_generate_worker, world)
    for greedy, reference, streamed, stop, stopped, sampled in results:
        assert greedy == reference
        assert [[s[i] for s in streamed] for i in range(2)] == greedy
        first = greedy[0].index(stop)
        assert stopped[0] == greedy[0][: first + 1]
        assert stopped[1] == (greedy[1][: greedy[1].index(stop) + 1] if stop in greedy[1] else greedy[1])
        assert sampled[0] == sampled[1] and sampled[0] != sampled[2]  # seeded
    assert all(r[5] == results[0][5] for r in results)  # every TP rank sampled the same tokens


def test_sampling_distributions():
    from megatron_based.inference.generation import sample

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(40000, 1)
    g = torch.Generator().manual_seed(0)

    def freqs(**kw):
        return torch.bincount(sample(logits, generator=g, **kw), minlength=4).double() / logits.shape[0]

    assert sample(logits[:2], temperature=0.0).tolist() == [0, 0]
    torch.testing.assert_close(freqs(temperature=1.0), torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64),
                               atol=0.01, rtol=0)
    p2 = torch.tensor([0.5, 0.3, 0.15, 0.05]) ** 2  # temperature 0.5 squares the probabilities
    torch.testing.assert_close(freqs(temperature=0.5), (p2 / p2.sum()).double(), atol=0.01, rtol=0)
    torch.testing.assert_close(freqs(temperature=1.0, top_k=2), torch.tensor([0.625, 0.375, 0, 0]).double(),
                               atol=0.01, rtol=0)
    # top_p 0.7: {0.5, 0.3} is the smallest set reaching 0.7.
    torch.testing.assert_close(freqs(temperature=1.0, top_p=0.7), torch.tensor([0.625, 0.375, 0, 0]).double(),
                               atol=0.01, rtol=0)
    assert freqs(temperature=1.0, top_p=0.4).tolist() == [1.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="top_p"):
        sample(logits, temperature=1.0, top_p=0.0)


def test_pack_prompts_and_errors():
    from megatron_based.inference.generation import pack_prompts

    padded = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 1]])
    left = pack_prompts(padded, lengths=[2, 4], padding_side="left")
    right = pack_prompts(torch.tensor([[5, 6, 0, 0], [7, 8, 9, 1]]), lengths=[2, 4], padding_side="right")
    for packed in (left, right):
        assert packed.tokens.tolist() == [[5, 6, 7, 8, 9, 1]]
        assert packed.cu_seqlens.tolist() == [0, 2, 6]
        assert packed.positions.tolist() == [0, 1, 0, 1, 2, 3]
        assert packed.doc_ids.tolist() == [0, 0, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        pack_prompts([[1], []])
    assert pack_prompts(padded).cu_seqlens.tolist() == [0, 4, 8]  # no lengths: no padding
    with pytest.raises(ValueError, match="padding_side"):
        pack_prompts(padded, lengths=[2, 4], padding_side="middle")



# -- graph-replayed decode -------------------------------------------------------------------------------------
# A CUDA graph replays the kernels recorded at capture on the recorded buffers: Python code of the step runs once.
# A step that rebinds a cache entry, keeps a position in a Python int or reads a value back to the host decodes
# correctly eagerly and wrongly (or not at all) under a graph. _RecordedStep gives the same semantics on the CPU:
# it records every ATen op of one step call with its argument and output tensors, and a replay re-runs those ops
# on the same tensors, writing each result into the recorded output's storage.

_HOST_SYNC = {"aten::item", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::nonzero", "aten::masked_select",
              "aten::equal", "aten::unique", "aten::_unique2"}


def _boolean_index_syncs(func, args, kwargs) -> bool:
    """Indexing with a boolean mask reads the mask's count of True back to the host, except ``x[mask] = scalar``:
    ATen's ``index_put_`` runs that as ``masked_fill_`` when the only index is one bool / uint8 mask on ``x``'s
    device and the value is one element on the CPU (``canDispatchToMaskedFill``), e.g. Megatron's vocab-parallel
    embedding at TP > 1."""
    name = func._schema.name
    if name not in ("aten::index.Tensor", "aten::index_put_", "aten::index_put"):
        return False
    masks = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.dtype == torch.bool]
    if not masks:
        return False
    if name == "aten::index.Tensor":
        return True
    self, indices, value = args[:3]
    given = [i for i in indices if i is not None]
    return not (len(given) == 1 and given[0].dtype in (torch.bool, torch.uint8) and given[0].device == self.device
                and value.numel() == 1 and value.device.type == "cpu")


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func._schema.name in _HOST_SYNC or _boolean_index_syncs(func, args, kwargs):
            raise RuntimeError(f"host sync inside the captured step: {func}")
        out = func(*args, **kwargs)
        reads_tensor = any(isinstance(t, torch.Tensor) for t in tree_flatten((args, kwargs))[0])
        # a Python number computed from a tensor is a read-back (ops on dtypes alone, e.g. promote_types, are not)
        if reads_tensor and any(isinstance(x, (bool, int, float)) for x in tree_flatten(out)[0]):
            raise RuntimeError(f"host sync inside the captured step: {func} returned a Python number")
        self.ops.append((func, args, kwargs, out))
        return out


class _RecordedStep:
    """CPU stand-in for ``torch.cuda.CUDAGraph``: ``replay()`` re-runs the recorded ops on the recorded tensors."""

    def __init__(self, ops):
        self.ops = ops

    def replay(self):
        for func, args, kwargs, out in self.ops:
            result = func(*args, **kwargs)
            for old, new in zip(tree_flatten(out)[0], tree_flatten(result)[0]):
                if isinstance(old, torch.Tensor) and new.data_ptr() != old.data_ptr():
                    old.copy_(new)  # a fresh result: into the buffer the later recorded ops read
                elif hasattr(new, "wait"):  # a collective's Work (TP > 1): the eager call waited on it outside ATen,
                    new.wait()  # as a captured NCCL kernel is ordered on the graph's stream


def _recorded_generator(model, **kw):
    """A Generator whose decode step is captured by _RecordedStep instead of a CUDA graph."""
    from megatron_based.inference.generation import Generator

    class RecordedGenerator(Generator):
        def _capture(self, step):
            with _Recorder() as rec:
                out = step()
            self.recorded_ops = len(rec.ops)
            return _RecordedStep(rec.ops), out

    gen = RecordedGenerator(model, **kw)
    gen.cuda_graph = True
    return gen


def _graphs_use_every_cache(gen) -> bool:
    """Whether the recorded steps of ``gen`` (every KV bucket's) read or write each cache tensor the generator holds
    (nothing was rebound after capture)."""
    touched = {t.data_ptr() for graph, _ in gen._graphs.values() for op in graph.ops
               for t in tree_flatten(op[1:3])[0] if isinstance(t, torch.Tensor)}
    return all(t.data_ptr() in touched for c in gen.caches for t in c.values())


def _recorded_decode_worker(rank, world):
    from megatron_based.inference.generation import Generator, at_decode_positions, teacher_forced_logits
    from megatron_based.runtime.parallel import initialize_parallel

    initialize_parallel(world)
    results = {}
    for case, T, Ps in (("CLS-w6", 24, [2, 3, 7, 8]), ("tiny", 72, [2, 4, 33, 34])):
        kw = CASES[case][0]
        model = _model(world, **kw)
        torch.manual_seed(1)
        tokens = torch.randint(0, VOCAB, (len(Ps), T))
        steps = T - max(Ps) + 1
        want = at_decode_positions(_full_logits(model, tokens), Ps, steps)
        gen = _recorded_generator(model, vocab_size=VOCAB)
        errs, caches_recorded = [], []
        for _ in range(2):  # a second prefill of the batch size zeroes the caches in place, keeps the graph
            got = teacher_forced_logits(gen, tokens, Ps, steps)
            errs.append((got - want).abs().max().item())
            caches_recorded.append(_graphs_use_every_cache(gen))
        greedy = Generator(model, vocab_size=VOCAB).generate([tokens[0, :3], tokens[1, :5]], 12)
        recorded = gen.generate([tokens[0, :3], tokens[1, :5]], 12)
        results[case] = (errs, want.abs().max().item(), gen.recorded_ops, greedy == recorded, steps,
                         caches_recorded)
    return results


def test_recorded_graph_decode_equals_full_forward():
    """The decode step replayed like a CUDA graph (Python runs once, at capture) equals the full forward."""
    results = run_distributed(_recorded_decode_worker, 1)[0]
    for case, (errs, scale, n_ops, greedy_equal, steps, caches_recorded) in results.items():
        assert steps > 8 and n_ops > 100, case  # decoding runs well past the SWA ring / conv state
        assert all(caches_recorded), case
        assert scale > 0.1 and max(errs) < 2e-5 * max(1.0, scale), (case, errs)
        assert greedy_equal, case


def _broken_step_worker(rank, world, bug):
    from megatron_based.inference.generation import Generator, at_decode_positions, teacher_forced_logits
    from megatron_based.model.mixers import SlidingWindowAttention, TaylorLinearAttention
    from megatron_based.runtime.parallel import initialize_parallel

    initialize_parallel(world)
    if bug == "rebind":  # the out-of-place step's new state stored by rebinding the dict entry
        def step(self, hidden_states, cache, positions=None, **_):
            q, k, v = (t[0] for t in self.project_qkv(hidden_states))
            import based_kernels

            y, (cache["S"], cache["z"]) = based_kernels.taylor_linear_attention_step(q, k, v, (cache["S"], cache["z"]))
            return self.linear_proj(y.reshape(1, y.shape[0], self.heads * self.head_dim))

        TaylorLinearAttention.step = step
    else:  # positions read back to the host: .tolist() is not an ATen op, so the replay is what notices
        original = SlidingWindowAttention.step
        to_host = (lambda p: p.tolist()) if bug == "host_list" else (lambda p: [int(x) for x in p])
        SlidingWindowAttention.step = lambda self, x, cache, positions, **kw: original(
            self, x, cache, torch.tensor(to_host(positions)), **kw)
    kw, T, Ps = CASES["CLS-w6"]
    model = _model(world, **kw)
    tokens = torch.randint(0, VOCAB, (len(Ps), T))
    steps = T - max(Ps) + 1
    want = at_decode_positions(_full_logits(model, tokens), Ps, steps)
    eager = (teacher_forced_logits(Generator(model, vocab_size=VOCAB), tokens, Ps, steps) - want).abs().max().item()
    try:
        got = teacher_forced_logits(_recorded_generator(model, vocab_size=VOCAB), tokens, Ps, steps)
    except RuntimeError as e:
        return eager, str(e)
    return eager, (got - want).abs().max().item()


@pytest.mark.parametrize("bug", ["rebind", "host_list", "host_int"])
def test_recorded_graph_catches_graph_unsafe_steps(bug):
    """The replay check fails on the bugs a CUDA graph suffers from, while eager decoding stays correct."""
    eager, result = run_distributed(_broken_step_worker, 1, bug)[0]
    assert eager < 2e-5
    if bug == "host_int":
        assert "host sync inside the captured step" in result
    else:
        assert isinstance(result, float) and result > 1e-2, result


# -- static decode of softmax attention: one fixed-shape step per KV-length bucket ------------------------------
# (model, T, prompt lengths, padding side of a [b, s] prompt tensor (None: a list of prompts), kv_buckets,
# max_length). Teacher-forced decoding runs the longest prompt up to position T - 1, across bucket boundaries.
STATIC_CASES = {
    "GPT right-padded": (dict(pattern="AAA", hidden=64, heads=4, feature_dim=4, window=6), 30, [2, 5, 3], "right",
                         [4, 8, 12, 20], 40),
    "LSAC left-padded": (dict(pattern="LSAC", hidden=64, heads=4, feature_dim=4, window=6), 34, [3, 9, 1, 6, 13],
                         "left", [16, 24], 36),
    # equal prompts: the dynamic step attends unmasked over the rows written so far (kv_length), the static one masked
    "LA equal": (dict(pattern="LA", hidden=64, heads=4, feature_dim=4, window=6), 20, [6, 6, 6], None, [8, 16], 24),
}


def _padded(tokens, Ps, side):
    """Row i's first ``Ps[i]`` tokens in a ``[b, max(Ps)]`` tensor padded on ``side`` with a real token (it must not
    reach a cache)."""
    s = max(Ps)
    padded = torch.full((len(Ps), s), VOCAB - 1)
    for i, P in enumerate(Ps):
        if side == "left":
            padded[i, s - P:] = tokens[i, :P]
        else:
            padded[i, :P] = tokens[i, :P]
    return padded


def _teacher_forced(gen, tokens, Ps, steps, side):
    """teacher_forced_logits with the prompts given padded on ``side`` (or as a list); also the KV bucket of each
    step (what the generator's bucket choice returned)."""
    from megatron_based.inference.generation import teacher_forced_logits

    used, choose = [], gen.kv_bucket
    gen.kv_bucket = lambda: used.append(choose()) or used[-1]
    if side is None:
        return teacher_forced_logits(gen, tokens, Ps, steps), used
    out = [gen.prefill(_padded(tokens, Ps, side), lengths=Ps, padding_side=side)]
    rows = torch.arange(len(Ps))
    for j in range(steps - 1):
        out.append(gen.step(tokens[rows, torch.tensor(Ps) + j]))
    return torch.stack(out, dim=1), used


def _static_decode_worker(rank, world):
    from megatron_based.inference.generation import Generator, at_decode_positions
    from megatron_based.runtime.parallel import initialize_parallel

    initialize_parallel(world)
    results = {}
    for case, (kw, T, Ps, side, buckets, max_length) in STATIC_CASES.items():
        model = _model(world, **kw)
        torch.manual_seed(1)
        tokens = torch.randint(0, VOCAB, (len(Ps), T))
        steps = T - max(Ps) + 1
        full = at_decode_positions(_full_logits(model, tokens), Ps, steps)
        dynamic, _ = _teacher_forced(Generator(model, vocab_size=VOCAB, max_length=max_length), tokens, Ps, steps,
                                     side)
        static_gen = Generator(model, vocab_size=VOCAB, max_length=max_length, static_decode=True, kv_buckets=buckets)
        static, used = _teacher_forced(static_gen, tokens, Ps, steps, side)
        recorded_gen = _recorded_generator(model, vocab_size=VOCAB, max_length=max_length, kv_buckets=buckets)
        recorded, _ = _teacher_forced(recorded_gen, tokens, Ps, steps, side)
        caches_recorded = _graphs_use_every_cache(recorded_gen)
        # the longest key sequence each bucket's step attends over (an S layer's ring is shorter)
        key_lengths = {bucket: max(op[1][1].shape[-2] for op in graph.ops
                                   if op[0]._schema.name == "aten::scaled_dot_product_attention")
                       for bucket, (graph, _) in recorded_gen._graphs.items()}
        err = lambda a, b: (a - b).abs().max().item()  # noqa: E731
        results[case] = dict(scale=full.abs().max().item(), dynamic_vs_full=err(dynamic, full),
                             static_vs_dynamic=err(static, dynamic), static_vs_full=err(static, full),
                             recorded_vs_static=err(recorded, static), used=used,
                             captured=sorted(static_gen._graphs), recorded_captured=sorted(recorded_gen._graphs),
                             caches_recorded=caches_recorded, key_lengths=key_lengths)
    return results


@pytest.mark.parametrize("world", [1, 2])
def test_static_bucketed_decode_equals_dynamic_and_full_forward(world):
    """Decode of "A" layers through the fixed-shape step the CUDA graphs capture (run eagerly, and replayed like a
    graph on CPU) equals the dynamic decode and the full forward: GPT and hybrids, odd batches, ragged prompts
    padded left and right, decode across KV-bucket boundaries, TP 1 and 2."""
    for results in run_distributed(_static_decode_worker, world):
        assert set(results) == set(STATIC_CASES)
        for case, r in results.items():
            kw, T, Ps, side, buckets, max_length = STATIC_CASES[case]
            # the smallest bucket above the longest sequence's position, for positions max(P) ... T - 1
            want = [min(b for b in [*buckets, max_length] if b > p) for p in range(max(Ps), T)]
            assert r["used"] == want and len(set(want)) >= 3, (case, r["used"])
            assert r["captured"] == r["recorded_captured"] == sorted({*buckets, max_length}), case
            assert r["caches_recorded"], case
            assert r["key_lengths"] == {b: b for b in r["captured"]}, (case, r["key_lengths"])
            scale = r["scale"]
            assert scale > 0.1, case
            assert r["dynamic_vs_full"] < 2e-5 * max(1.0, scale), (case, r)
            assert r["static_vs_full"] < 2e-5 * max(1.0, scale), (case, r)
            # fp32, the same cache rows: masked keys add exact zeros, only the summation length differs
            assert r["static_vs_dynamic"] < 2e-6 * max(1.0, scale), (case, r)
            assert r["recorded_vs_static"] < 1e-6 * max(1.0, scale), (case, r)


def _broken_softmax_worker(rank, world, bug):
    from megatron_based.inference.generation import Generator, at_decode_positions, teacher_forced_logits
    from megatron_based.model.mixers import SoftmaxAttention
    from megatron_based.runtime.parallel import initialize_parallel

    initialize_parallel(world)
    if bug == "bucket_below":  # a bucket one below the right one: the newest keys are cut off
        choose = Generator.kv_bucket

        def kv_bucket(self):
            b = choose(self)
            return max([x for x in self.kv_buckets if x < b], default=b)

        Generator.kv_bucket = kv_bucket
    else:  # positions read back to the host: eagerly right, a replay keeps the capture's positions (and mask)
        original = SoftmaxAttention.step
        SoftmaxAttention.step = lambda self, x, cache, positions, **kw: original(
            self, x, cache, torch.tensor(positions.tolist()), **kw)
    kw, T, Ps, side, buckets, max_length = STATIC_CASES["GPT right-padded"]
    model = _model(world, **kw)
    tokens = torch.randint(0, VOCAB, (len(Ps), T))
    steps = T - max(Ps) + 1
    want = at_decode_positions(_full_logits(model, tokens), Ps, steps)
    kw = dict(vocab_size=VOCAB, max_length=max_length, kv_buckets=buckets)
    return {name: (teacher_forced_logits(gen, tokens, Ps, steps) - want).abs().max().item() for name, gen in (
        ("dynamic", Generator(model, **kw)), ("static", Generator(model, static_decode=True, **kw)),
        ("recorded", _recorded_generator(model, **kw)))}


@pytest.mark.parametrize("bug", ["bucket_below", "host_positions"])
def test_static_decode_checks_catch_softmax_bugs(bug):
    """The checks above fail on a wrong bucket choice (static and replayed decode wrong) and on positions taken to
    the host (replayed decode wrong), while the dynamic decode stays right."""
    errs = run_distributed(_broken_softmax_worker, 1, bug)[0]
    assert errs["dynamic"] < 2e-5, errs
    assert errs["recorded"] > 1e-2, errs
    assert (errs["static"] > 1e-2) if bug == "bucket_below" else (errs["static"] < 2e-5), errs


def _arguments_worker(rank, world):
    from megatron_based.inference.generation import Generator

    from megatron_based.runtime.parallel import initialize_parallel

    initialize_parallel(world)
    gpt = _model(1, "AA", hidden=32, heads=2, feature_dim=4, window=4)
    out = [Generator(gpt, max_length=20, static_decode=True, kv_buckets=[12, 4]).kv_buckets,
           Generator(gpt, max_length=600, static_decode=True).kv_buckets,
           Generator(_model(1, "CL", hidden=32, heads=2, feature_dim=4, window=4), static_decode=True).kv_buckets]
    for kw in (dict(static_decode=True), dict(max_length=20, static_decode=True, kv_buckets=[8, 32])):
        try:
            Generator(gpt, **kw)
            out.append(None)
        except ValueError as e:
            out.append(str(e))
    return out


def test_kv_length_buckets_and_arguments():
    from megatron_based.inference.generation import kv_length_buckets

    assert kv_length_buckets(1152) == [256, 512, 768, 1024, 1152]
    assert kv_length_buckets(100) == [100] and kv_length_buckets(256) == [256]
    big = kv_length_buckets(32768)
    assert big[:16] == list(range(256, 4097, 256)) and big[16:24] == list(range(4608, 8193, 512))
    assert big[-8:] == list(range(18432, 32769, 2048)) and len(big) == 40
    assert kv_length_buckets(40, granularity=4, per_octave=2) == [4, 8, 12, 16, 24, 32, 40]
    with pytest.raises(ValueError, match="max_length"):
        kv_length_buckets(0)
    given, default, no_attention, no_max_length, outside = run_distributed(_arguments_worker, 1)[0]
    assert given == [4, 12, 20] and default == [256, 512, 600] and no_attention == [None]
    assert "need max_length" in no_max_length
    assert "kv_buckets must be KV lengths in 1 ... max_length (20)" in outside


# -- bf16 accuracy guard (benchmarks/generation.py) ------------------------------------------------------------
def _bf16_guard_worker(rank, world, step_buffer=None, read_copy=None):
    from based_kernels.taylor_attention import ops
    from megatron_based.inference.generation import (Generator, at_decode_positions, decode_error_report,
                                                     teacher_forced_logits)
    from megatron_based.runtime.parallel import initialize_parallel

    initialize_parallel(world)
    ops.STEP_BUFFER = ops.STEP_BUFFER if step_buffer is None else step_buffer
    ops.STEP_READ_COPY = ops.STEP_READ_COPY if read_copy is None else read_copy
    model, reference = bf16_model_and_fp64_reference("CLSCLS", VOCAB)
    tokens = torch.randint(0, VOCAB, (3, 24))
    Ps, steps = [4, 9, 12], 12
    full = at_decode_positions(_full_logits(model, tokens), Ps, steps)
    with torch.no_grad():
        ref = reference(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), attention_mask=None)[..., :VOCAB]
    ref = at_decode_positions(ref, Ps, steps)
    gen = Generator(model, vocab_size=VOCAB)
    good = decode_error_report(teacher_forced_logits(gen, tokens, Ps, steps), full, ref)
    wrong = tokens.clone()
    wrong[:, 14] = (wrong[:, 14] + 1) % VOCAB  # a decode that is fed one wrong token: a real decode error
    bad_logits = teacher_forced_logits(gen, wrong, Ps, steps)
    bad = decode_error_report(bad_logits, full, ref)
    caches = {key for cache in gen.caches for key in cache}
    return good, bad, full.dtype, ref.dtype, caches


@pytest.mark.parametrize("step_buffer, read_copy", [(None, None), (3, True), (3, False)])
def test_bf16_decode_guard(step_buffer, read_copy):
    """bf16 decode vs an fp64 full forward of the same weights is within 2x of the bf16 full forward's own error;
    a decode that went wrong is not. The Taylor layers' decode buffer as configured (16 tokens: no fold in these 12
    steps; the bf16 read copy of the state's quadratic rows as configured: off), and with a fold every 4 tokens, with
    and without the read copy."""
    good, bad, full_dtype, ref_dtype, caches = run_distributed(_bf16_guard_worker, 1, step_buffer, read_copy)[0]
    from based_kernels.taylor_attention import ops
    assert ("sq" in caches) == (ops.STEP_READ_COPY if read_copy is None else read_copy)
    assert (full_dtype, ref_dtype) == (torch.float32, torch.float64)  # logits: bf16 model's as fp32
    assert 1e-4 < good["full_forward_rel_rms"] < 0.05  # bf16 rounding, measured against fp64
    assert good["passed"] and good["decode_rel_rms"] <= 2 * good["full_forward_rel_rms"], good
    assert not bad["passed"] and bad["decode_rel_rms"] > 5 * bad["full_forward_rel_rms"], bad


# -- GPU --------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("graph", ["cuda", "recorded"])
def test_cuda_graph_decode_equals_eager(graph, monkeypatch):
    """fp32 on the GPU (Triton kernels, tf32 dots): CUDA-graph decode equals eager decode (greedy tokens, and
    teacher-forced logits), both match the full forward; a second batch of another size re-captures. "recorded"
    runs the CPU replay check on the GPU, on the PyTorch path of the mixers (the replay re-runs recorded ATen ops;
    Triton kernels launched outside a custom op are invisible to it), to tell a Python-level bug from a
    CUDA-level one."""
    import based_kernels
    from megatron_based.inference.generation import Generator, at_decode_positions, teacher_forced_logits

    backend = based_kernels.use_backend("torch" if graph == "recorded" else None)
    with backend, in_process_group(monkeypatch):
        model = _model(1, "CLSC", hidden=128, heads=4, feature_dim=8, window=8,
                       fused=None if graph == "cuda" else False).cuda()
        make = (lambda: Generator(model, vocab_size=VOCAB, cuda_graph=True)) if graph == "cuda" else (
            lambda: _recorded_generator(model, vocab_size=VOCAB))
        prompts = [list(range(1, 1 + n)) for n in (3, 12, 9)]
        eager = Generator(model, vocab_size=VOCAB)
        graphed = make()
        assert graphed.generate(prompts, 20) == eager.generate(prompts, 20)
        assert graphed.generate(prompts[:2], 20) == eager.generate(prompts[:2], 20)  # re-captured for batch 2

        torch.manual_seed(1)
        tokens = torch.randint(0, VOCAB, (3, 40), device="cuda")
        Ps, steps = [3, 12, 9], 28
        want = at_decode_positions(_full_logits(model, tokens), Ps, steps)
        got_eager = teacher_forced_logits(eager, tokens, Ps, steps)
        got_graph = teacher_forced_logits(graphed, tokens, Ps, steps)
        scale = want.abs().max().item()
        graph_vs_eager = (got_graph - got_eager).abs().max().item() / scale
        graph_vs_full = (got_graph - want).abs().max().item() / scale
        print(f"{graph}: graph vs eager {graph_vs_eager:.2e}, graph vs full forward {graph_vs_full:.2e} (relative)")
        assert graph_vs_eager < 1e-5 and graph_vs_full < 2e-3


@pytest.mark.gpu
@pytest.mark.parametrize("graph, pattern", [("cuda", "AAAA"), ("cuda", "CLSA"), ("recorded", "AAAA")])
def test_cuda_graph_softmax_decode_equals_eager(graph, pattern, monkeypatch):
    """A GPT ("A" layers, KV cache) and a hybrid, fp32 on the GPU: decode through one CUDA graph per KV-length
    bucket (buckets 8, 16, 24, 32 and max_length 48, all captured at the prefill) equals eager decode, dynamic and
    static, in greedy tokens and teacher-forced logits across three bucket boundaries, and both match the full
    forward; a batch of another size re-captures. "recorded": the CPU replay check on the GPU's ops, as in
    test_cuda_graph_decode_equals_eager (on CPU, test_static_bucketed_decode_equals_dynamic_and_full_forward)."""
    import based_kernels
    from megatron_based.inference.generation import Generator, at_decode_positions, teacher_forced_logits

    backend = based_kernels.use_backend("torch" if graph == "recorded" else None)
    with backend, in_process_group(monkeypatch):
        model = _model(1, pattern, hidden=128, heads=4, feature_dim=8, window=8,
                       fused=None if graph == "cuda" else False).cuda()
        kw = dict(vocab_size=VOCAB, max_length=48, kv_buckets=[8, 16, 24, 32])
        graphed = Generator(model, cuda_graph=True, **kw) if graph == "cuda" else _recorded_generator(model, **kw)
        eager, static = Generator(model, **kw), Generator(model, static_decode=True, **kw)
        prompts = [list(range(1, 1 + n)) for n in (3, 12, 9)]
        assert graphed.generate(prompts, 20) == eager.generate(prompts, 20)  # positions up to 30: buckets 16 ... 48
        assert sorted(graphed._graphs) == [8, 16, 24, 32, 48]
        assert graph != "cuda" or graphed._graph_pool is not None  # one pool for the batch size's graphs
        assert graphed.generate(prompts[:2], 20) == eager.generate(prompts[:2], 20)  # re-captured for batch 2

        torch.manual_seed(1)
        tokens = torch.randint(0, VOCAB, (3, 40), device="cuda")
        Ps, steps = [3, 12, 9], 29  # the longest sequence decodes positions 12 ... 39: buckets 16, 24, 32, 48
        want = at_decode_positions(_full_logits(model, tokens), Ps, steps)
        got_eager = teacher_forced_logits(eager, tokens, Ps, steps)
        got_static = teacher_forced_logits(static, tokens, Ps, steps)
        got_graph = teacher_forced_logits(graphed, tokens, Ps, steps)
        scale = want.abs().max().item()
        graph_vs_static = (got_graph - got_static).abs().max().item() / scale
        graph_vs_eager = (got_graph - got_eager).abs().max().item() / scale
        graph_vs_full = (got_graph - want).abs().max().item() / scale
        print(f"{graph} {pattern}: graph vs static eager {graph_vs_static:.2e}, vs dynamic eager "
              f"{graph_vs_eager:.2e}, vs full forward {graph_vs_full:.2e} (relative)")
        assert graph_vs_static < 1e-5 and graph_vs_eager < 1e-5 and graph_vs_full < 2e-3


def _queued_worker(rank, world):
    from megatron_based.inference.generation import Generator, sample
    from megatron_based.runtime.parallel import initialize_parallel

    initialize_parallel(world)
    model = _model(world, "CLSA", hidden=32, heads=2, feature_dim=4, window=4)
    prompts = [[5, 9, 2], [7, 1, 4, 4, 8]]

    def plain(gen, n, stop=(), **kw):
        g = torch.Generator().manual_seed(3)
        logits, out, done = gen.prefill(prompts), [[], []], [False, False]
        for t in range(n):
            tokens = sample(logits, generator=g, **kw)
            for i, tok in enumerate(tokens.tolist()):
                if not done[i]:
                    out[i].append(tok)
                    done[i] = tok in stop
            if all(done) or t == n - 1:
                return out
            logits = gen.step(tokens)
        return out

    gen = Generator(model, vocab_size=VOCAB, max_length=5 + 8 - 1)
    kw = dict(temperature=1.0, top_k=20)
    want = plain(gen, 8, **kw)
    got = gen.generate(prompts, 8, seed=3, **kw)
    stop = want[0][2]
    stopped = gen.generate(prompts, 8, seed=3, stop_tokens=[stop], **kw), plain(gen, 8, stop=(stop,), **kw)
    try:
        Generator(model, vocab_size=VOCAB, max_length=5 + 8 - 2).generate(prompts, 8, seed=3, **kw)
        error = None
    except ValueError as e:
        error = str(e)
    return want, got, stopped, error


def test_generate_queues_the_next_step_and_keeps_its_results():
    """generate() queues step t+1 before it reads step t's tokens on the host: its outputs equal a plain
    sample-read-step loop's (sampled, ragged, with a stop token), and the max_length limit is where it was (a KV
    cache of P + N - 1 rows fits N new tokens; one row less raises the same error)."""
    want, got, (stopped, stopped_want), error = run_distributed(_queued_worker, 1)[0]
    assert got == want and stopped == stopped_want
    assert error is not None and "sequence longer than max_length" in error
