"""The model wing: :class:`~.config.BasedConfig`, the layer and block specs, the mixers, and the GPTModel builder.

``megatron_based.model.build_model`` is :func:`.builder.build_model`, imported on first use so that importing a
light module of this wing (``megatron_based.model.config``) does not build Megatron's GPTModel machinery."""
from __future__ import annotations

__all__ = ["build_model"]


def __getattr__(name: str):
    if name == "build_model":
        from .builder import build_model

        return build_model
    raise AttributeError(f"module 'megatron_based.model' has no attribute {name!r}")
