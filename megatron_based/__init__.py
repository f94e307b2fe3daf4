"""megatron-based: BASED layers for Megatron-Core.

The public entry points, imported on first use so that ``import megatron_based`` stays light::

    megatron_based.initialize_parallel(...)   # torch.distributed + Megatron's model-parallel groups
    megatron_based.build_model(config, ...)    # a BASED GPTModel from a BasedConfig or a plain TransformerConfig

The sub-packages ("wings") import only downwards: runtime <- model <- training <- inference <- tasks
(docs/architecture.md; tests/test_layering.py checks it).
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "BasedConfig": "model.config",
    "as_based_config": "model.config",
    "build_model": "model.builder",
    "get_based_block_spec": "model.spec",
    "initialize_parallel": "runtime.parallel",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'megatron_based' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
