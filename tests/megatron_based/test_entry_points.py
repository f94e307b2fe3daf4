"""The entry points as users run them, in fresh processes: ``megatron-based-train`` under torchrun with periodic
saves, SIGKILL of the whole process group mid-run, a resume from the save directory's ``latest``, and the resumed
run's losses and gradient norms equal to the killed run's for the steps it ran past its checkpoint, exactly
(full-precision values from ``train.metrics_file``); then ``megatron-based-generate`` and ``megatron-based-eval`` on
the checkpoint it wrote, and the demo.

- CPU (CI): the tiny model on 2 gloo processes (Megatron's distributed optimizer, as on GPUs).
- ``gpu``: a based-360m-size model on every local GPU in bf16, eager (``model.cuda_graph_impl: none``) and with
  Megatron's CUDA graphs (the default ``auto``) plus gradient accumulation and validation in between; ``make demo``
  as written (CUDA-graphed by default).
- ``multigpu`` (2 GPUs): TP=2 + SP, CP=2 and PP=2 runs match a data-parallel run in bf16, and their checkpoints
  resume at TP=1.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "megatron_based" / "tasks" / "demo_data" / "kjv.txt"
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0


STARTED: list[subprocess.Popen] = []  # every process started here: the GPU jobs' teardown kills those still alive


def popen(cmd, **kw) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, **kw)
    STARTED.append(proc)
    return proc


def tool(name: str) -> list[str]:
    """The installed console script (how users run it), else ``python -m`` of its module."""
    exe = Path(sys.executable).with_name(name)
    if exe.exists():
        return [str(exe)]
    module = {"megatron-based-train": "megatron_based.training.loop",
              "megatron-based-generate": "megatron_based.inference.generation",
              "megatron-based-eval": "megatron_based.inference.evaluate"}[name]
    return [sys.executable, "-m", module]


def torchrun(nproc: int, name: str) -> list[str]:
    cmd = tool(name)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return launcher + (["--no-python", *cmd] if len(cmd) == 1 else cmd[1:])


def env(autotune: bool = True) -> dict:
    """The subprocess environment. ``autotune``: the kernels tune as users' runs do (the GPU suite's conftest turns
    tuning off for its in-process tests, BASED_KERNELS_AUTOTUNE=0); False: each kernel launches its first config."""
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if autotune:
        e.pop("BASED_KERNELS_AUTOTUNE", None)
    else:
        e["BASED_KERNELS_AUTOTUNE"] = "0"
    return e


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    return make_corpus(tmp_path_factory.mktemp("entry_corpus"))


def make_corpus(root: Path) -> dict:
    """The shipped corpus (a 60 KB slice on CPU) with its own 1024-piece tokenizer."""
    from megatron_based.training.data import preprocess

    text = root / "kjv.txt"
    data = CORPUS.read_bytes()
    text.write_bytes(data if GPUS else data[:60_000])
    info = preprocess([str(text)], str(root / "kjv"), vocab_size=1024, show_progress=False)
    return {"prefix": info["prefix"], "tokenizer": info["tokenizer_model"], "text": text}


@dataclass
class Setup:
    config: str
    nproc: int
    steps: int
    save_interval: int
    kill_after: int  # SIGKILL the group once this step is logged
    overrides: list[str] = field(default_factory=list)
    timeout: float = 600
    autotune: bool = True  # False: BASED_KERNELS_AUTOTUNE=0 (every process launches each kernel's first config)
    log_lines: tuple[str, ...] = ()  # text the killed run's log holds
    log_absent: tuple[str, ...] = ()  # text it does not hold


def cpu_setup() -> Setup:
    return Setup("configs/tiny.yaml", 2, steps=40, save_interval=4, kill_after=6, overrides=[
        "model.seq_length=64", "train.micro_batch_size=2", "train.global_batch_size=4", "train.lr_warmup_steps=2",
        "train.eval_interval=0"], timeout=300)


def gpu_setup(graphs: bool) -> Setup:
    """based-360m (27 layers, d 1024, vocab 50257) at T 2048 on every GPU, 32k tokens per GPU and step (a fifth of
    a second): the run saves at step 4 (the default fully-reshardable optimizer format; dp_reshardable with
    graphs, so both formats resume on GPUs) and is killed after step 7, during step 8 or its save; steps 5-7 are
    compared and generate / eval read the step-4 checkpoint; the kernels autotune, as users' runs do. ``graphs``: CUDA
    graphs (the config's default, model.cuda_graph_impl auto; its log says so), 4 accumulated micro-batches per step
    and validation every 3 steps, each kernel's first config (the suite's time budget; the kernel tests run the
    others); else eager (model.cuda_graph_impl none)."""
    micro, accumulate = (4, 4) if graphs else (16, 1)
    extra = ["train.eval_interval=3", "train.eval_iters=2", "train.optimizer_checkpoint_format=dp_reshardable"] \
        if graphs else ["model.cuda_graph_impl=none", "train.eval_interval=0"]
    # with graphs, Megatron's capture summary in our log instead of its tqdm bar ("create cuda graphs ...")
    log_lines = ("CUDA graphs: on (model.cuda_graph_impl: auto)", "CUDA graphs: built ") if graphs else (
        "CUDA graphs: off (model.cuda_graph_impl: none)",)
    return Setup("configs/based-360m.yaml", GPUS, steps=8, save_interval=4, kill_after=7, timeout=240,
                 autotune=not graphs, log_lines=log_lines, log_absent=("create cuda graphs",), overrides=[
        "model.seq_length=2048", f"train.micro_batch_size={micro}",
        f"train.global_batch_size={micro * accumulate * GPUS}", "train.lr=3e-4", "train.min_lr=3e-5",
        "train.lr_warmup_steps=2", *extra])


def run_overrides(setup: Setup, corpus: dict, root: Path, metrics: Path, save: bool = True) -> list[str]:
    saves = ([f"train.save={root / 'ckpt'}", f"train.save_interval={setup.save_interval}"] if save
             else ["train.save=", "train.save_interval=0"])
    return [f"data.path=[{corpus['prefix']}]", f"data.tokenizer_model={corpus['tokenizer']}", "data.split=95,5,0",
            f"data.cache_dir={root / 'cache'}", *saves, f"train.train_steps={setup.steps}", "train.log_interval=1",
            "train.progress=false", f"train.metrics_file={metrics}", *setup.overrides]


def start_train(setup: Setup, corpus: dict, root: Path, metrics: Path, *extra: str, nproc: int | None = None,
                save: bool = True):
    """``save=False``: no checkpoint at all (a reference run whose losses are all that is compared)."""
    root.mkdir(parents=True, exist_ok=True)
    log = (root / f"{metrics.stem}.log").open("w")
    cmd = [*torchrun(nproc or setup.nproc, "megatron-based-train"), str(REPO / setup.config),
           *run_overrides(setup, corpus, root, metrics, save), *extra]
    return popen(cmd, env=env(setup.autotune), stdout=log, stderr=subprocess.STDOUT)


def finish(proc, root: Path, metrics: Path, timeout: float) -> None:
    start = time.time()
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        kill_all(proc)
        code = "timeout"
    log = (root / f"{metrics.stem}.log").read_text()
    print(f"{root.parent.name}/{root.name}/{metrics.stem}: exit {code} after {time.time() - start:.0f} s",
          flush=True)  # with -s
    assert code == 0, f"exit {code}:\n{log[-4000:]}"


def keep_log(path: Path, label: str, code, stdout: str, stderr: str, start: float) -> None:
    """A finished subprocess's exit and wall time, printed (seen with -s), and with its output in ``path``
    (benchmarks/run_gpu_suite.sh brings the suite's logs back: where an entry point spends its time)."""
    took = time.time() - start
    print(f"{label}: exit {code} after {took:.0f} s", flush=True)
    path.write_text(f"exit {code} after {took:.1f} s\n{stdout}\n{stderr}")


def train_steps(metrics: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    return {r["step"]: r for r in rows if r["split"] == "train"}


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts each worker in a session of its own, so the launcher's process
    group does not hold them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_group_after(proc, metrics: Path, step: int, timeout: float) -> None:
    """SIGKILL every process of the run (launcher and workers, as a node failure or a scheduler's cgroup kill
    does) once ``step`` is logged."""
    deadline = time.time() + timeout
    while max(train_steps(metrics), default=0) < step:
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before step {step}"
        assert time.time() < deadline, f"step {step} not reached in {timeout} s"
        time.sleep(0.05)
    kill_all(proc)


def kill_all(proc) -> None:
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def assert_same_steps(resumed: dict, reference: dict, steps, exact: bool = True, rtol: float = 0.0) -> None:
    for s in steps:
        for key in ("loss", "grad norm"):
            a, b = resumed[s][key], reference[s][key]
            if exact:
                assert a == b, f"step {s} {key}: resumed {a!r} != uninterrupted {b!r}"
            else:
                assert math.isclose(a, b, rel_tol=rtol), f"step {s} {key}: {a!r} vs {b!r} (rtol {rtol})"


def kill_and_resume(setup: Setup, corpus: dict, root: Path, alongside=None) -> tuple[Path, dict]:
    """A run saves every ``save_interval`` steps and is SIGKILLed (every process of it) once step ``kill_after``
    is logged, past its last save, or during the next one; a fresh run resumes from its save directory's
    ``latest`` and its losses, gradient norms and validation losses for the steps the killed run logged after that
    checkpoint equal the killed run's bit for bit (the killed run is the uninterrupted reference up to the kill: no
    third process). The resumed run saves nothing (a save costs ~16 s at based-360m size on an H200; the GPU suite
    has a time budget). ``alongside(save_dir, killed_rows)``: started with the resumed run (e.g. generate / eval on
    the checkpoint), it returns a check that runs once the resumed run is done. Returns the save directory and the
    killed run's training rows."""
    run = root / "killed"
    proc = start_train(setup, corpus, run, run / "first.jsonl")
    start = time.time()
    kill_group_after(proc, run / "first.jsonl", setup.kill_after, setup.timeout)
    print(f"{root.name}/killed/first: killed after {time.time() - start:.0f} s", flush=True)
    log = (run / "first.log").read_text()
    assert all(line in log for line in setup.log_lines), (setup.log_lines, log[-3000:])
    assert not any(text in log for text in setup.log_absent), (setup.log_absent, log[-3000:])
    saved = (run / "ckpt" / "latest").read_text().strip()
    resumed_from = int(saved.split("_")[1])
    first = train_steps(run / "first.jsonl")
    compared = [s for s in sorted(first) if s > resumed_from]
    assert 0 < resumed_from < setup.steps and compared, (saved, sorted(first))
    proc = start_train(setup, corpus, run, run / "resumed.jsonl", "--load", str(run / "ckpt"), save=False)
    check_alongside = alongside(run / "ckpt", first) if alongside else None
    finish(proc, run, run / "resumed.jsonl", setup.timeout)
    resumed = train_steps(run / "resumed.jsonl")
    assert sorted(resumed) == list(range(resumed_from + 1, setup.steps + 1))
    assert_same_steps(resumed, first, compared)
    rows = lambda name: [json.loads(line) for line in (run / name).read_text().splitlines()]  # noqa: E731
    valid = [v for v in rows("resumed.jsonl") if v["split"] == "valid" and v["step"] <= compared[-1]]
    assert valid == [v for v in rows("first.jsonl") if v["split"] == "valid" and v["step"] > resumed_from]
    if check_alongside:
        check_alongside()
    return run / "ckpt", first


def generate_and_eval(save: Path, corpus: dict, root: Path, losses: dict, dtype: str):
    """Starts megatron-based-generate (greedy: the prompt and a continuation) and megatron-based-eval, at once, on
    the save directory's latest checkpoint (of step k); returns the check, which waits for both: the continuation
    printed after the prompt, and the eval loss within 10% of the training loss at step k + 1 (the first one
    computed with those weights) and below step 1's. (CUDA-graphed decode == eager decode is
    tests/megatron_based/test_generation.py's.)"""
    step = save / (save / "latest").read_text().strip()
    result, text = root / "eval.json", root / "eval.txt"
    text.write_text(corpus["text"].read_text()[:20_000])
    common = ["--checkpoint", str(step), "--tokenizer", corpus["tokenizer"], "--dtype", dtype]
    commands = {"generate": [*tool("megatron-based-generate"), *common, "--prompt", "And God said",
                             "--max-new-tokens", "24"],
                "eval": [*tool("megatron-based-eval"), *common, "--text", str(text), "--json", str(result)]}
    # their stdout is the product's output: without Triton's autotuning prints (the GPU suite's script sets
    # TRITON_PRINT_AUTOTUNING for the training logs; Triton prints them to stdout, inside the streamed text)
    quiet = {k: v for k, v in env().items() if k != "TRITON_PRINT_AUTOTUNING"}
    started = {}
    for name, cmd in commands.items():
        with (root / f"{name}.out").open("w") as out, (root / f"{name}.err").open("w") as err:
            started[name] = (popen(cmd, env=quiet, stdout=out, stderr=err), time.time())

    def check() -> None:
        output = {}
        for name, (proc, start) in started.items():
            try:
                code = proc.wait(timeout=max(1.0, 300 - (time.time() - start)))
            except subprocess.TimeoutExpired:
                proc.kill()
                code = "timeout"
            output[name], err = (root / f"{name}.out").read_text(), (root / f"{name}.err").read_text()
            keep_log(root / f"{name}.log", f"megatron-based-{name}", code, output[name], err, start)
            assert code == 0, output[name][-2000:] + err[-4000:]
        continuation = output["generate"].strip().splitlines()[-1]
        assert continuation.startswith("And God said") and len(continuation) > len("And God said"), output["generate"]
        loss = json.loads(result.read_text())["loss"]
        k = int(step.name.split("_")[1])
        first, at = losses[1]["loss"], losses[k + 1]["loss"]
        assert loss < first and abs(loss - at) < 0.1 * at, (loss, first, at)

    return check


@pytest.mark.launch
def test_cpu_train_kill_resume_generate_eval(corpus, tmp_path):
    kill_and_resume(cpu_setup(), corpus, tmp_path,  # generate and eval beside the resumed run, as on the GPU
                    lambda save, rows: generate_and_eval(save, corpus, tmp_path, rows, "fp32"))


GPU_RUNS = {"eager": False, "cuda-graphs+accumulation+validation": True}


def make_demo(root: Path) -> None:
    """``make demo`` exactly as the README says, on every local GPU (the full 300 steps; CUDA-graphed by default)."""
    start = time.time()
    with (root / "demo.out").open("w") as out, (root / "demo.err").open("w") as err:
        proc = popen(["make", "demo"], env={**env(), "DEMO_DIR": str(root)}, stdout=out, stderr=err)
        try:
            code = proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            kill_all(proc)
            code = "timeout"
    stdout, stderr = (root / "demo.out").read_text(), (root / "demo.err").read_text()
    keep_log(root / "demo.log", "make demo", code, stdout, stderr, start)
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    assert f"on {GPUS} processes (NCCL, bf16, CUDA graphs)" in stdout and "[4/4] greedy sample" in stdout, \
        stdout[-3000:]
    assert "CUDA graphs: on (model.cuda_graph_impl: auto)" in stdout, stdout[-3000:]  # the training log says so too
    assert "CUDA graphs: built " in stdout and "create cuda graphs" not in stdout + stderr, stdout[-3000:]
    valid = [line for line in stdout.splitlines() if line.startswith("validation at step 300")]
    assert valid and float(valid[0].split("loss ")[1].split(",")[0]) < 4.5, stdout[-3000:]


@contextlib.contextmanager
def start_gpu_jobs(items, tmp_path_factory):
    """The GPU end-to-end jobs of the selected ``items``, started at once in threads: the eager and the CUDA-graphed
    kill / resume runs (with generate / eval) and ``make demo``; yields {test name: future}. tests/conftest.py
    starts them with the session (fixture ``gpu_jobs``) and runs their tests last, so they run beside the
    in-process GPU tests. Each job is a chain of fresh processes that spend most of their time importing (17 s
    each on the H200 machine), compiling and writing checkpoints; one after the other they were half of the suite's
    time. Sharing the GPU changes no result a test compares: the in-process tests do not tune, the resumed runs read
    their kernel configs from the killed runs' autotuning cache (TRITON_CACHE_AUTOTUNING), and the CUDA-graphed run
    and generate / eval do not tune. On leaving (the session's end, or an interrupt) every process still running is
    killed."""
    names = {item.name for item in items}
    jobs = {}
    corpus = None
    for label, graphs in GPU_RUNS.items():
        if f"test_gpu_train_kill_resume_generate_eval[{label}]" not in names:
            continue
        corpus = corpus or make_corpus(tmp_path_factory.mktemp("entry_corpus"))
        root = tmp_path_factory.mktemp(f"gpu_{'graphs' if graphs else 'eager'}")
        # generate and eval (once is enough: they read only the weights) on the CUDA-graphed run's checkpoint,
        # beside its resumed run: its kernels do not tune, so the GPU they share cannot change its configs
        alongside = ((lambda save, rows, root=root, corpus=corpus: generate_and_eval(save, corpus, root, rows,
                                                                                      "bf16")) if graphs else None)
        jobs[f"test_gpu_train_kill_resume_generate_eval[{label}]"] = (
            lambda graphs=graphs, root=root, alongside=alongside, corpus=corpus:
            kill_and_resume(gpu_setup(graphs), corpus, root, alongside))
    if "test_make_demo_as_written" in names and shutil.which("make"):
        demo_root = tmp_path_factory.mktemp("demo")
        jobs["test_make_demo_as_written"] = lambda: make_demo(demo_root)
    pool = ThreadPoolExecutor(max(1, len(jobs)))
    futures = {name: pool.submit(job) for name, job in jobs.items()}
    try:
        yield futures
    finally:
        for proc in STARTED:
            if proc.poll() is None:
                kill_all(proc)
        pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.gpu
@pytest.mark.parametrize("run", list(GPU_RUNS))
def test_gpu_train_kill_resume_generate_eval(gpu_jobs, request, run):
    """The kill / resume of ``kill_and_resume`` at based-360m size, eager (default optimizer format, kernels
    tuned as in users' runs) and with CUDA graphs + accumulation + validation (dp_reshardable, each kernel's first
    config; generate and eval on its checkpoint beside its resumed run). Runs in ``start_gpu_jobs``."""
    gpu_jobs[request.node.name].result()


@pytest.mark.launch
def test_demo_trains_saves_and_samples(tmp_path):
    """The demo end to end, shortened on CPU (40 steps) through its override arguments."""
    cmd = [sys.executable, "-m", "megatron_based.tasks.demo", "train.train_steps=40", "train.save_interval=0",
           "train.eval_interval=20", "train.lr_warmup_steps=10"]
    out = subprocess.run(cmd, cwd=REPO, env={**env(), "DEMO_DIR": str(tmp_path)}, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "[4/4] greedy sample" in out.stdout and (tmp_path / "checkpoints" / "latest").is_file(), out.stdout


@pytest.mark.gpu
def test_make_demo_as_written(gpu_jobs, request):
    """``make demo`` exactly as the README says, on every local GPU (the full 300 steps); runs in
    ``start_gpu_jobs``."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    gpu_jobs[request.node.name].result()


LAYOUTS = {"tp2-sp": ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"],
           "cp2": ["parallel.context_parallel_size=2"], "pp2": ["parallel.pipeline_model_parallel_size=2"]}


def copy_checkpoint(src: Path, step: int, dst: Path) -> None:
    """``src``'s checkpoint of ``step`` as the only, latest one under ``dst``."""
    name = f"step_{step:08d}"
    shutil.copytree(src / name, dst / name)
    (dst / "latest").write_text(name + "\n")


def layout_matches_dp_and_resumes_at_tp1(setup: Setup, corpus: dict, root: Path, layout: str, rtol: float,
                                         first_rtol: float) -> None:
    """A DP run saves every ``save_interval`` (= K) steps; the ``layout`` run resumes from its step-K checkpoint
    (the same weights, whatever each layout would initialise) and its losses and gradient norms match the DP run's
    within ``rtol`` (``first_rtol`` at the first step, whose weights are the checkpoint's); its own step-2K
    checkpoint resumes at TP=1 (DP) and continues it within ``rtol``."""
    k = setup.save_interval
    dp = root / "dp"
    finish(start_train(setup, corpus, dp, dp / "metrics.jsonl"), dp, dp / "metrics.jsonl", setup.timeout)
    reference = train_steps(dp / "metrics.jsonl")
    run = root / layout
    copy_checkpoint(dp / "ckpt", k, run / "ckpt")
    proc = start_train(setup, corpus, run, run / "metrics.jsonl", "--load", "latest", *LAYOUTS[layout])
    finish(proc, run, run / "metrics.jsonl", setup.timeout)
    at_layout = train_steps(run / "metrics.jsonl")
    assert sorted(at_layout) == list(range(k + 1, setup.steps + 1))
    assert_same_steps(at_layout, reference, [k + 1], exact=False, rtol=first_rtol)
    assert_same_steps(at_layout, reference, range(k + 1, setup.steps + 1), exact=False, rtol=rtol)
    back = root / f"{layout}-to-tp1"
    copy_checkpoint(run / "ckpt", 2 * k, back / "ckpt")
    finish(start_train(setup, corpus, back, back / "metrics.jsonl", "--load", "latest"), back, back / "metrics.jsonl",
           setup.timeout)
    assert_same_steps(train_steps(back / "metrics.jsonl"), at_layout, range(2 * k + 1, setup.steps + 1), exact=False,
                      rtol=rtol)


@pytest.mark.multigpu
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_multigpu_layout_matches_dp_and_resumes_at_tp1(corpus, tmp_path, layout):
    """On 2 GPUs (NCCL, bf16): TP=2+SP / CP=2 / PP=2 continue a DP=2 run, and resume at TP=1 (the same check on CPU
    with the tiny model: ``test_cpu_layout_matches_dp_and_resumes_at_tp1``)."""
    setup = Setup("configs/based-360m.yaml", 2, steps=12, save_interval=4, kill_after=12, timeout=240, overrides=[
        "model.seq_length=2048", "train.micro_batch_size=1", "train.global_batch_size=4", "train.lr=3e-4",
        "train.lr_warmup_steps=2", "train.eval_interval=0"])
    layout_matches_dp_and_resumes_at_tp1(setup, corpus, tmp_path, layout, rtol=2e-2, first_rtol=1e-2)


@pytest.mark.launch
def test_cpu_layout_matches_dp_and_resumes_at_tp1(corpus, tmp_path):
    """The multi-GPU test's procedure on 2 gloo processes, for PP=2 (the layout whose initialisation differs)."""
    setup = cpu_setup()
    setup.steps = 12
    # fp32. The first resumed step is bitwise the DP run's; after it, PP sums the tied embedding's two gradient
    # copies in another order, and Adam (eps 1e-8) magnifies that rounding in near-zero gradients: grad norms drift
    # apart by ~3e-4 after 3 steps and ~2e-3 after 7.
    layout_matches_dp_and_resumes_at_tp1(setup, corpus, tmp_path, "pp2", rtol=5e-3, first_rtol=1e-6)
