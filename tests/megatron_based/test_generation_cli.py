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


def test_bad_inputs_fail_in_one_line_before_anything_starts(tmp_path, capsys):
    """generate, eval and convert check their files and numbers (and the text and the prompts) before the process
    group and the model: each bad input below was a traceback, most after the model was built (or, for eval
    --stride 0 and --seq-length 0, silently the default), and a missing --json folder lost the result at the end."""
    import torch.distributed as dist

    from megatron_based.inference import evaluate, generation
    from megatron_based.inference.cli import convert_main

    cfg, text, empty, blob = (tmp_path / name for name in ("m.yaml", "text.txt", "empty.txt", "bad.safetensors"))
    cfg.write_text(CONFIG.format(pattern="CC"))
    text.write_text("In the beginning")
    empty.write_text("")
    blob.write_text("not a safetensors file")
    (tmp_path / "list.yaml").write_text("- model\n")
    gen = ["--config", str(cfg), "--checkpoint", str(tmp_path), "--tokenizer", "bytes", "--prompt", "In"]
    ev = ["--config", str(cfg), "--checkpoint", str(tmp_path), "--tokenizer", "bytes", "--text", str(text)]
    cases = [
        (generation.main, [*gen, "--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
        (generation.main, [*gen[:3], str(tmp_path / "none"), *gen[4:]], f"--checkpoint {tmp_path}/none does not exist"),
        (generation.main, [*gen[:5], str(tmp_path / "no.model"), *gen[6:]],
         f"--tokenizer {tmp_path}/no.model does not exist"),
        (generation.main, [*gen[:-1], ""], "--prompt '' has no tokens: give every prompt some text"),
        (generation.main, [*gen, "--top-p", "0"], "need --temperature >= 0, --top-k >= 0 and 0 < --top-p <= 1; got "
                                                  "0.0, 0, 0.0"),
        (generation.main, [*gen, "--tensor-model-parallel-size", "2"], "--tensor-model-parallel-size 2 needs a "
         "multiple of 2 processes, this launch has 1: run it under torchrun --nproc-per-node 2"),
        (evaluate.main, [*ev[:-1], str(tmp_path / "none.txt")], f"--text {tmp_path}/none.txt does not exist"),
        (evaluate.main, [*ev[:-1], str(empty)], f"--text {empty} has 0 token(s): perplexity needs at least 2"),
        (evaluate.main, [*ev, "--stride", "0"], "--stride must be >= 1, got 0"),
        (evaluate.main, [*ev, "--seq-length", "0"], "--seq-length must be >= 1, got 0"),
        (evaluate.main, [*ev, "--json", str(tmp_path / "out" / "r.json")],
         f"--json {tmp_path}/out/r.json: its folder {tmp_path}/out does not exist; create it first"),
        (convert_main, ["import", "--config", str(cfg), "--input", str(tmp_path / "w.bin"), "--output", "o"],
         f"--input {tmp_path}/w.bin does not exist"),
        (convert_main, ["import", "--config", str(cfg), "--input", str(blob), "--output", "o"],
         f"checkpoint file {blob} is not a readable .safetensors file (Error while deserializing header: "),
        (convert_main, ["import", "--config", str(tmp_path / "list.yaml"), "--input", str(blob), "--output", "o"],
         f"{tmp_path}/list.yaml has no model: section (a mapping of the model's keys, as in configs/tiny.yaml)"),
    ]
    for main, argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (argv, err)
    assert not dist.is_initialized()


def test_a_weights_file_without_a_config_is_refused_by_name(tmp_path):
    """A weights file carries no model configuration; load_model said 'checkpoint directory ... does not exist'."""
    from megatron_based.inference.loader import load_model
    from megatron_based.model.config import ConfigError

    weights = tmp_path / "w.pt"
    torch.save({}, weights)
    with pytest.raises(ConfigError, match=f"^{weights} is a weights file, which carries no model configuration: give "
                                          r"the config \(a YAML with its model: section\) too$"):
        load_model(None, str(weights))
