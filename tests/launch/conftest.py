"""Shared by the launcher tests: a small tokenized corpus (once per session) and run configs of the tiny model."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "megatron_based" / "demo_data" / "kjv.txt"


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> dict:
    """~17k tokens of the demo corpus with its own 1024-piece tokenizer (the tiny config's vocabulary)."""
    from megatron_based.data import preprocess

    root = tmp_path_factory.mktemp("data")
    text = root / "kjv.txt"
    text.write_bytes(CORPUS.read_bytes()[:60_000])
    info = preprocess([str(text)], str(root / "kjv"), vocab_size=1024, show_progress=False)
    return {"data": {"path": [info["prefix"]], "tokenizer_model": info["tokenizer_model"], "split": "95,5,0"}}


def write_config(path: Path, dataset: dict, **sections) -> Path:
    """configs/tiny.yaml at sequence 64 and a few quiet steps, updated by ``sections`` ({"train": {...}, ...})."""
    cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    cfg["model"]["seq_length"] = 64
    cfg["train"].update(micro_batch_size=2, global_batch_size=4, train_steps=6, lr_warmup_steps=2, save_interval=0,
                        eval_interval=0, progress=False, tensorboard_dir=None, save=str(path.parent / "ckpt"))
    cfg.update(dataset)
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path
