"""Zoology's own code, end to end, on MQAR: to compare its curve with ``megatron-based-mqar``'s.

docs/mqar.md ("Zoology's own code in the same setting") compares our BaseConv models with the MQAR numbers Zoology
published. To separate our reimplementation from the setting, this script trains with HazyResearch/zoology's OWN
code, taken from a git clone at fixed commits, in the setting of the published BaseConv launch:

- data: ``zoology/data/associative_recall.py::gap_power_distr_ar`` at 8486daf (renamed ``multiquery_ar`` later, in
  a6093c8, same algorithm); vocabulary 8192, power 0.01, train seed ``--data-seed``, test seed ``--data-seed`` + 10;
- model: ``zoology/model.py`` at d88d6f5 (Zoology's HEAD when this was written; not 8486daf's, whose
  ``TransformerBlock`` builds its sequence mixer a second time as the state mixer), 2 layers of 8486daf's
  ``BaseConv`` (kernel 3, then the implicit long convolution with ``l_max`` = ``--seq-len``), ``Identity`` state
  mixer, 8486daf's ``ModelConfig`` defaults (LayerNorm, embedding dropout 0.1, tied embedding);
- training: 8486daf's ``zoology/train.py`` ``Trainer`` (AdamW with torch's default weight decay 0.01, cosine schedule
  over ``--epochs`` stepped per epoch, no early stopping, fp32), driven by a loop equal to ``Trainer.fit``.

The one change to the training loop (``FastTrainer``, default; ``--exact-zoology-loop`` runs Zoology's verbatim)
applies the tied output layer only at the labelled positions: see its docstring for why the numbers are the same.

The script writes Zoology's files (``git show COMMIT:PATH``) and three stub modules into ``OUT_DIR/zoology_src``
and imports them from there; nothing is installed. ``OUT_DIR`` also holds the generated data (a cache),
``state.pt`` (model, optimizer, schedule, RNG, history; written after every epoch) and ``history.json`` (one record
per epoch, also printed as a JSON line). Running the same command again continues from ``state.pt``; a state saved
with other settings is refused.

    git clone https://github.com/HazyResearch/zoology ../zoology
    python benchmarks/zoology_mqar.py --zoology-repo ../zoology --out-dir runs/zoology-t64
    python benchmarks/zoology_mqar.py --zoology-repo ../zoology --out-dir runs/zoology-t64 --device cpu --threads 1

The defaults are docs/mqar.md's run (T 64, 4 pairs, d 64, lr 1e-2, batch 1024, 64 epochs, 100,000 / 3,000
sequences): ~1.5 min per epoch on one CPU thread (~25 min with ``--exact-zoology-loop``).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

ZOOLOGY_URL = "https://github.com/HazyResearch/zoology"
# 2023-10-29 "Simplify long conv": the code of the published BaseConv launch (data, trainer, config, mixers)
C_8486DAF = "8486daf5b71f1f890bc31492197e88e3a094e843"
# 2026-01-11, Zoology's HEAD when this was written: its model.py (8486daf's builds the sequence mixer as state mixer)
C_D88D6F5 = "d88d6f5474f36998d82d5c3bd58a190248d0a669"
# every Zoology module the run imports, and the commit it is taken from
ZOOLOGY_FILES = {
    "zoology/__init__.py": C_8486DAF,
    "zoology/utils.py": C_8486DAF,
    "zoology/config.py": C_8486DAF,
    "zoology/logger.py": C_8486DAF,  # imported by train.py (WandbLogger, not used: CaptureLogger replaces it)
    "zoology/train.py": C_8486DAF,
    "zoology/data/__init__.py": C_8486DAF,
    "zoology/data/utils.py": C_8486DAF,
    "zoology/data/associative_recall.py": C_8486DAF,
    "zoology/mixers/__init__.py": C_8486DAF,
    "zoology/mixers/base_conv.py": C_8486DAF,
    "zoology/mixers/convolution.py": C_8486DAF,
    "zoology/model.py": C_D88D6F5,
}
# Stand-ins for three packages Zoology imports but this run does not need (not dependencies of this project).
STUBS = {
    "torchvision/__init__.py": "# STUB, not torchvision: zoology/model.py only uses torchvision.ops.StochasticDepth\n",
    "torchvision/ops.py": '''\
# STUB: StochasticDepth as the identity, which the real op is at Zoology's drop_path = 0.0
import torch.nn as nn


class StochasticDepth(nn.Module):
    def __init__(self, p: float, mode: str):
        super().__init__()
        assert p == 0.0, "the stub only stands for p = 0 (the identity)"
        self.p, self.mode = p, mode

    def forward(self, x):
        return x

    def __repr__(self):
        return f"StochasticDepth(p={self.p}, mode={self.mode})"
''',
    "wandb/__init__.py": "# STUB: empty; zoology/logger.py imports wandb, its WandbLogger is not used here\n",
    "torchmetrics/__init__.py": "# STUB: zoology/train.py imports torchmetrics' accuracy but never calls it\n",
    "torchmetrics/functional/__init__.py": "",
    "torchmetrics/functional/classification.py": '''\
def accuracy(*args, **kwargs):
    raise NotImplementedError("torchmetrics stub (zoology/train.py never calls accuracy)")
''',
}
# The settings a run is defined by: resuming with any of them changed is refused. (--device, --threads and
# --exact-zoology-loop change only float summation order; --stop-after only where a session stops.) The values for
# a state.pt of the first version of this script, which had no --seq-len / --num-kv-pairs, are the defaults.
SETTINGS = ("n_train", "n_test", "epochs", "batch_size", "lr", "d_model", "seq_len", "num_kv_pairs", "data_seed",
            "seed")
VOCAB = 8192


def fail(message: str):
    """One line on stderr, exit status 2: for errors the user fixes (a path, a setting), no traceback."""
    print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


# ---------------------------------------------------------------------------------------------------------------
# Zoology's source, from the user's clone
# ---------------------------------------------------------------------------------------------------------------

def git_show(repo: Path, spec: str) -> bytes:
    # GIT_CEILING_DIRECTORIES: git must not find a repository above REPO (e.g. this one when REPO is a plain folder)
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(repo.parent)}
    run = subprocess.run(["git", "-C", str(repo), "show", spec], capture_output=True, env=env)
    if run.returncode:
        lines = run.stderr.decode(errors="replace").strip().splitlines()
        raise LookupError(lines[-1] if lines else f"git show exited {run.returncode}")
    return run.stdout


def check_zoology_repo(repo: Path):
    """Every problem with the clone is one line naming the path and what to do (before anything is written)."""
    if shutil.which("git") is None:
        fail("git not found on PATH: this script reads Zoology's files with `git show`")
    if not repo.is_dir():
        fail(f"--zoology-repo {repo} does not exist: git clone {ZOOLOGY_URL} {repo}")
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(repo.parent)}
    if subprocess.run(["git", "-C", str(repo), "rev-parse", "--git-dir"], capture_output=True, env=env).returncode:
        fail(f"--zoology-repo {repo} is not a git repository: give it a clone (git clone {ZOOLOGY_URL}) "
             "or a bare mirror")
    for commit in sorted(set(ZOOLOGY_FILES.values())):
        found = subprocess.run(["git", "-C", str(repo), "cat-file", "-e", f"{commit}^{{commit}}"],
                               capture_output=True, env=env).returncode == 0
        if not found:
            fail(f"--zoology-repo {repo} has no commit {commit} (is it {ZOOLOGY_URL}?): "
                 f"`git -C {repo} fetch origin`, or a fresh `git clone {ZOOLOGY_URL}`")


def assemble_zoology(repo: Path, dest: Path):
    """Writes ZOOLOGY_FILES at their commits and the STUBS into DEST (fresh each run: the code a run used stays
    inspectable there) and puts DEST first on sys.path."""
    if dest.exists():
        shutil.rmtree(dest)
    for path, commit in ZOOLOGY_FILES.items():
        try:
            text = git_show(repo, f"{commit}:{path}")
        except LookupError as e:
            fail(f"--zoology-repo {repo}: git show {commit}:{path} failed ({e}): a fresh `git clone {ZOOLOGY_URL}`")
        (dest / path).parent.mkdir(parents=True, exist_ok=True)
        (dest / path).write_bytes(text)
    for path, text in STUBS.items():
        (dest / "stubs" / path).parent.mkdir(parents=True, exist_ok=True)
        (dest / "stubs" / path).write_text(text)
    (dest / "SOURCES.txt").write_text(f"{ZOOLOGY_URL} files written by benchmarks/zoology_mqar.py (git show):\n"
                                      + "".join(f"{c} {p}\n" for p, c in ZOOLOGY_FILES.items())
                                      + "stubs/: torchvision.ops.StochasticDepth (identity), wandb, torchmetrics\n")
    # first on sys.path: these, not an installed zoology / torchvision / wandb, are what the run imports
    sys.path[:0] = [str(dest), str(dest / "stubs")]


# ---------------------------------------------------------------------------------------------------------------
# Glue around Zoology's modules (built after they are importable)
# ---------------------------------------------------------------------------------------------------------------

class LogitsLM(nn.Module):
    """d88d6f5's LanguageModel.forward returns the hidden states by default (return_embeddings=True); 8486daf's
    Trainer calls model(inputs) and expects logits, as 8486daf's forward returned."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids):
        return self.lm(input_ids, return_embeddings=False)


class CaptureLogger:
    """Replaces Zoology's WandbLogger: keeps what its Trainer logs (per-batch train loss, the epoch's valid/*)."""

    def __init__(self):
        self.train_losses = []
        self.last_valid = None

    def log(self, metrics):
        if "train/loss" in metrics:
            v = metrics["train/loss"]
            self.train_losses.append(float(v.item() if torch.is_tensor(v) else v))
        if "valid/loss" in metrics:
            self.last_valid = dict(metrics)


def patch_zoology(ztrain, zmodel, device: str) -> dict:
    """Two patches of Zoology's modules, both without changing what they compute:
    - d88d6f5's TokenEmbeddings defaults to device='cuda': it builds its embedding on DEVICE instead;
    - 8486daf's compute_accuracy (which Trainer.test calls on the concatenated test predictions) also computes the
      per-sequence accuracy on the very same tensors; returns the dict those extra numbers land in."""
    defaults = zmodel.TokenEmbeddings.__init__.__defaults__
    zmodel.TokenEmbeddings.__init__.__defaults__ = tuple(device if d == "cuda" else d for d in defaults)

    original, extra = ztrain.compute_accuracy, {}

    def compute_accuracy(preds, targets, ignore_index=-100):
        acc = original(preds, targets, ignore_index=ignore_index)
        mask = targets != ignore_index
        correct = ((preds == targets) & mask).sum(1).double()
        n = mask.sum(1).double()
        has = n > 0
        extra["acc_per_seq_mean"] = float((correct[has] / n[has]).mean())
        extra["n_test_seqs"] = int(preds.shape[0])
        extra["n_labelled_positions"] = int(mask.sum())
        extra["labels_per_seq_min_max"] = [int(n.min()), int(n.max())]
        return acc

    ztrain.compute_accuracy = compute_accuracy
    return extra


def make_fast_trainer(ztrain):
    class FastTrainer(ztrain.Trainer):
        """Zoology 8486daf's Trainer, with train_epoch/test applying the tied lm_head (and the cross-entropy) ONLY
        at the labelled positions (targets != -100). Why the numbers are Zoology's: nn.CrossEntropyLoss with
        ignore_index=-100 averages over the labelled positions only, so the other positions add nothing to the loss
        and nothing to any gradient (their logits' gradient is zero, and the head is a per-position linear map),
        and compute_accuracy masks them out. So loss, gradients, updates and accuracies equal Zoology's, up to
        float summation order (docs/mqar.md: its first three steps equal Zoology's Trainer to 2e-6 in the loss).
        On CPU it is ~15x faster: Zoology's full (1024 x 64) x 8192 logits cost ~14 s per batch. The structure
        follows 8486daf's train.py line by line: loader order, zero_grad / forward / backward / step, per-batch
        logging, test loss averaged over batches, compute_accuracy on the concatenated predictions and targets."""

        def _masked_forward(self, inputs, targets):
            lm = self.model.lm
            h = lm(inputs, return_embeddings=True)  # LMBackbone's output (after ln_f)
            mask = targets != -100
            return lm.lm_head(h[mask]), mask  # logits (n_labelled, vocab)

        def train_epoch(self, epoch_idx: int):
            self.model.train()
            iterator = ztrain.tqdm(self.train_dataloader, total=len(self.train_dataloader),
                                   desc=f"Train Epoch {epoch_idx}/{self.max_epochs}")
            for inputs, targets in iterator:
                inputs, targets = inputs.to(self.device), targets.to(self.device)
                self.optimizer.zero_grad()
                logits, mask = self._masked_forward(inputs, targets)
                loss = self.loss_fn(logits, targets[mask])
                loss.backward()
                self.optimizer.step()
                iterator.set_postfix({"loss": loss.item()})
                self.logger.log({"train/loss": loss})

        def test(self, epoch_idx: int):
            self.model.eval()
            test_loss = 0
            all_preds, all_targets = [], []
            with torch.no_grad():
                for inputs, targets in self.test_dataloader:
                    inputs, targets = inputs.to(self.device), targets.to(self.device)
                    logits, mask = self._masked_forward(inputs, targets)
                    loss = self.loss_fn(logits, targets[mask])
                    test_loss += loss / len(self.test_dataloader)
                    preds = torch.full_like(targets, -1)  # unlabelled positions: compute_accuracy ignores them
                    preds[mask] = torch.argmax(logits, dim=-1)
                    all_preds.append(preds.cpu())
                    all_targets.append(targets.cpu())
                test_accuracy = ztrain.compute_accuracy(torch.cat(all_preds, dim=0), torch.cat(all_targets, dim=0))
                metrics = {"valid/loss": test_loss.item(), "valid/accuracy": test_accuracy.item()}
                print(f"Valid Epoch {epoch_idx}/{self.max_epochs}: {metrics}", flush=True)
                self.logger.log(metrics)

    return FastTrainer


def build_model_config(ModelConfig, args):
    class ModelConfigH(ModelConfig):
        """8486daf's ModelConfig plus the three fields d88d6f5's model.py reads (at d88d6f5's defaults)."""
        learnable_word_embeddings: bool = True
        embedding_init_type: str = "default"
        block_type: str = "TransformerBlock"

    return ModelConfigH(
        d_model=args.d_model,
        n_layers=2,
        max_position_embeddings=0,  # BaseConv: no positional embedding (8486daf zoology/experiments/d_model.py)
        vocab_size=VOCAB,
        sequence_mixer=dict(name="zoology.mixers.base_conv.BaseConv",
                            kwargs={"l_max": args.seq_len, "kernel_size": [3, -1], "implicit_long_conv": True}),
        state_mixer=dict(name="torch.nn.Identity", kwargs={}),
        # ModelConfig defaults kept: embed_dropout=0.1, resid_dropout=0.0, drop_path=0.0, layer_norm_epsilon=1e-5,
        # pad_vocab_size_multiple=1
    )


# ---------------------------------------------------------------------------------------------------------------
# Data, state
# ---------------------------------------------------------------------------------------------------------------

def get_data(gap_power_distr_ar, SyntheticData, args):
    """Zoology's generator (numpy, seeded), cached in OUT_DIR: the 100,000-sequence set takes a while on CPU."""
    # the T 64 / 4-pair name is the first version's (its caches stay usable)
    shape = "" if (args.seq_len, args.num_kv_pairs) == (64, 4) else f"_T{args.seq_len}_kv{args.num_kv_pairs}"
    cache = os.path.join(args.out_dir, f"data_ntrain{args.n_train}_ntest{args.n_test}_seed{args.data_seed}{shape}.pt")
    if os.path.exists(cache):
        print(f"loading data from {cache}", flush=True)
        d = torch.load(cache)
    else:
        t0 = time.time()
        data = gap_power_distr_ar(
            vocab_size=VOCAB,
            num_train_examples=args.n_train,
            num_test_examples=args.n_test,
            input_seq_len=args.seq_len,
            seed=args.data_seed,  # train seed; test seed = seed + 10 (Zoology)
            num_kv_pairs=args.num_kv_pairs,
            train_power_a=0.01,
            test_power_a=0.01,
            random_non_queries=False,
        )
        d = dict(train_inputs=data.train_inputs, train_labels=data.train_labels,
                 test_inputs=data.test_inputs, test_labels=data.test_labels)
        torch.save(d, cache + ".tmp")
        os.replace(cache + ".tmp", cache)
        print(f"generated data in {time.time() - t0:.1f}s -> {cache}", flush=True)
    SyntheticData(**d).check_shapes(args.n_train, args.n_test, args.seq_len)  # also a cache's
    return d


def rng_state(device: str) -> dict:
    # numpy's state as a tensor and numbers: state.pt then loads with weights_only=True (no pickled objects)
    name, keys, pos, has_gauss, cached = np.random.get_state()
    s = dict(torch=torch.get_rng_state(), numpy=(name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
             python=random.getstate())
    if device.startswith("cuda"):  # dropout on the GPU draws from the CUDA generator
        s["cuda"] = torch.cuda.get_rng_state(device)
    return s


def set_rng_state(s: dict, device: str):
    torch.set_rng_state(s["torch"])
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(s["python"])
    if device.startswith("cuda") and "cuda" in s:
        torch.cuda.set_rng_state(s["cuda"], device)


def load_state(state_path: str, args):
    """The saved state, or None; a state of other settings is refused (one line naming the file and settings)."""
    if not os.path.exists(state_path):
        return None
    try:
        st = torch.load(state_path, map_location="cpu", weights_only=True)  # tensors and plain data only
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file: say which, stop
        fail(f"{state_path} cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0][:200]}): remove it or use "
             "another --out-dir")
    saved = st["args"]
    parser_defaults = vars(parse_args([]))
    changed = [k for k in SETTINGS if saved.get(k, parser_defaults[k]) != getattr(args, k)]
    if changed:
        was = ", ".join(f"--{k.replace('_', '-')} {saved.get(k, parser_defaults[k])} (now {getattr(args, k)})"
                        for k in changed)
        fail(f"{state_path} was saved with {was}: run with those settings to continue it, or use another --out-dir")
    if st.get("zoology_files", ZOOLOGY_FILES) != ZOOLOGY_FILES:
        fail(f"{state_path} was trained with other Zoology commits ({st['zoology_files']}): use another --out-dir")
    return st


def atomic_write(path: str, write):
    write(path + ".tmp")
    os.replace(path + ".tmp", path)  # a run killed mid-write leaves the previous file whole


# ---------------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--zoology-repo", type=Path, default=None,
                   help=f"a git clone (or bare mirror) of {ZOOLOGY_URL} holding commits 8486daf and d88d6f5")
    p.add_argument("--out-dir", default="runs/zoology-t64",
                   help="data cache, state.pt, history.json, zoology_src/ (the code used)")
    p.add_argument("--n-train", type=int, default=100_000)
    p.add_argument("--n-test", type=int, default=3_000)
    p.add_argument("--epochs", type=int, default=64, help="the length of the cosine schedule")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many epochs in this session (the schedule stays over --epochs)")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=64, help="T; also the long convolution's l_max")
    p.add_argument("--num-kv-pairs", type=int, default=4)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--seed", type=int, default=0, help="torch seed for init / dropout / shuffle (8486daf sets none)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (intra- and inter-op); default: torch's. docs/mqar.md's run: 1")
    p.add_argument("--exact-zoology-loop", action="store_true",
                   help="8486daf's Trainer.train_epoch/test verbatim (full logits; ~25 min per epoch at the "
                        "defaults on 1 CPU thread)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.zoology_repo is None:
        fail(f"--zoology-repo PATH is required: a clone of Zoology (git clone {ZOOLOGY_URL} PATH)")
    repo = args.zoology_repo.resolve()
    check_zoology_repo(repo)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        try:
            torch.set_num_interop_threads(args.threads)
        except RuntimeError:  # only settable before the first inter-op parallel work
            pass
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {args.device}: no CUDA device here (use --device cpu)")
    os.makedirs(args.out_dir, exist_ok=True)
    state_path = os.path.join(args.out_dir, "state.pt")
    hist_path = os.path.join(args.out_dir, "history.json")
    st = load_state(state_path, args)  # before the (slow) data generation: a refused run stops at once

    assemble_zoology(repo, Path(args.out_dir).resolve() / "zoology_src")
    try:
        import zoology.model as zmodel  # d88d6f5
        import zoology.train as ztrain  # 8486daf
        from zoology.config import ModelConfig  # 8486daf
        from zoology.data.associative_recall import gap_power_distr_ar  # 8486daf
        from zoology.data.utils import SyntheticData  # 8486daf
    except ModuleNotFoundError as e:  # Zoology's own dependencies (pydantic, einops, tqdm: megatron-core's too)
        fail(f"Zoology's code needs the package {e.name!r}: pip install {e.name}")
    extra = patch_zoology(ztrain, zmodel, args.device)

    print("threads:", torch.get_num_threads(), torch.get_num_interop_threads(), "torch", torch.__version__,
          "numpy", np.__version__, "device", args.device, flush=True)
    plain_args = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}  # printed and saved
    print("args:", plain_args, flush=True)
    print("zoology:", {p: c[:7] for p, c in ZOOLOGY_FILES.items()}, flush=True)

    data = get_data(gap_power_distr_ar, SyntheticData, args)
    print("train", tuple(data["train_inputs"].shape), "test", tuple(data["test_inputs"].shape), flush=True)
    print("example input :", data["train_inputs"][0].tolist(), flush=True)
    print("example labels:", data["train_labels"][0].tolist(), flush=True)

    torch.manual_seed(args.seed)
    model = LogitsLM(zmodel.LanguageModel(config=build_model_config(ModelConfig, args))).to(args.device)
    n_all = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(model, flush=True)
    print(f"parameters (unique, tied embedding counted once): total {n_all}, trainable {n_trainable}", flush=True)

    # DataLoaders as 8486daf's zoology/data/utils.py::prepare_data builds them (its test loader shuffles too)
    train_dl = DataLoader(TensorDataset(data["train_inputs"], data["train_labels"]),
                          batch_size=args.batch_size, num_workers=0, shuffle=True)
    test_dl = DataLoader(TensorDataset(data["test_inputs"], data["test_labels"]),
                         batch_size=args.batch_size, num_workers=0, shuffle=True)

    logger = CaptureLogger()
    trainer_cls = ztrain.Trainer if args.exact_zoology_loop else make_fast_trainer(ztrain)
    print("trainer:", trainer_cls.__name__, flush=True)
    # 8486daf's train() builds its Trainer without early_stopping_*: no early stopping (TrainConfig's
    # "valid/accuracy" > 0.99 is never passed on)
    trainer = trainer_cls(model=model, train_dataloader=train_dl, test_dataloader=test_dl, max_epochs=args.epochs,
                          learning_rate=args.lr, device=args.device, logger=logger)
    # == 8486daf's Trainer.fit, whose model.to("cuda") is the .to(args.device) above ==
    trainer.loss_fn = nn.CrossEntropyLoss()
    trainer.optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    trainer.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(trainer.optimizer, T_max=args.epochs, eta_min=0.0)
    print("optimizer:", trainer.optimizer, flush=True)

    history, start_epoch, elapsed0 = [], 0, 0.0
    if st is not None:
        model.load_state_dict(st["model"])
        trainer.optimizer.load_state_dict(st["optimizer"])
        trainer.scheduler.load_state_dict(st["scheduler"])
        set_rng_state(st["rng"], args.device)
        history, start_epoch, elapsed0 = st["history"], st["epoch"] + 1, st["elapsed"]
        print(f"resumed from {state_path}: next epoch {start_epoch} of {args.epochs}", flush=True)

    t_start = time.time()
    last = args.epochs if args.stop_after is None else min(args.epochs, start_epoch + args.stop_after)
    for epoch_idx in range(start_epoch, last):
        lr = trainer.optimizer.param_groups[0]["lr"]
        te = time.time()
        logger.train_losses = []
        trainer.train_epoch(epoch_idx)
        t_train = time.time() - te
        trainer.test(epoch_idx)
        t_epoch = time.time() - te
        m = logger.last_valid
        rec = dict(
            epoch=epoch_idx + 1,  # 1-based: the number of epochs completed
            lr=lr,
            train_loss=float(np.mean(logger.train_losses)),
            train_loss_last_batch=logger.train_losses[-1],
            test_loss=m["valid/loss"],
            test_acc_zoology=m["valid/accuracy"],  # Zoology's metric: over all labelled positions
            test_acc_per_seq=extra["acc_per_seq_mean"],  # mean over sequences of each one's accuracy
            n_labelled=extra["n_labelled_positions"],
            labels_per_seq_min_max=extra["labels_per_seq_min_max"],
            epoch_seconds=t_epoch, train_seconds=t_train,
            elapsed=elapsed0 + time.time() - t_start,
        )
        history.append(rec)
        print(json.dumps(rec), flush=True)
        trainer.scheduler.step()  # per epoch, after the test, as Trainer.fit
        atomic_write(state_path, lambda path: torch.save(
            dict(model=model.state_dict(), optimizer=trainer.optimizer.state_dict(),
                 scheduler=trainer.scheduler.state_dict(), rng=rng_state(args.device), epoch=epoch_idx,
                 history=history, elapsed=rec["elapsed"], args=plain_args, zoology_files=ZOOLOGY_FILES), path))
        atomic_write(hist_path, lambda path: Path(path).write_text(json.dumps(history, indent=1)))
    print(f"done: {len(history)} of {args.epochs} epochs in {hist_path}", flush=True)


if __name__ == "__main__":
    main()
