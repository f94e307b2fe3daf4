"""``make demo``: pretrain the tiny BASED model (C, L and S mixers) on the shipped King James Bible excerpt.

1. preprocess ``megatron_based/tasks/demo_data/kjv.txt`` (sentencepiece BPE, 1024 pieces -> Megatron ``.bin/.idx``);
2. print the unigram entropy of the tokens: the loss of the best model that ignores context;
3. train ``configs/tiny.yaml`` with torchrun, data-parallel over every local GPU (NCCL + bf16), or over 2 CPU
   processes without one (gloo + fp32);
4. load the last checkpoint in this process (TP=1) and print a greedy sample (prefill, then recurrent decode).

Extra ``section.key=value`` arguments go to the training run (e.g. ``parallel.tensor_model_parallel_size=2``).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

from ..runtime.noise import quiet_known_warnings

REPO = Path(__file__).resolve().parents[2]
CORPUS = Path(__file__).resolve().parent / "demo_data" / "kjv.txt"
PROMPT = "And God said,"


GLOBAL_BATCH = 16  # sequences per step, as configs/tiny.yaml


def batch_overrides(nproc: int) -> list[str]:
    """The batch layout for ``nproc`` data-parallel processes: the tiny config's 16 sequences per step where
    ``nproc`` divides 16 (micro-batches of up to 8), else one micro-batch of ``ceil(16 / nproc)`` per process."""
    micro = max(1, min(8, GLOBAL_BATCH // nproc))
    global_batch = GLOBAL_BATCH if GLOBAL_BATCH % (micro * nproc) == 0 else -(-GLOBAL_BATCH // nproc) * nproc
    if global_batch != GLOBAL_BATCH:
        micro = global_batch // nproc
    return [f"train.micro_batch_size={micro}", f"train.global_batch_size={global_batch}"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    warnings.filterwarnings("ignore")
    quiet_known_warnings()  # also Megatron's known log lines (the in-process load below)
    import torch

    from ..training.config import load_config
    from ..training.data import preprocess, unigram_entropy

    out = Path(os.environ.get("DEMO_DIR", REPO / "runs" / "demo"))
    prefix = out / "data" / "kjv"
    print(f"[1/4] preprocessing {CORPUS.relative_to(REPO)} ({CORPUS.stat().st_size // 1024} KB) -> {prefix}.bin/.idx")
    info = preprocess([str(CORPUS)], str(prefix), vocab_size=1024)
    print(f"      {info['documents']} documents, {info['tokens']:,} tokens, vocabulary {info['vocab_size']}")
    entropy = unigram_entropy(str(prefix), info["vocab_size"])
    print(f"[2/4] unigram entropy of the tokens: {entropy:.3f} nats ({entropy / math.log(2):.2f} bits); a model that "
          "ignores context cannot go below it")

    gpu = torch.cuda.is_available()
    nproc = torch.cuda.device_count() if gpu else 2
    overrides = [f"data.path=[{prefix}]", f"data.tokenizer_model={prefix}.model", f"train.save={out}/checkpoints",
                 f"train.tensorboard_dir={out}/tensorboard", *batch_overrides(nproc), *argv]
    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides, world_size=nproc)  # fail here, not in the workers
    how = ("NCCL, bf16" + (", CUDA graphs" if cfg.cuda_graphs()[0] == "local" else "")) if gpu else "gloo, fp32"
    print(f"[3/4] training configs/tiny.yaml on {nproc} processes ({how}); TensorBoard logs in {out}/tensorboard")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "megatron_based.training.loop", str(REPO / "configs" / "tiny.yaml"), *overrides]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONWARNINGS="ignore")
    start = time.time()
    if subprocess.run(cmd, cwd=REPO, env=env).returncode:
        print("training failed (see above)", file=sys.stderr)
        return 1
    print(f"      training took {time.time() - start:.0f} s (start-up, Triton compilation and tuning included)")
    start = time.time()

    from ..inference.generation import Generator
    from ..inference.loader import load_for_inference
    from ..runtime.parallel import initialize_parallel

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")  # one process: an in-process rendezvous
    initialize_parallel(1, 1, 1)
    model, _, tokenizer = load_for_inference(out / "checkpoints")
    prompt = tokenizer.tokenize(PROMPT)
    # greedy, with the recurrent decoder users run (megatron-based-generate): one prefill, then one token per step
    # with fixed shapes (a full forward per token would compile kernels for many sequence lengths on a GPU)
    stop = [tokenizer.eod] if tokenizer.eod is not None else []
    ids = Generator(model, vocab_size=tokenizer.vocab_size).generate([prompt], 60, stop_tokens=stop)[0]
    print(f"[4/4] greedy sample from {out / 'checkpoints'} (loaded at TP=1; load and sample "
          f"{time.time() - start:.0f} s):\n")
    print(tokenizer.detokenize([i for i in prompt + ids if i != tokenizer.eod]))
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
