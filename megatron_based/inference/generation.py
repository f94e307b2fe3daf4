"""Constant-memory generation for BASED models: prefill with the parallel forms, then one token per step.

Every layer keeps a fixed-size cache per sequence (docs/generation.md):

- L (Taylor linear attention): the state ``S [heads, D, d_h]`` and ``z [heads, D]`` in fp32, D = 1 + f + f(f+1)/2,
  and the decode buffer of the last few tokens' keys and values, folded into the state when full;
- S (sliding-window attention): a ring buffer of the last ``window + 1`` post-RoPE K/V rows;
- C (BaseConv): the last ``k - 1`` inputs of the convolution;
- A (softmax attention, hybrids and the GPT baseline only): a KV cache of ``max_length`` rows.

Prompts of different lengths are packed into one sequence with document offsets (``cu_seqlens``) for the prefill,
so padding never reaches a state; decoding then runs every sequence at its own position. The model's own
Megatron modules (embedding, parallel linears, norms, MLPs, tied output layer) are driven layer by layer, so
tensor parallelism works as in training: each rank holds its heads' caches and samples the same tokens.
"""
from __future__ import annotations

import bisect
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

from ..runtime.noise import quiet_known_warnings
from .cli import generate_parser

if __name__ == "__main__":  # torchrun -m megatron_based.inference.generation: before torch and Megatron warn
    quiet_known_warnings("--verbose" in sys.argv)

import torch  # noqa: E402
from megatron.core import parallel_state  # noqa: E402
from megatron.core.transformer.identity_op import IdentityOp  # noqa: E402

from based_kernels.rms_norm.reference import residual_add  # noqa: E402

from ..model.config import ConfigError  # noqa: E402
from ..runtime.cli import bad_option, fail  # noqa: E402
from ..runtime.parallel import initialize_parallel, shutdown_parallel  # noqa: E402
from ..training.checkpointing import CheckpointError  # noqa: E402
from ..training.data import DataError, end_of_document, load_tokenizer  # noqa: E402
from .convert import ConversionError  # noqa: E402
from .loader import load_model  # noqa: E402

__all__ = ["PackedPrompts", "pack_prompts", "sample", "kv_length_buckets", "Generator", "teacher_forced_logits",
           "at_decode_positions", "decode_error_report", "continuation_text", "main"]


@dataclass
class PackedPrompts:
    """Prompts laid end to end: ``tokens [1, T]``, document offsets ``cu_seqlens [b + 1]`` (int32), each token's
    position in its prompt ``positions [T]`` and prompt index ``doc_ids [T]``, prompt ``lengths [b]``;
    ``equal_length``: the common prompt length when all are equal (known on the host), else None."""

    tokens: torch.Tensor
    cu_seqlens: torch.Tensor
    positions: torch.Tensor
    doc_ids: torch.Tensor
    lengths: torch.Tensor
    equal_length: int | None = None


def pack_prompts(prompts, lengths: Sequence[int] | None = None, padding_side: str = "right",
                 device=None) -> PackedPrompts:
    """Pack prompts given as a list of token lists / 1-D tensors, or as a ``[b, s]`` tensor: padded when
    ``lengths`` gives each row's number of tokens, on the ``padding_side`` ("right": tokens first, "left":
    padding first)."""
    if isinstance(prompts, torch.Tensor) and prompts.dim() == 2:
        if lengths is None:  # no padding
            lengths = [prompts.shape[1]] * prompts.shape[0]
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if len(lengths) != prompts.shape[0]:
            raise ValueError(f"lengths has {len(lengths)} entries for {prompts.shape[0]} prompt rows")
        s = prompts.shape[1]
        prompts = [row[:n] if padding_side == "right" else row[s - n:] for row, n in zip(prompts, lengths)]
    prompts = [torch.as_tensor(p, dtype=torch.long).reshape(-1) for p in prompts]
    if not prompts:
        raise ValueError("no prompts given")
    for i, p in enumerate(prompts):
        if p.numel() == 0:
            raise ValueError(f"prompt {i} is empty: give every prompt at least one token (e.g. BOS)")
    lens = torch.tensor([p.numel() for p in prompts])
    cu = torch.zeros(len(prompts) + 1, dtype=torch.int32)
    cu[1:] = lens.cumsum(0)
    doc_ids = torch.repeat_interleave(torch.arange(len(prompts)), lens)
    positions = torch.arange(int(cu[-1])) - cu[:-1].long()[doc_ids]
    equal = int(lens[0]) if bool((lens == lens[0]).all()) else None
    return PackedPrompts(*(t.to(device) for t in (torch.cat(prompts)[None], cu, positions, doc_ids, lens)), equal)


def sample(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens ``[b]`` from logits ``[b, V]``: greedy when ``temperature == 0``, else softmax(logits / T)
    restricted to the ``top_k`` most likely tokens (0: all) and to the smallest set whose probability reaches
    ``top_p`` (nucleus; 1.0: all)."""
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}")
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # the mass before this token already reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, -float("inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def _add(residual: torch.Tensor, out_bias) -> torch.Tensor:
    """Megatron's bias-dropout-add at inference: ``residual + (out + bias)`` in the residual's dtype
    (``based_kernels.rms_norm.reference.residual_add``: with ``fp32_residual_connection`` the bf16 sublayer output
    and bias are added in fp32, the sum stays fp32; without a bias one add kernel)."""
    return residual_add(residual, *out_bias)


def _add_norm(residual: torch.Tensor, out_bias, norm) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm(h), h)`` with ``h = _add(residual, out_bias)``: the residual add and the next sublayer's norm in one
    kernel where the norm has a fused form (``RMSNorm.residual_forward``), else the add, then the norm."""
    if hasattr(norm, "residual_forward"):
        return norm.residual_forward(residual, *out_bias)
    h = _add(residual, out_bias)
    return norm(h), h


def kv_length_buckets(max_length: int, granularity: int = 256, per_octave: int = 8) -> list[int]:
    """KV lengths of the static decode steps of softmax ("A") layers, ascending, the last ``max_length``: multiples
    of ``granularity`` up to ``granularity * per_octave * 2``, then ``per_octave`` per doubling (multiples of 512
    to 8192, of 1024 to 16384, ... with the defaults). A step attends over the smallest bucket holding its longest
    sequence, so it reads at most ``granularity`` rows, or 1 / ``per_octave`` of the length, beyond that sequence;
    max_length 1152 gives 5 buckets (256, 512, 768, 1024, 1152), 32768 gives 40."""
    if max_length < 1 or granularity < 1 or per_octave < 1:
        raise ValueError(f"need max_length, granularity and per_octave >= 1; got {max_length}, {granularity}, "
                         f"{per_octave}")
    buckets, b = [], granularity
    while b < max_length:
        buckets.append(b)
        b += max(granularity, (1 << (b.bit_length() - 1)) // per_octave)
    return buckets + [max_length]


def _checked_buckets(kv_buckets: Sequence[int], max_length: int) -> list[int]:
    """Given KV buckets, sorted, with ``max_length`` as the last (every position must have one)."""
    buckets = sorted({int(b) for b in kv_buckets})
    if not buckets or buckets[0] < 1 or buckets[-1] > max_length:
        raise ValueError(f"kv_buckets must be KV lengths in 1 ... max_length ({max_length}); got {list(kv_buckets)}")
    return buckets if buckets[-1] == max_length else buckets + [max_length]


class _EagerStep:
    """``static_decode`` without ``cuda_graph``: a "replay" runs the step again, eagerly, into the first call's
    output buffer, as a CUDA graph replay refills its captured output."""

    def __init__(self, step: Callable[[], torch.Tensor], out: torch.Tensor):
        self.step, self.out = step, out

    def replay(self) -> None:
        self.out.copy_(self.step())


def _capture_eagerly(step: Callable[[], torch.Tensor]):
    out = step()
    return _EagerStep(step, out), out


class Generator:
    """Prefill + decode with per-layer caches on a BASED ``GPTModel`` (``megatron_based.model.build_model``).

    ``vocab_size``: the tokenizer's vocabulary (padded logits beyond it are dropped). ``max_length``: prompt plus
    generated tokens, needed only by softmax ("A") layers (their KV cache).

    ``cuda_graph``: decode through a fixed-shape step captured in CUDA graphs (CUDA only), captured at the first
    prefill of each batch size and replayed at every step: one graph, or with "A" layers one per KV-length bucket
    (``kv_buckets``, default :func:`kv_length_buckets`), each attending over cache rows ``[0, bucket)`` under a mask
    built on the device from each sequence's position; a step replays the smallest bucket covering the longest
    sequence. ``static_decode``: run that same fixed-shape step eagerly instead (any device; what the graphs
    replay, for tests and debugging). Without either, decode is dynamic: with every sequence at one position "A"
    layers attend over the rows written so far without a mask, otherwise over the whole cache with one.
    """

    def __init__(self, model, *, vocab_size: int | None = None, max_length: int | None = None,
                 cuda_graph: bool = False, static_decode: bool = False, kv_buckets: Sequence[int] | None = None):
        config = model.config
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            raise ValueError("generation runs with pipeline_model_parallel_size 1 (use tensor parallelism instead)")
        if parallel_state.get_context_parallel_world_size() > 1:
            raise ValueError("generation runs with context_parallel_size 1: decode is one token per step")
        if config.sequence_parallel:
            raise ValueError("build the model with sequence_parallel=False for generation (the weights are the same)")
        self.model = model.eval()
        self.layers = list(model.decoder.layers)
        self.vocab_size = vocab_size or model.vocab_size
        self.max_length = max_length
        self.dtype = config.params_dtype
        self.device = model.embedding.word_embeddings.weight.device
        if cuda_graph and not torch.cuda.is_available():
            raise ValueError("cuda_graph=True needs CUDA; leave it off on CPU")
        # The KV lengths of the static decode step: None (one step, no KV cache) without softmax ("A") layers.
        self.kv_buckets: list[int | None] = [None]
        if "A" in config.layer_pattern and max_length:
            self.kv_buckets = kv_length_buckets(max_length) if kv_buckets is None else _checked_buckets(
                kv_buckets, max_length)
        elif "A" in config.layer_pattern and (cuda_graph or static_decode):
            raise ValueError("cuda_graph / static_decode with softmax ('A') layers need max_length (the KV cache "
                             "size and its length buckets)")
        self.cuda_graph = cuda_graph
        self.static_decode = static_decode
        self.caches: list[dict] = []
        self.positions: torch.Tensor | None = None  # next position of each sequence, on the device
        self._host_positions: list[int] = []
        self._batch = 0
        self._graphs: dict[int | None, tuple] = {}  # KV bucket -> (captured step, its output logits)
        self._graph_pool = None
        self._static_tokens = self._static_positions = None

    # -- caches ------------------------------------------------------------------------------------------------
    def allocate(self, batch: int) -> None:
        """Zeroed caches for ``batch`` sequences (their size never changes while decoding). With the batch size of
        the previous call the same tensors are zeroed in place, so the captured decode graphs stay valid."""
        if self.caches and self._batch == batch:
            for cache in self.caches:
                for t in cache.values():
                    t.zero_()
            return
        self.release()  # the old caches and graphs go before the new ones are allocated
        self.caches = [layer.self_attention.inference_cache(batch, self.dtype, self.device, self.max_length)
                       for layer in self.layers]
        self._batch = batch

    def release(self) -> None:
        """Drop the caches and any captured graphs (their memory returns to PyTorch's allocator)."""
        self.caches, self._batch, self._graphs, self._graph_pool, self.positions = [], 0, {}, None, None
        self._static_tokens = self._static_positions = None

    def cache_bytes(self) -> int:
        """Bytes held by all layers' caches on this rank (for every sequence of the batch)."""
        return sum(t.numel() * t.element_size() for cache in self.caches for t in cache.values())

    # -- forward pieces ---------------------------------------------------------------------------------------
    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + tied output layer on ``[s, b, d]`` -> full-vocabulary fp32 logits ``[s, b, vocab_size]``."""
        hidden = self.model.decoder.final_layernorm(hidden)
        logits, _ = self.model.output_layer(hidden, weight=self.model.shared_embedding_or_output_weight(),
                                            runtime_gather_output=True)
        return logits[..., : self.vocab_size].float()

    def _run(self, tokens, positions, mixer_call) -> torch.Tensor:
        # TransformerLayer.forward, layer by layer: with fp32_residual_connection the embedding output (Megatron casts
        # it) and every residual sum are fp32, the norms hand the mixers and MLPs the compute dtype (self.dtype,
        # which the caches hold); the final norm feeds the output layer in that dtype too. A captured decode graph
        # (cuda_graph) keeps these dtypes: its only static buffers are tokens, positions (int64) and fp32 logits.
        # Each residual add runs fused with the norm after it (_add_norm); the last one is a plain add.
        hidden = self.model.embedding(input_ids=tokens, position_ids=positions)
        out = None  # the last sublayer's (output, bias), not yet added to hidden
        for layer, cache in zip(self.layers, self.caches):
            if out is None:
                normed = layer.input_layernorm(hidden)
            else:
                normed, hidden = _add_norm(hidden, out, layer.input_layernorm)
            out = mixer_call(layer.self_attention, normed, cache)
            if not isinstance(layer.mlp, IdentityOp):  # a layer without MLP (build_model(mlp=False)): x + Mixer
                normed, hidden = _add_norm(hidden, out, layer.pre_mlp_layernorm)
                out = layer.mlp(normed)
        return hidden if out is None else _add(hidden, out)

    @torch.inference_mode()
    def prefill(self, prompts, lengths: Sequence[int] | None = None, padding_side: str = "right") -> torch.Tensor:
        """Run the prompts (see :func:`pack_prompts`) through the parallel forms, fill fresh caches; returns the
        logits of each prompt's last token ``[b, vocab_size]`` (fp32). With ``cuda_graph`` / ``static_decode`` the
        decode steps of a new batch size are captured first, on the zeroed caches."""
        packed = pack_prompts(prompts, lengths, padding_side, device=self.device)
        self.allocate(len(packed.lengths))
        if (self.cuda_graph or self.static_decode) and not self._graphs:
            self._capture_decode_steps()
        hidden = self._run(packed.tokens, packed.positions[None],
                           lambda mixer, x, cache: mixer.prefill(x, cache, packed))
        self.positions = packed.lengths.clone()
        self._host_positions = packed.lengths.tolist()
        return self._logits(hidden[packed.cu_seqlens[1:].long() - 1])[:, 0]

    def _decode(self, tokens: torch.Tensor, positions: torch.Tensor, kv_length: int | None,
                kv_bucket: int | None = None) -> torch.Tensor:
        """One decode step. "A" layers attend over ``kv_length`` rows unmasked (every sequence at position
        ``kv_length - 1``), else over ``kv_bucket`` rows (None: the whole cache) masked by ``positions``."""
        hidden = self._run(tokens[:, None], positions[:, None],
                           lambda mixer, x, cache: mixer.step(x, cache, positions, kv_length=kv_length,
                                                              kv_bucket=kv_bucket))
        return self._logits(hidden)[0]

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per sequence ``[b]`` at its next position; returns the next logits ``[b, vocab_size]``."""
        if self.positions is None:
            raise RuntimeError("call prefill(prompts) before step(tokens)")
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=self.device).reshape(-1)
        if tokens.numel() != len(self._host_positions):
            raise ValueError(f"step got {tokens.numel()} tokens for a batch of {len(self._host_positions)} sequences")
        if self.max_length and max(self._host_positions) >= self.max_length:
            raise ValueError(f"sequence longer than max_length ({self.max_length}): raise max_length")
        if self._graphs:
            logits = self._graph_step(tokens)
        else:
            uniform = len(set(self._host_positions)) == 1
            logits = self._decode(tokens, self.positions, self._host_positions[0] + 1 if uniform else None)
        self.positions += 1
        self._host_positions = [p + 1 for p in self._host_positions]
        return logits

    def kv_bucket(self) -> int | None:
        """The KV length the next static step attends over: the smallest bucket holding every sequence's next
        position (from the host copy of the positions: no device read); None without "A" layers."""
        if self.kv_buckets == [None]:
            return None
        return self.kv_buckets[bisect.bisect_left(self.kv_buckets, max(self._host_positions) + 1)]

    def _graph_step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Replay the captured decode step of the current KV bucket. A replay re-runs the recorded kernels on the
        recorded buffers only: the step reads its inputs from ``_static_tokens`` / ``_static_positions`` (copied
        in before each replay), updates every cache tensor in place (``copy_`` / indexed writes, never rebinding a
        dict entry), keeps positions on the device and never reads a value back to the host; its shapes depend on
        its bucket only. tests/megatron_based/test_generation.py checks this on CPU by replaying a recorded step."""
        graph, out = self._graphs[self.kv_bucket()]
        self._static_tokens.copy_(tokens)
        self._static_positions.copy_(self.positions)
        graph.replay()
        return out.clone()

    def _capture_decode_steps(self) -> None:
        """Capture the decode step for every KV bucket (one without "A" layers) on the freshly allocated caches,
        largest bucket first, then zero the caches again: warm-up and capture write into them, and restoring a
        copy instead would double the KV cache's memory. Inputs are valid placeholders (token 0 at position 0)."""
        capture = self._capture if self.cuda_graph else _capture_eagerly
        self._static_tokens = torch.zeros(self._batch, dtype=torch.long, device=self.device)
        self._static_positions = torch.zeros(self._batch, dtype=torch.long, device=self.device)
        for bucket in sorted(self.kv_buckets, key=lambda b: -1 if b is None else b, reverse=True):
            self._graphs[bucket] = capture(
                lambda bucket=bucket: self._decode(self._static_tokens, self._static_positions, None, bucket))
        for cache in self.caches:
            for t in cache.values():
                t.zero_()

    def _capture(self, step: Callable[[], torch.Tensor]):
        """``(graph, outputs)``: ``step()`` captured in a CUDA graph after two warm-up calls on a side stream
        (Triton compilation and allocator growth happen outside the capture). All graphs of this batch size share
        one memory pool: they are replayed one at a time on one stream and each reads only the static inputs and
        the caches, so one graph's intermediates may reuse another's (their outputs stay allocated)."""
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            out = step()
        return graph, out

    # -- the loop ---------------------------------------------------------------------------------------------
    def _sample(self, logits, generator, **sampling) -> torch.Tensor:
        tokens = sample(logits, generator=generator, **sampling)
        tp_group = parallel_state.get_tensor_model_parallel_group()
        if tp_group.size() > 1:  # every TP rank must feed the same token
            torch.distributed.broadcast(tokens, parallel_state.get_tensor_model_parallel_src_rank(), group=tp_group)
        return tokens

    def generate(self, prompts, max_new_tokens: int, *, lengths: Sequence[int] | None = None,
                 padding_side: str = "right", temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 stop_tokens: Sequence[int] = (), seed: int = 0,
                 on_token: Callable[[int, list[int], list[bool]], None] | None = None) -> list[list[int]]:
        """Generate up to ``max_new_tokens`` per prompt; a sequence ends after emitting one of ``stop_tokens``
        (included in its output). ``on_token(step, tokens, finished)`` streams each step's tokens (a finished
        sequence's entry is meaningless). Returns the new tokens of each prompt. The next step is queued on the
        device before this step's tokens are read on the host, so when every sequence stops early the caches have
        taken one token more than was returned."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        generator = torch.Generator(device=self.device).manual_seed(seed)
        sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        logits = self.prefill(prompts, lengths, padding_side)
        stop = set(stop_tokens)
        outputs = [[] for _ in range(logits.shape[0])]
        finished = [False] * len(outputs)
        tokens = self._sample(logits, generator, **sampling)
        for t in range(max_new_tokens):
            # The host needs each step's tokens (outputs, stop tokens, streaming) but the next step needs them only
            # on the device: copy them out, queue the next step, then wait for the copy alone, so the device runs
            # that step while the host does its part (one step more than needed when every sequence stops here)
            host_tokens, copied = _to_host(tokens)
            queued = t < max_new_tokens - 1 and not (self.max_length and max(self._host_positions) >= self.max_length)
            if queued:
                logits = self.step(tokens)
            if copied is not None:
                copied.synchronize()
            host = host_tokens.tolist()
            for i, tok in enumerate(host):
                if not finished[i]:
                    outputs[i].append(tok)
                    finished[i] = tok in stop
            if on_token is not None:
                on_token(t, host, list(finished))
            if all(finished) or t == max_new_tokens - 1:
                break
            if not queued:  # past max_length: step raises its error
                logits = self.step(tokens)
            tokens = self._sample(logits, generator, **sampling)
        return outputs


def _to_host(tokens: torch.Tensor):
    """``(host copy, event)``: on CUDA a non-blocking copy into pinned memory and the event after it (wait on it,
    not on the stream, to read the copy while later work runs); on CPU the tensor itself and None."""
    if tokens.device.type != "cuda":
        return tokens, None
    host = tokens.to("cpu", non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


# -- checking decode against a full forward (tests, benchmarks/generation.py) -----------------------------------
def teacher_forced_logits(gen: Generator, tokens: torch.Tensor, prompt_lengths: Sequence[int],
                          steps: int) -> torch.Tensor:
    """Prefill row i's first ``prompt_lengths[i]`` tokens of ``tokens [b, T]``, then decode ``steps - 1`` steps
    feeding the true next tokens. Returns ``[b, steps, vocab]``: the logits predicting positions
    ``P_i ... P_i + steps - 1``, i.e. a full forward's logits at ``P_i - 1 + j`` (see :func:`at_decode_positions`)."""
    b, T = tokens.shape
    if len(prompt_lengths) != b or min(prompt_lengths) < 1 or max(prompt_lengths) + steps - 1 > T or steps < 1:
        raise ValueError(f"need {b} prompt lengths >= 1 with P + steps - 1 <= {T}; got {list(prompt_lengths)}, "
                         f"steps {steps}")
    out = [gen.prefill([tokens[i, :P] for i, P in enumerate(prompt_lengths)])]
    rows = torch.arange(b, device=tokens.device)
    start = torch.as_tensor(list(prompt_lengths), device=tokens.device)
    for j in range(steps - 1):
        out.append(gen.step(tokens[rows, start + j]))
    return torch.stack(out, dim=1)


def at_decode_positions(full: torch.Tensor, prompt_lengths: Sequence[int], steps: int) -> torch.Tensor:
    """Full-forward logits ``[b, T, V]`` at the positions :func:`teacher_forced_logits` predicts: ``[b, steps, V]``."""
    return torch.stack([full[i, P - 1: P - 1 + steps] for i, P in enumerate(prompt_lengths)])


def decode_error_report(decode: torch.Tensor, full: torch.Tensor, reference: torch.Tensor,
                        factor: float = 2.0, atol: float = 0.0) -> dict:
    """Is low-precision (bf16) decoding as accurate as the same model's low-precision full forward?

    ``decode``: its decode logits, ``full``: its full-forward logits, ``reference``: a high-precision (fp32 / fp64)
    full forward of the same weights, all at the same positions. Errors are relative to the reference, as RMS
    (``|a - ref|_2 / |ref|_2``, the criterion: stable over many logits) and max (``max |a - ref| / max |ref|``).
    Passes when decode's RMS error is at most ``factor`` x the full forward's (+ ``atol``, for a reference in the
    same precision): bf16 rounding over many layers is expected in both, a decode bug adds O(1) errors."""
    if not decode.shape == full.shape == reference.shape:
        raise ValueError(f"shapes differ: decode {tuple(decode.shape)}, full {tuple(full.shape)}, "
                         f"reference {tuple(reference.shape)}")
    ref = reference.double()

    def errors(x):
        d = x.double() - ref
        return (d.norm() / ref.norm()).item(), (d.abs().max() / ref.abs().max()).item()

    (dec_rms, dec_max), (full_rms, full_max) = errors(decode), errors(full)
    return {"decode_rel_rms": dec_rms, "decode_rel_max": dec_max, "full_forward_rel_rms": full_rms,
            "full_forward_rel_max": full_max, "factor": factor, "atol": atol,
            "passed": dec_rms <= factor * full_rms + atol}


def continuation_text(decode: Callable[[list[int]], str], prompt: Sequence[int], new: Sequence[int]) -> str:
    """The text ``new`` tokens add after ``prompt``, decoded together with it: sentencepiece drops the leading
    space of a continuation decoded alone ("the fox" + "walked")."""
    prompt = list(prompt)
    return decode(prompt + list(new))[len(decode(prompt)):]


def main(argv: Sequence[str] | None = None) -> int:
    """``megatron-based-generate``: stream a continuation of a prompt from a checkpoint."""
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_known_warnings("--verbose" in argv)
    p = generate_parser()
    args = p.parse_args(argv)

    if not args.checkpoint and not args.random_weights:
        return fail(p, "no --checkpoint: give one, or --random-weights to sample from an untrained model")
    if args.checkpoint and args.random_weights:
        return fail(p, "--random-weights and --checkpoint exclude each other")
    if args.random_weights and not args.config:
        return fail(p, "--random-weights needs --config (the model to initialise)")
    error = bad_option(args, files=["config"] + ([] if args.tokenizer == "bytes" else ["tokenizer"]),
                       paths=["checkpoint"], positive=["max_new_tokens", "tensor_model_parallel_size"],
                       tensor_parallel=True)
    if error:
        return fail(p, error)
    if args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1:
        return fail(p, f"need --temperature >= 0, --top-k >= 0 and 0 < --top-p <= 1; got {args.temperature}, "
                       f"{args.top_k}, {args.top_p}")
    if args.cuda_graph and not torch.cuda.is_available():
        return fail(p, "--cuda-graph needs a GPU; leave it off on CPU")

    try:  # the tokenizer and the prompts before the model, then the model: a bad input fails in one line
        tokenizer = load_tokenizer(args.tokenizer)
        encode, decode, eos = tokenizer.tokenize, tokenizer.detokenize, end_of_document(tokenizer)
        prompts = [encode(text) for text in args.prompt]
        for text, ids in zip(args.prompt, prompts):
            if not ids:
                return fail(p, f"--prompt {text!r} has no tokens: give every prompt some text")
        owns_group = not torch.distributed.is_initialized()  # a caller's group stays up
        initialize_parallel(args.tensor_model_parallel_size)
        model, spec = load_model(args.config, args.checkpoint,
                                 tensor_model_parallel_size=args.tensor_model_parallel_size, dtype=args.dtype)
    except (ConfigError, CheckpointError, ConversionError, DataError) as e:
        return fail(p, e)
    gen = Generator(model, vocab_size=spec.vocab_size, cuda_graph=args.cuda_graph,
                    max_length=max(map(len, prompts)) + args.max_new_tokens)
    printing = torch.distributed.get_rank() == 0
    if printing and args.random_weights:
        print("sampling from random weights (--random-weights)", file=sys.stderr, flush=True)
    emitted, printed = [], [""]

    def stream(step, tokens, finished):  # one prompt: print the text as it grows; several: print at the end
        if printing and len(prompts) == 1 and tokens[0] != eos:
            emitted.append(tokens[0])
            text = continuation_text(decode, prompts[0], emitted)
            sys.stdout.write(text[len(printed[0]):])
            sys.stdout.flush()
            printed[0] = text

    if printing and len(prompts) == 1:
        sys.stdout.write(args.prompt[0])
    outputs = gen.generate(prompts, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, stop_tokens=[eos] if eos is not None else [], seed=args.seed,
                           on_token=stream)
    if printing:
        if len(prompts) == 1:
            sys.stdout.write("\n")
        else:
            for text, ids, out in zip(args.prompt, prompts, outputs):
                print(f"{text}{continuation_text(decode, ids, [t for t in out if t != eos])}\n---")
    if owns_group:
        shutdown_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
