"""Multi-query associative recall (MQAR), the synthetic recall task of Zoology and the BASED paper.

The data are Zoology's (``zoology/data/associative_recall.py``, ``multiquery_ar``), reimplemented in torch:

* a sequence of ``seq_len`` tokens starts with ``num_kv_pairs`` pairs ``k1 v1 k2 v2 ...``: distinct keys drawn
  uniformly from ``[1, V/2)``, distinct values from ``[V/2, V)`` (V = ``vocab_size``);
* every key is queried exactly once, after the pairs: the rest of the sequence is ``(T - 2D) // 2`` two-token
  slots, and key j (in context order) goes to the first token of slot ``g_j``; the slots ``g_1, g_2, ...`` are drawn
  one after the other without replacement with ``p(i) ∝ i^(a - 1)`` (i = 1 for the first slot after the pairs,
  ``a = power_a = 0.01``), so most queries come soon after the pairs and a long tail comes late;
* every other token is the filler 0 (``random_fill=True``: uniform over the whole vocabulary, Zoology's
  ``random_non_queries``; its figure-2 runs, the published table reproduced here, use 0);
* ``labels`` hold the value at each query key's position (the model answers there, next-token style) and
  ``IGNORE`` (-100) everywhere else. Accuracy is the mean over sequences of the fraction of their queries whose
  arg-max prediction over the vocabulary is the value (chance: ``1 / (V - V/2)``).

Training follows Zoology's trainer: a fixed set of ``num_train`` sequences (seed ``seed``; the test set of
``num_test`` from seed ``seed + 10``), shuffled every epoch, AdamW (weight decay 0.1, betas 0.9 / 0.999, no
clipping), cross entropy at the query positions, learning rate cosine-annealed per epoch to 0 over ``epochs``,
stopping after the first epoch whose test accuracy exceeds ``early_stop`` (0.99).

``megatron-based-mqar train`` trains one model (defaults: the published setting) and reports recall;
``megatron-based-mqar eval`` scores a checkpoint; ``benchmarks/mqar_sweep.py`` runs the published grid
(docs/mqar.md).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

from based_kernels.taylor_attention import feature_dim as taylor_feature_dim

from ..inference.convert import ConversionError
from ..inference.generation import Generator
from ..inference.loader import load_model
from ..model.builder import build_model
from ..model.config import BasedConfig, ConfigError, read_model_section
from ..runtime.cli import bad_option, fail
from ..runtime.noise import quiet_known_warnings
from ..runtime.parallel import initialize_parallel
from ..training.checkpointing import CheckpointError, error_line
from .cli import MODELS, mqar_parser

IGNORE = -100

__all__ = ["MQARTask", "mqar_batch", "mqar_dataset", "query_gap_weights", "mqar_logits", "mqar_loss",
           "evaluate_mqar", "train_mqar", "state_bytes_per_sequence", "mqar_state_size", "build_mqar_model",
           "mqar_model_section", "save_mqar_checkpoint", "load_mqar_checkpoint", "main"]


@dataclass(frozen=True)
class MQARTask:
    """The data settings; the defaults are the published table's (Zoology / BASED paper: V 8192, T 256, 16 pairs)."""
    vocab_size: int = 8192
    seq_len: int = 256
    num_kv_pairs: int = 16
    power_a: float = 0.01
    random_fill: bool = False

    def __post_init__(self):
        if self.seq_len < 4 * self.num_kv_pairs:
            raise ValueError(f"seq_len ({self.seq_len}) must be >= 4 * num_kv_pairs ({4 * self.num_kv_pairs}): the "
                             "pairs and a two-token query slot per key must fit")
        if self.vocab_size // 2 - 1 < self.num_kv_pairs:
            raise ValueError(f"vocab_size ({self.vocab_size}) too small for {self.num_kv_pairs} distinct keys: "
                             f"use >= {2 * self.num_kv_pairs + 2}")
        if not self.power_a > 0:
            raise ValueError(f"power_a ({self.power_a}) must be > 0 (1: uniform query slots)")

    @property
    def num_values(self) -> int:
        return self.vocab_size - self.vocab_size // 2

    @property
    def num_slots(self) -> int:
        """Two-token query slots after the pairs."""
        return (self.seq_len - 2 * self.num_kv_pairs) // 2

    @property
    def chance(self) -> float:
        return 1.0 / self.num_values


def query_gap_weights(task: MQARTask) -> torch.Tensor:
    """``p [num_slots]`` (float64, sums to 1): the probability of each query slot for one draw, ``p(i) ∝ i^(a-1)``
    with i = 1 for the slot right after the pairs (Zoology's power law)."""
    i = torch.arange(1, task.num_slots + 1, dtype=torch.float64)
    p = i ** (task.power_a - 1)
    return p / p.sum()


def _distinct(n: int, low: int, high: int, k: int, generator) -> torch.Tensor:
    """``[n, k]`` int64: per row k distinct integers uniform over ``[low, high)``, in random order (a uniform
    random k-permutation, like ``numpy.random.choice(..., replace=False)``)."""
    if high - low <= 4 * k:  # few choices: a random permutation of all of them
        return torch.rand(n, high - low, generator=generator).argsort(-1)[:, :k] + low
    out = torch.randint(low, high, (n, k), generator=generator)
    while True:  # redraw whole rows with a repeat: exact, and few rows repeat when high - low >> k
        s = out.sort(-1).values
        bad = (s[:, 1:] == s[:, :-1]).any(-1)
        if not bad.any():
            return out
        out[bad] = torch.randint(low, high, (int(bad.sum()), k), generator=generator)


def mqar_batch(task: MQARTask, num_examples: int, generator: torch.Generator | None = None):
    """``(inputs [N, T], labels [N, T])`` int64; see the module docstring for the layout."""
    N, T, D = num_examples, task.seq_len, task.num_kv_pairs
    half = task.vocab_size // 2
    keys = _distinct(N, 1, half, D, generator)
    values = _distinct(N, half, task.vocab_size, D, generator)
    # Query slots: D draws without replacement, each ∝ the power law over the slots still free; key j gets draw j.
    gaps = torch.multinomial(query_gap_weights(task).float().expand(N, -1), D, replacement=False,
                             generator=generator)
    if task.random_fill:
        inputs = torch.randint(0, task.vocab_size, (N, T), generator=generator)
    else:
        inputs = torch.zeros(N, T, dtype=torch.long)
    labels = torch.full((N, T), IGNORE, dtype=torch.long)
    inputs[:, 0: 2 * D: 2], inputs[:, 1: 2 * D: 2] = keys, values
    pos = 2 * D + 2 * gaps  # each key's query position; the answer is the label there
    inputs.scatter_(1, pos, keys)
    labels.scatter_(1, pos, values)
    return inputs, labels


def mqar_dataset(task: MQARTask, num_train: int, num_test: int, seed: int = 0):
    """``((train inputs, labels), (test inputs, labels))``: Zoology's fixed sets, train from ``seed``, test from
    ``seed + 10``."""
    train = mqar_batch(task, num_train, torch.Generator().manual_seed(seed))
    test = mqar_batch(task, num_test, torch.Generator().manual_seed(seed + 10))
    return train, test


def _tokens_logits(*, hidden_states, output_layer, output_weight, context, **_):
    """GPTModel's output hook: logits only at the ``context`` = (rows, positions) of the queries ``[n, V]``."""
    rows, cols = context
    h = hidden_states[cols, rows]  # [s, b, d] -> [n, d]
    logits, _ = output_layer(h[:, None], weight=output_weight, runtime_gather_output=True)
    return logits[:, 0]


def mqar_logits(model, inputs: torch.Tensor, labels: torch.Tensor, query_positions: torch.Tensor | None = None):
    """``(logits [n, V] fp32, targets [n], rows [n])`` at the n labelled positions (row-major). The output layer
    runs only there (through GPTModel's ``output_processor`` hook): the loss and the accuracy need nothing else,
    and the ``[b, T, V]`` logits would be most of a step's time and memory at V 8192. ``query_positions [b, D]``:
    the labelled positions of each row when known (every row has D), which spares the host a wait for the device
    (``nonzero``) in every step."""
    b, T = inputs.shape
    if query_positions is None:
        rows, cols = (labels != IGNORE).nonzero(as_tuple=True)
    else:
        D = query_positions.shape[1]
        rows = torch.arange(b, device=inputs.device).repeat_interleave(D)
        cols = query_positions.reshape(-1)
    logits = model(inputs, torch.arange(T, device=inputs.device).expand(b, T), attention_mask=None,
                   output_processor=_tokens_logits, output_processor_context=(rows, cols))
    return logits.float(), labels[rows, cols], rows


def mqar_loss(model, inputs: torch.Tensor, labels: torch.Tensor,
              query_positions: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross entropy over the query positions (Zoology's ``CrossEntropyLoss`` with ignore index -100);
    ``query_positions``: see :func:`mqar_logits`."""
    logits, targets, _ = mqar_logits(model, inputs, labels, query_positions)
    return torch.nn.functional.cross_entropy(logits, targets)


@torch.no_grad()
def evaluate_mqar(model, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 256,
                  with_loss: bool = False):
    """Recall: the mean over sequences of the fraction of their queries whose arg-max prediction (over the full
    vocabulary) is the value. ``with_loss``: ``(recall, mean cross entropy)``."""
    was_training = model.training
    model.eval()
    per_seq, loss_sum, n = [], 0.0, 0
    for i in range(0, inputs.shape[0], batch_size):
        x, y = inputs[i: i + batch_size], labels[i: i + batch_size]
        logits, targets, rows = mqar_logits(model, x, y)
        hit = (logits.argmax(-1) == targets).float()
        counts = torch.bincount(rows, minlength=x.shape[0]).float()
        per_seq.append((torch.zeros(x.shape[0], device=hit.device).index_add_(0, rows, hit) / counts)[counts > 0])
        loss_sum += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
        n += targets.numel()
    model.train(was_training)
    recall = float(torch.cat(per_seq).mean())
    return (recall, loss_sum / n) if with_loss else recall


def _capture_train_step(model, opt, inputs, labels, query_positions, warmup: int = 3):
    """``(graph, loss)``: one training step (``zero_grad(set_to_none=False)``, forward, loss, backward,
    ``opt.step()``) on the static batch ``inputs, labels, query_positions`` captured in a CUDA graph, as PyTorch's
    whole-network capture does it: ``warmup`` eager steps on a side stream first (Triton compilation and
    autotuning, the cuBLAS workspace of that stream, the ``.grad`` tensors and AdamW's state are all created
    outside the capture), then the capture on the same stream. ``loss`` is the step's loss (a static tensor that
    every replay rewrites). The warm-up steps do not count: the parameters are restored afterwards and AdamW's
    state is zeroed (its value before the first step: moments 0, step count 0), so the training is the eager
    loop's from the same weights. ``opt`` must be fused and capturable (its step count lives on the device)."""
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]

    def step():
        # set_to_none=False: the captured backward and AdamW step use the .grad tensors that exist at capture
        opt.zero_grad(set_to_none=False)
        loss = mqar_loss(model, inputs, labels, query_positions)
        loss.backward()
        opt.step()
        return loss.detach()

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                step()
    finally:  # undo the warm-up steps, also when one failed (the caller then trains eagerly from these weights)
        torch.cuda.current_stream().wait_stream(stream)
        with torch.no_grad():
            for p, p0 in zip(params, saved):
                p.copy_(p0)
            for state in opt.state.values():
                for t in state.values():
                    if torch.is_tensor(t):
                        t.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):  # records the kernels, runs none of them
        loss = step()
    return graph, loss


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


class TrainingStateError(ValueError):
    """A ``train_mqar`` state file that this run cannot continue from (another run's, or not one at all)."""


def _state_settings(model, n_train: int, **settings) -> dict:
    """What must agree for a run to continue from a state file: the training settings and the parameters."""
    return {**settings, "num_train": n_train,
            "parameters": [[name, list(p.shape)] for name, p in model.named_parameters()]}


def _save_training_state(path: str, blob: dict) -> None:
    """Written whole or not at all: a kill while saving leaves the previous epoch's state."""
    tmp = f"{path}.tmp"
    torch.save(blob, tmp)
    os.replace(tmp, path)


def _resume_training_state(path: str, settings: dict, model, opt, generator) -> dict | None:
    """Load the state file at ``path`` (None when there is none) into ``model``, ``opt`` and ``generator``, in place:
    a captured CUDA graph reads the parameters and AdamW's state tensors where they are. Refuses (TrainingStateError,
    naming the file and the first setting that differs) a file saved by a run with other settings."""
    if not os.path.exists(path):
        return None
    try:  # tensors, numbers, strings and containers only: no code runs while loading
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: say which, lose nothing
        raise TrainingStateError(f"{path} is not a readable MQAR training state ({_first_line(e)}); remove it or "
                                 "give another --state") from e
    saved = blob.get("settings", {}) if isinstance(blob, dict) else {}
    for key, value in settings.items():
        if saved.get(key) != value:
            raise TrainingStateError(f"{path} was saved by a run with {key} {saved.get(key)!r}, this run has "
                                     f"{value!r}; remove it or give another --state")
    model.load_state_dict(blob["model"])  # copies into the existing parameters
    params = [p for group in opt.param_groups for p in group["params"]]
    if any(opt.state[p] for p in params):  # the captured step's tensors exist: write into them
        for i, p in enumerate(params):
            for key, value in blob["optimizer"]["state"].get(i, {}).items():
                opt.state[p][key].copy_(value)
    else:  # the saved state under this optimizer's own groups (fused / capturable, lr: a graph run's are others)
        opt.load_state_dict({"state": blob["optimizer"]["state"], "param_groups": opt.state_dict()["param_groups"]})
    generator.set_state(blob["generator"])
    torch.set_rng_state(blob["rng"])
    return blob


def train_mqar(model, train, test, *, epochs: int = 64, batch_size: int = 256, lr: float = 1e-3,
               weight_decay: float = 0.1, early_stop: float | None = 0.99, seed: int = 0,
               log: Callable[[str], None] | None = print, cuda_graph: bool | None = None,
               state: str | os.PathLike | None = None) -> list[dict]:
    """Zoology's training on the fixed ``train = (inputs, labels)`` set: each epoch a reshuffled pass in batches of
    ``batch_size``, AdamW, the learning rate cosine-annealed per epoch (``lr * (1 + cos(pi e / epochs)) / 2`` in
    epoch e, no warm-up), then the test recall on ``test``; stops after the first epoch whose recall exceeds
    ``early_stop``. ``log`` gets one line per epoch (and one about the CUDA graph when it is on). Returns one dict
    per epoch (epoch, lr, loss: the epoch's mean training loss, test_loss, accuracy, seconds since the start).

    ``cuda_graph`` (None: on when the model is on CUDA; True on another device: ValueError): every full batch's
    step (zero_grad, forward, loss, backward, fused AdamW) is one replay of a CUDA graph captured once
    (:func:`_capture_train_step`; its warm-up steps are undone), with the learning rate a device tensor that the
    per-epoch cosine value is written into; an epoch's last partial batch runs eagerly on the same model and
    optimizer. The small MQAR models are bound by the host's ~1,100-1,400 kernel launches per step otherwise. The
    numerics are the eager loop's up to rounding: the graphed AdamW reads the learning rate as an fp32 tensor, the
    eager one as a Python float. Needs every row to have the same number of queries; if the capture fails, ``log``
    gets one line saying why and the training runs eagerly. False: the plain eager loop.

    ``state``: a file that gets the whole training state (weights, AdamW's state, the shuffling generator, the CPU
    RNG, the history) after every epoch, replaced atomically; a run given an existing file continues after its last
    epoch, and one that had finished (all epochs, or the early stop) returns its history without training. Without
    dropout the continued run is the uninterrupted one, bitwise. A file saved with other settings (epochs, batch
    size, lr, weight decay, early stop, seed, training-set size, parameter names and shapes) is refused
    (:class:`TrainingStateError`) before any training."""
    device = next(model.parameters()).device
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs the model on a CUDA device; it is on {device} "
                         "(leave cuda_graph at None or False)")
    x, y = (t.to(device) for t in train)
    tx, ty = (t.to(device) for t in test)
    queries = train[1] != IGNORE
    per_row = queries.sum(1)
    # every row has num_kv_pairs queries: their positions, found once, keep the steps free of host-device waits
    query_positions = (queries.nonzero()[:, 1].view(len(per_row), -1).to(device)
                       if len(per_row) and bool((per_row == per_row[0]).all()) else None)
    g = torch.Generator().manual_seed(seed)
    graph = None  # the captured full-batch step, when CUDA graphs are on
    if (device.type == "cuda" if cuda_graph is None else cuda_graph) and x.shape[0] >= batch_size:
        reason = "every row needs the same number of queries (the step would wait for the host to find them)"
        if query_positions is not None:
            # the static batch the graph reads: each full batch's rows are copied into it before a replay
            static = (x[:batch_size].clone(), y[:batch_size].clone(), query_positions[:batch_size].clone())
            # capturable: the step count stays on the device; the learning rate is a device tensor as well, so
            # that the captured update reads the value written into it each epoch
            lr_now = torch.tensor(lr, dtype=torch.float32, device=device)
            opt = torch.optim.AdamW(model.parameters(), lr=lr_now, weight_decay=weight_decay, fused=True,
                                    capturable=True)
            t_capture = time.perf_counter()
            model.train()  # the mode the captured forward runs in
            try:
                graph, static_loss = _capture_train_step(model, opt, *static)
            except Exception as e:  # noqa: BLE001 - whatever stops the capture: train eagerly, never lose the run
                # a failure inside the capture surfaces as the capture's end failing: name the first cause too
                reason = "; ".join(_first_line(c) for c in (e.__context__, e) if c is not None)
                graph = None
        if log:
            rest = x.shape[0] % batch_size
            rest = f"; the last {rest} rows of an epoch run eagerly" if rest else ""
            log(f"CUDA graph: one replay per full batch of {batch_size} (captured in "
                f"{time.perf_counter() - t_capture:.1f} s{rest})" if graph is not None
                else f"CUDA graphs off: {reason}; training eagerly")
    if graph is None:
        # fused: one kernel for all parameters on GPU (the same update as the loop over them)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=device.type == "cuda")
    history, t0, start, finished = [], time.perf_counter(), 0, False
    if state is not None:
        state = os.fspath(state)
        settings = _state_settings(model, x.shape[0], epochs=epochs, batch_size=batch_size, lr=lr,
                                   weight_decay=weight_decay, early_stop=early_stop, seed=seed)
        blob = _resume_training_state(state, settings, model, opt, g)
        if blob is not None:
            history, start, finished = blob["history"], len(blob["history"]), blob["finished"]
            t0 -= history[-1]["seconds"] if history else 0.0
            if log:
                log(f"continuing from {state}: " + (f"finished after epoch {start}" if finished else
                                                     f"epoch {start + 1} of {epochs} next"))
    for epoch in range(start, epochs if not finished else start):
        rate = lr * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
        if graph is not None:
            lr_now.fill_(rate)  # in place: the graph and the eager partial batches read this tensor
        else:
            for group in opt.param_groups:
                group["lr"] = rate
        model.train()
        order = torch.randperm(x.shape[0], generator=g).to(device)
        total = torch.zeros((), device=device)
        steps = 0
        for i in range(0, x.shape[0], batch_size):
            idx = order[i: i + batch_size]
            if graph is not None and idx.shape[0] == batch_size:
                for src, dst in zip((x, y, query_positions), static):
                    torch.index_select(src, 0, idx, out=dst)
                graph.replay()
                total += static_loss
                steps += 1
                continue
            loss = mqar_loss(model, x[idx], y[idx], None if query_positions is None else query_positions[idx])
            # with the graph, the .grad tensors must stay: the captured backward and update use them
            opt.zero_grad(set_to_none=graph is None)
            loss.backward()
            opt.step()
            total += loss.detach()
            steps += 1
        accuracy, test_loss = evaluate_mqar(model, tx, ty, with_loss=True)
        history.append({"epoch": epoch + 1, "lr": rate, "loss": float(total) / max(steps, 1), "test_loss": test_loss,
                        "accuracy": accuracy, "seconds": time.perf_counter() - t0})
        h = history[-1]
        stop = early_stop is not None and accuracy > early_stop
        if state is not None:  # before the epoch's line: a run killed after the line has the epoch saved
            _save_training_state(state, {
                "settings": settings, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "generator": g.get_state(), "rng": torch.get_rng_state(), "history": history,
                "finished": stop or epoch + 1 == epochs})
        if log:
            log(f"epoch {epoch + 1}/{epochs}  loss {h['loss']:.4f}  test loss {test_loss:.4f}  test accuracy "
                f"{accuracy:.4f}  lr {rate:.2e}  {h['seconds']:.1f} s")
        if stop:
            if log:
                log(f"early stop: test accuracy {accuracy:.4f} > {early_stop}")
            break
    model.eval()
    return history


def state_bytes_per_sequence(model, max_length: int | None = None) -> int:
    """Bytes of decode state one sequence needs (the generation caches; "A" layers at ``max_length``; with the
    Taylor layers' decode buffer, which :func:`mqar_state_size` leaves out)."""
    gen = Generator(model, max_length=max_length)
    gen.allocate(1)
    return gen.cache_bytes()


def mqar_state_size(pattern: str, *, hidden_size: int, feature_dim: int = 16, num_heads: int = 1,
                    seq_len: int = 256, swa_window: int = 16, conv_kernel_size: int = 3) -> int:
    """Numbers a model keeps per sequence to decode the next token (its recurrent state), summed over layers, from
    the configuration: C ``(k - 1) x 2d`` (the conv's last inputs), Z ``(k - 1) x d``, H and E ``T x d`` (every
    input so far: their filters span the sequence, T = ``seq_len``), L ``D x (d_v + 1)`` per head (the Taylor state S and
    normaliser z, D = 1 + f + f(f+1)/2 rows of the symmetric map; d_v = d / heads), S ``2 x (window + 1) x d``
    (the K/V ring), A ``2 x T x d`` (the KV cache at T = ``seq_len``). Equals the element count of the generation
    caches (:func:`state_bytes_per_sequence`) less the L layers' decode buffer (``STEP_BUFFER`` recent tokens'
    keys and values kept unexpanded beside S and z: the same state, held in another form for speed)."""
    d, k = hidden_size, conv_kernel_size
    size = {"C": (k - 1) * 2 * d, "Z": (k - 1) * d, "H": seq_len * d, "E": seq_len * d,
            "L": taylor_feature_dim(feature_dim) * (d + num_heads), "S": 2 * (swa_window + 1) * d, "A": 2 * seq_len * d}
    unknown = set(pattern) - set(size)
    if unknown:
        raise ValueError(f"mqar_state_size knows the C, Z, H, E, L, S and A mixers; not {sorted(unknown)}")
    return sum(size[s] for s in pattern)


def build_mqar_model(pattern: str, *, hidden_size: int, num_heads: int = 4, feature_dim: int = 8,
                     swa_window: int = 16, vocab_size: int = 64, seq_len: int = 64, mlp: bool = True,
                     embed_dropout: float = 0.0, **overrides):
    """A small BASED (or single-mixer) model for MQAR on this machine's device; ``mlp=False``: layers without MLPs
    (the published MQAR models). ``embed_dropout``: dropout on the token embeddings only, in training (Zoology's
    ``embed_dropout``, 0.1 by default there; its ``resid_dropout`` is 0, as every other dropout here): Megatron's
    embedding dropout module gets this rate while ``hidden_dropout`` (which it otherwise shares with the layers'
    residual dropout) stays 0."""
    if not 0.0 <= embed_dropout < 1.0:
        raise ValueError(f"embed_dropout must be in [0, 1); got {embed_dropout}")
    config = BasedConfig(layer_pattern=pattern, hidden_size=hidden_size, num_attention_heads=num_heads,
                         feature_dim=feature_dim, swa_window=swa_window,
                         use_cpu_initialization=not torch.cuda.is_available(), **overrides)
    model = build_model(config, vocab_size=vocab_size, max_sequence_length=seq_len, mlp=mlp)
    model.embedding.embedding_dropout.p = embed_dropout
    return model.cuda() if torch.cuda.is_available() else model


def mqar_model_section(pattern: str, *, hidden_size: int, num_heads: int = 4, feature_dim: int = 8,
                       swa_window: int = 16, vocab_size: int = 64, seq_len: int = 64, mlp: bool = True) -> dict:
    """The YAML ``model:`` section (the key names of configs/*.yaml, and ``mlp``) of :func:`build_mqar_model`'s
    model; a saved MQAR checkpoint carries it, so ``eval`` rebuilds exactly the model that was trained."""
    return {"layer_pattern": pattern, "hidden_size": hidden_size, "num_attention_heads": num_heads,
            "feature_dim": feature_dim, "swa_window": swa_window, "vocab_size": vocab_size, "seq_length": seq_len,
            "mlp": mlp}


def required_model_keys(pattern: str) -> list[str]:
    """Keys a YAML ``model:`` section must set for ``pattern``: every one :func:`build_mqar_model` sets, since a default
    would silently build a different model (``swa_window`` only with S layers, ``feature_dim`` only with L; not
    ``mlp``, which YAML configs do not have: a checkpoint written by ``train --save`` carries it)."""
    return [k for k in mqar_model_section(pattern, hidden_size=0)
            if k != "mlp" and not (k == "swa_window" and "S" not in pattern)
            and not (k == "feature_dim" and "L" not in pattern)]


def save_mqar_checkpoint(path: str, model, section: dict) -> None:
    """``{"model": section, "state_dict": ...}``, a torch file that ``torch.load(weights_only=True)`` reads."""
    torch.save({"model": dict(section), "state_dict": model.state_dict()}, path)


def load_mqar_checkpoint(checkpoint: str, config: str | None = None):
    """``(model, model section)`` for ``megatron-based-mqar eval``. The model comes from ``config``'s ``model:``
    section when given (it must set every :func:`required_model_keys` key), else from the section the checkpoint
    carries; a checkpoint that carries none (a bare state dict, a training directory) needs ``config``."""
    import os

    section = None
    if config:
        section = read_model_section(config)
        if "layer_pattern" not in section:
            raise ConfigError(f"{config} needs a model: section with layer_pattern")
        missing = [k for k in required_model_keys(section["layer_pattern"]) if k not in section]
        if missing:
            raise ConfigError(f"{config}: the model section lacks {missing}; set them to the trained model's values "
                              "(a default would score a different model), or leave out --config for a checkpoint "
                              "written by `megatron-based-mqar train --save`, which carries its model")
    saved = None
    if os.path.isfile(checkpoint):
        try:
            saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - not a torch file, or one holding more than plain data
            raise ConfigError(f"{checkpoint} is not a torch file of weights that torch.load(weights_only=True) reads "
                              f"({error_line(e)}): give the file `megatron-based-mqar train --save` wrote") from None
    if isinstance(saved, dict) and set(saved) == {"model", "state_dict"}:
        section = dict(section or saved["model"])
        section.setdefault("mlp", saved["model"].get("mlp", True))
        model = build_mqar_model(section["layer_pattern"], hidden_size=section["hidden_size"],
                                 num_heads=section["num_attention_heads"], feature_dim=section.get("feature_dim", 8),
                                 swa_window=section.get("swa_window", 16), vocab_size=section["vocab_size"],
                                 seq_len=section["seq_length"], mlp=section["mlp"])
        model.load_state_dict(saved["state_dict"])
        return model.eval(), section
    if section is None:
        raise ConfigError(f"{checkpoint} carries no model configuration (it was not written by `megatron-based-mqar "
                          "train --save`): give --config, a YAML whose model: section sets the trained model's "
                          f"{required_model_keys('LS')}")
    model, _ = load_model(config, checkpoint)
    return model, section


def _train_task(args) -> MQARTask:
    return MQARTask(args.vocab_size or 8192, args.seq_len or 256, args.num_kv_pairs, args.power_a, args.random_fill)


def _train(args) -> tuple:
    """``megatron-based-mqar train``: ``(model, task, test set, result dict)``."""
    task = _train_task(args)
    pattern = args.pattern or MODELS[args.model]
    section = mqar_model_section(pattern, hidden_size=args.hidden_size, num_heads=args.num_heads,
                                 feature_dim=args.feature_dim, swa_window=args.swa_window,
                                 vocab_size=task.vocab_size, seq_len=task.seq_len, mlp=args.mlp)
    model = build_mqar_model(pattern, hidden_size=args.hidden_size, num_heads=args.num_heads,
                             feature_dim=args.feature_dim, swa_window=args.swa_window, vocab_size=task.vocab_size,
                             seq_len=task.seq_len, mlp=args.mlp, embed_dropout=args.embed_dropout)
    t0 = time.perf_counter()
    train, test = mqar_dataset(task, args.num_train, args.num_examples, args.seed)
    params = sum(p.numel() for p in model.parameters())
    device = next(model.parameters()).device
    print(f"MQAR {args.model if not args.pattern else pattern} ({pattern}, d {args.hidden_size}, "
          f"{'f ' + str(args.feature_dim) + ', ' if 'L' in pattern else ''}{args.num_heads} head(s), "
          f"{'with' if args.mlp else 'no'} MLP, {params:,} parameters) on {device}; {args.num_train:,} training / "
          f"{args.num_examples:,} test sequences of {task.seq_len} tokens, {task.num_kv_pairs} pairs, vocabulary "
          f"{task.vocab_size} (data {time.perf_counter() - t0:.1f} s); lr {args.lr:g}, batch {args.batch_size}, "
          f"up to {args.epochs} epochs" + (f", embedding dropout {args.embed_dropout:g}" if args.embed_dropout else ""),
          flush=True)
    history = train_mqar(model, train, test, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         weight_decay=args.weight_decay, early_stop=args.early_stop, seed=args.seed,
                         log=lambda line: print(line, flush=True), cuda_graph=None if args.cuda_graph else False,
                         state=args.state)
    if args.save:
        save_mqar_checkpoint(args.save, model, section)
    state = mqar_state_size(pattern, hidden_size=args.hidden_size, feature_dim=args.feature_dim,
                            num_heads=args.num_heads, seq_len=task.seq_len, swa_window=args.swa_window)
    result = {"model": args.model if not args.pattern else pattern, **section, "lr": args.lr,
              "task": asdict(task), "num_train": args.num_train, "num_test": args.num_examples,
              "epochs": args.epochs, "batch_size": args.batch_size, "weight_decay": args.weight_decay,
              "embed_dropout": args.embed_dropout,
              "early_stop": args.early_stop, "seed": args.seed, "tf32": args.tf32, "parameters": params,
              "state_size": state,
              # graphs asked for on a GPU (a failed capture says so in the log and trains eagerly)
              "cuda_graph": args.cuda_graph and device.type == "cuda",
              "accuracy": history[-1]["accuracy"], "best_accuracy": max(h["accuracy"] for h in history),
              "epochs_run": len(history), "seconds": time.perf_counter() - t0,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "history": [{k: float(f"{v:.5g}") if isinstance(v, float) else v for k, v in h.items()}
                          for h in history]}
    return model, task, test, result


def main(argv: Sequence[str] | None = None) -> int:
    """``megatron-based-mqar``: train a model on MQAR (``train``) or score a checkpoint (``eval``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_known_warnings("--verbose" in argv)
    p = mqar_parser()
    args = p.parse_args(argv)

    if args.command == "eval" and not args.checkpoint:
        p.error("eval needs --checkpoint (and --config for a checkpoint not written by `train --save`)")
    error = bad_option(args, files=["config"], paths=["checkpoint"], outputs=["json", "save", "state"],
                       positive=["vocab_size", "seq_len", "num_kv_pairs", "num_train", "num_examples", "hidden_size",
                                 "num_heads", "epochs", "batch_size"])
    if error:
        return fail(p, error)
    if args.command == "train":
        if not 0.0 <= args.embed_dropout < 1.0:
            return fail(p, f"--embed-dropout must be in [0, 1); got {args.embed_dropout}")
        try:
            _train_task(args)  # the task's sizes, before anything is built
        except ValueError as e:
            return fail(p, e)

    initialize_parallel(1, seed=args.seed)
    if args.tf32:
        torch.set_float32_matmul_precision("medium")  # TF32 in torch's matmuls and the Taylor kernels' products
    if args.command == "train":
        try:
            model, task, test, result = _train(args)
        except (ConfigError, TrainingStateError) as e:  # the model's settings, or a --state of another run
            return fail(p, e)
        recall = result["accuracy"]
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(result, fh, indent=1)
    else:
        try:
            model, section = load_mqar_checkpoint(args.checkpoint, args.config)
        except (ConfigError, CheckpointError, ConversionError) as e:
            return fail(p, e)
        try:  # the task defaults to the model's vocabulary and length
            task = MQARTask(args.vocab_size or section["vocab_size"], args.seq_len or section["seq_length"],
                            args.num_kv_pairs, args.power_a, args.random_fill)
        except ValueError as e:
            return fail(p, e)
        device = next(model.parameters()).device
        test = mqar_batch(task, args.num_examples, torch.Generator().manual_seed(args.seed + 10))  # train's test set
        recall = evaluate_mqar(model, *(t.to(device) for t in test))
    print(f"MQAR recall {recall:.4f} (chance {task.chance:.6f}) on {args.num_examples} sequences of {task.seq_len} "
          f"tokens, {task.num_kv_pairs} key-value pairs; decode state {state_bytes_per_sequence(model, task.seq_len)} "
          f"bytes per sequence")
    return 0


if __name__ == "__main__":
    sys.exit(main())
