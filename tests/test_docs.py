"""Every ```bash and ```python block of README.md and docs/*.md runs as written, so the documentation cannot drift.

Each documented command (a bash line with its continuations, comments dropped) and each python block is a key of
:data:`COMMANDS`: the value is what runs here instead (``AS_WRITTEN``, a CPU-sized variant: the ``--dry-run`` of a
GPU job at its documented layout, fewer steps of a real CPU run, the small fixture corpus's vocabulary), or
``Skip(reason)``. A documented command missing from the table fails the test, and so does a table entry the docs no
longer have. Commands run in a temporary directory holding the repository's ``configs``/``launch`` and fixtures at
the documented paths: a corpus made from the shipped KJV text, ``runs/demo/data/kjv``, a 2-step
``runs/demo/checkpoints``, ``data/web``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
KJV = REPO / "megatron_based" / "tasks" / "demo_data" / "kjv.txt"
AS_WRITTEN = "as written"


@dataclass(frozen=True)
class Skip:
    reason: str


@dataclass(frozen=True)
class DryRun:
    """A GPU job's documented command, run as ``command``; the plan must show ``world_size`` processes."""
    command: str
    world_size: int


COMMANDS: dict[tuple[str, str], object] = {
    # README.md
    ("README.md", "make demo"): Skip("CI runs it (builds .venv, trains the demo: minutes)"),
    ("README.md", "make test"): Skip("CI runs it (the whole suite)"),
    ("README.md", "megatron-based-preprocess corpus.jsonl --output-prefix data/corpus --vocab-size 32000"):
        "megatron-based-preprocess corpus.jsonl --output-prefix data/corpus --vocab-size 1024",  # small fixture corpus
    ("README.md", "torchrun --nproc_per_node 8 -m megatron_based.training.loop configs/based-360m.yaml "
                  "data.path=[data/corpus] data.tokenizer_model=data/corpus.model train.save=checkpoints/360m "
                  "parallel.tensor_model_parallel_size=2 train.global_batch_size=256 train.micro_batch_size=8"):
        DryRun("megatron-based-train configs/based-360m.yaml data.path=[data/corpus] "
               "data.tokenizer_model=data/corpus.model train.save=checkpoints/360m "
               "parallel.tensor_model_parallel_size=2 train.global_batch_size=256 train.micro_batch_size=8 "
               "--nproc-per-node 8 --dry-run", 8),
    ("README.md", "python:import torch"): AS_WRITTEN,
    # docs/architecture.md
    ("architecture.md", "python:config = TransformerConfig(num_layers=6, hidden_size=1024, num_attention_heads=16, "
                        "tensor_model_parallel_size=2)"):
        Skip("a fragment of a TP=2 job (2 processes); tests/megatron_based/test_model.py builds TP models"),
    ("architecture.md", "python:from dataclasses import dataclass"): AS_WRITTEN,
    # docs/generation.md
    ("generation.md", "python:from megatron_based.inference.generation import Generator"):
        Skip("a fragment (gen.step(next_tokens) needs a prefill's sampled tokens); test_generation.py runs the API"),
    ("generation.md", "megatron-based-generate --checkpoint runs/demo/checkpoints --tokenizer "
                      "runs/demo/data/kjv.model --prompt \"In the beginning\" --max-new-tokens 100 "
                      "--temperature 0.8 --top-p 0.95"): AS_WRITTEN,
    ("generation.md", "torchrun --nproc_per_node 2 -m megatron_based.inference.generation "
                      "--tensor-model-parallel-size 2 ..."):
        "torchrun --nproc_per_node 2 -m megatron_based.inference.generation --tensor-model-parallel-size 2 "
        "--checkpoint runs/demo/checkpoints --tokenizer runs/demo/data/kjv.model --prompt \"In the beginning\" "
        "--max-new-tokens 8",
    ("generation.md", "megatron-based-convert import --config configs/based-360m.yaml --input "
                      "based-360m/pytorch_model.bin --output ckpt/based-360m-tp2 --tensor-model-parallel-size 2"):
        Skip("needs the released based-360m weights (no download); tests/megatron_based/test_convert.py imports "
             "a fixture in the released layout"),
    ("generation.md", "hf download hazyresearch/based-360m pytorch_model.bin --local-dir based-360m"):
        Skip("a download (no network in tests)"),
    ("generation.md", "megatron-based-generate --config configs/based-360m.yaml --checkpoint ckpt/based-360m-tp2 "
                      "..."):
        Skip("needs the import above (the released based-360m weights)"),
    ("generation.md", "megatron-based-convert export --config configs/based-360m.yaml --input "
                      "ckpt/based-360m-tp2 --output back.safetensors"):
        Skip("needs the import above (the released based-360m weights)"),
    ("generation.md", "megatron-based-convert export --config configs/tiny.yaml --input runs/demo/checkpoints "
                      "--output demo.safetensors"): AS_WRITTEN,
    ("generation.md", "megatron-based-eval --checkpoint runs/demo/checkpoints --tokenizer runs/demo/data/kjv.model "
                      "--text valid.txt --seq-length 2048 --stride 1024 --json ppl.json"): AS_WRITTEN,
    # docs/launching.md
    ("launching.md", "NPROC_PER_NODE=8 launch/torchrun.sh configs/based-360m.yaml "
                     "parallel.tensor_model_parallel_size=2 --dry-run"):
        DryRun("NPROC_PER_NODE=8 launch/torchrun.sh configs/based-360m.yaml parallel.tensor_model_parallel_size=2 "
               "--dry-run", 8),
    ("launching.md", "python -m megatron_based.training.plan configs/based-360m.yaml --nnodes 4 --nproc-per-node 8 "
                     "--gpu-memory-gib 80"):
        DryRun("python -m megatron_based.training.plan configs/based-360m.yaml --nnodes 4 --nproc-per-node 8 "
               "--gpu-memory-gib 80", 32),
    ("launching.md", "launch/torchrun.sh configs/tiny.yaml"): "launch/torchrun.sh configs/tiny.yaml "
                                                              "train.train_steps=2 train.lr_warmup_steps=1",
    ("launching.md", "NPROC_PER_NODE=2 launch/torchrun.sh configs/tiny.yaml"):
        "NPROC_PER_NODE=2 launch/torchrun.sh configs/tiny.yaml train.train_steps=2 train.lr_warmup_steps=1 train.save=runs/tiny2",
    ("launching.md", "NNODES=4 MASTER_ADDR=node001 MASTER_PORT=29500 RDZV_ID=run42 launch/torchrun.sh "
                     "configs/based-1.3b.yaml"):
        DryRun("NPROC_PER_NODE=8 NNODES=4 MASTER_ADDR=node001 MASTER_PORT=29500 RDZV_ID=run42 launch/torchrun.sh "
               "configs/based-1.3b.yaml --dry-run", 32),
    ("launching.md", "NNODES=2 GPUS_PER_NODE=8 SBATCH_ARGS=\"--partition=gpu --account=me\" launch/submit.sh "
                     "configs/based-360m.yaml"):
        DryRun("NNODES=2 GPUS_PER_NODE=8 SBATCH_ARGS=\"--partition=gpu --account=me\" launch/submit.sh "
               "configs/based-360m.yaml --dry-run", 16),
    ("launching.md", "pip install -e '.[mpi]'"): Skip("an install step: .venv has the extras"),
    ("launching.md", "NPROC_PER_NODE=8 launch/mpirun.sh configs/based-360m.yaml"):
        DryRun("NPROC_PER_NODE=8 launch/mpirun.sh configs/based-360m.yaml --dry-run", 8),
    ("launching.md", "NNODES=2 NPROC_PER_NODE=8 HOSTFILE=hosts.txt launch/mpirun.sh configs/based-360m.yaml"):
        DryRun("NNODES=2 NPROC_PER_NODE=8 HOSTFILE=hosts.txt launch/mpirun.sh configs/based-360m.yaml --dry-run",
               16),
    ("launching.md", "DS_BUILD_OPS=0 pip install -e '.[deepspeed]'"): Skip("an install step: .venv has the extras"),
    ("launching.md", "ZERO_STAGE=2 NPROC_PER_NODE=8 launch/deepspeed.sh configs/based-360m.yaml"):
        DryRun("ZERO_STAGE=2 NPROC_PER_NODE=8 launch/deepspeed.sh configs/based-360m.yaml --dry-run", 8),
    # docs/mqar.md
    ("mqar.md", "megatron-based-mqar train --model based --hidden-size 64 --feature-dim 16 --lr 3e-3 --json "
                "based-d64-f16.json"):
        "megatron-based-mqar train --model based --hidden-size 64 --feature-dim 16 --lr 3e-3 --json based-d64-f16.json "
        "--vocab-size 64 --seq-len 32 --num-kv-pairs 4 --num-train 64 --num-examples 32 --batch-size 32 --epochs 1",
    ("mqar.md", "megatron-based-mqar train --pattern CLS --mlp --vocab-size 128 --seq-len 64 --num-kv-pairs 4 "
                "--num-train 2000 --epochs 2 --save mqar.pt"):
        "megatron-based-mqar train --pattern CLS --mlp --vocab-size 128 --seq-len 64 --num-kv-pairs 4 --num-train 64 "
        "--num-examples 64 --epochs 1 --save mqar.pt",
    ("mqar.md", "megatron-based-mqar eval --checkpoint mqar.pt --num-kv-pairs 4"):
        "megatron-based-mqar eval --checkpoint mqar.pt --num-kv-pairs 4 --num-examples 64",
    ("mqar.md", "python benchmarks/mqar_sweep.py --time-limit 540"):
        Skip("the GPU grid (hours of CPU time; it rewrites benchmarks/results and docs/mqar.md); "
             "test_mqar.py::test_mqar_sweep_smoke runs its whole pipeline (--smoke)"),
    ("mqar.md", "python benchmarks/mqar_sweep.py --smoke --out-dir mqar-smoke"):
        Skip("test_mqar.py::test_mqar_sweep_smoke runs this command (its --out-dir in a temporary folder) and checks "
             "what it writes"),
    ("mqar.md", "git clone https://github.com/HazyResearch/zoology ../zoology"): Skip("downloads Zoology (network)"),
    ("mqar.md", "python benchmarks/zoology_mqar.py --zoology-repo ../zoology --out-dir runs/zoology-t256 --seq-len 256 "
                "--num-kv-pairs 16"):
        Skip("hours of training with a Zoology clone; tests/benchmarks/test_zoology_mqar.py runs the script at a "
             "tiny size"),
    # docs/parallelism.md
    ("parallelism.md", "python:from megatron_based.runtime.comm_stats import count_collectives"):
        Skip("a fragment inside a CP/TP job's step (loss from a model across processes); "
             "tests/megatron_based/test_context_parallel.py counts collectives"),
    # docs/training.md
    ("training.md", "make demo"): Skip("CI runs it (builds .venv, trains the demo: minutes)"),
    ("training.md", "make wheels"): Skip("downloads from PyPI (network); test_make_wheels_fetches_the_pinned_versions "
                                         "checks what it runs"),
    ("training.md", "megatron-based-preprocess corpus/*.jsonl --output-prefix data/web --vocab-size 50257"):
        "megatron-based-preprocess corpus/*.jsonl --output-prefix data/web --vocab-size 1024",
    ("training.md", "torchrun --nproc_per_node 8 -m megatron_based.training.loop configs/based-360m.yaml "
                    "data.path=[data/web] data.tokenizer_model=data/web.model train.save=checkpoints/360m"):
        DryRun("megatron-based-train configs/based-360m.yaml data.path=[data/web] data.tokenizer_model=data/web.model "
               "train.save=checkpoints/360m --nproc-per-node 8 --dry-run", 8),
    ("training.md", "torchrun --nproc_per_node 8 -m megatron_based.training.loop configs/based-360m.yaml ... "
                    "--load latest"):
        Skip("resumes a run with a checkpoint: tests/megatron_based/test_train.py resumes with --load latest"),
    ("training.md", "cd Megatron-LM"): Skip("Megatron-LM's own checkout, not installed here"),
    ("training.md", 'SUITE_ONLY=1 SUITE_TIMEOUT=500 GPU_TESTS="tests/kernels" bash benchmarks/run_gpu_suite.sh'):
        Skip("the GPU suite's first half, on the GPU machine (make test-gpu: tests marked gpu, skipped here)"),
    ("training.md", 'SUITE_ONLY=1 SUITE_TIMEOUT=500 GPU_TESTS="--ignore=tests/kernels tests" bash '
                    'benchmarks/run_gpu_suite.sh'):
        Skip("the GPU suite's second half, on the GPU machine (make test-gpu: tests marked gpu, skipped here)"),
    ("training.md", "BASED_SPEC_CONFIG=/path/to/megatron-based/configs/based-360m.yaml torchrun --nproc_per_node 8 "
                    "pretrain_gpt.py --spec megatron_based.model.megatron_lm based_layer --num-layers 27 --hidden-size 1024 "
                    "--num-attention-heads 16 --ffn-hidden-size 2048 --seq-length 2048 --max-position-embeddings "
                    "2048 --position-embedding-type none --normalization RMSNorm --norm-epsilon 1e-5 --swiglu "
                    "--disable-bias-linear --hidden-dropout 0 --attention-dropout 0 --init-method-std 0.02 "
                    "--make-vocab-size-divisible-by 8 --micro-batch-size 4 --global-batch-size 256 --train-iters "
                    "20000 --lr 8e-4 --min-lr 8e-5 --lr-decay-style cosine --lr-warmup-iters 1000 --weight-decay 0.1 "
                    "--adam-beta2 0.95 --clip-grad 1.0 --bf16 ..."):
        Skip("Megatron-LM's pretrain_gpt.py on 8 GPUs; tests/megatron_based test the spec through Megatron-LM's "
             "argument parsing"),
}


def documented_commands() -> list[tuple[str, str, str]]:
    """``(file name, key, text)`` for each bash command and python block of the docs, in document order; a command
    documented twice in one file is listed once."""
    found = []
    for path in DOCS:
        for lang, body in re.findall(r"^```(bash|python)\n(.*?)^```", path.read_text(), re.M | re.S):
            if lang == "python":
                found.append((path.name, "python:" + body.splitlines()[0], body))
                continue
            for line in body.replace("\\\n", " ").splitlines():
                command = " ".join(re.sub(r"(^|\s)#.*$", "", line).split())
                if command and (path.name, command, command) not in found:
                    found.append((path.name, command, command))
    return found


def test_every_documented_command_is_in_the_table():
    keys = [(name, key) for name, key, _ in documented_commands()]
    new = [k for k in keys if k not in COMMANDS]
    assert not new, f"documented but not in tests/test_docs.py's COMMANDS (add how to run them here): {new}"
    gone = [k for k in COMMANDS if k not in keys]
    assert not gone, f"in COMMANDS but no longer documented (remove them): {gone}"


# documented commands whose run makes fixtures (``workdir``): the corpus of the README's preprocess is also
# runs/demo/data/kjv and data/web, the tiny run's checkpoint also runs/demo/checkpoints. Each runs once, as its
# COMMANDS entry says, and its test checks that run.
FIXTURE_COMMANDS = [
    ("README.md", "megatron-based-preprocess corpus.jsonl --output-prefix data/corpus --vocab-size 32000"),
    ("launching.md", "launch/torchrun.sh configs/tiny.yaml")]
_fixture_runs: dict[str, subprocess.CompletedProcess] = {}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A directory with the repository's configs and launchers and the fixtures the documented commands read."""
    root = tmp_path_factory.mktemp("docs")
    for name in ("configs", "launch", "benchmarks"):
        (root / name).symlink_to(REPO / name)
    text = KJV.read_text()
    docs = [d for d in text.split("\n\n") if d.strip()]
    (root / "corpus").mkdir()
    lines = "".join(json.dumps({"text": d}) + "\n" for d in docs)
    (root / "corpus.jsonl").write_text(lines)
    (root / "corpus" / "kjv.jsonl").write_text(lines)
    (root / "valid.txt").write_text(text[:20000])
    preprocess, train = (COMMANDS[key] for key in FIXTURE_COMMANDS)
    out = _fixture_runs[preprocess] = run(preprocess, root)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for prefix in ("runs/demo/data/kjv", "data/web"):  # the same corpus and vocabulary
        (root / prefix).parent.mkdir(parents=True, exist_ok=True)
        for f in (root / "data").glob("corpus.*"):
            shutil.copy(f, root / (prefix + f.name[len("corpus"):]))
    out = _fixture_runs[train] = run(train, root)  # trains on runs/demo/data/kjv (configs/tiny.yaml)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    shutil.copytree(root / "runs" / "tiny" / "checkpoints", root / "runs" / "demo" / "checkpoints")
    return root


def run(command: str, cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"], "PYTHON": sys.executable,
           "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    env.pop("NPROC_PER_NODE", None)
    env.pop("NNODES", None)
    return subprocess.run(command, shell=True, executable="/bin/bash", cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


CASES = [(name, key, text) for name, key, text in documented_commands()]


@pytest.mark.parametrize("name,key,text", CASES, ids=[f"{n}:{k[:60]}" for n, k, _ in CASES])
def test_documented_command_runs(workdir, name, key, text):
    how = COMMANDS.get((name, key))
    if how is None:
        pytest.fail(f"{name}: {key!r} is not in COMMANDS")
    if isinstance(how, Skip):
        pytest.skip(how.reason)
    if key.startswith("python:"):
        (workdir / "block.py").write_text(text)
        command = f"{sys.executable} block.py"
    else:
        command = text if how == AS_WRITTEN else how.command if isinstance(how, DryRun) else how
    out = _fixture_runs.get(command) or run(command, workdir)  # the fixture ran it already, or run it now
    log = out.stdout + out.stderr
    assert out.returncode == 0, f"{command}\n{log[-4000:]}"
    if isinstance(how, DryRun):
        processes = re.search(r"processes\s*│\s*(\d+) = (\d+) node", out.stdout)
        assert processes and int(processes.group(1)) == how.world_size, log[-3000:]


def test_make_wheels_fetches_the_pinned_versions():
    """``make wheels`` (docs/training.md) downloads pyproject.toml's megatron-core pin, as cp312 wheels only."""
    plan = subprocess.run(["make", "-n", "wheels"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert plan.returncode == 0, plan.stderr
    pin = re.search(r'"(megatron-core==[0-9.]+)"', (REPO / "pyproject.toml").read_text())[1]
    assert f" {pin} " in plan.stdout and "--only-binary=:all: --python-version 3.12 -d .whl" in plan.stdout
    assert "fla-core==" in plan.stdout, plan.stdout
