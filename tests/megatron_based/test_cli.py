"""The command-line surface: fast --help with defaults, known third-party warnings hidden (and only those), progress
output that fits 80 columns and stays plain when piped, generation's spacing and its refusal of random weights."""
from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from megatron_based import cli
from megatron_based.runtime import noise

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env}, timeout=120)


def test_help_imports_neither_torch_nor_megatron_and_shows_defaults():
    code = ("import sys\nfrom megatron_based import cli\n"
            "for tool in ('train', 'preprocess', 'generate', 'convert', 'evaluate', 'mqar'):\n"
            "    assert getattr(cli, tool)(['--help']) == 0\n"
            "print('heavy', 'torch' in sys.modules, any(m.startswith('megatron.') for m in sys.modules))")
    out = _python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("heavy False False")
    assert out.stderr == ""  # no warning lines
    text = " ".join(out.stdout.split())  # argparse wraps lines at the terminal width
    assert "--dry-run" in text and "--verbose" in text and "--random-weights" in text
    assert "tokens to generate per prompt (default: 128)" in text
    assert "passes over the training set (default: 64)" in text
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "(default: True)" not in text  # a --no-X switch (store_false) shows no default that reads as "on"


def test_convert_runs_as_a_module():
    """``python -m megatron_based.inference.convert`` is megatron-based-convert (its __main__ block calls
    ``inference.cli.convert_main``), with the known warnings hidden there too."""
    out = subprocess.run([sys.executable, "-m", "megatron_based.inference.convert", "--help"], capture_output=True,
                         text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: megatron-based-convert")
    assert "{import,export}" in out.stdout
    assert "Warning" not in out.stderr, out.stderr


def test_train_help_lists_dry_run(capsys):
    assert cli.train(["--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert help_text.startswith("usage: megatron-based-train")
    assert "--dry-run check the config against the job size" in help_text


def test_known_warnings_hidden_unknown_kept(monkeypatch):
    monkeypatch.delenv("PYTHONWARNINGS", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        noise.quiet_known_warnings()
        warnings.warn("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.")
        warnings.warn("torch.distributed is disabled, unavailable or uninitialized, assuming the intent is to load "
                      "in a single process.")
        warnings.warn("barrier(): using the device under current context. You can specify `device_id` in "
                      "`init_process_group` to mute this warning.")
        warnings.warn("The AccumulateGrad node's stream does not match the stream of the node that produced the "
                      "incoming gradient. This may incur unnecessary synchronization ...")
        warnings.warn("something we have not seen before")
        nonleaf = "The .grad attribute of a Tensor that is not a leaf Tensor is being accessed."
        warnings.warn_explicit(nonleaf, UserWarning, "optimizer.py", 68, module="megatron.core.optimizer.optimizer")
        warnings.warn_explicit(nonleaf, UserWarning, "loop.py", 1, module="megatron_based.training.loop")  # ours: kept
    assert [str(w.message) for w in caught] == ["something we have not seen before", nonleaf]
    assert "ignore:Transformer Engine and Apex are not installed" in os.environ["PYTHONWARNINGS"].split(",")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        noise.quiet_known_warnings(verbose=True)
        warnings.warn("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.")
    assert len(caught) == 1


def test_the_suite_hides_the_known_warnings_too():
    """tests/conftest.py applies the entry points' warning filters in every test (one list: noise.KNOWN_WARNINGS)."""
    with warnings.catch_warnings(record=True) as caught:  # this test's filters, recording what passes them
        warnings.warn("The AccumulateGrad node's stream does not match the stream of the node that produced the "
                      "incoming gradient.")
        warnings.warn("a warning the suite shows")
    assert [str(w.message) for w in caught] == ["a warning the suite shows"]


def test_known_log_lines_hidden_unknown_kept(caplog):
    noise.quiet_known_warnings()
    with caplog.at_level(logging.WARNING):
        logging.getLogger("megatron.core.models.gpt.gpt_model").warning("GPTModel IS DEPRECATED. GPTModel is ...")
        logging.getLogger("megatron.core.models.gpt.gpt_model").warning("another message")
        logging.getLogger("torch.utils.cpp_extension").warning("No CUDA runtime is found, using CUDA_HOME='x'")
        logging.getLogger("megatron.core.transformer.cuda_graphs").warning(
            "Transformer Engine was not detected while capturing training cudagraphs.As a result cudagraph memory ...")
    assert [r.getMessage() for r in caplog.records] == ["another message"]


def test_cuda_graph_capture_summary_reaches_the_run_log(monkeypatch):
    """Megatron's capture summary (INFO, logged after its graphs are built) goes to the run log as one "CUDA graphs:"
    line, its tqdm bar is off; its other INFO records (progress) do not; a second call replaces the first handler."""
    import importlib

    name = noise.CUDA_GRAPH_SUMMARY[0]
    monkeypatch.setattr(importlib.import_module(name), "HAVE_TQDM", True)
    log = logging.getLogger(name)
    monkeypatch.setattr(log, "level", logging.NOTSET)
    monkeypatch.setattr(log, "handlers", [])
    printed, earlier = [], []
    noise.report_cuda_graph_captures(earlier.append)
    noise.report_cuda_graph_captures(printed.append)
    log.info("Creating 54 CUDA graphs")
    log.info("53/54. create cuda graphs | mem: alloc 4.3 gb, res 4.6 gb")
    log.info("> built 54 cuda graph(s) in 1.31 sec, with total memory usage: allocated 3.2 gb, reserved 7.1 gb.")
    log.info("> built 2 cuda graph(s) in 0.50 sec.")  # without the memory part
    assert printed == ["CUDA graphs: built 54 cuda graph(s) in 1.31 sec (memory change over the capture: allocated "
                       "3.2 gb, reserved 7.1 gb)", "CUDA graphs: built 2 cuda graph(s) in 0.50 sec"] and not earlier
    assert log.getEffectiveLevel() == logging.INFO and not importlib.import_module(name).HAVE_TQDM


def test_child_processes_inherit_the_filter(monkeypatch):
    monkeypatch.delenv("PYTHONWARNINGS", raising=False)
    noise.quiet_known_warnings()
    out = _python("import warnings\nwarnings.warn('Transformer Engine and Apex are not installed. Falling back.')\n"
                  "warnings.warn('kept')")
    assert out.returncode == 0
    assert "Transformer Engine" not in out.stderr and "UserWarning: kept" in out.stderr


def test_progress_line_keeps_count_and_eta_at_80_columns():
    from rich.console import Console

    from megatron_based.training.logs import progress_bar

    console = Console(width=80, record=True, force_terminal=True, file=io.StringIO())
    bar = progress_bar(True, console)
    stats = "loss 3.1416  lr 3.00e-04  grad_norm 1.234  tokens/s 123,456  TFLOP/s 312.5  MFU 31.6%"
    task = bar.add_task("step", total=10000, completed=0, stats=stats)
    bar.update(task, completed=1234)
    console.print(bar.make_tasks_table(bar.tasks))
    lines = console.export_text().rstrip("\n").split("\n")
    assert len(lines) == 1 and len(lines[0]) <= 80
    assert re.match(r"step +1234/10000 ETA (-:--:--|\d+:\d\d:\d\d) ", lines[0]), lines[0]
    assert "loss 3.1416" in lines[0] and lines[0].rstrip().endswith("…")  # stats cropped, not wrapped


def test_piped_training_log_is_plain(capsys):
    from megatron_based.training.logs import TrainLogger

    logger = TrainLogger(total_steps=3, start_step=0, enabled=True, tensorboard_dir=None)
    for step in (1, 2, 3):
        logger.step(step, {"loss": 2.5, "lr": 1e-3})
    logger.print("validation loss 2.4")
    logger.close()
    out = capsys.readouterr().out
    assert "\x1b" not in out
    assert out == "".join(f"step {s}  loss 2.5  lr 1.00e-03\n" for s in (1, 2, 3)) + "validation loss 2.4\n"


def test_piped_progress_bar_writes_no_escape_codes():
    from rich.console import Console

    from megatron_based.training.logs import progress_bar

    piped = io.StringIO()
    with progress_bar(True, Console(file=piped)) as bar:
        task = bar.add_task("tokenizing", total=10, stats="bytes")
        bar.update(task, completed=10)
    assert "\x1b" not in piped.getvalue() and "tokenizing 10/10 ETA" in piped.getvalue()


def test_mqar_training_prints_plain_lines_when_piped(capsys):
    """One plain line per epoch (no progress bar, no escape codes), then the early stop's."""
    from megatron_based.tasks.mqar import MQARTask, mqar_dataset, train_mqar

    class Bigram(torch.nn.Module):  # the GPTModel interface mqar_logits uses: its output hook on [s, b, d] states
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(64, 16)
            self.out = torch.nn.Linear(16, 64, bias=False)

        def forward(self, x, positions, attention_mask=None, output_processor=None, output_processor_context=None):
            return output_processor(hidden_states=self.emb(x).transpose(0, 1), output_weight=self.out.weight,
                                    output_layer=lambda h, weight, runtime_gather_output: (h @ weight.t(), None),
                                    context=output_processor_context)

    train, test = mqar_dataset(MQARTask(64, 32, 4), 64, 16)
    history = train_mqar(Bigram(), train, test, epochs=3, batch_size=16)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("  ")[0] for line in lines] == [f"epoch {e}/3" for e in (1, 2, 3)]
    assert lines[-1].startswith(f"epoch 3/3  loss {history[-1]['loss']:.4f}") and "\x1b" not in "".join(lines)
    assert train_mqar(Bigram(), train, train, epochs=3, batch_size=16, early_stop=-1.0, log=None)[-1]["epoch"] == 1


def test_generate_refuses_random_weights_unless_asked(tmp_path, capsys):
    from megatron_based.inference import generation

    cfg = tmp_path / "m.yaml"
    cfg.write_text("model:\n  layer_pattern: CC\n  hidden_size: 32\n  num_attention_heads: 4\n")
    assert generation.main(["--config", str(cfg), "--tokenizer", "bytes", "--prompt", "the fox"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--checkpoint" in err and "--random-weights" in err
    assert generation.main(["--config", str(cfg), "--checkpoint", "x.pt", "--random-weights", "--tokenizer",
                            "bytes", "--prompt", "the fox"]) == 2


@pytest.fixture(scope="module")
def sentencepiece_tokenizer(tmp_path_factory):
    from megatron_based.training import data

    root = tmp_path_factory.mktemp("spm")
    corpus = (Path(data.__file__).parents[1] / "tasks" / "demo_data" / "kjv.txt").read_text()[:30_000]
    (root / "text.txt").write_text(corpus + "\n\nthe fox walked to the river\n")
    return data.load_tokenizer(data.train_tokenizer([str(root / "text.txt")], str(root / "tok"), 512))


def test_continuation_keeps_the_space_sentencepiece_drops(sentencepiece_tokenizer):
    from megatron_based.inference.generation import continuation_text

    tok = sentencepiece_tokenizer
    prompt = tok.tokenize("the fox")
    full = tok.tokenize("the fox walked")
    assert full[: len(prompt)] == prompt
    new = full[len(prompt):]
    assert tok.detokenize(new) == "walked"  # decoded alone: the space is lost ("the fox" + "walked")
    assert continuation_text(tok.detokenize, prompt, new) == " walked"
    streamed = "".join(continuation_text(tok.detokenize, prompt, new[:i + 1])[len(
        continuation_text(tok.detokenize, prompt, new[:i])):] for i in range(len(new)))
    assert "the fox" + streamed == "the fox walked"
