"""The commands: megatron-based-convert (TP 2 shards and back), -eval (perplexity windows), -generate (streaming)."""
from __future__ import annotations

import math

import pytest
import torch

from tests.distributed import run_distributed

CONFIG = """model:
  layer_pattern: {pattern}
  hidden_size: 32
  num_attention_heads: 4
  feature_dim: 4
  swa_window: 6
  vocab_size: 256
  seq_length: 64
"""


def test_windows_cover_every_target_once():
    from megatron_based.inference.evaluate import windows

    for n, L, stride in [(100, 16, 16), (100, 16, 5), (17, 16, 16), (2, 8, 8), (50, 7, 1)]:
        scored = []
        for begin, end, first in windows(n, L, stride):
            assert end - begin <= L and first >= begin
            scored += list(range(first, end))
        assert scored == list(range(n - 1))
    with pytest.raises(ValueError, match="stride"):
        windows(10, 4, 5)


def _cli_worker(rank, world, tmp, texts):
    import io
    import json
    from contextlib import redirect_stdout

    import yaml

    from megatron_based.inference import convert, evaluate, generation
    from megatron_based.inference.cli import convert_main
    from megatron_based.model import build_model
    from megatron_based.model.config import model_spec_from_dict
    from megatron_based.runtime.parallel import initialize_parallel

    initialize_parallel(1)
    out = {}
    for pattern in ("CC", "CLS"):
        cfg = f"{tmp}/{pattern}.yaml"
        spec = model_spec_from_dict(yaml.safe_load(open(cfg))["model"], use_cpu_initialization=True)
        torch.manual_seed(0)
        model = build_model(spec.config, vocab_size=256, max_sequence_length=64).eval()
        for p in model.parameters():  # sharper logits than the N(0, 0.02) init
            p.data.mul_(8.0 if p.dim() > 1 else 1.0)
        state = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        torch.save(state, f"{tmp}/{pattern}.pt")
        # Convert: ours (TP=1 file) -> released safetensors -> TP=2 shards -> released again.
        convert_main(["export", "--config", cfg, "--input", f"{tmp}/{pattern}.pt", "--output",
                      f"{tmp}/{pattern}.safetensors"])
        convert_main(["import", "--config", cfg, "--input", f"{tmp}/{pattern}.safetensors", "--output",
                      f"{tmp}/{pattern}-tp2", "--tensor-model-parallel-size", "2"])
        convert_main(["export", "--config", cfg, "--input", f"{tmp}/{pattern}-tp2", "--output",
                      f"{tmp}/{pattern}-back.pt"])
        a = convert.read_tensors(f"{tmp}/{pattern}.safetensors")
        b = convert.read_tensors(f"{tmp}/{pattern}-back.pt")
        out[pattern, "convert"] = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        # Eval on the released file: exact mean cross-entropy of one full window, and the same with overlapping
        # windows when the overlap covers the receptive field (CC: 2 convs of 3 taps -> 5 tokens).
        ids = torch.tensor(list(texts.encode()))
        logits = model(ids[None, :-1], torch.arange(ids.numel() - 1)[None], attention_mask=None)[0, :, :256]
        want = torch.nn.functional.cross_entropy(logits.double(), ids[1:]).item()
        for stride in ((None, 40) if pattern == "CC" else (None,)):
            buf = io.StringIO()
            with redirect_stdout(buf):
                evaluate.main(["--checkpoint", f"{tmp}/{pattern}.safetensors", "--config", cfg, "--tokenizer",
                               "bytes", "--text", f"{tmp}/text.txt", "--seq-length", "64" if stride is None else "48",
                               *(["--stride", str(stride)] if stride else []), "--json", f"{tmp}/ppl.json"])
            got = json.load(open(f"{tmp}/ppl.json"))
            out[pattern, "eval", stride] = (got["loss"], want, got["ppl"], got["tokens"], buf.getvalue())
        # Generate: greedy continuation streamed to stdout equals argmax decoding of the full forward.
        buf = io.StringIO()
        with redirect_stdout(buf):
            generation.main(["--config", cfg, "--checkpoint", f"{tmp}/{pattern}.pt", "--tokenizer", "bytes",
                             "--prompt", "abc", "--max-new-tokens", "6"])
        seq = list(b"abc")
        for _ in range(6):
            seq.append(int(model(torch.tensor([seq]), torch.arange(len(seq))[None], attention_mask=None)[0, -1, :256]
                           .argmax()))
        out[pattern, "generate"] = (buf.getvalue(), bytes(seq).decode(errors="replace") + "\n")
    return out


def test_convert_eval_generate_commands(tmp_path):
    text = "In the beginning was the word, and the word was with BASED. " * 2
    (tmp_path / "text.txt").write_text(text[:63])  # 63 bytes: 62 targets, one window of 64
    for pattern in ("CC", "CLS"):
        (tmp_path / f"{pattern}.yaml").write_text(CONFIG.format(pattern=pattern))
    out = run_distributed(_cli_worker, 1, str(tmp_path), text[:63])[0]
    for pattern in ("CC", "CLS"):
        assert out[pattern, "convert"]
        loss, want, ppl, tokens, printed = out[pattern, "eval", None]
        assert tokens == 62 and loss == pytest.approx(want, rel=1e-5) and ppl == pytest.approx(math.exp(want))
        assert "perplexity" in printed
        streamed, expected = out[pattern, "generate"]
        assert streamed == expected
    loss, want, _, tokens, _ = out["CC", "eval", 40]
    assert tokens == 62 and loss == pytest.approx(want, rel=1e-5)
